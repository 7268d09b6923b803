"""Euler flow-matching sampler with FantasyTalking's three-pass text + audio guidance.

What the released inference code does (FantasyTalking ``diffsynth/pipelines/wan_video.py`` with
``FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)``), reproduced here:

* σ grid: ``linspace(1, 0, steps + 1)`` pushed through Wan's shift ``σ' = s·σ / (1 + (s−1)·σ)``
  (30 steps, shift 5); the DiT sees ``timestep = σ · 1000``.
* Euler step on the predicted velocity ``v ≈ ε − x0``: ``x ← x + (σ_next − σ) · v``.
* Guidance per step, with ``∅a`` = audio branch off (``audio_scale = 0``) and image conditioning
  (CLIP tokens + first-frame latents) in every pass::

      v = v(neg, ∅a) + cfg · [v(pos, ∅a) − v(neg, ∅a)] + audio_cfg · [v(pos, a) − v(pos, ∅a)]

  i.e. a weighted sum of the passes with weights ``1 − cfg``, ``cfg − audio_cfg``, ``audio_cfg``
  (:func:`guidance_passes`). A pass whose weight is 0 is not run: ``cfg = 1`` drops the negative
  pass; ``cfg = 1, audio_cfg = 0`` is one conditional pass **with the audio branch off** (that is
  what the formula says); ``cfg = 1, audio_cfg = 1`` is one fully conditional pass (text + audio).
  ``audio_cfg=None`` is the release's other branch: no audio guidance, the audio branch on in both
  passes of plain text CFG.

The passes of a step either share one forward (concatenated along the batch, per-sample
``audio_scale``) or run one after another to save activation memory; both give the same result.
Conditions that are the same in every pass (the motion intensities ω, face features of the
identity branch) go to the model unchanged through ``model_kwargs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..models.adapter import TEXT_TOKENS
from ..models.audio import num_latent_frames
from .flow_matching import LATENT_CHANNELS, first_frame_mask, shift_sigma

# model(hidden (B,36,F,H,W), timestep (B,), text, image, audio | None, audio_scale=(B,), **model_kwargs)
#   -> (B,16,F,H,W)
VelocityModel = Callable[..., torch.Tensor]


def sampling_sigmas(steps: int, shift: float = 5.0) -> torch.Tensor:
    """The ``steps + 1`` noise levels of the sampler, float64: shifted ``linspace(1, 0, steps+1)``.

    Starts at exactly 1 (pure noise) and ends at exactly 0 (data); strictly decreasing for
    ``shift > 0``.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sampler.steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"sampler.shift must be > 0, got {shift}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


@dataclass(frozen=True)
class GuidancePass:
    """One model evaluation of a guided step: which prompt, audio on or off, its weight (unitless)."""

    text: str  # "pos" or "neg"
    audio: bool
    weight: float


def guidance_passes(cfg: float, audio_cfg: float | None, has_audio: bool = True) -> list[GuidancePass]:
    """The passes a step needs and the weights that combine them (weights sum to 1).

    Expanding ``v(n,∅a) + cfg·[v(p,∅a) − v(n,∅a)] + acfg·[v(p,a) − v(p,∅a)]`` gives weights
    ``1−cfg`` on ``(neg, ∅a)``, ``cfg−acfg`` on ``(pos, ∅a)`` and ``acfg`` on ``(pos, a)``; passes
    with weight 0 are dropped. Without audio ``v(p,a) = v(p,∅a)``, so the audio term vanishes.
    ``audio_cfg=None``: text CFG only, audio on in both passes (the release's non-audio-CFG path).
    """
    for name, value in (("cfg", cfg), ("audio_cfg", audio_cfg)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"sampler.{name} must be a finite number, got {value}")
    if audio_cfg is None:
        candidates = [GuidancePass("neg", has_audio, 1.0 - cfg), GuidancePass("pos", has_audio, cfg)]
    elif not has_audio:
        candidates = [GuidancePass("neg", False, 1.0 - cfg), GuidancePass("pos", False, cfg)]
    else:
        candidates = [
            GuidancePass("neg", False, 1.0 - cfg),
            GuidancePass("pos", False, cfg - audio_cfg),
            GuidancePass("pos", True, audio_cfg),
        ]
    return [p for p in candidates if p.weight != 0.0]


class FlowMatchSampler:
    """Euler sampler for the FantasyTalking DiT (defaults = the official inference settings).

    Args:
        steps: Euler steps (official: 30).
        shift: Wan timestep shift (official: 5; Wan's own 480P I2V uses 3).
        cfg: text guidance scale (official ``--prompt_cfg_scale`` 5.0); 1 = no negative pass.
        audio_cfg: audio guidance scale (paper: 4.5; the repo's CLI default is 5.0); 0 = no audio
            pass; None = no audio guidance, audio branch on in every pass.
        audio_scale: weight of the audio branch in audio-on passes (λ1, official 1.0).
        batch_passes: run a step's passes as one forward over a ``passes × B`` batch (faster)
            instead of one forward per pass (less activation memory). Same result either way.
        num_train_timesteps: the DiT's timestep scale (``timestep = σ · 1000`` for Wan).
    """

    def __init__(
        self,
        steps: int = 30,
        shift: float = 5.0,
        cfg: float = 5.0,
        audio_cfg: float | None = 4.5,
        audio_scale: float = 1.0,
        batch_passes: bool = True,
        num_train_timesteps: int = 1000,
    ):
        self.sigmas = sampling_sigmas(steps, shift)  # validates steps and shift
        guidance_passes(cfg, audio_cfg)  # validates the scales
        self.steps = steps
        self.shift = shift
        self.cfg = cfg
        self.audio_cfg = audio_cfg
        self.audio_scale = audio_scale
        self.batch_passes = batch_passes
        self.num_train_timesteps = num_train_timesteps

    def passes(self, has_audio: bool) -> list[GuidancePass]:
        return guidance_passes(self.cfg, self.audio_cfg, has_audio)

    @torch.no_grad()
    def __call__(
        self,
        model: VelocityModel,
        image_latents: torch.Tensor,
        image: torch.Tensor,
        text: torch.Tensor,
        audio: torch.Tensor | None = None,
        negative_text: torch.Tensor | None = None,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        num_frames: int | None = None,
        progress: bool = False,
        model_kwargs: dict[str, torch.Tensor | None] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample latents for a batch of clips.

        Args:
            model: the velocity model, e.g. :class:`~ft_train.models.FantasyTalkingDiT` (call it in
                ``eval()`` mode; the sampler does not change the model's mode).
            image_latents: ``(B, 16, F, H, W)`` VAE(first frame, zeros…), the I2V condition; its
                shape fixes the latent grid (F latent frames = (frames − 1)/4 + 1, H, W = pixels/8).
            image: ``(B or 1, 257, image_dim)`` CLIP tokens of the first frame.
            text: ``(B or 1, 512, text_dim)`` umT5 embedding of the prompt, zero-padded to 512.
            audio: ``(B or 1, L, 768)`` wav2vec2 features of the clip, or None (no audio).
            negative_text: ``(B or 1, 512, text_dim)`` the negative prompt's embedding (the
                official one is Wan's Chinese default with "人物静止不动，" prepended). None = zeros,
                the same stand-in the training loss uses for a dropped prompt.
            generator: seeds the initial noise: one generator for the batch, or one per sample
                (so a clip's sample does not depend on what else is in the batch). Noise is drawn
                on the generator's device, float32, then moved to the latents' device.
            noise: ``(B, 16, F, H, W)`` initial noise to use instead of drawing it.
            num_frames: video frames (4k+1), only checked against ``F`` when given.
            progress: show a tqdm bar over the steps.
            model_kwargs: extra keyword arguments of every model call, each a per-sample tensor
                ``(B or 1, …)`` that is the same in every guidance pass, e.g. ``motion`` ``(B, 2)``
                (ω_l, ω_b) or ``face`` ``(B, N, face_dim)`` for
                :class:`~ft_train.models.FantasyTalkingDiT`; None values are passed as None.
            mask: ``(B or 1, 4, F, H, W)`` the I2V condition mask that goes with ``image_latents``
                (1 where the condition holds a known frame); None = the first frame alone, as Wan
                I2V is trained (long-form continuation passes more known frames,
                :mod:`ft_train.inference.long_form`).
        Returns:
            ``(B, 16, F, H, W)`` float32 denoised latents (still VAE-normalised).
        """
        bsz, f_lat, h, w = _check_latents(image_latents, num_frames, model)
        device = image_latents.device
        image = _batch(image, bsz, "image", ndim=3)
        text = _batch(text, bsz, "text", ndim=3)
        _check_text(text, "text")
        if negative_text is None:
            negative_text = torch.zeros_like(text)
        negative_text = _batch(negative_text, bsz, "negative_text", ndim=3)
        _check_text(negative_text, "negative_text")
        if negative_text.shape[2] != text.shape[2]:
            raise ValueError(
                f"negative_text width {negative_text.shape[2]} != text width {text.shape[2]}; "
                "encode both prompts with the same text encoder"
            )
        if audio is not None:
            audio = _batch(audio, bsz, "audio", ndim=3)
        extra = _model_kwargs(model_kwargs, bsz)

        x = self._initial_noise(noise, generator, (bsz, LATENT_CHANNELS, f_lat, h, w), device)
        y = image_latents.float()
        if mask is None:
            mask = first_frame_mask(f_lat, h, w, batch=bsz, device=device, dtype=torch.float32)
        else:
            if mask.ndim != 5 or tuple(mask.shape[1:]) != (4, f_lat, h, w) or mask.shape[0] not in (1, bsz):
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)}, expected ({bsz} or 1, 4, {f_lat}, {h}, {w}) like image_latents"
                )
            mask = mask.to(device=device, dtype=torch.float32).expand(bsz, -1, -1, -1, -1)
        passes = self.passes(has_audio=audio is not None)
        texts = {"pos": text, "neg": negative_text}

        sigmas = self.sigmas.tolist()
        bar = tqdm(total=self.steps, unit="step", desc="sampling", disable=not progress, dynamic_ncols=True)
        try:
            for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
                hidden = torch.cat([x, mask, y], dim=1)
                timestep = torch.full((bsz,), sigma * self.num_train_timesteps, device=device, dtype=torch.float32)
                if self.batch_passes and len(passes) > 1:
                    outs = self._batched(model, passes, hidden, timestep, texts, image, audio, extra)
                else:
                    outs = [self._single(model, p, hidden, timestep, texts, image, audio, extra) for p in passes]
                velocity = _combine(passes, outs)
                x = x + (sigma_next - sigma) * velocity
                bar.update(1)
        finally:
            bar.close()
        return x

    def _initial_noise(self, noise, generator, shape, device) -> torch.Tensor:
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape} (B, 16, F, H, W)")
            return noise.to(device=device, dtype=torch.float32)
        if generator is None or isinstance(generator, torch.Generator):
            gen_device = generator.device if generator is not None else torch.device("cpu")
            return torch.randn(shape, generator=generator, device=gen_device).to(device)
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        return torch.cat(
            [torch.randn((1, *shape[1:]), generator=g, device=g.device).to(device) for g in generator]
        )

    def _single(self, model, p: GuidancePass, hidden, timestep, texts, image, audio, extra) -> torch.Tensor:
        on = p.audio and audio is not None
        return model(
            hidden,
            timestep,
            texts[p.text],
            image,
            audio if on else None,
            audio_scale=self.audio_scale if on else 0.0,
            **extra,
        )

    def _batched(self, model, passes, hidden, timestep, texts, image, audio, extra) -> list[torch.Tensor]:
        n = len(passes)
        bsz = hidden.shape[0]
        use_audio = audio is not None and any(p.audio for p in passes)
        scale = torch.cat(
            [torch.full((bsz,), self.audio_scale if (p.audio and use_audio) else 0.0) for p in passes]
        ).to(hidden.device)
        out = model(
            hidden.repeat(n, 1, 1, 1, 1),
            timestep.repeat(n),
            torch.cat([texts[p.text] for p in passes]),
            image.repeat(n, 1, 1),
            audio.repeat(n, 1, 1) if use_audio else None,
            audio_scale=scale,
            **{k: None if v is None else v.repeat(n, *([1] * (v.ndim - 1))) for k, v in extra.items()},
        )
        return list(out.chunk(n))


def _model_kwargs(kwargs: dict[str, torch.Tensor | None] | None, bsz: int) -> dict[str, torch.Tensor | None]:
    """``model_kwargs`` with every tensor broadcast from a batch of 1 to ``bsz`` (so the batched
    passes can repeat them pass by pass); other batch sizes are rejected."""
    out: dict[str, torch.Tensor | None] = {}
    for name, value in (kwargs or {}).items():
        if value is None:
            out[name] = None
            continue
        if not isinstance(value, torch.Tensor) or value.ndim < 1:
            raise ValueError(
                f"model_kwargs[{name!r}] must be a tensor with a batch dimension (B or 1, ...), got {value!r}"
            )
        if value.shape[0] == bsz:
            out[name] = value
        elif value.shape[0] == 1:
            out[name] = value.expand(bsz, *value.shape[1:])
        else:
            raise ValueError(
                f"model_kwargs[{name!r}] has batch {value.shape[0]} but image_latents has batch {bsz} (use {bsz} or 1)"
            )
    return out


def _combine(passes: list[GuidancePass], outs: list[torch.Tensor]) -> torch.Tensor:
    """Weighted sum of the pass outputs in float32 (one pass of weight 1 is returned as is)."""
    if len(passes) == 1 and passes[0].weight == 1.0:
        return outs[0].float()
    total = passes[0].weight * outs[0].float()
    for p, out in zip(passes[1:], outs[1:]):
        total = total + p.weight * out.float()
    return total


def _check_latents(latents: torch.Tensor, num_frames: int | None, model) -> tuple[int, int, int, int]:
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"image_latents must be (B, {LATENT_CHANNELS}, F, H, W) Wan VAE latents, got {tuple(latents.shape)}"
        )
    bsz, _, f_lat, h, w = latents.shape
    if num_frames is not None:
        if num_frames < 1 or (num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 (e.g. 81) for the Wan VAE's temporal stride 4, got {num_frames}")
        if num_latent_frames(num_frames) != f_lat:
            raise ValueError(
                f"num_frames={num_frames} gives {num_latent_frames(num_frames)} latent frames "
                f"but image_latents has {f_lat}"
            )
    config = getattr(getattr(model, "transformer", None), "config", None)
    patch = getattr(config, "patch_size", None)
    if patch is not None and (h % patch[1] or w % patch[2]):
        raise ValueError(
            f"latent grid {h}×{w} is not divisible by the DiT patch {patch[1]}×{patch[2]}; "
            f"use pixel sizes that are multiples of {8 * patch[1]}×{8 * patch[2]}"
        )
    return bsz, f_lat, h, w


def _check_text(text: torch.Tensor, name: str) -> None:
    if text.shape[1] != TEXT_TOKENS:
        raise ValueError(
            f"{name} must have {TEXT_TOKENS} tokens (umT5 embedding zero-padded to {TEXT_TOKENS}), "
            f"got {text.shape[1]}; the Wan I2V attention splits image from text by that count"
        )


def _batch(t: torch.Tensor, bsz: int, name: str, ndim: int) -> torch.Tensor:
    """Broadcast a batch of 1 to ``bsz``; reject other mismatches."""
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims (B, tokens, width), got shape {tuple(t.shape)}")
    if t.shape[0] == bsz:
        return t
    if t.shape[0] == 1:
        return t.expand(bsz, *t.shape[1:])
    raise ValueError(f"{name} has batch {t.shape[0]} but image_latents has batch {bsz} (use {bsz} or 1)")


__all__ = ["FlowMatchSampler", "GuidancePass", "guidance_passes", "sampling_sigmas"]
