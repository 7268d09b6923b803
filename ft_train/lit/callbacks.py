"""Callbacks that turn a run into files people can open."""

from __future__ import annotations

import csv
import datetime
import logging
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

log = logging.getLogger(__name__)


def read_metric(csv_path: str | Path, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric from a Lightning CSVLogger ``metrics.csv``."""
    steps, values = [], []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get(name):
                steps.append(int(row["step"]))
                values.append(float(row[name]))
    return steps, values


class StepProgressBar(RichProgressBar):
    """One bar over the stage in optimiser steps: ``steps 1200/80000``.

    Training here is step-based (``stage.max_steps``, no epochs), so Lightning's own bar, which
    counts the batches of an "epoch" against ``max_epochs`` (``Epoch 0/-2``, batches over steps
    under gradient accumulation), says little; this one also starts a resumed run where it stopped.

    Without a terminal (a SLURM job's log file, ``nohup``) a live bar shows nothing until the
    stage ends, so rank 0 logs a line instead every ``text_every_n_steps`` steps: step, share
    done, the bar's metrics (``train/loss``), seconds per step since the previous line, and the
    time left at that pace.

    Args:
        text_every_n_steps: steps between progress lines when there is no terminal (0 = none).
    """

    def __init__(self, text_every_n_steps: int = 50, **kwargs):
        super().__init__(**kwargs)
        if int(text_every_n_steps) < 0:
            raise ValueError(f"callbacks.progress.text_every_n_steps must be >= 0, got {text_every_n_steps}")
        self.text_every_n_steps = int(text_every_n_steps)
        self._last_line: tuple[float, int] | None = None  # (monotonic time, step) of the previous line

    def _is_terminal(self) -> bool:
        console = getattr(self, "_console", None)
        return bool(console.is_terminal) if console is not None else sys.stdout.isatty()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_line = (time.monotonic(), trainer.global_step)

    def _text_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if (not self.text_every_n_steps or not trainer.is_global_zero or self._is_terminal()
                or self._last_line is None or step == self._last_line[1]
                or (step % self.text_every_n_steps and step != total)):
            return
        now = time.monotonic()
        per_step = (now - self._last_line[0]) / (step - self._last_line[1])
        self._last_line = (now, step)
        parts = [f"step {step}/{total} ({100 * step / total:.1f}%)" if total > 0 else f"step {step}"]
        for name, value in self.get_metrics(trainer, pl_module).items():
            if name != "v_num":
                parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        parts.append(f"{per_step:.2f} s/step")
        if total > step:
            parts.append(f"{datetime.timedelta(seconds=round(per_step * (total - step)))} left")
        log.info(" · ".join(parts))

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else float("inf")

    def _get_train_description(self, current_epoch: int) -> str:
        return "steps"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._text_line(trainer, pl_module)


class LossCurvePlot(L.Callback):
    """At the end of training, plot ``train/loss`` from the CSV log to ``loss_curve.png``."""

    def __init__(self, metric: str = "train/loss", filename: str = "loss_curve.png"):
        self.metric = metric
        self.filename = filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.logger is None or not trainer.logger.log_dir:
            return
        trainer.logger.save()
        csv_path = Path(trainer.logger.log_dir) / "metrics.csv"
        if not csv_path.is_file():
            return
        steps, values = read_metric(csv_path, self.metric)
        if not steps:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, values, lw=0.8, alpha=0.5, label=self.metric)
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel(self.metric)
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(trainer.logger.log_dir) / self.filename, dpi=100)
        plt.close(fig)
