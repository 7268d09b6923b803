"""A torchmetrics ``Metric`` that owns a frozen network: always eval, never in checkpoints."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchmetrics import Metric


class FrozenNetMetric(Metric):
    """Base for metrics that run a pretrained network (Inception, I3D, SyncNet) held as ``self.net``.

    The network is a submodule, so it follows ``.to(device)``; it stays in eval mode whatever
    ``train()`` is called with (Lightning calls it on every fit loop, and BatchNorm in train mode
    would use batch statistics); and it is dropped from ``state_dict()`` and not expected by
    ``load_state_dict()``, so training checkpoints do not carry ~100 MB of metric weights.
    """

    def __init__(self, net: nn.Module, **kwargs: Any):
        super().__init__(**kwargs)
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenNetMetric":
        super().train(mode)
        self.net.eval()
        return self

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):  # type: ignore[override]
        out = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for k in [k for k in out if k.startswith(prefix + "net.")]:
            del out[k]
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # Submodules load after this call from the same dict: hand the network its own current
        # tensors so a checkpoint without them (see state_dict) loads under strict=True.
        for k, v in self.net.state_dict(prefix=prefix + "net.", keep_vars=True).items():
            state_dict.setdefault(k, v)
