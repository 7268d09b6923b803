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

from .fid import FrechetInceptionDistance
from .fvd import FVD_CLIP_FRAMES, FrechetVideoDistance, split_clips
from .sync import SYNC_FPS, SyncMetric, resample_fps

log = logging.getLogger(__name__)

METRIC_NAMES = ("fid", "fvd", "sync")


def build_metric(spec: Any, name: str, key: str, keep_real: bool = False) -> Metric | None:
    """A metric from its config value: a local weight path, a ready ``Metric``, or None (skipped).

    ``name`` is ``fid`` (``pt_inception-2015-12-05-6726825d.pth``), ``fvd`` (``i3d_torchscript.pt``)
    or ``sync`` (``syncnet_v2.model``). ``keep_real``: FID/FVD keep the reference statistics across
    ``reset()``. Errors name ``key`` (the config key to change).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, Metric):
        return spec
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"{key}: expected a weight path or a torchmetrics Metric, got {type(spec).__name__}")
    try:
        if name == "fid":
            return FrechetInceptionDistance(spec, reset_real_features=not keep_real)
        if name == "fvd":
            return FrechetVideoDistance(spec, reset_real_features=not keep_real)
        if name == "sync":
            return SyncMetric(weights=str(spec))
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{key}: {e}") from None
    raise ValueError(f"unknown metric {name!r}; choose from {METRIC_NAMES}")


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
        fid_frames: frames per video that enter FID, evenly spaced (None = every frame).
    Counters: ``fvd_too_short`` (videos shorter than one FVD clip), ``sync_no_audio``.
    """

    def __init__(self, fid: Metric | None = None, fvd: Metric | None = None, sync: Metric | None = None,
                 fid_frames: int | None = None):
        self.metrics = {k: m for k, m in (("fid", fid), ("fvd", fvd), ("sync", sync)) if m is not None}
        self.fid_frames = fid_frames
        self.fvd_too_short = 0
        self.sync_no_audio = 0

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
        """False once FID/FVD hold reference statistics they keep across ``reset()``."""
        frechet = [self.metrics[k] for k in ("fid", "fvd") if k in self.metrics]
        return any(getattr(m, "reset_real_features", True) or int(m.real_n) == 0 for m in frechet)

    @torch.no_grad()
    def update(self, generated: Tensor, reference: Tensor | None, fps: float, audio: np.ndarray | None) -> None:
        """One video pair. ``generated``/``reference``: uint8 RGB ``(T, H, W, 3)``; ``fps`` in frames/s;
        ``audio``: 16 kHz mono waveform of the clip, or None (Sync skipped for this video)."""
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
            else:
                fvd.update(split_clips(gen.transpose(0, 1), n), real=False)
                if ref is not None:
                    fvd.update(split_clips(ref.transpose(0, 1), n), real=True)
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
                    log.warning("%s not computed: %s", name, e)
                    out[name] = float("nan")
        if "sync" in self.metrics:
            res = self.metrics["sync"].compute()
            out.update(sync_c=float(res["sync_c"]), sync_d=float(res["sync_d"]), av_offset=float(res["av_offset"]))
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        self.fvd_too_short = self.sync_no_audio = 0


__all__ = ["METRIC_NAMES", "VideoMetrics", "build_metric"]
