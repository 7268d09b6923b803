"""Activation checkpointing of the DiT blocks, applied to a built network.

Every block is recomputed in backward except the last ``checkpoint_keep`` (their backward runs
first, so their activations are freed first). A recomputed block keeps only its input, on the
device (torch's non-reentrant checkpoint), in pinned host memory (``checkpoint_offload``:
:class:`HostOffloadCheckpoint`), or with its self-attention outputs too
(``checkpoint_save_attention``: selective checkpointing). ``checkpoint_keep="auto"`` keeps the
last block in the first training step, measures what it left allocated, and then keeps as many
blocks as the memory budget allows (:func:`auto_checkpoint_keep`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.utils.checkpoint
from torch import nn

from .options import SpeedOptions
from .state import add_forward_check, speed_state

if TYPE_CHECKING:
    from ..models.adapter import AdapterContext
    from ..models.fantasytalking import FantasyTalkingDiT


def set_checkpointing(net: FantasyTalkingDiT, enabled: bool, keep: int | str = 0, offload: bool = False,
                      save_attention: bool = False, memory_gib: float | None = None) -> None:
    """Turn block checkpointing on (``keep`` blocks not recomputed, or ``"auto"``; ``offload``,
    ``save_attention`` as in :class:`~.options.SpeedOptions`) or off (``enabled=False``: every
    block stores its activations)."""
    state = speed_state(net)
    state.kept_block_bytes.clear()
    state.auto_start_bytes = None
    if not enabled:
        net.transformer.disable_gradient_checkpointing()
        state.checkpoint_keep, state.checkpoint_offload, state.checkpoint_save_attention = 0, False, False
        state.checkpoint_auto, state.checkpoint_memory_gib = False, None
        return
    SpeedOptions(gradient_checkpointing=True, checkpoint_keep=keep, checkpoint_offload=offload,
                 checkpoint_save_attention=save_attention).validate(num_blocks=net.num_blocks)
    state.checkpoint_auto = keep == "auto"
    state.checkpoint_memory_gib = memory_gib
    if state.checkpoint_auto:
        keep = 1  # keep the last block first, to measure what a kept block costs
        add_forward_check(net, "checkpoint_auto", _note_start)
    state.checkpoint_keep, state.checkpoint_offload = int(keep), bool(offload)
    state.checkpoint_save_attention = bool(save_attention)
    install_checkpointing(net)


def install_checkpointing(net: FantasyTalkingDiT) -> None:
    """(Re)install the block checkpoint function for the network's current settings (after
    compiling changes what a saving checkpoint must be compiled with)."""
    state = speed_state(net)
    blocks = list(net.transformer.blocks)
    kept = frozenset(id(b) for b in blocks[len(blocks) - state.checkpoint_keep:])
    compile_options = state.compile_options if state.checkpoint_save_attention else None
    net.transformer.enable_gradient_checkpointing(
        BlockCheckpoint(kept, net.adapter_context if state.checkpoint_offload else None, state.checkpoint_save_attention,
                        compile_options, measure=state.kept_block_bytes if state.checkpoint_auto else None)
    )


def _note_start(net: FantasyTalkingDiT, hidden_states: torch.Tensor) -> None:
    state = speed_state(net)
    if state.checkpoint_auto and state.auto_start_bytes is None and torch.is_grad_enabled():
        state.auto_start_bytes = allocated_bytes(hidden_states.device)


def kept_block_bytes(net: FantasyTalkingDiT) -> int | None:
    """The largest activation memory one kept block left allocated so far (auto sizing)."""
    measured = speed_state(net).kept_block_bytes
    return max(measured) if measured else None


def size_checkpointing(net: FantasyTalkingDiT, peak_bytes: int, budget_bytes: int,
                       per_block_bytes: int | None = None) -> int:
    """``checkpoint_keep="auto"``: after a training step that peaked at ``peak_bytes`` with the
    current blocks kept, keep as many more as ``budget_bytes`` leaves room for, at
    ``per_block_bytes`` each (default: the largest a kept block left allocated in that step,
    :func:`kept_block_bytes`), then stop measuring. Returns the number of blocks now kept.
    Every rank must pass the same numbers (the Lightning module reduces them first), or
    ZeRO-3's gathers in the recompute would differ between ranks."""
    per_block = per_block_bytes if per_block_bytes is not None else kept_block_bytes(net)
    keep = speed_state(net).checkpoint_keep
    if per_block is not None:
        keep += (int(budget_bytes) - int(peak_bytes)) // max(int(per_block), 1)
    return fix_checkpoint_keep(net, keep)


def fix_checkpoint_keep(net: FantasyTalkingDiT, keep: int) -> int:
    """End auto sizing with ``keep`` blocks kept (clamped to [0, blocks])."""
    state = speed_state(net)
    keep = int(min(max(keep, 0), net.num_blocks))
    state.checkpoint_auto = False  # the measuring goes with it
    state.kept_block_bytes.clear()
    state.auto_start_bytes = None
    if not net.transformer.gradient_checkpointing:
        return 0
    set_checkpointing(net, True, keep=keep, offload=state.checkpoint_offload,
                      save_attention=state.checkpoint_save_attention, memory_gib=state.checkpoint_memory_gib)
    return keep


def auto_checkpoint_keep(
    net: FantasyTalkingDiT,
    device: torch.device,
    reduce_max: Callable[..., list[int]] | None = None,
    all_ranks: Callable[[bool], bool] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Settle ``checkpoint_keep="auto"`` after a training step on ``device``: the step's peak
    (``torch.cuda.max_memory_allocated``) and a kept block's measured cost decide how many blocks
    fit in ``checkpoint_memory_gib`` (None = 90 % of the card; :func:`size_checkpointing`).
    Distributed: ``all_ranks`` (did every rank measure?) and ``reduce_max`` (the largest of each
    number over the ranks) make every rank keep the same blocks. Where nothing was measured (the
    CPU) the blocks kept so far stay. Returns the blocks kept and the numbers behind it."""
    state = speed_state(net)
    per_block = kept_block_bytes(net)
    before = state.checkpoint_keep
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        # "cuda" is the current card; the gradients below are on "cuda:<n>", which "cuda" never equals.
        device = torch.device("cuda", torch.cuda.current_device())
    measured = per_block is not None and device.type == "cuda"
    if all_ranks is not None:
        measured = bool(all_ranks(measured))
    if not measured:
        return fix_checkpoint_keep(net, before), {"measured": False, "kept_before": before}
    peak = torch.cuda.max_memory_allocated(device)
    # What the first step left allocated that was not there when it began is the optimizer's state
    # (AdamW creates its moments in its first step(), after backward's peak) and the gradients
    # still held: every later step's backward has the state too. The gradients of that step were
    # already growing at its peak, so only the state is added.
    optimizer_state = 0
    if state.auto_start_bytes is not None:
        grads = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters()
                    if p.grad is not None and p.grad.device == device)
        optimizer_state = max(torch.cuda.memory_allocated(device) - state.auto_start_bytes - grads, 0)
    peak += optimizer_state
    if state.checkpoint_memory_gib:
        budget = int(float(state.checkpoint_memory_gib) * 2**30)
    else:
        budget = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    if reduce_max is not None:
        peak, per_block = reduce_max(peak, per_block)
    keep = size_checkpointing(net, peak, budget, per_block)
    return keep, {"measured": True, "kept_before": before, "peak_bytes": int(peak), "state_bytes": int(optimizer_state),
                  "per_block_bytes": int(per_block), "budget_bytes": budget}


# torch's SDPA kernels (aten ops): the ones whose outputs ``checkpoint_save_attention`` keeps.
_SDPA_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)
)


def _save_self_attention(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: keep the outputs of self-attention SDPA calls (queries and
    keys of one length: the video tokens), recompute everything else. Cross-attention (text,
    image, audio windows: short keys) is cheap to recompute and its outputs would cost as much
    memory as self-attention's."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _SDPA_OPS and args[1].shape[-2] == args[0].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_saving_attention(block: nn.Module, *args: Any) -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return torch.utils.checkpoint.checkpoint(
        block, *args, use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, _save_self_attention),
    )


class BlockCheckpoint:
    """diffusers' per-block gradient-checkpointing function (``enable_gradient_checkpointing``).

    Blocks in ``kept`` (their ids) run plainly and store their activations; the others are
    recomputed in backward: plainly (torch's non-reentrant checkpoint), from a host copy of their
    input (``offload_context`` given: :class:`HostOffloadCheckpoint`), or keeping their
    self-attention outputs (``save_attention``: selective checkpointing, :func:`_save_self_attention`).
    A selective policy must see the attention op, which a compiled block hides; so with
    ``compile_options`` (the model's blocks are compiled) the checkpointed call itself is compiled
    with them, and the policy becomes part of the compiled graph.
    """

    def __init__(self, kept: frozenset[int], offload_context: AdapterContext | None, save_attention: bool,
                 compile_options: dict[str, Any] | None = None, measure: list[int] | None = None):
        self.kept, self.offload_context, self.measure = kept, offload_context, measure
        call = _recompute_saving_attention if save_attention else None
        if call is not None and compile_options is not None:
            call = torch.compile(call, **compile_options)
        self.saving_call = call

    def __call__(self, block: nn.Module, *args: Any) -> Any:
        if id(block) in self.kept:
            if self.measure is None or not torch.is_grad_enabled():
                return block(*args)
            # Auto sizing: what the kept block leaves allocated is its saved activations (plus
            # its output, which a recomputed block keeps too).
            device = args[0].device
            before = allocated_bytes(device)
            out = block(*args)
            if before is not None:
                self.measure.append(allocated_bytes(device) - before)
            return out
        if self.offload_context is not None:
            hidden, encoder, temb, rotary = args
            c = self.offload_context
            return HostOffloadCheckpoint.apply(
                block, rotary, c, _GRAD_ANCHOR.get(hidden.device), hidden, encoder, temb, c.audio, c.identity
            )
        if self.saving_call is not None:
            return self.saving_call(block, *args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)


def allocated_bytes(device: torch.device) -> int | None:
    """Memory held by tensors on ``device`` (CUDA's caching allocator); None where torch does not
    count it (the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device)


_COPY_STREAMS: dict[torch.device, Any] = {}


def copy_stream(device: torch.device):
    """The side stream that moves offloaded activations of ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


class HostCopy:
    """One recomputed block's input, kept in host memory between its forward and its backward.

    On CUDA both copies run on a side stream (:func:`copy_stream`), so the blocks' kernels never
    wait for PCIe: the copy out starts once the tensor is computed, and its device memory is not
    reused before the copy ends (``record_stream``); the copy back is started one block ahead
    (:meth:`prefetch`, called by the later block's backward) and the compute stream waits only
    for its event (:meth:`take`). ``prev`` links the copies of one forward pass in block order.
    """

    def __init__(self, tensor: torch.Tensor, prev: "HostCopy | None" = None):
        self.prev, self.device, self.requires_grad = prev, tensor.device, tensor.requires_grad
        self.shape, self.dtype = tensor.shape, tensor.dtype
        self.stream = copy_stream(tensor.device)
        self.loaded: torch.Tensor | None = None
        self.event = None
        if self.stream is None:
            self.host = to_host(tensor)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.host = to_host(tensor)
        tensor.record_stream(self.stream)

    def prefetch(self) -> None:
        """Start copying the tensor back to its device (once)."""
        if self.loaded is not None or self.host is None:
            return
        if self.stream is None:
            self.loaded, self.host = self.host.to(self.device), None
            return
        # Allocated in the compute stream's order, written on the side stream after the compute
        # work queued so far (which may still use this memory's previous owner).
        self.loaded = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.loaded.copy_(self.host, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(self.stream)
        self.host = None  # the pinned buffer returns to torch's host cache once the copy ends

    def take(self) -> torch.Tensor:
        """The tensor on its device, ready for the compute stream; the copy lets go of it."""
        self.prefetch()
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)
        tensor, self.loaded, self.event = self.loaded, None, None
        return tensor.requires_grad_(self.requires_grad)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor``: pinned and asynchronous from a GPU (stream order keeps it safe: the
    copy is queued before any later kernel can reuse the source's memory)."""
    if tensor.device.type == "cpu":
        return tensor.detach().clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor.detach(), non_blocking=True)
    return host


class _GradAnchors:
    """One empty tensor per device that requires grad: an input of every offloaded block, so its
    backward runs even when no real input needs a gradient (the first block of a frozen backbone),
    and the adapter weights inside it still get theirs."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Tensor:
        if device not in self._by_device:
            self._by_device[device] = torch.empty(0, device=device, requires_grad=True)
        return self._by_device[device]


_GRAD_ANCHOR = _GradAnchors()


class HostOffloadCheckpoint(torch.autograd.Function):
    """Activation checkpointing of one DiT block whose input hidden states wait in host memory.

    Forward runs the block without grad and keeps only a host copy of ``hidden`` (the largest
    thing full checkpointing keeps per block: S × d, 0.74 GiB at 720×1280×81 for 14B,
    :class:`HostCopy`); backward takes it back, re-runs the block with grad under the forward's
    autocast state and back-propagates through it, while the previous block's input is copied in. The text/image context and the time projection are small and stay
    on the device. The blocks have no dropout, so the recompute needs no RNG state.

    The processors read the projected audio tokens and the ID tokens from the shared
    :class:`AdapterContext`; they are inputs here too, so the recompute runs on detached copies
    and their gradients leave through this function instead of back-propagating (once per block)
    into the graph outside the block.
    """

    @staticmethod
    def forward(ctx, block, rotary, context, anchor, hidden, encoder, temb, audio, identity):  # noqa: D102
        device_type = hidden.device.type
        ctx.block, ctx.rotary, ctx.context, ctx.device = block, rotary, context, hidden.device
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.hidden = HostCopy(hidden, context.last_offload)
        context.last_offload = ctx.hidden
        ctx.save_for_backward(encoder, temb, audio, identity)
        with torch.no_grad():
            return block(hidden, encoder, temb, rotary)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        def leaf(t):
            return None if t is None else t.detach().requires_grad_(t.requires_grad)

        encoder, temb, audio, identity = ctx.saved_tensors
        hidden = ctx.hidden.take()
        if ctx.hidden.prev is not None:  # the next backward's input: copied in while this block runs
            ctx.hidden.prev.prefetch()
        inputs = [hidden, leaf(encoder), leaf(temb), leaf(audio), leaf(identity)]
        context = ctx.context
        outer = context.audio, context.identity
        context.audio, context.identity = inputs[3], inputs[4]
        device_type, enabled, dtype = ctx.autocast
        try:
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                out = ctx.block(*inputs[:3], ctx.rotary)
            torch.autograd.backward(out, grad_out)
        finally:
            context.audio, context.identity = outer
        grads = [x.grad if x is not None and x.requires_grad else None for x in inputs]
        return (None, None, None, None, *grads)
