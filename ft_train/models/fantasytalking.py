"""FantasyTalking = the diffusers Wan2.1 I2V DiT + the trainable audio adapter.

The backbone is diffusers' ``WanTransformer3DModel``, built from a config (tiny test sizes) or
loaded from a local diffusers-format folder; it is never re-implemented here. The adapter adds
``audio_proj`` (:class:`AudioProjModel`) and one :class:`AudioKV` per block, reached from the
blocks' cross-attention processors. Two optional modules the paper describes but never released
are switched on by config: the facial identity branch (``model.identity``, :mod:`.identity`: a
Q-Former and one zero-initialised face k/v per block, in the same processors) and motion-intensity
modulation (``model.motion``, :mod:`.motion`: an embedding of (ω_l, ω_b) added to the time
embedding through a forward hook). Both start as exact no-ops, so enabling them on a trained
audio adapter changes nothing until they are trained; so does a LoRA on the blocks
(``model.lora``, :mod:`.lora`), whose B starts at zero.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from .adapter import TEXT_TOKENS, AdapterContext, AudioKV, FantasyTalkingAttnProcessor
from .audio import AudioProjModel, audio_window_index, num_video_frames
from .identity import FaceKV, IdentityConfig, IdentityModel
from .lora import ADAPTER, LoraSettings, add_lora, lora_parameters
from .motion import MotionConfig, MotionHook, MotionModel, check_motion

AUDIO_MODES = ("clip", "frame")


class FantasyTalkingDiT(nn.Module):
    """Wan2.1 I2V transformer with the FantasyTalking audio adapter in every block.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (I2V).
        audio_mode: ``"clip"`` (every video token attends to all audio tokens, stage 1) or
            ``"frame"`` (each latent frame attends to its own audio window, stage 2).
        audio_in_dim: audio feature width (wav2vec2-base: 768).
        audio_proj_dim: adapter context width (the release: 2048).
        audio_expand: window widening per side in tokens (the release: 4).
        train_backbone: if False (default) only adapter parameters require grad. The backbone
            keeps the dtype it was loaded in (``model.dtype``); for a full fine-tune keep it
            float32 or let DeepSpeed hold float32 master weights.

    How it runs (activation checkpointing, attention kernels, compile, float8 frozen weights) is
    applied to the built network by :func:`ft_train.speed.apply`; the class takes no speed options.
        identity: ``model.identity`` (:class:`~.identity.IdentityConfig` or its dict); disabled
            by default = no parameters.
        motion: ``model.motion`` (:class:`~.motion.MotionConfig` or its dict); disabled by default.
        lora: ``model.lora`` (:class:`~.lora.LoraSettings` or its dict); rank 0 (default) = none.
            Its layers (peft, put in by diffusers' ``add_adapter``) train with the adapters while
            the backbone stays frozen.
    """

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        audio_mode: str = "clip",
        audio_in_dim: int = 768,
        audio_proj_dim: int = 2048,
        audio_expand: int = 4,
        train_backbone: bool = False,
        identity: IdentityConfig | dict[str, Any] | None = None,
        motion: MotionConfig | dict[str, Any] | None = None,
        lora: LoraSettings | dict[str, Any] | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        inner_dim = cfg.num_attention_heads * cfg.attention_head_dim
        # Adapters are created in float32 whatever the backbone's dtype: they are the trained
        # weights (optimiser master copies); autocast or DeepSpeed decide the compute dtype.
        self.audio_proj = AudioProjModel(audio_in_dim, audio_proj_dim)
        self.audio_kv = nn.ModuleList(AudioKV(audio_proj_dim, inner_dim) for _ in transformer.blocks)
        self.audio_expand = audio_expand
        self.audio_mode = audio_mode
        self._context = AdapterContext()
        self.identity_config = identity if isinstance(identity, IdentityConfig) else IdentityConfig.from_dict(identity)
        self.motion_config = motion if isinstance(motion, MotionConfig) else MotionConfig.from_dict(motion)
        # Disabled modules are not created at all (no parameters, no checkpoint keys).
        self.identity = self.face_kv = self.motion = None
        if self.identity_config.enabled:
            self.identity = IdentityModel(self.identity_config)
            self.face_kv = nn.ModuleList(FaceKV(self.identity_config.out_dim, inner_dim) for _ in transformer.blocks)
        for i, (block, kv) in enumerate(zip(transformer.blocks, self.audio_kv)):
            face_kv = self.face_kv[i] if self.face_kv is not None else None
            block.attn2.set_processor(FantasyTalkingAttnProcessor(kv, self._context, face_kv))
        if self.motion_config.enabled:
            self.motion = MotionModel(inner_dim, self.motion_config.hidden_dim, self.motion_config.freq_dim)
            # Not a module attribute: the handle is plain state, removed with the model.
            self._motion_hook = transformer.condition_embedder.time_embedder.register_forward_hook(
                MotionHook(self._context)
            )
        self.lora_config = LoraSettings.from_dict(lora)
        if self.lora_config.enabled:
            if train_backbone:
                raise ValueError("model.train_backbone=true trains every DiT weight; a LoRA on them (model.lora.rank="
                                 f"{self.lora_config.rank}) adds nothing: set model.lora.rank=0 or model.train_backbone=false")
            add_lora(transformer, self.lora_config)
        self.set_backbone_trainable(train_backbone)

    @property
    def adapter_context(self) -> AdapterContext:
        """The per-forward tensors the blocks' processors read (the audio tokens and windows, the
        ID tokens), filled at the start of each forward."""
        return self._context

    @property
    def audio_mode(self) -> str:
        return self._audio_mode

    @audio_mode.setter
    def audio_mode(self, mode: str) -> None:
        if mode not in AUDIO_MODES:
            raise ValueError(f"audio_mode must be one of {AUDIO_MODES}, got {mode!r}")
        self._audio_mode = mode

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the backbone; the trained LoRA (``model.lora``) stays trainable."""
        self.transformer.requires_grad_(trainable)
        for _, param in self.lora_state():
            param.requires_grad_(True)

    def lora_state(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained LoRA's parameters (``model.lora``) by ``state_dict()`` name; empty without one.
        Extra adapters added for inference (``ft-infer extra_lora``) are not among them."""
        if not self.lora_config.enabled:
            return []
        return [(f"transformer.{n}", p) for n, p in lora_parameters(self.transformer) if f".{ADAPTER}." in n]

    def adapter_modules(self) -> dict[str, nn.Module]:
        """The modules this project adds (trained, exported), by attribute name. The identity
        branch contributes its Q-Former (``identity.qformer``) and per-block ``face_kv``, not the
        face encoder (frozen, loaded from its own weights); motion contributes ``motion``."""
        modules: dict[str, nn.Module] = {"audio_proj": self.audio_proj, "audio_kv": self.audio_kv}
        if self.identity is not None:
            modules["identity.qformer"] = self.identity.qformer
            modules["face_kv"] = self.face_kv
        if self.motion is not None:
            modules["motion"] = self.motion
        return modules

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter weights only, keyed as in ``state_dict()`` (e.g. ``audio_kv.0.k_proj.weight``),
        the trained LoRA's included (``transformer.blocks.0.attn1.to_q.lora_A.default.weight``)."""
        out = {
            f"{name}.{key}": value
            for name, module in self.adapter_modules().items()
            for key, value in module.state_dict().items()
        }
        out.update({name: param.detach() for name, param in self.lora_state()})
        return out

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.blocks)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor,
        audio: torch.Tensor | None = None,
        audio_scale: float | torch.Tensor = 1.0,
        motion: torch.Tensor | None = None,
        face: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        Args:
            hidden_states: ``(B, 36, F_lat, H, W)`` = noisy latents (16) + first-frame mask (4) +
                first-frame condition latents (16).
            timestep: ``(B,)`` in [0, 1000] (σ·1000).
            text: ``(B, 512, text_dim)`` umT5 embeddings, zero-padded to 512 tokens.
            image: ``(B, 257, image_dim)`` CLIP vision tokens (penultimate layer).
            audio: ``(B, L, audio_in_dim)`` wav2vec2 features of the clip, or None (branch off).
            audio_scale: weight of the audio branch, a float or ``(B,)`` per sample (0 = off).
            motion: ``(B, 2)`` (ω_l, ω_b) in [0, 1], or a pair for the whole batch; None =
                ``model.motion.default`` (0.5). Ignored when motion is disabled.
            face: ``(B, N_face, face_dim)`` face features for the identity branch; None = the CLIP
                image tokens ``image`` (see :mod:`.identity`). Ignored when identity is disabled.
        Returns:
            ``(B, 16, F_lat, H, W)``.
        """
        if text.shape[1] != TEXT_TOKENS:
            raise ValueError(f"text embeddings must have {TEXT_TOKENS} tokens (zero-padded), got {text.shape[1]}")
        bsz = hidden_states.shape[0]
        ctx = self._context
        ctx.clear()
        scale = torch.as_tensor(audio_scale, dtype=torch.float32, device=hidden_states.device)
        scale = scale.expand(bsz) if scale.ndim == 0 else scale
        # With grad enabled the branch runs even when every sample's audio is dropped (scale 0):
        # its weights then get zero gradients instead of none, so every rank reduces the same
        # gradients under DDP/ZeRO and the loss always depends on a trainable tensor.
        if audio is not None and (torch.is_grad_enabled() or bool((scale != 0).any())):
            ctx.audio = self.audio_proj(audio.to(self.audio_proj.proj.weight.dtype))
            if self.audio_mode == "frame":
                num_frames = num_video_frames(hidden_states.shape[2])
                ctx.set_windows(*audio_window_index(audio.shape[1], num_frames, self.audio_expand), device=audio.device)
            ctx.audio_scale = scale
        if self.identity is not None:
            ctx.identity = self.identity(image if face is None else face)
            ctx.identity_scale = self.identity_config.scale
        if self.motion is not None:
            omega = check_motion(motion, bsz, hidden_states.device, self.motion_config.default)
            ctx.motion_emb = self.motion(omega)
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=hidden_states.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text.to(dtype),
            encoder_hidden_states_image=image.to(dtype),
            return_dict=False,
        )[0]
        return out


__all__ = ["AUDIO_MODES", "FantasyTalkingDiT"]
