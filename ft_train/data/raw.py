"""Raw-mode training: read ``ft-prep``'s raw shards and encode clips on the fly.

The latent-cache pass (``ft-prep task=encode``) encodes each raw clip
once, whole. Raw mode (``data=raw``, :class:`RawShardDataModule`) skips that pass: it reads the
raw shards (sample layout: :mod:`ft_train.data.raw_format`), takes a random window of
``num_frames`` frames from each clip — a new one on every visit, which a cache cannot give —
fits it to the training resolution, and runs the same frozen encoders through the same
functions as the encode pass (:func:`load_clip` here, then
:func:`ft_train.data.clip_prep.encode_clips`, then :func:`ft_train.data.schema.training_sample`).
A batch therefore has exactly the cached-mode layout; for a window covering the whole clip at
the clip's own size it holds the numbers the encode pass would have written.

Where the encoders run (``data.encode_on``):

* ``worker`` — in the DataLoader worker processes, on CPU, one clip at a time; the batch
  arrives as tensors like a latent shard's. Simplest, and the GPU holds only the DiT; but every
  worker loads its own copy of the encoders (umT5-XXL alone is 23 GB in float32) and a CPU needs
  seconds to minutes per 81-frame clip at 512 px. Right for CPU runs, the tiny models and tests.
* ``device`` — workers only decode, cut and resize (uint8 frames, audio, masks); the encoders
  live once per rank on the training device, and :meth:`RawShardDataModule.on_after_batch_transfer`
  encodes the whole batch there before the step. Costs their GPU memory (≈13 GB in bfloat16
  with a float32 VAE) and step time, but is the only way real-size encoders keep up with
  training. They are held by the datamodule, not the LightningModule, so they are never
  wrapped by DDP/DeepSpeed, never in a checkpoint and never given to the optimiser.
* ``auto`` (default) — ``device`` when the trainer runs on CUDA, else ``worker``.

Exact resume: the window start of a sample is drawn from ``(seed, sample key, visit number)``
in a cheap stage that reads only the metadata (:class:`WindowSampler`), before
:class:`~ft_train.data.datamodule.ResumeSkip`; so a resumed run skips the samples already
trained on without decoding them and continues with the same windows. Samples rejected from
their metadata (too short, bad json, missing members) are counted before the skip and stay
exact; a sample whose video or audio turns out to be undecodable is only found after it, so it
shifts a resumed run by one sample (it is logged and counted in ``data/skipped``; ``ft-prep``
writes every member itself, so this takes a damaged file).
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import webdataset as wds

from .datamodule import LatentShardDataModule, ResumeSkip, collate_samples, resolve_shards
from .schema import training_sample

log = logging.getLogger(__name__)

#: Members of a raw sample that encoding needs (``landmarks.npz`` is used when present).
RAW_MEMBERS = ("mp4", "flac", "lipmask.npz", "json")

#: Every reason a raw sample is rejected by :func:`load_clip` / :class:`WindowSampler`.
RAW_REJECT_REASONS = {
    "missing_member": "the sample lacks one of mp4, flac, lipmask.npz, json",
    "bad_metadata": "json unreadable or without fps / num_frames",
    "unreadable_video": "the mp4 cannot be decoded",
    "unreadable_audio": "the flac cannot be decoded",
    "unreadable_mask": "lipmask.npz cannot be decoded",
    "unreadable_landmarks": "landmarks.npz is present but cannot be decoded",
    "frame_count": "decoded frames differ from json num_frames or the lip masks, or are not 4k+1",
    "short_audio": "fewer audio samples than the clip lasts",
    "too_small": "a side is below size_multiple pixels",
    "too_short": "the clip has fewer frames than the training window (data.num_frames)",
}

CROP_MODES = ("center", "face")
ENCODE_ON = ("auto", "worker", "device")
MOTION_FROM = ("window", "clip")


class SampleError(Exception):
    """A raw sample that cannot be used; ``reason`` is a key of :data:`RAW_REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# one raw sample → a decoded, cut, resized clip (shared with the encode pass)


def read_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """The json of a raw sample (members as bytes), checked for the members and keys encoding
    needs. Cheap: nothing is decoded but the json. Raises :class:`SampleError`."""
    key = raw.get("__key__", "?")
    missing = [m for m in RAW_MEMBERS if m not in raw]
    if missing:
        raise SampleError("missing_member", f"{key}: no {', '.join(missing)}")
    try:
        meta = json.loads(raw["json"])
        float(meta["fps"]), int(meta["num_frames"])
    except Exception as e:
        raise SampleError("bad_metadata", f"{key}: json unreadable or without fps/num_frames ({e})") from None
    return meta


@dataclass
class Geometry:
    """Where the output frames come from: the source window ``[top, top+height) × [left,
    left+width)`` of the raw frames, resized to ``out_height × out_width`` pixels."""

    top: int
    left: int
    height: int
    width: int
    out_height: int
    out_width: int

    @property
    def resized(self) -> bool:
        return (self.height, self.width) != (self.out_height, self.out_width)

    def box(self, box_xyxy: Sequence[float]) -> list[float]:
        """A pixel box (x0, y0, x1, y1) of the raw frames in output pixels."""
        sx, sy = self.out_width / self.width, self.out_height / self.height
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        return [(x0 - self.left) * sx, (y0 - self.top) * sy, (x1 - self.left) * sx, (y1 - self.top) * sy]


def check_buckets(buckets: Any, key: str) -> list[tuple[int, int]] | None:
    """``buckets``: None or a list of ``[H, W]`` training sizes, multiples of 16. Returns them as
    tuples; raises ``ValueError`` naming ``key``."""
    if buckets is None:
        return None
    try:
        out = [(int(h), int(w)) for h, w in buckets]
    except (TypeError, ValueError):
        raise ValueError(f"{key}={buckets!r} must be a list of [height, width] pairs, e.g. [[512, 512], [480, 832]]") from None
    bad = [b for b in out if min(b) < 16 or b[0] % 16 or b[1] % 16]
    if not out or bad:
        raise ValueError(f"{key}: {bad or 'an empty list'} — give [height, width] pairs, multiples of 16 (VAE stride 8 × DiT patch 2)")
    return out


def nearest_bucket(height: int, width: int, buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``height × width`` frames' (distance in
    log(H/W), so 2:1 and 1:2 are as far from 1:1; the first listed wins a tie). The frames are
    then scaled to cover it and cut to it (:func:`plan_geometry`), losing the least of the frame."""
    aspect = math.log(height / width)
    best = min(range(len(buckets)), key=lambda i: (round(abs(math.log(buckets[i][0] / buckets[i][1]) - aspect), 9), i))
    return int(buckets[best][0]), int(buckets[best][1])


def plan_geometry(
    height: int,
    width: int,
    size: Sequence[int] | None,
    size_multiple: int = 16,
    crop: str = "center",
    face_box: Sequence[float] | None = None,
) -> Geometry:
    """How raw ``height × width`` frames become training frames.

    ``size`` = (H, W): scaled to cover H × W (aspect kept) and cut to it, i.e. the source
    window is the largest one of H:W aspect that fits. ``size`` None: kept at their size and cut
    to multiples of ``size_multiple`` (what the encode pass does). The window sits at the centre
    (``crop="center"``) or is centred on the face box as far as the frame allows
    (``crop="face"``; the centre when there is no box): a talking-portrait crop should not cut the
    face when the aspect changes (landscape video → square training frames).
    Raises :class:`SampleError` (``too_small``) when nothing is left.
    """
    if size is None:
        out_h, out_w = height // size_multiple * size_multiple, width // size_multiple * size_multiple
        win_h, win_w = out_h, out_w
    else:
        out_h, out_w = (int(v) for v in size)
        scale = max(out_h / height, out_w / width)
        win_h, win_w = min(height, int(round(out_h / scale))), min(width, int(round(out_w / scale)))
    if min(out_h, out_w, win_h, win_w) <= 0:
        raise SampleError("too_small", f"{height}×{width} frames are smaller than size_multiple={size_multiple}")

    def place(centre: float | None, win: int, total: int) -> int:
        if centre is None:
            return (total - win) // 2
        return int(min(max(round(centre - win / 2), 0), total - win))

    cx = cy = None
    if crop == "face" and face_box is not None:
        x0, y0, x1, y1 = face_box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return Geometry(place(cy, win_h, height), place(cx, win_w, width), win_h, win_w, out_h, out_w)


def apply_geometry(frames: np.ndarray, masks: np.ndarray, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Cut and resize frames (F, h, w, 3) uint8 and masks (F, h, w) bool → (F, H, W, 3) uint8 and
    (F, H, W) uint8 coverage (0–255; exactly 0/255 when nothing is resized).

    Area averaging when shrinking (no aliasing of fine texture, a mask's partial cells keep their
    coverage), bicubic (frames) / bilinear (masks) when enlarging.
    """
    import cv2

    win = (slice(None), slice(geo.top, geo.top + geo.height), slice(geo.left, geo.left + geo.width))
    frames, masks = frames[win], masks[win].astype(np.uint8) * 255
    if not geo.resized:
        return np.ascontiguousarray(frames), np.ascontiguousarray(masks)
    shrink = geo.out_height <= geo.height and geo.out_width <= geo.width
    size = (geo.out_width, geo.out_height)
    frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC) for f in frames])
    masks = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR) for m in masks])
    return frames, masks


@dataclass
class RawClip:
    """One training window of a raw sample, decoded, cut and resized, ready for the encoders.

    ``frames`` (F, H, W, 3) uint8; ``audio`` (:func:`~ft_train.data.clip_prep.clip_audio_samples`,)
    float32 16 kHz from the window's first frame; ``masks`` (F, H, W) uint8 lip-mask coverage
    0–255; ``face_box`` the reference (first) frame's face box in output pixels, or None;
    ``omega_l``/``omega_b`` normalised to [0, 1]; ``meta`` what the latent json records.
    """

    key: str
    frames: np.ndarray
    audio: np.ndarray
    masks: np.ndarray
    caption: str
    fps: float
    start: int
    face_box: list[float] | None
    omega_l: float
    omega_b: float
    meta: dict[str, Any] = field(default_factory=dict)


def window_motion(landmarks: dict[str, np.ndarray] | None, meta: dict, start: int, num_frames: int, width: int, height: int):
    """Raw (ω_l, ω_b) of frames ``start … start+num_frames−1``, by ``ft-prep``'s own functions
    (:mod:`ft_train.data.face`) over the stored landmarks and pose; the clip's json values when
    the sample has no landmarks."""
    if landmarks is None:
        return meta.get("omega_l_raw"), meta.get("omega_b_raw")
    from .face import body_motion, landmark_motion

    sl = slice(start, start + num_frames)
    omega_l = landmark_motion(landmarks["face"][sl], landmarks["face_found"][sl])
    omega_b = body_motion(landmarks["pose"][sl], width, height)
    return omega_l, omega_b


def load_clip(
    raw: dict[str, Any],
    stats: dict[str, Any],
    *,
    start: int = 0,
    num_frames: int | None = None,
    size: Sequence[int] | None = None,
    size_multiple: int = 16,
    crop: str = "center",
    motion_from: str = "window",
    default_caption: str = "",
    buckets: Sequence[Sequence[int]] | None = None,
) -> RawClip:
    """Decode a raw WebDataset sample (members as bytes) and cut the training window from it.

    Args:
        raw: the sample (``mp4``, ``flac``, ``lipmask.npz``, ``json``; ``landmarks.npz`` used
            when present for the reference frame's face box and per-window motion).
        stats: the raw folder's ``stats.json`` (ω quantiles).
        start: first frame of the window in the clip.
        num_frames: window length, 4k+1; None = the whole clip (the encode pass).
        size: (H, W) training resolution, or None = the clip's own size cut to ``size_multiple``.
        buckets: several (H, W) sizes: the clip gets the one nearest its aspect ratio
            (:func:`nearest_bucket`); overrides ``size``.
        crop: ``center`` or ``face`` (see :func:`plan_geometry`).
        motion_from: ``window`` = ω over the window's frames (from ``landmarks.npz``); ``clip`` =
            the clip's json values. Equal when the window is the clip. The data tools' quantiles
            come from whole clips, so windows much shorter than the clips read as calmer.
        default_caption: prompt for clips without a caption.
    Raises:
        SampleError: with a :data:`RAW_REJECT_REASONS` reason.
    """
    from .. import media
    from .clip_prep import clip_audio_window
    from .raw_format import decode_lip_masks, decode_npz, normalise_motion

    key = raw.get("__key__", "?")
    meta = read_meta(raw)
    fps, total = float(meta["fps"]), int(meta["num_frames"])
    try:
        frames = media.decode_mp4(raw["mp4"])
    except Exception as e:
        raise SampleError("unreadable_video", f"{key}: mp4 cannot be decoded ({e.__class__.__name__}: {e})") from None
    try:
        audio = media.decode_flac(raw["flac"])
    except Exception as e:
        raise SampleError("unreadable_audio", f"{key}: flac cannot be decoded ({e.__class__.__name__}: {e})") from None
    try:
        masks = decode_lip_masks(raw["lipmask.npz"])
    except Exception as e:
        raise SampleError("unreadable_mask", f"{key}: lipmask.npz cannot be decoded ({e.__class__.__name__}: {e})") from None
    landmarks = None
    if "landmarks.npz" in raw:
        try:
            landmarks = decode_npz(raw["landmarks.npz"])
            if landmarks["face_box"].shape[0] != total:
                raise ValueError(f"{landmarks['face_box'].shape[0]} frames of landmarks")
        except Exception as e:
            raise SampleError("unreadable_landmarks", f"{key}: landmarks.npz unusable ({e.__class__.__name__}: {e})") from None
    f, h, w = frames.shape[:3]
    n = f if num_frames is None else int(num_frames)
    if f != total or (n - 1) % 4 or masks.shape != (f, h, w):
        raise SampleError(
            "frame_count", f"{key}: {f} decoded frames of {h}×{w}, json num_frames={total}, lip masks "
            f"{masks.shape}, window {n}; frames must be 4k+1 and agree"
        )
    if not 0 <= start <= f - n:
        raise SampleError("too_short", f"{key}: {f} frames hold no {n}-frame window at frame {start}")
    if audio.ndim != 1:
        raise SampleError("short_audio", f"{key}: audio of shape {audio.shape} is not mono")
    try:
        clip_audio = clip_audio_window(audio, start, n, fps)
    except ValueError as e:
        raise SampleError("short_audio", f"{key}: {e}") from None

    ref_box = meta.get("face_box")
    if landmarks is not None and bool(landmarks["face_found"][start]):
        ref_box = [float(v) for v in landmarks["face_box"][start]]
    if buckets:
        size = nearest_bucket(h, w, buckets)
    geo = plan_geometry(h, w, size, size_multiple, crop, ref_box)
    out_frames, out_masks = apply_geometry(frames[start : start + n], masks[start : start + n], geo)
    omega_l_raw, omega_b_raw = (meta.get("omega_l_raw"), meta.get("omega_b_raw"))
    if motion_from == "window" and n != f:
        omega_l_raw, omega_b_raw = window_motion(landmarks, meta, start, n, w, h)
    caption = meta.get("caption") or default_caption
    record = {
        "fps": fps,
        "num_frames": n,
        "height": geo.out_height,
        "width": geo.out_width,
        "caption": caption,
        "source": meta.get("source"),
        "clip_index": meta.get("clip_index"),
        "start_s": meta.get("start_s"),
        "start_frame": start,
        "omega_l_raw": omega_l_raw,
        "omega_b_raw": omega_b_raw,
        "crop": [geo.top, geo.left],  # pixel offset of the source window in the raw clip
        "crop_size": [geo.height, geo.width],  # source window size (≠ height/width when resized)
    }
    if "face_box" in meta:
        record["face_box"] = geo.box(meta["face_box"])  # the clip's median face box
    return RawClip(
        key=key,
        frames=out_frames,
        audio=clip_audio,
        masks=out_masks,
        caption=caption,
        fps=fps,
        start=start,
        face_box=geo.box(ref_box) if ref_box is not None else None,
        omega_l=normalise_motion(omega_l_raw, stats["omega_l"]),
        omega_b=normalise_motion(omega_b_raw, stats["omega_b"]),
        meta=record,
    )


def encode_raw_clips(encoders, clips: dict[str, Any], lip_mask_resize: str, face: str, face_margin: float) -> list[dict[str, Any]]:
    """Collated raw clips → training samples (the :func:`~ft_train.data.schema.training_sample` layout).

    ``clips`` holds ``frames`` (B, F, H, W, 3) uint8, ``audio`` (B, N) float, ``lip_masks``
    (B, F, H, W) uint8, ``face_box`` (B, 4) (NaN = none), ``motion`` (B, 2), ``fps`` (B,),
    ``start_frame`` (B,), ``caption`` and ``__key__`` (B strings), as :func:`clip_tensors` makes
    them. ``face`` is the face form (:data:`~ft_train.data.clip_prep.FACE_FORMS`). Samples keep
    ``__key__`` and ``start_frame`` (the window's first frame in the raw clip).
    """
    from .clip_prep import encode_clips

    boxes = None
    if face != "none":
        boxes = [None if bool(torch.isnan(b).any()) else b.tolist() for b in clips["face_box"].cpu()]
    out = encode_clips(encoders, clips["frames"], list(clips["audio"]), clips["lip_masks"], list(clips["caption"]),
                       lip_mask_resize, face_boxes=boxes, face_margin=face_margin, face=face)
    samples = []
    for i, key in enumerate(clips["__key__"]):
        arrays = {name: value[i] for name, value in out.items()}
        fps, motion = float(clips["fps"][i]), clips["motion"][i].tolist()
        meta = {"num_frames": int(clips["frames"].shape[1]), "fps": fps, "omega_l": motion[0], "omega_b": motion[1]}
        sample = training_sample(arrays, meta, key)
        sample["__key__"] = key
        sample["start_frame"] = torch.tensor(int(clips["start_frame"][i]))
        samples.append(sample)
    return samples


def clip_tensors(clip: RawClip) -> dict[str, Any]:
    """A :class:`RawClip` as the tensors a DataLoader collates (see :func:`encode_raw_clips`)."""
    box = clip.face_box if clip.face_box is not None else [float("nan")] * 4
    return {
        "__key__": clip.key,
        "frames": torch.from_numpy(clip.frames),
        "audio": torch.from_numpy(clip.audio),
        "lip_masks": torch.from_numpy(clip.masks),
        "caption": clip.caption,
        "face_box": torch.tensor(box, dtype=torch.float32),
        "motion": torch.tensor([clip.omega_l, clip.omega_b], dtype=torch.float32),
        "fps": torch.tensor(clip.fps, dtype=torch.float32),
        "start_frame": torch.tensor(clip.start),
    }


# --------------------------------------------------------------------------------------------
# pipeline stages


class WindowSampler:
    """Pipeline stage: check a raw sample's metadata and draw its window start (``__start__``).

    The start is uniform over the clip's windows, from a generator seeded with (seed, CRC32 of
    the sample key, number of samples this stream has seen), so it is a pure function of the
    stream: a resumed run draws exactly the starts the uninterrupted run drew, and each visit of
    a clip gets a new window. Rejected samples go to ``handler`` (counted, logged).
    """

    def __init__(self, num_frames: int, seed: int, handler):
        self.num_frames = num_frames
        self.seed = seed
        self.handler = handler
        self.visits = 0  # per worker process (each worker has its own copy)

    def __call__(self, src):
        for raw in src:
            visit = self.visits
            self.visits += 1
            key = str(raw.get("__key__", ""))
            try:
                total = int(read_meta(raw)["num_frames"])
                if total < self.num_frames:
                    raise SampleError("too_short", f"{key}: {total} frames, fewer than data.num_frames={self.num_frames}")
            except SampleError as e:
                if self.handler(e):
                    continue
                raise
            rng = np.random.default_rng([self.seed, zlib.crc32(key.encode()), visit])
            raw["__start__"] = int(rng.integers(0, total - self.num_frames + 1))
            yield raw


class ClipLoader:
    """Pipeline map: a sampled raw sample → :func:`clip_tensors` of its window (:func:`load_clip`)."""

    def __init__(self, stats: dict, num_frames: int, size, crop: str, motion_from: str, default_caption: str,
                 buckets=None):
        self.stats, self.num_frames, self.size, self.buckets = stats, num_frames, size, buckets
        self.crop, self.motion_from, self.default_caption = crop, motion_from, default_caption

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        clip = load_clip(raw, self.stats, start=raw["__start__"], num_frames=self.num_frames, size=self.size,
                         crop=self.crop, motion_from=self.motion_from, default_caption=self.default_caption,
                         buckets=self.buckets)
        return clip_tensors(clip)


class WorkerEncoder:
    """Pipeline map (``encode_on=worker``): one clip's tensors → its training sample, on CPU.

    The encoders are loaded on first use inside each worker process (never pickled with the
    dataset), then kept for the life of the worker (the loader's workers are persistent).
    """

    def __init__(self, wan, wav2vec, dtype: str, vae_dtype: str, lip_mask_resize: str, face: str, face_margin: float):
        self.spec = dict(wan=wan, wav2vec=wav2vec, dtype=dtype, vae_dtype=vae_dtype)
        self.lip_mask_resize, self.face, self.face_margin = lip_mask_resize, face, face_margin
        self.encoders = None

    def __getstate__(self):
        return {**self.__dict__, "encoders": None}

    def __call__(self, clip: dict[str, Any]) -> dict[str, Any]:
        from ..models.encoders import load_encoders

        if self.encoders is None:
            s = self.spec
            self.encoders = load_encoders(s["wan"], s["wav2vec"], device="cpu", dtype=s["dtype"],
                                          vae_dtype=s["vae_dtype"], key="data.encoders")
        batch = collate_samples([clip])
        return encode_raw_clips(self.encoders, batch, self.lip_mask_resize, self.face, self.face_margin)[0]


def first_sample(url: str) -> tuple[set[str], dict[str, Any] | None]:
    """Member suffixes and json of a shard's first sample, read with tarfile (nothing decoded)."""
    members: set[str] = set()
    meta = None
    first = None
    with tarfile.open(url) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = Path(member.name).name.partition(".")
            first = key if first is None else first
            if key != first:
                break
            members.add(suffix)
            if suffix == "json":
                meta = json.load(io.BytesIO(tar.extractfile(member).read()))
    return members, meta


# --------------------------------------------------------------------------------------------
# the datamodule


class RawShardDataModule(LatentShardDataModule):
    """Training batches from raw ``ft-prep`` shards, encoded on the fly (module docstring).

    Same sharding, shuffling, resume and skip accounting as :class:`LatentShardDataModule`, and
    the same batch layout, plus ``start_frame`` (B,): each window's first frame in its raw clip.

    Args:
        shards: raw shard folder, brace pattern, glob, or a list of them (``ft-prep`` output).
        encoders: ``{"wan": <diffusers Wan2.1 I2V folder>, "wav2vec": <wav2vec2 folder>}``, as
            ``conf/encode.yaml``'s ``encoders``.
        stats: the ``stats.json`` that normalises ω (None = the one beside the shards).
        num_frames: frames per training window, 4k+1.
        height, width: training resolution in pixels, multiples of 16 (VAE stride 8 × DiT patch
            2); None for both = each clip's own size cut to multiples of 16 (batches then need
            equally sized clips, e.g. ``batch_size=1``).
        buckets: aspect-ratio buckets, a list of ``[H, W]`` (multiples of 16): each clip trains at
            the one nearest its aspect ratio (:func:`nearest_bucket`), replacing height/width. A
            batch holds one size, so several buckets need ``batch_size=1``.
        crop: ``face`` (default; the window follows the face when the aspect changes) or ``center``.
        motion_from: ``window`` (ω over the window's frames) or ``clip`` (the clip's json values).
        encode_on: ``auto`` / ``worker`` / ``device``, see the module docstring.
        dtype, vae_dtype: encoder weights (``auto`` = bfloat16 on CUDA, float32 on CPU; VAE float32).
        lip_mask_resize: ``trilinear`` (paper) or ``area``, as the encode pass.
        face: what the batch's ``face`` (the identity branch's input) holds, from the reference
            frame's face crop: ``clip`` (default) its CLIP tokens, for
            ``model.identity.encoder=precomputed``; ``pixels`` the crop itself, float
            (3, 112, 112) in [-1, 1], for ``model.identity.encoder=arcface``; ``none`` no ``face``
            (``true`` / ``false`` read as ``clip`` / ``none``).
        face_margin: context around the face box (:func:`ft_train.data.clip_prep.face_crop_box`).
        default_caption: prompt for clips without a caption.
        batch_size, num_workers, shuffle_buffer, seed: as :class:`LatentShardDataModule`.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        encoders: dict[str, Any],
        stats: str | None = None,
        num_frames: int = 81,
        height: int | None = 512,
        width: int | None = 512,
        buckets: Sequence[Sequence[int]] | None = None,
        crop: str = "face",
        motion_from: str = "window",
        encode_on: str = "auto",
        dtype: str = "auto",
        vae_dtype: str = "float32",
        lip_mask_resize: str = "trilinear",
        face: str = "clip",
        face_margin: float = 0.2,
        default_caption: str = "",
        **kwargs: Any,
    ):
        from ..models.encoders import check_encoder_paths
        from .clip_prep import LIP_MASK_RESIZE, face_form

        super().__init__(shards=shards, **kwargs)
        encoders = dict(encoders or {})
        problems = []
        unknown = sorted(set(encoders) - {"wan", "wav2vec"})
        if unknown:
            problems.append(f"data.encoders.{unknown[0]} is not an option (data.encoders.wan, data.encoders.wav2vec)")
        if num_frames < 1 or (num_frames - 1) % 4:
            problems.append(f"data.num_frames={num_frames} must be 4k+1 (e.g. 81)")
        if (height is None) != (width is None):
            problems.append("data.height and data.width must both be set or both be null")
        elif height is not None and (height < 16 or width < 16 or height % 16 or width % 16):
            problems.append(f"data.height={height}, data.width={width} must be multiples of 16 (VAE stride 8 × DiT patch 2)")
        try:
            buckets = check_buckets(buckets, "data.buckets")
        except ValueError as e:
            problems.append(str(e))
            buckets = None
        if buckets and len(set(buckets)) > 1 and int(kwargs.get("batch_size", 1)) > 1:
            problems.append(f"data.buckets holds {len(set(buckets))} sizes but data.batch_size={kwargs['batch_size']}: "
                            "a batch holds one size, so use data.batch_size=1 (or one bucket)")
        for key, value, allowed in (("crop", crop, CROP_MODES), ("motion_from", motion_from, MOTION_FROM),
                                    ("encode_on", encode_on, ENCODE_ON), ("lip_mask_resize", lip_mask_resize, LIP_MASK_RESIZE)):
            if value not in allowed:
                problems.append(f"data.{key}={value!r} must be one of {', '.join(allowed)}")
        for key, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
            if value not in ("auto", "float32", "bfloat16", "float16"):
                problems.append(f"data.{key}={value!r} must be auto, float32, bfloat16 or float16")
        if face_margin < 0:
            problems.append(f"data.face_margin={face_margin} must be >= 0")
        try:
            face = face_form(face, "data.face")
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))
        check_encoder_paths(encoders.get("wan"), encoders.get("wav2vec"), key="data.encoders")
        self.encoder_paths = encoders
        self.stats_path = stats
        self.num_frames = int(num_frames)
        self.size = None if height is None else (int(height), int(width))
        self.buckets = buckets
        self.crop, self.motion_from, self.encode_on = crop, motion_from, encode_on
        self.dtype, self.vae_dtype = dtype, vae_dtype
        self.lip_mask_resize, self.face, self.face_margin = lip_mask_resize, face, float(face_margin)
        self.default_caption = default_caption
        self.encoders = None  # encode_on=device: loaded on the training device in setup()

    # -- where the encoders run ----------------------------------------------------------------
    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def resolved_encode_on(self) -> str:
        if self.encode_on != "auto":
            return self.encode_on
        return "device" if self._device().type == "cuda" else "worker"

    def _dtype(self, device: torch.device) -> str:
        return self.dtype if self.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")

    def load_stats(self, urls: list[str]) -> dict:
        path = Path(self.stats_path) if self.stats_path else Path(urls[0]).parent / "stats.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"data.stats: no ω statistics at {path}; run `ft-prep ... mode=merge` on the raw shards or point data.stats at their stats.json"
            )
        return json.loads(path.read_text())

    def setup(self, stage: str | None = None) -> None:
        """Check the data against the config, load the encoders where they run, and embed the
        empty prompt for text dropout (the loss reads ``null_text`` at the start of fit)."""
        from ..models.encoders import load_encoders, load_text_encoder

        urls = resolve_shards(self.shards)
        self.load_stats(urls)
        members, meta = first_sample(urls[0])
        if members and "mp4" not in members:
            hint = "; these are latent shards: use data=latent" if "latents.npy" in members else ""
            raise ValueError(f"data.shards: {urls[0]} holds no ft-prep raw samples (no mp4 member){hint}")
        if meta is not None and int(meta.get("num_frames", self.num_frames)) < self.num_frames:
            raise ValueError(
                f"data.num_frames={self.num_frames}: the raw clips have {meta['num_frames']} frames "
                f"({urls[0]}); lower data.num_frames or re-run ft-prep with num_frames >= {self.num_frames}"
            )
        device = self._device()
        wan, wav2vec = self.encoder_paths.get("wan"), self.encoder_paths.get("wav2vec")
        if self.resolved_encode_on() == "device":
            if self.encoders is None:
                self.encoders = load_encoders(wan, wav2vec, device=device, dtype=self._dtype(device),
                                              vae_dtype=self.vae_dtype, key="data.encoders")
            text = self.encoders.text
        else:
            text = load_text_encoder(wan, "cpu", self._dtype(torch.device("cpu")), key="data.encoders.wan")
        self.null_text = text([""])[0].float().cpu()

    def load_null_text(self, urls: list[str]) -> None:
        """Raw shards carry no ``null_text.npy``: :meth:`setup` embeds the empty prompt instead."""

    # -- the pipeline --------------------------------------------------------------------------
    def samples(self, ds: wds.WebDataset, skip: ResumeSkip | None) -> wds.WebDataset:
        """Raw members → (encoded) clips; windows are drawn before the resume skip, media decoded after."""
        urls = resolve_shards(self.shards)
        ds = ds.compose(WindowSampler(self.num_frames, self.seed, self.skips))
        if skip is not None:
            ds = ds.compose(skip)
        loader = ClipLoader(self.load_stats(urls), self.num_frames, self.size, self.crop, self.motion_from,
                            self.default_caption, buckets=self.buckets)
        ds = ds.map(loader, handler=self.skips)
        if self.resolved_encode_on() == "worker":
            encoder = WorkerEncoder(self.encoder_paths.get("wan"), self.encoder_paths.get("wav2vec"),
                                    self._dtype(torch.device("cpu")), self.vae_dtype, self.lip_mask_resize,
                                    self.face, self.face_margin)
            ds = ds.map(encoder, handler=self.skips)
        return ds

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``encode_on=device``: encode the batch of clips on the training device (runs after the
        batch reached it, before the training step)."""
        if not isinstance(batch, dict) or "frames" not in batch:
            return batch
        if self.encoders is None:
            self.setup("fit")
        samples = encode_raw_clips(self.encoders, batch, self.lip_mask_resize, self.face, self.face_margin)
        device = batch["frames"].device
        out = collate_samples(samples)
        if "skipped" in batch:  # the loader workers' skip counts (Endless), for the training loop
            out["skipped"] = batch["skipped"]
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


__all__ = [
    "RAW_MEMBERS",
    "RAW_REJECT_REASONS",
    "RawClip",
    "RawShardDataModule",
    "SampleError",
    "load_clip",
    "plan_geometry",
]
