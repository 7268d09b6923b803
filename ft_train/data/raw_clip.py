"""One raw ``ft-prep`` sample → a decoded clip, cut to a window and fitted to the training size.

Shared by raw-mode training (:mod:`ft_train.data.raw`) and the latent-cache pass
(``ft-prep task=encode``), so both read a clip the same way. Rejects raise :class:`SampleError`
with a reason of :data:`RAW_REJECT_REASONS`, which the callers count.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

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
    0–255; ``reference`` the reference frame's index; ``face_box`` its face box in output pixels, or None;
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
    reference: int = 0  # the reference (image-condition) frame's index in ``frames``


def window_motion(landmarks: dict[str, np.ndarray] | None, meta: dict, start: int, num_frames: int, width: int, height: int):
    """Raw (ω_l, ω_b) of frames ``start … start+num_frames−1``, by ``ft-prep``'s own functions
    (:mod:`ft_train.data.face`) over the stored landmarks and pose; the clip's json values when
    the sample has no landmarks.

    ω_b stays the clip's when ft-prep ran pose on a few samples per clip (the json's
    ``pose_schedule`` is ``samples:N``): a window would hold only two or three of them, too few
    for a variance, and a rule by count would give windows of one dataset different estimators.
    ω_l (face mesh on every frame) is always the window's own."""
    if landmarks is None:
        return meta.get("omega_l_raw"), meta.get("omega_b_raw")
    from .face import body_motion, landmark_motion

    sl = slice(start, start + num_frames)
    omega_l = landmark_motion(landmarks["face"][sl], landmarks["face_found"][sl])
    if str(meta.get("pose_schedule", "")).startswith("samples:"):
        return omega_l, meta.get("omega_b_raw")
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

    # The reference image: ft-prep's reference_frame (a frame with the face, not dark or blurred)
    # when the window holds it, else the window's first frame past it (a window starting later
    # is past a fade-in already); clips from before the key existed: the window's first frame.
    reference = min(max(int(meta.get("reference_frame", 0)) - start, 0), n - 1)
    ref_box = meta.get("face_box")
    if landmarks is not None and bool(landmarks["face_found"][start + reference]):
        ref_box = [float(v) for v in landmarks["face_box"][start + reference]]
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
        "reference_frame": reference,  # in the window
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
        reference=reference,
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
                       lip_mask_resize, face_boxes=boxes, face_margin=face_margin, face=face,
                       reference=clips["reference"].tolist() if "reference" in clips else None)
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
        "reference": torch.tensor(clip.reference),
    }
