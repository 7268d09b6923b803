"""How the network runs, applied to a built one: activation checkpointing, attention kernels,
``torch.compile``, float8 frozen weights and block swap. :class:`SpeedOptions` holds the settings (the
``model.*`` speed keys) and their rules; :func:`apply` puts them on a network."""

from .apply import apply, compile_blocks, uncompile_blocks
from .block_swap import BlockSwap, auto_resident_blocks, remove_block_swap, set_block_swap
from .checkpointing import auto_checkpoint_keep, kept_block_bytes, set_checkpointing, size_checkpointing
from .attention import set_attention_backend, set_self_attention_kernel, self_attention_kernel
from .fp8 import Fp8FrozenLinear, convert_to_fp8, fp8_buffer_names, set_fp8_backward
from .options import SpeedOptions
from .state import SpeedState, speed_state

__all__ = [
    "BlockSwap",
    "Fp8FrozenLinear",
    "SpeedOptions",
    "SpeedState",
    "apply",
    "auto_checkpoint_keep",
    "auto_resident_blocks",
    "compile_blocks",
    "convert_to_fp8",
    "fp8_buffer_names",
    "kept_block_bytes",
    "remove_block_swap",
    "self_attention_kernel",
    "set_attention_backend",
    "set_block_swap",
    "set_checkpointing",
    "set_fp8_backward",
    "set_self_attention_kernel",
    "size_checkpointing",
    "speed_state",
    "uncompile_blocks",
]
