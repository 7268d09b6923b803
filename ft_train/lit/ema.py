"""An exponential moving average of the trained weights, kept beside the run and saved with it.

The average is diffusers' ``EMAModel`` (``diffusers.training_utils``) over the trainable
parameters, in fp32 whatever the weights' dtype (DeepSpeed's bf16 weights would lose the small
updates of a decay near 1 in bf16). Its rule: the first step copies the weights, then
``ema ← d·ema + (1 − d)·w`` with ``d = min(decay, (1 + n) / (10 + n))`` for the n-th step after
the first (diffusers' default warm-up), counted in optimiser steps.

It is saved in every checkpoint under ``ft_train_ema`` (the trainable tensors by name, as in
``net.state_dict()``, plus the counters), so a resumed run continues the same average and
``ft-export ema=true`` exports it. Off by default (``callbacks.ema.decay=0``).

ZeRO-3 splits every weight over the ranks, so no rank holds a whole tensor to average: the
callback refuses that strategy (ZeRO-2 and DDP keep whole weights on every rank).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import lightning as L
import torch

from ..models.weights import EMA_KEY as CHECKPOINT_KEY

log = logging.getLogger(__name__)


class AdapterEMA(L.Callback):
    """Keep an EMA of the trainable weights (``callbacks.ema``).

    Args:
        decay: the largest decay; 0 = off (nothing is kept or saved). 0.9999 for long runs
            (the paper's stage lengths, 80k and 20k steps), lower for short fine-tunes.
        update_after_step: optimiser steps before the average starts (it starts as a copy).
    """

    def __init__(self, decay: float = 0.0, update_after_step: int = 0) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1) (0 = off), got {decay}")
        if int(update_after_step) < 0:
            raise ValueError(f"callbacks.ema.update_after_step must be >= 0, got {update_after_step}")
        self.decay = float(decay)
        self.update_after_step = int(update_after_step)
        self.ema = None  # diffusers EMAModel, made when training starts
        self.names: list[str] = []
        self._pending: dict[str, Any] | None = None  # state read from a checkpoint before the EMA exists
        self._last_step = -1

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def _trainable(self, pl_module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in pl_module.net.named_parameters() if p.requires_grad]

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        if self.enabled and getattr(trainer.strategy, "zero_stage_3", False):
            raise ValueError(
                "callbacks.ema: ZeRO-3 splits every weight over the ranks, so none holds a whole tensor to average; "
                "use strategy=deepspeed_zero2 or ddp, or callbacks.ema.decay=0"
            )

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: D102
        if not self.enabled:
            return
        from diffusers.training_utils import EMAModel

        named = self._trainable(pl_module)
        self.names = [n for n, _ in named]
        self.ema = EMAModel([p for _, p in named], decay=self.decay, min_decay=0.0,
                            update_after_step=self.update_after_step)
        self.ema.to(dtype=torch.float32)
        if self._pending is not None:
            self._restore(self._pending, named)
            self._pending = None
        self._last_step = trainer.global_step
        log.info("callbacks.ema: averaging %d trainable tensors (decay %g, from step %d)",
                 len(self.names), self.decay, self.ema.optimization_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        # Once per optimiser step taken: under accumulation, or when a non-finite step was
        # skipped, global_step does not move and neither does the average.
        if self.ema is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        self.ema.step([p for _, p in self._trainable(pl_module)])

    @contextlib.contextmanager
    def average_in_place(self, trainer, pl_module):
        """Within the block the trainable weights hold the average (this step's update included);
        afterwards they are exactly what they were (``callbacks.validation.ema``)."""
        if self.ema is None:
            raise ValueError("callbacks.ema: no average is kept (callbacks.ema.decay=0, or training has not started)")
        self.on_train_batch_end(trainer, pl_module, None, None, 0)  # a no-op when this step's update ran
        params = [p for _, p in self._trainable(pl_module)]
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by ``net.state_dict()`` name (fp32, on the weights' devices)."""
        if self.ema is None:
            return {}
        return dict(zip(self.names, self.ema.shadow_params))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        if self.ema is None:
            return
        checkpoint[CHECKPOINT_KEY] = {
            "weights": {n: t.detach().to("cpu", copy=True) for n, t in self.averaged().items()},
            "optimization_step": int(self.ema.optimization_step),
            "decay": self.decay,
            "update_after_step": self.update_after_step,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            if self.enabled:
                log.warning("callbacks.ema: the checkpoint holds no average; it starts again from the current weights")
            return
        if not self.enabled:
            log.warning("callbacks.ema: the checkpoint holds an average but callbacks.ema.decay=0; it is dropped")
            return
        if self.ema is not None:  # DeepSpeed restores after the fit has started
            self._restore(state, self._trainable(pl_module))
        else:  # the others before: on_fit_start restores it
            self._pending = state

    def _restore(self, state: dict[str, Any], named: list[tuple[str, torch.nn.Parameter]]) -> None:
        weights = state["weights"]
        missing = [n for n, _ in named if n not in weights]
        if missing:
            raise ValueError(
                f"callbacks.ema: the checkpoint's average lacks {len(missing)} of the trainable tensors "
                f"(first: {missing[0]}); the trainable set changed since it was saved. Resume with the same "
                "model settings, or start a new run"
            )
        self.ema.shadow_params = [weights[n].to(device=p.device, dtype=torch.float32) for n, p in named]
        self.ema.optimization_step = int(state["optimization_step"])
