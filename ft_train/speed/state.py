"""What the speed functions applied to a network, kept on it.

The network class knows nothing of speed; ``ft_train.speed`` records on each network it changed
(attribute ``speed_state``) the settings in force and what it measures while the network runs
(auto checkpoint sizing, the timed self-attention kernels), so later calls can change one
setting and keep the others, and callers can read what was picked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class SpeedState:
    checkpoint_keep: int = 0  # blocks kept (not recomputed); auto: the blocks kept so far
    checkpoint_offload: bool = False
    checkpoint_save_attention: bool = False
    checkpoint_auto: bool = False  # checkpoint_keep=auto, not sized yet
    checkpoint_memory_gib: float | None = None
    kept_block_bytes: list[int] = field(default_factory=list)  # what each kept block left allocated
    auto_start_bytes: int | None = None  # allocated when the first measured step began
    attention_backend: str | None = None  # the diffusers backend set on every attention
    self_attention_auto: bool = False  # self_attention_kernel=auto, not picked yet
    self_attention_timings: dict[str, float | None] | None = None  # what auto measured (seconds)
    self_attention_default: str | None = None  # ... and what torch would have run by itself
    compile_options: dict[str, Any] | None = None  # None: blocks not compiled
    frozen_fp8: bool = False
    block_swap: Any = None  # the installed :class:`~.block_swap.BlockSwap`; None: every block resident
    block_swap_auto: bool = False  # block_swap_resident=auto, not sized yet
    block_swap_prefetch: int = 1
    block_swap_memory_gib: float | None = None
    block_swap_sizing: dict[str, int] | None = None  # what auto estimated (bytes, blocks)
    hooks: dict[str, Any] = field(default_factory=dict)  # forward pre-hook handles by purpose


def speed_state(net: nn.Module) -> SpeedState:
    """The network's :class:`SpeedState` (a fresh one, all off, the first time)."""
    state = net.__dict__.get("speed_state")
    if state is None:
        state = SpeedState()
        net.speed_state = state
    return state


def add_forward_check(net: nn.Module, name: str, check) -> None:
    """Run ``check(net, hidden_states)`` before every forward of ``net`` (once per ``name``):
    the few speed settings that act at run time (auto sizing, kernel picking, device checks)."""
    state = speed_state(net)
    if name in state.hooks:
        return

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        check(module, hidden)

    state.hooks[name] = net.register_forward_pre_hook(hook, with_kwargs=True)

