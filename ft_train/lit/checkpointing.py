"""Step checkpoints that are atomic, checksummed, pruned, and found again on resume.

Layout: ``<dirpath>/step-00001000/`` holding the Lightning checkpoint (``model.ckpt``, or the
DeepSpeed shard folder ``model.ckpt/`` under ZeRO) and ``COMMITTED.json``. A step folder is
written as ``.step-00001000.tmp`` and renamed only after every rank has finished writing (and
flushed its files to disk) and rank 0 has recorded the size and CRC-32 of every file in
``COMMITTED.json`` — so a folder without the marker, or whose files no longer match it (truncated,
or changed in place at the same size), or whose checkpoint torch cannot open, is never resumed from.
The rename waits until Lightning has logged the step's metrics and the loggers are flushed, so a
crash right after a commit leaves ``metrics.csv`` with every step before the checkpoint's.

Cost of the checksum: ``zlib.crc32`` streamed in 4 MiB chunks runs at about 3 GB/s on one core
(2.2 GB/s including the read from the page cache), so a 14B adapter checkpoint (0.84B trainable
weights in fp32 plus AdamW's two moments, about 10 GB) takes about 4-5 s to checksum at each save
(rank 0, right after writing, while the files are still cached) and again when a resume picks it;
pruning checks sizes only. Markers from before checksums (sizes only) are still accepted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

import torch

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

MARKER = "COMMITTED.json"
CKPT_NAME = "model.ckpt"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


CHUNK = 4 << 20  # bytes read at a time for the checksum


def _files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER]


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in _files(root)}


def crc32(path: Path) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits (streamed; see the module docstring for its speed)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _file_records(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "crc32": crc32(p)} for p in _files(root)}


def _read_marker(step_dir: Path) -> dict[str, dict]:
    """``{file: {"bytes": n, "crc32": hex or None}}`` from ``COMMITTED.json`` (either format); raises
    ValueError when the marker is not what :meth:`StepCheckpoint.save` writes."""
    data = json.loads((step_dir / MARKER).read_text())
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{MARKER} holds no file list")
    records = {}
    for name, entry in files.items():
        if isinstance(entry, int) and not isinstance(entry, bool):  # written before checksums: size only
            records[name] = {"bytes": entry, "crc32": None}
        elif isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("crc32"), str):
            records[name] = entry
        else:
            raise ValueError(f"{MARKER} has a malformed entry for {name!r}")
    if not any(name == CKPT_NAME or name.startswith(CKPT_NAME + "/") for name in records):
        raise ValueError(f"{MARKER} lists no {CKPT_NAME}")
    return records


def verify(step_dir: Path, checksums: bool = True) -> str | None:
    """None when ``step_dir`` is a complete checkpoint, else why not (one line). Checks every file's
    size and (``checksums``, and where the marker has them) its CRC-32; never raises."""
    step_dir = Path(step_dir)
    try:
        if not (step_dir / MARKER).is_file():
            return "no completion marker"
        try:
            expected = _read_marker(step_dir)
        except ValueError as exc:  # json.JSONDecodeError is one
            return f"unreadable marker ({exc})"
        actual = _file_sizes(step_dir)
        for name, record in expected.items():
            if name not in actual:
                return f"missing {name}"
            if actual[name] != record["bytes"]:
                return f"{name} has {actual[name]} bytes, expected {record['bytes']}"
        if checksums:
            for name, record in expected.items():
                if record["crc32"] is not None and (crc := crc32(step_dir / name)) != record["crc32"]:
                    return f"{name} has CRC-32 {crc}, expected {record['crc32']} (changed after it was written)"
    except OSError as exc:  # unreadable folder or file
        return f"cannot read it ({exc.__class__.__name__}: {exc})"
    return None


def check_loads(step_dir: Path) -> str | None:
    """None when torch opens every checkpoint file in ``step_dir`` (memory-mapped: the weights
    themselves are not read), else why not (one line). Catches what a size-only marker cannot."""
    path = Path(step_dir) / CKPT_NAME
    try:
        paths = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.suffix in (".pt", ".ckpt")]
        for path in paths:
            torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, this folder is not loadable
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        return f"torch cannot load {path.relative_to(step_dir)} ({why})"
    return None


def usable(step_dir: Path) -> str | None:
    """None when ``step_dir`` can be resumed from (:func:`verify` with checksums, then
    :func:`check_loads`), else why not."""
    return verify(step_dir) or check_loads(step_dir)


def committed_steps(dirpath: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-XXXXXXXX`` folder, newest first (not yet verified)."""
    root = Path(dirpath)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def find_resume_checkpoint(dirpath: str | Path, check: bool = True) -> Path | None:
    """The newest usable step folder under ``dirpath`` (:func:`usable`; sizes only when not
    ``check``); damaged newer ones are skipped, loudly."""
    for step, folder in committed_steps(dirpath):
        problem = usable(folder) if check else verify(folder, checksums=False)
        if problem is None:
            return folder
        log.warning("checkpoint %s is damaged (%s); falling back to the previous one", folder, problem)
    return None


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another rank's writer replaced it meanwhile; its rank flushes it
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (and ``root``) to disk, so a power loss after the
    commit cannot leave the marker naming data that never reached it."""
    for path in sorted(root.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(root)


class DirectCheckpointIO(TorchCheckpointIO):
    """``torch.save`` straight to the target path. Lightning's default (2.6) serialises the whole
    checkpoint into memory, then writes it to a file under ``$TMPDIR`` (fsspec's transaction) and
    moves it into place: a second full copy in RAM and one on a local disk that may be too small.
    Step folders are atomic by their rename (:meth:`StepCheckpoint.save`), so neither is needed."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:  # noqa: D102
        if storage_options is not None:
            raise TypeError("DirectCheckpointIO.save_checkpoint takes no storage_options")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, path)


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
        self._pending: tuple[int, Path, Path] | None = None  # (step, temporary folder, final folder)
        # The model these weights need (ft_train.spec.ModelSpec), written into every step folder
        # by ft-train, so export and inference rebuild it from the folder alone.
        self.spec = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning's own CheckpointIO stages the whole file in $TMPDIR (see DirectCheckpointIO);
        # a custom one given by the user (or DeepSpeed's own save) is left alone.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = DirectCheckpointIO()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step:
            # Only at an optimiser-step boundary (the last micro-batch of an accumulation).
            if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0:
                self.save(trainer, step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.commit(trainer)  # Lightning has logged the saved step's metrics row by now

    def on_train_end(self, trainer, pl_module) -> None:
        self.commit(trainer)
        if trainer.global_step != self.last_saved_step:
            self.save(trainer, trainer.global_step)
            self.commit(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        # A written step whose metrics row was logged is still committed (rank 0 alone: the other
        # ranks may be anywhere now, so no barrier).
        if self._pending is not None and trainer.is_global_zero and self._row_logged(trainer):
            self._commit(trainer)

    def save(self, trainer: L.Trainer, step: int) -> Path:
        """Write step ``step`` into its temporary folder on every rank, with the marker (collective).
        The folder is renamed into place by :meth:`commit`, once Lightning has logged that step's
        metrics row (after this hook): committing first let a process killed in between resume
        past a row that was never written."""
        final = self.dirpath / step_dir_name(step)
        tmp = self.dirpath / f".{step_dir_name(step)}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        trainer.strategy.barrier("ft_ckpt_prepare")
        trainer.save_checkpoint(tmp / CKPT_NAME)
        _fsync_tree(tmp)  # each rank flushes what it wrote (clean files cost nothing)
        trainer.strategy.barrier("ft_ckpt_written")
        if trainer.is_global_zero:
            if self.spec is not None:
                from ..spec import write_spec

                write_spec(tmp, self.spec)
            marker = {"step": step, "world_size": trainer.world_size, "files": _file_records(tmp)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            _fsync_tree(tmp)  # the files, the marker and the folder, before the rename commits them
        self.last_saved_step = step
        self._pending = (step, tmp, final)
        return final

    @staticmethod
    def _row_logged(trainer) -> bool:
        # Lightning counts a step in ``_batches_that_stepped`` right after logging its row.
        return trainer.fit_loop.epoch_loop._batches_that_stepped >= trainer.global_step

    def commit(self, trainer: L.Trainer) -> Path | None:
        """Make the step written by :meth:`save` visible (collective; nothing when none waits):
        rank 0 flushes the loggers, so ``metrics.csv`` holds every step before the checkpoint's,
        then renames the folder into place and prunes old ones. Returns the committed folder."""
        if self._pending is None:
            return None
        final = self._pending[2]
        if trainer.is_global_zero:
            self._commit(trainer)
        trainer.strategy.barrier("ft_ckpt_committed")
        self._pending = None
        self.last_path = final
        return final

    def _commit(self, trainer) -> None:
        step, tmp, final = self._pending
        for logger in trainer.loggers:
            logger.save()  # rows buffered in memory (Lightning flushes every 100 steps) reach the disk first
        if final.exists():  # a previous attempt at this step (e.g. before a requeue)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.dirpath)  # the rename itself
        self._prune()
        self._pending = None
        self.last_path = final

    def _prune(self) -> None:
        complete = [folder for _, folder in committed_steps(self.dirpath) if verify(folder, checksums=False) is None]
        for folder in complete[self.keep_last :]:
            shutil.rmtree(folder, ignore_errors=True)

    def state_dict(self) -> dict:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_saved_step = state_dict.get("last_saved_step", -1)
