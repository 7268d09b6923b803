"""Sync-C / Sync-D (a.k.a. LSE-C / LSE-D): SyncNet audio-visual offset search, as the reference scorer.

Protocol, from joonson/syncnet_python ``SyncNetInstance.evaluate`` / ``calc_pdist`` (the scorer
that Hallo, Wav2Lip and LatentSync copy):

1. Video at **25 fps**, face crops resized to 224×224, BGR, float 0…255 (no normalisation).
   Audio at 16 kHz mono, int16 scale → MFCC at 100 Hz (:func:`ft_train.metrics.mfcc.syncnet_mfcc`).
2. ``min_length = min(frames, samples // 640)``; windows v = 0 … min_length − 6 (the reference's
   ``range(0, min_length − 5)`` leaves out the last full window; kept for parity). Window v sees
   frames [v, v+5) and MFCC steps [4v, 4v+20).
3. Offset search: the audio embeddings are zero-padded by ``vshift`` (15) rows at both ends
   (unmasked, as the reference), and each window's lip embedding is compared by
   ``F.pairwise_distance`` (eps 1e-6) with audio windows i−15 … i+15. ``mean_dists`` = the mean
   over windows, per candidate (31 values).
4. ``min_dist = min(mean_dists)`` (**Sync-D**), ``confidence = median(mean_dists) − min_dist``
   (**Sync-C**), ``offset = vshift − argmin``: positive when the video lags the audio. Both
   scores are taken at the best offset, so a constant lag can still score well (as in papers).

Faces are scored per track, as ``run_pipeline.py`` builds and crops them (mediapipe's detector in
place of S3FD: :mod:`ft_train.metrics.facetrack`, :func:`syncnet_face_crops`); a video's number
is the mean over its tracks (the reference scores tracks one by one; LatentSync's evaluation
averages them per video, then over videos). In-memory
frames skip the reference's JPEG/XVID round trips, so numbers can differ slightly from the
ffmpeg-based scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import scipy.signal
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ft_train.metrics.audio import to_int16
from ft_train.metrics.base import FrozenNetMetric
from ft_train.metrics.facetrack import TrackRules, face_tracks
from ft_train.metrics.mfcc import SAMPLE_RATE, syncnet_mfcc
from ft_train.metrics.syncnet import load_syncnet

SYNC_FPS = 25
CROP_SIZE = 224
WINDOW_FRAMES = 5
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps
SAMPLES_PER_FRAME = SAMPLE_RATE // SYNC_FPS  # 640
DEFAULT_VSHIFT = 15


@dataclass
class SyncResult:
    """Scores of one video. ``offset`` in frames (> 0: video lags audio); distances in embedding units."""

    offset: int
    confidence: float
    min_dist: float
    num_windows: int
    mean_dists: Tensor  # (2·vshift + 1,)


def num_sync_windows(num_frames: int, num_samples: int) -> int:
    """Windows the reference scores: ``min(frames, samples // 640) − 5`` (≥ 0)."""
    return max(min(num_frames, num_samples // SAMPLES_PER_FRAME) - WINDOW_FRAMES, 0)


def offset_search(lip: Tensor, aud: Tensor, vshift: int = DEFAULT_VSHIFT) -> SyncResult:
    """``calc_pdist`` + scoring on per-window embeddings ``lip``, ``aud`` of shape ``(W, D)``.

    Candidate j compares lip window i with audio window i + j − vshift (zeros outside).
    """
    if lip.shape != aud.shape or lip.ndim != 2:
        raise ValueError(
            f"offset_search needs two (W, D) embeddings of equal shape, got {tuple(lip.shape)}, {tuple(aud.shape)}"
        )
    w = lip.shape[0]
    n_cand = 2 * vshift + 1
    aud_p = F.pad(aud, (0, 0, vshift, vshift))
    idx = torch.arange(w)[:, None] + torch.arange(n_cand)[None, :]  # (W, 2v+1)
    dists = F.pairwise_distance(lip[:, None, :].expand(w, n_cand, -1), aud_p[idx], eps=1e-6)
    mean_dists = dists.mean(0)
    min_dist, min_idx = torch.min(mean_dists, 0)
    # 2v+1 is odd, so torch's lower median is the exact median the reference computes
    conf = torch.median(mean_dists) - min_dist
    return SyncResult(
        offset=vshift - int(min_idx),
        confidence=float(conf),
        min_dist=float(min_dist),
        num_windows=w,
        mean_dists=mean_dists,
    )


def _to_bgr_224(frames: Tensor) -> Tensor:
    """uint8 RGB ``(T, 3, H, W)`` → float BGR ``(T, 3, 224, 224)`` 0…255."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"Sync expects uint8 RGB face crops (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
    x = frames.flip(1).float()
    if x.shape[-2:] != (CROP_SIZE, CROP_SIZE):
        # cv2.resize's default INTER_LINEAR (Wav2Lip/LatentSync "HARD CODED" resize) = bilinear, no antialias
        x = F.interpolate(x, size=(CROP_SIZE, CROP_SIZE), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def syncnet_embeddings(net: nn.Module, frames: Tensor, audio: Any, batch_size: int = 20) -> tuple[Tensor, Tensor]:
    """Per-window lip and audio embeddings ``(W, D)`` each, as the reference (W may be 0).

    Args:
        net: has ``forward_lip((N, 3, 5, 224, 224) BGR 0…255)`` and ``forward_aud((N, 1, 13, 20))``.
        frames: uint8 RGB face crops ``(T, 3, H, W)`` at 25 fps (resized to 224 here).
        audio: 16 kHz mono samples ``(N,)``, int16 values or float in [−1, 1] (rounded to int16
            as ffmpeg does, :func:`~ft_train.metrics.audio.to_int16`).
    """
    # int16 as ffmpeg rounds it: the reference's MFCC sees the wav's integer samples
    audio = to_int16(audio.detach().cpu().numpy() if isinstance(audio, Tensor) else audio)
    n_win = num_sync_windows(frames.shape[0], len(audio))
    mfcc = torch.from_numpy(syncnet_mfcc(audio)).float().T  # (13, Na)
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    video = _to_bgr_224(frames[: n_win + WINDOW_FRAMES - 1]).transpose(0, 1)  # (3, T, 224, 224)
    lips, auds = [], []
    for start in range(0, n_win, batch_size):
        vs = range(start, min(n_win, start + batch_size))
        lip_in = torch.stack([video[:, v : v + WINDOW_FRAMES] for v in vs])
        aud_in = torch.stack([mfcc[None, :, MFCC_PER_FRAME * v : MFCC_PER_FRAME * v + 20] for v in vs])
        lips.append(net.forward_lip(lip_in.to(device, dtype)).float().cpu())
        auds.append(net.forward_aud(aud_in.to(device, dtype)).float().cpu())
    if not lips:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    return torch.cat(lips), torch.cat(auds)


def sync_scores(net: nn.Module, frames: Tensor, audio: Any, vshift: int = DEFAULT_VSHIFT,
                batch_size: int = 20) -> SyncResult | None:
    """Score one clip (see :func:`syncnet_embeddings` for inputs); None if it has no full window."""
    lip, aud = syncnet_embeddings(net, frames, audio, batch_size=batch_size)
    if lip.shape[0] == 0:
        return None
    return offset_search(lip, aud, vshift=vshift)


def resample_fps(frames: Tensor, src_fps: float, dst_fps: float = SYNC_FPS) -> Tensor:
    """Nearest-frame resampling ``(T, ...)`` → ``(round(T·dst/src), ...)``.

    Output frame i shows input frame round(i·src/dst), like ffmpeg's ``-r 25`` (fps filter, round=near).

    The generator runs at 23 fps (FantasyTalking) while SyncNet assumes 25 fps.
    """
    if src_fps == dst_fps:
        return frames
    n_out = int(round(frames.shape[0] * dst_fps / src_fps))
    idx = torch.round(torch.arange(n_out, dtype=torch.float64) * src_fps / dst_fps).long()
    idx = idx.clamp_max(frames.shape[0] - 1)
    return frames[idx]


def syncnet_face_crops(frames: Tensor, boxes: Any, crop_scale: float = 0.4) -> Tensor:
    """Face crops as ``run_pipeline.py`` ``crop_video`` makes them, from per-frame face boxes.

    Half-size s = max(w, h)/2 and centre, each median-filtered over 13 frames; the frame is padded
    with grey 110 by ``int(s·(1+2·crop_scale))``; rows [cy − s, cy + s(1+2cs)), cols
    [cx − s(1+cs), cx + s(1+cs)) — a square shifted down over mouth and chin — resized to 224.

    Args:
        frames: uint8 RGB ``(T, 3, H, W)``.
        boxes: ``(T, 4)`` pixel boxes ``x1, y1, x2, y2`` (e.g. min/max of the face landmarks).
    Returns:
        uint8 RGB ``(T, 3, 224, 224)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape != (frames.shape[0], 4):
        raise ValueError(
            f"syncnet_face_crops: need one x1,y1,x2,y2 box per frame, got {boxes.shape} for {frames.shape[0]} frames"
        )
    s = scipy.signal.medfilt(np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2, kernel_size=13)
    cy = scipy.signal.medfilt((boxes[:, 1] + boxes[:, 3]) / 2, kernel_size=13)
    cx = scipy.signal.medfilt((boxes[:, 0] + boxes[:, 2]) / 2, kernel_size=13)
    cs = crop_scale
    out = []
    for t, img in enumerate(frames.permute(0, 2, 3, 1).cpu().numpy()):
        bs = s[t]
        bsi = int(bs * (1 + 2 * cs))
        padded = np.pad(img, ((bsi, bsi), (bsi, bsi), (0, 0)), "constant", constant_values=110)
        my, mx = cy[t] + bsi, cx[t] + bsi
        face = padded[int(my - bs) : int(my + bs * (1 + 2 * cs)), int(mx - bs * (1 + cs)) : int(mx + bs * (1 + cs))]
        out.append(cv2.resize(face, (CROP_SIZE, CROP_SIZE)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


SYNC_CROPS = ("face", "none")


def _mean_result(results: list[SyncResult]) -> SyncResult:
    """Per-video scores from per-track ones: the unweighted mean over tracks (LatentSync's eval)."""
    return SyncResult(
        offset=int(round(float(np.mean([r.offset for r in results])))),
        confidence=float(np.mean([r.confidence for r in results])),
        min_dist=float(np.mean([r.min_dist for r in results])),
        num_windows=sum(r.num_windows for r in results),
        mean_dists=torch.stack([r.mean_dists for r in results]).mean(0),
    )


def score_face_tracks(net: nn.Module, frames: Tensor, audio: Any, rules: TrackRules = TrackRules(),
                      vshift: int = DEFAULT_VSHIFT, batch_size: int = 20) -> tuple[list[SyncResult], int]:
    """Score every face track of one video, as ``run_pipeline.py`` + ``run_syncnet.py`` do.

    Args:
        frames: uint8 RGB ``(T, 3, H, W)`` at 25 fps (whole frames).
        audio: 16 kHz mono samples of the same span (int16 values, or float in [−1, 1]).
    Returns:
        ``(results, n_tracks)``: one :class:`SyncResult` per track long enough for a window, and
        the number of tracks found (0: no face track).
    """
    audio = to_int16(audio.detach().cpu().numpy() if isinstance(audio, Tensor) else audio)
    tracks = face_tracks(frames.permute(0, 2, 3, 1).cpu().numpy(), rules)
    results = []
    for tr in tracks:
        crops = syncnet_face_crops(frames[torch.from_numpy(tr.frames)], tr.boxes, crop_scale=rules.crop_scale)
        # the track's own audio span (crop_video: -ss frame0/25 -to (last+1)/25)
        span = audio[int(tr.frames[0]) * SAMPLES_PER_FRAME : (int(tr.frames[-1]) + 1) * SAMPLES_PER_FRAME]
        res = sync_scores(net, crops, span, vshift=vshift, batch_size=batch_size)
        if res is not None:
            results.append(res)
    return results, len(tracks)


class SyncMetric(FrozenNetMetric):
    """Mean Sync-C (confidence) and Sync-D (min distance) over videos, SyncNet ``syncnet_v2.model``.

    ``update(frames, audio)`` scores one video: uint8 RGB frames ``(T, 3, H, W)`` at 25 fps
    (:func:`resample_fps`) and its 16 kHz mono audio (int16, or float rounded to int16 as ffmpeg
    does). With ``crop="face"`` (default, the reference protocol) the frames are whole frames:
    faces are detected and tracked (:mod:`ft_train.metrics.facetrack`), each track is cropped and
    scored, and the video's score is the mean over its tracks; a video with no face track is
    counted in ``no_face``. With ``crop="none"`` the frames are taken as face crops as they are
    (pre-cropped videos; Wav2Lip's "direct" mode). Videos too short for one 5-frame window are
    counted in ``skipped``. Nothing counted is averaged in. States are sums
    (``dist_reduce_fx="sum"``), so the video mean is exact across ranks.

    ``compute()`` → dict of scalar tensors: ``sync_c``, ``sync_d``, ``av_offset`` (mean offset in
    frames), ``abs_av_offset``, ``videos``, ``skipped``, ``no_face``, ``tracks``. NaN scores if no
    video was scored.

    Args:
        weights: local path of ``syncnet_v2.model``; or pass ``net`` (anything with
            ``forward_lip``/``forward_aud``, e.g. a stand-in encoder in tests).
        vshift: offset search range ±frames (15 in every reference script).
        batch_size: windows per network call (speed only; BatchNorm is in eval mode).
        crop: ``face`` (track faces, the reference) or ``none`` (frames are already face crops).
        track: :class:`~ft_train.metrics.facetrack.TrackRules` or a dict of its fields.
    """

    is_differentiable = False
    higher_is_better = None  # Sync-C higher is better, Sync-D lower
    full_state_update = False

    def __init__(self, weights: str | None = None, net: nn.Module | None = None, vshift: int = DEFAULT_VSHIFT,
                 batch_size: int = 20, crop: str = "face", track: TrackRules | dict | None = None, **kwargs: Any):
        if (weights is None) == (net is None):
            raise ValueError("SyncMetric: give exactly one of weights (path of syncnet_v2.model) or net")
        if crop not in SYNC_CROPS:
            raise ValueError(f"sync_crop: {crop!r} is not one of {', '.join(SYNC_CROPS)}")
        super().__init__(load_syncnet(weights) if weights is not None else net, **kwargs)
        self.vshift = vshift
        self.batch_size = batch_size
        self.crop = crop
        self.rules = track if isinstance(track, TrackRules) else TrackRules(**dict(track or {}))
        for name in ("conf_sum", "dist_sum", "offset_sum", "abs_offset_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("videos", "skipped", "no_face", "tracks"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, frames: Tensor, audio: Any) -> None:
        if self.crop == "face":
            results, n_tracks = score_face_tracks(self.net, frames, audio, self.rules, self.vshift, self.batch_size)
            if n_tracks == 0:
                self.no_face += 1
                return
            res = _mean_result(results) if results else None
            self.tracks += len(results)
        else:
            res = sync_scores(self.net, frames, audio, vshift=self.vshift, batch_size=self.batch_size)
            self.tracks += int(res is not None)
        if res is None:
            self.skipped += 1
            return
        self.conf_sum += res.confidence
        self.dist_sum += res.min_dist
        self.offset_sum += res.offset
        self.abs_offset_sum += abs(res.offset)
        self.videos += 1

    def compute(self) -> dict[str, Tensor]:
        n = self.videos.double()
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        mean = (lambda s: s / n) if int(self.videos) > 0 else (lambda s: nan)
        return {
            "sync_c": mean(self.conf_sum),
            "sync_d": mean(self.dist_sum),
            "av_offset": mean(self.offset_sum),
            "abs_av_offset": mean(self.abs_offset_sum),
            "videos": self.videos.clone(),
            "skipped": self.skipped.clone(),
            "no_face": self.no_face.clone(),
            "tracks": self.tracks.clone(),
        }
