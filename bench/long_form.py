"""Long-form ft-infer: time and memory against the number of segments, tiny model.

ft-infer samples speech longer than one window in overlapping segments
(:mod:`ft_train.inference.long_form`). This script runs that loop, ``generate_long``, for 1, 2,
4, 8 … segments of the same window on the tiny random model of the tests (``conf/model/tiny.yaml``
with random adapters, tiny encoders), and reports seconds per segment, segments/s and, after each
segment, the bytes of the tensors Python still holds besides the weights: time should grow
linearly with the segments and that memory not at all. The mp4 encoding is not timed.

Usage::

    python bench/long_form.py --out /tmp/bench                    # ~1 min on 2 CPU cores
    python bench/long_form.py --segments 1,4 --steps 30 --device cuda --out /tmp/bench
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of the tensor storages Python holds, less ``exclude`` (the weights' storages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        if t.is_meta:
            continue
        try:  # tensors torch.compile left behind (fake tensors) have no data to count
            storage = t.untyped_storage()
            key = storage.data_ptr()
        except RuntimeError:
            continue
        if key and key not in seen and key not in exclude:
            seen.add(key)
            total += storage.nbytes()
    return total


def build_pipeline(root: Path, device: str, steps: int):
    """The tiny base folder, a bundle of random adapters (frame-level audio, motion) and the pipeline."""
    import yaml

    from ft_train.diffusion import FlowMatchSampler
    from ft_train.export import export_bundle
    from ft_train.inference.adapters import read_adapters
    from ft_train.inference.pipeline import TalkingPortraitPipeline
    from ft_train.models import build_model
    from ft_train.models.weights import AdapterCheckpoint
    from ft_train.spec import ModelSpec
    from ft_train.tiny import write_tiny_base

    wan, wav2vec = root / "wan", root / "wav2vec"
    write_tiny_base(wan, wav2vec)
    cfg = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
    cfg.pop("_target_")
    cfg["pretrained"] = str(wan)
    cfg["motion"]["enabled"] = True
    net = build_model(**cfg, audio_mode="frame")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in net.adapter_state_dict().values():
            value.copy_(torch.randn(value.shape, generator=g) * 0.05)
    export_bundle(AdapterCheckpoint(root / "run", "state_dict", net.adapter_state_dict(), {"audio_mode": "frame"}),
                  root / "bundle", torch.float32,
                  ModelSpec.from_run_config({"model": cfg, "data": {"fps": 25.0}}, "frame"), None)
    return TalkingPortraitPipeline.load(read_adapters(root / "bundle"), wan, wav2vec,
                                        sampler=FlowMatchSampler(steps=steps), device=device)


def run(args) -> dict:
    from PIL import Image

    from ft_train.inference.inputs import target_size
    from ft_train.inference.long_form import generate_long, plan_segments

    fps, rate = 25.0, 16000
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(Path(tmp), args.device, args.steps)
    width, height = target_size(3, 4, args.side, pipe.grid)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    cond = pipe.conditions(photo, "a person is talking")
    weights = set()
    for module in (pipe.model, pipe.image_encoder, pipe.text_encoder, pipe.audio_encoder, pipe.vae.enc):
        weights |= {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    segment = pipe.segment

    rows = []
    for n in args.segments:
        total = args.segment_frames + (n - 1) * (args.segment_frames - args.overlap)
        plan = plan_segments(total, args.segment_frames, args.overlap)
        assert len(plan) == n
        speech = (0.1 * np.sin(2 * np.pi * 220 * np.arange(int(total / fps * rate)) / rate)).astype(np.float32)
        out = np.zeros((total, height, width, 3), np.uint8)
        held = []

        def measured(*a, **k):
            frames = segment(*a, **k)
            held.append(live_tensor_bytes(weights))
            return frames

        pipe.segment = measured
        gc.collect()
        started = time.perf_counter()
        per_segment = generate_long(pipe, cond, speech, fps, plan, out, seed=1)
        seconds = time.perf_counter() - started
        pipe.segment = segment
        rows.append({"segments": n, "frames": total, "video_s": total / fps, "seconds": seconds,
                     "s_per_segment": seconds / n, "segments_per_s": n / seconds,
                     "video_s_per_s": total / fps / seconds, "segment_seconds": per_segment,
                     "held_bytes_max": max(held), "held_bytes_after_each": held})
        print(f"{n} segments: {seconds:.2f} s, {seconds / n:.2f} s/segment, {n / seconds:.3f} segments/s, "
              f"held {max(held) / 2**20:.2f} MiB", flush=True)
    return {"width": width, "height": height, "rows": rows}


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"# bench/long_form.py on {report['machine']['host']} ({report['date']})", "",
             f"command: `{report['command']}` at commit {report['commit']}  ",
             f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, device {a['device']}, "
             f"torch threads {report['machine']['threads']}; load average (1, 5, 15 min) before "
             f"{[round(x, 2) for x in report['machine']['load_before']]}, after "
             f"{[round(x, 2) for x in report['machine']['load_after']]} (other processes share the cores: "
             "the rates are lower bounds)", "",
             f"Tiny model, {report['width']}×{report['height']} px, {a['segment_frames']}-frame segments overlapping "
             f"by {a['overlap']}, {a['steps']} sampling steps (three guidance passes each, batched), 25 fps.", "",
             "| segments | frames | video s | wall s | s/segment | segments/s | video s per wall s | tensors held (MiB, max after a segment) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['segments']} | {r['frames']} | {r['video_s']:.2f} | {r['seconds']:.2f} | "
                     f"{r['s_per_segment']:.2f} | {r['segments_per_s']:.3f} | {r['video_s_per_s']:.3f} | "
                     f"{r['held_bytes_max'] / 2**20:.2f} |")
    first, last = report["rows"][0], report["rows"][-1]
    lines += ["", f"s/segment at {last['segments']} segments / at {first['segments']}: "
              f"{last['s_per_segment'] / first['s_per_segment']:.2f} (1 = time linear in the segments); "
              f"tensors held: {last['held_bytes_max'] / max(first['held_bytes_max'], 1):.3f}× "
              "(weights excluded; 1 = memory of one segment)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segments", default="1,2,4,8", help="segment counts to run (comma-separated)")
    ap.add_argument("--segment-frames", type=int, default=81)
    ap.add_argument("--overlap", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per segment")
    ap.add_argument("--side", type=int, default=64, help="longest edge in px (a 3:4 portrait)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny tensors: more cost more than they save)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    args.segments = [int(s) for s in args.segments.split(",")]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    report = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
              "commit": commit.strip() or None,
              "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "load_before": list(os.getloadavg())},
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    report.update(run(args))
    report["machine"]["load_after"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"long_form-{report['machine']['host']}-{args.device.replace(':', '')}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
