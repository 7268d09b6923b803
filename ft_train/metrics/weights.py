"""Loading metric-network weights from user-given local files, with errors people can act on.

The metric networks (FID Inception, SyncNet) are plain ``nn.Module``s whose parameter names match
the public weight files, so a file is checked key by key and shape by shape before anything is
copied. Nothing here downloads: a missing file is an error naming the path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# BatchNorm's step counter is absent from files saved before torch 0.4.1 (syncnet_v2.model most
# likely) and is never used in eval mode, so its absence is not an error.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def _short(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a plain ``{name: tensor}`` file (``torch.load`` with ``weights_only=True``).

    ``what`` names the expected file in messages (e.g. ``"SyncNet weights (syncnet_v2.model)"``).
    A ``{"state_dict": {...}}`` wrapper is unwrapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file at {path}; set the metric's weights path to a local copy")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors are unreadable to users; keep the first line only
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what}: cannot read {path} as a tensor dict ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} is not a dict of tensors (got {type(state).__name__})")
    return state


def load_weights(module: nn.Module, path: str | Path, what: str) -> nn.Module:
    """Copy the tensors of ``path`` into ``module``, refusing any mismatch in one line.

    Every key of the module must be in the file (except BatchNorm ``num_batches_tracked``), no file
    key may be unused, and every shape must match; otherwise ``ValueError`` names the file and the
    first offending keys. Returns ``module`` (in eval mode, gradients off).
    """
    state = read_state_dict(path, what)
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes (file vs model): {_short(wrong)}")
    if problems:
        raise ValueError(f"{what}: {path} does not match the expected network; " + "; ".join(problems))
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k])
    return module.eval().requires_grad_(False)
