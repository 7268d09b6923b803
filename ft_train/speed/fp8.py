"""Float8 storage and matmuls for the frozen backbone's linear layers (``model.frozen_fp8``).

With the backbone frozen, its linear layers never need a weight gradient, so their weights can
live in float8 (e4m3, one scale per output channel): half the bf16 bytes (16 GB instead of 32 GB
for the 14B DiT), and the forward matmul runs on the tensor cores' fp8 path
(``torch._scaled_mm``, about twice bf16's peak on Hopper) with the activations quantised per token
on the fly. Backward only needs the input gradient, ``dX = dY · W``; by default it runs in the
gradient's dtype against the dequantised weight, so the gradients that reach the adapters keep
bf16 precision. With ``backward=True`` (``model.frozen_fp8_backward``) it runs in fp8 too: the
weight's per-channel scales are folded into the gradient's columns, which are then quantised per
token, against the e4m3 weight transposed for the step (a 1-byte copy of one layer's weight at a
time, nothing kept).

The quantised weights are stored as ``uint8`` buffers (the e4m3 bits) and their scales as
``int32`` (the float32 bits): neither is a floating-point tensor, so ``Module.to(dtype)``,
``.bfloat16()`` (DeepSpeed's cast) and mixed-precision plugins leave them alone while device moves
still carry them. ``_scaled_mm`` needs both matmul widths to be multiples of 16; layers that are not
stay as they are.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..models.lora import backbone_trains
from .options import SpeedOptions
from .state import add_forward_check, speed_state

if TYPE_CHECKING:
    from ..models.fantasytalking import FantasyTalkingDiT

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row or token quantises to zeros, not NaN


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (M, K) → (e4m3 values (M, K), float32 scales (M, 1)) with ``x ≈ values · scales``:
    each row is scaled so its largest magnitude maps to e4m3's largest finite value."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_SCALE) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def check_fp8_device(device: torch.device) -> None:
    """Fail clearly where ``_scaled_mm`` has no float8 kernel: CUDA GPUs before Ada/Hopper
    (compute capability 8.9). The CPU runs it (slowly: tests)."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"model.frozen_fp8=true needs float8 matmuls (compute capability 8.9+: Ada, Hopper or newer); "
            f"{name} is sm_{major}{minor}: set model.frozen_fp8=false"
        )


# Whether this torch's CPU ``_scaled_mm`` takes per-row scales. Its oneDNN path took only one scale
# per operand before torch 2.13 (2.11, the GPU image's, asserts); CUDA's has taken them on sm_89+
# since 2.5. Probed once, in eager mode, by ``convert_frozen_linears`` (or the first CPU matmul).
_CPU_ROWWISE: bool | None = None


def _probe_cpu_rowwise() -> bool:
    global _CPU_ROWWISE
    if _CPU_ROWWISE is None:
        a = torch.ones(16, 16).to(FP8)
        try:
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
            _CPU_ROWWISE = True
        except RuntimeError:
            _CPU_ROWWISE = False
    return _CPU_ROWWISE


def scaled_mm_rowwise(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, fast_accum: bool = False
) -> torch.Tensor:
    """``(a · scale_a) @ (b · scale_b)`` in bf16 for e4m3 ``a`` (M, K) and column-major ``b``
    (K, N), with float32 scales per row of ``a`` (M, 1) and per column of ``b`` (1, N): one
    ``torch._scaled_mm`` call. Where the CPU kernel takes no per-row scales (torch < 2.13), the
    same product runs as a float32 matmul of the dequantised operands."""
    if a.device.type == "cpu" and not _probe_cpu_rowwise():
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(torch.bfloat16)
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Fp8Linear(torch.autograd.Function):
    """``y = x · Wᵀ + b`` with W frozen in float8. Saves only the weight (no activation: the
    weight gets no gradient), so backward costs one matmul and no stored input."""

    @staticmethod
    def forward(ctx, x, weight_bits, scale_bits, bias, fp8_backward=False):  # noqa: D102
        out_dtype = _out_dtype(x)
        weight = weight_bits.view(FP8)  # (N, K), row-major
        scale = scale_bits.view(torch.float32)  # (1, N)
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_scale = quantize_rows(x2)
        # mat2 must be column-major: Wᵀ of the row-major (N, K) weight is exactly that. Fast
        # accumulation (Hopper's fp8 MMA without the periodic fp32 promotion) for the forward only,
        # as torchao's float8 training does by default; the input gradients keep full accumulation.
        out = scaled_mm_rowwise(xq, weight.t(), x_scale, scale, fast_accum=True)
        out = out.to(out_dtype)
        if bias is not None:
            out = out + bias.to(out_dtype)
        ctx.save_for_backward(weight_bits, scale_bits)
        ctx.x_dtype, ctx.fp8_backward = x.dtype, fp8_backward
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        weight_bits, scale_bits = ctx.saved_tensors
        scale = scale_bits.view(torch.float32)  # (1, N)
        grad2 = grad_out.reshape(-1, grad_out.shape[-1])
        k = weight_bits.shape[1]
        if ctx.fp8_backward:
            # dX = (dY · diag(s)) · W_q: scale dY's columns, quantise it per token; mat2 must be
            # column-major (N, K), i.e. the (K, N) transpose laid out row by row.
            grad_q, grad_scale = quantize_rows(grad2.float() * scale)
            weight_t = weight_bits.t().contiguous().view(FP8)  # (K, N), row-major
            ones = torch.ones(1, k, dtype=torch.float32, device=grad_out.device)
            grad_in = scaled_mm_rowwise(grad_q, weight_t.t(), grad_scale, ones)
        else:
            dtype = grad_out.dtype
            weight = weight_bits.view(FP8).to(dtype) * scale.t().to(dtype)  # (N, K)
            grad_in = grad2 @ weight
        return grad_in.reshape(*grad_out.shape[:-1], k).to(ctx.x_dtype), None, None, None, None


class Fp8FrozenLinear(nn.Module):
    """A frozen ``nn.Linear`` with its weight in float8 (see the module docstring). The bias stays
    a (frozen) parameter in the model's dtype."""

    def __init__(self, linear: nn.Linear, backward: bool = False):
        super().__init__()
        self.fp8_backward = bool(backward)
        if linear.weight.requires_grad:
            raise ValueError("model.frozen_fp8: only frozen linear layers can be stored in float8 (model.train_backbone=false)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            values, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_bits", values.view(torch.uint8))
        self.register_buffer("scale_bits", scale.t().contiguous().view(torch.int32))  # (1, N)
        self.bias = linear.bias

    @staticmethod
    def supports(linear: nn.Module) -> bool:
        return type(linear) is nn.Linear and linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer multiplies by, ``(out_features, in_features)``."""
        scale = self.scale_bits.view(torch.float32).t()
        return (self.weight_bits.view(FP8).float() * scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Linear.apply(x, self.weight_bits, self.scale_bits, self.bias, self.fp8_backward)

    def extra_repr(self) -> str:
        grads = "fp8" if self.fp8_backward else "dequantised"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, float8_e4m3, {grads} backward"


def convert_frozen_linears(root: nn.Module, backward: bool = False) -> list[str]:
    """Replace every frozen ``nn.Linear`` under ``root`` whose widths suit ``_scaled_mm`` by an
    :class:`Fp8FrozenLinear` (``backward``: its input gradient in fp8 too), in place (each weight
    is quantised on the device it is on, then its bf16 copy is freed). Returns the replaced
    modules' names, relative to ``root``.

    LoRA layers (``model.lora``, peft's ``lora.Linear``) keep their low-rank A and B as they are
    (trained, or small): only their frozen ``base_layer`` goes to float8, and the LoRA path adds
    its update in its own dtype on top of the fp8 matmul."""
    _probe_cpu_rowwise()  # here, in eager mode, before any compiled forward reads it
    replaced = []
    for name, module in list(root.named_modules()):
        if ".lora_" in f".{name}":  # peft's lora_A / lora_B containers and the layers in them
            continue
        for child_name, child in list(module.named_children()):
            if Fp8FrozenLinear.supports(child) and not child.weight.requires_grad:
                setattr(module, child_name, Fp8FrozenLinear(child, backward))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


def convert_to_fp8(net: FantasyTalkingDiT, backward: bool = False) -> list[str]:
    """Store the DiT blocks' frozen linear weights in float8 (:class:`Fp8FrozenLinear`; the
    patch/time/text embedders and the output projection stay as they are). One-way: the bf16
    weights are freed. Before compiling. ``backward``: the input gradients' matmuls in fp8 too.
    Returns the converted layers' names, relative to the blocks."""
    state = speed_state(net)
    trains = backbone_trains(net)
    SpeedOptions(frozen_fp8=True, frozen_fp8_backward=backward).validate(train_backbone=trains)
    if state.compile_options is not None:
        raise ValueError("model.frozen_fp8: convert before compile_blocks()")
    names = convert_frozen_linears(net.transformer.blocks, backward)
    state.frozen_fp8 = True
    add_forward_check(net, "frozen_fp8", lambda _, hidden: check_fp8_device(hidden.device))
    return names


def set_fp8_backward(net: FantasyTalkingDiT, enabled: bool) -> None:
    """With ``frozen_fp8``: compute the float8 layers' input gradients in fp8 (True) or in the
    gradient's dtype against the dequantised weights (False, the default)."""
    SpeedOptions(frozen_fp8=speed_state(net).frozen_fp8, frozen_fp8_backward=enabled)
    for module in net.modules():
        if isinstance(module, Fp8FrozenLinear):
            module.fp8_backward = bool(enabled)


def fp8_buffer_names(net: nn.Module) -> list[str]:
    """Names (in ``named_buffers()``) of the float8 weights and scales: identical on every rank
    (each quantises the same weights), so data parallelism need not broadcast them."""
    return [
        f"{name}.{buf}" for name, module in net.named_modules() if isinstance(module, Fp8FrozenLinear)
        for buf in ("weight_bits", "scale_bits")
    ]
