"""The latent-shard schema: what one training sample holds once the frozen encoders have run.

The one place the format is defined in code (members, dtypes, shapes, json keys); the table is in
docs/data.md ("Latent shards: the format"). Optional members are added without a version bump:
a bump is for changes an older reader would misread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SCHEMA_NAME = "ft-latent"
SCHEMA_VERSION = 1
TEXT_TOKENS = 512
ARRAY_FIELDS = ("latents", "image_latents", "clip", "text", "audio", "lip_mask")
#: Members a sample may lack (older shards, or written with ``encode.face=none``); at most one of them.
OPTIONAL_FIELDS = ("face", "face_pixels")


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

    Returns the dict of :func:`training_sample`; WebDataset keeps ``__key__``.
    """
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    meta = raw.get("json")
    if not isinstance(meta, dict):
        raise SchemaError(f"{where}: missing json metadata")
    check_meta(meta, where)
    missing = [f for f in ARRAY_FIELDS if f"{f}.npy" not in raw]
    if missing:
        raise SchemaError(f"{where}: missing members {', '.join(m + '.npy' for m in missing)}")
    arrays = {f: raw[f"{f}.npy"] for f in (*ARRAY_FIELDS, *OPTIONAL_FIELDS) if f"{f}.npy" in raw}
    lip = arrays["lip_mask"]
    # face_pixels keeps its dtype (uint8): training_sample maps it to [-1, 1].
    arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) if k == "face_pixels" else to_tensor(v)
              for k, v in arrays.items()}
    if lip.dtype == np.uint8:
        arrays["lip_mask"] = arrays["lip_mask"] / 255.0
    return training_sample(arrays, meta, where)


def training_sample(arrays: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> dict[str, Any]:
    """Encoder outputs of one clip + its metadata → the training sample (the batch layout).

    Both data paths end here — latent shards (:func:`decode_sample`) and raw-mode training
    (``ft_train.data.raw``) — so a model cannot tell which one fed it.

    Args:
        arrays: float tensors ``latents``, ``image_latents`` (16, F, H, W), ``clip`` (257, Di),
            ``text`` (L_t ≤ 512, Dt) real tokens only, ``audio`` (L_a, Da), ``lip_mask`` (F, H, W)
            in [0, 1], optionally ``face`` (N_face, Di) or ``face_pixels`` (3, S, S) uint8.
        meta: ``num_frames``, ``fps``, ``omega_l``, ``omega_b`` (normalised), as in the schema json.
        where: names the sample in errors (shard:key).
    Returns:
        float32 tensors ``latents, image_latents (16,F,H,W)``, ``clip (257,Di)``, ``text (512,Dt)``
        zero-padded, ``text_len`` (), ``audio (L_a,Da)``, ``lip_mask (F,H,W)``, ``motion (2,)`` =
        (ω_l, ω_b), ``fps`` (), and ``face`` when the sample has one: ``(N_face,Di)`` tokens, or
        from ``face_pixels`` the crop ``(3,S,S)`` in [-1, 1].
    """
    latents = arrays["latents"].float()
    image_latents = arrays["image_latents"].float()
    if latents.ndim != 4 or latents.shape != image_latents.shape:
        raise SchemaError(f"{where}: latents {tuple(latents.shape)} / image_latents {tuple(image_latents.shape)} must both be (16, F, H, W)")
    lip = arrays["lip_mask"].float()
    if tuple(lip.shape) != tuple(latents.shape[1:]):
        raise SchemaError(f"{where}: lip_mask {tuple(lip.shape)} does not match latent grid {tuple(latents.shape[1:])}")
    text = arrays["text"].float()
    if text.ndim != 2 or text.shape[0] > TEXT_TOKENS:
        raise SchemaError(f"{where}: text must be (L<=512, D), got {tuple(text.shape)}")
    padded = text.new_zeros(TEXT_TOKENS, text.shape[1])
    padded[: text.shape[0]] = text
    num_frames = int(meta.get("num_frames", 4 * (latents.shape[1] - 1) + 1))
    if (num_frames - 1) // 4 + 1 != latents.shape[1]:
        raise SchemaError(f"{where}: num_frames={num_frames} does not give {latents.shape[1]} latent frames")
    clip = arrays["clip"].float()
    sample = {
        "latents": latents,
        "image_latents": image_latents,
        "clip": clip,
        "text": padded,
        "text_len": torch.tensor(text.shape[0]),
        "audio": arrays["audio"].float(),
        "lip_mask": lip,
        "motion": torch.tensor([float(meta.get("omega_l", 0.5)), float(meta.get("omega_b", 0.5))]),
        "fps": torch.tensor(float(meta.get("fps", 0.0))),
    }
    if "face" in arrays and "face_pixels" in arrays:
        raise SchemaError(f"{where}: holds both face and face_pixels; a sample carries one face form "
                          "(ft-prep task=encode face=clip|pixels)")
    if "face" in arrays:
        face = arrays["face"].float()
        if face.ndim != 2:
            raise SchemaError(f"{where}: face must be (N_face, D), got {tuple(face.shape)}")
        sample["face"] = face
    elif "face_pixels" in arrays:
        pixels = arrays["face_pixels"]
        if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
            raise SchemaError(f"{where}: face_pixels must be uint8 RGB (3, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
        sample["face"] = pixels.float().div(127.5).sub(1.0)
    return sample
