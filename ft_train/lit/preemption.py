"""Preemption and cancellation: on SLURM's warning signal (USR1, ``sbatch --signal=USR1@300``)
every rank finishes its step, all save together, the job requeues itself, and the requeued job
resumes from that checkpoint (``resume: auto``). On SIGTERM — ``scancel``, the time limit, a node
shutting down — they save the same way and stop without requeueing, so a cancelled job ends.

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


REQUEUE, STOP = 1, 2  # what a signal asks for; when ranks differ, the larger (stop) wins


class Preemption(L.Callback):
    """Save, then requeue and stop, or just stop, on a signal.

    Args:
        signals: names of the signals that mean "save and requeue" (``sbatch --signal=USR1@300``
            sends SIGUSR1 five minutes before the time limit).
        stop_signals: names of the signals that mean "save and stop": SLURM sends SIGTERM on
            ``scancel``, at the time limit and when a node shuts down, and then SIGKILL after
            its KillWait (30 s by default), so the save must fit in that time.
        requeue_command: run by rank 0 after the save; ``{job_id}`` is replaced by
            ``$SLURM_JOB_ID``. Empty = do not requeue (just save and stop). Outside SLURM
            (no job id) nothing is run.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1",), stop_signals: tuple[str, ...] = ("SIGTERM",),
                 requeue_command: str = "scontrol requeue {job_id}"):
        self.signals = tuple(signals)
        self.stop_signals = tuple(stop_signals)
        self.requeue_command = requeue_command
        overlap = set(self.signals) & set(self.stop_signals)
        if overlap:
            raise ValueError(f"callbacks.preemption: {sorted(overlap)} in both signals (requeue) and stop_signals")
        self.requested = 0  # REQUEUE or STOP once a signal came
        self.preempted_at: int | None = None
        self.stopped_at: int | None = None
        self._main_pid = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        # Forked DataLoader workers inherit the handler; only the training process reacts.
        if os.getpid() == self._main_pid:
            wants = STOP if signal.Signals(signum).name in self.stop_signals else REQUEUE
            self.requested = max(self.requested, wants)

    def on_train_start(self, trainer, pl_module) -> None:
        self._main_pid = os.getpid()
        for name in (*self.signals, *self.stop_signals):
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self.preempted_at is None:
            return
        # The requeue ends this job at once, so the checkpoint is committed first (it waits for
        # the step's metrics row, logged after on_train_batch_end).
        checkpointer = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
        if checkpointer is not None:
            checkpointer.commit(trainer)
        job_id = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and job_id and self.requeue_command:
            self.requeue(job_id, self.preempted_at)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches):
            return  # only between optimiser steps
        flag = torch.tensor(float(self.requested), device=pl_module.device)
        wants = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if wants <= 0:
            return
        step = trainer.global_step
        if wants == STOP:
            log.warning("stop signal received (scancel, time limit or shutdown): saving step %d on every rank, then "
                        "stopping without requeueing", step)
        else:
            log.warning("preemption signal received: saving step %d on every rank, then stopping", step)
        checkpointer = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
        if checkpointer is not None and checkpointer.last_saved_step != step:
            checkpointer.save(trainer, step)
        trainer.should_stop = True
        if wants == STOP:
            self.stopped_at = step
            return
        self.preempted_at = step  # requeued in on_train_end, once the checkpoint is committed

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
