"""The GPU benches of one device session: bench/encode_throughput.py and bench/zero_step.py in their
tiny CPU modes, the real sizes they would build, the ft-train overrides they would run, and
bench/gpu_session.sh as a whole (tiny modes)."""

import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .test_bench import load_bench, only_json

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def finite_numbers(obj, path="") -> list[str]:
    """Paths of every float in a JSON tree that is not finite."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in finite_numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in finite_numbers(v, f"{path}[{i}]")]
    return []


@pytest.fixture(scope="module")
def et():
    return load_bench("encode_throughput")


@pytest.fixture(scope="module")
def zs():
    if str(BENCH) not in sys.path:  # zero_step's main() puts bench/ on the path for train_step's helpers
        sys.path.insert(0, str(BENCH))
    return load_bench("zero_step")


def test_encoders_have_the_real_sizes(et):
    """Built on the meta device: the parameter counts of Wan's VAE, CLIP ViT-H/14, umT5-XXL's
    encoder and wav2vec2-base, inside the project's wrappers."""
    meta = torch.device("meta")
    counts = {w: et.count(et.inner_model(et.build_encoder(w, et.REAL, meta, torch.bfloat16)))
              for w in ("vae", "clip", "umt5", "wav2vec")}
    assert counts == {"vae": 126_892_531, "clip": 630_766_080, "umt5": 5_680_910_336, "wav2vec": 94_371_712}
    clip = et.build_encoder("clip", et.REAL, meta, torch.bfloat16)
    assert (clip.num_tokens, clip.width) == (257, 1280)
    assert et.REAL.audio_samples == 51_840  # 81 frames at 25 fps


def test_zero_step_gpu_overrides_compose_to_the_1_3b_model(zs, tmp_path):
    """The overrides the GPU run passes to ft-train compose with the real config tree."""
    from hydra import compose, initialize_config_dir

    from ft_train.config import CONF_DIR

    class Args:
        seed, fps, latent_hw, workers, precision, extra = 0, 25.0, (60, 104), 2, "bf16-mixed", []

    for case in ("zero2", "zero3-full"):
        ov = zs.overrides(case, False, tmp_path, tmp_path / "x.json", 2, 4, Args)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=ov)
        assert cfg.model.transformer.num_layers == 30 and cfg.model.pretrained is None
        assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing is True
        assert cfg.model.train_backbone is case.endswith("-full")
        assert cfg.strategy.stage == (3 if case.startswith("zero3") else 2)
        assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 1
        assert list(cfg.data.latent_hw) == [60, 104] and cfg.data.num_frames == 81
        assert cfg.stage.name == "frame" and cfg.stage.max_steps == 6
        assert cfg.callbacks.bench_timer._target_ == "bench.zero_step.StepTimer"


def test_zero_step_flops_match_train_step(zs):
    """MFU uses train_step.py's formula: a full fine-tune step is 3 forwards, an adapter step less."""
    import train_step  # bench/ is on sys.path (zs fixture)

    class Args:
        fps, latent_hw = 25.0, (60, 104)

    full = zs.flops_per_step("zero2-full", Args, trainable=1_400_000_000)
    adapter = zs.flops_per_step("zero3", Args, trainable=190_000_000)
    cfg = train_step.CONFIGS["1.3b"]
    assert full["audio_tokens"] == adapter["audio_tokens"] > 150
    fwd_tokens = train_step.forward_flops(cfg, train_step.read_yaml("model", "wan_i2v_1.3b.yaml")["transformer"])["tokens"]
    assert fwd_tokens == 21 * 30 * 52  # 480×832×81 → (21, 60, 104) latents → 2×2 patches
    assert 0 < adapter["flops_model"] < full["flops_model"] < full["flops_hardware"]


@pytest.mark.slow
def test_encode_throughput_tiny(session):
    """Every encoder case of bench/encode_throughput.py --tiny (run by the session script below)."""
    tmp_path = session["out"]
    report = only_json(tmp_path, "encode_throughput-cpu-")
    rows = {r["case"]: r for r in report["results"]}
    assert set(rows) == set(report["cases_requested"]) == {
        "vae", "vae-bf16", "clip", "umt5", "wav2vec", "encode_clips", "encode_clips-bf16-vae"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["finite"] and row["iters"] >= 1 and row["step_s"] > 0, row
    assert rows["vae"]["output_shapes"] == [2, 16, 5, 8, 8]  # the clip and its I2V condition, one call
    assert rows["vae-bf16"]["dtype"] == "bfloat16"
    assert set(rows["encode_clips"]["output_shapes"]) == {"latents", "image_latents", "clip", "text", "audio",
                                                          "lip_mask", "face"}
    for name in ("fp32 VAE", "bf16 VAE"):
        row = report["summary"][name]
        assert row["clips_per_s"] > 0 and row["components_s_per_clip"] > 0
    assert not finite_numbers(report), finite_numbers(report)


def test_attention_tiny_times_every_shape_and_records_what_cannot_run(tmp_path):
    """On the CPU: the flash and math kernels run every shape and agree on the output; cuDNN has
    no CPU kernel and is recorded as unsupported, not as a failure."""
    att = load_bench("attention")
    assert att.main(["--tiny", "--backends", "flash,math,cudnn", "--iters", "2", "--out", str(tmp_path)]) == 0
    report = only_json(tmp_path, "attention-cpu-")
    rows = {(r["shape"], r["backend"]): r for r in report["results"]}
    assert set(rows) == {(s, b) for s in att.SHAPES for b in ("flash", "math", "cudnn")}
    dims = report["dims"]
    assert dims["tokens"] == 320 and dims["heads"] == 2 and dims["latent_frames"] == 5
    for shape in att.SHAPES:
        for backend in ("flash", "math"):
            row = rows[(shape, backend)]
            assert row["status"] == "ok" and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
        assert rows[(shape, "cudnn")]["status"] == "unsupported"
    assert rows[("self", "flash")]["key_tokens"] == 320 and rows[("text", "flash")]["key_tokens"] == 512
    assert rows[("audio", "flash")]["query_tokens"] == 320 and rows[("audio", "flash")]["key_tokens"] == dims["window"]
    # The audio case's mask: the same inputs through two kernels give the same windows' output.
    q, k, v, mask, _, _ = att.make_inputs("audio", dims, torch.device("cpu"), torch.float32, grad=False)
    assert mask is not None and not bool(mask.all())  # padded window slots are masked
    from torch.nn.attention import SDPBackend, sdpa_kernel

    outs = []
    for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(kernel):
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    assert "| self | flash | ok |" in (tmp_path / next(p.name for p in tmp_path.glob("*.md"))).read_text()


@pytest.mark.slow
def test_zero_step_tiny(session):
    """bench/zero_step.py --tiny's two cases, ZeRO-2 and ZeRO-3 (run by the session script below)."""
    tmp_path = session["out"]
    report = only_json(tmp_path, "zero_step-cpu-")
    rows = {r["case"]: r for r in report["results"]}
    assert set(rows) == {"zero2", "zero3"}
    for case, row in rows.items():
        assert row["status"] == "ok", row.get("log_tail")
        assert row["zero_optimization"]["stage"] == int(case[-1])
        assert row["iters"] == 2 and len(row["step_s_all"]) == 3 and row["step_s"] > 0 and row["iter_s"] > 0
        assert row["loss_finite"] and row["final_save_s"] >= 0
        assert 0 < row["params_trainable"] < row["params_total"]  # adapter only; ZeRO-3's partitions counted whole
        assert row["callback_file"] == str(BENCH / "zero_step.py")
    assert (session["work"] / "zero2.log").is_file()  # --work reached the bench (its logs are kept) ...
    assert not (session["work"] / "zero2").exists()  # ... and its run folders (checkpoints) were removed after each case
    assert not finite_numbers(report), finite_numbers(report)


# What the session test gives each part: the script's defaults would cut the CPU run short on a
# loaded 2-core machine, and this test is about the script's flow, not the GPU's timing.
SESSION_CAPS = {"checks": 300, "encode": 240, "zero": 360, "train_step": 330}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """bench/gpu_session.sh run once, in its tiny CPU modes: every encoder case and both ZeRO cases
    (the tests of those two benches read its reports, so each bench starts once in the suite), and
    from the checks one quick test of each of the three files it names (the suite runs them all
    anyway; here only the script's pytest call is under test)."""
    out = tmp_path_factory.mktemp("gpu_session")
    work = tmp_path_factory.mktemp("zero_work")
    env = dict(os.environ, PY=sys.executable, OUT=str(out), DS_ACCELERATOR="cpu", GPU_SESSION_TOTAL="1500",
               CHECK_CAP=str(SESSION_CAPS["checks"]), ENC_CAP=str(SESSION_CAPS["encode"]),
               ZERO_CAP=str(SESSION_CAPS["zero"]), TS_CAP=str(SESSION_CAPS["train_step"]),
               CHECK_SELECT="name_the_key or round_trips_within_e4m3_precision",
               TS_ARGS="--tiny --cases tiny", ENC_ARGS="--tiny", ZERO_ARGS=f"--tiny --work {work}")
    proc = subprocess.run(["bash", str(BENCH / "gpu_session.sh")], capture_output=True, text=True, timeout=1500,
                          cwd=REPO, env=env)
    return {"out": out, "work": work, "proc": proc}


@pytest.mark.slow
def test_gpu_session_script_runs_the_tiny_modes(session):
    """The session script end to end on the CPU: budgets, the checks, the three benches, the log, the file count."""
    tmp_path, proc = session["out"], session["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 7 and "gpu_session.log" in files, files  # three JSON + markdown pairs and the log
    log = (tmp_path / "gpu_session.log").read_text()
    budgets = dict(re.findall(r"\] (\w+): budget (\d+)s", log))
    asked = {"train_step": ["tiny:train_baseline", "tiny:sample_baseline", "tiny:train_ours", "tiny:sample_ours"],
             "encode": ["vae", "vae-bf16", "clip", "umt5", "wav2vec", "encode_clips", "encode_clips-bf16-vae"],
             "zero": ["zero2", "zero3"]}
    for part, prefix in (("train_step", "train_step-cpu-"), ("encode", "encode_throughput-cpu-"), ("zero", "zero_step-cpu-")):
        report = only_json(tmp_path, prefix)
        # Each bench ran the cases it was given, under the budget the script says it gave it.
        assert report["cases_requested"] == asked[part], prefix
        assert [r["case"] for r in report["results"]] == asked[part], prefix
        assert all(r["status"] == "ok" and r["step_s"] > 0 for r in report["results"]), prefix
        if part != "zero":  # step_s: the median of the timed steps the row lists
            assert all(r["step_s"] == pytest.approx(statistics.median(r["step_s_all"]), abs=1e-4)
                       for r in report["results"]), prefix
        assert report["budget_s"] == int(budgets[part]) <= SESSION_CAPS[part], (part, budgets)
    exits = [line for line in log.splitlines() if "exit code" in line]
    assert len(exits) == 4 and all(line.endswith("exit code 0") for line in exits), exits  # the checks and the three benches
    # The checks: pytest on the three files with the -k selection it was given, all passed.
    assert "pytest tests/test_model_speed_options.py tests/test_fp8.py  tests/test_perf.py -k 'name_the_key or" in log
    assert re.search(r"\n(\d+) passed, \d+ deselected", log) and "failed" not in log
    assert "# bench/zero_step.py on cpu" in proc.stdout  # the tables end the output
