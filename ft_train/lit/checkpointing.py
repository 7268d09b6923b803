"""Step checkpoints that are atomic, pruned, and found again on resume.

Layout: ``<dirpath>/step-00001000/`` holding the Lightning checkpoint (``model.ckpt``, or the
DeepSpeed shard folder ``model.ckpt/`` under ZeRO) and ``COMMITTED.json``. A step folder is
written as ``.step-00001000.tmp`` and renamed only after every rank has finished writing and
rank 0 has recorded the size of every file in ``COMMITTED.json`` — so a folder without the marker,
or whose files no longer match it, is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)

MARKER = "COMMITTED.json"
CKPT_NAME = "model.ckpt"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER}


def verify(step_dir: Path) -> str | None:
    """None when ``step_dir`` is a complete checkpoint, else why not (one line)."""
    marker = step_dir / MARKER
    if not marker.is_file():
        return "no completion marker"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable marker ({exc})"
    actual = _file_sizes(step_dir)
    for name, size in expected.items():
        if name not in actual:
            return f"missing {name}"
        if actual[name] != size:
            return f"{name} has {actual[name]} bytes, expected {size}"
    return None


def committed_steps(dirpath: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-XXXXXXXX`` folder, newest first (not yet verified)."""
    root = Path(dirpath)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def find_resume_checkpoint(dirpath: str | Path) -> Path | None:
    """The newest complete step folder under ``dirpath``; damaged newer ones are skipped, loudly."""
    for step, folder in committed_steps(dirpath):
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("checkpoint %s is damaged (%s); falling back to the previous one", folder, problem)
    return None


def lightning_path(step_folder: str | Path) -> Path:
    """What ``Trainer.fit(ckpt_path=...)`` takes for a step folder."""
    return Path(step_folder) / CKPT_NAME


class StepCheckpoint(L.Callback):
    """Save every ``every_n_steps`` optimiser steps and at the end of training; keep the last K.

    Saving is collective (every rank calls it; DeepSpeed needs that), and the folder becomes
    visible under its final name only once complete.

    Args:
        dirpath: where step folders go.
        every_n_steps: save period in optimiser steps (0 = only at the end).
        keep_last: complete checkpoints to keep (older ones are deleted; ≥ 1).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 1000, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"callbacks.checkpoint.keep_last must be >= 1, got {keep_last}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.last_saved_step = -1
        self.last_path: Path | None = None
        # The model these weights need (ft_train.spec.ModelSpec), written into every step folder
        # by ft-train, so export and inference rebuild it from the folder alone.
        self.spec = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step:
            # Only at an optimiser-step boundary (the last micro-batch of an accumulation).
            if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0:
                self.save(trainer, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_saved_step:
            self.save(trainer, trainer.global_step)

    def save(self, trainer: L.Trainer, step: int) -> Path:
        final = self.dirpath / step_dir_name(step)
        tmp = self.dirpath / f".{step_dir_name(step)}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        trainer.strategy.barrier("ft_ckpt_prepare")
        trainer.save_checkpoint(tmp / CKPT_NAME)
        trainer.strategy.barrier("ft_ckpt_written")
        if trainer.is_global_zero:
            if self.spec is not None:
                from ..spec import write_spec

                write_spec(tmp, self.spec)
            marker = {"step": step, "world_size": trainer.world_size, "files": _file_sizes(tmp)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            if final.exists():  # a previous attempt at this step (e.g. before a requeue)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        trainer.strategy.barrier("ft_ckpt_committed")
        self.last_saved_step = step
        self.last_path = final
        return final

    def _prune(self) -> None:
        complete = [folder for _, folder in committed_steps(self.dirpath) if verify(folder) is None]
        for folder in complete[self.keep_last :]:
            shutil.rmtree(folder, ignore_errors=True)

    def state_dict(self) -> dict:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_saved_step = state_dict.get("last_saved_step", -1)
