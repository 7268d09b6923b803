"""The Wan VAE's decoding half: VAE-normalised latents → uint8 RGB frames.

Validation decodes its samples and their reference latents with it, and ``ft-infer`` the
generated video. It loads through the encoders' own loader, so a wrong folder fails the same way
as for the encode pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


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


__all__ = ["WanVAEDecoder", "to_uint8_frames"]
