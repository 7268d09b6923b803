"""``ft-prep task=encode``: raw shards → latent shards (the latent-cache pass).

Usage::

    ft-prep task=encode input=shards/ output=latents/ encoders.wan=Wan2.1-I2V-14B-720P-Diffusers/ \\
        encoders.wav2vec=wav2vec2-base-960h/ [batch_size=4] [task_index=3 num_tasks=16]

Options are the keys of ``conf/encode.yaml``. The frozen encoders run once here, so training reads
tensors instead of videos; a raw sample is decoded and encoded by the very functions raw-mode
training uses, so the two paths cannot drift apart. What each clip gives, the output folder and
the re-run rules: docs/data.md ("The encode pass").
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ft_train.cli import Tool
from ft_train.config import compose_tool_config
from ft_train.data.raw_clip import RAW_REJECT_REASONS, SampleError

#: Every reason a raw sample is skipped; the report counts each. ``too_short`` is raw-mode
#: training's (a clip shorter than its window): the encode pass always takes the whole clip.
REJECT_REASONS = {
    "unreadable_shard": "the tar itself cannot be read past some point (cut-off or corrupt shard)",
    **{k: v for k, v in RAW_REJECT_REASONS.items() if k != "too_short"},
}
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class EncodeConfig:
    """All options of ``ft-prep task=encode``; documented in ``conf/encode.yaml``."""

    input: str
    output: str
    encoders: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    vae_dtype: str = "float32"
    batch_size: int = 1
    storage_dtype: str = "float16"
    size_multiple: int = 16
    buckets: Any = None
    lip_mask_resize: str = "trilinear"
    face: str = "clip"
    face_margin: float = 0.2
    default_caption: str = ""
    task_index: int = 0
    num_tasks: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        from ft_train.data.clip_prep import LIP_MASK_RESIZE, face_form

        self.encoders = dict(self.encoders)
        problems = []
        try:
            self.face = face_form(self.face, "face")
        except ValueError as e:
            problems.append(str(e))
        unknown = set(self.encoders) - {"wan", "wav2vec"}
        if unknown:
            problems.append(f"encoders.{sorted(unknown)[0]} is not an option (encoders.wan, encoders.wav2vec)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be ≥ 1")
        if self.storage_dtype not in STORAGE_DTYPES:
            problems.append(f"storage_dtype={self.storage_dtype!r} must be one of {sorted(STORAGE_DTYPES)}")
        for key in ("dtype", "vae_dtype"):
            if getattr(self, key) not in ("auto", "float32", "bfloat16", "float16"):
                problems.append(f"{key}={getattr(self, key)!r} must be auto, float32, bfloat16 or float16")
        try:
            from ft_train.data.raw_clip import check_buckets

            self.buckets = check_buckets(self.buckets, "buckets")
        except ValueError as e:
            problems.append(str(e))
        if self.size_multiple < 8 or self.size_multiple % 8:
            problems.append(f"size_multiple={self.size_multiple} must be a multiple of 8 (the VAE stride)")
        if self.lip_mask_resize not in LIP_MASK_RESIZE:
            problems.append(f"lip_mask_resize={self.lip_mask_resize!r} must be one of {LIP_MASK_RESIZE}")
        if self.face_margin < 0:
            problems.append(f"face_margin={self.face_margin} must be >= 0")
        if not 0 <= self.task_index < self.num_tasks:
            problems.append(f"task_index={self.task_index} must be in [0, num_tasks={self.num_tasks})")
        if problems:
            raise ValueError("conf/encode.yaml: " + "; ".join(problems))


@dataclass
class Clip:
    """One raw sample, decoded and checked, ready for the encoders."""

    key: str
    frames: np.ndarray  # (F, H, W, 3) uint8, cropped
    audio: np.ndarray  # (int(F / fps · 16000),) float32, 16 kHz
    masks: np.ndarray  # (F, H, W) uint8 0/255, cropped like the frames
    caption: str
    face_box: list[float] | None  # the reference frame's face box in cropped pixels (None: unknown)
    meta: dict[str, Any]  # the latent sample's json
    reference: int = 0  # the reference (image-condition) frame: ft-prep's reference_frame


# --------------------------------------------------------------------------------------------
# one raw sample → a checked Clip


def prepare_sample(raw: dict[str, Any], stats: dict, cfg: EncodeConfig) -> Clip:
    """Decode and check one raw WebDataset sample (members as bytes): the whole clip, centre-cut
    to multiples of ``size_multiple``, or scaled and cut to its aspect-ratio bucket when
    ``buckets`` are set (:func:`ft_train.data.raw.load_clip`). Raises
    :class:`~ft_train.data.raw.SampleError`."""
    from ft_train.data.raw_clip import load_clip
    from ft_train.data.schema import SCHEMA_NAME, SCHEMA_VERSION

    # Buckets change the aspect ratio: the cut then follows the face, as in raw-mode training.
    clip = load_clip(raw, stats, size_multiple=cfg.size_multiple, crop="face" if cfg.buckets else "center",
                     motion_from="clip", default_caption=cfg.default_caption, buckets=cfg.buckets)
    m = clip.meta
    out_meta = {
        "schema": SCHEMA_NAME,
        "version": SCHEMA_VERSION,
        "fps": clip.fps,
        "num_frames": m["num_frames"],
        "height": m["height"],
        "width": m["width"],
        "omega_l": clip.omega_l,
        "omega_b": clip.omega_b,
        "caption": clip.caption,
        "source": m["source"],
        # Kept for tracing a sample back and for re-normalising ω with other statistics.
        "omega_l_raw": m["omega_l_raw"],
        "omega_b_raw": m["omega_b_raw"],
        "clip_index": m["clip_index"],
        "reference_frame": clip.reference,  # the frame the image condition, CLIP and face tokens come from
        "start_s": m["start_s"],
        "crop": m["crop"],  # pixel offset of the cropped frame in the raw clip
        "lip_mask_resize": cfg.lip_mask_resize,
    }
    if "face_box" in m:
        out_meta["face_box"] = m["face_box"]
    if cfg.face != "none":
        out_meta["face_margin"] = cfg.face_margin
        out_meta["face_ref_box"] = clip.face_box  # the box the face crop was cut around (None: whole frame)
    return Clip(key=clip.key, frames=clip.frames, audio=clip.audio, masks=clip.masks, caption=clip.caption,
                face_box=clip.face_box, meta=out_meta, reference=clip.reference)


def encode_batch(clips: list[Clip], encoders, cfg: EncodeConfig) -> list[dict[str, Any]]:
    """Encode clips (any sizes; equal sizes share encoder calls) → latent WebDataset samples."""
    import torch

    from ft_train.data.clip_prep import encode_clips

    dtype = STORAGE_DTYPES[cfg.storage_dtype]
    groups: dict[tuple, list[Clip]] = {}
    for clip in clips:
        groups.setdefault(clip.frames.shape, []).append(clip)
    samples = {}
    for group in groups.values():
        out = encode_clips(
            encoders,
            torch.from_numpy(np.stack([c.frames for c in group])),
            [c.audio for c in group],
            torch.from_numpy(np.stack([c.masks for c in group])),
            [c.caption for c in group],
            cfg.lip_mask_resize,
            face_boxes=[c.face_box for c in group] if cfg.face != "none" else None,
            face_margin=cfg.face_margin,
            face=cfg.face,
            reference=[c.reference for c in group],
        )
        for i, clip in enumerate(group):
            arrays = {name: _stored(out[name][i], dtype) for name in out}
            samples[clip.key] = {"__key__": clip.key, **{f"{k}.npy": v for k, v in arrays.items()}, "json": clip.meta}
    return [samples[c.key] for c in clips]


def _stored(tensor, dtype) -> np.ndarray:
    """An encoder output as stored: floats in ``storage_dtype``; uint8 (the face crop) as is."""
    array = tensor.cpu().numpy()
    return array if array.dtype == np.uint8 else array.astype(dtype)


# --------------------------------------------------------------------------------------------
# one shard


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def shard_is_done(out: Path, raw_shard: Path) -> bool:
    """Finished = a record exists for this raw shard at its current size and the tar (if any)
    has the recorded size; anything else (no record, a crash's ``.tmp``, a re-prepped raw shard)
    means encode it again."""
    record = out / "parts" / f"{raw_shard.stem}.json"
    if not record.is_file():
        return False
    try:
        rec = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    if rec.get("source_bytes") != raw_shard.stat().st_size:
        return False
    if rec.get("tar") is None:
        return not (out / raw_shard.name).exists()
    tar = out / rec["tar"]
    return tar.is_file() and tar.stat().st_size == rec.get("bytes")


def encode_shard(raw_shard: Path, out: Path, encoders, cfg: EncodeConfig, stats: dict, bar=None) -> dict:
    """Encode one raw shard into ``out/<same name>``; returns (and writes) its record."""
    import webdataset as wds

    t_start = time.perf_counter()
    timing: Counter = Counter()
    rejects: list[dict] = []

    def reject(key: str | None, reason: str, detail: str) -> None:
        rejects.append({"shard": raw_shard.name, "key": key, "reason": reason, "detail": detail})
        if bar is not None:
            bar.skipped += 1

    def on_tar_error(exn: Exception) -> bool:
        # WebDataset reports one cut-off tar from several pipeline stages: count it once.
        if not any(r["reason"] == "unreadable_shard" for r in rejects):
            reject(None, "unreadable_shard", f"{raw_shard}: {exn.__class__.__name__}: {exn}")
        return True

    final = out / raw_shard.name
    tmp = out / (raw_shard.name + ".tmp")
    written = 0
    pending: list[Clip] = []

    def flush(sink) -> None:
        nonlocal written
        if not pending:
            return
        t = time.perf_counter()
        for sample in encode_batch(pending, encoders, cfg):
            sink.write(sample)
            written += 1
        timing["encode"] += time.perf_counter() - t
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    source = wds.WebDataset([str(raw_shard)], shardshuffle=False, empty_check=False, handler=on_tar_error)
    with wds.TarWriter(str(tmp)) as sink:
        t = time.perf_counter()
        for raw in source:
            try:
                pending.append(prepare_sample(raw, stats, cfg))
            except SampleError as e:
                reject(raw.get("__key__"), e.reason, str(e))
                if bar is not None:
                    bar.update(1)
            timing["decode"] += time.perf_counter() - t
            if len(pending) >= cfg.batch_size:
                flush(sink)
            t = time.perf_counter()
        flush(sink)
    rec = {"shard": raw_shard.stem, "source": str(raw_shard), "source_bytes": raw_shard.stat().st_size,
           "tar": None, "samples": written, "bytes": 0, "rejects": rejects}
    if written:
        os.replace(tmp, final)
        rec["tar"], rec["bytes"] = final.name, final.stat().st_size
    else:
        tmp.unlink()
        final.unlink(missing_ok=True)
    timing["total"] = time.perf_counter() - t_start
    rec["timing_s"] = {k: round(v, 4) for k, v in timing.items()}
    _write_json_atomic(out / "parts" / f"{raw_shard.stem}.json", rec)
    return rec


# --------------------------------------------------------------------------------------------
# driver


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def raw_shards(cfg: EncodeConfig) -> tuple[list[Path], dict]:
    """The raw shards (sorted) and ``stats.json`` of ``cfg.input``; one-line errors naming ``input``."""
    src = Path(cfg.input).expanduser()
    if not src.is_dir():
        raise SystemExit(f"input={cfg.input}: no such folder; point it at an ft-prep output folder")
    shards = sorted(p for p in src.glob("*.tar") if p.is_file())
    if not shards:
        raise SystemExit(f"input={cfg.input}: no .tar shards; run ft-prep on your videos first")
    stats_file = src / "stats.json"
    if not stats_file.is_file():
        raise SystemExit(f"input={cfg.input}: no stats.json (ω statistics); run ft-prep input=... output={cfg.input} mode=merge")
    return shards, json.loads(stats_file.read_text())


def write_null_text(out: Path, encoders, dtype) -> None:
    """``null_text.npy``: the empty prompt's umT5 embedding (L, D), written once, atomically."""
    target = out / "null_text.npy"
    tmp = out / "null_text.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, encoders.text([""])[0].cpu().numpy().astype(dtype))
    os.replace(tmp, target)


def merge(out: Path, shards: list[Path], run_info: dict, widths: dict | None) -> dict:
    """``report.json``/``report.txt`` from every ``parts/`` record of these shards."""
    records = [json.loads(p.read_text()) for s in shards if (p := out / "parts" / f"{s.stem}.json").is_file()]
    rejects = [x for r in records for x in r["rejects"]]
    counts = Counter(x["reason"] for x in rejects)
    timing: Counter = Counter()
    for r in records:
        timing.update(r["timing_s"])
    old = out / "report.json"
    if widths is None and old.is_file():  # nothing loaded this run: keep what the last run saw
        widths = json.loads(old.read_text()).get("widths")
    report = {
        "shards_total": len(shards),
        "shards_done": len(records),
        "shards_missing": sorted(set(s.stem for s in shards) - {r["shard"] for r in records}),
        "samples": sum(r["samples"] for r in records),
        "skipped": {reason: counts.get(reason, 0) for reason in REJECT_REASONS},
        "skipped_total": len(rejects),
        "rejects": rejects,
        "widths": widths,
        "timing_s": {k: round(v, 3) for k, v in sorted(timing.items())},
        "this_run": run_info,
    }
    _write_json_atomic(out / "report.json", report)
    (out / "report.txt").write_text(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [
        f"latent shards: {report['shards_done']}/{report['shards_total']} done",
        f"samples: {report['samples']}   skipped: {report['skipped_total']}",
    ]
    for reason, n in report["skipped"].items():
        if n:
            lines.append(f"  {reason:<17} {n:>6}   {REJECT_REASONS[reason]}")
    if report.get("widths"):
        lines.append("encoder widths: " + ", ".join(f"{k} {v}" for k, v in report["widths"].items()))
    run = report.get("this_run") or {}
    if run:
        lines.append(f"this run: {run.get('shards_written', 0)} shards written, "
                     f"{run.get('shards_skipped', 0)} already done, {run.get('wall_s', 0):.1f}s wall"
                     + (f" on {run['device']}" if run.get("device") else ""))
    return "\n".join(lines) + "\n"


class _Progress:
    """tqdm bar over clips, showing how many were skipped."""

    def __init__(self, total: int | None, disable: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="clip", disable=disable, dynamic_ncols=True, desc="encode")
        self.skipped = 0

    def update(self, n: int) -> None:
        self._bar.set_postfix(skipped=self.skipped)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def run_encode(cfg: EncodeConfig, encoders=None) -> dict:
    """Encode this task's unfinished raw shards, then write the report (returned).

    ``encoders`` (a :class:`ft_train.models.encoders.FrozenEncoders`) may be passed in, e.g. by
    tests; otherwise they are loaded from ``cfg.encoders`` — only when there is work to do, but
    their folders are checked first in any case.
    """
    from ft_train.models.encoders import check_encoder_paths, load_encoders

    shards, stats = raw_shards(cfg)
    if encoders is None:
        check_encoder_paths(cfg.encoders.get("wan"), cfg.encoders.get("wav2vec"))
    out = Path(cfg.output).expanduser()
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if not (out / "stats.json").is_file():
        shutil.copyfile(Path(cfg.input) / "stats.json", out / "stats.json")
    mine = [s for i, s in enumerate(shards) if i % cfg.num_tasks == cfg.task_index]
    todo = [s for s in mine if not shard_is_done(out, s)]
    need_null = not (out / "null_text.npy").is_file()
    t0 = time.perf_counter()
    device = None
    if (todo or need_null) and encoders is None:
        device = resolve_device(cfg.device)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        encoders = load_encoders(cfg.encoders["wan"], cfg.encoders["wav2vec"], device=device, dtype=dtype,
                                 vae_dtype=cfg.vae_dtype)
    if need_null:
        write_null_text(out, encoders, STORAGE_DTYPES[cfg.storage_dtype])
    bar = _Progress(_clip_count(Path(cfg.input), todo), disable=not cfg.progress)
    try:
        for shard in todo:
            encode_shard(shard, out, encoders, cfg, stats, bar)
    finally:
        bar.close()
    run_info = {"shards_written": len(todo), "shards_skipped": len(mine) - len(todo),
                "wall_s": round(time.perf_counter() - t0, 3), "device": device}
    return merge(out, shards, run_info, encoders.widths() if encoders is not None else None)


def _clip_count(raw_dir: Path, shards: list[Path]) -> int | None:
    """Clips in these shards according to the raw manifest (for the progress bar), if known."""
    manifest = raw_dir / "manifest.json"
    if not manifest.is_file():
        return None
    counts = {e["shard"]: e["samples"] for e in json.loads(manifest.read_text()).get("shards", [])}
    return sum(counts.get(s.name, 0) for s in shards)


EXAMPLE = ("ft-prep task=encode input=shards/ output=latents/ encoders.wan=Wan2.1-I2V-14B-720P-Diffusers/ "
           "encoders.wav2vec=wav2vec2-base-960h/")


def load_config(overrides: list[str]) -> EncodeConfig:
    """Compose ``conf/encode.yaml`` with Hydra override strings into an :class:`EncodeConfig`."""
    return EncodeConfig(**compose_tool_config("encode", overrides, "ft-prep task=encode", EXAMPLE))


# ``ft-prep task=encode key=value ...`` (keys of ``conf/encode.yaml``), through ft-prep's main.
TOOL = Tool("ft-prep task=encode", "encode", __doc__, EXAMPLE, log_format=None,
            build=lambda cfg: EncodeConfig(**cfg), run=lambda cfg: (run_encode(cfg), cfg),
            report=lambda done: format_report(done[0]) + f"output: {Path(done[1].output).resolve()}")
main = TOOL.main


if __name__ == "__main__":
    sys.exit(main())
