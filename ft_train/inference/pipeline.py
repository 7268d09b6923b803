"""The talking-portrait pipeline: photo + speech + adapters → video frames, with the official
three-pass guidance."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .adapters import AdapterSpec, apply_loras, check_identity, clip_width
from .inputs import fit_waveform, image_to_tensor, resolve_device, resolve_dtype_name

log = logging.getLogger("ft_train.infer")

# ----------------------------------------------------------------------------------------------
# the pipeline


class TalkingPortraitPipeline:
    """The loaded networks of ft-infer: call it once per (image, speech) pair.

    Args:
        model: :class:`~ft_train.models.FantasyTalkingDiT` with its adapters loaded, on ``device``.
        image_encoder, text_encoder, audio_encoder: the frozen encoders of
            :mod:`ft_train.models.encoders`.
        vae: :class:`~ft_train.models.vae.WanVAEDecoder` (its ``enc`` also encodes the
            first-frame condition, so the VAE is loaded once).
        sampler: :class:`~ft_train.diffusion.FlowMatchSampler`.
        device: where the DiT runs (and the encoders while they run).
        offload: the encoders and VAE live on the CPU between uses.
        face_margin: context around the face box in the identity branch's crop
            (:func:`~ft_train.data.clip_prep.face_crop_box`); the training data's ``face_margin``.
    """

    def __init__(self, model, image_encoder, text_encoder, audio_encoder, vae, sampler,
                 device: torch.device, offload: bool = False, face_margin: float = 0.2):
        self.face_margin = float(face_margin)
        self.model = model
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.audio_encoder = audio_encoder
        self.vae = vae
        self.sampler = sampler
        self.device = torch.device(device)
        self.offload = bool(offload) and self.device.type != "cpu"

    @classmethod
    def load(cls, adapters: AdapterSpec, wan: str | Path, wav2vec: str | Path, sampler=None, device="auto",
             dtype: str = "auto", vae_dtype: str = "float32", vae_tiling: bool = False,
             offload: bool = False, face_margin: float = 0.2,
             compile_blocks: bool = False, frozen_fp8: bool = False, lora_scale: float = 1.0,
             extra_lora: Sequence[str | Path] = (), extra_lora_scale: float = 1.0) -> "TalkingPortraitPipeline":
        """Load the DiT from ``<wan>/transformer``, put ``adapters``' tensors in it, and load the
        encoders and the VAE (on the CPU when ``offload``). ``compile_blocks``: ``torch.compile``
        the DiT's blocks; ``frozen_fp8``: their linear weights in float8, quantised once on
        ``device`` (both :func:`ft_train.speed.apply`). ``lora_scale`` weights the adapters' LoRA,
        ``extra_lora`` adds diffusers-format Wan LoRA files at ``extra_lora_scale`` (:func:`apply_loras`)."""
        from ..diffusion import FlowMatchSampler
        from ..models.vae import WanVAEDecoder
        from ..models import build_model
        from ..models.encoders import load_audio_encoder, load_image_encoder, load_text_encoder
        from ..models.weights import check_compatible
        from ..speed import SpeedOptions, apply

        device = device if isinstance(device, torch.device) else resolve_device(device)
        dtype = resolve_dtype_name(dtype, device)
        vae_dtype = resolve_dtype_name(vae_dtype, device, key="vae_dtype")
        home = torch.device("cpu") if offload else device
        check_identity(adapters.spec.identity, clip_width(Path(wan)))

        model = build_model(pretrained=str(wan), dtype=dtype, **adapters.model_kwargs())
        ckpt = adapters.checkpoint
        loaded = check_compatible(model, ckpt, key="adapters")
        model.load_state_dict({k: ckpt.tensors[k] for k in loaded}, strict=False)
        # The release runs its adapter in the DiT's dtype too; the adapters are ~6% of 14B.
        for module in model.adapter_modules().values():
            module.to(getattr(torch, dtype))
        apply_loras(model, lora_scale, extra_lora, extra_lora_scale, dtype=getattr(torch, dtype))
        model.requires_grad_(False).eval().to(device)
        apply(model, SpeedOptions(compile_blocks=compile_blocks, frozen_fp8=frozen_fp8))

        vae = WanVAEDecoder(wan, device=home, dtype=vae_dtype, key="wan")
        if vae_tiling:
            vae.enc.vae.enable_tiling()
        image_encoder = load_image_encoder(wan, device=home, dtype=dtype, key="wan")
        text_encoder = load_text_encoder(wan, device=home, dtype=dtype, key="wan")
        audio_encoder = load_audio_encoder(wav2vec, device=home, dtype=dtype, key="wav2vec")
        return cls(model, image_encoder, text_encoder, audio_encoder, vae, sampler or FlowMatchSampler(),
                   device, offload, face_margin)

    @property
    def grid(self) -> int:
        """Pixels per DiT token side: VAE stride × patch (8 × 2 = 16 for Wan2.1)."""
        patch = self.model.transformer.config.patch_size
        return self.vae.enc.spatial_stride * int(patch[1])

    @contextmanager
    def _resident(self, module):
        """``module`` on the compute device for the duration (a no-op unless offloading)."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            torch.cuda.empty_cache()

    def _text(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Prompts → ``(1, 512, text_dim)`` embeddings, zero-padded (the DiT's I2V attention
        splits image from text tokens by the count 512)."""
        from ..models.adapter import TEXT_TOKENS

        with self._resident(self.text_encoder) as enc:
            embeddings = enc(list(prompts))
        out = []
        for e in embeddings:
            padded = e.new_zeros(1, TEXT_TOKENS, e.shape[-1])
            padded[0, : min(e.shape[0], TEXT_TOKENS)] = e[:TEXT_TOKENS]
            out.append(padded.to(self.device))
        return out

    def _face(self, image, face_box: Sequence[float] | None) -> torch.Tensor | None:
        """The identity branch's ``face`` for ``image`` (see the module docstring): CLIP tokens
        ``(1, N, D)`` or pixels ``(1, 3, 112, 112)`` in [-1, 1] of the crop around ``face_box``;
        None = no face (a ``precomputed`` branch then reads the CLIP image tokens)."""
        from ..data.clip_prep import FACE_PIXELS_SIZE, face_crops

        identity = self.model.identity
        if identity is None:
            return None
        frame = np.asarray(image, dtype=np.uint8)[None]
        if identity.encoder.input_kind == "pixels":
            if face_box is None:
                raise ValueError(
                    f"face: the identity branch (model.identity.encoder={identity.config.encoder}) reads a face crop, "
                    "and no face box was given"
                )
            crop = face_crops(frame, [face_box], self.face_margin, FACE_PIXELS_SIZE)
            return crop.float().div(127.5).sub(1.0).to(self.device)
        if face_box is None:
            return None
        crop = face_crops(frame, [face_box], self.face_margin)
        with self._resident(self.image_encoder) as enc:
            return enc(crop.float().div(127.5).sub(1.0)).to(self.device)

    @torch.no_grad()
    def __call__(self, image, speech: np.ndarray, num_frames: int, fps: float, prompt: str = "",
                 negative_prompt: str = "", omega: tuple[float | None, float | None] = (None, None),
                 seed: int = 0, progress: bool = False, face_box: Sequence[float] | None = None) -> torch.Tensor:
        """Generate a clip.

        Args:
            image: the reference frame, an RGB ``PIL.Image`` whose sides are multiples of
                :attr:`grid` px (see :func:`target_size`).
            speech: mono float32 ``(N,)`` at 16 kHz; cut or silence-padded to ``num_frames / fps`` s.
            num_frames: video frames, 4k+1.
            fps: frames per second (sets which speech each frame's audio window sees).
            prompt, negative_prompt: text and negative text ("" = the empty prompt).
            omega: (ω_l, ω_b) in [0, 1] for the motion module; None entries = its default.
            seed: initial-noise seed (CPU generator: the same noise on every device).
            progress: a bar over the sampling steps.
            face_box: the face's box (x0, y0, x1, y1) in ``image``'s px (:func:`detect_face_box`,
                scaled), for the identity branch; None = no face (whole-image CLIP tokens for a
                ``precomputed`` branch; an ``arcface`` branch needs a box).
        Returns:
            uint8 RGB frames ``(num_frames, H, W, 3)`` on the CPU.
        """
        from ..data.clip_prep import clip_audio_samples

        cond = self.conditions(image, prompt, negative_prompt, omega, face_box)
        wave = fit_waveform(np.asarray(speech, dtype=np.float32), clip_audio_samples(num_frames, fps))
        return self.segment(cond, wave, num_frames, seed=seed, progress=progress)

    @torch.no_grad()
    def conditions(self, image, prompt: str = "", negative_prompt: str = "",
                   omega: tuple[float | None, float | None] = (None, None),
                   face_box: Sequence[float] | None = None) -> "Conditions":
        """What every window of a video shares (arguments as in :meth:`__call__`): the prompts'
        embeddings, the photo's CLIP tokens, the identity branch's face and the motion
        intensities. A long video computes them once, from the photo, for all its segments."""
        width, height = image.size
        if width % self.grid or height % self.grid:
            raise ValueError(
                f"image: {width}×{height} px is not a multiple of the {self.grid}-px DiT grid (use target_size)"
            )
        first = image_to_tensor(image)
        wants_negative = any(p.text == "neg" for p in self.sampler.passes(has_audio=True))
        texts = self._text([prompt, negative_prompt] if wants_negative else [prompt])
        with self._resident(self.image_encoder) as enc:
            clip = enc(first).to(self.device)
        extra: dict[str, torch.Tensor] = {}
        if self.model.motion is not None:
            default = self.model.motion_config.default
            pair = [default if w is None else float(w) for w in omega]
            extra["motion"] = torch.tensor([pair], dtype=torch.float32, device=self.device)
        face = self._face(image, face_box)
        if face is not None:
            extra["face"] = face
        return Conditions(first=first, text=texts[0], negative_text=texts[1] if wants_negative else None,
                          clip=clip, model_kwargs=extra)

    @torch.no_grad()
    def segment(self, cond: "Conditions", wave: np.ndarray, num_frames: int, known: torch.Tensor | None = None,
                seed: int = 0, progress: bool = False) -> torch.Tensor:
        """Sample one window of ``num_frames`` (4k+1) video frames.

        Args:
            cond: :meth:`conditions` of the photo.
            wave: the window's speech, mono float32 16 kHz, exactly
                :func:`~ft_train.data.clip_prep.clip_audio_samples` long and starting at the time
                of the window's first frame (its wav2vec2 tokens then sit where the per-frame audio
                windows expect them).
            num_frames: video frames of the window.
            known: ``(K, 3, H, W)`` float frames in [-1, 1] that the window starts with, held as
                known frames in the I2V condition (latents and mask); K = 4m+1 so that they fill
                whole latent frames. None = the photo alone (K = 1, plain Wan I2V).
            seed: initial-noise seed.
            progress: a bar over the sampling steps.
        Returns:
            uint8 RGB frames ``(num_frames, H, W, 3)`` on the CPU.
        """
        from .long_form import known_frames_mask

        with self._resident(self.audio_encoder) as enc:
            audio = enc([wave])[0][None].to(self.device)
        first = cond.first
        if known is None and cond.latents is not None:
            image_latents = plain_window_latents(cond.latents, num_frames).to(self.device)
            mask = None
        elif known is None:
            with self._resident(self.vae) as vae:
                image_latents = vae.enc.encode_condition(first, num_frames).to(self.device)
            mask = None
        else:
            size = tuple(first.shape[1:]) if first is not None else tuple(known.shape[1:])
            if known.ndim != 4 or tuple(known.shape[1:]) != size or not 1 <= known.shape[0] < num_frames:
                raise ValueError(f"known frames must be (K < {num_frames}, {', '.join(map(str, size))}), "
                                 f"got {tuple(known.shape)}")
            video = known.new_zeros(1, 3, num_frames, *known.shape[2:]).float()
            video[0, :, : known.shape[0]] = known.to(video).permute(1, 0, 2, 3)
            with self._resident(self.vae) as vae:
                image_latents = vae.enc(video).to(self.device)
            mask = known_frames_mask(num_frames, known.shape[0], *image_latents.shape[3:], device=self.device)
        latents = self.sampler(
            self.model, image_latents, cond.clip, cond.text, audio,
            negative_text=cond.negative_text,
            generator=torch.Generator().manual_seed(int(seed)),
            num_frames=num_frames, progress=progress, model_kwargs=cond.model_kwargs, mask=mask,
        )
        del image_latents, audio
        with self._resident(self.vae) as vae:
            frames = vae(latents)
        return frames[0].cpu()


@dataclass
class Conditions:
    """What every window of a video shares (:meth:`TalkingPortraitPipeline.conditions`).

    Attributes:
        first: the photo ``(1, 3, H, W)`` in [-1, 1] (CPU), the first frame of a plain window;
            None when ``latents`` stand in for it.
        text, negative_text: ``(1, 512, text_dim)`` prompt embeddings (negative: None when no
            guidance pass uses it).
        clip: ``(1, 257, image_dim)`` CLIP tokens of the photo.
        model_kwargs: ``motion`` ``(1, 2)`` and/or ``face`` for the model, as the sampler takes them.
        latents: the photo's I2V condition latents ``(1, 16, F_lat, h, w)`` already encoded (a
            latent shard's ``image_latents``, validation) for a plain window at least as long as
            any segment; a window without known frames takes their first latent frames instead of
            encoding ``first`` (:func:`plain_window_latents`). None = encode ``first``.
    """

    first: torch.Tensor | None
    text: torch.Tensor
    negative_text: torch.Tensor | None
    clip: torch.Tensor
    model_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    latents: torch.Tensor | None = None


def plain_window_latents(latents: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The condition latents of a plain ``num_frames``-frame window (the photo, then zeros) cut
    from those of a longer one, ``(B, C, F_lat, h, w)``: the Wan VAE is causal in time (frame 0
    alone, then 4 frames per latent frame, each chunk seeing only the past), so the first
    ``(num_frames − 1) / 4 + 1`` latent frames are what encoding the shorter window gives."""
    from ..models.audio import num_latent_frames

    need = num_latent_frames(num_frames)
    if latents.shape[2] < need:
        raise ValueError(f"condition latents cover {latents.shape[2]} latent frames; a {num_frames}-frame window "
                         f"needs {need}")
    return latents[:, :, :need]
