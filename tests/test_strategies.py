"""Multi-process training on CPU: DeepSpeed ZeRO-2/3 (train, save, exact resume) and DDP faults.

These launch ``ft-train`` with ``trainer.devices=2``: Lightning starts the second process itself,
exactly as on a GPU node. DeepSpeed JIT-compiles a communication op on first use (~30 s, cached
in TORCH_EXTENSIONS_DIR). A launch spends most of its time importing, one rank after the other
(Lightning starts rank 1 only once rank 0 reaches ``fit``), so on two cores one core idles; the
tests run their independent launches two at a time (``side_by_side``) to fill it.
"""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ft_train.lit import read_metric
from ft_train.models import build_model
from ft_train.models.weights import load_adapter_weights, read_checkpoint

from .conftest import REPO

FT_TRAIN = str(Path(sys.executable).parent / "ft-train")


def ft_train(out, run, steps, *extra, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    cmd = [
        FT_TRAIN, "experiment=tiny_cpu", "stages=null", f"stage.max_steps={steps}", "trainer.devices=2",
        "data.num_workers=0", "data.num_samples=16", "trainer.log_every_n_steps=1",
        "callbacks.checkpoint.every_n_steps=3", f"paths.output_dir={out}", f"run_id={run}", *extra,
    ]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return read_metric(Path(out) / run / "clip" / "metrics.csv", "train/loss")


def side_by_side(*jobs) -> list[Future]:
    """Run the jobs (functions of no arguments) two at a time (``FT_TEST_LAUNCHES`` at a time where
    set; 1 runs them one after the other, for a machine whose cores are busy already), in the order
    given, and wait for all; their futures, whose ``result()`` returns a job's value or raises its
    error. Each launch picks its own free port for its ranks."""
    with ThreadPoolExecutor(max(1, int(os.environ.get("FT_TEST_LAUNCHES", "2")))) as pool:
        return [pool.submit(job) for job in jobs]


def cut_copy(out, run, name, step):
    """A copy ``name`` of ``out/run`` as if its job had died just before saving ``step``: the
    checkpoint of that step removed, everything else (logs, earlier checkpoints) kept."""
    shutil.copytree(Path(out) / run, Path(out) / name)
    shutil.rmtree(Path(out) / name / "clip" / "checkpoints" / f"step-{step:08d}")


# ZeRO-2 keeps whole weights on each rank, so it also keeps an EMA (ZeRO-3 refuses one): saved in
# DeepSpeed's client state, it must continue exactly too.
RESUMED = {"deepspeed_zero2": ("strategy=deepspeed_zero2", "callbacks.ema.decay=0.9"),
           "deepspeed_zero3": ("strategy=deepspeed_zero3",)}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """Six steps (saves at 3 and 6) as run ``<strategy>`` under ZeRO-2 and ZeRO-3, then a copy
    ``<strategy>-cut`` that lost its step-6 save resumes from step 3; and the same six steps under
    DDP (run ``ddp``), the reference of the ZeRO-3 export. The output folder, and each run's
    losses (a future) by run name."""
    out = tmp_path_factory.mktemp("six_steps")

    def train_and_resume(strategy):
        losses = ft_train(out, strategy, 6, *RESUMED[strategy])
        cut_copy(out, strategy, f"{strategy}-cut", 6)
        return losses, ft_train(out, f"{strategy}-cut", 6, *RESUMED[strategy])

    ddp = lambda: ft_train(out, "ddp", 6, "strategy=ddp")  # noqa: E731
    futures = side_by_side(*(lambda s=s: train_and_resume(s) for s in RESUMED), ddp)
    return out, {**dict(zip(RESUMED, futures)), "ddp": futures[-1]}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_two_processes_train_save_and_resume_exactly(six_steps, strategy):
    out, runs = six_steps
    expected, resumed = runs[strategy].result()
    assert len(expected[1]) == 6
    step3 = out / f"{strategy}-cut" / "clip" / "checkpoints" / "step-00000003" / "model.ckpt"  # what the resume read
    assert step3.is_dir() and (step3 / "checkpoint").is_dir()  # DeepSpeed's sharded layout
    assert len(list((step3 / "checkpoint").glob("*optim_states.pt"))) == 2  # one shard per rank
    assert resumed == expected
    if strategy == "deepspeed_zero2":
        full, cut = (read_checkpoint(out / run / "clip" / "checkpoints" / "step-00000006")
                     for run in (strategy, f"{strategy}-cut"))
        assert full.layout == "deepspeed" and set(full.ema) == set(full.tensors)
        for name in full.ema:
            assert torch.equal(full.ema[name], cut.ema[name]), name
        assert any(not torch.equal(full.ema[n], full.tensors[n].float()) for n in full.ema)


@pytest.mark.slow
def test_deepspeed_checkpoint_excludes_the_frozen_backbone(tmp_path, tiny_transformer_config):
    ft_train(tmp_path, "frozen", 3, "strategy=deepspeed_zero2", "model.train_backbone=false")
    states = tmp_path / "frozen" / "clip" / "checkpoints" / "step-00000003" / "model.ckpt" / "checkpoint"
    module = torch.load(states / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert module and all(".audio_proj." in k or ".audio_kv." in k for k in module), sorted(module)[:5]
    # The sharded checkpoint reads back (stage chaining, export) as the adapter's fp32 weights.
    ckpt = read_checkpoint(states.parents[1])
    assert ckpt.layout == "deepspeed" and ckpt.meta["global_step"] == 3
    net = build_model(transformer=tiny_transformer_config)
    assert set(ckpt.tensors) == set(net.adapter_state_dict())
    load_adapter_weights(net, states.parents[1])
    for name, value in net.adapter_state_dict().items():
        assert torch.equal(value, ckpt.tensors[name].float()), name
    assert net.audio_kv[0].v_proj.weight.abs().sum() > 0  # trained away from the zero init


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory):
    nan = ("loss._target_=tests.faults.NaNLoss", "+loss.nan_calls=[2]", "+loss.nan_rank=1")
    outs = {s: tmp_path_factory.mktemp(s) for s in ("ddp", "deepspeed_zero2")}
    futures = side_by_side(*(lambda s=s: ft_train(outs[s], "nan", 3, f"strategy={s}", *nan) for s in outs))
    return dict(zip(outs, futures))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_nan_on_one_rank_is_skipped_on_both(nan_runs, strategy):
    steps, losses = nan_runs[strategy].result()
    assert steps == [0, 1, 2]
    # rank 1's NaN made every rank skip step 1, and no NaN reached the weights: the step after it is finite
    assert [s for s, v in zip(steps, losses) if v != v] == [1]


@pytest.mark.slow
def test_export_from_a_zero3_sharded_checkpoint_matches_ddp(six_steps):
    """ft-export reads a ZeRO-3 checkpoint written by 2 processes (each holding a shard of every
    weight) into the official file; its tensors equal those of the same run under plain DDP. The
    runs are ``six_steps``' (the resume test's uninterrupted ZeRO-3 run); the export is of step 3."""
    from ft_train.export import main as ft_export

    tmp_path, runs = six_steps
    strategies = ("deepspeed_zero3", "ddp")
    for strategy in strategies:
        runs[strategy].result()
    # The logged parameter counts are whole under ZeRO-3 too (each rank holds a partition).
    counts = {s: re.search(r"params: (\{.*\})", (tmp_path / s / "train.log").read_text()).group(1) for s in strategies}
    assert counts["deepspeed_zero3"] == counts["ddp"] and "'params_total': 0," not in counts["ddp"]
    files = {}
    for strategy in strategies:
        step = tmp_path / strategy / "clip" / "checkpoints" / "step-00000003"
        out = tmp_path / f"{strategy}.ckpt"
        assert ft_export([f"ckpt={step}", f"out={out}"]) == 0  # the command's own entry point, in this process
        files[strategy] = torch.load(out, map_location="cpu", weights_only=True)
    zero3, ddp = files["deepspeed_zero3"], files["ddp"]
    assert (tmp_path / "deepspeed_zero3" / "clip" / "checkpoints" / "step-00000003" / "model.ckpt" / "checkpoint").is_dir()
    # train/grad_norm: DeepSpeed's own norm (inside its step) against ours over the DDP gradients
    norms = {s: read_metric(tmp_path / s / "clip" / "metrics.csv", "train/grad_norm") for s in strategies}
    assert norms["ddp"][0] == norms["deepspeed_zero3"][0] == [0, 1, 2, 3, 4, 5]
    assert all(n > 0 for n in norms["ddp"][1])
    torch.testing.assert_close(torch.tensor(norms["deepspeed_zero3"][1]), torch.tensor(norms["ddp"][1]), rtol=1e-3, atol=0)
    for part in ("proj_model", "audio_processor"):
        assert zero3[part].keys() == ddp[part].keys()
        for key in ddp[part]:
            # Same maths, different reduction order, and Adam's first steps amplify rounding (a
            # weight whose gradient is near zero moves by ±lr on its sign alone): the tensors agree
            # to 5 % in norm, while a wrongly gathered shard would be off by ~100 %.
            a, b = zero3[part][key], ddp[part][key]
            rel = float((a - b).norm() / b.norm())
            assert a.shape == b.shape and rel <= 0.05, (key, rel)
    assert any(v.abs().sum() > 0 for v in zero3["audio_processor"].values())  # trained away from zero


@pytest.mark.slow
def test_zero3_with_the_speed_options_trains_like_plain_backward(tmp_path):
    """The model's speed options under ZeRO-3 over 2 processes, against the same run with none:
    model.checkpoint_offload (partitioned weights gathered again for the recompute inside
    backward; motion on, so a gradient also leaves through the time projection) and
    speed=compiled (the preset: Inductor-compiled blocks, saved self-attention outputs, kept
    blocks sized by auto, the kernel picked by auto) give the same losses step by step;
    model.frozen_fp8 (float8 buffers beside partitioned parameters) gives losses within fp8's
    accuracy."""
    common = ("strategy=deepspeed_zero3", "model.motion.enabled=true")
    frozen = (*common, "model.train_backbone=false")
    runs = {  # five independent launches; the compile's first, as the longest
        "compiled": (*common, "model.gradient_checkpointing=true", "speed=compiled"),
        "plain": (*common, "model.gradient_checkpointing=false"),
        "offload": (*common, "model.gradient_checkpointing=true", "model.checkpoint_offload=true"),
        "plain-frozen": (*frozen, "model.gradient_checkpointing=false"),
        "fp8": (*frozen, "model.gradient_checkpointing=true", "model.frozen_fp8=true"),
    }
    futures = side_by_side(*(lambda r=r, o=o: ft_train(tmp_path, r, 3, *o) for r, o in runs.items()))
    losses = {run: future.result() for run, future in zip(runs, futures)}
    plain = losses["plain"]
    assert len(plain[1]) == 3 and len(set(plain[1])) > 1  # the steps trained something
    for run in ("offload", "compiled"):
        got = losses[run]
        assert got[0] == plain[0]
        torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(plain[1]), rtol=1e-5, atol=1e-7, msg=run)
    plain, got = losses["plain-frozen"], losses["fp8"]
    assert got[0] == plain[0] and len(set(got[1])) > 1
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(plain[1]), rtol=2e-2, atol=1e-7, msg="fp8")
