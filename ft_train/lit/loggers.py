"""Loggers whose history survives resumes: ``metrics.csv`` and TensorBoard event files.

Both have ``truncate_from(step)``; on a resume the module calls it with the checkpoint's step,
so what the interrupted run logged after that checkpoint does not show twice.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv``; this one appends to it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))


class ResumableCSVLogger(CSVLogger):
    """``metrics.csv`` in the stage folder, continued (not overwritten) when a run resumes.

    Rows the interrupted run logged after its last checkpoint are dropped on resume
    (:meth:`truncate_from`), so the file reads as one uninterrupted run.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def truncate_from(self, step: int) -> None:
        """Drop rows with ``step >= step`` (logged after the checkpoint being resumed)."""
        path = self.experiment.metrics_file_path
        if not os.path.isfile(path):
            return
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields, rows = reader.fieldnames or [], [r for r in reader if r.get("step") and int(r["step"]) < step]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


class ResumableTensorBoardLogger(TensorBoardLogger):
    """TensorBoard event files in ``<stage_dir>/tensorboard/``, one run across resumes.

    A resumed run writes a new event file into the same folder. It starts with TensorBoard's purge
    marker (``purge_step``: a session start at the resumed step), so TensorBoard hides whatever
    the earlier files hold from that step on, as :class:`ResumableCSVLogger` drops those rows.
    Event files are written by tensorboardX (or torch's writer when ``tensorboard`` is
    installed); view them with ``tensorboard --logdir outputs`` from any environment. The
    validation callback shows its samples here as frame strips (:meth:`log_video_frames`).
    """

    def __init__(self, save_dir: str, name: str = "tensorboard", version: str = "", **kwargs):
        kwargs.setdefault("default_hp_metric", False)  # no placeholder ``hp_metric`` scalar
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)

    @rank_zero_only
    def truncate_from(self, step: int) -> None:
        """Hide events with ``step >= step`` (logged after the checkpoint being resumed)."""
        if self._experiment is not None:  # Lightning opened a writer at fit start: reopen it with the marker
            self._experiment.close()
            self._experiment = None
        self._kwargs["purge_step"] = int(step)
        self.experiment.flush()  # the new file and its marker exist before this run's first scalar

    @rank_zero_only
    def log_video_frames(self, tag: str, frames: np.ndarray, step: int, count: int = 4) -> None:
        """``count`` evenly spaced frames of a ``(T, H, W, 3)`` uint8 video, side by side, as one
        ``(H, count·W, 3)`` image (the mp4 beside it is the whole video)."""
        index = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
        self.experiment.add_image(tag, np.concatenate(list(frames[index]), axis=1), step, dataformats="HWC")
