"""Loading adapter weights into a :class:`FantasyTalkingDiT` from a training checkpoint.

Accepted today: a Lightning ``.ckpt`` file written by ``ft-train`` (its ``state_dict`` holds the
network under the ``net.`` prefix; frozen backbone weights are left out). The released
``fantasytalking_model.ckpt`` and exported bundles are added by the export issue.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .fantasytalking import FantasyTalkingDiT

NET_PREFIX = "net."


def read_state_dict(path: str | Path, key: str = "init_from") -> dict[str, torch.Tensor]:
    """The network state dict inside a Lightning checkpoint, with the ``net.`` prefix removed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"{key}: cannot read {path} as a torch checkpoint ({exc.__class__.__name__}: {exc})") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{key}: {path} holds no state_dict")
    return {k[len(NET_PREFIX):] if k.startswith(NET_PREFIX) else k: v for k, v in state.items()}


def load_adapter_weights(model: FantasyTalkingDiT, path: str | Path, key: str = "init_from") -> list[str]:
    """Copy every adapter tensor from ``path`` into ``model``; also backbone tensors it holds.

    Fails with one line naming the file when an adapter tensor is missing or has another shape
    (e.g. a checkpoint of a different model size). Returns the loaded keys.
    """
    state = read_state_dict(path, key)
    own = model.state_dict()
    adapter_keys = set(model.adapter_state_dict())
    missing = sorted(adapter_keys - state.keys())
    if missing:
        raise KeyError(f"{key}: {path} lacks {len(missing)} adapter tensors (first: {missing[0]}); is it an ft_train checkpoint?")
    loaded = []
    for name, value in state.items():
        if name not in own:
            continue
        if own[name].shape != value.shape:
            raise ValueError(
                f"{key}: {path} has {name} of shape {tuple(value.shape)}, the model expects {tuple(own[name].shape)} "
                "(checkpoint from another model size?)"
            )
        loaded.append(name)
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return loaded
