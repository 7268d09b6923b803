"""The raw sample format: one WebDataset sample (one clip) as ``ft-prep`` writes it, its codecs,
and :func:`normalise_motion` for its ω values.

It lives in the library because both sides use it: ``ft-prep`` writes these members, and raw-mode
training (:mod:`ft_train.data.raw`) and the encode pass read them back.

A sample is a group of tar members sharing the key ``{stem}_{hash8}_{clip:05d}`` (file stem with
dots replaced, 8 hex digits of the source path's sha1 so equal stems in different folders never
collide, clip index within the source video). Members, for a clip of F frames of H×W pixels:

=================  ==========================================================================
``mp4``            H.264 (yuv420p, constant fps) video only, F frames, H×W.
``flac``           16 kHz mono, 16-bit, ``round(F / fps × 16000)`` samples; sample 0 is at the
                   time of frame 0.
``landmarks.npz``  ``np.savez_compressed``: ``face`` (F, 478, 3) float32 pixels (x, y; z in x's
                   scale), ``face_found`` (F,) bool (False: copied from the nearest found frame),
                   ``face_box`` (F, 4) float32 pixels x0, y0, x1, y1, ``face_conf`` (F,) float32
                   detector score, ``num_faces`` (F,) uint8, ``pose`` (F, 33, 4) float32 (x, y in
                   [0, 1] of W, H; z; visibility), NaN on frames where pose was not run/found.
``lipmask.npz``    ``np.savez_compressed``: ``packed`` (F, H, ceil(W / 8)) uint8 =
                   ``np.packbits(mask, axis=-1)``, ``shape`` (3,) int64 = (F, H, W). Lossless;
                   decode with :func:`decode_lip_masks`.
``json``           metadata (UTF-8): ``fps``, ``num_frames``, ``face_box``, ``omega_l_raw`` /
                   ``omega_b_raw``, ``caption``, ... (``ft-prep``'s ``_make_clip``).
=================  ==========================================================================
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np

SAMPLE_KEYS = ("mp4", "flac", "landmarks.npz", "lipmask.npz", "json")


def sample_key(source: Path, clip_index: int) -> str:
    """WebDataset key: no dots (WebDataset splits the extension at the first dot)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(source).stem)
    digest = hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:8]
    return f"{stem}_{digest}_{clip_index:05d}"


def encode_npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def decode_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def encode_lip_masks(masks: np.ndarray) -> bytes:
    """(F, H, W) bool → compressed packed bits (≈ 1 bit/pixel before compression, ~20 kB/clip)."""
    return encode_npz(packed=np.packbits(masks.astype(bool), axis=-1), shape=np.array(masks.shape, dtype=np.int64))


def decode_lip_masks(data: bytes | dict) -> np.ndarray:
    """``lipmask.npz`` bytes (or the dict WebDataset's npz decoder gives) → (F, H, W) bool."""
    z = decode_npz(data) if isinstance(data, bytes | bytearray) else data
    f, h, w = (int(v) for v in z["shape"])
    return np.unpackbits(z["packed"], axis=-1, count=w).astype(bool).reshape(f, h, w)


def normalise_motion(raw: float | None, stats: dict) -> float:
    """Raw ω (``omega_l_raw``/``omega_b_raw``) → [0, 1] with one entry of ``stats.json``
    (``stats["omega_l"]`` or ``stats["omega_b"]``): ``clip((raw - low) / (high - low), 0, 1)``.
    A missing value (no body seen) becomes the dataset median, normalised the same way."""
    value = stats["median"] if raw is None else raw
    span = stats["high"] - stats["low"]
    return float(np.clip((value - stats["low"]) / span, 0.0, 1.0)) if span > 0 else 0.5
