"""The benchmarks in bench/: the GPU step bench in its tiny CPU mode, its FLOP count, OOM and
time-budget handling, and the loader bench in its tiny mode."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def load_bench(name: str):
    """Import a bench script (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ts():
    return load_bench("train_step")


def only_json(folder: Path, prefix: str) -> dict:
    files = sorted(folder.glob(f"{prefix}*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").is_file()
    return json.loads(files[0].read_text())


@pytest.mark.slow
def test_train_step_tiny_runs_every_case(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = only_json(tmp_path, "train_step-cpu-")
    rows = {r["case"]: r for r in report["results"]}
    assert set(rows) == {"tiny:train_baseline", "tiny:sample_baseline", "tiny:train_ours", "tiny:sample_ours",
                         "tiny-full:train_baseline", "tiny-full:train_ours"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert math.isfinite(row["step_s"]) and row["step_s"] > 0
        assert row["iters"] >= 1 and row["flops_model"] > 0
    for case in ("tiny:train_baseline", "tiny:train_ours", "tiny-full:train_ours"):
        assert rows[case]["loss_finite"], rows[case]
    ours, full = rows["tiny:train_ours"], rows["tiny-full:train_ours"]
    assert ours["params_trainable"] == ours["params_adapter"] < ours["params_total"]  # adapter only
    assert full["params_trainable"] == full["params_total"] == ours["params_total"]  # full fine-tune
    assert rows["tiny:train_baseline"]["params_trainable"] < rows["tiny-full:train_baseline"]["params_trainable"]
    assert rows["tiny:sample_ours"]["passes"] == 3
    assert {c["what"] for c in report["comparisons"]} == {"tiny train", "tiny sample", "tiny-full train"}
    assert report["environment"]["torch"] == torch.__version__


def test_flop_formula_matches_torch_flop_counter(ts):
    """The analytic matmul count equals torch's FlopCounterMode on the tiny model (attention may
    or may not be counted by it, depending on the SDPA kernel torch picks on this machine)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ts.CONFIGS["tiny"]
    model_cfg = ts.read_yaml("model", cfg.model_yaml)
    tcfg = model_cfg["transformer"]
    cpu = torch.device("cpu")
    batch = ts.make_batch(cfg, tcfg, cpu, seed=0)
    hidden = torch.cat([batch["latents"], torch.zeros_like(batch["latents"][:, :4]), batch["image_latents"]], dim=1)
    timestep = torch.tensor([500.0])

    plain = ts.build_baseline(cfg, model_cfg, cpu)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        plain(hidden_states=hidden, timestep=timestep, encoder_hidden_states=batch["text"],
              encoder_hidden_states_image=batch["clip"], return_dict=False)
    fwd = ts.forward_flops(cfg, tcfg)
    total = fwd["blocks"] + fwd["embed"]
    assert counter.get_total_flops() in (pytest.approx(total, rel=1e-3), pytest.approx(total - fwd["attention"], rel=1e-3))

    ours = ts.build_ours(cfg, model_cfg, cpu)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ours(hidden, timestep, batch["text"], batch["clip"], batch["audio"])
    fwd = ts.forward_flops(cfg, tcfg, adapter=ts.adapter_shape(cfg, ours))
    total = fwd["blocks"] + fwd["embed"] + fwd["adapter"]
    assert counter.get_total_flops() in (pytest.approx(total, rel=1e-3), pytest.approx(total - fwd["attention"], rel=1e-3))


def test_real_shapes_and_flops(ts):
    """The GPU configs have the issue's token counts; 14B forward ≈ 0.91 PFLOP at 512×512×81."""
    expect = {"14b": 21504, "1.3b": 32760, "14b-720": 75600}
    for name, tokens in expect.items():
        cfg = ts.CONFIGS[name]
        fwd = ts.forward_flops(cfg, ts.read_yaml("model", cfg.model_yaml)["transformer"])
        assert fwd["tokens"] == tokens
    assert ts.CONFIGS["14b"].latent_shape == (1, 16, 21, 64, 64)
    assert ts.CONFIGS["14b"].audio_tokens == 162
    fwd = ts.forward_flops(ts.CONFIGS["14b"], ts.read_yaml("model", "wan2.1_i2v_14b.yaml")["transformer"])
    assert 0.90e15 < fwd["blocks"] + fwd["embed"] < 0.92e15


def test_oom_is_recorded_and_the_run_goes_on(ts, tmp_path, monkeypatch):
    def oom(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setitem(ts.CASE_FUNCS, "train_baseline", oom)
    rc = ts.main(["--tiny", "--cases", "tiny:train_baseline,tiny:sample_baseline", "--out", str(tmp_path)])
    assert rc == 0
    rows = {r["case"]: r for r in only_json(tmp_path, "train_step-")["results"]}
    assert rows["tiny:train_baseline"]["status"] == "OOM"
    assert rows["tiny:sample_baseline"]["status"] == "ok"


def test_time_budget_skips_cases_and_bad_cases_fail_fast(ts, tmp_path):
    assert ts.main(["--tiny", "--cases", "tiny:train_ours", "--budget", "0", "--out", str(tmp_path)]) == 0
    rows = only_json(tmp_path, "train_step-")["results"]
    assert [r["status"] for r in rows] == ["skipped: time budget"]
    with pytest.raises(SystemExit, match="unknown case"):
        ts.main(["--tiny", "--cases", "tiny:train_everything", "--out", str(tmp_path)])


def test_a_case_whose_timed_steps_do_not_fit_reports_its_warm_up(ts, tmp_path, monkeypatch):
    """A case whose warm-up ran but whose timed steps found the budget spent fits on the card:
    its row says so, with the warm-up's time, and the markdown names it."""
    class Spent:  # what the case's budget says once its warm-up is over
        def left(self):
            return 0.0

        def elapsed(self):
            return 0.0

    real = ts.CASE_FUNCS["train_ours"]
    monkeypatch.setitem(ts.CASE_FUNCS, "train_ours", lambda ctx: real(dict(ctx, budget=Spent())))
    assert ts.main(["--tiny", "--cases", "tiny:train_ours", "--out", str(tmp_path)]) == 0
    (row,) = only_json(tmp_path, "train_step-")["results"]
    assert row["status"] == "warm-up only: time budget"
    assert row["iters"] == 0 and len(row["warmup_s"]) == 1 and row["loss_finite"]
    md = next(tmp_path.glob("train_step-*.md")).read_text()
    assert f"tiny:train_ours: only the warm-up ran ({row['warmup_s'][0]:.1f} s" in md


def test_watchdog_stops_a_run_that_overruns(ts, tmp_path):
    """Past --budget + --grace the run exits (stacks dumped) instead of holding the GPU; the JSON
    written so far names the case that was running. (The budget leaves room for the imports and
    the build, about 5 s here, so the case does start; its warm-up never ends.)"""
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--tiny", "--cases", "tiny:train_baseline",
                           "--budget", "12", "--grace", "3", "--min-case-s", "0", "--warmup", "100000",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0
    assert "Timeout" in proc.stderr
    rows = only_json(tmp_path, "train_step-")["results"]
    assert all(r["status"] == ts.RUNNING for r in rows)


def test_peak_table_picks_the_card(ts):
    assert ts.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989.0
    assert ts.peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert ts.peak_tflops("NVIDIA H200", None)[0] == 989.0
    assert ts.peak_tflops("NVIDIA GeForce RTX 3060", None)[0] is None
    assert ts.peak_tflops("anything", 100.0)[0] == 100.0


@pytest.mark.slow
def test_loader_throughput_tiny(tmp_path):
    """The counts asked for are the counts written and timed, and the rates agree with them."""
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(BENCH / "loader_throughput.py"), "--tiny", "--out", str(tmp_path),
                           "--work-dir", str(work), "--samples", "6", "--samples-per-shard", "2", "--batches", "5",
                           "--warmup-batches", "1", "--raw-copies", "1", "--raw-passes", "2"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = only_json(tmp_path, "loader_throughput-")
    latent, raw = report["latent"], report["raw"]
    shards = sorted((work / "latent").glob("*.tar"))
    assert latent["shards"] == len(shards) == 3 and latent["samples"] == 6  # 6 samples, 2 per shard
    assert latent["bytes_per_sample"] == pytest.approx(sum(p.stat().st_size for p in shards) / 6)
    assert [(r["workers"], r["batches"]) for r in latent["runs"]] == [(2, 5), (0, 5)]
    assert all(0 < r["samples_per_s"] < 1e5 for r in latent["runs"])
    assert latent["runs"][0]["latent_shape"] == [16, 5, 8, 8]
    # ft-prep's raw clips, each decoded once per pass, at the tiny 17 frames.
    assert raw["clips"] >= 1 and raw["clips_timed"] == 2 * raw["clips"] and raw["frames_per_clip"] == 17
    assert raw["frames_per_s_per_core"] == pytest.approx(17 * raw["clips_per_s_per_core"])
    assert raw["load_clip"]["status"] == "ok" and raw["load_clip"]["clips_timed"] == 2 * min(raw["clips"], 4)
    md = (tmp_path / f"loader_throughput-{report['machine']['host']}-tiny.md").read_text()
    assert f"| 2 | {latent['runs'][0]['samples_per_s']:.1f} |" in md
    assert len(report["loadavg_before"]) == 3 and report["machine"]["cores"] >= 1


def test_variant_cases_switch_the_model_options(ts, tmp_path, tiny_transformer_config):
    assert ts.parse_cases("tiny:train_ours+cudnn+keep2,14b:sample_ours+compile", tiny=True) == [
        "tiny:train_ours+cudnn+keep2", "14b:sample_ours+compile"]
    for bad in ("tiny:train_baseline+cudnn", "tiny:train_ours+fast", "tiny:train_ours+keep"):
        with pytest.raises(SystemExit, match="unknown case"):
            ts.parse_cases(bad, tiny=True)
    assert all(c.partition(":")[0] in ts.CONFIGS for c in ts.parse_cases("session", tiny=False))

    from ft_train.models import build_model
    from ft_train.speed import set_checkpointing, speed_state

    model = build_model(transformer=dict(tiny_transformer_config), gradient_checkpointing=True)
    got = ts.apply_variants(model, {"checkpoint_keep": 0}, ["flash", "keep1"])
    assert got["checkpoint_keep"] == speed_state(model).checkpoint_keep == 1 and got["attention_backend"] == "_native_flash"
    assert all(b.attn2.processor._attention_backend == "_native_flash" for b in model.transformer.blocks)
    assert not speed_state(model).checkpoint_offload
    got = ts.apply_variants(model, {"checkpoint_keep": 0}, ["sac"])
    assert got["checkpoint_save_attention"] and speed_state(model).checkpoint_save_attention
    got = ts.apply_variants(model, {"checkpoint_keep": 0}, ["offload"])
    assert got["checkpoint_offload"] and speed_state(model).checkpoint_offload and speed_state(model).checkpoint_keep == 0
    got = ts.apply_variants(model, {"checkpoint_keep": 0}, ["auto"])  # measures the last block first
    assert got["checkpoint_keep"] == "auto" and speed_state(model).checkpoint_auto and speed_state(model).checkpoint_keep == 1
    assert model.transformer._gradient_checkpointing_func.measure is not None
    # A compiled case starts from a clean dynamo, as a fresh process would, and counts its own graphs.
    from torch._dynamo.utils import counters

    counters["stats"]["unique_graphs"] += 9
    counters["graph_break"]["an earlier case's break"] += 1
    got = ts.apply_variants(model, {"checkpoint_keep": 0}, ["compile"])
    assert got["compiled"] and model.transformer.blocks[0]._compiled_call_impl is not None
    assert ts.compile_stats() == {"compiled_graphs": 0, "graph_breaks": 0}
    got = ts.apply_variants(model, {"checkpoint_keep": 0}, [])  # back to the yaml's values
    assert not speed_state(model).checkpoint_auto and model.transformer.blocks[0]._compiled_call_impl is None
    assert speed_state(model).checkpoint_keep == 0 and not speed_state(model).checkpoint_offload and got["attention_backend"].startswith("torch SDPA")
    assert all(b.attn2.processor._attention_backend is None for b in model.transformer.blocks)

    # A variant case runs next to the plain one and gets its own comparison row; fp8 is one-way:
    # asked first, it still runs after the same model's other cases. (One run, one timed step a case.)
    assert ts.main(["--tiny", "--cases", "tiny:train_ours+fp8bwd,tiny:train_baseline,tiny:train_ours+fp8,tiny:train_ours,"
                    "tiny:train_ours+keep1", "--iters", "1", "--out", str(tmp_path)]) == 0
    report = only_json(tmp_path, "train_step-")
    rows = {r["case"]: r for r in report["results"]}
    assert rows["tiny:train_ours+keep1"]["status"] == "ok" and rows["tiny:train_ours+keep1"]["variants"] == ["keep1"]
    assert {c["what"] for c in report["comparisons"]} == {"tiny train", "tiny train+keep1", "tiny train+fp8bwd",
                                                           "tiny train+fp8"}
    assert [(r["case"], r["status"], r.get("frozen_fp8"), r.get("frozen_fp8_backward")) for r in report["results"]] == [
        ("tiny:train_ours", "ok", False, False), ("tiny:train_ours+keep1", "ok", False, False),
        ("tiny:train_ours+fp8bwd", "ok", True, True), ("tiny:train_ours+fp8", "ok", True, False),
        ("tiny:train_baseline", "ok", None, None)]  # the baseline model has no speed options
    with pytest.raises(RuntimeError, match="after an fp8 case"):
        set_checkpointing(model, True)
        ts.apply_variants(model, {}, ["fp8"])
        ts.apply_variants(model, {}, [])


def test_block_swap_cases_run_capped_beside_the_uncapped_fp8_step(ts, tmp_path):
    """Issue 26's cases: ``24gb`` names the uncapped fp8 step and the single_24gb preset under a
    24 GiB cap; on the CPU a swap case really swaps (the cap needs CUDA and says it was not applied),
    and the capped row is compared with the uncapped fp8 step of the same run."""
    assert ts.parse_cases("24gb", tiny=False) == ["14b:train_ours+fp8", "14b:train_ours+single24"]
    assert ts.main(["--tiny", "--cases", "tiny:train_ours+fp8+swap0+cap1,tiny:train_ours+fp8",
                    "--out", str(tmp_path)]) == 0
    report = only_json(tmp_path, "train_step-")
    rows = {r["case"]: r for r in report["results"]}
    swapped = rows["tiny:train_ours+fp8+swap0+cap1"]
    assert swapped["status"] == "ok" and swapped["blocks_swapped"] == 2 and swapped["block_swap_prefetch"] == 2
    assert swapped["block_swap_loads"] > 0 and swapped["memory_cap_gib"] == 1 and not swapped["memory_cap_applied"]
    (capped,) = [c for c in report["comparisons"] if "cap_gib" in c]
    assert capped["time_ratio"] == pytest.approx(swapped["step_s"] / rows["tiny:train_ours+fp8"]["step_s"])
    assert capped["within_cap"] is None  # no CUDA peak to hold against the cap
    assert "step time / uncapped fp8 step (goal ≤ 2)" in next(tmp_path.glob("train_step-*.md")).read_text()


def test_profile_breaks_a_step_down_by_kernel_category(ts, tmp_path):
    assert ts.categorise("sm90_xmma_gemm_bf16bf16_bf16f32") == ts.categorise("aten::addmm") == "matmul"
    assert ts.categorise("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert ts.categorise("Memcpy DtoH (Device -> Pinned)") == "copy / cast"
    assert ts.categorise("aten::gelu") == "elementwise / other"
    assert ts.main(["--tiny", "--cases", "tiny:train_ours", "--profile", "--out", str(tmp_path)]) == 0
    report = only_json(tmp_path, "train_step-")
    prof = report["results"][0]["profile"]
    shares = [c["share"] for c in prof["categories"].values()]
    assert abs(sum(shares) - 1) < 1e-6 and prof["total_ms"] > 0
    assert prof["categories"]["matmul"]["share"] > 0.05 and "attention" in prof["categories"]
    assert prof["top"][0]["ms"] >= prof["top"][-1]["ms"]
    assert "Profile of one extra step (CPU op self time)" in (tmp_path / next(
        p.name for p in tmp_path.glob("*.md"))).read_text()


# ---------------------------------------------------------------------------------------------
# bench/zero_memory.py: memory per GPU, computed


@pytest.fixture(scope="module")
def zm():
    return load_bench("zero_memory")


def test_zero_memory_counts_the_real_models(zm):
    """The 14B I2V DiT has 16.4B weights (the issue's count), its audio adapter 0.84B; the frozen
    linear weights frozen_fp8 stores in one byte are most of the blocks."""
    m = zm.count("wan2.1_i2v_14b.yaml")
    assert 16.3e9 < m.backbone < 16.5e9 and 0.83e9 < m.adapter < 0.85e9
    assert 15.5e9 < m.fp8_linear < m.backbone
    assert zm.tokens(m, (512, 512, 81)) == 21504 and zm.tokens(m, (720, 1280, 81)) == 75600


def test_zero2_states_are_deepspeeds_own_estimate(zm):
    """Full fine-tune under ZeRO-2: our model states equal DeepSpeed's estimator on every GPU count."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    m = zm.count("wan_i2v_1.3b.yaml")
    total = m.backbone + m.adapter
    for gpus in (1, 8, 64):
        _, ds_gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=min(gpus, 8), num_nodes=max(1, gpus // 8),
                                                          cpu_offload=False)
        assert zm.states(m, True, "deepspeed_zero2", gpus)[0] == pytest.approx(ds_gpu, rel=1e-6)


def test_zero_memory_matches_the_measured_peaks_and_writes_its_tables(zm, tmp_path, capsys):
    assert zm.main(["--gpus", "1,8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "zero_memory.json").read_text())
    for check in report["checks"]:  # two fitted exactly, the other two measured peaks within 10 %
        assert abs(check["error"]) < (0.005 if check["fitted"] else 0.10), check
    rows = {(r["clip"], r["trains"], r["options"], r["strategy"]): r for r in report["rows"]}
    plain = rows[("512×512×81", "adapters", "", "ddp")]["per_gpu_gib"]["1"]
    assert plain == pytest.approx(54.6, abs=0.1)  # the measured one-GPU step
    # frozen_fp8 saves one byte on each of the blocks' linear weights; ZeRO-3 shards the rest.
    fp8 = rows[("512×512×81", "adapters", "frozen_fp8", "ddp")]["per_gpu_gib"]["1"]
    assert plain - fp8 == pytest.approx(zm.count("wan2.1_i2v_14b.yaml").fp8_linear / 2**30, abs=0.1)
    z3 = rows[("512×512×81", "everything", "", "deepspeed_zero3")]
    assert z3["per_gpu_gib"]["8"] < z3["per_gpu_gib"]["1"] / 4 and not z3["fits"]["1"] and z3["fits"]["8"]
    md = (tmp_path / "zero_memory.md").read_text()
    assert "| 720×1280×81 | adapters | frozen_fp8, checkpoint_offload | ddp |" in md
    assert "# Memory per GPU" in capsys.readouterr().out


def test_zero_memory_without_out_leaves_the_committed_tables_alone(tmp_path):
    """A plain ``python bench/zero_memory.py`` writes under the temporary folder (here TMPDIR =
    tmp_path) and says where; the committed bench/results/zero_memory.* keep their bytes and mtime."""
    committed = [BENCH / "results" / "zero_memory.md", BENCH / "results" / "zero_memory.json"]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in committed]
    proc = subprocess.run([sys.executable, str(BENCH / "zero_memory.py"), "--gpus", "1,8"], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in committed] == before
    out = tmp_path / "ft_train-bench"
    assert f"wrote {out / 'zero_memory.json'} and {out / 'zero_memory.md'}" in proc.stdout
    md = (out / "zero_memory.md").read_text()
    assert md.startswith("# Memory per GPU") and md in proc.stdout
    report = json.loads((out / "zero_memory.json").read_text())
    assert report["gpus"] == [1, 8]  # the counts asked for, not the defaults
    assert {n for r in report["rows"] for n in r["per_gpu_gib"]} == {"1", "8"}
