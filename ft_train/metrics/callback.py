"""Validation while training: sample a fixed clip list, score FID / FVD / Sync-C / Sync-D, write mp4s.

:class:`ValidationCallback` (a Lightning ``Callback``) runs every ``every_n_steps`` optimiser steps
(and at the end of training): it reads the first ``num_samples`` clips of a latent-shard set,
samples each with :class:`~ft_train.diffusion.FlowMatchSampler` from fixed per-clip seeds, decodes
the generated and the reference latents with the Wan VAE, updates the metrics and logs
``val/fid``, ``val/fvd``, ``val/sync_c``, ``val/sync_d`` to every logger, and writes the samples
to ``<samples_dir>/step-XXXXXXXX/<index>_<key>.mp4``.

Choices, and why:

* **Every rank validates its share, metrics sync.** Under DeepSpeed ZeRO-3 the DiT's weights are
  sharded and every forward is a collective, so rank 0 cannot sample alone. Rank r takes clips
  r, r + world, …; ranks with one clip fewer run a padding clip whose result is thrown away, so
  every rank makes the same number of forwards. The metric states are sums reduced across ranks
  (torchmetrics), so the numbers equal a single-process pass over the list.
* **Reference = VAE(decode) of the reference latents**, not the original pixels: latent shards hold
  no pixels, and this way FID/FVD measure the generator, not the VAE's reconstruction error. The
  reference statistics are computed once (``reset_real_features=False``).
* **Audio.** Latent shards hold wav2vec features, not waveforms. Sync-C/D and the mp4's sound need
  the waveform: give ``audio_dir`` (files ``<key>.wav|flac|…`` named by sample key) or
  ``raw_shards`` (the ``ft-prep`` shards the latents were encoded from; their ``flac`` member).
  Without either the videos are silent and Sync is skipped with a logged note.
* **The clip's own conditions.** Each clip is sampled with its shard's motion intensities
  (ω_l, ω_b) when the model has the motion module, and its ``face`` (when the shard has one) when
  it has the identity branch, so validation shows what the trained modules do with real values,
  not the defaults (ω = 0.5, whole-frame CLIP tokens).
* **Sync face crops** are the whole frame (talking-portrait clips are face-centred); per-frame face
  boxes (:func:`~ft_train.metrics.sync.syncnet_face_crops`) are not in latent shards.
* **Metric networks never reach a checkpoint**: the metrics live on this callback, not on the
  LightningModule, and the callback's checkpoint state is only the last validated step.
* Logged with ``logger.log_metrics`` at the current step (``LightningModule.log`` from a batch hook
  is written only on ``log_every_n_steps`` boundaries and is not allowed in ``on_train_end``); the
  values also go into ``trainer.callback_metrics``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from torch import Tensor
from torchmetrics import Metric

from ..media import AUDIO_RATE, read_audio, write_video
from .fid import FrechetInceptionDistance
from .fvd import FVD_CLIP_FRAMES, FrechetVideoDistance, split_clips
from .sync import SYNC_FPS, SyncMetric, resample_fps

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus")
METRIC_NAMES = ("fid", "fvd", "sync")

# latents (B, 16, F, H, W), VAE-normalised → uint8 RGB frames (B, T, H·8, W·8, 3)
Decoder = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# pieces shared with ft-eval


def build_metric(spec: Any, name: str, key: str, keep_real: bool = False) -> Metric | None:
    """A metric from its config value: a local weight path, a ready ``Metric``, or None (skipped).

    ``name`` is ``fid`` (``pt_inception-2015-12-05-6726825d.pth``), ``fvd`` (``i3d_torchscript.pt``)
    or ``sync`` (``syncnet_v2.model``). ``keep_real``: FID/FVD keep the reference statistics across
    ``reset()``. Errors name ``key`` (the config key to change).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, Metric):
        return spec
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"{key}: expected a weight path or a torchmetrics Metric, got {type(spec).__name__}")
    try:
        if name == "fid":
            return FrechetInceptionDistance(spec, reset_real_features=not keep_real)
        if name == "fvd":
            return FrechetVideoDistance(spec, reset_real_features=not keep_real)
        if name == "sync":
            return SyncMetric(weights=str(spec))
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{key}: {e}") from None
    raise ValueError(f"unknown metric {name!r}; choose from {METRIC_NAMES}")


def _clip_frames(metric: Metric) -> int:
    return int(getattr(getattr(metric, "net", None), "clip_frames", FVD_CLIP_FRAMES))


def _evenly(n: int, k: int | None) -> Tensor:
    """Indices of ``k`` evenly spaced items out of ``n`` (all when ``k`` is None or ≥ n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long()


class VideoMetrics:
    """The optional FID / FVD / Sync metrics, fed one video at a time (used by the callback and ft-eval).

    Args:
        fid, fvd, sync: ``Metric`` or None (skipped).
        fid_frames: frames per video that enter FID, evenly spaced (None = every frame).
    Counters: ``fvd_too_short`` (videos shorter than one FVD clip), ``sync_no_audio``.
    """

    def __init__(self, fid: Metric | None = None, fvd: Metric | None = None, sync: Metric | None = None,
                 fid_frames: int | None = None):
        self.metrics = {k: m for k, m in (("fid", fid), ("fvd", fvd), ("sync", sync)) if m is not None}
        self.fid_frames = fid_frames
        self.fvd_too_short = 0
        self.sync_no_audio = 0

    def __bool__(self) -> bool:
        return bool(self.metrics)

    def to(self, device: torch.device | str) -> "VideoMetrics":
        for m in self.metrics.values():
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        m = next(iter(self.metrics.values()), None)
        return m.device if m is not None else torch.device("cpu")

    def needs_reference(self) -> bool:
        """False once FID/FVD hold reference statistics they keep across ``reset()``."""
        frechet = [self.metrics[k] for k in ("fid", "fvd") if k in self.metrics]
        return any(getattr(m, "reset_real_features", True) or int(m.real_n) == 0 for m in frechet)

    @torch.no_grad()
    def update(self, generated: Tensor, reference: Tensor | None, fps: float, audio: np.ndarray | None) -> None:
        """One video pair. ``generated``/``reference``: uint8 RGB ``(T, H, W, 3)``; ``fps`` in frames/s;
        ``audio``: 16 kHz mono waveform of the clip, or None (Sync skipped for this video)."""
        device = self.device
        gen = generated.to(device).permute(0, 3, 1, 2)  # (T, 3, H, W)
        ref = reference.to(device).permute(0, 3, 1, 2) if reference is not None else None
        if "fid" in self.metrics:
            fid = self.metrics["fid"]
            fid.update(gen[_evenly(gen.shape[0], self.fid_frames).to(device)], real=False)
            if ref is not None:
                fid.update(ref[_evenly(ref.shape[0], self.fid_frames).to(device)], real=True)
        if "fvd" in self.metrics:
            fvd = self.metrics["fvd"]
            n = _clip_frames(fvd)
            if gen.shape[0] < n or (ref is not None and ref.shape[0] < n):
                self.fvd_too_short += 1
            else:
                fvd.update(split_clips(gen.transpose(0, 1), n), real=False)
                if ref is not None:
                    fvd.update(split_clips(ref.transpose(0, 1), n), real=True)
        if "sync" in self.metrics:
            if audio is None or len(audio) == 0:
                self.sync_no_audio += 1
            else:
                self.metrics["sync"].update(resample_fps(gen, float(fps), SYNC_FPS), audio)

    def compute(self) -> dict[str, float]:
        """``fid``, ``fvd``, ``sync_c``, ``sync_d`` (and ``av_offset``) for the metrics present (NaN if empty)."""
        out: dict[str, float] = {}
        for name in ("fid", "fvd"):
            if name in self.metrics:
                try:
                    out[name] = float(self.metrics[name].compute())
                except RuntimeError as e:  # fewer than 2 samples on a side
                    log.warning("%s not computed: %s", name, e)
                    out[name] = float("nan")
        if "sync" in self.metrics:
            res = self.metrics["sync"].compute()
            out.update(sync_c=float(res["sync_c"]), sync_d=float(res["sync_d"]), av_offset=float(res["av_offset"]))
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        self.fvd_too_short = self.sync_no_audio = 0


def to_uint8_frames(video: Tensor) -> Tensor:
    """Float video ``(B, 3, T, H, W)`` in [-1, 1] → uint8 RGB frames ``(B, T, H, W, 3)``."""
    return video.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


class WanVAEDecoder:
    """Decode VAE-normalised latents ``(B, 16, F, H, W)`` → uint8 frames ``(B, 4(F−1)+1, 8H, 8W, 3)``.

    Loads ``AutoencoderKLWan`` from ``<wan>/vae`` (a diffusers Wan2.1 folder) through the encoders'
    loader and undoes the per-channel normalisation (``z·std + mean``) before ``vae.decode``, as
    diffusers' Wan pipelines do.
    """

    def __init__(self, wan: str | Path, device: str | torch.device = "cpu", dtype: str = "float32",
                 key: str = "callbacks.validation.vae"):
        from ..models.encoders import load_vae_encoder

        self.enc = load_vae_encoder(wan, device=device, dtype=dtype, key=key)

    def to(self, device) -> "WanVAEDecoder":
        self.enc.to(device)
        return self

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        param = next(self.enc.vae.parameters())
        z = latents.to(param.device).float() * self.enc.std + self.enc.mean
        video = self.enc.vae.decode(z.to(param.dtype)).sample
        return to_uint8_frames(video)


# ----------------------------------------------------------------------------------------------
# the fixed validation list


def read_clip_list(path: str | Path, key: str = "callbacks.validation.clips") -> list[str]:
    """Entries of a validation list file: one per line, a sample key (``<video>_<hash>_<clip>``, as
    ``ft-prep`` names them) or a source video (its name, with or without extension or folder);
    blank lines and ``#`` comments are ignored."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}: no file at {path}; give a text file with one clip key or video name per line")
    entries = [line.split("#", 1)[0].strip() for line in file.read_text().splitlines()]
    entries = [e for e in entries if e]
    if not entries:
        raise ValueError(f"{key}: {path} lists no clips")
    return entries


def _video_of(sample_key: str) -> str:
    """The source-video part of an ``ft-prep`` sample key (``<stem>_<8 hex>_<5 digits>``)."""
    parts = sample_key.rsplit("_", 2)
    if len(parts) == 3 and len(parts[1]) == 8 and parts[2].isdigit():
        return parts[0]
    return sample_key


def _entry_video(entry: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(entry).stem if Path(entry).suffix else Path(entry).name)


def read_validation_samples(
    shards: str | Sequence[str], num_samples: int, key: str, clips: str | Path | None = None
) -> list[dict[str, Any]]:
    """The validation list: with ``clips`` (:func:`read_clip_list`), the listed clips in the list's
    order (a video entry contributes its first clip in shard order); without, the first
    ``num_samples`` samples of the latent shards (sorted shard order, no shuffling)."""
    import webdataset as wds

    from ..data.datamodule import resolve_shards
    from ..data.schema import decode_sample

    urls = resolve_shards(shards, key=key)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
    if clips is not None:
        entries = read_clip_list(clips)
        found: dict[str, dict[str, Any]] = {}
        for raw in ds.decode():
            sample_key = raw["__key__"]
            for entry in entries:
                if entry in found:
                    continue
                if entry == sample_key or _entry_video(entry) == _video_of(sample_key):
                    found[entry] = raw
            if len(found) == len(entries):
                break
        missing = [e for e in entries if e not in found]
        if missing:
            raise ValueError(
                f"callbacks.validation.clips: {len(missing)} of {len(entries)} entries of {clips} are not in "
                f"{key} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); fix the list or the shards"
            )
        out = []
        for entry in entries:
            sample = decode_sample(found[entry])
            sample["__key__"] = found[entry]["__key__"]
            out.append(sample)
        return out
    out: list[dict[str, Any]] = []
    for raw in ds.decode():
        sample = decode_sample(raw)
        sample["__key__"] = raw["__key__"]
        out.append(sample)
        if len(out) == num_samples:
            break
    if not out:
        raise ValueError(f"{key}: no samples in {shards!r}")
    if len(out) < num_samples:
        log.warning("%s: only %d validation samples found (num_samples=%d)", key, len(out), num_samples)
    return out


def find_audio(keys: Sequence[str], audio_dir: str | Path | None, raw_shards: Any) -> dict[str, np.ndarray]:
    """Waveforms of the validation clips by sample key, from ``<audio_dir>/<key>.<ext>`` or raw shards' ``flac``."""
    found: dict[str, np.ndarray] = {}
    if audio_dir:
        folder = Path(audio_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"callbacks.validation.audio_dir: no folder at {folder}")
        for k in keys:
            for ext in AUDIO_EXTENSIONS:
                if (folder / f"{k}{ext}").is_file():
                    found[k] = read_audio(folder / f"{k}{ext}")
                    break
    if raw_shards and len(found) < len(keys):
        import webdataset as wds

        from ..data.datamodule import resolve_shards

        wanted = set(keys) - set(found)
        urls = resolve_shards(raw_shards, key="callbacks.validation.raw_shards")
        for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None):
            if raw["__key__"] in wanted and "flac" in raw:
                found[raw["__key__"]] = read_audio(raw["flac"])
                wanted.discard(raw["__key__"])
                if not wanted:
                    break
    return found


# ----------------------------------------------------------------------------------------------
# the callback

class ValidationCallback(Callback):
    """Sample a fixed validation list every N steps; log FID / FVD / Sync-C / Sync-D; write sample mp4s.

    Args:
        shards: latent shards of the validation clips (folder, brace pattern or glob); the first
            ``num_samples`` samples in sorted shard order form the fixed list.
        num_samples: clips in the list (when ``clips`` is not given).
        clips: a text file naming the validation clips, one per line: a sample key or a source
            video's name (its first clip); the list's order is kept (:func:`read_clip_list`).
            None = the first ``num_samples`` samples of ``shards``.
        every_n_steps: validate when ``global_step`` is a multiple of this (0 = never during training).
        at_train_end: also validate after the last step (if that step was not validated already).
        at_train_start: also validate before the first step, as step 0 (not when a run resumes).
        sampler: the :class:`~ft_train.diffusion.FlowMatchSampler` (steps, shift, cfg, audio_cfg).
        seed: clip i's initial noise comes from ``torch.Generator().manual_seed(seed + i)`` (on CPU,
            so the same on every device and rank).
        vae: local diffusers Wan2.1 folder whose ``vae/`` decodes latents; or give ``decode``.
        vae_dtype: VAE weights dtype (float32 default: decoding is precision-sensitive).
        decode: callable latents ``(B, 16, F, H, W)`` → uint8 frames ``(B, T, H, W, 3)`` (tests).
        fid, fvd, sync: local weight path (``pt_inception-2015-12-05-6726825d.pth``,
            ``i3d_torchscript.pt``, ``syncnet_v2.model``), a ready ``Metric``, or None = skipped.
        fid_frames: frames per clip fed to FID, evenly spaced (None = all; FID costs one Inception
            forward per frame).
        audio_dir: folder of ``<sample key>.wav|flac|…`` 16 kHz speech (for Sync and the mp4s).
        raw_shards: raw ``ft-prep`` shards holding the clips' ``flac`` (alternative to ``audio_dir``).
        samples_dir: where ``step-XXXXXXXX/<index>_<key>.mp4`` go (None = no videos written).
        ema: sample with the run's moving average of the weights (``callbacks.ema``, which must be
            on) instead of the weights; training goes on with the weights, exactly as they were.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        num_samples: int = 8,
        every_n_steps: int = 1000,
        at_train_end: bool = True,
        at_train_start: bool = False,
        sampler: Any = None,
        seed: int = 0,
        vae: str | None = None,
        vae_dtype: str = "float32",
        decode: Decoder | None = None,
        fid: Any = None,
        fvd: Any = None,
        sync: Any = None,
        fid_frames: int | None = 16,
        audio_dir: str | None = None,
        raw_shards: Any = None,
        samples_dir: str | None = None,
        clips: str | None = None,
        ema: bool = False,
    ):
        from ..diffusion import FlowMatchSampler

        if int(num_samples) < 1:
            raise ValueError(f"callbacks.validation.num_samples must be >= 1, got {num_samples}")
        if int(every_n_steps) < 0:
            raise ValueError(f"callbacks.validation.every_n_steps must be >= 0, got {every_n_steps}")
        if decode is None and not vae:
            raise ValueError(
                "callbacks.validation.vae: set a local Wan2.1 diffusers folder (with vae/) to decode samples"
            )
        if vae and decode is None and not Path(str(vae)).expanduser().is_dir():
            raise FileNotFoundError(f"callbacks.validation.vae: no folder at {vae}; point it at a Wan2.1 diffusers folder")
        if clips is not None:
            read_clip_list(clips)  # a missing or empty list fails now, not at the first validation
        self.shards, self.clips = shards, clips
        self.ema = bool(ema)
        self.num_samples = int(num_samples)
        self.every_n_steps = int(every_n_steps)
        self.at_train_end = at_train_end
        self.at_train_start = at_train_start
        self.sampler = sampler if sampler is not None else FlowMatchSampler()
        self.seed = int(seed)
        self.vae, self.vae_dtype, self.decode = vae, vae_dtype, decode
        self.audio_dir, self.raw_shards = audio_dir, raw_shards
        self.samples_dir = Path(samples_dir) if samples_dir else None
        built = {
            name: build_metric(spec, name, f"callbacks.validation.{name}", keep_real=True)
            for name, spec in (("fid", fid), ("fvd", fvd), ("sync", sync))
        }
        for name, m in built.items():
            if m is None:
                log.info("validation: %s skipped (callbacks.validation.%s is not set)", name, name)
        self.metrics = VideoMetrics(**built, fid_frames=fid_frames)
        self.samples: list[dict[str, Any]] = []
        self.audio: dict[str, np.ndarray] = {}
        self.last_step = -1
        self.history: list[dict[str, float]] = []  # what each validation logged (tests, notebooks)

    # -- lifecycle ------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.ema:
            self._ema_callback(trainer)  # fails now, not at the first validation
        # after prepare_data, so data modules that write their shards on first use have done so
        if self.samples:
            return
        self.samples = read_validation_samples(self.shards, self.num_samples, "callbacks.validation.shards", self.clips)
        keys = [s["__key__"] for s in self.samples]
        self.audio = find_audio(keys, self.audio_dir, self.raw_shards)
        if "sync" in self.metrics.metrics and len(self.audio) < len(keys):
            log.warning(
                "validation: no waveform for %d of %d clips: their videos are silent and Sync skips them "
                "(set callbacks.validation.audio_dir or raw_shards)", len(keys) - len(self.audio), len(keys)
            )

    def on_train_start(self, trainer, pl_module) -> None:
        # the starting point's numbers (the base model, or the adapter a fine-tune starts from);
        # not again when a run resumes
        if self.at_train_start and trainer.global_step == 0:
            self.validate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # global_step moves once per optimiser step; with accumulation this hook runs several times
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.validate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.global_step != self.last_step:
            self.validate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}  # never the metric networks

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", -1))

    def _ema_callback(self, trainer):
        from ..lit.ema import AdapterEMA

        found = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, AdapterEMA) and c.enabled]
        if not found:
            raise ValueError("callbacks.validation.ema=true samples with the moving average, but none is kept: "
                             "set callbacks.ema.decay (e.g. 0.9999)")
        return found[0]

    # -- one validation -------------------------------------------------------------------------
    def _decoder(self, device) -> Decoder:
        if self.decode is None:
            self.decode = WanVAEDecoder(self.vae, device=device, dtype=self.vae_dtype)
        return self.decode

    def validate(self, trainer, pl_module) -> dict[str, float]:
        """Sample, score, log and write the videos for the current step; returns the logged values."""
        step = trainer.global_step
        self.last_step = step
        if not self.samples:
            self.setup(trainer, pl_module, "fit")
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        per_rank = math.ceil(len(self.samples) / world)
        net = pl_module.net
        modes = {m: m.training for m in net.modules()}
        decode = self._decoder(device)
        self.metrics.to(device)
        out_dir = self.samples_dir / f"step-{step:08d}" if self.samples_dir else None
        precision = getattr(trainer.strategy, "precision_plugin", None)
        null_text = getattr(getattr(pl_module, "loss", None), "null_text", None)
        # loggers that show samples as images (logger=tensorboard): rank 0's clips
        show = [lg for lg in trainer.loggers if hasattr(lg, "log_video_frames")] if rank == 0 else []
        net.eval()
        weights = self._ema_callback(trainer).average_in_place(trainer, pl_module) if self.ema else nullcontext()
        try:
            with weights:
                for j in range(per_rank):
                    index = rank + j * world
                    counted = index < len(self.samples)  # a padding clip keeps ZeRO-3 ranks in step
                    s = self.samples[index % len(self.samples)]
                    with torch.no_grad(), (precision.forward_context() if precision else nullcontext()):
                        latents = self._sample(net, s, index, device, null_text)
                    if not counted:
                        continue
                    self._score_and_write(decode, latents, s, index, out_dir, show, step)
        finally:
            for m, mode in modes.items():
                m.training = mode
        values = {f"val/{k}": v for k, v in self.metrics.compute().items()} if self.metrics else {}
        self.metrics.reset()
        if values:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
            for k, v in values.items():
                trainer.callback_metrics[k] = torch.tensor(v)
            log.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        self.history.append({"step": step, **values})
        return values

    def _sample(self, net, s: dict[str, Any], index: int, device, null_text) -> Tensor:
        negative = None
        if null_text is not None:
            negative = torch.zeros_like(s["text"])
            n = min(null_text.shape[0], negative.shape[0])
            negative[:n] = null_text[:n].to(negative)
            negative = negative[None].to(device)
        extra = {}
        if getattr(net, "motion", None) is not None:
            extra["motion"] = s["motion"][None].to(device)
        if getattr(net, "identity", None) is not None and "face" in s:
            extra["face"] = s["face"][None].to(device)
        return self.sampler(
            net,
            s["image_latents"][None].to(device),
            s["clip"][None].to(device),
            s["text"][None].to(device),
            s["audio"][None].to(device),
            negative_text=negative,
            generator=[torch.Generator().manual_seed(self.seed + index)],
            model_kwargs=extra,
        )

    def _score_and_write(self, decode: Decoder, latents: Tensor, s: dict[str, Any], index: int,
                         out_dir: Path | None, show: Sequence[Any] = (), step: int = 0) -> None:
        key = s["__key__"]
        fps = float(s["fps"]) or 25.0
        audio = self.audio.get(key)
        generated = decode(latents)[0].cpu()
        reference = decode(s["latents"][None])[0].cpu() if self.metrics.needs_reference() else None
        if audio is not None:
            # the clip's own span (what wav2vec saw when the latents were encoded)
            audio = audio[: int(generated.shape[0] / fps * AUDIO_RATE)]
        if self.metrics:
            self.metrics.update(generated, reference, fps, audio)
        if out_dir is not None:
            write_video(out_dir / f"{index:03d}_{key}.mp4", generated.numpy(), fps, audio=audio)
        for logger in show:
            logger.log_video_frames(f"val_samples/{index:03d}_{key}", generated.numpy(), step)


__all__ = [
    "ValidationCallback",
    "VideoMetrics",
    "WanVAEDecoder",
    "build_metric",
    "find_audio",
    "read_audio",
    "read_validation_samples",
    "to_uint8_frames",
]
