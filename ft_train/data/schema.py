"""The latent-shard schema: what one training sample holds once the frozen encoders have run.

This is the one place the format is defined. Latent shards are WebDataset ``.tar`` files; each
sample is a group of members sharing a key (``<key>.<field>``). Arrays are ``.npy`` (NumPy's own
format, read with ``np.load``); metadata is ``.json``.

Schema ``ft-latent``, version 1 (``F`` = latent frames = (frames − 1)/4 + 1; ``H, W`` = latent
height/width = pixels/8; ``L_a`` = wav2vec tokens of the clip; ``L_t`` ≤ 512 text tokens):

==================  ============  =========================  ==========================================
member              dtype         shape                      content
==================  ============  =========================  ==========================================
``latents.npy``     float16/32    (16, F, H, W)              Wan VAE latents of the clip, normalised
                                                             with the VAE's per-channel mean/std
``image_latents.npy`` float16/32  (16, F, H, W)              VAE(first frame, zeros…): the I2V
                                                             condition (the 4-channel mask is built
                                                             in code, it is the same for every clip)
``clip.npy``        float16/32    (257, 1280)                CLIP ViT-H/14 penultimate hidden state of
                                                             the first frame at 224 px
``text.npy``        float16/32    (L_t, 4096)                umT5-XXL embedding of the caption, only
                                                             the real tokens (zero-padded to 512 on load)
``audio.npy``       float16/32    (L_a, 768)                 wav2vec2-base-960h ``last_hidden_state``
                                                             of exactly the clip's audio
``lip_mask.npy``    float16/uint8 (F, H, W)                  lip mask on the latent grid, in [0, 1]
                                                             (uint8 is read as /255)
``json``            —             —                          metadata, below
==================  ============  =========================  ==========================================

``json`` keys: ``schema`` ("ft-latent"), ``version`` (1), ``fps`` (video frames per second),
``num_frames`` (video frames, 4k+1), ``height``/``width`` (pixels), ``omega_l``/``omega_b``
(motion intensities, normalised to [0, 1] with the data tools' statistics), ``caption``,
``source`` (where the clip came from). Unknown extra keys are kept and ignored.

Widths 1280/4096/768 are those of the real encoders; tiny test models may use other widths,
which the datamodule checks against the model config before training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SCHEMA_NAME = "ft-latent"
SCHEMA_VERSION = 1
TEXT_TOKENS = 512
ARRAY_FIELDS = ("latents", "image_latents", "clip", "text", "audio", "lip_mask")


class SchemaError(ValueError):
    """A sample does not follow the latent-shard schema."""


def check_meta(meta: dict[str, Any], where: str) -> None:
    """Reject samples written for another schema or version, with the shard named."""
    name, version = meta.get("schema"), meta.get("version")
    if name != SCHEMA_NAME:
        raise SchemaError(f"{where}: not a latent shard (schema={name!r}, expected {SCHEMA_NAME!r})")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{where}: latent-shard schema version {version}, this ft_train reads version {SCHEMA_VERSION}; "
            "re-run the encode pass (ft-prep task=encode) on the raw shards"
        )


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).float()


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """WebDataset sample (already ``.npy``/``.json``-decoded) → training sample of tensors.

    Returns float32 tensors ``latents, image_latents (16,F,H,W)``, ``clip (257,Di)``,
    ``text (512,Dt)`` zero-padded, ``text_len`` (), ``audio (L_a,768)``, ``lip_mask (F,H,W)``,
    ``motion (2,)`` = (ω_l, ω_b) and ``fps``; WebDataset keeps ``__key__``.
    """
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    meta = raw.get("json")
    if not isinstance(meta, dict):
        raise SchemaError(f"{where}: missing json metadata")
    check_meta(meta, where)
    missing = [f for f in ARRAY_FIELDS if f"{f}.npy" not in raw]
    if missing:
        raise SchemaError(f"{where}: missing members {', '.join(m + '.npy' for m in missing)}")
    latents = to_tensor(raw["latents.npy"])
    image_latents = to_tensor(raw["image_latents.npy"])
    if latents.ndim != 4 or latents.shape != image_latents.shape:
        raise SchemaError(f"{where}: latents {tuple(latents.shape)} / image_latents {tuple(image_latents.shape)} must both be (16, F, H, W)")
    lip = raw["lip_mask.npy"]
    lip = to_tensor(lip) / 255.0 if lip.dtype == np.uint8 else to_tensor(lip)
    if tuple(lip.shape) != tuple(latents.shape[1:]):
        raise SchemaError(f"{where}: lip_mask {tuple(lip.shape)} does not match latent grid {tuple(latents.shape[1:])}")
    text = to_tensor(raw["text.npy"])
    if text.ndim != 2 or text.shape[0] > TEXT_TOKENS:
        raise SchemaError(f"{where}: text must be (L<=512, D), got {tuple(text.shape)}")
    padded = text.new_zeros(TEXT_TOKENS, text.shape[1])
    padded[: text.shape[0]] = text
    num_frames = int(meta.get("num_frames", 4 * (latents.shape[1] - 1) + 1))
    if (num_frames - 1) // 4 + 1 != latents.shape[1]:
        raise SchemaError(f"{where}: num_frames={num_frames} does not give {latents.shape[1]} latent frames")
    return {
        "latents": latents,
        "image_latents": image_latents,
        "clip": to_tensor(raw["clip.npy"]),
        "text": padded,
        "text_len": torch.tensor(text.shape[0]),
        "audio": to_tensor(raw["audio.npy"]),
        "lip_mask": lip,
        "motion": torch.tensor([float(meta.get("omega_l", 0.5)), float(meta.get("omega_b", 0.5))]),
        "fps": torch.tensor(float(meta.get("fps", 0.0))),
    }
