"""Preemption: on SLURM's warning signal, every rank finishes its step, all save together, the job
requeues itself, and the requeued job resumes from that checkpoint (``resume: auto``).

The signal handler only sets a flag (saving inside a handler can run in the middle of a backward
pass or a collective: Lightning issue #21406). At the next batch boundary the
ranks agree on the flag with an all-reduce (MAX), so they all take the same decision at the same
step, save through the :class:`~ft_train.lit.checkpointing.StepCheckpoint` (atomic, collective),
and rank 0 asks SLURM to requeue the job.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess

import lightning as L
import torch

from .checkpointing import StepCheckpoint

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    """Save-requeue-stop on a signal.

    Args:
        signals: names of the signals to catch (``sbatch --signal=USR1@300`` sends SIGUSR1).
        requeue_command: run by rank 0 after the save; ``{job_id}`` is replaced by
            ``$SLURM_JOB_ID``. Empty = do not requeue (just save and stop). Outside SLURM
            (no job id) nothing is run.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue_command: str = "scontrol requeue {job_id}"):
        self.signals = tuple(signals)
        self.requeue_command = requeue_command
        self.requested = False
        self.preempted_at: int | None = None
        self._main_pid = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        # Forked DataLoader workers inherit the handler; only the training process reacts.
        if os.getpid() == self._main_pid:
            self.requested = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._main_pid = os.getpid()
        for name in self.signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches):
            return  # only between optimiser steps
        flag = torch.tensor(float(self.requested), device=pl_module.device)
        if trainer.strategy.reduce(flag, reduce_op="max") <= 0:
            return
        step = trainer.global_step
        log.warning("preemption signal received: saving step %d on every rank, then stopping", step)
        checkpointer = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
        if checkpointer is not None and checkpointer.last_saved_step != step:
            checkpointer.save(trainer, step)
        self.preempted_at = step
        trainer.should_stop = True
        job_id = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and job_id and self.requeue_command:
            self.requeue(job_id, step)

    def requeue(self, job_id: str, step: int) -> bool:
        """Run the requeue command for ``job_id``; True when SLURM took the request. SLURM ends
        the job's processes as soon as it accepts a requeue, scontrol included, so scontrol
        stopped by a signal means the request went through."""
        command = self.requeue_command.format(job_id=job_id)
        result = subprocess.run(shlex.split(command), capture_output=True, text=True)
        if result.returncode < 0:
            log.warning("requeued SLURM job %s (SLURM stopped scontrol with signal %d while ending the job for the "
                        "requeue); it will resume from step %d", job_id, -result.returncode, step)
            return True
        if result.returncode != 0:
            log.error("requeue failed (%s): %s", command, result.stderr.strip())
            return False
        log.warning("requeued SLURM job %s; it will resume from step %d", job_id, step)
        return True
