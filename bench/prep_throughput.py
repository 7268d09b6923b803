"""Frames per second per CPU core of ft-prep's per-frame work at 512 px, and where the time goes.

Pinned to one core (``sched_setaffinity``), FFmpeg decoding single-threaded, on the shipped
sample clip (512×512, 25 fps, 100 frames) passed ``--repeats`` times; each stage's ms/frame is
the median over the passes. The speed settings (``detect_every``, ``pose_every``) and the lip
dilation come from ``conf/prep.yaml`` unless given. Stages:

  decode       PyAV decode + resample to 25 fps + RGB at 512 px (ft_train.media.iter_frames),
               opening the file included
  face_mesh    face mesh (478 landmarks, tracking mode) + landmarks to pixels, every frame
  face_detect  full-range face detection, on the frames FrameAnalyzer picks (detect_every,
               mesh lost/found the face), averaged over all frames
  analyzer     FrameAnalyzer's own Python around the graphs
  masks        lip masks from landmarks (fill + distance transform around the lips)
  pose         mediapipe pose (full model) every pose_every-th frame, averaged over all frames:
               the time a second analyzer with pose takes more than the first
  encode       x264 (crf 18, veryfast) of the output clip
  end_to_end   the whole ft-prep path (``run_prep`` on a copy of the video, one process on the
               same core: probe, audio, decode, shot cuts, face analysis, filters, reference
               frame, pose on kept clips, masks, x264/FLAC encoding, shard writing, report), in
               frames decoded per second of wall time; ``--repeats`` rounds
  baseline     decode + mediapipe FaceMesh alone (refine_landmarks, tracking mode), run right
               after each end-to-end round: the median of ``end_to_end / baseline`` per round is
               the share of the ideal the pipeline reaches

The target (issue 3, item 8: ≥ 100 frames/s/core) is decode + face_mesh + face_detect +
analyzer + masks ("decode+landmarks+masks"); totals with pose and with encoding are printed
too. ``masks_face_230px`` times the masks with the sample's landmarks scaled 2.5× about their
centre: the sample's face is only ~90 px wide, a 512 px talking-head crop's is often 200+, and
the mask cost grows with it. Results, machine and history: ``bench/prep_throughput.md``.

Usage::

    python bench/prep_throughput.py [--repeats 5] [--detect-every N] [--pose-every N] [--json out.json]
        [--source-size 720x528] [--loops 4] [--override pose_every=0 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from ft_train import media
from ft_train.data import face as facemod

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "assets" / "sample_talking.mp4"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_s() -> float:
    """CPU seconds this process has used, all threads (mediapipe runs graph work on its own)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def remade_copy(video: Path, size: str | None, loops: int, folder: Path) -> Path:
    """The video scaled to ``size`` (WxH) and played forward then backward ``loops`` times
    (sound too), made with the imageio-ffmpeg binary: a longer video without a jump where it
    starts again, so the per-video start-up (graphs, model loads) weighs as on real footage."""
    import subprocess

    import imageio_ffmpeg

    scale = f"scale={size.lower().replace('x', ':')}," if size else ""
    n = 2 * loops
    graph = (f"[0:v]{scale}split={n}" + "".join(f"[v{i}]" for i in range(n)) + ";"
             f"[0:a]asplit={n}" + "".join(f"[a{i}]" for i in range(n)) + ";"
             + "".join(f"[v{i}]reverse[w{i}];[a{i}]areverse[b{i}];" for i in range(1, n, 2))
             + "".join(f"[v{i}][a{i}]" if i % 2 == 0 else f"[w{i}][b{i}]" for i in range(n))
             + f"concat=n={n}:v=1:a=1[v][a]")
    out = folder / f"{video.stem}_{size or 'orig'}_x{n}.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(video), "-filter_complex", graph,
                    "-map", "[v]", "-map", "[a]", "-c:v", "libx264", "-crf", "16", "-preset", "fast", "-c:a", "aac",
                    str(out)], check=True)
    return out


def git_commit() -> str | None:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout
    except OSError:
        return None
    return head.strip() + ("+changes" if dirty.strip() else "")


def end_to_end(
    video: Path, info: media.VideoInfo, fps: float, side: int, rounds: int, overrides: list[str]
) -> dict:
    """The whole ft-prep path and decode + FaceMesh alone, frames decoded per second on this core.

    Interleaved: each round runs ft-prep on one copy of the video (a fresh output folder), then
    decode + FaceMesh on it, so both see the same load; the ratio is taken per round and its
    median reported (a shared machine's load moves either figure by 2x between minutes).
    Also returns what the last ft-prep report says (samples, rejects, seconds per step).
    """
    import shutil
    import tempfile

    import mediapipe as mp

    from data_tools.prep import load_config, run_prep

    frames_per_video = len(list(media.iter_frames(info, fps, side, threads=1)))
    e2e, base, e2e_cpu, base_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(max(2, rounds)):
            inputs = Path(tmp) / f"videos{r}"
            inputs.mkdir()
            shutil.copy(video, inputs / f"v{r}{video.suffix}")
            cfg = load_config([f"input={inputs}", f"output={Path(tmp) / f'out{r}'}", "progress=false",
                               "num_workers=0", *overrides])
            t, c = time.perf_counter(), cpu_s()
            report = run_prep(cfg)
            e2e.append(frames_per_video / (time.perf_counter() - t))
            e2e_cpu.append(frames_per_video / (cpu_s() - c))
            t, c = time.perf_counter(), cpu_s()
            with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, refine_landmarks=True, max_num_faces=1) as m:
                for frame in media.iter_frames(info, fps, side, threads=1):
                    frame.flags.writeable = False
                    m.process(frame)
            base.append(frames_per_video / (time.perf_counter() - t))
            base_cpu.append(frames_per_video / (cpu_s() - c))
    ratios = [a / b for a, b in zip(e2e, base)]
    ratios_cpu = [a / b for a, b in zip(e2e_cpu, base_cpu)]
    return {
        "end_to_end_frames_per_s_per_core": round(float(np.median(e2e)), 1),
        "baseline_decode_facemesh_frames_per_s_per_core": round(float(np.median(base)), 1),
        "end_to_end_over_baseline": round(float(np.median(ratios)), 3),
        "rounds": {"end_to_end": [round(x, 1) for x in e2e], "baseline": [round(x, 1) for x in base],
                   "ratio": [round(x, 3) for x in ratios]},
        # The same per CPU second of this process (all its threads): what other jobs on the core
        # take of the wall clock does not count. The steadier figure on a shared machine.
        "end_to_end_frames_per_cpu_s": round(float(np.median(e2e_cpu)), 1),
        "baseline_frames_per_cpu_s": round(float(np.median(base_cpu)), 1),
        "end_to_end_over_baseline_cpu": round(float(np.median(ratios_cpu)), 3),
        "rounds_cpu": {"end_to_end": [round(x, 1) for x in e2e_cpu], "baseline": [round(x, 1) for x in base_cpu],
                       "ratio": [round(x, 3) for x in ratios_cpu]},
        "end_to_end_report": {"samples": report["samples"], "clip_frames": report["frames"],
                              "rejected": {k: v for k, v in report["rejected"].items() if v},
                              "timing_s": report["timing_s"]},
    }


def main() -> None:
    conf = yaml.safe_load((ROOT / "conf" / "prep.yaml").read_text())
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", type=Path, default=SAMPLE)
    ap.add_argument("--repeats", type=int, default=5, help="passes over the video; medians are reported")
    ap.add_argument("--detect-every", type=int, default=conf["detect_every"])
    ap.add_argument("--pose-every", type=int, default=conf["pose_every"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--source-size", default=None, metavar="WxH",
                    help="run on a copy of --video scaled to this size (the issue measured a 720x528 source)")
    ap.add_argument("--loops", type=int, default=0,
                    help="run on a copy played forward+backward this many times (a longer video)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="ft-prep config override for the end-to-end run (repeatable)")
    args = ap.parse_args()
    if args.source_size or args.loops:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="prep_bench_"))
        args.video = remade_copy(args.video, args.source_size, max(1, args.loops), folder)

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core: a per-core figure
    fps, side, dilation = float(conf["fps"]), int(conf["max_side"]), float(conf["lip_dilation_frac"])
    info = media.probe(args.video)
    passes: dict[str, list[float]] = {}  # stage -> ms/frame of each pass

    def record(stage: str, seconds: float, frames: int) -> None:
        passes.setdefault(stage, []).append(seconds / frames * 1e3)

    for i in range(args.repeats + 1):
        t = time.perf_counter()
        clip = np.stack(list(media.iter_frames(info, fps, side, threads=1)))
        if i:  # pass 0 warms the libraries and the page cache up
            record("decode", time.perf_counter() - t, len(clip))

    n = len(clip)
    detections = 0
    # The target path: no pose. mediapipe graphs finish some work on their own threads after
    # returning, which on one core lands in the next graph's time, so pose is measured as the
    # difference of a second analyzer that runs it.
    with facemod.FrameAnalyzer(pose_every=0, detect_every=args.detect_every) as an:
        an(clip[0])  # graph warm-up (model load) is per video, not per frame
        for _ in range(args.repeats):
            an.timing.clear()
            t = time.perf_counter()
            results = [an(f) for f in clip]
            total = time.perf_counter() - t
            detections += sum(r.detected for r in results)
            record("face_mesh", an.timing["face_mesh"], n)
            record("face_detect", an.timing["face_detect"], n)
            record("analyzer", total - an.timing["face_mesh"] - an.timing["face_detect"], n)
            record("landmarks", total, n)
    if args.pose_every > 0:
        with facemod.FrameAnalyzer(pose_every=args.pose_every, detect_every=args.detect_every) as an:
            an(clip[0])
            for _ in range(args.repeats):
                t = time.perf_counter()
                [an(f) for f in clip]
                record("landmarks+pose", time.perf_counter() - t, n)

    arrays = facemod.stack_results(results)
    h, w = clip.shape[1:3]
    big = arrays["face"].copy()
    centre = big[:, :, :2].mean(axis=1, keepdims=True)
    big[:, :, :2] = (big[:, :, :2] - centre) * 2.5 + centre
    big_box = np.concatenate([big[..., :2].min(axis=1), big[..., :2].max(axis=1)], axis=1)
    for _ in range(args.repeats):
        t = time.perf_counter()
        facemod.lip_masks(arrays["face"], arrays["face_box"], h, w, dilation)
        record("masks", time.perf_counter() - t, n)
        t = time.perf_counter()
        facemod.lip_masks(big, big_box, h, w, dilation)
        record("masks_face_230px", time.perf_counter() - t, n)
    for _ in range(max(1, args.repeats // 2)):
        t = time.perf_counter()
        media.encode_mp4(clip, fps, int(conf["crf"]), conf["preset"])
        record("encode", time.perf_counter() - t, n)

    e2e = end_to_end(args.video, info, fps, side, args.repeats, args.override)

    ms = {k: float(np.median(v)) for k, v in passes.items()}
    ms["pose"] = max(0.0, ms.pop("landmarks+pose", ms["landmarks"]) - ms["landmarks"])
    del ms["landmarks"]
    core = ms["decode"] + ms["face_mesh"] + ms["face_detect"] + ms["analyzer"] + ms["masks"]
    result = {
        "video": str(args.video),
        "size": [w, h],
        "frames_per_pass": n,
        "passes": args.repeats,
        "detect_every": args.detect_every,
        "pose_every": args.pose_every,
        "detector_ran_on_frames_frac": round(detections / (n * args.repeats), 3),
        "face_width_px_median": round(float(np.median(arrays["face_box"][:, 2] - arrays["face_box"][:, 0])), 1),
        "ms_per_frame_median": {k: round(v, 3) for k, v in ms.items()},
        "ms_per_frame_all_passes": {k: [round(x, 3) for x in v] for k, v in passes.items()},
        "share_of_target_path": {
            k: round(ms[k] / core, 3) for k in ("decode", "face_mesh", "face_detect", "analyzer", "masks")
        },
        "frames_per_s_per_core": {
            "decode+landmarks+masks": round(1e3 / core, 1),
            f"+pose every {args.pose_every}": round(1e3 / (core + ms["pose"]), 1),
            f"+pose every {args.pose_every}+encode": round(1e3 / (core + ms["pose"] + ms["encode"]), 1),
        },
        "source_size": args.source_size,
        "loops": args.loops,
        "end_to_end_overrides": args.override,
        **e2e,
        "cpu": cpu_model(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "commit": git_commit(),
        "cores_visible": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(result, indent=1))
    print(f"end to end {e2e['end_to_end_frames_per_s_per_core']} frames/s/core, decode+FaceMesh "
          f"{e2e['baseline_decode_facemesh_frames_per_s_per_core']}: ratio {e2e['end_to_end_over_baseline']:.2f} "
          "(median of interleaved rounds; goal >= 0.6 and >= 100)")
    print(f"per CPU second of this process: end to end {e2e['end_to_end_frames_per_cpu_s']}, decode+FaceMesh "
          f"{e2e['baseline_frames_per_cpu_s']}: ratio {e2e['end_to_end_over_baseline_cpu']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
