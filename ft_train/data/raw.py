"""Raw-mode training: read ``ft-prep``'s raw shards and encode clips on the fly.

A new random window on every visit (which a latent cache cannot give), encoded by the same
functions as the encode pass, so a batch has exactly the cached-mode layout. Where the encoders
run (``data.encode_on``) and how exact resume works: docs/data.md ("Raw-mode training").
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import webdataset as wds

from .datamodule import LatentShardDataModule, ResumeSkip, collate_samples, resolve_shards
from .raw_clip import (
    CROP_MODES, ENCODE_ON, MOTION_FROM, SampleError, check_buckets, clip_tensors, encode_raw_clips, load_clip, read_meta,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# pipeline stages


class WindowSampler:
    """Pipeline stage: check a raw sample's metadata and draw its window start (``__start__``).

    The start is uniform over the clip's windows, from a generator seeded with (seed, CRC32 of
    the sample key, number of samples this stream has seen), so it is a pure function of the
    stream: a resumed run draws exactly the starts the uninterrupted run drew, and each visit of
    a clip gets a new window. Rejected samples go to ``handler`` (counted, logged).
    """

    def __init__(self, num_frames: int, seed: int, handler):
        self.num_frames = num_frames
        self.seed = seed
        self.handler = handler
        self.visits = 0  # per worker process (each worker has its own copy)

    def __call__(self, src):
        for raw in src:
            visit = self.visits
            self.visits += 1
            key = str(raw.get("__key__", ""))
            try:
                total = int(read_meta(raw)["num_frames"])
                if total < self.num_frames:
                    raise SampleError("too_short", f"{key}: {total} frames, fewer than data.num_frames={self.num_frames}")
            except SampleError as e:
                if self.handler(e):
                    continue
                raise
            rng = np.random.default_rng([self.seed, zlib.crc32(key.encode()), visit])
            raw["__start__"] = int(rng.integers(0, total - self.num_frames + 1))
            yield raw


class ClipLoader:
    """Pipeline map: a sampled raw sample → :func:`clip_tensors` of its window (:func:`load_clip`)."""

    def __init__(self, stats: dict, num_frames: int, size, crop: str, motion_from: str, default_caption: str,
                 buckets=None):
        self.stats, self.num_frames, self.size, self.buckets = stats, num_frames, size, buckets
        self.crop, self.motion_from, self.default_caption = crop, motion_from, default_caption

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        clip = load_clip(raw, self.stats, start=raw["__start__"], num_frames=self.num_frames, size=self.size,
                         crop=self.crop, motion_from=self.motion_from, default_caption=self.default_caption,
                         buckets=self.buckets)
        return clip_tensors(clip)


class WorkerEncoder:
    """Pipeline map (``encode_on=worker``): one clip's tensors → its training sample, on CPU.

    The encoders are loaded on first use inside each worker process (never pickled with the
    dataset), then kept for the life of the worker (the loader's workers are persistent).
    """

    def __init__(self, wan, wav2vec, dtype: str, vae_dtype: str, lip_mask_resize: str, face: str, face_margin: float):
        self.spec = dict(wan=wan, wav2vec=wav2vec, dtype=dtype, vae_dtype=vae_dtype)
        self.lip_mask_resize, self.face, self.face_margin = lip_mask_resize, face, face_margin
        self.encoders = None

    def __getstate__(self):
        return {**self.__dict__, "encoders": None}

    def __call__(self, clip: dict[str, Any]) -> dict[str, Any]:
        from ..models.encoders import load_encoders

        if self.encoders is None:
            s = self.spec
            self.encoders = load_encoders(s["wan"], s["wav2vec"], device="cpu", dtype=s["dtype"],
                                          vae_dtype=s["vae_dtype"], key="data.encoders")
        batch = collate_samples([clip])
        return encode_raw_clips(self.encoders, batch, self.lip_mask_resize, self.face, self.face_margin)[0]


def first_sample(url: str) -> tuple[set[str], dict[str, Any] | None]:
    """Member suffixes and json of a shard's first sample, read with tarfile (nothing decoded)."""
    members: set[str] = set()
    meta = None
    first = None
    with tarfile.open(url) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = Path(member.name).name.partition(".")
            first = key if first is None else first
            if key != first:
                break
            members.add(suffix)
            if suffix == "json":
                meta = json.load(io.BytesIO(tar.extractfile(member).read()))
    return members, meta


# --------------------------------------------------------------------------------------------
# the datamodule


class RawShardDataModule(LatentShardDataModule):
    """Training batches from raw ``ft-prep`` shards, encoded on the fly (module docstring).

    Same sharding, shuffling, resume and skip accounting as :class:`LatentShardDataModule`, and
    the same batch layout, plus ``start_frame`` (B,): each window's first frame in its raw clip.

    Args:
        shards: raw shard folder, brace pattern, glob, or a list of them (``ft-prep`` output).
        encoders: ``{"wan": <diffusers Wan2.1 I2V folder>, "wav2vec": <wav2vec2 folder>}``, as
            ``conf/encode.yaml``'s ``encoders``.
        stats: the ``stats.json`` that normalises ω (None = the one beside the shards).
        num_frames: frames per training window, 4k+1.
        height, width: training resolution in pixels, multiples of 16 (VAE stride 8 × DiT patch
            2); None for both = each clip's own size cut to multiples of 16 (batches then need
            equally sized clips, e.g. ``batch_size=1``).
        buckets: aspect-ratio buckets, a list of ``[H, W]`` (multiples of 16): each clip trains at
            the one nearest its aspect ratio (:func:`nearest_bucket`), replacing height/width. A
            batch holds one size, so several buckets need ``batch_size=1``.
        crop: ``face`` (default; the window follows the face when the aspect changes) or ``center``.
        motion_from: ``window`` (ω over the window's frames) or ``clip`` (the clip's json values).
        encode_on: ``auto`` / ``worker`` / ``device``, see the module docstring.
        dtype, vae_dtype: encoder weights (``auto`` = bfloat16 on CUDA, float32 on CPU; VAE float32).
        lip_mask_resize: ``trilinear`` (paper) or ``area``, as the encode pass.
        face: what the batch's ``face`` (the identity branch's input) holds, from the reference
            frame's face crop: ``clip`` (default) its CLIP tokens, for
            ``model.identity.encoder=precomputed``; ``pixels`` the crop itself, float
            (3, 112, 112) in [-1, 1], for ``model.identity.encoder=arcface``; ``none`` no ``face``
            (``true`` / ``false`` read as ``clip`` / ``none``).
        face_margin: context around the face box (:func:`ft_train.data.clip_prep.face_crop_box`).
        default_caption: prompt for clips without a caption.
        batch_size, num_workers, shuffle_buffer, seed: as :class:`LatentShardDataModule`.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        encoders: dict[str, Any],
        stats: str | None = None,
        num_frames: int = 81,
        height: int | None = 512,
        width: int | None = 512,
        buckets: Sequence[Sequence[int]] | None = None,
        crop: str = "face",
        motion_from: str = "window",
        encode_on: str = "auto",
        dtype: str = "auto",
        vae_dtype: str = "float32",
        lip_mask_resize: str = "trilinear",
        face: str = "clip",
        face_margin: float = 0.2,
        default_caption: str = "",
        **kwargs: Any,
    ):
        from ..models.encoders import check_encoder_paths
        from .clip_prep import LIP_MASK_RESIZE, face_form

        super().__init__(shards=shards, **kwargs)
        encoders = dict(encoders or {})
        problems = []
        unknown = sorted(set(encoders) - {"wan", "wav2vec"})
        if unknown:
            problems.append(f"data.encoders.{unknown[0]} is not an option (data.encoders.wan, data.encoders.wav2vec)")
        if num_frames < 1 or (num_frames - 1) % 4:
            problems.append(f"data.num_frames={num_frames} must be 4k+1 (e.g. 81)")
        if (height is None) != (width is None):
            problems.append("data.height and data.width must both be set or both be null")
        elif height is not None and (height < 16 or width < 16 or height % 16 or width % 16):
            problems.append(f"data.height={height}, data.width={width} must be multiples of 16 (VAE stride 8 × DiT patch 2)")
        try:
            buckets = check_buckets(buckets, "data.buckets")
        except ValueError as e:
            problems.append(str(e))
            buckets = None
        if buckets and len(set(buckets)) > 1 and int(kwargs.get("batch_size", 1)) > 1:
            problems.append(f"data.buckets holds {len(set(buckets))} sizes but data.batch_size={kwargs['batch_size']}: "
                            "a batch holds one size, so use data.batch_size=1 (or one bucket)")
        for key, value, allowed in (("crop", crop, CROP_MODES), ("motion_from", motion_from, MOTION_FROM),
                                    ("encode_on", encode_on, ENCODE_ON), ("lip_mask_resize", lip_mask_resize, LIP_MASK_RESIZE)):
            if value not in allowed:
                problems.append(f"data.{key}={value!r} must be one of {', '.join(allowed)}")
        for key, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
            if value not in ("auto", "float32", "bfloat16", "float16"):
                problems.append(f"data.{key}={value!r} must be auto, float32, bfloat16 or float16")
        if face_margin < 0:
            problems.append(f"data.face_margin={face_margin} must be >= 0")
        try:
            face = face_form(face, "data.face")
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))
        check_encoder_paths(encoders.get("wan"), encoders.get("wav2vec"), key="data.encoders")
        self.encoder_paths = encoders
        self.stats_path = stats
        self.num_frames = int(num_frames)
        self.size = None if height is None else (int(height), int(width))
        self.buckets = buckets
        self.crop, self.motion_from, self.encode_on = crop, motion_from, encode_on
        self.dtype, self.vae_dtype = dtype, vae_dtype
        self.lip_mask_resize, self.face, self.face_margin = lip_mask_resize, face, float(face_margin)
        self.default_caption = default_caption
        self.encoders = None  # encode_on=device: loaded on the training device in setup()

    # -- where the encoders run ----------------------------------------------------------------
    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def resolved_encode_on(self) -> str:
        if self.encode_on != "auto":
            return self.encode_on
        return "device" if self._device().type == "cuda" else "worker"

    def _dtype(self, device: torch.device) -> str:
        return self.dtype if self.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")

    def load_stats(self, urls: list[str]) -> dict:
        path = Path(self.stats_path) if self.stats_path else Path(urls[0]).parent / "stats.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"data.stats: no ω statistics at {path}; run `ft-prep ... mode=merge` on the raw shards or point data.stats at their stats.json"
            )
        return json.loads(path.read_text())

    def setup(self, stage: str | None = None) -> None:
        """Check the data against the config, load the encoders where they run, and embed the
        empty prompt for text dropout (the loss reads ``null_text`` at the start of fit)."""
        from ..models.encoders import load_encoders, load_text_encoder

        urls = resolve_shards(self.shards)
        self.load_stats(urls)
        members, meta = first_sample(urls[0])
        if members and "mp4" not in members:
            hint = "; these are latent shards: use data=latent" if "latents.npy" in members else ""
            raise ValueError(f"data.shards: {urls[0]} holds no ft-prep raw samples (no mp4 member){hint}")
        if meta is not None and int(meta.get("num_frames", self.num_frames)) < self.num_frames:
            raise ValueError(
                f"data.num_frames={self.num_frames}: the raw clips have {meta['num_frames']} frames "
                f"({urls[0]}); lower data.num_frames or re-run ft-prep with num_frames >= {self.num_frames}"
            )
        device = self._device()
        wan, wav2vec = self.encoder_paths.get("wan"), self.encoder_paths.get("wav2vec")
        if self.resolved_encode_on() == "device":
            if self.encoders is None:
                self.encoders = load_encoders(wan, wav2vec, device=device, dtype=self._dtype(device),
                                              vae_dtype=self.vae_dtype, key="data.encoders")
            text = self.encoders.text
        else:
            text = load_text_encoder(wan, "cpu", self._dtype(torch.device("cpu")), key="data.encoders.wan")
        self.null_text = text([""])[0].float().cpu()

    def load_null_text(self, urls: list[str]) -> None:
        """Raw shards carry no ``null_text.npy``: :meth:`setup` embeds the empty prompt instead."""

    # -- the pipeline --------------------------------------------------------------------------
    def samples(self, ds: wds.WebDataset, skip: ResumeSkip | None) -> wds.WebDataset:
        """Raw members → (encoded) clips; windows are drawn before the resume skip, media decoded after."""
        urls = resolve_shards(self.shards)
        ds = ds.compose(WindowSampler(self.num_frames, self.seed, self.skips))
        if skip is not None:
            ds = ds.compose(skip)
        loader = ClipLoader(self.load_stats(urls), self.num_frames, self.size, self.crop, self.motion_from,
                            self.default_caption, buckets=self.buckets)
        ds = ds.map(loader, handler=self.skips)
        if self.resolved_encode_on() == "worker":
            encoder = WorkerEncoder(self.encoder_paths.get("wan"), self.encoder_paths.get("wav2vec"),
                                    self._dtype(torch.device("cpu")), self.vae_dtype, self.lip_mask_resize,
                                    self.face, self.face_margin)
            ds = ds.map(encoder, handler=self.skips)
        return ds

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``encode_on=device``: encode the batch of clips on the training device (runs after the
        batch reached it, before the training step)."""
        if not isinstance(batch, dict) or "frames" not in batch:
            return batch
        if self.encoders is None:
            self.setup("fit")
        samples = encode_raw_clips(self.encoders, batch, self.lip_mask_resize, self.face, self.face_margin)
        device = batch["frames"].device
        out = collate_samples(samples)
        if "skipped" in batch:  # the loader workers' skip counts (Endless), for the training loop
            out["skipped"] = batch["skipped"]
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


__all__ = [
    "RAW_MEMBERS",
    "RAW_REJECT_REASONS",
    "RawClip",
    "RawShardDataModule",
    "SampleError",
    "load_clip",
    "plan_geometry",
]
