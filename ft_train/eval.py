"""``ft-eval``: FID / FVD / Sync-C / Sync-D (and IDC, SD/BD, Aes) of a folder of generated videos against reference videos.

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
* FVD: ``fvd_protocol=stylegan_v`` (default): one 16-frame clip per video as StyleGAN-V takes it
  (reference clip at a seeded random start, generated clip from frame 0, Lanczos resize to
  ``fvd_resolution``, covariance over N); ``all_clips``: every non-overlapping 16-frame clip.
* Sync-C / Sync-D: generated frames resampled to 25 fps; ``sync_crop=face`` (default) finds face
  tracks (mediapipe, the reference's track rules in ``sync_track``) and scores each, the video
  scoring the mean over its tracks; ``none`` takes whole frames as face crops (pre-cropped
  videos). Audio as the reference reads it (ffmpeg → 16 kHz mono int16) from the generated file,
  or the reference's when the generated file is silent; a video whose audio cannot be decoded is
  still scored by FID/FVD and counted under ``sync_no_audio``.

* IDC / SD, BD / Aes (``idc``, ``dynamics``, ``aes`` + ``aes_head``): the paper's own-module
  metrics, :mod:`ft_train.metrics.portrait`.

The protocol of every metric run is written to the JSON (``protocol``) and the log.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import Tool
from .media import read_frames
from .metrics.audio import AudioReadError, read_sync_audio
from .metrics.video import VideoMetrics, build_metric

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm")
EXAMPLE = "ft-eval generated=results/ours reference=data/test fvd=weights/i3d_torchscript.pt"


def _videos(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS}


def _audio(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_sync_audio(path), None
    except AudioReadError as e:
        return None, str(e)


def evaluate(
    generated: str | Path,
    reference: str | Path,
    fid: Any = None,
    fvd: Any = None,
    sync: Any = None,
    fid_frames: int | str | None = None,
    fvd_protocol: str = "stylegan_v",
    fvd_resolution: int = 256,
    fvd_seed: int = 0,
    sync_crop: str = "face",
    sync_track: dict[str, Any] | None = None,
    idc: Any = None,
    aes: Any = None,
    aes_head: Any = None,
    dynamics: Any = False,
    portrait_frames: int | None = 16,
    device: str = "cpu",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``generated`` against ``reference`` (folders of videos paired by file name).

    ``fid``/``fvd``/``sync``: local weight path, a ready ``Metric``, or None (skipped); the other
    arguments are the protocol options of ``conf/eval.yaml``.
    Returns (and writes to ``out``, default ``<generated>/metrics.json``) a dict with ``metrics``
    (``fid``, ``fvd``, ``sync_c``, ``sync_d``, ``av_offset`` for the metrics run), ``protocol``,
    ``pairs``, ``unpaired_generated``/``unpaired_reference`` (file names), ``skipped`` (name →
    reason), ``audio_errors`` (name → reason) and counts.
    """
    folders = {"generated": Path(generated).expanduser(), "reference": Path(reference).expanduser()}
    for key, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"{key}: no folder at {folder}")
    specs = {"fid": fid, "fvd": fvd, "sync": sync, "idc": idc, "aes": aes, "dynamics": dynamics}
    built = {
        name: build_metric(spec, name, name, fvd_protocol=fvd_protocol, sync_crop=sync_crop, sync_track=sync_track,
                           aes_head=aes_head, frames=portrait_frames)
        for name, spec in specs.items()
    }
    if not any(built.values()):
        raise ValueError("give the weights of at least one metric: fid=, fvd=, sync=, idc=, aes= (local paths) "
                         "or dynamics=true")
    for name, m in built.items():
        if m is None:
            log.info("%s skipped (%s is not set)", name, name)
    metrics = VideoMetrics(**built, fid_frames=fid_frames, fvd_protocol=fvd_protocol, fvd_resolution=fvd_resolution,
                           fvd_seed=fvd_seed).to(device)
    protocol = metrics.protocol()
    log.info("ft-eval protocol: %s", ", ".join(f"{k}={v}" for k, v in protocol.items()))

    gen, ref = _videos(folders["generated"]), _videos(folders["reference"])
    names = sorted(gen.keys() & ref.keys())
    if not names:
        raise ValueError(f"no video file name is in both {folders['generated']} and {folders['reference']}")
    skipped: dict[str, str] = {}
    audio_errors: dict[str, str] = {}
    scored = 0
    for name in names:
        try:
            g_frames, g_fps = read_frames(gen[name])
            r_frames, _ = read_frames(ref[name])
        except ValueError as e:
            skipped[name] = str(e)
            log.warning("skipped %s: %s", name, e)
            continue
        audio = None
        if "sync" in metrics.metrics:
            audio, err = _audio(gen[name])
            if audio is None:  # a silent generated file: the reference's track (the input speech)
                audio, r_err = _audio(ref[name])
                if audio is None:
                    audio_errors[name] = err if "no audio" not in err else r_err
                    log.warning("%s: no usable audio, Sync skips it (FID/FVD still score it): %s",
                                name, audio_errors[name])
        metrics.update(torch.from_numpy(g_frames), torch.from_numpy(r_frames), g_fps, audio, key=name)
        scored += 1
    values = metrics.compute() if scored else {}
    result = {
        "metrics": values,
        "protocol": protocol,
        "generated": str(folders["generated"]),
        "reference": str(folders["reference"]),
        "pairs": scored,
        "unpaired_generated": sorted(gen.keys() - ref.keys()),
        "unpaired_reference": sorted(ref.keys() - gen.keys()),
        "skipped": skipped,
        "audio_errors": audio_errors,
        **metrics.counts(),
        "weights": {k: (str(v) if isinstance(v, (str, Path)) else type(v).__name__) for k, v in
                    (("fid", fid), ("fvd", fvd), ("sync", sync), ("idc", idc), ("aes", aes), ("aes_head", aes_head))
                    if v},
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
    if result.get("sync_no_face"):
        rows.append(("no face track for Sync", str(result["sync_no_face"])))
    if result.get("sync_too_short"):
        rows.append(("too short for Sync", str(result["sync_too_short"])))
    rows += [(k, str(v)) for k, v in result.get("protocol", {}).items() if not isinstance(v, dict)]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _report(result: dict[str, Any]) -> str:
    return f"{format_table(result)}\nft-eval: wrote {result['out']}"


TOOL = Tool("ft-eval", "eval", __doc__, EXAMPLE, run=lambda cfg: evaluate(**cfg), report=_report,
            errors=(FileNotFoundError, ValueError, TypeError))
main = TOOL.main  # console entry point: ``ft-eval key=value ...`` (keys of ``conf/eval.yaml``)


if __name__ == "__main__":
    sys.exit(main())
