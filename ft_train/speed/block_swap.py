"""Block swap: the frozen DiT blocks' weights wait in host memory and come to the device one
block at a time (``model.block_swap_resident``), so the 14B backbone need not fit on the card.

The last ``resident`` blocks stay on the device (they end the forward pass and start backward);
each other block keeps its frozen parameters and buffers (the float8 bits and scales under
``frozen_fp8``) in host memory, pinned on CUDA, and its module's own parameters point at size-0
placeholders. A wrapper of the block's ``forward`` puts freshly copied device tensors into its
modules for the call and the placeholders back after it, so afterwards only what autograd saved
holds them (nothing for a checkpointed block's first pass; its recompute's saved tensors until
its backward has run). The copies of the next ``block_swap_prefetch`` blocks in the direction of
travel (forward: up; activation-checkpoint recompute in backward: down) start on a side CUDA
stream while the current block computes. Trainable tensors (the audio adapter, identity, motion,
a LoRA's A/B) are never swapped.

``auto`` (:func:`auto_resident_blocks`) estimates at the first forward how many blocks fit in
the device memory left after the trainable parts, their optimizer state and the activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .options import SpeedOptions
from .state import add_forward_check, speed_state

if TYPE_CHECKING:
    from ..models.fantasytalking import FantasyTalkingDiT

_WEIGHT_STREAMS: dict[torch.device, Any] = {}


def weight_stream(device: torch.device):
    """The side stream that copies swapped weights to ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    if device not in _WEIGHT_STREAMS:
        _WEIGHT_STREAMS[device] = torch.cuda.Stream(device)
    return _WEIGHT_STREAMS[device]


@dataclass
class _Slot:
    """One swapped tensor: where it lives in its module, its placeholder and its host copy."""

    module: nn.Module
    kind: str  # "_parameters" or "_buffers"
    name: str
    placeholder: torch.Tensor  # what the module holds between calls (size 0, device and dtype tracked)
    host: torch.Tensor


@dataclass
class _SwappedBlock:
    index: int
    slots: list[_Slot]
    nbytes: int
    loaded: list[torch.Tensor] | None = None  # device copies, in slot order (pending or in use)
    event: Any = None


@dataclass
class BlockSwap:
    """What block swap installed on one network (``speed_state(net).block_swap``)."""

    resident: int
    prefetch: int
    blocks: dict[int, _SwappedBlock] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    last: int | None = None  # the last block index run (direction of travel)
    live: int = 0  # swapped blocks whose device copies this swapper holds now
    max_live: int = 0  # ... the most at once since install (or reset)
    loads: int = 0  # host → device block copies made

    # -- copies ---------------------------------------------------------------------------
    def _load(self, block: _SwappedBlock) -> None:
        """Start the host → device copy of ``block`` (on the side stream on CUDA), outside any
        dispatch mode the block runs under (selective checkpointing's would record the copies)."""
        if block.loaded is not None:
            return
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), torch.no_grad():
            self._copy_in(block)
        self.loads += 1
        self.live += 1
        self.max_live = max(self.max_live, self.live)

    def _copy_in(self, block: _SwappedBlock) -> None:
        for slot in block.slots:  # between calls the module holds the placeholder, moved with it by .to()
            slot.placeholder = getattr(slot.module, slot.kind)[slot.name]
        device = block.slots[0].placeholder.device
        stream = weight_stream(device)
        loaded = []
        if stream is None:  # CPU: distinct "device" tensors all the same, so the swap is testable
            for slot in block.slots:
                loaded.append(slot.host.to(slot.placeholder.dtype, copy=True))
        else:
            for slot in block.slots:
                if slot.host.dtype != slot.placeholder.dtype:  # the network was cast after install
                    slot.host = slot.host.to(slot.placeholder.dtype)
                if not slot.host.is_pinned():
                    slot.host = slot.host.pin_memory()
            # Allocated in the compute stream's order, written on the side stream after the work
            # queued so far (which may still use this memory's previous owner).
            loaded = [torch.empty(s.host.shape, dtype=s.host.dtype, device=device) for s in block.slots]
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for dst, slot in zip(loaded, block.slots):
                    dst.copy_(slot.host, non_blocking=True)
                block.event = torch.cuda.Event()
                block.event.record(stream)
        block.loaded = loaded

    def _drop(self, block: _SwappedBlock) -> None:
        if block.loaded is not None:
            if block.event is not None:  # a copy never waited for: its memory is not reused before it ends
                torch.cuda.current_stream(block.loaded[0].device).wait_event(block.event)
            block.loaded, block.event = None, None
            self.live -= 1

    # -- hooks ----------------------------------------------------------------------------
    def before(self, index: int) -> None:
        """Block ``index`` is about to run: its weights in place, the next blocks' copies started."""
        last, self.last = self.last, index
        step = 1 if last is None or index > last or index == 0 and last == 0 else -1
        ahead = [index + step * k for k in range(1, self.prefetch + 1)]
        for i, block in self.blocks.items():  # a pending copy the run will not reach (direction changed)
            if i != index and i not in ahead:
                self._drop(block)
        block = self.blocks.get(index)
        if block is not None:
            self._load(block)
            if block.event is not None:
                torch.cuda.current_stream(block.loaded[0].device).wait_event(block.event)
                block.event = None
            for slot, tensor in zip(block.slots, block.loaded):
                getattr(slot.module, slot.kind)[slot.name] = tensor
        for i in ahead:
            if i in self.blocks:
                self._load(self.blocks[i])

    def after(self, index: int) -> None:
        """Block ``index`` ran: its modules hold the placeholders again; only autograd keeps the copies."""
        block = self.blocks.get(index)
        if block is None:
            return
        for slot in block.slots:
            getattr(slot.module, slot.kind)[slot.name] = slot.placeholder
        self._drop(block)

    def start_forward(self) -> None:
        self.last = None


class _SwappingForward:
    """The block's ``forward`` for the swap: weights in before the call, placeholders back after it
    however it ends. Not a forward hook: the checkpoint's recompute stops a block's forward
    early (by an exception) once backward has what it needs, and a forward hook would never run."""

    def __init__(self, block: nn.Module, swap: BlockSwap, index: int):
        self.block, self.inner = block, block.forward
        self.swap, self.index = swap, index
        block.forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.swap.before(self.index)
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.swap.after(self.index)

    def remove(self) -> None:
        if self.block.__dict__.get("forward") is self:
            del self.block.forward


def swapped_tensors(block: nn.Module, keep: set[int]) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """The frozen tensors of ``block`` that swap: every parameter that does not require grad and
    every buffer, except those in ``keep`` (ids: the trained adapters and LoRA) and LoRA layers'."""
    found = []
    for name, module in block.named_modules():
        if ".lora_" in f".{name}":
            continue
        for kind in ("_parameters", "_buffers"):
            for key, tensor in getattr(module, kind).items():
                if tensor is None or id(tensor) in keep or tensor.numel() == 0:
                    continue
                if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                    continue
                found.append((module, kind, key, tensor))
    return found


def _trainable_ids(net: FantasyTalkingDiT) -> set[int]:
    keep = {id(p) for p in net.parameters() if p.requires_grad}
    for module in net.adapter_modules().values():
        keep |= {id(p) for p in module.parameters()}
    keep |= {id(p) for _, p in net.lora_state()}
    return keep


def block_bytes(net: FantasyTalkingDiT, index: int) -> int:
    """Bytes of block ``index``'s swappable (frozen) tensors."""
    keep = _trainable_ids(net)
    return sum(t.numel() * t.element_size() for *_, t in swapped_tensors(net.transformer.blocks[index], keep))


def set_block_swap(net: FantasyTalkingDiT, resident: int | str | None, prefetch: int = 1,
                   memory_gib: float | None = None) -> None:
    """Swap all but the last ``resident`` blocks (None: none swapped; ``"auto"``: decided at the
    first forward, :func:`auto_resident_blocks`), copying ``prefetch`` blocks ahead. Called again,
    it first puts every block back on the device."""
    remove_block_swap(net)
    state = speed_state(net)
    state.block_swap_auto, state.block_swap_sizing = resident == "auto", None
    state.block_swap_prefetch, state.block_swap_memory_gib = int(prefetch), memory_gib
    if resident is None:
        return
    if resident == "auto":
        # Every block waits on the host until the first forward has sized the resident ones, so
        # moving the network to the card never needs the whole backbone there.
        add_forward_check(net, "block_swap_auto", _resolve_auto)
        resident = 0
    _install(net, int(resident), int(prefetch))


def _install(net: FantasyTalkingDiT, resident: int, prefetch: int) -> BlockSwap:
    state = speed_state(net)
    blocks = list(net.transformer.blocks)
    resident = min(max(resident, 0), len(blocks))
    swap = BlockSwap(resident=resident, prefetch=prefetch)
    keep = _trainable_ids(net)
    for index, block in enumerate(blocks[: len(blocks) - resident]):
        slots = []
        for module, kind, name, tensor in swapped_tensors(block, keep):
            with torch.no_grad():
                host = tensor.detach()
                if host.device.type != "cpu":
                    host = host.to("cpu").pin_memory()
            placeholder = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                tensor.data = placeholder  # the Parameter object stays (optimizers, DDP see the same one)
                placeholder = tensor
            getattr(module, kind)[name] = placeholder
            slots.append(_Slot(module, kind, name, placeholder, host))
        if slots:
            nbytes = sum(s.host.numel() * s.host.element_size() for s in slots)
            swap.blocks[index] = _SwappedBlock(index, slots, nbytes)
    for index, block in enumerate(blocks):
        swap.handles.append(_SwappingForward(block, swap, index))
    swap.handles.append(net.register_forward_pre_hook(lambda m, a: swap.start_forward()))
    state.block_swap = swap
    return swap


def _restore(block: _SwappedBlock) -> None:
    """Put one swapped block's weights back on the device (where its placeholders are) for good."""
    for slot in block.slots:
        slot.placeholder = getattr(slot.module, slot.kind)[slot.name]
        with torch.no_grad():
            value = slot.host.to(slot.placeholder.device, slot.placeholder.dtype, copy=True)
        if isinstance(slot.placeholder, nn.Parameter):
            slot.placeholder.data = value
            value = slot.placeholder
        getattr(slot.module, slot.kind)[slot.name] = value


def swapped_numel(net: FantasyTalkingDiT) -> int:
    """Elements of the model's weights that wait in host memory now (swapped parameters and
    float8 weight bits), which the module's own size-0 placeholders do not count."""
    from .fp8 import Fp8FrozenLinear

    swap = speed_state(net).block_swap
    if swap is None:
        return 0
    return sum(slot.host.numel() for block in swap.blocks.values() for slot in block.slots
               if slot.kind == "_parameters" or isinstance(slot.module, Fp8FrozenLinear) and slot.name == "weight_bits")


def remove_block_swap(net: FantasyTalkingDiT) -> None:
    """Put every swapped block's weights back on the device (where its placeholders are) for good."""
    state = speed_state(net)
    swap = state.block_swap
    if swap is None:
        return
    for handle in swap.handles:
        handle.remove()
    for block in swap.blocks.values():
        _restore(block)
    state.block_swap = None


# Activation estimate for ``auto`` (bytes per hidden-state element S × d of the batch, bf16):
# the block inputs checkpointing keeps (one per block, unless they wait in host memory), plus one
# recomputed block's working set in backward: about ten S × d tensors (norms, q, k, v, attention
# output, residuals) and two S × ffn_dim ones (the FFN's hidden and its activation), doubled for
# their gradients. A rough bound, meant to be checked against a measured peak on the card.
_SAFETY = 0.9  # of the memory left, the rest for the allocator's fragmentation


def estimate_resident_blocks(available: int, trainable: int, per_block: int, tokens: int, dim: int, ffn_dim: int,
                             blocks: int, offload: bool) -> tuple[int, int]:
    """The arithmetic of :func:`auto_resident_blocks`: (blocks that fit, the activation bytes reserved)."""
    per_elem = 2 * (10 + 2 * ffn_dim / dim) + (0 if offload else blocks)
    activations = int(tokens * dim * 2 * per_elem)
    room = int(_SAFETY * available) - 3 * trainable - activations
    return int(min(max(room // max(per_block, 1), 0), blocks)), activations


def auto_resident_blocks(net: FantasyTalkingDiT, hidden_states: torch.Tensor, budget_bytes: int | None = None) -> dict[str, int]:
    """How many blocks stay resident under ``block_swap_resident=auto``, from the first forward's
    input (``(B, C, F, H, W)`` latents) on a CUDA device:

      available = budget − allocated now     (budget: ``checkpoint_memory_gib`` if set; the
                                              swappable blocks are all on the host then)
                  or free now                (``torch.cuda.mem_get_info`` + what torch caches unused)
      reserve   = 3 × trainable bytes (float32 gradients + AdamW's two moments, not yet allocated)
                + tokens × d × 2 B × (blocks unless checkpoint_offload + 2 × (10 + 2 × ffn_dim / d))
      resident  = ⌊(0.9 × available − reserve) / one block's frozen bytes⌋, within [0, blocks].

    Off CUDA every block stays resident (nothing to measure, nothing to save)."""
    blocks = net.num_blocks
    device = hidden_states.device
    if device.type != "cuda":
        return {"resident": blocks}
    cfg = net.transformer.config
    pt, ph, pw = cfg.patch_size
    b, _, f, h, w = hidden_states.shape
    tokens = b * math.ceil(f / pt) * math.ceil(h / ph) * math.ceil(w / pw)
    state = speed_state(net)
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    allocated = torch.cuda.memory_allocated(device)
    if budget_bytes is not None:
        available = budget_bytes - allocated
    else:
        free, _ = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_reserved(device) - allocated
    swap = state.block_swap
    per_block = swap.blocks[0].nbytes if swap is not None and 0 in swap.blocks else block_bytes(net, 0)
    resident, activations = estimate_resident_blocks(
        available, trainable, per_block, tokens, cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim,
        blocks, state.checkpoint_offload)
    return {"resident": int(resident), "available_bytes": int(available), "activation_bytes": activations,
            "trainable_bytes": int(trainable), "block_bytes": int(per_block)}


def _resolve_auto(net: FantasyTalkingDiT, hidden_states: torch.Tensor) -> None:
    state = speed_state(net)
    if not state.block_swap_auto:
        return
    state.block_swap_auto = False
    gib = state.block_swap_memory_gib
    sizing = auto_resident_blocks(net, hidden_states, int(gib * 2**30) if gib else None)
    state.block_swap_sizing = sizing
    swap = state.block_swap
    if swap is None:
        return
    first_resident = net.num_blocks - sizing["resident"]
    for index in [i for i in swap.blocks if i >= first_resident]:
        _restore(swap.blocks.pop(index))
    swap.resident = sizing["resident"]
    if not swap.blocks:
        remove_block_swap(net)
