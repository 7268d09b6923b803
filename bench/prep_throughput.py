"""Frames per second per CPU core of ft-prep's per-frame work at 512 px, and where the time goes.

Pinned to one core (``sched_setaffinity``), FFmpeg decoding single-threaded, on the shipped
sample clip (512×512, 25 fps) repeated ``--repeats`` times. Stages timed separately:

  decode      PyAV decode + resample to 25 fps + RGB conversion (data_tools.media.iter_frames)
  face        face mesh (478 landmarks, tracking mode) + face detection, per frame
  pose        mediapipe pose (full model) on every frame; ft-prep's default runs it every
              ``pose_every``-th frame, so its share there is this / pose_every
  masks       lip masks from landmarks (fill + dilate in a window around the lips)
  encode      x264 (crf 18, veryfast) of the output clip — not part of the target, shown for scale

Measured (2026-11-26, the 2-core CPU dev machine, "Intel(R) Xeon(R) Processor", one core, 3×100
frames of the sample clip): decode 1.17, face mesh + detection 9.16, pose 22.9, masks 0.67,
encode 2.35 ms/frame → 90.9 frames/s/core for decode+landmarks+masks (target 100), 59.8 with
pose every 4th frame, 52.4 with encoding too. Face mesh + detection is 85% of the target path;
pose (the only bundled model is the "full" one) is why ``pose_every`` exists.

Usage::

    python bench/prep_throughput.py [--repeats 3] [--pose-every 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from data_tools import face as facemod
from data_tools import media

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "assets" / "sample_talking.mp4"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", type=Path, default=SAMPLE)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pose-every", type=int, default=4, help="as ft-prep's pose_every, for the total")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core: a per-core figure
    info = media.probe(args.video)

    n = 0
    t_decode = 0.0
    frames = []
    for _ in range(args.repeats):
        got, dt = timed(lambda: list(media.iter_frames(info, 25.0, 512, threads=1)))
        t_decode += dt
        n += len(got)
        frames = got
    per_frame = {"decode": t_decode / n}

    clip = np.stack(frames)
    with facemod.FrameAnalyzer(pose_every=0) as an:
        an(clip[0])  # graph warm-up (model load) is per video, not per frame
        results, dt = timed(lambda: [an(f) for _ in range(args.repeats) for f in clip])
    per_frame["face"] = dt / len(results)
    with facemod.FrameAnalyzer(pose_every=1) as an:
        an(clip[0])
        _, dt = timed(lambda: [an(f) for _ in range(args.repeats) for f in clip])
    per_frame["pose"] = max(0.0, dt / (args.repeats * len(clip)) - per_frame["face"])

    arrays = facemod.stack_results(results[: len(clip)])
    h, w = clip.shape[1:3]
    _, dt = timed(lambda: [facemod.lip_masks(arrays["face"], arrays["face_box"], h, w, 0.15) for _ in range(args.repeats)])
    per_frame["masks"] = dt / (args.repeats * len(clip))
    _, dt = timed(lambda: media.encode_mp4(clip, 25.0, 18, "veryfast"))
    per_frame["encode"] = dt / len(clip)

    core = per_frame["decode"] + per_frame["face"] + per_frame["masks"]
    with_pose = core + per_frame["pose"] / max(args.pose_every, 1)
    result = {
        "video": str(args.video),
        "size": [w, h],
        "frames_timed_per_stage": args.repeats * len(clip),
        "ms_per_frame": {k: round(v * 1e3, 3) for k, v in per_frame.items()},
        "frames_per_s_per_core": {
            "decode+landmarks+masks": round(1 / core, 1),
            f"+pose every {args.pose_every}": round(1 / with_pose, 1),
            f"+pose every {args.pose_every}+encode": round(1 / (with_pose + per_frame["encode"]), 1),
        },
        "cpu": platform.processor() or platform.machine(),
        "cores_visible": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
