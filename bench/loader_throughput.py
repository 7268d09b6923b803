"""Data-side throughput on CPU: latent-shard samples/s through the training loader, raw-shard decode rate.

Two numbers a user needs to size ``data.num_workers`` per GPU (issue 10, item 4):

  latent   ``ft_train.data.LatentShardDataModule.train_dataloader()`` — the exact training loader
           (WebDataset, shuffle buffer, ``.npy`` decode, schema check, fp32 tensors, text padded to
           512, collate) — over synthetic shards of the real size (``ft_train.data.synthetic``:
           latents (16, 21, 64, 64) fp16 for 512×512×81 at 25 fps, CLIP (257, 1280), audio
           (161, 768), lip mask; text 4–24 tokens, shorter than most real captions). Timed with
           ``--workers`` loader processes (default 2; aim ≥ 20 samples/s) and in-process (0
           workers = what one worker core delivers). The shards were just written, so they are
           read from the page cache: this is decode cost, not disk or network bandwidth.
  raw      ``ft-prep`` shards (``data_tools.prep.run_prep`` on tests/assets/sample_talking.mp4,
           81-frame 512×512 clips), read with WebDataset and decoded member by member with
           ``ft_train.media`` / ``ft_train.data.raw_format`` (mp4 → RGB frames, flac → 16 kHz audio, lip masks, landmarks), pinned
           to one core: clips/s per core. Also raw-mode training's ``ft_train.data.raw.load_clip``
           (the same decode plus the training window and resize) when that module is present.

The machine (CPU model, cores, load average before and after) is recorded with the numbers; a
load average above a quarter of the cores means other processes shared the CPU and the rates
are lower bounds.

Usage::

    python bench/loader_throughput.py                       # ~2-3 min; bench/results/loader_throughput-<host>.md/json
    python bench/loader_throughput.py --tiny --out /tmp/x   # seconds: small shapes, for the tests
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "assets" / "sample_talking.mp4"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    with contextlib.suppress(OSError):
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), info["cpu"])
    if hasattr(os, "sched_getaffinity"):
        info["cores_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, StopIteration, ValueError):
        kb = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
        info["memory_gib"] = round(kb / 2**20, 1)
    return info


def tensor_bytes(batch: dict[str, Any]) -> int:
    import torch

    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def time_latent_loader(shards: Path, workers: int, batches: int, warmup: int, shuffle_buffer: int) -> dict[str, Any]:
    """Samples/s of the training loader with ``workers`` processes (batch size 1)."""
    from ft_train.data import LatentShardDataModule

    dm = LatentShardDataModule(shards=str(shards), batch_size=1, num_workers=workers, shuffle_buffer=shuffle_buffer, seed=0)
    t0 = time.perf_counter()
    loader = dm.train_dataloader()
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    del it, loader  # stops the worker processes
    return {
        "workers": workers,
        "batches": batches,
        "samples_per_s": batches / elapsed,
        "first_batch_s": round(first_s, 3),
        "decoded_mb_per_sample": round(tensor_bytes(first) / 2**20, 2),
        "latent_shape": list(first["latents"].shape[1:]),
    }


def prepare_raw(work: Path, copies: int, frames: int, stride: int, max_side: int, tiny: bool) -> tuple[Path, dict]:
    """Raw shards of ``copies`` copies of the sample clip (``ft-prep``'s own driver)."""
    from data_tools.prep import PrepConfig, run_prep

    videos = work / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        shutil.copy(SAMPLE, videos / f"talk{i}.mp4")
        (videos / f"talk{i}.txt").write_text("a person is talking to the camera")
    extra = {"min_face_px": 8, "min_face_confidence": 0.5} if tiny else {}
    cfg = PrepConfig(input=str(videos), output=str(work / "raw"), num_frames=frames, stride=stride, max_side=max_side,
                     previews_per_shard=0, progress=False, **extra)
    t0 = time.perf_counter()
    report = run_prep(cfg)
    if not report.get("samples"):
        raise SystemExit(f"bench/loader_throughput.py: ft-prep made no clips from {SAMPLE} "
                         f"(rejects: {report.get('rejects')}); check the prep settings")
    return work / "raw", {"clips": report["samples"], "prep_s": round(time.perf_counter() - t0, 2)}


def time_raw_decode(raw_dir: Path, passes: int, frames: int) -> dict[str, Any]:
    """Per-member decode time of raw shards on one core, and raw-mode ``load_clip`` if present."""
    import webdataset as wds

    from ft_train import media
    from ft_train.data.raw_format import decode_lip_masks, decode_npz

    urls = sorted(str(p) for p in raw_dir.glob("shard-*.tar"))
    stage = {"read": 0.0, "mp4": 0.0, "flac": 0.0, "lipmask": 0.0, "landmarks": 0.0}
    clips = decoded_frames = 0
    samples = []
    for _ in range(passes):
        t = time.perf_counter()
        for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            now = time.perf_counter()
            stage["read"] += now - t
            frames_rgb = media.decode_mp4(raw["mp4"])
            t1 = time.perf_counter()
            media.decode_flac(raw["flac"])
            t2 = time.perf_counter()
            decode_lip_masks(raw["lipmask.npz"])
            t3 = time.perf_counter()
            if "landmarks.npz" in raw:
                decode_npz(raw["landmarks.npz"])
            t = time.perf_counter()
            stage["mp4"] += t1 - now
            stage["flac"] += t2 - t1
            stage["lipmask"] += t3 - t2
            stage["landmarks"] += t - t3
            clips += 1
            decoded_frames += len(frames_rgb)
            if len(samples) < 4:
                samples.append(raw)
    total = sum(stage.values())
    out: dict[str, Any] = {
        "clips_timed": clips,
        "frames_per_clip": decoded_frames // max(clips, 1),
        "frame_size": list(frames_rgb.shape[1:3]),
        "bytes_per_clip": round(sum(Path(u).stat().st_size for u in urls) / max(clips // passes, 1)),
        "ms_per_clip": {k: round(v / clips * 1e3, 2) for k, v in stage.items()},
        "clips_per_s_per_core": clips / total,
        "frames_per_s_per_core": decoded_frames / total,
    }
    out["load_clip"] = time_load_clip(raw_dir, samples, passes, frames)
    return out


def time_load_clip(raw_dir: Path, samples: list[dict], passes: int, frames: int) -> dict[str, Any]:
    """Raw-mode training's per-clip load (decode + window + resize), when ft_train.data.raw exists."""
    try:
        from ft_train.data.raw_clip import load_clip
    except ImportError as e:
        return {"status": f"unavailable: {e}"}
    stats = json.loads((raw_dir / "stats.json").read_text())
    try:
        times = []
        for _ in range(passes):
            for raw in samples:
                t = time.perf_counter()
                load_clip(raw, stats, start=0, num_frames=frames)
                times.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - a module in progress must not hide the other numbers
        return {"status": f"error: {e.__class__.__name__}: {e}"}
    return {"status": "ok", "clips_timed": len(times), "ms_per_clip": round(statistics.median(times) * 1e3, 1),
            "clips_per_s_per_core": 1 / statistics.median(times)}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lat, raw = r["latent"], r["raw"]
    lines = [
        f"# bench/loader_throughput.py on {m['host']} ({r['date']})",
        "",
        f"command: `{r['command']}`  ",
        f"machine: {m['cpu']}, {m['cores']} cores ({m.get('cores_usable', '?')} usable), {m.get('memory_gib', '?')} GiB; "
        f"load average (1, 5, 15 min) before {r['loadavg_before']}, after {r['loadavg_after']}",
    ]
    if r.get("load_note"):
        lines += ["", f"**Note:** {r['load_note']}"]
    lines += [
        "",
        f"## Latent shards ({lat['shards']} shards, {lat['samples']} samples, "
        f"{lat['bytes_per_sample'] / 2**20:.2f} MB/sample on disk, latents {lat['runs'][0]['latent_shape']})",
        "",
        "| loader workers | samples/s | first batch s | decoded MB/sample |",
        "| --- | --- | --- | --- |",
    ]
    for run in lat["runs"]:
        lines.append(f"| {run['workers']} | {run['samples_per_s']:.1f} | {run['first_batch_s']:.2f} | {run['decoded_mb_per_sample']} |")
    lines += [
        "",
        f"## Raw shards ({raw['clips']} clips of {raw['frames_per_clip']} frames at {raw['frame_size'][0]}×{raw['frame_size'][1]}, "
        f"{raw['bytes_per_clip'] / 2**20:.2f} MB/clip; one core)",
        "",
        "| stage | ms/clip |",
        "| --- | --- |",
    ]
    for k, v in raw["ms_per_clip"].items():
        lines.append(f"| {k} | {v} |")
    lines += [
        f"| **total** | **{1e3 / raw['clips_per_s_per_core']:.1f}** |",
        "",
        f"Raw decode: {raw['clips_per_s_per_core']:.2f} clips/s per core ({raw['frames_per_s_per_core']:.0f} frames/s).",
    ]
    lc = raw["load_clip"]
    if lc.get("status") == "ok":
        lines.append(f"Raw-mode `load_clip` (decode + window + resize): {lc['ms_per_clip']} ms/clip = "
                     f"{lc['clips_per_s_per_core']:.2f} clips/s per core.")
    else:
        lines.append(f"Raw-mode `load_clip`: {lc.get('status')}.")
    lines += [
        "",
        "Sizing: at batch size 1 a training step of T seconds consumes 1/T samples/s per GPU; the loader keeps up when "
        "workers × (samples/s of one worker) exceeds that with margin. Raw mode decodes every clip on each visit "
        "(plus the encoders, not timed here).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes and counts (the tests)")
    ap.add_argument("--workers", type=int, default=2, help="loader processes for the main latent number (default 2)")
    ap.add_argument("--samples", type=int, default=None, help="synthetic latent samples to write (default 48; tiny 8)")
    ap.add_argument("--samples-per-shard", type=int, default=None, help="default 8; tiny 2")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per loader run (default 96; tiny 8)")
    ap.add_argument("--warmup-batches", type=int, default=None, help="default 8; tiny 2")
    ap.add_argument("--shuffle-buffer", type=int, default=64, help="loader shuffle buffer, samples (the datamodule's default)")
    ap.add_argument("--raw-copies", type=int, default=None, help="copies of the sample video to prep (default 2; tiny 1)")
    ap.add_argument("--raw-passes", type=int, default=None, help="passes over the raw shards (default 3; tiny 1)")
    ap.add_argument("--work-dir", type=Path, default=None, help="where shards are written (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)

    tiny = args.tiny
    pick = lambda value, full, small: value if value is not None else (small if tiny else full)  # noqa: E731
    samples = pick(args.samples, 48, 8)
    per_shard = pick(args.samples_per_shard, 8, 2)
    batches = pick(args.batches, 96, 8)
    warmup = pick(args.warmup_batches, 8, 2)
    copies = pick(args.raw_copies, 2, 1)
    passes = pick(args.raw_passes, 3, 1)
    # 81 frames at 512×512 (64×64 latents); tiny: 17 frames, 8×8 latents, 96 px raw clips.
    frames, latent_hw, max_side = (17, (8, 8), 96) if tiny else (81, (64, 64), 512)
    stride = frames if tiny else 19  # the 100-frame sample holds two 81-frame clips at stride 19

    load_before = [round(x, 2) for x in os.getloadavg()]
    report: dict[str, Any] = {
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "loadavg_before": load_before,
        "tiny": tiny,
    }
    print(f"[loader] {report['machine']['cpu']}, {report['machine']['cores']} cores, load {load_before}", flush=True)

    from ft_train.data.synthetic import write_synthetic_shards

    with tempfile.TemporaryDirectory(prefix="ft_loader_bench_") as tmp:
        work = args.work_dir or Path(tmp)
        t0 = time.perf_counter()
        shards = write_synthetic_shards(work / "latent", num_samples=samples, samples_per_shard=per_shard,
                                        num_frames=frames, fps=25.0, latent_hw=latent_hw)
        write_s = time.perf_counter() - t0
        print(f"[loader] wrote {len(shards)} latent shards in {write_s:.1f} s", flush=True)
        runs = []
        for workers in dict.fromkeys([args.workers, 0]):
            run = time_latent_loader(work / "latent", workers, batches, warmup, args.shuffle_buffer)
            print(f"[loader] latent shards, {workers} workers: {run['samples_per_s']:.1f} samples/s", flush=True)
            runs.append(run)
        report["latent"] = {
            "shards": len(shards),
            "samples": samples,
            "bytes_per_sample": sum(s.stat().st_size for s in shards) / samples,
            "shuffle_buffer": args.shuffle_buffer,
            "write_s": round(write_s, 2),
            "runs": runs,
            "samples_per_s": runs[0]["samples_per_s"],
        }

        raw_dir, prep = prepare_raw(work, copies, frames, stride, max_side, tiny)
        print(f"[loader] ft-prep made {prep['clips']} raw clips in {prep['prep_s']:.1f} s", flush=True)
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if affinity:
            os.sched_setaffinity(0, {min(affinity)})  # one core: a per-core rate
        try:
            raw = time_raw_decode(raw_dir, passes, frames)
        finally:
            if affinity:
                os.sched_setaffinity(0, affinity)
        raw.update(prep)
        raw["clips"] = prep["clips"]
        report["raw"] = raw
        print(f"[loader] raw shards: {raw['clips_per_s_per_core']:.2f} clips/s per core", flush=True)

    load_after = [round(x, 2) for x in os.getloadavg()]
    report["loadavg_after"] = load_after
    cores = report["machine"].get("cores_usable") or report["machine"]["cores"] or 1
    if max(load_before[0], load_after[0]) > 0.25 * cores:
        report["load_note"] = (f"other processes were running (1-min load average {load_before[0]} before, "
                               f"{load_after[0]} after, on {cores} cores); the rates are lower bounds")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"loader_throughput-{report['machine']['host']}" + ("-tiny" if tiny else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    print(f"[loader] wrote {args.out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
