"""What a training run logs about its own speed (``callbacks.perf`` and ``callbacks.throughput``).

- :class:`StepPerf`, per step: the device time of the step, the time the device waited between
  steps (for the next batch, logging, checkpoint saves, validation), the peak memory; and a
  warning, once, when the loader keeps the device waiting.
- :class:`Throughput`: Lightning's ``ThroughputMonitor`` (samples/s, FLOP/s and MFU over a window
  of steps), given our batch layout; the FLOPs per batch come from the LightningModule's
  ``flops_per_batch`` (:func:`ft_train.flops.training_step_flops`).
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only

from ..flops import dense_bf16_peak

log = logging.getLogger(__name__)


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in one of our training batches."""
    return int(batch["latents"].shape[0])


# Lightning's throughput metric names → ours (the rest, running totals of time, batches and
# samples, say nothing perf/step_s does not).
PERF_NAMES = {
    "device/samples_per_sec": "perf/samples_per_s",
    "samples_per_sec": "perf/samples_per_s_all_ranks",
    "device/flops_per_sec": "perf/flops_per_s",
    "device/mfu": "perf/mfu",
}


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for our batches, over the last ``window_size`` steps:
    ``perf/samples_per_s`` (this rank; ``perf/samples_per_s_all_ranks`` with several),
    ``perf/flops_per_s`` and ``perf/mfu`` (model FLOPs: the LightningModule's ``flops_per_batch``).
    It synchronises the device once per step on rank 0. MFU is against the card's dense bf16 peak
    (:data:`ft_train.flops.PEAK_TFLOPS`, the bench's) when the step computes in bf16/fp16 and the
    table knows the card, else against Lightning's table; none on the CPU."""

    def __init__(self, window_size: int = 20):
        if window_size < 2:
            raise ValueError(f"callbacks.throughput.window_size must be at least 2 steps, got {window_size}")
        super().__init__(batch_size_fn=batch_size, window_size=window_size)

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        # ThroughputMonitor logs under "<stage>/..."; the same values under our perf/ names.
        if not trainer._logger_connector.should_update_logs:
            return
        metrics = self._throughputs[trainer.state.stage].compute()
        ours = {PERF_NAMES[k]: v for k, v in metrics.items() if k in PERF_NAMES}
        if ours:
            trainer._logger_connector.log_metrics(ours, step=iter_num)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return
        from lightning.fabric.utilities.throughput import _plugin_to_compute_dtype

        peak = peak_flops(torch.cuda.get_device_name(device), _plugin_to_compute_dtype(trainer.precision_plugin))
        if peak is not None:
            self.available_flops = peak
            for throughput in self._throughputs.values():
                throughput.available_flops = peak


def peak_flops(card: str, dtype: torch.dtype) -> float | None:
    """The dense FLOP/s MFU is measured against for ``card`` computing in ``dtype``: the bf16/fp16
    tensor-core peak from :data:`ft_train.flops.PEAK_TFLOPS`; None for other dtypes or cards."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    tflops, _ = dense_bf16_peak(card)
    return None if tflops is None else tflops * 1e12


def peak_rss_gib() -> float:
    """This process's peak resident set size since it started, in GiB (``ru_maxrss`` is KiB on
    Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


class StepPerf(L.Callback):
    """Per training step, logged as ``perf/step_s`` (device time from batch start to batch end:
    forward, backward, optimiser), ``perf/wait_s`` (device time between the previous step's end
    and this step's start: the next batch, its copy to the device, logging, checkpoint saves,
    validation) and ``perf/memory_peak_gib``. On CUDA ``perf/memory_peak_gib`` is the peak, since
    training started, of the device's tensor memory, and ``perf/memory_reserved_gib`` that of the
    caching allocator's pool; on the CPU, where there is no allocator to ask, it is the process's
    peak resident set size (host RAM, GiB) since the process started, so it includes whatever the
    process held before training (data, the loaded model, earlier runs in the same process).

    On CUDA the times come from CUDA events (read after one synchronisation per step); on the CPU
    from the host clock. Once ``min_steps`` steps have run, a median wait above ``stall_fraction``
    of the median step (over the last ``window`` steps) logs a warning, once: the loader is
    keeping the device waiting, so ``data.num_workers`` should rise. Values are rank 0's.
    """

    def __init__(self, stall_fraction: float = 0.05, window: int = 20, min_steps: int = 10):
        if not 0.0 < stall_fraction:
            raise ValueError(f"callbacks.perf.stall_fraction must be > 0, got {stall_fraction}")
        if window < 1 or min_steps < 1:
            raise ValueError(f"callbacks.perf.window and min_steps must be at least 1, got {window} and {min_steps}")
        self.stall_fraction, self.min_steps = stall_fraction, min_steps
        self.steps: deque[float] = deque(maxlen=window)
        self.waits: deque[float] = deque(maxlen=window)
        self.seen = 0
        self.warned = False
        self._start: Any = None
        self._last_end: Any = None

    @staticmethod
    def _mark(device: torch.device) -> Any:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _seconds(a: Any, b: Any) -> float:
        if isinstance(a, float):
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1000.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # no wait before the first step of a (resumed) run
        if pl_module.device.type == "cuda":  # the peaks are this run's (what it holds now included)
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = self._mark(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._start is None:
            return
        end = self._mark(pl_module.device)
        step = self._seconds(self._start, end)
        bsz = batch_size(batch)
        metrics = {"perf/step_s": step}
        if self._last_end is not None:
            wait = max(self._seconds(self._last_end, self._start), 0.0)
            metrics["perf/wait_s"] = wait
            self.waits.append(wait)
        self.steps.append(step)
        self._last_end, self._start = end, None
        self.seen += 1
        if pl_module.device.type == "cuda":
            metrics["perf/memory_peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["perf/memory_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
        else:
            metrics["perf/memory_peak_gib"] = peak_rss_gib()
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=bsz, rank_zero_only=True)
        self.check_stall(trainer)

    @rank_zero_only
    def check_stall(self, trainer: L.Trainer) -> None:
        if self.warned or self.seen < self.min_steps or not self.waits:
            return
        wait, step = statistics.median(self.waits), statistics.median(self.steps)
        if wait > self.stall_fraction * step:
            self.warned = True
            workers = getattr(getattr(trainer, "datamodule", None), "num_workers", None)
            now = f" (now {workers})" if workers is not None else ""
            log.warning(
                "the device waits %.3f s between steps for %.3f s steps (median of the last %d, %.0f %% > "
                "callbacks.perf.stall_fraction=%g): the loader cannot keep up; raise data.num_workers%s",
                wait, step, len(self.waits), 100 * wait / max(step, 1e-9), self.stall_fraction, now,
            )
