"""Talking videos longer than one window: the speech in overlapping segments.

The model was trained on single windows (81 frames at most) that start from one known frame, so a
long speech is sampled window by window. In ``continue`` mode each segment after the first holds
the last ``overlap_frames`` frames of the one before as known frames of its I2V condition (the
condition latents and the mask), which carries the motion and the look across the seam; the
identity reference (CLIP image tokens, the identity branch's face) stays the original photo. In
``restart`` mode every segment starts from the photo, for comparison. Either way the frames both
segments cover are cross-faded, each segment hears the speech of its own absolute time, and only
one segment's tensors are alive at a time (the finished frames go to the caller's array).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger("ft_train.infer")

LONG_MODES = ("continue", "restart")  # the `long_mode` key
TEMPORAL_STRIDE = 4  # Wan VAE: the first frame alone, then 4 frames per latent frame


@dataclass(frozen=True)
class Segment:
    """One window of a long video: video frames ``start … start + frames − 1`` (absolute),
    of which the first ``overlap`` are also the previous segment's last ones."""

    start: int
    frames: int
    overlap: int


def check_long_form(segment_frames: Any, overlap_frames: Any, max_seconds: Any, long_mode: Any,
                    prefix: str = "") -> None:
    """The long-form keys, checked before anything loads (one line naming the key, after
    ``prefix``: ``callbacks.validation.`` for validation's copy of them). ``segment_frames`` None
    (validation: the clips' own length, known once they are read) skips the checks that need it."""
    if segment_frames is not None and (isinstance(segment_frames, bool) or not isinstance(segment_frames, int)
                                       or segment_frames < 5 or (segment_frames - 1) % TEMPORAL_STRIDE):
        raise ValueError(
            f"{prefix}segment_frames: must be 4k+1 and >= 5 (e.g. 81, 49) for the Wan VAE's temporal stride 4, "
            f"got {segment_frames!r}"
        )
    if isinstance(overlap_frames, bool) or not isinstance(overlap_frames, int) or overlap_frames < 1 \
            or (overlap_frames - 1) % TEMPORAL_STRIDE or (segment_frames is not None and overlap_frames >= segment_frames):
        raise ValueError(
            f"{prefix}overlap_frames: must be 4m+1 (1, 5, 9, ...) and below segment_frames={segment_frames}, got "
            f"{overlap_frames!r}: the Wan VAE encodes the first frame alone and then 4 frames per latent frame, "
            "so only 4m+1 known frames fill whole latent frames of the condition"
        )
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not max_seconds > 0:
        raise ValueError(f"{prefix}max_seconds: must be a number of seconds > 0, got {max_seconds!r}")
    if long_mode not in LONG_MODES:
        raise ValueError(
            f"{prefix}long_mode: must be continue (each segment starts from the last frames of the one before) or "
            f"restart (each segment starts from the photo), got {long_mode!r}"
        )


def check_duration(seconds: float, max_seconds: float, source: Any, prefix: str = "") -> None:
    """Refuse speech longer than ``max_seconds`` (``source``: the file or clip it came from)."""
    if seconds > max_seconds:
        raise ValueError(
            f"{prefix}max_seconds: {source} lasts {seconds:.1f} s, longer than max_seconds={max_seconds:g}; "
            "raise max_seconds (sampling time grows linearly with the speech) or cut the speech"
        )


def plan_for_speech(seconds: float, fps: float, segment_frames: int, overlap_frames: int) -> list["Segment"]:
    """The segments of a video of ``seconds`` of speech at ``fps``: the shortest 4k+1 frame count
    that covers it (:func:`~ft_train.inference.inputs.frames_for_audio`), planned by :func:`plan_segments`."""
    import sys

    from .inputs import frames_for_audio

    return plan_segments(frames_for_audio(seconds, fps, max_frames=sys.maxsize), segment_frames, overlap_frames)


def plan_segments(total_frames: int, segment_frames: int, overlap_frames: int) -> list[Segment]:
    """The segments that cover ``total_frames`` (4k+1) video frames: windows of ``segment_frames``
    every ``segment_frames − overlap_frames`` frames, the last one cut to end at the video's end
    (still 4k+1 and longer than the overlap, since every start is a multiple of 4)."""
    if total_frames <= segment_frames:
        return [Segment(0, total_frames, 0)]
    stride = segment_frames - overlap_frames
    starts = [0]
    while starts[-1] + segment_frames < total_frames:
        starts.append(starts[-1] + stride)
    return [Segment(s, min(segment_frames, total_frames - s), 0 if i == 0 else overlap_frames)
            for i, s in enumerate(starts)]


def known_frames_mask(num_frames: int, known: int, height: int, width: int, device=None) -> torch.Tensor:
    """The I2V condition mask ``(1, 4, F_lat, height, width)`` for a window whose first ``known``
    video frames are given, built as Wan's I2V code builds its first-frame mask: one value per
    video frame (1 = known), the first frame repeated 4×, every 4 consecutive values folded into
    the 4 channels of a latent frame. ``known = 1`` is Wan's own mask; ``known = 4m+1`` gives
    latent frames 0 … m all ones (other counts would leave a latent frame partly known).
    """
    per_frame = torch.zeros(num_frames, height, width, device=device)
    per_frame[:known] = 1
    per_frame = torch.cat([per_frame[:1].expand(TEMPORAL_STRIDE, -1, -1), per_frame[1:]])
    return per_frame.view(-1, TEMPORAL_STRIDE, height, width).transpose(0, 1)[None].contiguous()


def blend_weights(overlap: int) -> np.ndarray:
    """Weight of the newer segment on each of the ``overlap`` shared frames: a linear cross-fade
    ``(i + 1) / (overlap + 1)`` that never takes either segment whole."""
    return (np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1))


def segment_audio(speech: np.ndarray, plan: list[Segment], fps: float) -> Callable[[Segment], np.ndarray]:
    """Per segment, the speech of its absolute time: from sample ``round(start / fps · 16000)``,
    :func:`~ft_train.data.clip_prep.clip_audio_samples` long (the cut the training clips got,
    :func:`~ft_train.data.clip_prep.clip_audio_window`), silence past the speech's end."""
    from ..data.clip_prep import clip_audio_samples, clip_audio_window
    from ..media import AUDIO_RATE
    from .inputs import fit_waveform

    need = max(int(round(s.start / fps * AUDIO_RATE)) + clip_audio_samples(s.frames, fps) for s in plan)
    padded = fit_waveform(np.asarray(speech, dtype=np.float32), max(need, len(speech)))
    return lambda s: clip_audio_window(padded, s.start, s.frames, fps)


def to_known(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames ``(K, H, W, 3)`` → ``(K, 3, H, W)`` float in [-1, 1] (as the photo is read)."""
    return frames.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def generate_long(pipe, cond, speech: np.ndarray, fps: float, plan: list[Segment], out: np.ndarray, *,
                  mode: str = "continue", seed: int = 0, progress: bool = False) -> list[float]:
    """Sample ``plan``'s segments one after another into ``out``.

    Args:
        pipe: a :class:`~ft_train.inference.pipeline.TalkingPortraitPipeline`.
        cond: its :meth:`~ft_train.inference.pipeline.TalkingPortraitPipeline.conditions` of the
            photo, shared by every segment.
        speech: the whole speech, mono float32 ``(N,)`` at 16 kHz, starting at frame 0's time.
        fps: frames per second.
        plan: :func:`plan_segments`.
        out: writable uint8 ``(T, H, W, 3)`` with T = the plan's last frame + 1 (e.g. a memory-mapped
            file, so a long video does not stay in memory).
        mode: ``continue`` (known frames from the previous segment) or ``restart`` (the photo).
        seed: segment k draws its noise from ``seed + k``.
        progress: a bar over the segments (and each segment's bar over its steps).
    Returns:
        wall seconds per segment.
    """
    if mode not in LONG_MODES:
        raise ValueError(f"long_mode: must be one of {LONG_MODES}, got {mode!r}")
    audio_of = segment_audio(speech, plan, fps)
    seconds = []
    tail = None  # the previous segment's last frames (uint8, a copy: not a view of its whole clip)
    bar = tqdm(total=len(plan), unit="segment", desc="segments", disable=not progress, dynamic_ncols=True)
    try:
        for k, seg in enumerate(plan):
            started = time.perf_counter()
            known = None
            if mode == "continue" and k > 0:
                known = to_known(tail[-seg.overlap:])
            frames = pipe.segment(cond, audio_of(seg), seg.frames, known=known, seed=seed + k, progress=progress)
            if k + 1 < len(plan):
                tail = frames[-plan[k + 1].overlap:].clone()
            frames = frames.numpy()
            end = seg.start + seg.frames
            if seg.overlap:
                w = blend_weights(seg.overlap)[:, None, None, None]
                shared = slice(seg.start, seg.start + seg.overlap)
                mixed = (1.0 - w) * out[shared].astype(np.float32) + w * frames[: seg.overlap].astype(np.float32)
                out[shared] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
            out[seg.start + seg.overlap: end] = frames[seg.overlap:]
            del frames, known
            seconds.append(time.perf_counter() - started)
            bar.update(1)
    finally:
        bar.close()
    return seconds


__all__ = ["LONG_MODES", "Segment", "blend_weights", "check_duration", "check_long_form", "generate_long",
           "known_frames_mask", "plan_for_speech", "plan_segments", "segment_audio"]
