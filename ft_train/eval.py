"""``ft-eval``: FID / FVD / Sync-C / Sync-D of a folder of generated videos against reference videos.

Usage::

    ft-eval generated=results/ours reference=data/hdtf_test \
        fid=weights/pt_inception-2015-12-05-6726825d.pth fvd=weights/i3d_torchscript.pt \
        sync=weights/syncnet_v2.model

Options are the keys of ``conf/eval.yaml``. Videos pair up by file name (``a.mp4`` in both
folders); unpaired and unreadable files are counted, listed in the JSON and left out. Any subset of
the metrics runs: those whose weights are not given are skipped. Same metric code as the training
validation (:class:`ft_train.metrics.video.VideoMetrics`), so other systems' outputs are scored
exactly as our samples are:

* FID: every frame (or ``fid_frames`` evenly spaced per video) of both sides, pytorch-fid resize.
* FVD: consecutive 16-frame clips of every video (tails dropped), StyleGAN-V I3D convention.
* Sync-C / Sync-D: generated frames resampled to 25 fps, the whole frame as the face crop (use
  face-cropped videos for papers' numbers), the generated file's audio track, or the reference's
  when the generated file is silent.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from .cli import Tool
from .media import read_video
from .metrics.video import VideoMetrics, build_metric

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm")
EXAMPLE = "ft-eval generated=results/ours reference=data/test fvd=weights/i3d_torchscript.pt"


def _videos(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS}


def evaluate(
    generated: str | Path,
    reference: str | Path,
    fid: Any = None,
    fvd: Any = None,
    sync: Any = None,
    fid_frames: int | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``generated`` against ``reference`` (folders of videos paired by file name).

    ``fid``/``fvd``/``sync``: local weight path, a ready ``Metric``, or None (skipped).
    Returns (and writes to ``out``, default ``<generated>/metrics.json``) a dict with ``metrics``
    (``fid``, ``fvd``, ``sync_c``, ``sync_d``, ``av_offset`` for the metrics run), ``pairs``,
    ``unpaired_generated``/``unpaired_reference`` (file names), ``skipped`` (name → reason) and counts.
    """
    folders = {"generated": Path(generated).expanduser(), "reference": Path(reference).expanduser()}
    for key, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"{key}: no folder at {folder}")
    built = {name: build_metric(spec, name, name) for name, spec in (("fid", fid), ("fvd", fvd), ("sync", sync))}
    if not any(built.values()):
        raise ValueError("give the weights of at least one metric: fid=, fvd= or sync= (local paths)")
    metrics = VideoMetrics(**built, fid_frames=fid_frames).to(device)

    gen, ref = _videos(folders["generated"]), _videos(folders["reference"])
    names = sorted(gen.keys() & ref.keys())
    if not names:
        raise ValueError(f"no video file name is in both {folders['generated']} and {folders['reference']}")
    skipped: dict[str, str] = {}
    scored = 0
    for name in names:
        try:
            g_frames, g_fps, g_audio = read_video(gen[name])
            r_frames, _, r_audio = read_video(ref[name])
        except ValueError as e:
            skipped[name] = str(e)
            log.warning("skipped %s: %s", name, e)
            continue
        audio = g_audio if g_audio is not None and len(g_audio) else r_audio
        metrics.update(torch.from_numpy(g_frames), torch.from_numpy(r_frames), g_fps, audio)
        scored += 1
    values = metrics.compute() if scored else {}
    result = {
        "metrics": values,
        "generated": str(folders["generated"]),
        "reference": str(folders["reference"]),
        "pairs": scored,
        "unpaired_generated": sorted(gen.keys() - ref.keys()),
        "unpaired_reference": sorted(ref.keys() - gen.keys()),
        "skipped": skipped,
        "fvd_too_short": metrics.fvd_too_short,
        "sync_no_audio": metrics.sync_no_audio,
        "weights": {k: (str(v) if isinstance(v, (str, Path)) else type(v).__name__) for k, v in
                    (("fid", fid), ("fvd", fvd), ("sync", sync)) if v},
        "fid_frames": fid_frames,
    }
    out_path = Path(out).expanduser() if out else folders["generated"] / "metrics.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    result["out"] = str(out_path)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The metrics and the counts as a small text table."""
    rows = [(k, f"{v:.4f}") for k, v in result["metrics"].items()]
    rows += [
        ("pairs scored", str(result["pairs"])),
        ("unpaired (generated / reference)",
         f"{len(result['unpaired_generated'])} / {len(result['unpaired_reference'])}"),
        ("unreadable, skipped", str(len(result["skipped"]))),
    ]
    if result["fvd_too_short"]:
        rows.append(("too short for FVD", str(result["fvd_too_short"])))
    if result["sync_no_audio"]:
        rows.append(("no audio for Sync", str(result["sync_no_audio"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _report(result: dict[str, Any]) -> str:
    return f"{format_table(result)}\nft-eval: wrote {result['out']}"


TOOL = Tool("ft-eval", "eval", __doc__, EXAMPLE, run=lambda cfg: evaluate(**cfg), report=_report,
            errors=(FileNotFoundError, ValueError, TypeError))
main = TOOL.main  # console entry point: ``ft-eval key=value ...`` (keys of ``conf/eval.yaml``)


if __name__ == "__main__":
    sys.exit(main())
