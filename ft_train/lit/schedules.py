"""Learning-rate schedules (called per optimiser step)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps`` steps, then the base LR."""
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)

