"""Which attention kernels the network runs: a diffusers backend for every attention
(``attention_backend``) and a torch SDPA kernel for the video self-attention
(``self_attention_kernel``), fixed or timed at the first forward (``auto``).

The video self-attention (every block's ``attn1``: S × S) is most of the model's attention work,
and torch's own kernel order depends on the card and the libraries, so it can be pinned or
measured here without touching the adapter's cross-attention.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from .options import SDPA_KERNELS, SpeedOptions, check_kernel_device
from .state import add_forward_check, speed_state

if TYPE_CHECKING:
    from ..models.fantasytalking import FantasyTalkingDiT

log = logging.getLogger(__name__)

# diffusers' process-wide attention backend at import (DIFFUSERS_ATTN_BACKEND, default native SDPA).
_DEFAULT_ATTENTION_BACKEND = _AttentionBackendRegistry.get_active_backend()[0]
AUTO_KERNELS = ("flash", "cudnn", "efficient")  # what self_attention_kernel=auto times


def set_attention_backend(net: FantasyTalkingDiT, backend: str | None) -> None:
    """Route every attention (self, text, image, audio windows, face) through one diffusers
    backend; None restores torch SDPA's own choice. Masked audio windows always use SDPA's
    dispatch (:func:`ft_train.models.adapter.audio_attention`)."""
    try:
        if backend:
            net.transformer.set_attention_backend(backend)
        else:
            net.transformer.reset_attention_backend()
            # diffusers' reset leaves its process-wide active backend (the one processors
            # without their own backend use) at the last one set: put back the start-up default.
            _AttentionBackendRegistry.set_active_backend(_DEFAULT_ATTENTION_BACKEND)
    except ValueError as err:
        raise ValueError(f"model.attention_backend={backend!r}: {err}") from None
    speed_state(net).attention_backend = backend or None


def self_attention_kernel(net: FantasyTalkingDiT) -> str | None:
    """The SDPA kernel the video self-attention is pinned to; None = torch's choice."""
    proc = net.transformer.blocks[0].attn1.processor
    return proc.kernel if isinstance(proc, SDPAKernelProcessor) else None


def set_self_attention_kernel(net: FantasyTalkingDiT, kernel: str | None) -> None:
    """Run the video self-attention with torch SDPA's ``kernel`` (None: torch's choice; ``auto``:
    the fastest at the first forward's shape, :func:`pick_self_attention_kernel`)."""
    SpeedOptions(self_attention_kernel=kernel)
    state = speed_state(net)
    state.self_attention_auto = kernel == "auto"
    if state.self_attention_auto:
        kernel = None  # torch's choice until the first forward has timed the kernels
    for block in net.transformer.blocks:
        proc = block.attn1.processor
        inner = proc.inner if isinstance(proc, SDPAKernelProcessor) else proc
        block.attn1.set_processor(SDPAKernelProcessor(inner, kernel) if kernel else inner)
    if kernel or state.self_attention_auto:
        add_forward_check(net, "self_attention_kernel", _before_forward)


def _before_forward(net: FantasyTalkingDiT, hidden_states: torch.Tensor) -> None:
    if speed_state(net).self_attention_auto:
        pick_self_attention_kernel(net, hidden_states)
    check_kernel_device(self_attention_kernel(net), hidden_states.device.type)


def self_attention_shape(net: FantasyTalkingDiT, hidden_states: torch.Tensor) -> tuple[int, int, int, int]:
    """``(B, heads, video tokens, head_dim)`` of the self-attention for model input
    ``hidden_states`` ``(B, C, F, H, W)``."""
    cfg = net.transformer.config
    pt, ph, pw = cfg.patch_size
    b, _, f, h, w = hidden_states.shape
    return (b, cfg.num_attention_heads, (f // pt) * (h // ph) * (w // pw), cfg.attention_head_dim)


def pick_self_attention_kernel(net: FantasyTalkingDiT, hidden_states: torch.Tensor) -> str | None:
    """``self_attention_kernel="auto"``: time the :data:`AUTO_KERNELS` on the self-attention of
    ``hidden_states`` ``(B, C, F, H, W)`` (forward and backward when grad is on, the step's
    dtype) and keep the fastest; with ``torch.distributed`` up, rank 0's pick holds on every
    rank. Off CUDA, torch's choice stays. Returns the kernel kept; the timings stay in
    ``speed_state(net).self_attention_timings``."""
    state = speed_state(net)
    state.self_attention_auto = False
    device = hidden_states.device
    if device.type != "cuda":
        log.info("model.self_attention_kernel=auto: torch's choice on %s (the kernels are timed on a GPU)", device.type)
        return None
    shape = self_attention_shape(net, hidden_states)
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else net.transformer.dtype
    grad = torch.is_grad_enabled()
    times = time_sdpa_kernels(shape, dtype, device, AUTO_KERNELS, backward=grad)
    state.self_attention_default = default_kernel_at(shape, dtype, device, backward=grad)
    choice = [fastest_kernel(times)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(choice, src=0)
    set_self_attention_kernel(net, choice[0])
    state.self_attention_timings = times
    shown = ", ".join(f"{k} {t * 1e3:.1f} ms" if t is not None else f"{k} unavailable" for k, t in times.items())
    log.info("model.self_attention_kernel=auto: %s for (B, H, S, D) = %s %s (%s; torch's own choice: %s)", choice[0],
             shape, str(dtype).removeprefix("torch."), shown, state.self_attention_default)
    return choice[0]


class SDPAKernelProcessor:
    """An attention processor run with torch's SDPA restricted to one ``kernel`` (a key of
    :data:`SDPA_KERNELS`), for the video self-attention (``model.self_attention_kernel``). torch's
    own order depends on the card and the libraries: since torch 2.9 it tries cuDNN first on sm_90
    and sm_100 with cuDNN newer than 9.15 (unless ``TORCH_CUDNN_SDPA_DEPRIORITIZED=1``), flash
    first elsewhere. This fixes the kernel whatever that order, on the strided views diffusers'
    native backend passes, with no copies (diffusers' ``_native_cudnn`` backend copies q, k and v
    first). Everything else (the processor's own attributes, diffusers' backend setting) is the
    wrapped processor's."""

    _own = ("inner", "kernel", "backend")

    def __init__(self, inner: Any, kernel: str):
        from torch.nn.attention import SDPBackend

        SpeedOptions(self_attention_kernel=kernel)  # a known kernel
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "backend", getattr(SDPBackend, SDPA_KERNELS[kernel]))

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backend):
            return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)


def median_seconds(fn, device: torch.device, iters: int = 3) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after one warm-up (plans, autotuning):
    CUDA events on a GPU, the host clock elsewhere."""
    fn()
    runs = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
    return sorted(runs)[len(runs) // 2]


def time_sdpa_kernels(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, kernels: tuple[str, ...],
                      backward: bool = True, iters: int = 3) -> dict[str, float | None]:
    """Median seconds of one SDPA call (forward, and backward when ``backward``) on random
    ``(B, H, S, D)`` tensors of ``dtype`` under each of ``kernels`` (keys of :data:`SDPA_KERNELS`),
    after one warm-up; None for a kernel torch cannot run at that shape. The inputs are laid out
    as diffusers' processors pass them: (B, S, H, D) viewed as (B, H, S, D)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = shape
    g = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():
        q, k, v = (torch.randn(b, s, h, d, generator=g, device=device, dtype=dtype).transpose(1, 2).requires_grad_(backward)
                   for _ in range(3))
        grad = torch.randn(b, s, h, d, generator=g, device=device, dtype=dtype).transpose(1, 2) if backward else None

        def call():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            if backward:
                torch.autograd.backward(out, grad)
                q.grad = k.grad = v.grad = None

        times: dict[str, float | None] = {}
        for kernel in kernels:
            try:
                with sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[kernel])):
                    times[kernel] = median_seconds(call, device, iters)
            except RuntimeError as err:  # no kernel for this shape, dtype or device (or a failing one): not a pick
                log.debug("SDPA kernel %s cannot run (B, H, S, D) = %s %s: %s", kernel, shape, dtype, str(err).splitlines()[0])
                times[kernel] = None
    return times


def default_sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: torch.Tensor | None = None) -> str | None:
    """The kernel torch's SDPA dispatcher picks by itself for these inputs (a key of
    :data:`SDPA_KERNELS`, as ``torch._fused_sdp_choice`` reports it): its order depends on the
    card and the cuDNN version (:class:`SDPAKernelProcessor`). None where torch does not say."""
    try:
        choice = int(torch._fused_sdp_choice(q, k, v, attn_mask))
    except (AttributeError, RuntimeError, TypeError):
        return None
    from torch.nn.attention import SDPBackend

    names = {getattr(SDPBackend, name).value: key for key, name in SDPA_KERNELS.items()}
    return names.get(choice)


def default_kernel_at(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                      backward: bool = True) -> str | None:
    """:func:`default_sdpa_kernel` for ``(B, H, S, D)`` inputs laid out as diffusers' processors
    pass them ((B, S, H, D) viewed as (B, H, S, D)), as :func:`time_sdpa_kernels` times them."""
    b, h, s, d = shape
    with torch.inference_mode(False), torch.enable_grad():
        q, k, v = (torch.empty(b, s, h, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_(backward)
                   for _ in range(3))
        return default_sdpa_kernel(q, k, v)


def fastest_kernel(times: dict[str, float | None]) -> str | None:
    """The kernel of ``times`` (:func:`time_sdpa_kernels`) that ran fastest; None when none ran."""
    ran = {k: t for k, t in times.items() if t is not None}
    return min(ran, key=ran.get) if ran else None
