"""The Wan VAE's decoding half: VAE-normalised latents → uint8 RGB frames.

Validation decodes its samples and their reference latents with it, and ``ft-infer`` the
generated video. It loads through the encoders' own loader, so a wrong folder fails the same way
as for the encode pass. :func:`read_audio` sits here only until it joins :mod:`ft_train.media`.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor

from ..media import AUDIO_RATE


def read_audio(source: str | Path | bytes, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """Any audio FFmpeg reads (a file path or the bytes of one) → mono float32 ``(N,)`` at ``sample_rate`` Hz."""
    where = "audio bytes" if isinstance(source, bytes) else str(source)
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.audio:
                raise ValueError(f"{where}: has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(o.to_ndarray().reshape(-1) for o in resampler.resample(frame))
            chunks.extend(o.to_ndarray().reshape(-1) for o in resampler.resample(None))
    except av.FFmpegError as e:
        raise ValueError(f"{where}: cannot be decoded ({e})") from e
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def to_uint8_frames(video: Tensor) -> Tensor:
    """Float video ``(B, 3, T, H, W)`` in [-1, 1] → uint8 RGB frames ``(B, T, H, W, 3)``."""
    return video.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


class WanVAEDecoder:
    """Decode VAE-normalised latents ``(B, 16, F, H, W)`` → uint8 frames ``(B, 4(F−1)+1, 8H, 8W, 3)``.

    Loads ``AutoencoderKLWan`` from ``<wan>/vae`` (a diffusers Wan2.1 folder) through the encoders'
    loader and undoes the per-channel normalisation (``z·std + mean``) before ``vae.decode``, as
    diffusers' Wan pipelines do.
    """

    def __init__(self, wan: str | Path, device: str | torch.device = "cpu", dtype: str = "float32",
                 key: str = "callbacks.validation.vae"):
        from .encoders import load_vae_encoder

        self.enc = load_vae_encoder(wan, device=device, dtype=dtype, key=key)

    def to(self, device) -> "WanVAEDecoder":
        self.enc.to(device)
        return self

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        param = next(self.enc.vae.parameters())
        z = latents.to(param.device).float() * self.enc.std + self.enc.mean
        video = self.enc.vae.decode(z.to(param.dtype)).sample
        return to_uint8_frames(video)


__all__ = ["WanVAEDecoder", "read_audio", "to_uint8_frames"]
