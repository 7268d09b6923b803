"""How faithful ω_b (body motion) stays when pose runs on a few frames of a clip instead of all.

ft-prep runs mediapipe pose (~20 ms a frame, its slowest model) only to get ω_b, the variance of
the upper-body joints over a clip. This bench makes clips with real, varied body motion — the
shipped talking-head sample, swayed (rotation about the bottom centre), shifted and zoomed over
time, each clip with its own amplitude and frequency, one clip still — and computes ω_b per clip
with pose (one fresh graph per clip and schedule) on:

  every frame (the reference), every 4th frame (the default ``pose_every=4``), and N frames
  evenly spread over the clip (first and last frame included), tracking, and in static-image
  mode ("static"), and static with one body detection per clip ("clip-region", as ft-prep's
  ``pose_samples_per_clip=N`` runs them by default, ``pose_region: clip``).

It prints, per schedule, the relative error of ω_b against the reference (median and max over
clips) and Spearman's rank correlation across clips (ω is normalised by dataset percentiles
later, so its ranking matters most). Results: ``bench/prep_throughput.md``.

Usage::

    python bench/pose_schedule_fidelity.py [--clips 16] [--samples 4 6 8 12 16] [--static-samples 6 8 16]
        [--region-samples 6 8] [--poses joints.npz] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np

from ft_train import media
from ft_train.data import face as facemod

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "assets" / "sample_talking.mp4"
FPS = 25.0
NUM_FRAMES = 81


def motion_clip(src: np.ndarray, rng: np.random.Generator, still: bool) -> tuple[np.ndarray, dict]:
    """81 frames of ``src`` (played forward and back) under a time-varying similarity transform."""
    n, h, w = src.shape[:3]
    p = {
        "sway_deg": 0.0 if still else float(rng.uniform(0, 5)),
        "shift_px": 0.0 if still else float(rng.uniform(0, 30)),
        "zoom": 0.0 if still else float(rng.uniform(0, 0.05)),
        "hz": float(rng.uniform(0.2, 1.5)),
        "phase": float(rng.uniform(0, 2 * np.pi)),
        "offset": int(rng.integers(0, n)),
    }
    order = np.r_[np.arange(n), np.arange(n - 2, 0, -1)]
    out = np.empty((NUM_FRAMES, h, w, 3), np.uint8)
    for i in range(NUM_FRAMES):
        t = i / FPS
        s = np.sin(2 * np.pi * p["hz"] * t + p["phase"])
        c = np.cos(2 * np.pi * 0.7 * p["hz"] * t + p["phase"])
        # Scale ≥ 1.12 keeps the borders out of the frame at these shifts and angles.
        m = cv2.getRotationMatrix2D((w / 2, h), p["sway_deg"] * s, 1.12 + p["zoom"] * c)
        m[0, 2] += p["shift_px"] * s
        m[1, 2] += 0.3 * p["shift_px"] * c
        out[i] = cv2.warpAffine(src[order[(p["offset"] + i) % len(order)]], m, (w, h), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)
    return out, p


def run_pose(frames: np.ndarray, idx: list[int], static: bool = False, smooth: bool = True, region: bool = False,
             boxes=None) -> tuple[np.ndarray, float]:
    """(F, 33, 4) joints from pose run (tracking mode, a fresh graph; ``static``: each frame on
    its own; ``smooth=False``: tracking without mediapipe's landmark smoothing, which assumes
    consecutive frames; ``region``: static-image pose with one body detection per clip,
    :class:`ClipPose`) on frames ``idx`` in time order, NaN elsewhere; seconds (the graph's
    model load not included)."""
    pose = np.full((len(frames), facemod.NUM_POSE_JOINTS, 4), np.nan, np.float32)
    if region:  # ft-prep's pose_region=clip: one body detection, its region for the other frames
        graph = facemod.ClipPose()
        t = time.perf_counter()
        for i, j in zip(idx, graph([frames[i] for i in idx], None if boxes is None else boxes[idx])):
            if j is not None:
                pose[i] = j
        dt = time.perf_counter() - t
        graph.close()
        return pose, dt
    if static or not smooth:
        import mediapipe as mp

        with mp.solutions.pose.Pose(static_image_mode=static, model_complexity=1, smooth_landmarks=smooth) as graph:
            t = time.perf_counter()
            for i in idx:
                frames[i].flags.writeable = False
                res = graph.process(frames[i])
                if res.pose_landmarks:
                    pose[i] = [(p.x, p.y, p.z, p.visibility) for p in res.pose_landmarks.landmark]
            return pose, time.perf_counter() - t
    with facemod.FrameAnalyzer(pose_every=0, pose_on_call=True) as an:
        t = time.perf_counter()
        for i in idx:
            j = an.pose(frames[i])
            if j is not None:
                pose[i] = j
        dt = time.perf_counter() - t
    return pose, dt


def run_shared(analyzer, frames: np.ndarray, idx: list[int]) -> tuple[np.ndarray, float]:
    """As :func:`run_pose` in tracking mode, on a graph kept from clip to clip."""
    pose = np.full((len(frames), facemod.NUM_POSE_JOINTS, 4), np.nan, np.float32)
    t = time.perf_counter()
    for i in idx:
        j = analyzer.pose(frames[i])
        if j is not None:
            pose[i] = j
    return pose, time.perf_counter() - t


# body_motion's joint rules compared: ft-prep's (visibility >= 0.5 in half the frames) and stricter
# ones that leave out joints mediapipe only guesses (hands below the frame flicker around 0.5).
DEFINITIONS = {
    "visible joints (old)": {},
    "visible in 90% of frames": {"min_valid_frac": 0.9},
    "visibility >= 0.8": {"min_visibility": 0.8},
    "visibility >= 0.8 in 90%": {"min_visibility": 0.8, "min_valid_frac": 0.9},
}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--samples", type=int, nargs="+", default=[4, 6, 8, 12, 16])
    ap.add_argument("--static-samples", type=int, nargs="*", default=[6, 8, 16])
    ap.add_argument("--nosmooth-samples", type=int, nargs="*", default=[6],
                    help="tracking mode without landmark smoothing (as ft-prep's pose_samples_per_clip runs it)")
    ap.add_argument("--shared-samples", type=int, nargs="*", default=[6],
                    help="tracking mode, one graph for all clips in turn (its state carries over, as ft-prep's does)")
    ap.add_argument("--region-samples", type=int, nargs="*", default=[6, 8],
                    help="static-image pose with one body detection per clip (ft-prep's pose_region=clip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--poses", type=Path, default=None,
                    help="npz of the joints: written after a run; if it exists, read instead of running pose")
    args = ap.parse_args()

    info = media.probe(SAMPLE, 0.5)
    src = np.stack(list(media.iter_frames(info, FPS, 512, 1)))
    rng = np.random.default_rng(args.seed)
    schedules = {"every frame": list(range(NUM_FRAMES)), "pose_every=4": list(range(0, NUM_FRAMES, 4))}
    for n in args.samples:
        schedules[f"samples={n}"] = sorted(set(np.round(np.linspace(0, NUM_FRAMES - 1, n)).astype(int).tolist()))
    for n in args.static_samples:  # static_image_mode: no tracking state between the sparse frames
        schedules[f"samples={n} static"] = schedules.get(f"samples={n}") or sorted(
            set(np.round(np.linspace(0, NUM_FRAMES - 1, n)).astype(int).tolist()))
    for n in args.nosmooth_samples:
        schedules[f"samples={n} unsmoothed"] = sorted(set(np.round(np.linspace(0, NUM_FRAMES - 1, n)).astype(int).tolist()))
    for n in args.shared_samples:
        schedules[f"samples={n} shared"] = sorted(set(np.round(np.linspace(0, NUM_FRAMES - 1, n)).astype(int).tolist()))
    for n in args.region_samples:
        spread = sorted(set(np.round(np.linspace(0, NUM_FRAMES - 1, n)).astype(int).tolist()))
        schedules[f"samples={n} clip-region"] = schedules[f"samples={n} face-region"] = spread
    poses = {k: [] for k in schedules}
    seconds = {k: 0.0 for k in schedules}
    clips = []
    saved = {}
    if args.poses and args.poses.is_file():  # schedules already run are read back, new ones run
        with np.load(args.poses, allow_pickle=False) as z:
            saved = {k: z[k] for k in z.files}
        seconds.update(json.loads(str(saved["seconds"])))
    todo = [k for k in schedules if k not in saved]
    for k in schedules:
        if k in saved:
            poses[k] = list(saved[k][: args.clips])
    shared = {k: None for k in todo if k.endswith("shared")}
    if todo:
        for c in range(args.clips):
            frames, p = motion_clip(src, rng, still=c == 0)
            clips.append(p)
            if any(k.endswith("face-region") for k in todo):  # ft-prep has the face box of every frame
                with facemod.FrameAnalyzer(pose_every=0, detect_every=16) as an:
                    res = [an(f) for f in frames]
                boxes = facemod.stack_results(res)["face_box"]
            for k in todo:
                if k in shared:
                    if shared[k] is None:
                        shared[k] = facemod.FrameAnalyzer(pose_every=0, pose_on_call=True)
                    pose, dt = run_shared(shared[k], frames, schedules[k])
                else:
                    pose, dt = run_pose(
                        frames, schedules[k], static=k.endswith("static"), smooth=not k.endswith("unsmoothed"),
                        region=k.endswith("-region"), boxes=boxes if k.endswith("face-region") else None,
                    )  # fmt: skip
                poses[k].append(pose)
                seconds[k] += dt
            print(f"clip {c} done", flush=True)
        if args.poses:
            np.savez_compressed(args.poses, **{k: np.stack(v) for k, v in poses.items()},
                                seconds=json.dumps(seconds), clips=json.dumps(clips))
    if not clips:
        clips = json.loads(str(saved["clips"]))
    h, w = src.shape[1:3]
    result = {"clips": clips, "load_average": os.getloadavg(), "omega_b": {}, "summary": {}}
    for name, kwargs in DEFINITIONS.items():
        omega = {k: [np.nan if (v := facemod.body_motion(p, w, h, **kwargs)) is None else v for p in ps]
                 for k, ps in poses.items()}
        print(f"--- ω_b {name}")
        result["omega_b"][name] = {k: [None if np.isnan(x) else round(float(x), 6) for x in v] for k, v in omega.items()}
        result["summary"][name] = summarise(omega, schedules, seconds, args.clips)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def summarise(omega: dict, schedules: dict, seconds: dict, num_clips: int) -> dict:
    ref = np.array(omega["every frame"])
    summary = {}
    for k in schedules:
        v = np.array(omega[k])
        ok = ~np.isnan(v) & ~np.isnan(ref)
        rel = np.abs(v[ok] - ref[ok]) / ref[ok]
        moving = ok & (np.arange(len(v)) > 0)  # clip 0 is still: a relative error of noise
        rel_m = np.abs(v[moving] - ref[moving]) / ref[moving]
        summary[k] = {
            "pose_runs_per_clip": len(schedules[k]),
            "pose_s_per_clip": round(seconds[k] / num_clips, 3),
            "omega_b_missing": int((~ok).sum()),
            "rel_error_median_moving_clips": round(float(np.median(rel_m)), 4),
            "rel_error_max_moving_clips": round(float(rel_m.max()), 4),
            "rel_error_still_clip": round(float(rel[0]), 4) if ok[0] else None,
            "spearman_vs_every_frame": round(spearman(v[ok], ref[ok]), 4),
        }
        print(f"{k:14s} {json.dumps(summary[k])}")
    return summary


if __name__ == "__main__":
    main()
