"""Fault injection for tests (importable by ft-train subprocesses via PYTHONPATH)."""

import os

from ft_train.diffusion import FlowMatchingLoss


class NaNLoss(FlowMatchingLoss):
    """FlowMatchingLoss whose value is NaN on chosen calls (1-based), optionally on one rank only."""

    def __init__(self, nan_calls=(), nan_rank=None, **kwargs):
        super().__init__(**kwargs)
        self.nan_calls = set(nan_calls)
        self.nan_rank = nan_rank
        self.calls = 0

    def __call__(self, model, batch, generator):
        out = super().__call__(model, batch, generator)
        self.calls += 1
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        if self.calls in self.nan_calls and (self.nan_rank is None or rank == self.nan_rank):
            out.loss = out.loss * float("nan")
        return out


class SignalAt:
    """Lightning callback that sends this process a signal when a given step starts."""

    def __new__(cls, step, signal_name="SIGUSR1"):
        import signal

        import lightning as L

        class _SignalAt(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    os.kill(os.getpid(), getattr(signal, signal_name))

        return _SignalAt()


class KillAfterCommit:
    """Lightning callback that SIGKILLs this process the moment the step checkpoint of ``step``
    is committed (renamed into place): a crash right after a commit, as a node failure would."""

    def __new__(cls, step):
        import signal

        import lightning as L

        from ft_train.lit.checkpointing import StepCheckpoint

        class _KillAfterCommit(L.Callback):
            def setup(self, trainer, pl_module, stage):
                checkpointer = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoint))
                commit = checkpointer.commit

                def commit_then_die(trainer):
                    folder = commit(trainer)
                    if folder is not None and folder.name == f"step-{step:08d}":
                        os.kill(os.getpid(), signal.SIGKILL)
                    return folder

                checkpointer.commit = commit_then_die

        return _KillAfterCommit()
