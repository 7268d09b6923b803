"""How far a clip's mean face-detector score moves when the detector runs every n-th frame.

ft-prep's ``low_confidence`` filter compares the mean full-range detector score over a clip's
frames with ``min_face_confidence``; ``detect_every`` runs the detector on every n-th frame only
(plus each clip's first frame and wherever the mesh loses or finds the face). This runs
FrameAnalyzer as ft-prep does over the clips of one video for each n and prints, per clip, the
mean score and its difference from detection on every frame, and how many clips' decisions at
the threshold change. Results: ``bench/prep_throughput.md``.

Usage::

    python bench/detect_schedule_fidelity.py [--video V] [--source-size 720x528 --loops 4]
        [--every 1 8 16] [--threshold 0.8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from ft_train import media
from ft_train.data import face as facemod

from prep_throughput import SAMPLE, git_commit, remade_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", type=Path, default=SAMPLE)
    ap.add_argument("--source-size", default=None, metavar="WxH")
    ap.add_argument("--loops", type=int, default=0)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--num-frames", type=int, default=81)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        video = remade_copy(args.video, args.source_size, args.loops, Path(tmp)) if args.loops else args.video
        frames = list(media.iter_frames(media.probe(video, 0.5), 25.0, 512, 1))
    n = args.num_frames
    clips = len(frames) // n
    means = {}
    for every in args.every:
        with facemod.FrameAnalyzer(pose_every=0, detect_every=every) as an:
            results = [an(f, detect=i % n == 0) for i, f in enumerate(frames[: clips * n])]
        conf = np.array([r.confidence for r in results]).reshape(clips, n)
        found = np.array([r.face is not None for r in results]).reshape(clips, n)
        means[every] = [float(c[f].mean()) for c, f in zip(conf, found)]
        print(f"every {every:2d}: " + " ".join(f"{m:.3f}" for m in means[every]))
    ref = np.array(means[min(args.every)])
    summary = {}
    for every, m in means.items():
        m = np.array(m)
        summary[every] = {"max_abs_diff": round(float(np.abs(m - ref).max()), 4),
                          "mean_abs_diff": round(float(np.abs(m - ref).mean()), 4),
                          "decisions_changed": int(((m < args.threshold) != (ref < args.threshold)).sum())}
        print(f"every {every:2d}: {summary[every]}")
    if args.json:
        args.json.write_text(json.dumps({"video": str(args.video), "source_size": args.source_size, "loops": args.loops,
                                         "clips": clips, "threshold": args.threshold, "mean_score": means,
                                         "vs_every_frame": summary, "commit": git_commit()}, indent=1))


if __name__ == "__main__":
    main()
