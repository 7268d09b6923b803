"""Callbacks that turn a run into files people can open."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


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
    """

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
