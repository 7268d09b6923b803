"""The model's speed options (model.checkpoint_keep, checkpoint_offload, checkpoint_save_attention,
attention_backend, compile_blocks) change how the step runs, never what it computes.

The tests that take ``device`` also run on CUDA where there is one (the GPU session runs this file
first): pinned host copies, GPU attention kernels and autocast are then the real ones."""

from __future__ import annotations

import pytest
import torch

from ft_train.models import build_model
from ft_train.models.adapter import FantasyTalkingAttnProcessor
from ft_train.speed import (
    compile_blocks,
    kept_block_bytes,
    set_attention_backend,
    set_self_attention_kernel,
    self_attention_kernel,
    size_checkpointing,
    speed_state,
)
from ft_train.speed.attention import AUTO_KERNELS, self_attention_shape


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def _tol(device: str, exact: bool = False) -> dict:
    """Tolerances: exact where the same kernels run in the same order on CPU; GPU kernels may
    reduce in another order between a plain and a recomputed pass."""
    if device == "cpu":
        return dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-7)
    return dict(rtol=1e-4, atol=1e-6)


def _model(cfg: dict, device: str = "cpu", **kw):
    torch.manual_seed(0)
    model = build_model(pretrained=None, transformer=cfg, audio_mode="frame", **kw).to(device)
    # Adapters start at zero; give them values so the audio branch contributes and has gradients
    # that depend on every block.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.audio_kv.parameters():
            p.normal_(0, 0.05)
    return model


def _inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(2)
    batch = dict(
        hidden_states=torch.randn(1, 36, 5, 8, 8, generator=g),
        timestep=torch.tensor([500.0]),
        text=torch.randn(1, 512, 4096, generator=g) * 0.1,
        image=torch.randn(1, 257, 1280, generator=g) * 0.1,
        # 17 frames at 25 fps = 34 wav2vec tokens; fewer tokens than the windows need leave the
        # last frames' windows partly padded, so the masked path runs too.
        audio=torch.randn(1, 30, 768, generator=g),
    )
    return {k: v.to(device) for k, v in batch.items()}


def _loss_and_grads(model, device: str = "cpu"):
    out = model(**_inputs(device))
    loss = out.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_checkpoint_keep_runs_the_last_blocks_without_recompute(tiny_transformer_config, monkeypatch):
    cfg = dict(tiny_transformer_config, num_layers=3)
    ref_out, ref_grads = _loss_and_grads(_model(cfg, gradient_checkpointing=False))
    assert set(ref_grads) == {n for n, _ in _model(cfg).named_parameters() if n.startswith("audio_")}

    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kw):
        calls.append(fn)
        return real(fn, *args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    for keep in (0, 1, 3):
        calls.clear()
        model = _model(cfg, gradient_checkpointing=True, checkpoint_keep=keep)
        assert speed_state(model).checkpoint_keep == keep
        out, grads = _loss_and_grads(model)
        assert len(calls) == 3 - keep, f"keep={keep}: {len(calls)} checkpointed blocks"
        # The kept blocks are the last ones.
        ckpt_blocks = {id(fn.__self__) for fn in calls}
        assert ckpt_blocks == {id(b) for b in list(model.transformer.blocks)[: 3 - keep]}
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)


def test_auto_checkpoint_keep_sizes_the_kept_blocks_to_the_budget(tiny_transformer_config, monkeypatch, device):
    """checkpoint_keep="auto" keeps the last block in the first step and measures what it leaves
    allocated (faked on the CPU, real on CUDA); sizing then keeps as many blocks as the budget
    has room for, and the step still computes plain backward's gradients."""
    from ft_train.speed import checkpointing

    cfg = dict(tiny_transformer_config, num_layers=4)
    if device == "cpu":  # torch counts no CPU memory: each reading is 1000 bytes above the last
        readings = iter(range(0, 10**9, 1000))
        monkeypatch.setattr(checkpointing, "allocated_bytes", lambda dev: next(readings))
    ref_out, ref_grads = _loss_and_grads(_model(cfg, device), device)
    model = _model(cfg, device, gradient_checkpointing=True, checkpoint_keep="auto")
    assert speed_state(model).checkpoint_auto and speed_state(model).checkpoint_keep == 1 and kept_block_bytes(model) is None
    out, grads = _loss_and_grads(model, device)
    torch.testing.assert_close(out, ref_out, **_tol(device))
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **_tol(device), msg=name)
    per_block = kept_block_bytes(model)
    if device == "cpu":
        assert per_block == 1000
    else:  # at least the block's output and the largest activations it saved (its FFN hidden)
        hidden = 1 * 5 * 4 * 4 * cfg["num_attention_heads"] * cfg["attention_head_dim"] * 4
        assert per_block >= hidden
    assert size_checkpointing(model, peak_bytes=10 * per_block, budget_bytes=12 * per_block + 1) == 3
    assert speed_state(model).checkpoint_keep == 3 and not speed_state(model).checkpoint_auto
    kept = [b for b in model.transformer.blocks][1:]
    assert model.transformer._gradient_checkpointing_func.kept == frozenset(id(b) for b in kept)
    assert model.transformer._gradient_checkpointing_func.measure is None  # measured once
    out, grads = _loss_and_grads(model, device)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **_tol(device), msg=name)
    # The budget bounds it both ways.
    for peak, budget, want in ((0, 10**12, 4), (10**6, 10, 0)):
        m = _model(cfg, device, gradient_checkpointing=True, checkpoint_keep="auto")
        assert size_checkpointing(m, peak, budget, per_block_bytes=1000) == want
    with pytest.raises(ValueError, match="model.checkpoint_keep must be a number of blocks or auto"):
        _model(cfg, device, gradient_checkpointing=True, checkpoint_keep="most")


def test_auto_checkpoint_keep_adds_the_optimizer_state_the_first_step_created(tiny_transformer_config, monkeypatch, device):
    """AdamW creates its moments in its first step(), after backward's peak, so the first step's
    peak lacks them while every later step's has them: sizing adds what the step left allocated
    (less the gradients still held) to the peak. On CUDA that is the real state; on the CPU,
    where torch counts no memory, the readings are faked around a real AdamW step."""
    from ft_train.speed import checkpointing
    from ft_train.speed import auto_checkpoint_keep

    cfg = dict(tiny_transformer_config, num_layers=4)
    model = _model(cfg, device, gradient_checkpointing=True, checkpoint_keep="auto")
    dev = torch.device(device)
    start = 10**6
    if device == "cpu":
        readings = iter(range(start, 10**9, 1000))  # the forward's start, then 1000 bytes per reading
        monkeypatch.setattr(checkpointing, "allocated_bytes", lambda d: next(readings))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    inputs = _inputs(device)  # held through the sizing, as the trainer holds its batch
    model(**inputs).square().mean().backward()
    opt.step()  # the gradients stay, as Lightning leaves them until the next step
    held = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t) and t.device.type == device)  # AdamW keeps its step counts on the CPU
    assert held > 0
    if device == "cpu":
        assert speed_state(model).auto_start_bytes == start
        fake = {"peak": start + 50_000, "now": start + held + 7}  # 7 bytes of the step's own leftovers
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: fake["peak"])
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: fake["now"])
        dev = torch.device("cuda")  # what sizing measures on; the gradients stay on the CPU, uncounted
    peak = torch.cuda.max_memory_allocated(dev)
    per_block = kept_block_bytes(model)
    budget = peak + held + 2 * per_block + per_block // 2
    speed_state(model).checkpoint_memory_gib = budget / 2**30
    keep, info = auto_checkpoint_keep(model, dev)
    del inputs
    if device == "cpu":
        assert info["state_bytes"] == held + 7
    else:  # the state (21 MB here), and little more: the allocator's rounding, the step's audio context
        assert held <= info["state_bytes"] <= held + 2**20
    assert info["peak_bytes"] == peak + info["state_bytes"]
    # Room for about 2.5 more blocks beyond the state: two more kept (one block measured);
    # without the state it would be more.
    assert keep == 1 + (budget - peak - info["state_bytes"]) // per_block == speed_state(model).checkpoint_keep
    assert speed_state(model).auto_start_bytes is None and not speed_state(model).checkpoint_auto
    assert 1 + (budget - peak) // per_block > keep
    if device == "cpu":
        assert keep == 3


def test_checkpoint_keep_out_of_range_names_the_key(tiny_transformer_config):
    with pytest.raises(ValueError, match=r"model.checkpoint_keep must be between 0 and 2"):
        _model(tiny_transformer_config, gradient_checkpointing=True, checkpoint_keep=5)


def test_attention_backend_reaches_every_processor_and_keeps_the_output(tiny_transformer_config):
    ref_out, ref_grads = _loss_and_grads(_model(tiny_transformer_config))
    model = _model(tiny_transformer_config, attention_backend="_native_math")
    procs = [b.attn1.processor for b in model.transformer.blocks] + [b.attn2.processor for b in model.transformer.blocks]
    assert all(p._attention_backend == "_native_math" for p in procs), procs
    assert all(isinstance(b.attn2.processor, FantasyTalkingAttnProcessor) for b in model.transformer.blocks)
    out, grads = _loss_and_grads(model)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)
    set_attention_backend(model, None)
    assert all(getattr(b.attn2.processor, "_attention_backend", None) is None for b in model.transformer.blocks)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops a forward/backward runs."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


_SDPA_OPS = {"flash": "_scaled_dot_product_flash_attention", "cudnn": "_scaled_dot_product_cudnn_attention",
             "efficient": "_scaled_dot_product_efficient_attention"}


def test_torchs_own_kernel_is_the_one_it_runs(device):
    """default_sdpa_kernel names the aten op torch's SDPA dispatches to by itself (cuDNN first on
    sm_90 with a recent cuDNN since torch 2.9, flash elsewhere): checked against the op run."""
    from ft_train.speed.attention import default_kernel_at

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = (1, 2, 64, 32)
    own = default_kernel_at(shape, dtype, torch.device(device))
    assert own in ("flash", "cudnn", "efficient", "math")
    q, k, v = (torch.randn(1, 64, 2, 32, device=device, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(3))
    counter = _OpCounter()
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    op = _SDPA_OPS.get(own, "") + ("_for_cpu" if device == "cpu" and own == "flash" else "")
    assert counter.counts.get(op, 0) == 1, (own, counter.counts)


def test_self_attention_kernel_runs_the_self_attention_through_that_kernel(tiny_transformer_config, device):
    """The self-attentions move from torch's own kernel to the one asked for, and nothing else
    moves. On CUDA (bf16 autocast, as training runs) the kernel asked for is cuDNN where torch
    would run flash and flash where it would run cuDNN; on the CPU it is math, with exactly the
    plain outputs."""
    from ft_train.speed.attention import default_kernel_at

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    plain = _model(tiny_transformer_config, device)
    inputs = _inputs(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    own = default_kernel_at(self_attention_shape(plain, inputs["hidden_states"]), dtype, torch.device(device))
    kernel = "math" if device == "cpu" else ("flash" if own == "cudnn" else "cudnn")
    plain_counter = _OpCounter()
    with autocast, plain_counter:
        ref_out, ref_grads = _loss_and_grads(plain, device)
    model = _model(tiny_transformer_config, device, self_attention_kernel=kernel)
    blocks = list(model.transformer.blocks)
    assert self_attention_kernel(model) == kernel
    assert all(isinstance(b.attn2.processor, FantasyTalkingAttnProcessor) for b in blocks)
    counter = _OpCounter()
    with autocast, counter:
        out, grads = _loss_and_grads(model, device)
    # One self-attention per block leaves torch's own kernel (math decomposes into matmuls) and
    # lands on the kernel asked for; the other attentions stay where they were.
    own_op = _SDPA_OPS[own] + ("_for_cpu" if device == "cpu" else "")
    assert counter.counts.get(own_op, 0) == plain_counter.counts[own_op] - len(blocks), (plain_counter.counts, counter.counts)
    if kernel in _SDPA_OPS:
        op = _SDPA_OPS[kernel]
        assert counter.counts.get(op, 0) == plain_counter.counts.get(op, 0) + len(blocks), counter.counts
    if device == "cpu":
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
    else:
        assert _cos(out, ref_out) > 0.999
        for name in ref_grads:
            assert _cos(grads[name], ref_grads[name]) > 0.99, name
    # diffusers' backend setting reaches the wrapped processor; None unwraps it.
    set_attention_backend(model, "_native_math")
    assert all(b.attn1.processor.inner._attention_backend == "_native_math" for b in blocks)
    set_attention_backend(model, None)
    set_self_attention_kernel(model, None)
    assert self_attention_kernel(model) is None
    assert all(b.attn1.processor._attention_backend is None and not hasattr(b.attn1.processor, "inner") for b in blocks)


def test_gpu_only_self_attention_kernels_fail_clearly_on_the_cpu(tiny_transformer_config):
    model = _model(tiny_transformer_config, self_attention_kernel="cudnn")
    with pytest.raises(ValueError, match="model.self_attention_kernel=cudnn needs a CUDA GPU"):
        model(**_inputs())


def test_self_attention_kernel_compiles_without_a_graph_break(tiny_transformer_config):
    ref_out, ref_grads = _loss_and_grads(_model(tiny_transformer_config, self_attention_kernel="math"))
    model = _model(tiny_transformer_config, self_attention_kernel="math")
    torch._dynamo.reset()
    compile_blocks(model, backend="eager", fullgraph=True)
    out, grads = _loss_and_grads(model)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_sdpa_kernel_timing_and_choice(device):
    from ft_train.speed.attention import fastest_kernel, time_sdpa_kernels

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kernels = ("flash", "cudnn", "efficient", "math")
    times = time_sdpa_kernels((1, 2, 64, 32), dtype, torch.device(device), kernels, iters=2)
    assert set(times) == set(kernels)
    assert times["flash"] > 0 and times["math"] > 0
    if device == "cpu":
        assert times["cudnn"] is None and times["efficient"] is None  # no CPU kernels: recorded, not raised
    assert fastest_kernel(times) == min((k for k in kernels if times[k] is not None), key=times.get)
    assert fastest_kernel({"flash": 2.0, "cudnn": 1.0, "efficient": None}) == "cudnn"
    assert fastest_kernel({"flash": None}) is None


def test_auto_self_attention_kernel_is_picked_at_the_first_forward(tiny_transformer_config, device):
    """On a GPU the first forward times the kernels at its own shape and keeps the fastest; on the
    CPU torch's choice stays. Either way the outputs are the plain model's."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        ref_out, _ = _loss_and_grads(_model(tiny_transformer_config, device), device)
    model = _model(tiny_transformer_config, device, self_attention_kernel="auto")
    assert speed_state(model).self_attention_auto and self_attention_kernel(model) is None
    with autocast:
        out, _ = _loss_and_grads(model, device)
    assert not speed_state(model).self_attention_auto
    if device == "cuda":
        times = speed_state(model).self_attention_timings
        assert set(times) == set(AUTO_KERNELS) and times["flash"] is not None
        assert self_attention_kernel(model) == min((k for k, t in times.items() if t is not None), key=times.get)
        assert _cos(out, ref_out) > 0.999
    else:
        assert self_attention_kernel(model) is None and speed_state(model).self_attention_timings is None
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("attention_backend", "fastest", "model.attention_backend='fastest'"),
    ("self_attention_kernel", "fastest", "model.self_attention_kernel must be one of cudnn, flash, efficient, math"),
])
def test_unknown_attention_settings_name_the_key(tiny_transformer_config, key, value, message):
    with pytest.raises(ValueError, match=message):
        _model(tiny_transformer_config, **{key: value})


def test_compiled_blocks_match_eager(tiny_transformer_config):
    ref_out, ref_grads = _loss_and_grads(_model(tiny_transformer_config, gradient_checkpointing=True))
    model = _model(tiny_transformer_config, gradient_checkpointing=True)
    torch._dynamo.reset()
    # backend="eager": Dynamo traces the real block (our processor included) without needing a
    # C++ toolchain; the GPU bench measures the default Inductor backend.
    # fullgraph: the block, our audio/face processor included, traces without a graph break
    # (no tensor is read back inside a block).
    compile_blocks(model, backend="eager", fullgraph=True)
    assert all(b._compiled_call_impl is not None for b in model.transformer.blocks)
    keys = set(model.state_dict())
    assert keys == set(_model(tiny_transformer_config).state_dict()), "compiling must not rename weights"
    out, grads = _loss_and_grads(model)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("train_backbone", [False, True])
def test_host_offloaded_checkpoint_matches_plain_backward(tiny_transformer_config, monkeypatch, train_backbone, device):
    """model.checkpoint_offload: the same gradients as no checkpointing — for the adapters of the
    first block too (its inputs need no grad with a frozen backbone), for the motion module (its
    gradient flows through the time projection) and for a trained backbone — with every block's
    input kept on the host."""
    from ft_train.speed import checkpointing

    cfg = dict(tiny_transformer_config, num_layers=3)
    kw = dict(train_backbone=train_backbone, motion={"enabled": True}, identity={"enabled": True})
    ref_out, ref_grads = _loss_and_grads(_model(cfg, device, gradient_checkpointing=False, **kw), device)
    assert any(n.startswith("motion.") for n in ref_grads) and any(n.startswith("face_kv.0") for n in ref_grads) and "audio_kv.0.k_proj.weight" in ref_grads

    copies = []
    real = checkpointing.to_host

    def recording(t):
        host = real(t)
        copies.append((tuple(t.shape), host.device.type, host.is_pinned() if device == "cuda" else None))
        return host

    monkeypatch.setattr(checkpointing, "to_host", recording)
    model = _model(cfg, device, gradient_checkpointing=True, checkpoint_offload=True, checkpoint_keep=1, **kw)
    assert speed_state(model).checkpoint_offload
    out, grads = _loss_and_grads(model, device)
    # Blocks 0 and 1 are recomputed from a host copy of their (B, S, d) input; block 2 is kept.
    shape = (1, 5 * 4 * 4, cfg["num_attention_heads"] * cfg["attention_head_dim"])
    assert copies == [(shape, "cpu", True if device == "cuda" else None)] * 2
    torch.testing.assert_close(out, ref_out, **_tol(device, exact=True))
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **_tol(device), msg=name)


def test_offloaded_inputs_come_back_one_block_ahead(tiny_transformer_config, monkeypatch, device):
    """Backward of block k starts copying block k-1's input back before block k recomputes (on
    CUDA the copy then overlaps block k's work); each input is copied out and back exactly once."""
    from ft_train.speed import checkpointing

    events = []
    real_prefetch, real_take = checkpointing.HostCopy.prefetch, checkpointing.HostCopy.take
    order = {}

    def prefetch(self):
        if self.loaded is None and self.host is not None:
            events.append(("copy back", order[id(self)]))
        real_prefetch(self)

    def take(self):
        events.append(("take", order[id(self)]))
        return real_take(self)

    real_init = checkpointing.HostCopy.__init__

    def init(self, tensor, prev=None):
        real_init(self, tensor, prev)
        order[id(self)] = len(order)
        assert prev is None or order[id(prev)] == order[id(self)] - 1

    monkeypatch.setattr(checkpointing.HostCopy, "prefetch", prefetch)
    monkeypatch.setattr(checkpointing.HostCopy, "take", take)
    monkeypatch.setattr(checkpointing.HostCopy, "__init__", init)
    cfg = dict(tiny_transformer_config, num_layers=4)
    model = _model(cfg, device, gradient_checkpointing=True, checkpoint_offload=True)
    _loss_and_grads(model, device)
    # The last block's input is fetched when its backward starts; every other one was already on
    # its way back when its backward asked for it.
    assert events == [("take", 3), ("copy back", 3), ("copy back", 2), ("take", 2), ("copy back", 1),
                      ("take", 1), ("copy back", 0), ("take", 0)]
    assert model._context.last_offload is not None and model._context.last_offload.host is None


def test_host_offloaded_checkpoint_recomputes_under_the_forward_autocast(tiny_transformer_config, device, monkeypatch):
    """The recompute runs under the forward's autocast. On the CPU the gradients equal plain
    checkpointing's exactly. On a GPU one bf16 rounding may land the other way where a kernel sums
    in another order, so there the whole gradient's error is compared with that of a recompute
    under another autocast state than the forward's (fp16 for bf16: the bug this guards against;
    without autocast the recompute would fail on mixed dtypes), which must be far larger."""
    from ft_train.speed.checkpointing import HostOffloadCheckpoint

    cfg = dict(tiny_transformer_config, num_layers=2)

    def run(**kw):
        model = _model(cfg, device, gradient_checkpointing=True, **kw)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(**_inputs(device))
        out.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def error(grads):
        return max(float((grads[n].float() - ref[n].float()).norm() / ref[n].float().norm()) for n in ref)

    ref, got = run(), run(checkpoint_offload=True)
    assert got.keys() == ref.keys()
    forward = HostOffloadCheckpoint.forward

    def forward_then_fp16_recompute(ctx, *args):
        out = forward(ctx, *args)
        ctx.autocast = (ctx.autocast[0], True, torch.float16)
        return out

    monkeypatch.setattr(HostOffloadCheckpoint, "forward", staticmethod(forward_then_fp16_recompute))
    wrong = error(run(checkpoint_offload=True))
    assert wrong > 1e-3, wrong
    if device == "cpu":
        for name in got:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)
    else:
        assert error(got) < wrong / 10, (error(got), wrong)


def test_offload_and_keep_with_compiled_blocks(tiny_transformer_config, device):
    """The GPU bench's combination (+compile+offload, +compile+keepN): compiled blocks inside the
    host-offloaded recompute and next to kept blocks give the eager gradients."""
    cfg = dict(tiny_transformer_config, num_layers=3)
    ref_out, ref_grads = _loss_and_grads(_model(cfg, device), device)
    torch._dynamo.reset()
    model = _model(cfg, device, gradient_checkpointing=True, checkpoint_offload=True, checkpoint_keep=1)
    compile_blocks(model, backend="eager", fullgraph=True)
    out, grads = _loss_and_grads(model, device)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)


class _CountSDPA(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the SDPA forward kernels run, split into self-attention (queries and keys of one
    length) and cross-attention."""

    def __init__(self):
        super().__init__()
        self.self_attn = self.cross_attn = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from ft_train.speed.checkpointing import _SDPA_OPS

        if func in _SDPA_OPS:
            if args[1].shape[-2] == args[0].shape[-2]:
                self.self_attn += 1
            else:
                self.cross_attn += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("save_attention", [False, True])
def test_saved_self_attention_is_not_recomputed(tiny_transformer_config, save_attention, device):
    """model.checkpoint_save_attention: backward re-runs every recomputed block except its
    self-attention kernel, whose output was kept; the gradients stay those of plain backward."""
    cfg = dict(tiny_transformer_config, num_layers=3)
    ref_out, ref_grads = _loss_and_grads(_model(cfg, device), device)
    model = _model(cfg, device, gradient_checkpointing=True, checkpoint_keep=1, checkpoint_save_attention=save_attention)
    counter = _CountSDPA()
    with counter:
        out = model(**_inputs(device))
    fwd_self, fwd_cross = counter.self_attn, counter.cross_attn
    assert fwd_self == 3 and fwd_cross >= 3 * 3  # per block: text, image and audio windows
    with counter:
        out.square().mean().backward()
    recomputed = 2  # blocks 0 and 1; block 2 is kept
    assert counter.self_attn - fwd_self == (0 if save_attention else recomputed)
    assert counter.cross_attn - fwd_cross == recomputed * fwd_cross // 3  # cross-attention is recomputed
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out.detach(), ref_out, **_tol(device, exact=True))
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **_tol(device), msg=name)


def test_saved_self_attention_with_compiled_blocks(tiny_transformer_config, device):
    """With compiled blocks the checkpointed call is compiled too (so the policy is part of the
    graph): one compiled graph per input kind, not per block, and the eager gradients."""
    from torch._dynamo.utils import counters

    cfg = dict(tiny_transformer_config, num_layers=3)
    ref_out, ref_grads = _loss_and_grads(_model(cfg, device), device)
    torch._dynamo.reset()
    counters.clear()
    model = _model(cfg, device, gradient_checkpointing=True, checkpoint_save_attention=True)
    compile_blocks(model, backend="aot_eager", fullgraph=True)
    out, grads = _loss_and_grads(model, device)
    # Two graphs for 3 blocks: block 0's input needs no grad (frozen patch embedding), the others' do.
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="checkpoint_offload and model.checkpoint_save_attention cannot be combined"):
        _model(cfg, gradient_checkpointing=True, checkpoint_save_attention=True, checkpoint_offload=True)
