"""The FID / FVD / Sync bundle that scores generated videos one at a time.

Validation while training (:class:`ft_train.lit.validation.ValidationCallback`) and ``ft-eval``
score videos through the same :class:`VideoMetrics`, so their numbers are comparable;
:func:`build_metric` turns a config value (a local weight path, a ready ``Metric``, or nothing)
into a metric with errors that name the config key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from .facetrack import TrackRules
from .fid import FrechetInceptionDistance
from .portrait import AestheticScore, IdentityConsistency, SubjectBackgroundDynamics
from .fvd import (
    FVD_CLIP_FRAMES,
    FVD_PROTOCOLS,
    STYLEGAN_V_RESOLUTION,
    FrechetVideoDistance,
    clip_offset,
    split_clips,
    styleganv_clip,
)
from .sync import SYNC_FPS, SyncMetric, resample_fps

log = logging.getLogger(__name__)

METRIC_NAMES = ("fid", "fvd", "sync", "idc", "aes", "dynamics")


def build_metric(spec: Any, name: str, key: str, keep_real: bool = False, fvd_protocol: str = "stylegan_v",
                 sync_crop: str = "face", sync_track: Any = None, aes_head: Any = None,
                 frames: int | None = 16) -> Metric | None:
    """A metric from its config value: a local weight path, a ready ``Metric``, or None (skipped).

    ``name`` is ``fid`` (``pt_inception-2015-12-05-6726825d.pth``), ``fvd`` (``i3d_torchscript.pt``)
    or ``sync`` (``syncnet_v2.model``). ``keep_real``: FID/FVD keep the reference statistics across
    ``reset()``. ``fvd_protocol`` (``stylegan_v`` | ``all_clips``), ``sync_crop`` (``face`` |
    ``none``) and ``sync_track`` (:class:`~ft_train.metrics.facetrack.TrackRules` fields) apply
    when a path is given. Errors name ``key`` (the config key to change).
    """
    if spec is None or spec is False or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, Metric):
        return spec
    if name == "dynamics":  # no weights: a switch
        return SubjectBackgroundDynamics() if spec is True or str(spec).lower() == "true" else None
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"{key}: expected a weight path or a torchmetrics Metric, got {type(spec).__name__}")
    try:
        if name == "fid":
            return FrechetInceptionDistance(spec, reset_real_features=not keep_real)
        if name == "fvd":
            return FrechetVideoDistance(spec, reset_real_features=not keep_real, protocol=fvd_protocol)
        if name == "sync":
            return SyncMetric(weights=str(spec), crop=sync_crop, track=_track_rules(sync_track))
        if name == "idc":
            return IdentityConsistency(weights=str(spec), frames=frames)
        if name == "aes":
            if not aes_head:
                raise ValueError("needs the LAION predictor's linear head too: set aes_head (sa_0_4_vit_l_14_linear.pth)")
            return AestheticScore(weights=str(spec), head=str(aes_head), frames=frames)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{key}: {e}") from None
    raise ValueError(f"unknown metric {name!r}; choose from {METRIC_NAMES}")


def _track_rules(spec: Any) -> TrackRules:
    if spec is None or isinstance(spec, TrackRules):
        return spec or TrackRules()
    try:
        return TrackRules(**dict(spec))
    except TypeError as e:
        raise ValueError(f"sync_track: {e}; known keys: {', '.join(TrackRules.__dataclass_fields__)}") from None


def parse_fid_frames(value: Any, key: str = "fid_frames") -> int | None:
    """``fid_frames`` config value → frames per video (None = every frame). ``all``/null mean every frame."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "")):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number of frames or 'all', got {value!r}") from None
    if n < 1:
        raise ValueError(f"{key}: expected a number of frames >= 1 or 'all', got {n}")
    return n


def _frames(metric: Metric) -> str:
    n = getattr(metric, "frames", None)
    return "every frame" if n is None else f"{n} frames per video"


def _clip_frames(metric: Metric) -> int:
    return int(getattr(getattr(metric, "net", None), "clip_frames", FVD_CLIP_FRAMES))


def _evenly(n: int, k: int | None) -> Tensor:
    """Indices of ``k`` evenly spaced items out of ``n`` (all when ``k`` is None or ≥ n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long()


class VideoMetrics:
    """The optional FID / FVD / Sync metrics, fed one video at a time (used by the callback and ft-eval).

    Args:
        fid, fvd, sync: ``Metric`` or None (skipped).
        fid_frames: frames per video that enter FID, evenly spaced (None or ``"all"`` = every frame).
        fvd_protocol: ``stylegan_v`` (one 16-frame clip per video: the reference's clip at a
            seeded random start, the generated video's first 16 frames, both resized to
            ``fvd_resolution``; see :mod:`ft_train.metrics.fvd`) or ``all_clips`` (every
            non-overlapping clip at the frames' own size). Taken from the FVD metric when it has one.
        fvd_resolution: StyleGAN-V's dataset resolution (short side, Lanczos, centre crop).
        fvd_seed: seeds the reference clips' start frames (per video, by its key).
    Counters: ``fvd_too_short`` (videos shorter than one FVD clip), ``sync_no_audio`` (no audio,
    or audio that cannot be decoded: FID/FVD still score the video).
    """

    def __init__(self, fid: Metric | None = None, fvd: Metric | None = None, sync: Metric | None = None,
                 fid_frames: int | str | None = None, fvd_protocol: str = "stylegan_v",
                 fvd_resolution: int = STYLEGAN_V_RESOLUTION, fvd_seed: int = 0, idc: Metric | None = None,
                 aes: Metric | None = None, dynamics: Metric | None = None):
        named = (("fid", fid), ("fvd", fvd), ("sync", sync), ("idc", idc), ("aes", aes), ("dynamics", dynamics))
        self.metrics = {k: m for k, m in named if m is not None}
        self._reference_first: dict[str, Tensor] = {}  # IDC's reference face frame, by video key
        self.fid_frames = parse_fid_frames(fid_frames)
        self.fvd_protocol = getattr(fvd, "protocol", fvd_protocol)
        if self.fvd_protocol not in FVD_PROTOCOLS:
            raise ValueError(f"fvd_protocol: {self.fvd_protocol!r} is not one of {', '.join(FVD_PROTOCOLS)}")
        self.fvd_resolution = int(fvd_resolution)
        self.fvd_seed = int(fvd_seed)
        self.fvd_too_short = 0
        self.sync_no_audio = 0
        self._updates = 0
        self._reference_done = False

    def __bool__(self) -> bool:
        return bool(self.metrics)

    def to(self, device: torch.device | str) -> "VideoMetrics":
        for m in self.metrics.values():
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        m = next(iter(self.metrics.values()), None)
        return m.device if m is not None else torch.device("cpu")

    def needs_reference(self) -> bool:
        """False once FID/FVD hold complete reference statistics that they keep across ``reset()``.

        "Complete" is said by :meth:`reference_done` after a whole pass over the list: a count
        above zero only means the first video's reference is in.
        """
        frechet = [self.metrics[k] for k in ("fid", "fvd") if k in self.metrics]
        if not frechet:
            return "idc" in self.metrics and not self._reference_done  # IDC keeps each reference's first frame
        return not self._reference_done or any(
            getattr(m, "reset_real_features", True) or int(m.real_n) == 0 for m in frechet)

    def reference_done(self) -> None:
        """Every reference video has been fed once (kept statistics are complete)."""
        self._reference_done = True

    def protocol(self) -> dict[str, Any]:
        """How the numbers were made, for logs and ft-eval's JSON."""
        out: dict[str, Any] = {}
        if "fid" in self.metrics:
            out["fid_frames"] = "all" if self.fid_frames is None else self.fid_frames
        if "fvd" in self.metrics:
            out["fvd_protocol"] = self.fvd_protocol
            if self.fvd_protocol == "stylegan_v":
                out.update(fvd_resolution=self.fvd_resolution, fvd_seed=self.fvd_seed, fvd_covariance="biased (N)")
            else:
                out["fvd_covariance"] = "unbiased (N-1)"
        if "sync" in self.metrics:
            sync = self.metrics["sync"]
            out["sync_crop"] = getattr(sync, "crop", "none")
            if out["sync_crop"] == "face":
                out["sync_track"] = dict(vars(sync.rules))
        if "idc" in self.metrics:
            out["idc"] = f"DINO CLS cosine, mediapipe face crops, {_frames(self.metrics['idc'])} vs the reference's first frame"
        if "aes" in self.metrics:
            out["aes"] = f"CLIP ViT-L/14 + LAION linear head, {_frames(self.metrics['aes'])}"
        if "dynamics" in self.metrics:
            out["dynamics"] = (f"Farneback flow at {self.metrics['dynamics'].size} px, inside (sd) / outside (bd) "
                               "mediapipe selfie segmentation")
        return out

    def counts(self) -> dict[str, int]:
        """Videos left out of a metric, by reason."""
        out = {"fvd_too_short": self.fvd_too_short, "sync_no_audio": self.sync_no_audio}
        if "sync" in self.metrics:
            res = self.metrics["sync"].compute()
            out["sync_no_face"] = int(res.get("no_face", 0))
            out["sync_too_short"] = int(res["skipped"])
        if "idc" in self.metrics:
            res = self.metrics["idc"].compute()
            out["idc_no_face_frames"] = int(res["no_face_frames"])
            out["idc_no_reference_face"] = int(res["no_reference_face"])
        if "dynamics" in self.metrics:
            out["dynamics_too_short"] = int(self.metrics["dynamics"].compute()["too_short"])
        return out

    @torch.no_grad()
    def update(self, generated: Tensor, reference: Tensor | None, fps: float, audio: np.ndarray | None,
               key: str | None = None) -> None:
        """One video pair. ``generated``/``reference``: uint8 RGB ``(T, H, W, 3)``; ``fps`` in frames/s;
        ``audio``: 16 kHz mono waveform of the clip, or None (Sync skipped for this video);
        ``key``: the video's name, which seeds its FVD clip start (default: its update count)."""
        key = str(self._updates) if key is None else str(key)
        self._updates += 1
        device = self.device
        gen = generated.to(device).permute(0, 3, 1, 2)  # (T, 3, H, W)
        ref = reference.to(device).permute(0, 3, 1, 2) if reference is not None else None
        if "fid" in self.metrics:
            fid = self.metrics["fid"]
            fid.update(gen[_evenly(gen.shape[0], self.fid_frames).to(device)], real=False)
            if ref is not None:
                fid.update(ref[_evenly(ref.shape[0], self.fid_frames).to(device)], real=True)
        if "fvd" in self.metrics:
            fvd = self.metrics["fvd"]
            n = _clip_frames(fvd)
            if gen.shape[0] < n or (ref is not None and ref.shape[0] < n):
                self.fvd_too_short += 1
            elif self.fvd_protocol == "stylegan_v":
                # generated: frames [0, 16) (offset off); reference: a seeded random start
                fvd.update(styleganv_clip(gen, 0, self.fvd_resolution, n), real=False)
                if ref is not None:
                    start = clip_offset(ref.shape[0], key, self.fvd_seed, n)
                    fvd.update(styleganv_clip(ref, start, self.fvd_resolution, n), real=True)
            else:
                fvd.update(split_clips(gen.transpose(0, 1), n), real=False)
                if ref is not None:
                    fvd.update(split_clips(ref.transpose(0, 1), n), real=True)
        if "idc" in self.metrics:
            if ref is not None:
                self._reference_first[key] = reference[0].cpu()
            if key in self._reference_first:
                self.metrics["idc"].update(generated.cpu(), self._reference_first[key])
        if "aes" in self.metrics:
            self.metrics["aes"].update(generated.cpu())
        if "dynamics" in self.metrics:
            self.metrics["dynamics"].update(generated.cpu())
        if "sync" in self.metrics:
            if audio is None or len(audio) == 0:
                self.sync_no_audio += 1
            else:
                self.metrics["sync"].update(resample_fps(gen, float(fps), SYNC_FPS), audio)

    def compute(self) -> dict[str, float]:
        """``fid``, ``fvd``, ``sync_c``, ``sync_d`` (and ``av_offset``) for the metrics present (NaN if empty)."""
        out: dict[str, float] = {}
        for name in ("fid", "fvd"):
            if name in self.metrics:
                try:
                    out[name] = float(self.metrics[name].compute())
                except RuntimeError as e:  # fewer than 2 samples on a side
                    why = " (the stylegan_v protocol takes one clip per video: score at least 2 videos)" if (
                        name == "fvd" and self.fvd_protocol == "stylegan_v") else ""
                    log.warning("%s is NaN: %s%s", name, e, why)
                    out[name] = float("nan")
        if "sync" in self.metrics:
            res = self.metrics["sync"].compute()
            out.update(sync_c=float(res["sync_c"]), sync_d=float(res["sync_d"]), av_offset=float(res["av_offset"]))
        for name, keys in (("idc", ("idc",)), ("aes", ("aes",)), ("dynamics", ("sd", "bd"))):
            if name in self.metrics:
                res = self.metrics[name].compute()
                out.update({k: float(res[k]) for k in keys})
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        self.fvd_too_short = self.sync_no_audio = self._updates = 0


__all__ = ["METRIC_NAMES", "VideoMetrics", "build_metric", "parse_fid_frames"]
