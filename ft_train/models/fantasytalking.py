"""FantasyTalking = the diffusers Wan2.1 I2V DiT + the trainable audio adapter.

The backbone is diffusers' ``WanTransformer3DModel``, built from a config (tiny test sizes) or
loaded from a local diffusers-format folder; it is never re-implemented here. The adapter adds
``audio_proj`` (:class:`AudioProjModel`) and one :class:`AudioKV` per block, reached from the
blocks' cross-attention processors. Two optional modules the paper describes but never released
are switched on by config: the facial identity branch (``model.identity``, :mod:`.identity`: a
Q-Former and one zero-initialised face k/v per block, in the same processors) and motion-intensity
modulation (``model.motion``, :mod:`.motion`: an embedding of (ω_l, ω_b) added to the time
embedding through a forward hook). Both start as exact no-ops, so enabling them on a trained
audio adapter changes nothing until they are trained.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch import nn

from .adapter import (
    TEXT_TOKENS,
    AdapterContext,
    AudioKV,
    FantasyTalkingAttnProcessor,
    SDPAKernelProcessor,
    default_kernel_at,
    fastest_kernel,
    time_sdpa_kernels,
)
from .fp8 import Fp8FrozenLinear, check_fp8_device, convert_frozen_linears
from .audio import AudioProjModel, audio_window_index, num_video_frames
from .identity import FaceKV, IdentityConfig, IdentityModel
from .motion import MotionConfig, MotionHook, MotionModel, check_motion

log = logging.getLogger(__name__)

AUDIO_MODES = ("clip", "frame")
# diffusers' process-wide attention backend at import (DIFFUSERS_ATTN_BACKEND, default native SDPA).
_DEFAULT_ATTENTION_BACKEND = _AttentionBackendRegistry.get_active_backend()[0]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def transformer_folder(path: str | Path) -> Path:
    """The folder holding the transformer's ``config.json``: ``path/transformer`` or ``path``."""
    root = Path(path).expanduser()
    for candidate in (root / "transformer", root):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"model.pretrained: no diffusers Wan transformer at {root} "
        "(expected transformer/config.json or config.json); point it at a local "
        "Wan2.1-I2V diffusers folder"
    )


def cast_keeping_fp32_modules(model: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` but keep the modules diffusers wants in float32 (norms, time embedder,
    RoPE, modulation tables), as ``from_pretrained(torch_dtype=...)`` does for loaded weights."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)


def load_transformer(
    pretrained: str | Path | None = None,
    config: dict[str, Any] | None = None,
    dtype: str | torch.dtype = "float32",
) -> WanTransformer3DModel:
    """Build the Wan DiT from ``config`` or load it from a local diffusers folder (never a hub).

    Raises a one-line error when the weights are not an image-to-video DiT (36 input channels and
    an image embedder), since the adapter relies on the I2V cross-attention layout.
    """
    torch_dtype = resolve_dtype(dtype)
    if pretrained:
        folder = transformer_folder(pretrained)
        model = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True)
    elif config is not None:
        model = WanTransformer3DModel(**dict(config))
        if torch_dtype != torch.float32:
            cast_keeping_fp32_modules(model, torch_dtype)
    else:
        raise ValueError("model: set model.pretrained (a local Wan2.1-I2V folder) or model.transformer (a config)")
    cfg = model.config
    where = pretrained or "model.transformer"
    if cfg.in_channels != 36 or cfg.image_dim is None or cfg.added_kv_proj_dim is None:
        raise ValueError(
            f"{where}: not a Wan2.1 image-to-video DiT (in_channels={cfg.in_channels}, "
            f"image_dim={cfg.image_dim}); FantasyTalking needs the I2V model (36 input channels, image_dim set)"
        )
    return model


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
        gradient_checkpointing: recompute each DiT block in backward (diffusers' own switch).
        checkpoint_keep: with checkpointing on, the last ``checkpoint_keep`` blocks keep their
            activations instead (selective checkpointing: fewer recomputed blocks, more memory;
            see :meth:`set_checkpointing`), or ``"auto"``: as many as fit in
            ``checkpoint_memory_gib``, measured in the first training step
            (:meth:`size_checkpointing`).
        checkpoint_memory_gib: with ``checkpoint_keep="auto"``, the device memory the step may
            fill; None = 90 % of the card.
        checkpoint_offload: with checkpointing on, the recomputed blocks keep their input in
            pinned host memory instead of the device (:class:`HostOffloadCheckpoint`).
        checkpoint_save_attention: with checkpointing on, the recomputed blocks keep their
            self-attention outputs (S × d each): backward skips the attention forward.
        attention_backend: a diffusers attention backend for every attention of the model
            (``_native_cudnn``, ``_native_flash``, ``flash``, ...); None = torch SDPA's own choice.
        self_attention_kernel: the torch SDPA kernel the video self-attention (every block's
            ``attn1``: S × S, most of the model's attention work) runs with: ``cudnn``,
            ``flash``, ``efficient`` or ``math`` (:class:`.adapter.SDPAKernelProcessor`). None =
            torch's choice. cuDNN and the memory-efficient kernel need a GPU, cuDNN bf16/fp16.
            ``auto``: the first forward on a GPU times flash, cuDNN and memory-efficient at its
            own shape and keeps the fastest (rank 0's choice on every rank); torch's choice on a CPU.
        compile_blocks: ``torch.compile`` each DiT block (all blocks share one compiled graph).
        frozen_fp8: store the frozen blocks' linear weights in float8 and run their forward
            matmuls in fp8 (:mod:`.fp8`; needs ``train_backbone=False``).
        frozen_fp8_backward: with ``frozen_fp8``, their input-gradient matmuls in fp8 too.
        identity: ``model.identity`` (:class:`~.identity.IdentityConfig` or its dict); disabled
            by default = no parameters.
        motion: ``model.motion`` (:class:`~.motion.MotionConfig` or its dict); disabled by default.
    """

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        audio_mode: str = "clip",
        audio_in_dim: int = 768,
        audio_proj_dim: int = 2048,
        audio_expand: int = 4,
        train_backbone: bool = False,
        gradient_checkpointing: bool = False,
        identity: IdentityConfig | dict[str, Any] | None = None,
        motion: MotionConfig | dict[str, Any] | None = None,
        checkpoint_keep: int | str = 0,
        attention_backend: str | None = None,
        self_attention_kernel: str | None = None,
        compile_blocks: bool = False,
        checkpoint_offload: bool = False,
        checkpoint_save_attention: bool = False,
        frozen_fp8: bool = False,
        checkpoint_memory_gib: float | None = None,
        frozen_fp8_backward: bool = False,
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
        self.self_attention_timings: dict[str, float | None] | None = None  # what self_attention_kernel=auto measured
        self.self_attention_default: str | None = None  # ... and what torch would have run by itself
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
        self.set_backbone_trainable(train_backbone)
        self.frozen_fp8 = False
        if frozen_fp8:
            self.set_frozen_fp8(backward=frozen_fp8_backward)
        elif frozen_fp8_backward:
            raise ValueError("model.frozen_fp8_backward=true needs model.frozen_fp8=true")
        self.checkpoint_keep = 0
        self.checkpoint_offload = self.checkpoint_save_attention = False
        self._compile_options: dict[str, Any] | None = None  # set by compile_blocks()
        # checkpoint_keep="auto": sized once the first training step has shown its peak memory.
        self.checkpoint_auto = checkpoint_keep == "auto" and gradient_checkpointing
        self.checkpoint_memory_gib = checkpoint_memory_gib
        self._kept_block_bytes: list[int] = []
        self._auto_start_bytes: int | None = None  # allocated when the first measured step began
        if isinstance(checkpoint_keep, str) and checkpoint_keep != "auto":
            raise ValueError(f"model.checkpoint_keep must be a number of blocks or auto, got {checkpoint_keep!r}")
        if gradient_checkpointing:
            # auto starts by keeping the last block, to measure what a kept block costs.
            self.set_checkpointing(True, keep=1 if self.checkpoint_auto else checkpoint_keep,
                                   offload=checkpoint_offload, save_attention=checkpoint_save_attention)
        if attention_backend:
            self.set_attention_backend(attention_backend)
        self.set_self_attention_kernel(self_attention_kernel)
        if compile_blocks:
            self.compile_blocks()

    def set_checkpointing(self, enabled: bool, keep: int = 0, offload: bool = False, save_attention: bool = False) -> None:
        """Activation checkpointing of the DiT blocks: every block recomputed in backward, except
        the last ``keep`` blocks, which store their activations (``keep = num_blocks`` is the
        same compute as no checkpointing). The last blocks are the ones kept because their
        backward runs first, so their activations are freed first. ``offload``: the recomputed
        blocks keep their input in host memory instead of on the device
        (:class:`HostOffloadCheckpoint`). ``save_attention``: the recomputed blocks keep their
        self-attention outputs, so backward does not run the attention forward again
        (:class:`BlockCheckpoint`)."""
        blocks = self.transformer.blocks
        if not enabled:
            self.transformer.disable_gradient_checkpointing()
            self.checkpoint_keep, self.checkpoint_offload, self.checkpoint_save_attention = 0, False, False
            return
        if not 0 <= keep <= len(blocks):
            raise ValueError(f"model.checkpoint_keep must be between 0 and {len(blocks)} (the blocks), got {keep}")
        if offload and save_attention:
            raise ValueError("model.checkpoint_offload and model.checkpoint_save_attention cannot be combined; pick one")
        kept = frozenset(id(b) for b in list(blocks)[len(blocks) - keep :])
        compile_options = self._compile_options if save_attention else None
        self.transformer.enable_gradient_checkpointing(
            BlockCheckpoint(kept, self._context if offload else None, save_attention, compile_options,
                            measure=self._kept_block_bytes if self.checkpoint_auto else None)
        )
        self.checkpoint_keep, self.checkpoint_offload = keep, bool(offload)
        self.checkpoint_save_attention = bool(save_attention)

    def size_checkpointing(self, peak_bytes: int, budget_bytes: int, per_block_bytes: int | None = None) -> int:
        """``checkpoint_keep="auto"``: after a training step that peaked at ``peak_bytes`` with the
        current blocks kept, keep as many more as ``budget_bytes`` leaves room for, at
        ``per_block_bytes`` each (default: the largest a kept block left allocated in that step,
        :meth:`kept_block_bytes`), then stop measuring. Returns the number of blocks now kept.
        Every rank must pass the same numbers (the Lightning module reduces them first), or
        ZeRO-3's gathers in the recompute would differ between ranks."""
        per_block = per_block_bytes if per_block_bytes is not None else self.kept_block_bytes()
        keep = self.checkpoint_keep
        if per_block is not None:
            keep += (int(budget_bytes) - int(peak_bytes)) // max(int(per_block), 1)
        return self.fix_checkpoint_keep(keep)

    def fix_checkpoint_keep(self, keep: int) -> int:
        """End auto sizing with ``keep`` blocks kept (clamped to [0, blocks])."""
        keep = int(min(max(keep, 0), self.num_blocks))
        self.checkpoint_auto = False  # the measuring goes with it
        self._kept_block_bytes.clear()
        self._auto_start_bytes = None
        if not self.transformer.gradient_checkpointing:
            return 0
        self.set_checkpointing(True, keep=keep, offload=self.checkpoint_offload,
                               save_attention=self.checkpoint_save_attention)
        return keep

    def kept_block_bytes(self) -> int | None:
        """The largest activation memory one kept block left allocated so far (auto sizing)."""
        return max(self._kept_block_bytes) if self._kept_block_bytes else None

    def set_attention_backend(self, backend: str | None) -> None:
        """Route every attention (self, text, image, audio windows, face) through one diffusers
        backend; None restores torch SDPA's own choice. Masked audio windows always use SDPA's
        dispatch (:func:`.adapter.audio_attention`)."""
        try:
            if backend:
                self.transformer.set_attention_backend(backend)
            else:
                self.transformer.reset_attention_backend()
                # diffusers' reset leaves its process-wide active backend (the one processors
                # without their own backend use) at the last one set: put back the start-up default.
                _AttentionBackendRegistry.set_active_backend(_DEFAULT_ATTENTION_BACKEND)
        except ValueError as err:
            raise ValueError(f"model.attention_backend={backend!r}: {err}") from None

    AUTO_KERNELS = ("flash", "cudnn", "efficient")

    @property
    def self_attention_kernel(self) -> str | None:
        proc = self.transformer.blocks[0].attn1.processor
        return proc.kernel if isinstance(proc, SDPAKernelProcessor) else None

    def set_self_attention_kernel(self, kernel: str | None) -> None:
        """Run the video self-attention with torch SDPA's ``kernel`` (None: torch's choice; ``auto``:
        the fastest at the first forward's shape); see :class:`.adapter.SDPAKernelProcessor`."""
        self.self_attention_auto = kernel == "auto"
        if self.self_attention_auto:
            kernel = None  # torch's choice until the first forward has timed the kernels
        for block in self.transformer.blocks:
            proc = block.attn1.processor
            inner = proc.inner if isinstance(proc, SDPAKernelProcessor) else proc
            block.attn1.set_processor(SDPAKernelProcessor(inner, kernel) if kernel else inner)

    def self_attention_shape(self, hidden_states: torch.Tensor) -> tuple[int, int, int, int]:
        """``(B, heads, video tokens, head_dim)`` of the self-attention for model input
        ``hidden_states`` ``(B, C, F, H, W)``."""
        cfg = self.transformer.config
        pt, ph, pw = cfg.patch_size
        b, _, f, h, w = hidden_states.shape
        return (b, cfg.num_attention_heads, (f // pt) * (h // ph) * (w // pw), cfg.attention_head_dim)

    def pick_self_attention_kernel(self, hidden_states: torch.Tensor) -> str | None:
        """``self_attention_kernel="auto"``: time the :attr:`AUTO_KERNELS` on the self-attention of
        ``hidden_states`` ``(B, C, F, H, W)`` (forward and backward when grad is on, the step's
        dtype) and keep the fastest; with ``torch.distributed`` up, rank 0's pick holds on every
        rank. Off CUDA, torch's choice stays. Returns the kernel kept."""
        self.self_attention_auto = False
        device = hidden_states.device
        if device.type != "cuda":
            log.info("model.self_attention_kernel=auto: torch's choice on %s (the kernels are timed on a GPU)", device.type)
            return None
        shape = self.self_attention_shape(hidden_states)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else self.transformer.dtype
        grad = torch.is_grad_enabled()
        times = time_sdpa_kernels(shape, dtype, device, self.AUTO_KERNELS, backward=grad)
        self.self_attention_default = default_kernel_at(shape, dtype, device, backward=grad)
        choice = [fastest_kernel(times)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(choice, src=0)
        self.set_self_attention_kernel(choice[0])
        self.self_attention_timings = times
        shown = ", ".join(f"{k} {t * 1e3:.1f} ms" if t is not None else f"{k} unavailable" for k, t in times.items())
        log.info("model.self_attention_kernel=auto: %s for (B, H, S, D) = %s %s (%s; torch's own choice: %s)", choice[0],
                 shape, str(dtype).removeprefix("torch."), shown, self.self_attention_default)
        return choice[0]

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` every DiT block in place (``nn.Module.compile``). The blocks have one
        structure, so they share the compiled code; activation checkpointing recomputes the compiled
        block."""
        for block in self.transformer.blocks:
            block.compile(**options)
        self._compile_options = dict(options)
        if self.checkpoint_save_attention:  # the checkpointed call is compiled too (see BlockCheckpoint)
            self.set_checkpointing(True, self.checkpoint_keep, save_attention=True)

    def set_frozen_fp8(self, backward: bool = False) -> list[str]:
        """Store the DiT blocks' frozen linear weights in float8 (:class:`.fp8.Fp8FrozenLinear`;
        the patch/time/text embedders and the output projection stay as they are). One-way: the
        bf16 weights are freed. Call before compiling. ``backward``: the input gradients' matmuls
        in fp8 too (:meth:`set_fp8_backward`). Returns the converted layers' names."""
        if any(p.requires_grad for p in self.transformer.blocks.parameters()):
            raise ValueError("model.frozen_fp8=true needs a frozen backbone (model.train_backbone=false)")
        if self._compiled():
            raise ValueError("model.frozen_fp8: convert before compile_blocks()")
        names = convert_frozen_linears(self.transformer.blocks, backward)
        self.frozen_fp8 = True
        return names

    def set_fp8_backward(self, enabled: bool) -> None:
        """With ``frozen_fp8``: compute the float8 layers' input gradients in fp8 (True) or in the
        gradient's dtype against the dequantised weights (False, the default)."""
        if enabled and not self.frozen_fp8:
            raise ValueError("model.frozen_fp8_backward=true needs model.frozen_fp8=true")
        for module in self.modules():
            if isinstance(module, Fp8FrozenLinear):
                module.fp8_backward = bool(enabled)

    def fp8_buffer_names(self) -> list[str]:
        """Names (in ``named_buffers()``) of the float8 weights and scales: identical on every rank
        (each quantises the same weights), so data parallelism need not broadcast them."""
        return [
            f"{name}.{buf}" for name, module in self.named_modules() if isinstance(module, Fp8FrozenLinear)
            for buf in ("weight_bits", "scale_bits")
        ]

    def _compiled(self) -> bool:
        return getattr(self, "_compile_options", None) is not None

    @property
    def audio_mode(self) -> str:
        return self._audio_mode

    @audio_mode.setter
    def audio_mode(self, mode: str) -> None:
        if mode not in AUDIO_MODES:
            raise ValueError(f"audio_mode must be one of {AUDIO_MODES}, got {mode!r}")
        self._audio_mode = mode

    def set_backbone_trainable(self, trainable: bool) -> None:
        self.transformer.requires_grad_(trainable)

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
        """Adapter weights only, keyed as in ``state_dict()`` (e.g. ``audio_kv.0.k_proj.weight``)."""
        return {
            f"{name}.{key}": value
            for name, module in self.adapter_modules().items()
            for key, value in module.state_dict().items()
        }

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
        if self.checkpoint_auto and self._auto_start_bytes is None and torch.is_grad_enabled():
            self._auto_start_bytes = allocated_bytes(hidden_states.device)
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
        if self.frozen_fp8:
            check_fp8_device(hidden_states.device)
        if self.self_attention_auto:
            self.pick_self_attention_kernel(hidden_states)
        if self.self_attention_kernel in ("cudnn", "efficient") and hidden_states.device.type != "cuda":
            raise ValueError(f"model.self_attention_kernel={self.self_attention_kernel} needs a CUDA GPU (the model runs on "
                             f"{hidden_states.device.type}); set model.self_attention_kernel=null or flash")
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=hidden_states.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text.to(dtype),
            encoder_hidden_states_image=image.to(dtype),
            return_dict=False,
        )[0]
        return out


# torch's SDPA kernels (aten ops): the ones whose outputs ``checkpoint_save_attention`` keeps.
_SDPA_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)
)


def _save_self_attention(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: keep the outputs of self-attention SDPA calls (queries and
    keys of one length: the video tokens), recompute everything else. Cross-attention (text,
    image, audio windows: short keys) is cheap to recompute and its outputs would cost as much
    memory as self-attention's."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _SDPA_OPS and args[1].shape[-2] == args[0].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_saving_attention(block: nn.Module, *args: Any) -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return torch.utils.checkpoint.checkpoint(
        block, *args, use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, _save_self_attention),
    )


class BlockCheckpoint:
    """diffusers' per-block gradient-checkpointing function (``enable_gradient_checkpointing``).

    Blocks in ``kept`` (their ids) run plainly and store their activations; the others are
    recomputed in backward: plainly (torch's non-reentrant checkpoint), from a host copy of their
    input (``offload_context`` given: :class:`HostOffloadCheckpoint`), or keeping their
    self-attention outputs (``save_attention``: selective checkpointing, :func:`_save_self_attention`).
    A selective policy must see the attention op, which a compiled block hides; so with
    ``compile_options`` (the model's blocks are compiled) the checkpointed call itself is compiled
    with them, and the policy becomes part of the compiled graph.
    """

    def __init__(self, kept: frozenset[int], offload_context: AdapterContext | None, save_attention: bool,
                 compile_options: dict[str, Any] | None = None, measure: list[int] | None = None):
        self.kept, self.offload_context, self.measure = kept, offload_context, measure
        call = _recompute_saving_attention if save_attention else None
        if call is not None and compile_options is not None:
            call = torch.compile(call, **compile_options)
        self.saving_call = call

    def __call__(self, block: nn.Module, *args: Any) -> Any:
        if id(block) in self.kept:
            if self.measure is None or not torch.is_grad_enabled():
                return block(*args)
            # Auto sizing: what the kept block leaves allocated is its saved activations (plus
            # its output, which a recomputed block keeps too).
            device = args[0].device
            before = allocated_bytes(device)
            out = block(*args)
            if before is not None:
                self.measure.append(allocated_bytes(device) - before)
            return out
        if self.offload_context is not None:
            hidden, encoder, temb, rotary = args
            c = self.offload_context
            return HostOffloadCheckpoint.apply(
                block, rotary, c, _GRAD_ANCHOR.get(hidden.device), hidden, encoder, temb, c.audio, c.identity
            )
        if self.saving_call is not None:
            return self.saving_call(block, *args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)


def auto_checkpoint_keep(
    net: FantasyTalkingDiT,
    device: torch.device,
    reduce_max: Callable[..., list[int]] | None = None,
    all_ranks: Callable[[bool], bool] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Settle ``checkpoint_keep="auto"`` after a training step on ``device``: the step's peak
    (``torch.cuda.max_memory_allocated``) and a kept block's measured cost decide how many blocks
    fit in ``net.checkpoint_memory_gib`` (None = 90 % of the card; :meth:`FantasyTalkingDiT.size_checkpointing`).
    Distributed: ``all_ranks`` (did every rank measure?) and ``reduce_max`` (the largest of each
    number over the ranks) make every rank keep the same blocks. Where nothing was measured (the
    CPU) the blocks kept so far stay. Returns the blocks kept and the numbers behind it."""
    per_block = net.kept_block_bytes()
    before = net.checkpoint_keep
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        # "cuda" is the current card; the gradients below are on "cuda:<n>", which "cuda" never equals.
        device = torch.device("cuda", torch.cuda.current_device())
    measured = per_block is not None and device.type == "cuda"
    if all_ranks is not None:
        measured = bool(all_ranks(measured))
    if not measured:
        return net.fix_checkpoint_keep(before), {"measured": False, "kept_before": before}
    peak = torch.cuda.max_memory_allocated(device)
    # What the first step left allocated that was not there when it began is the optimizer's state
    # (AdamW creates its moments in its first step(), after backward's peak) and the gradients
    # still held: every later step's backward has the state too. The gradients of that step were
    # already growing at its peak, so only the state is added.
    state = 0
    if net._auto_start_bytes is not None:
        grads = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters()
                    if p.grad is not None and p.grad.device == device)
        state = max(torch.cuda.memory_allocated(device) - net._auto_start_bytes - grads, 0)
    peak += state
    if net.checkpoint_memory_gib:
        budget = int(float(net.checkpoint_memory_gib) * 2**30)
    else:
        budget = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    if reduce_max is not None:
        peak, per_block = reduce_max(peak, per_block)
    keep = net.size_checkpointing(peak, budget, per_block)
    return keep, {"measured": True, "kept_before": before, "peak_bytes": int(peak), "state_bytes": int(state),
                  "per_block_bytes": int(per_block), "budget_bytes": budget}


def allocated_bytes(device: torch.device) -> int | None:
    """Memory held by tensors on ``device`` (CUDA's caching allocator); None where torch does not
    count it (the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device)


_COPY_STREAMS: dict[torch.device, Any] = {}


def copy_stream(device: torch.device):
    """The side stream that moves offloaded activations of ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


class HostCopy:
    """One recomputed block's input, kept in host memory between its forward and its backward.

    On CUDA both copies run on a side stream (:func:`copy_stream`), so the blocks' kernels never
    wait for PCIe: the copy out starts once the tensor is computed, and its device memory is not
    reused before the copy ends (``record_stream``); the copy back is started one block ahead
    (:meth:`prefetch`, called by the later block's backward) and the compute stream waits only
    for its event (:meth:`take`). ``prev`` links the copies of one forward pass in block order.
    """

    def __init__(self, tensor: torch.Tensor, prev: "HostCopy | None" = None):
        self.prev, self.device, self.requires_grad = prev, tensor.device, tensor.requires_grad
        self.shape, self.dtype = tensor.shape, tensor.dtype
        self.stream = copy_stream(tensor.device)
        self.loaded: torch.Tensor | None = None
        self.event = None
        if self.stream is None:
            self.host = to_host(tensor)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.host = to_host(tensor)
        tensor.record_stream(self.stream)

    def prefetch(self) -> None:
        """Start copying the tensor back to its device (once)."""
        if self.loaded is not None or self.host is None:
            return
        if self.stream is None:
            self.loaded, self.host = self.host.to(self.device), None
            return
        # Allocated in the compute stream's order, written on the side stream after the compute
        # work queued so far (which may still use this memory's previous owner).
        self.loaded = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.loaded.copy_(self.host, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(self.stream)
        self.host = None  # the pinned buffer returns to torch's host cache once the copy ends

    def take(self) -> torch.Tensor:
        """The tensor on its device, ready for the compute stream; the copy lets go of it."""
        self.prefetch()
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)
        tensor, self.loaded, self.event = self.loaded, None, None
        return tensor.requires_grad_(self.requires_grad)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor``: pinned and asynchronous from a GPU (stream order keeps it safe: the
    copy is queued before any later kernel can reuse the source's memory)."""
    if tensor.device.type == "cpu":
        return tensor.detach().clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor.detach(), non_blocking=True)
    return host


class _GradAnchors:
    """One empty tensor per device that requires grad: an input of every offloaded block, so its
    backward runs even when no real input needs a gradient (the first block of a frozen backbone),
    and the adapter weights inside it still get theirs."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Tensor:
        if device not in self._by_device:
            self._by_device[device] = torch.empty(0, device=device, requires_grad=True)
        return self._by_device[device]


_GRAD_ANCHOR = _GradAnchors()


class HostOffloadCheckpoint(torch.autograd.Function):
    """Activation checkpointing of one DiT block whose input hidden states wait in host memory.

    Forward runs the block without grad and keeps only a host copy of ``hidden`` (the largest
    thing full checkpointing keeps per block: S × d, 0.74 GiB at 720×1280×81 for 14B,
    :class:`HostCopy`); backward takes it back, re-runs the block with grad under the forward's
    autocast state and back-propagates through it, while the previous block's input is copied in. The text/image context and the time projection are small and stay
    on the device. The blocks have no dropout, so the recompute needs no RNG state.

    The processors read the projected audio tokens and the ID tokens from the shared
    :class:`AdapterContext`; they are inputs here too, so the recompute runs on detached copies
    and their gradients leave through this function instead of back-propagating (once per block)
    into the graph outside the block.
    """

    @staticmethod
    def forward(ctx, block, rotary, context, anchor, hidden, encoder, temb, audio, identity):  # noqa: D102
        device_type = hidden.device.type
        ctx.block, ctx.rotary, ctx.context, ctx.device = block, rotary, context, hidden.device
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.hidden = HostCopy(hidden, context.last_offload)
        context.last_offload = ctx.hidden
        ctx.save_for_backward(encoder, temb, audio, identity)
        with torch.no_grad():
            return block(hidden, encoder, temb, rotary)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        def leaf(t):
            return None if t is None else t.detach().requires_grad_(t.requires_grad)

        encoder, temb, audio, identity = ctx.saved_tensors
        hidden = ctx.hidden.take()
        if ctx.hidden.prev is not None:  # the next backward's input: copied in while this block runs
            ctx.hidden.prev.prefetch()
        inputs = [hidden, leaf(encoder), leaf(temb), leaf(audio), leaf(identity)]
        context = ctx.context
        outer = context.audio, context.identity
        context.audio, context.identity = inputs[3], inputs[4]
        device_type, enabled, dtype = ctx.autocast
        try:
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                out = ctx.block(*inputs[:3], ctx.rotary)
            torch.autograd.backward(out, grad_out)
        finally:
            context.audio, context.identity = outer
        grads = [x.grad if x is not None and x.requires_grad else None for x in inputs]
        return (None, None, None, None, *grads)


def build_model(
    pretrained: str | None = None,
    transformer: dict[str, Any] | None = None,
    dtype: str = "float32",
    identity: dict[str, Any] | None = None,
    motion: dict[str, Any] | None = None,
    init_from: str | None = None,
    **options: Any,
) -> FantasyTalkingDiT:
    """Hydra entry point (``conf/model/*.yaml``): load or build the DiT, then add the adapter
    (and the identity / motion modules when ``identity.enabled`` / ``motion.enabled``).

    ``options`` are the other model keys (``audio_mode``, ``gradient_checkpointing``, the speed
    options, ...), :class:`FantasyTalkingDiT`'s arguments by name; an unknown key fails there.

    ``init_from`` starts the adapters from trained weights: the released
    ``fantasytalking_model.ckpt`` (audio only; identity / motion stay at their zero start), an
    ``ft-export`` bundle or an ft-train checkpoint. It belongs to the network, whatever the stage;
    ``stage.init_from`` (the previous stage's result) is loaded after it when both are set.
    """
    dit = load_transformer(pretrained, transformer, dtype)
    net = FantasyTalkingDiT(
        dit,
        identity=dict(identity) if identity is not None else None,
        motion=dict(motion) if motion is not None else None,
        **options,
    )
    if init_from:
        from .weights import load_adapter_weights  # weights.py imports this module

        load_adapter_weights(net, init_from, key="model.init_from")
    return net


def model_summary(model: FantasyTalkingDiT) -> dict[str, Any]:
    """Parameter counts (total, trainable, adapter) for logs and reports; float8-stored frozen
    weights (``model.frozen_fp8``) count in the total."""
    fp8 = sum(m.weight_bits.numel() for m in model.modules() if isinstance(m, Fp8FrozenLinear))
    total = sum(p.numel() for p in model.parameters()) + fp8
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(p.numel() for m in model.adapter_modules().values() for p in m.parameters())
    return {"params_total": total, "params_trainable": trainable, "params_adapter": adapter}


__all__ = ["FantasyTalkingDiT", "auto_checkpoint_keep", "build_model", "load_transformer", "model_summary"]
