"""Face tracks for Sync-C/D, by the rules of syncnet_python's ``run_pipeline.py``.

The reference scores face tracks, not frames: it detects faces in every 25 fps frame (S3FD), links
detections into tracks by IoU, keeps tracks that are long enough and large enough, fills gaps by
linear interpolation, then crops each track around its median-smoothed box
(:func:`ft_train.metrics.sync.syncnet_face_crops`) and scores each crop video on its own audio span.

Rules reproduced (values are the reference's defaults, all configurable):

* a detection joins the current track when it is at most ``num_failed_det`` (25) frames after the
  track's last detection and overlaps that box with IoU > ``iou`` (0.5); a longer gap ends it;
* tracks are built greedily, one after another, from the detections not used yet;
* a track is kept when it has more than ``min_track`` (100) detections and its mean box width or
  height, after interpolation, exceeds ``min_face_size`` (100) pixels;
* the video is first split into shots; a shot shorter than ``min_track`` frames yields no track,
  and no track crosses a cut.

Differences from the reference, on purpose or by necessity:

* **Detector**: mediapipe's face detector (full-range model, in the wheel) stands in for S3FD,
  whose weights are a separate download with no maintained package. Its boxes are tighter than
  S3FD's (eyebrows to chin rather than forehead to chin), so the 0.4-scaled crop sits a little
  lower and closer; ``min_confidence`` is mediapipe's score, not S3FD's 0.9.
* **Shot detection**: FFmpeg's scene-change score (``ft_train.data.shots``, ``scene_threshold``)
  stands in for PySceneDetect's content detector (its wheel needs a second OpenCV); both threshold a
  frame-to-frame content difference, on different scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.interpolate


@dataclass
class TrackRules:
    """``run_pipeline.py``'s tracking options (reference defaults)."""

    min_track: int = 100  # keep tracks with more than this many detections (frames at 25 fps)
    min_face_size: float = 100.0  # mean box width or height, pixels
    num_failed_det: int = 25  # frames without a matching detection before a track ends
    iou: float = 0.5  # minimum IoU between consecutive detections of a track
    crop_scale: float = 0.4  # crop_video's cs
    min_confidence: float = 0.5  # detector score (mediapipe's scale)
    scene_threshold: float = 0.3  # FFmpeg scene score that starts a new shot; 0 = the video is one shot

    def __post_init__(self):
        if int(self.min_track) < 0 or self.min_face_size < 0 or int(self.num_failed_det) < 1:
            raise ValueError(
                f"face-track rules: min_track ({self.min_track}) and min_face_size ({self.min_face_size}) must be "
                f">= 0 and num_failed_det ({self.num_failed_det}) >= 1"
            )
        if not 0.0 <= self.iou < 1.0 or not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"face-track rules: iou ({self.iou}) must be in [0, 1), min_confidence in [0, 1]")
        if not 0.0 <= self.scene_threshold <= 1.0:
            raise ValueError(f"face-track rules: scene_threshold ({self.scene_threshold}) must be in [0, 1] (0 = no shots)")


@dataclass
class FaceTrack:
    """One track: consecutive frame indices ``(n,)`` and interpolated boxes ``(n, 4)`` x1, y1, x2, y2 pixels."""

    frames: np.ndarray
    boxes: np.ndarray


def box_iou(a, b) -> float:
    """IoU of two ``x1, y1, x2, y2`` boxes (``bb_intersection_over_union``)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def build_tracks(detections: list[np.ndarray], rules: TrackRules = TrackRules()) -> list[FaceTrack]:
    """Face tracks from per-frame detections (``(n_t, ≥4)`` boxes per frame), by ``track_shot``'s rules.

    The whole list is one shot: fewer than ``min_track`` frames give no track.
    """
    if len(detections) < rules.min_track:
        return []
    left = [[np.asarray(d[:4], dtype=np.float64) for d in np.asarray(f, dtype=np.float64)] for f in detections]
    tracks: list[FaceTrack] = []
    while True:
        frames: list[int] = []
        boxes: list[np.ndarray] = []
        for t, faces in enumerate(left):
            if not faces:
                continue
            if not frames:
                frames.append(t)
                boxes.append(faces.pop(0))
                continue
            if t - frames[-1] > rules.num_failed_det:
                break
            ious = [box_iou(f, boxes[-1]) for f in faces]
            best = int(np.argmax(ious))
            if ious[best] > rules.iou:
                frames.append(t)
                boxes.append(faces.pop(best))
        if not frames:
            return tracks
        if len(frames) <= rules.min_track:
            continue
        fr = np.asarray(frames)
        bx = np.stack(boxes)
        span = np.arange(fr[0], fr[-1] + 1)
        interp = np.stack([scipy.interpolate.interp1d(fr, bx[:, k])(span) for k in range(4)], axis=1)
        size = max(np.mean(interp[:, 2] - interp[:, 0]), np.mean(interp[:, 3] - interp[:, 1]))
        if size > rules.min_face_size:
            tracks.append(FaceTrack(span, interp))


def shot_bounds(frames: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """``[start, end)`` frame ranges of the shots in ``(T, H, W, 3)`` uint8 RGB frames; one shot when
    ``threshold`` is 0."""
    if threshold <= 0 or len(frames) == 0:
        return [(0, len(frames))]
    from ..data.shots import ShotCuts

    detect = ShotCuts(threshold, downscale=2)
    starts = [0] + [t for t, frame in enumerate(frames) if detect(frame) and t > 0]
    return list(zip(starts, starts[1:] + [len(frames)]))


def face_tracks(frames: np.ndarray, rules: TrackRules = TrackRules()) -> list[FaceTrack]:
    """Detect faces in ``(T, H, W, 3)`` uint8 RGB frames (25 fps) with mediapipe and build tracks,
    shot by shot (a track never crosses a cut)."""
    from ..data.face import detect_face_boxes

    if len(frames) < rules.min_track:
        return []
    detections = detect_face_boxes(frames, min_confidence=rules.min_confidence)
    tracks = []
    for start, end in shot_bounds(frames, rules.scene_threshold):
        for track in build_tracks(detections[start:end], rules):
            tracks.append(FaceTrack(track.frames + start, track.boxes))
    return tracks


__all__ = ["FaceTrack", "TrackRules", "box_iou", "build_tracks", "face_tracks", "shot_bounds"]
