"""``apply(net, options)``: put a :class:`~.options.SpeedOptions` on a built network.

The network is a plain DiT + adapters; how it runs (checkpointing, kernels, compile, fp8, block
swap) is applied from outside, as torchtitan parallelises and converts a built model. ``apply`` may be
called again on the same network with other options (the train-step bench does, case after
case); fp8 is one-way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..models.lora import backbone_trains
from .attention import set_attention_backend, set_self_attention_kernel
from .block_swap import remove_block_swap, set_block_swap
from .checkpointing import install_checkpointing, set_checkpointing
from .fp8 import convert_to_fp8, set_fp8_backward
from .options import SpeedOptions
from .state import SpeedState, speed_state

if TYPE_CHECKING:
    from ..models.fantasytalking import FantasyTalkingDiT


def apply(net: FantasyTalkingDiT, options: SpeedOptions) -> SpeedState:
    """Set every speed option of ``net`` to ``options`` (checked against the network first:
    its block count, whether its backbone trains). Returns what is now in force."""
    state = speed_state(net)
    trains = backbone_trains(net)  # a trained LoRA (model.lora) leaves the backbone frozen
    options.validate(train_backbone=trains, num_blocks=net.num_blocks)
    lora = getattr(net, "lora_config", None)
    if options.checkpoint_offload and lora is not None and lora.enabled and lora.dropout:
        raise ValueError(f"model.lora.dropout={lora.dropout} with model.checkpoint_offload=true: the offloaded blocks' "
                         "recompute would draw other dropout masks; set model.lora.dropout=0 or model.checkpoint_offload=false")
    if state.frozen_fp8 and not options.frozen_fp8:
        raise ValueError("model.frozen_fp8=false: this network's blocks are float8 already (one-way); build it again")
    remove_block_swap(net)  # every block back on the device first; installed again last, on the final modules
    if options.frozen_fp8 and not state.frozen_fp8:
        if state.compile_options is not None:
            uncompile_blocks(net)  # fp8 converts eager blocks; compiled again below
        convert_to_fp8(net, backward=options.frozen_fp8_backward)
    elif options.frozen_fp8:
        set_fp8_backward(net, options.frozen_fp8_backward)
    if options.gradient_checkpointing:
        set_checkpointing(net, True, keep=options.checkpoint_keep, offload=options.checkpoint_offload,
                          save_attention=options.checkpoint_save_attention, memory_gib=options.checkpoint_memory_gib)
    elif net.transformer.gradient_checkpointing:
        set_checkpointing(net, False)
    if options.attention_backend or state.attention_backend:
        set_attention_backend(net, options.attention_backend)
    set_self_attention_kernel(net, options.self_attention_kernel)
    if options.compile_blocks and state.compile_options is None:
        compile_blocks(net)
    elif not options.compile_blocks and state.compile_options is not None:
        uncompile_blocks(net)
    set_block_swap(net, options.block_swap_resident, options.block_swap_prefetch, options.checkpoint_memory_gib)
    return state


def compile_blocks(net: FantasyTalkingDiT, **options: Any) -> None:
    """``torch.compile`` every DiT block in place (``nn.Module.compile``; ``options`` go to
    ``torch.compile``). The blocks have one structure, so they share the compiled code;
    activation checkpointing recomputes the compiled block."""
    for block in net.transformer.blocks:
        block.compile(**options)
    state = speed_state(net)
    state.compile_options = dict(options)
    if net.transformer.gradient_checkpointing and state.checkpoint_save_attention:
        install_checkpointing(net)  # the saving checkpoint is compiled with the blocks


def uncompile_blocks(net: FantasyTalkingDiT) -> None:
    """Undo :func:`compile_blocks`: the blocks run eagerly again."""
    for block in net.transformer.blocks:
        block._compiled_call_impl = None  # what nn.Module.compile set; torch has no public undo
    state = speed_state(net)
    state.compile_options = None
    if net.transformer.gradient_checkpointing and state.checkpoint_save_attention:
        install_checkpointing(net)
