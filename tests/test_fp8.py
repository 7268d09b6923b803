"""model.frozen_fp8: the frozen blocks' linear layers with float8 weights and fp8 forward matmuls.

The layer is checked against a reference computed without ``_scaled_mm`` (quantise, dequantise,
float64 matmul); the model against the same model in full precision. Tests that take ``device``
also run on CUDA where there is one (the GPU session runs this file before timing fp8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ft_train.models import build_model
from ft_train.speed import fp8 as fp8_module
from ft_train.speed.fp8 import FP8_MAX, Fp8FrozenLinear, convert_frozen_linears, quantize_rows, scaled_mm_rowwise
from ft_train.speed import compile_blocks, convert_to_fp8, fp8_buffer_names, set_fp8_backward

from .test_model_speed_options import _inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def _linear(k: int = 64, n: int = 48, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(k, n, bias=bias).requires_grad_(False)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 1, n)[:, None])  # rows of very different magnitudes
    return layer


def test_row_quantisation_round_trips_within_e4m3_precision():
    x = torch.randn(32, 64, dtype=torch.float64) * torch.logspace(-3, 3, 32, dtype=torch.float64)[:, None]
    values, scale = quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (32, 1)
    # Each row's largest magnitude lands on e4m3's largest value, so no row over- or underflows.
    torch.testing.assert_close(values.float().abs().amax(-1), torch.full((32,), FP8_MAX))
    back = values.double() * scale.double()
    # e4m3 keeps 3 mantissa bits: relative rounding error ≤ 2^-4 for normal numbers; values below
    # 2^-6 of the row's scale are subnormal (absolute error ≤ 2^-10 · scale).
    err = (back - x).abs()
    assert (err <= x.abs() * 2**-4 + scale.double() * 2**-10).all()
    zeros, zero_scale = quantize_rows(torch.zeros(2, 16))
    assert torch.isfinite(zero_scale).all() and (zeros.float() == 0).all()


def test_cpu_fallback_without_per_row_scales_gives_the_kernels_product(monkeypatch):
    """torch < 2.13 (the GPU image's 2.11) has no per-row scales in its CPU ``_scaled_mm``: the
    fallback's float32 product of the dequantised operands is the kernel's, to bf16 rounding, and
    the model's fp8 layers run through it."""
    torch.manual_seed(0)
    a, sa = quantize_rows(torch.randn(24, 64) * torch.logspace(-2, 2, 24)[:, None])
    bq, sb = quantize_rows(torch.randn(32, 64))  # (N, K) row-major: its transpose is column-major
    ref = (a.double() * sa.double()) @ (bq.double() * sb.double()).T
    monkeypatch.setattr(fp8_module, "_CPU_ROWWISE", False)
    fallback = scaled_mm_rowwise(a, bq.t(), sa, sb.t().contiguous())
    assert fallback.dtype == torch.bfloat16 and fallback.shape == (24, 32)
    torch.testing.assert_close(fallback.double(), ref, rtol=2**-7, atol=1e-6)
    monkeypatch.setattr(fp8_module, "_CPU_ROWWISE", None)
    if fp8_module._probe_cpu_rowwise():  # this torch has the kernel: both give the same product
        kernel = scaled_mm_rowwise(a, bq.t(), sa, sb.t().contiguous())
        torch.testing.assert_close(kernel.double(), fallback.double(), rtol=2**-7, atol=1e-6)
    monkeypatch.setattr(fp8_module, "_CPU_ROWWISE", False)
    layer = _linear()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(layer.weight)
    expected = (xq.double() * xs.double()) @ (wq.double() * ws.double()).T + layer.bias.double()
    torch.testing.assert_close(Fp8FrozenLinear(layer)(x).double(), expected, rtol=2**-7, atol=1e-3 * expected.abs().max().item())


def test_fp8_linear_matches_a_dequantised_reference_forward_and_backward(device):
    layer = _linear().to(device)
    fp8 = Fp8FrozenLinear(layer)
    x = torch.randn(2, 5, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = fp8(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.bfloat16
    # Reference without _scaled_mm: quantise both operands the same way, multiply in float64.
    xq, xs = quantize_rows(x.detach().reshape(-1, 64))
    wq, ws = quantize_rows(layer.weight)
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()).T + layer.bias.double()
    torch.testing.assert_close(out.double().reshape(-1, 48), ref, rtol=2**-7, atol=1e-3 * ref.abs().max().item())
    # ... and it approximates the full-precision layer to fp8 accuracy.
    full = layer(x.detach().float()).reshape(-1, 48).double()
    assert (out.double().reshape(-1, 48) - full).norm() <= 0.05 * full.norm()
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_grad = grad.double().reshape(-1, 48) @ (wq.double() * ws.double())
    torch.testing.assert_close(x.grad.double().reshape(-1, 64), ref_grad, rtol=2**-7, atol=1e-2 * ref_grad.abs().max().item())
    torch.testing.assert_close(fp8.dequantized_weight(torch.float64), wq.double() * ws.double())


def test_fp8_backward_matches_its_quantised_reference(device):
    """frozen_fp8_backward: dX = quant(dY · diag(s)) · W_q in fp8, against the same quantisation
    multiplied in float64, and close to the exact input gradient."""
    layer = _linear().to(device)
    fp8 = Fp8FrozenLinear(layer, backward=True)
    x = torch.randn(2, 5, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = fp8(x)
    grad = torch.randn_like(out) * torch.logspace(-2, 2, 48, device=device).to(out.dtype)  # uneven columns
    out.backward(grad)
    wq, ws = quantize_rows(layer.weight)
    gq, gs = quantize_rows(grad.reshape(-1, 48).float() * ws.t())
    ref = (gq.double() * gs.double()) @ wq.double()
    got = x.grad.double().reshape(-1, 64)
    torch.testing.assert_close(got, ref, rtol=2**-7, atol=1e-2 * ref.abs().max().item())
    exact = grad.double().reshape(-1, 48) @ layer.weight.double()
    assert (got - exact).norm() <= 0.08 * exact.norm()
    assert "fp8 backward" in repr(fp8)


def test_fp8_weights_survive_dtype_casts_and_follow_device_moves():
    fp8 = Fp8FrozenLinear(_linear())
    bits, scale = fp8.weight_bits.clone(), fp8.scale_bits.clone()
    fp8.bfloat16()  # what DeepSpeed's bf16 engine and Module.to(dtype) do
    fp8.to(torch.float16)
    assert torch.equal(fp8.weight_bits, bits) and torch.equal(fp8.scale_bits, scale)
    assert fp8.bias.dtype == torch.float16  # the bias follows the model's dtype


def test_only_frozen_layers_with_matmul_friendly_widths_are_converted():
    root = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 24), nn.Linear(32, 32))
    root[0].requires_grad_(False)
    root[1].requires_grad_(False)  # 24 outputs: not a multiple of 16
    assert convert_frozen_linears(root) == ["0"]  # [2] still trains
    assert isinstance(root[0], Fp8FrozenLinear) and type(root[1]) is nn.Linear and type(root[2]) is nn.Linear
    with pytest.raises(ValueError, match="model.train_backbone=false"):
        Fp8FrozenLinear(nn.Linear(16, 16))


def _pair(cfg: dict, device: str, frozen_fp8_backward: bool = False, **kw):
    """The same random model twice: full precision and frozen_fp8 (adapters given values so the
    audio branch contributes)."""
    models = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = build_model(pretrained=None, transformer=cfg, audio_mode="frame", frozen_fp8=fp8,
                            frozen_fp8_backward=fp8 and frozen_fp8_backward, **kw)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.audio_kv.parameters():
                p.normal_(0, 0.05)
        models.append(model.to(device))
    return models


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def test_fp8_model_approximates_the_full_precision_model_and_its_adapter_gradients(tiny_transformer_config, device):
    full, fp8 = _pair(tiny_transformer_config, device)
    linears = sum(isinstance(m, nn.Linear) for m in full.transformer.blocks.modules())
    assert len(fp8_buffer_names(fp8)) == 2 * linears  # every block linear: weight bits + scales
    assert not any(n.startswith("transformer.blocks") and n.endswith(("to_q.weight", "proj.weight"))
                   for n in fp8.state_dict())  # the bf16 copies are gone
    assert set(fp8.adapter_state_dict()) == set(full.adapter_state_dict())
    outs, grads = [], []
    for model in (full, fp8):
        out = model(**_inputs(device))
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert _cos(outs[0], outs[1]) > 0.99
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for name in grads[0]:
        assert _cos(grads[0][name], grads[1][name]) > 0.97, name


def test_fp8_backward_model_keeps_the_adapter_gradients_close(tiny_transformer_config, device):
    full, _ = _pair(tiny_transformer_config, device)
    fp8 = _pair(tiny_transformer_config, device, frozen_fp8_backward=True)[1]
    grads = []
    for model in (full, fp8):
        model(**_inputs(device)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        assert _cos(grads[0][name], grads[1][name]) > 0.95, name
    set_fp8_backward(fp8, False)
    assert not any(getattr(m, "fp8_backward", False) for m in fp8.modules())
    with pytest.raises(ValueError, match="needs model.frozen_fp8=true"):
        set_fp8_backward(full, True)
    with pytest.raises(ValueError, match="needs model.frozen_fp8=true"):
        build_model(pretrained=None, transformer=tiny_transformer_config, frozen_fp8_backward=True)


def test_fp8_with_checkpointing_gives_the_fp8_gradients(tiny_transformer_config, device):
    """Recomputing fp8 blocks (plain, offloaded, keeping attention) computes what no
    checkpointing computes: the quantisation is deterministic."""
    cfg = dict(tiny_transformer_config, num_layers=3)
    results = []
    for kw in ({}, dict(gradient_checkpointing=True), dict(gradient_checkpointing=True, checkpoint_offload=True),
               dict(gradient_checkpointing=True, checkpoint_save_attention=True, checkpoint_keep=1)):
        model = _pair(cfg, device, **kw)[1]
        out = model(**_inputs(device))
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-6)
        for name, grad in results[0][1].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7)


def test_fp8_blocks_compile_without_a_graph_break(tiny_transformer_config):
    eager, compiled = (_pair(tiny_transformer_config, "cpu")[1] for _ in range(2))
    torch._dynamo.reset()
    compile_blocks(compiled, backend="eager", fullgraph=True)
    for model in (eager, compiled):
        model(**_inputs("cpu")).square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_fp8_with_saved_attention_in_a_compiled_checkpoint(tiny_transformer_config, device):
    """The GPU bench's +compile+sac+fp8bwd: the fp8 autograd function (fp8 backward too) inside
    the compiled, selectively checkpointed call (AOTAutograd partitions it) gives the eager fp8
    gradients."""
    cfg = dict(tiny_transformer_config, num_layers=3)
    eager = _pair(cfg, device, frozen_fp8_backward=True)[1]
    eager(**_inputs(device)).square().mean().backward()
    torch._dynamo.reset()
    model = _pair(cfg, device, gradient_checkpointing=True, checkpoint_save_attention=True, frozen_fp8_backward=True)[1]
    compile_blocks(model, backend="aot_eager", fullgraph=True)
    model(**_inputs(device)).square().mean().backward()
    grads = dict(model.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.skipif("cuda" not in DEVICES, reason="Inductor on an fp8-capable GPU (the GPU session runs it)")
def test_fp8_blocks_compile_with_inductor_on_the_gpu(tiny_transformer_config):
    """What the GPU bench runs: Inductor (its _scaled_mm lowering, the uint8 → e4m3 view inside the
    graph, the fp8 backward's per-step weight transpose) gives the eager fp8 outputs and gradients."""
    eager, compiled = (_pair(tiny_transformer_config, "cuda", frozen_fp8_backward=True)[1] for _ in range(2))
    torch._dynamo.reset()
    compile_blocks(compiled, fullgraph=True)
    outs = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**_inputs("cuda"))
        out.float().square().mean().backward()
        outs.append(out.detach().float())
    assert _cos(outs[0], outs[1]) > 0.999
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert _cos(p.grad, q.grad) > 0.99, name


def test_fp8_needs_a_frozen_backbone_and_comes_before_compiling(tiny_transformer_config):
    with pytest.raises(ValueError, match="model.train_backbone=false"):
        build_model(pretrained=None, transformer=tiny_transformer_config, frozen_fp8=True, train_backbone=True)
    model = build_model(pretrained=None, transformer=tiny_transformer_config)
    compile_blocks(model, backend="eager")
    with pytest.raises(ValueError, match="before compile_blocks"):
        convert_to_fp8(model)
