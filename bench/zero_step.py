"""Step time and peak memory of DeepSpeed ZeRO-2 vs ZeRO-3 on one GPU, through ``ft-train`` itself.

Each case is one ``ft-train`` run in its own process (a clean CUDA state per strategy), composed
from the real config groups with command-line overrides only:

  model=wan_i2v_1.3b        the 1.3B-shaped I2V DiT, random init (its ``model.pretrained`` is null),
                            bf16 weights, activation checkpointing (``model.gradient_checkpointing``)
  stage=frame               stage 2: frame-level audio windows, the lip-weighted loss
  data=synthetic            synthetic latent shards of the real shapes: 81 frames at 480×832 (latents
                            (16, 21, 60, 104)), 25 fps (162 wav2vec tokens), CLIP (257, 1280),
                            text (L, 4096); read in order (``shuffle_buffer=0``), 2 loader workers
  strategy=deepspeed_zero2 | deepspeed_zero3    (``ft_train.lit.strategies.DeepSpeedStrategy``)
  trainer.devices=1 trainer.precision=bf16-mixed   (DeepSpeed's bf16: every weight bf16)
  stage.max_steps = --warmup + --iters, a checkpoint only at the end (``callbacks.checkpoint``)

Cases: ``zero2`` and ``zero3`` train what the project trains by default (the audio adapter; the
backbone frozen); ``zero2-full`` and ``zero3-full`` add ``model.train_backbone=true`` (full
fine-tune: ZeRO then holds fp32 master weights and Adam moments for all 1.4B weights).

A callback passed on the command line (``+callbacks.bench_timer``: :class:`StepTimer`, in this
file) times each step from ``on_train_batch_start`` to ``on_train_batch_end`` with CUDA events
(forward, backward, DeepSpeed's optimizer step; ``perf_counter`` on CPU), and the time between
consecutive batch ends (the same plus the wait for data). It reads ``torch.cuda`` memory at the
start of training (weights and ZeRO's partitions), resets the peak, and reads the peak after the
last step (``peak_steps_gib``) and after the final checkpoint is written (``peak_with_save_gib``);
``peak_process_gib`` is the peak over the whole process (model set-up included). Step time is the
median of the steps after ``--warmup``.

Safety as ``bench/train_step.py``: each case runs under a timeout (its process group is killed),
an out-of-memory case is recorded as ``OOM`` and the run goes on, a case that would start with
less than ``--min-case-s`` of ``--budget`` left is skipped, the JSON is rewritten around every
case, and the run stops at ``--budget + --grace``. Run folders (with their checkpoints) are
deleted after each case.

Usage::

    python bench/zero_step.py --budget 160 --out $OUT                  # GPU: zero2, zero3 (+ -full if time)
    python bench/zero_step.py --cases zero2-full,zero3-full
    python bench/zero_step.py --tiny --out /tmp/bench                   # CPU: tiny model, DS_ACCELERATOR=cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
RUNNING = "running (the watchdog stopped the run here)"
CASES = ("zero2", "zero3", "zero2-full", "zero3-full")


# ---------------------------------------------------------------------------------------------
# the callback, loaded by ft-train in the child process (``bench.zero_step.StepTimer``)


class StepTimer(L.Callback):
    """Times every training step and reads ``torch.cuda`` memory; writes ``out`` (JSON) after each step.

    Args:
        out: JSON file to write (rank 0 only).
        warmup: steps left out of the medians.
    """

    def __init__(self, out: str, warmup: int = 2):
        self.out = Path(out)
        self.warmup = int(warmup)
        self.t_process = time.perf_counter()  # the callback is built at the top of train(), before the model
        self.res: dict[str, Any] = {"steps": [], "step_s_all": [], "iter_s_all": [], "losses": []}
        self.cuda = False
        self.start = None
        self.last_end: float | None = None

    def _write(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.res, indent=1))
        os.replace(tmp, self.out)

    def on_train_start(self, trainer, pl_module) -> None:
        import deepspeed

        self.cuda = pl_module.device.type == "cuda"
        params = list(pl_module.parameters())
        numel = [getattr(p, "ds_numel", p.numel()) for p in params]  # ZeRO-3 partitions: p.numel() is 0
        strategy = trainer.strategy
        config = getattr(strategy, "config", None) or {}
        self.res.update(
            device=str(pl_module.device), strategy=type(strategy).__name__, precision=str(trainer.precision),
            zero_optimization=config.get("zero_optimization"), bf16=config.get("bf16"),
            params_total=sum(numel), params_trainable=sum(n for n, p in zip(numel, params) if p.requires_grad),
            param_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in params}),
            torch=torch.__version__, deepspeed=deepspeed.__version__, lightning=L.__version__,
            setup_s=time.perf_counter() - self.t_process, callback_file=__file__,
        )
        if self.cuda:
            torch.cuda.synchronize()
            self.res.update(card=torch.cuda.get_device_name(), mem_at_train_start_gib=torch.cuda.memory_allocated() / 2**30,
                            peak_before_steps_gib=torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()
        self._write(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            step = self.start.elapsed_time(end) / 1e3
        else:
            step = time.perf_counter() - self.start
        now = time.perf_counter()
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        r = self.res
        r["steps"].append(int(trainer.global_step))
        r["step_s_all"].append(round(step, 5))
        if self.last_end is not None:
            r["iter_s_all"].append(round(now - self.last_end, 5))
        r["losses"].append(float(loss) if loss is not None else None)
        self.last_end = now
        timed = r["step_s_all"][self.warmup:]
        if timed:
            r["step_s"] = statistics.median(timed)
            r["iters"] = len(timed)
        iters = r["iter_s_all"][max(0, self.warmup - 1):]  # iter i spans batch ends i-1 → i
        if iters:
            r["iter_s"] = statistics.median(iters)
        r["loss_finite"] = all(v is not None and math.isfinite(v) for v in r["losses"])
        if self.cuda:
            r["peak_steps_gib"] = torch.cuda.max_memory_allocated() / 2**30
            r["peak_steps_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        self._write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # After callbacks.checkpoint's final save (it comes first in the callback list).
        if self.last_end is not None:
            self.res["final_save_s"] = time.perf_counter() - self.last_end
        if self.cuda:
            self.res["peak_with_save_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.res["peak_process_gib"] = max(self.res.get("peak_before_steps_gib", 0.0), self.res["peak_with_save_gib"])
        self._write(trainer)


# ---------------------------------------------------------------------------------------------
# the parent: one ft-train process per case


def ft_train_command() -> list[str]:
    """The ``ft-train`` console script beside this Python, else the same entry point as a module
    (the GPU image runs the checkout without installing it)."""
    script = Path(sys.executable).parent / "ft-train"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ft_train.train"]


def overrides(case: str, tiny: bool, work: Path, out_json: Path, warmup: int, iters: int, args) -> list[str]:
    strategy = "deepspeed_zero3" if case.startswith("zero3") else "deepspeed_zero2"
    full = case.endswith("-full")
    common = [
        "stages=null", "stage=frame", f"stage.max_steps={warmup + iters}", "resume=never", f"seed={args.seed}",
        f"strategy={strategy}", "trainer.devices=1", "trainer.num_nodes=1", "trainer.log_every_n_steps=1",
        f"model.train_backbone={str(full).lower()}", "model.gradient_checkpointing=true",
        "data.num_frames=81", f"data.fps={args.fps:g}", "data.shuffle_buffer=0", f"data.root={work / 'synthetic'}",
        "callbacks.checkpoint.every_n_steps=0", f"paths.output_dir={work}", f"run_id={case}",
        "+callbacks.bench_timer._target_=bench.zero_step.StepTimer", f"+callbacks.bench_timer.out={out_json}",
        f"+callbacks.bench_timer.warmup={warmup}",
    ]
    common += list(args.extra)
    if tiny:
        # conf/experiment/tiny_cpu.yaml: the tiny model, trainer=cpu (fp32), synthetic 8×8 latents.
        return ["experiment=tiny_cpu", *common, "data.num_workers=0", "data.num_samples=8", "data.samples_per_shard=4"]
    h, w = args.latent_hw
    return [
        "model=wan_i2v_1.3b", "model.pretrained=null", "data=synthetic", *common,
        f"data.latent_hw=[{h},{w}]", "data.num_samples=8", "data.samples_per_shard=4", f"data.num_workers={args.workers}",
        f"trainer.precision={args.precision}",
    ]


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, n: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


def looks_oom(text: str) -> bool:
    t = text.lower()
    return "out of memory" in t or "outofmemoryerror" in t


def run_case(case: str, tiny: bool, work: Path, warmup: int, iters: int, timeout: float, args,
             current: dict[str, Any]) -> dict[str, Any]:
    """One ``ft-train`` process; returns its StepTimer numbers plus status, exit code and wall time."""
    out_json = work / f"{case}.json"
    log_path = work / f"{case}.log"
    out_json.unlink(missing_ok=True)
    cmd = ft_train_command() + overrides(case, tiny, work, out_json, warmup, iters, args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if tiny:
        env["DS_ACCELERATOR"] = "cpu"
    t0 = time.perf_counter()
    timed_out = False
    with open(log_path, "wb") as log:
        # Own session: a timeout (or the watchdog) kills ft-train and its loader workers together.
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        current["proc"] = proc
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = proc.wait()
        finally:
            current["proc"] = None
    wall = time.perf_counter() - t0
    res: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {}
    text = tail(log_path, 200_000)
    if timed_out:
        status = f"timeout after {timeout:.0f} s"
    elif rc != 0:
        status = "OOM" if looks_oom(text) else f"error: exit code {rc}"
    elif not res.get("iters"):
        status = "error: no timed steps"
    else:
        status = "ok"
    res.update(status=status, returncode=rc, wall_s=round(wall, 2), overrides=cmd[len(ft_train_command()):],
               timeout_s=round(timeout, 1))
    res["log_tail"] = text[-(600 if status == "ok" else 3000):]
    return res


def card_name() -> str:
    """The GPU's name from nvidia-smi (the parent never creates a CUDA context of its own)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].split(",")[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "cuda"


def flops_per_step(case: str, args, trainable: int) -> dict[str, float]:
    """Model and hardware FLOPs of one 1.3B step, by ``bench/train_step.py``'s formula. ``trainable``:
    the weights that get gradients (with a frozen backbone, the adapter: each sees every audio token)."""
    import yaml
    from train_step import BenchConfig, forward_flops, train_flops

    from ft_train.models.audio import audio_window_index, clip_audio_tokens

    mcfg = yaml.safe_load((REPO / "conf" / "model" / "wan_i2v_1.3b.yaml").read_text())
    h, w = args.latent_hw
    cfg = BenchConfig("1.3b", "wan_i2v_1.3b.yaml", h * 8, w * 8, 81, full_finetune=case.endswith("-full"), fps=args.fps)
    tokens = clip_audio_tokens(81, args.fps)
    index, _ = audio_window_index(tokens, 81, mcfg["audio_expand"])
    adapter = {"audio_tokens": tokens, "audio_proj_dim": mcfg["audio_proj_dim"], "audio_in_dim": mcfg["audio_in_dim"],
               "window": index.shape[1]}
    fwd = forward_flops(cfg, mcfg["transformer"], adapter=adapter)
    model, hw = train_flops(fwd, cfg.full_finetune, 2 * tokens * trainable, checkpointing=True)
    return {"flops_model": model, "flops_hardware": hw, "audio_tokens": tokens}


def markdown(report: dict[str, Any]) -> str:
    from harness import fmt, report_header

    env = report["environment"]
    lines = [
        *report_header("zero_step.py", env),
        f"torch {env['torch']}, deepspeed {env.get('deepspeed') or '?'}, lightning {env.get('lightning') or '?'}, "
        f"commit {env.get('git_commit') or '?'}  ",
        f"model {report['model']}, {report['shape']}, precision {report['precision']}; "
        f"wall {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget",
        "",
        "| case | status | trains | step s | iter s | MFU | at start GiB | peak GiB (steps) | peak GiB (with save) | "
        "save s | set-up s | process s | trainable | steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['case']} | {r['status']} | {'all' if r['case'].endswith('-full') else 'adapter'} | "
            f"{fmt(r.get('step_s'), '.3f')} | {fmt(r.get('iter_s'), '.3f')} | {fmt(r.get('mfu'), '.1%')} | "
            f"{fmt(r.get('mem_at_train_start_gib'), '.1f')} | {fmt(r.get('peak_steps_gib'), '.1f')} | "
            f"{fmt(r.get('peak_with_save_gib'), '.1f')} | {fmt(r.get('final_save_s'), '.1f')} | "
            f"{fmt(r.get('setup_s'), '.0f')} | {fmt(r.get('wall_s'), '.0f')} | {fmt(r.get('params_trainable'), ',')} | "
            f"{r.get('iters', 0)} |"
        )
    lines += ["", "step = on_train_batch_start → on_train_batch_end (forward, backward, DeepSpeed step); iter = batch end → "
              "batch end (adds the wait for data); medians after the warm-up steps. at start = allocated when training "
              "starts (weights, ZeRO partitions); peaks = torch.cuda.max_memory_allocated; save = the final checkpoint; "
              "set-up = model build, shards, strategy set-up (top of train() → first step); process = the whole "
              "ft-train process, imports included.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]  # ft_train (uninstalled on the GPU image), harness
    from harness import add_run_options, bench_parser, run_guarded

    ap = bench_parser(__doc__, cases_help=f"comma-separated: all | {' | '.join(CASES)} (default all; tiny: zero2,zero3)",
                      tiny_help="CPU smoke test: the tiny model (experiment=tiny_cpu), DS_ACCELERATOR=cpu")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 2; tiny 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default 4; tiny 2)")
    ap.add_argument("--latent-hw", type=int, nargs=2, default=(60, 104), help="latent height, width (default 60 104 = 480×832)")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--workers", type=int, default=2, help="loader workers (data.num_workers)")
    ap.add_argument("--precision", default="bf16-mixed", help="trainer.precision on the GPU (default bf16-mixed)")
    ap.add_argument("--case-timeout", type=float, default=240.0, help="seconds one ft-train process may take (default 240)")
    ap.add_argument("--work", type=Path, default=None, help="folder for run folders and shards (default: a temporary one, removed)")
    ap.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                    help="one more ft-train override for every case (repeatable), e.g. --extra model.transformer.num_layers=10")
    add_run_options(ap, budget=300.0, grace=30.0, min_case_s=None,
                    min_case_help="a case needs this many budget seconds left (default 60; tiny 20)",
                    grace_help="seconds after the budget when the running case is killed")
    # The watchdog is a backstop only: each case already has a timeout inside --budget + --grace.
    return run_guarded(run, ap.parse_args(argv), backstop_s=30)


def run(args: argparse.Namespace, budget) -> int:
    import datetime as dt
    import platform

    from harness import finish_report, slug

    tiny = args.tiny
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    iters = args.iters if args.iters is not None else (2 if tiny else 4)
    min_case = args.min_case_s if args.min_case_s is not None else (20.0 if tiny else 60.0)
    spec = args.cases if not (tiny and args.cases == "all") else "zero2,zero3"
    cases = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            cases += CASES
        elif item in CASES:
            cases.append(item)
        else:
            raise SystemExit(f"--cases: unknown case {item!r}; use all or some of {', '.join(CASES)}")
    cases = list(dict.fromkeys(cases))
    if not tiny and not torch.cuda.is_available():
        raise SystemExit(f"bench/zero_step.py: no CUDA device visible to torch {torch.__version__}; "
                         "run it on the GPU machine, or pass --tiny for the CPU smoke test")
    missing = [m for m in ("deepspeed", "hydra", "webdataset", "diffusers") if not _importable(m)]
    if missing:
        raise SystemExit(f"bench/zero_step.py: {', '.join(missing)} cannot be imported; install the project's "
                         "dependencies (bench/README.md, 'Packages')")

    from importlib.metadata import version

    now = dt.datetime.now(dt.timezone.utc)
    env: dict[str, Any] = {
        "device": "cpu" if tiny else "cuda", "card": "cpu" if tiny else card_name(), "torch": torch.__version__,
        "deepspeed": version("deepspeed"), "lightning": L.__version__, "python": platform.python_version(),
        "host": platform.node(), "date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "ft_train": " ".join(ft_train_command()),
    }
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    h, w = args.latent_hw
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"zero_step-{slug(env['card'])}-{env['date']}" + ("-tiny" if tiny else "")
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    report: dict[str, Any] = {
        "environment": env, "budget_s": args.budget, "cases_requested": cases, "warmup": warmup, "iters": iters,
        "model": "conf/model/tiny.yaml" if tiny else "conf/model/wan_i2v_1.3b.yaml (random init)",
        "shape": "81 frames, latents 8×8 (tiny)" if tiny else f"81 frames at {h * 8}×{w * 8} (latents 16×21×{h}×{w}), {args.fps:g} fps",
        "precision": "32-true (trainer=cpu)" if tiny else args.precision, "results": [], "wall_s": 0.0,
    }
    peak = None
    if not tiny:
        from train_step import peak_tflops

        peak, report["peak_source"] = peak_tflops(env["card"], None)
        report["peak_tflops"] = peak

    def save() -> None:
        report["wall_s"] = budget.elapsed()
        json_path.write_text(json.dumps(report, indent=1))
        md_path.write_text(markdown(report))

    def record(row: dict[str, Any]) -> None:
        results = report["results"]
        if results and results[-1]["case"] == row["case"] and results[-1]["status"] == RUNNING:
            results.pop()
        results.append(row)
        save()

    work = args.work or Path(tempfile.mkdtemp(prefix="zero_step-"))
    work.mkdir(parents=True, exist_ok=True)
    current: dict[str, Any] = {"proc": None}

    def on_term(signum, frame):  # the session script's timeout: take the running ft-train down too
        proc = current["proc"]
        if proc is not None:
            kill_group(proc)
            proc.wait()
        results = report["results"]
        if results and results[-1]["status"] == RUNNING:
            results[-1]["status"] = f"killed: signal {signum} (the session's timeout)"
        save()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    print(f"[bench] {env['card']} torch {env['torch']} deepspeed {env['deepspeed']}; cases: {', '.join(cases)}; "
          f"{warmup}+{iters} steps each; budget {args.budget:.0f} s (cases killed at {args.budget + args.grace:.0f} s); "
          f"work {work}", flush=True)
    save()
    try:
        for case in cases:
            left = budget.left()
            if left < min_case:
                record({"case": case, "status": "skipped: time budget"})
                print(f"[bench] {case}: skipped: time budget", flush=True)
                continue
            timeout = min(args.case_timeout, left + args.grace)
            record({"case": case, "status": RUNNING})
            row = {"case": case, **run_case(case, tiny, work, warmup, iters, timeout, args, current)}
            if row["status"] == "ok" and not tiny and row.get("step_s"):
                flops = flops_per_step(case, args, int(row.get("params_trainable") or 0))
                if flops:
                    row.update(flops)
                    row["tflops_per_s"] = flops["flops_model"] / row["step_s"] / 1e12
                    if peak:
                        row["mfu"] = flops["flops_model"] / row["step_s"] / (peak * 1e12)
                        row["hfu"] = flops["flops_hardware"] / row["step_s"] / (peak * 1e12)
            if row.get("card") and report["environment"]["card"] in ("cuda", "cpu") and not tiny:
                report["environment"]["card"] = row["card"]
            record(row)
            shown = f" {row['step_s']:.3f} s/step" if row.get("step_s") else ""
            mem = f", peak {row['peak_steps_gib']:.1f} GiB" if row.get("peak_steps_gib") else ""
            print(f"[bench] {case}: {row['status']}{shown}{mem}, process {row['wall_s']:.0f} s (t={budget.elapsed():.0f} s)",
                  flush=True)
            if row["status"] != "ok":
                print(row["log_tail"], flush=True)
            shutil.rmtree(work / case, ignore_errors=True)  # its checkpoint: GBs for the 1.3B model
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return finish_report(save, lambda: markdown(report), json_path, md_path)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
