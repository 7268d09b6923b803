"""Block swap (model.block_swap_resident): the frozen blocks' weights wait on the host and come to
the device for each call; the step computes exactly what it computes without it.

On the CPU the "device" copies are distinct tensors made for each call, so the same bookkeeping
runs as on a card (where a GPU session runs this file too)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from ft_train.models import build_model
from ft_train.speed import SpeedOptions, apply, speed_state
from ft_train.speed import block_swap as block_swap_module

from .test_model_speed_options import _inputs  # the same tiny batch: 17 frames, partly padded audio windows

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(cfg: dict, device: str = "cpu", **kw):
    torch.manual_seed(0)
    model = build_model(pretrained=None, transformer=cfg, audio_mode="frame", **kw).to(device)
    torch.manual_seed(1)
    with torch.no_grad():  # adapters start at zero: give them values, so every block's gradient matters
        for p in model.audio_kv.parameters():
            p.normal_(0, 0.05)
        for _, p in model.lora_state():
            p.normal_(0, 0.05)
    return model


def _loss_and_grads(model, device: str = "cpu"):
    loss = model(**_inputs(device)).float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _tol(device: str) -> dict:
    return dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def cfg(tiny_transformer_config):
    return dict(tiny_transformer_config, num_layers=3)


# Each checkpointing mode, with (blocks resident, blocks prefetched).
CASES = {
    "no checkpointing": (dict(gradient_checkpointing=False), (1, 1)),
    "checkpointing": (dict(gradient_checkpointing=True), (0, 1)),
    "checkpointing, keep 1": (dict(gradient_checkpointing=True, checkpoint_keep=1), (1, 2)),
    "checkpoint_offload": (dict(gradient_checkpointing=True, checkpoint_offload=True), (0, 2)),
    "save_attention": (dict(gradient_checkpointing=True, checkpoint_save_attention=True), (1, 1)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_block_swap_gives_the_same_loss_and_gradients(cfg, case, device):
    """(a) loss and every trained gradient (audio adapter, LoRA) equal those without block swap,
    for each checkpointing mode (and in a second step, on the swapped-back weights)."""
    speed, (resident, prefetch) = CASES[case]
    lora = {"rank": 4, "alpha": 8}
    ref = _model(cfg, device, lora=lora, **speed)
    # No optimizer step: a second step is the first again; one case runs it (on the swapped-back weights).
    steps = 2 if case == "checkpointing" else 1
    ref_steps = [_loss_and_grads(ref, device)] * steps
    model = _model(cfg, device, lora=lora, block_swap_resident=resident, block_swap_prefetch=prefetch, **speed)
    swap = speed_state(model).block_swap
    assert sorted(swap.blocks) == list(range(3 - resident))
    for step, (ref_loss, ref_grads) in enumerate(ref_steps):
        loss, grads = _loss_and_grads(model, device)
        torch.testing.assert_close(loss, ref_loss, **_tol(device), msg=f"{case} step {step}")
        assert grads.keys() == ref_grads.keys() and any("lora_B" in n for n in grads)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **_tol(device), msg=f"{case} {name}")
    # Each swapped block was copied in once per forward and once per recompute.
    recomputed = [i for i in swap.blocks if speed["gradient_checkpointing"] and i < 3 - speed.get("checkpoint_keep", 0)]
    assert swap.loads == steps * (len(swap.blocks) + len(recomputed))
    assert swap.live == 0 and swap.max_live <= 1 + prefetch


@pytest.mark.parametrize("offload", [False, True])
def test_swapped_blocks_hold_no_device_copy_outside_their_call(cfg, monkeypatch, offload):
    """(b) between calls a swapped block's modules hold size-0 placeholders, at most the running
    block plus the prefetched ones have copies held by the swapper, and with checkpointing
    nothing else keeps a copy alive after the block's forward (nor after backward)."""
    copies: dict[int, list[weakref.ref]] = {}
    real_load = block_swap_module.BlockSwap._load

    def recording_load(self, block):
        fresh = block.loaded is None
        real_load(self, block)
        if fresh:
            copies.setdefault(block.index, []).extend(weakref.ref(t) for t in block.loaded)

    monkeypatch.setattr(block_swap_module.BlockSwap, "_load", recording_load)
    model = _model(cfg, gradient_checkpointing=True, checkpoint_offload=offload, block_swap_resident=1,
                   block_swap_prefetch=1, frozen_fp8=True)
    swap = speed_state(model).block_swap
    blocks = list(model.transformer.blocks)

    def placeholders_only(index):
        return all(getattr(s.module, s.kind)[s.name].numel() == 0 for s in swap.blocks[index].slots)

    seen = []

    def check_before(i):
        def hook(module, args):
            gc.collect()
            if torch.is_grad_enabled() and not offload or not torch.is_grad_enabled():
                # forward pass: every earlier swapped block's copies are gone already
                if swap.last is None or i > swap.last:
                    for j in range(i):
                        if j in swap.blocks:
                            assert placeholders_only(j)
                            assert all(r() is None for r in copies.get(j, [])), f"block {j} still alive at block {i}"
            seen.append(i)
        return hook

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(check_before(i))
    assert all(placeholders_only(i) for i in swap.blocks)
    assert swap.blocks[0].nbytes > 0 and any(s.kind == "_buffers" for s in swap.blocks[0].slots)  # fp8 bits swap
    loss, _ = _loss_and_grads(model)
    assert torch.isfinite(loss)
    gc.collect()
    assert seen[:3] == [0, 1, 2] and sorted(seen[3:]) == [0, 1, 2]  # forward, then the recomputes
    assert all(placeholders_only(i) for i in swap.blocks)
    assert all(r() is None for refs in copies.values() for r in refs)
    assert swap.live == 0 and 1 <= swap.max_live <= 1 + swap.prefetch


def test_trainable_parameters_are_never_swapped(cfg):
    """(c) the audio adapter, identity, motion and LoRA A/B stay on the device, whole."""
    model = _model(cfg, lora={"rank": 4}, identity={"enabled": True}, motion={"enabled": True},
                   gradient_checkpointing=True, block_swap_resident=0)
    swap = speed_state(model).block_swap
    swapped = {id(s.placeholder) for b in swap.blocks.values() for s in b.slots}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n, _ in trainable) and any(n.startswith("face_kv") for n, _ in trainable)
    for name, param in trainable:
        assert id(param) not in swapped, name
        assert param.numel() > 0, name
    frozen_in_blocks = [n for n, p in model.transformer.blocks.named_parameters() if not p.requires_grad]
    assert frozen_in_blocks and all(p.numel() == 0 for n, p in model.transformer.blocks.named_parameters()
                                    if not p.requires_grad)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(block_swap_resident="some"), "model.block_swap_resident must be a number of blocks, auto or null"),
        (dict(block_swap_resident=True), "model.block_swap_resident must be a number of blocks, auto or null"),
        (dict(block_swap_resident=-1), "model.block_swap_resident must be between 0 and"),
        (dict(block_swap_resident=4), r"model.block_swap_resident must be between 0 and 3"),
        (dict(block_swap_resident=1, block_swap_prefetch=0), "model.block_swap_prefetch must be"),
        (dict(block_swap_resident=1, checkpoint_keep="auto"), "model.checkpoint_keep=auto with model.block_swap_resident"),
        (dict(block_swap_resident=1, compile_blocks=True), "model.compile_blocks=false"),
        (dict(block_swap_resident=1, train_backbone=True), "model.train_backbone"),
    ],
)
def test_bad_block_swap_settings_are_refused_before_anything_runs(cfg, kw, match):
    """(d) a bad value fails at build time, naming the key."""
    kw = dict(gradient_checkpointing=True, **kw)
    with pytest.raises(ValueError, match=match):
        build_model(pretrained=None, transformer=cfg, **kw)


def test_auto_keeps_every_block_on_the_cpu_and_apply_undoes_the_swap(cfg):
    """``auto`` swaps every block until the first forward sizes it (nothing to save on the CPU:
    all resident); applying other options puts the weights back for good."""
    ref_loss, ref_grads = _loss_and_grads(_model(cfg, gradient_checkpointing=True))
    model = _model(cfg, gradient_checkpointing=True, block_swap_resident="auto")
    assert len(speed_state(model).block_swap.blocks) == 3
    loss, grads = _loss_and_grads(model)
    assert speed_state(model).block_swap is None and speed_state(model).block_swap_sizing == {"resident": 3}
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    model = _model(cfg, gradient_checkpointing=True, block_swap_resident=1)
    apply(model, SpeedOptions(gradient_checkpointing=True))
    assert speed_state(model).block_swap is None
    assert all(p.numel() > 0 for p in model.parameters())
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0)


def test_auto_estimate_at_the_14b_shape():
    """``auto``'s documented estimate at 14B stage 2, 512x512x81 (21,504 tokens, d 5120, FFN 13824,
    840M trained float32 weights, 0.37 GiB per float8 block) within a 24 GiB cap with 4 GiB already
    allocated: 0.9 x 20 GiB - 3 x 3.36 GB (gradients, AdamW moments) - 6.78 GB of activations
    leaves 2.46 GB, six blocks. Without checkpoint_offload the 40 block inputs (8.8 GB) leave none."""
    from ft_train.speed.block_swap import estimate_resident_blocks

    gib = 2**30
    args = dict(available=20 * gib, trainable=840_437_760 * 4, per_block=int(0.37 * gib), tokens=21 * 32 * 32,
                dim=5120, ffn_dim=13824, blocks=40)
    resident, activations = estimate_resident_blocks(**args, offload=True)
    assert activations == pytest.approx(21504 * 5120 * 2 * 2 * (10 + 2 * 2.7), abs=2) and resident == 6
    assert estimate_resident_blocks(**args, offload=False)[0] == 0
    assert estimate_resident_blocks(**dict(args, available=200 * gib), offload=True)[0] == 40


def test_ft_train_with_block_swap_trains_the_same_adapter(tmp_path):
    """Through ft-train's own train() (Lightning, bf16-mixed autocast, fused AdamW, clipping, a
    checkpoint saved): two steps with one block swapped leave the adapter weights of two steps
    without it."""
    from tests.test_train import _trained_adapter

    base = ["model.gradient_checkpointing=true"]
    _, plain = _trained_adapter(tmp_path, "plain", base)
    result, swapped = _trained_adapter(tmp_path, "swap", [*base, "model.block_swap_resident=1", "model.block_swap_prefetch=2"])
    swap = speed_state(result["module"].net).block_swap
    assert len(swap.blocks) == result["module"].net.num_blocks - 1 and swap.loads >= 2 and swap.live == 0
    assert plain.keys() == swapped.keys()
    trained = [k for k in plain if k.startswith("audio_kv.") and k.endswith("v_proj.weight")]
    assert trained and all(plain[k].abs().max() > 0 for k in trained)  # zero at the start: the steps moved them
    for key in plain:
        torch.testing.assert_close(swapped[key], plain[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_block_swap_under_deepspeed_with_the_optimizer_state_on_the_host(tmp_path):
    """The 24 GB recipe's optimizer: DeepSpeed ZeRO-2 with its optimizer state offloaded to host
    memory (DeepSpeed's CPU Adam), one process. With a block swapped the losses of two steps (the
    second after an optimizer step) are those without it."""
    import os
    import subprocess
    import sys

    from ft_train.lit import read_metric

    from .conftest import REPO

    from .test_strategies import side_by_side

    def launch(run, extra):
        cmd = [sys.executable, "-c", "import sys; from ft_train.train import main; sys.argv[0] = 'ft-train'; main()",
               "experiment=tiny_cpu", "stages=null", "stage.max_steps=2", "trainer.devices=1", "data.num_workers=0",
               "data.num_samples=8", "trainer.log_every_n_steps=1", f"paths.output_dir={tmp_path}", f"run_id={run}",
               "strategy=deepspeed_zero2", "strategy.offload_optimizer=true", "optim=deepspeed_cpu_adam",
               "model.gradient_checkpointing=true", "model.train_backbone=false", *extra]
        env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return read_metric(tmp_path / run / "clip" / "metrics.csv", "train/loss")

    runs = {"plain": [], "swap": ["model.block_swap_resident=1", "model.block_swap_prefetch=2"]}
    futures = side_by_side(*(lambda r=r, e=e: launch(r, e) for r, e in runs.items()))  # both at once
    losses = {run: future.result() for run, future in zip(runs, futures)}
    assert len(losses["plain"][1]) == 2 and losses["swap"] == losses["plain"]


@pytest.mark.parametrize("fp8", [False, True])
def test_model_summary_counts_swapped_weights(cfg, fp8):
    """Swapped blocks' modules hold size-0 placeholders; the logged parameter counts must not
    shrink with them (float8 weight bits included)."""
    from ft_train.models import model_summary

    kw = dict(lora={"rank": 4}, frozen_fp8=fp8)
    plain = model_summary(_model(cfg, **kw))
    swapped_model = _model(cfg, block_swap_resident=0, **kw)
    assert speed_state(swapped_model).block_swap.blocks  # every block swapped
    assert model_summary(swapped_model) == plain
    assert plain["params_total"] > plain["params_trainable"] > 0
