"""Validation while training: sample a fixed clip list, score FID / FVD / Sync-C / Sync-D, write mp4s.

Every rank validates its share (under ZeRO-3 every forward is a collective) and the metric states
are reduced across ranks, so the numbers equal one pass over the list by ft-eval's protocols. With
``long_form``, a clip whose speech runs past its window goes through ft-infer's segment loop into
one video of the whole speech. Why each choice (reference = VAE-decoded latents, where audio comes
from, FID's frame count, logging, long form): docs/metrics.md ("Validation during training").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from torch import Tensor

from ..data.validation_set import find_audio, read_clip_list, read_validation_samples
from ..inference.long_form import Segment, check_duration, check_long_form, generate_long, plan_for_speech
from ..media import AUDIO_RATE, write_video
from ..metrics.video import VideoMetrics, build_metric
from ..models.vae import WanVAEDecoder

log = logging.getLogger(__name__)
KEY = "callbacks.validation"

# latents (B, 16, F, H, W), VAE-normalised → uint8 RGB frames (B, T, H·8, W·8, 3)
Decoder = Callable[[Tensor], Tensor]


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
        fid_frames: frames per clip fed to FID, evenly spaced (``"all"``/None = every frame, as
            papers do; FID costs one Inception forward per frame).
        fvd_protocol, fvd_resolution, fvd_seed: FVD protocol (see
            :class:`~ft_train.metrics.video.VideoMetrics`); the reference clip of sample i starts
            at a frame seeded by its key.
        sync_crop: ``face`` (mediapipe face tracks, the reference) or ``none`` (whole frames).
        sync_track: face-track rules (:class:`~ft_train.metrics.facetrack.TrackRules` fields).
        idc, aes, aes_head, dynamics, portrait_frames: the paper's IDC (DINO ViT folder), Aes (CLIP
            ViT-L/14 folder + LAION linear head file), SD/BD (true/false) over ``portrait_frames``
            frames per clip (:mod:`ft_train.metrics.portrait`); skipped when not set.
        audio_dir: folder of ``<sample key>.wav|flac|…`` 16 kHz speech (for Sync and the mp4s).
        raw_shards: raw ``ft-prep`` shards holding the clips' ``flac`` (alternative to ``audio_dir``).
        samples_dir: where ``step-XXXXXXXX/<index>_<key>.mp4`` go (None = no videos written).
        ema: sample with the run's moving average of the weights (``callbacks.ema``, which must be
            on) instead of the weights; training goes on with the weights, exactly as they were.
        long_form: a clip whose speech in ``audio_dir`` needs more than one window becomes one
            video of the whole speech, sampled in overlapping segments as ft-infer
            does (:mod:`ft_train.inference.long_form`), and is written and scored whole.
        wav2vec: with ``long_form``: the local wav2vec2 folder that encodes each segment's speech
            (the one the latent shards' audio features came from).
        segment_frames, overlap_frames, long_mode, max_seconds: ft-infer's long-form keys;
            ``segment_frames`` None = the clips' own frame count (the window the model trains on,
            and the longest the shards' condition latents cover).
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
        fid_frames: int | str | None = 16,
        fvd_protocol: str = "stylegan_v",
        fvd_resolution: int = 256,
        fvd_seed: int = 0,
        sync_crop: str = "face",
        sync_track: Any = None,
        idc: Any = None,
        aes: Any = None,
        aes_head: Any = None,
        dynamics: Any = False,
        portrait_frames: int | None = 16,
        audio_dir: str | None = None,
        raw_shards: Any = None,
        samples_dir: str | None = None,
        clips: str | None = None,
        ema: bool = False,
        long_form: bool = False,
        wav2vec: str | None = None,
        segment_frames: int | None = None,
        overlap_frames: int = 5,
        long_mode: str = "continue",
        max_seconds: float = 120.0,
    ):
        from ..diffusion import FlowMatchSampler
        from ..inference.inputs import check_wav2vec_folder

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
        if not isinstance(long_form, bool):
            raise ValueError(f"{KEY}.long_form: must be true or false, got {long_form!r}")
        self.long_form, self.wav2vec = long_form, None
        if long_form:
            check_long_form(segment_frames, overlap_frames, max_seconds, long_mode, prefix=f"{KEY}.")
            if not vae:
                raise ValueError(f"{KEY}.vae: long_form=true encodes each segment's first frames with the Wan VAE; "
                                 "set a local Wan2.1 diffusers folder (with vae/)")
            if not audio_dir:
                raise ValueError(f"{KEY}.audio_dir: long_form=true reads each clip's whole speech from "
                                 "<audio_dir>/<sample key>.wav|flac|... (raw shards hold only the clip's own audio); set it")
            self.wav2vec = str(check_wav2vec_folder(wav2vec, key=f"{KEY}.wav2vec"))
        self.segment_frames, self.overlap_frames = segment_frames, overlap_frames
        self.long_mode, self.max_seconds = long_mode, max_seconds
        self.audio_encoder = None
        self.plans: dict[str, list[Segment]] = {}  # long-form clips' segments, by sample key
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
            name: build_metric(spec, name, f"callbacks.validation.{name}", keep_real=True, fvd_protocol=fvd_protocol,
                               sync_crop=sync_crop, sync_track=sync_track, aes_head=aes_head, frames=portrait_frames)
            for name, spec in (("fid", fid), ("fvd", fvd), ("sync", sync), ("idc", idc), ("aes", aes),
                               ("dynamics", dynamics))
        }
        for name, m in built.items():
            if m is None:
                log.info("validation: %s skipped (callbacks.validation.%s is not set)", name, name)
        try:
            self.metrics = VideoMetrics(**built, fid_frames=fid_frames, fvd_protocol=fvd_protocol,
                                        fvd_resolution=fvd_resolution, fvd_seed=fvd_seed)
        except ValueError as e:
            raise ValueError(f"callbacks.validation.{e}") from None
        if self.metrics:
            log.info("validation protocol: %s",
                     ", ".join(f"{k}={v}" for k, v in self.metrics.protocol().items()))
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
        if self.long_form:
            self.plans = self._plan_long_form()

    def _plan_long_form(self) -> dict[str, list[Segment]]:
        """Per clip whose speech needs more than one window: its segments (checked now, before the
        first step: a too-long speech or a window longer than the clips fail here)."""
        from ..models.audio import num_video_frames

        plans = {}
        for s in self.samples:
            key = s["__key__"]
            if key not in self.audio:
                continue
            clip_frames = num_video_frames(s["image_latents"].shape[1])
            segment = clip_frames if self.segment_frames is None else self.segment_frames
            if segment > clip_frames:
                raise ValueError(
                    f"{KEY}.segment_frames: {segment} frames is longer than validation clip {key}'s {clip_frames} "
                    f"(its condition latents cover no more); set it to at most {clip_frames}, or null for the clips' own")
            check_long_form(segment, self.overlap_frames, self.max_seconds, self.long_mode, prefix=f"{KEY}.")
            seconds = len(self.audio[key]) / AUDIO_RATE
            check_duration(seconds, self.max_seconds, f"the speech of validation clip {key}", prefix=f"{KEY}.")
            plan = plan_for_speech(seconds, float(s["fps"]) or 25.0, segment, self.overlap_frames)
            if len(plan) > 1:
                plans[key] = plan
        if plans:
            log.info("validation: %d of %d clips are long-form (%s segments, long_mode=%s)", len(plans),
                     len(self.samples), ", ".join(str(len(p)) for p in plans.values()), self.long_mode)
        return plans

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
        from .ema import AdapterEMA

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
        net = pl_module.net
        modes = {m: m.training for m in net.modules()}
        decode = self._decoder(device)
        self.metrics.to(device)
        out_dir = self.samples_dir / f"step-{step:08d}" if self.samples_dir else None
        precision = getattr(trainer.strategy, "precision_plugin", None)
        in_precision = precision.forward_context if precision else nullcontext
        null_text = getattr(getattr(pl_module, "loss", None), "null_text", None)
        # loggers that show samples as images (logger=tensorboard): rank 0's clips
        show = [lg for lg in trainer.loggers if hasattr(lg, "log_video_frames")] if rank == 0 else []
        # Under ZeRO-3 every forward is a collective, so every rank samples as many windows (a
        # long-form clip counts its segments); a rank with fewer samples padding windows, unused.
        windows = [len(self.plans.get(s["__key__"], (None,))) for s in self.samples]
        mine = range(rank, len(self.samples), world)
        padding = max(sum(windows[r::world]) for r in range(world)) - sum(windows[i] for i in mine)
        net.eval()
        weights = self._ema_callback(trainer).average_in_place(trainer, pl_module) if self.ema else nullcontext()
        try:
            with weights:
                for index in mine:
                    s = self.samples[index]
                    if windows[index] > 1:
                        frames = self._sample_long(net, s, index, device, null_text, in_precision)
                        self._score_and_write(decode, None, s, index, out_dir, show, step, frames=frames)
                        continue
                    with torch.no_grad(), in_precision():
                        latents = self._sample(net, s, index, device, null_text)
                    self._score_and_write(decode, latents, s, index, out_dir, show, step)
                for _ in range(padding):
                    with torch.no_grad(), in_precision():
                        self._sample(net, self.samples[0], 0, device, null_text)
        finally:
            for m, mode in modes.items():
                m.training = mode
        values = {f"val/{k}": v for k, v in self.metrics.compute().items()} if self.metrics else {}
        self.metrics.reference_done()  # kept reference statistics now hold every clip
        self.metrics.reset()
        if values:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
            for k, v in values.items():
                trainer.callback_metrics[k] = torch.tensor(v)
            log.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        self.history.append({"step": step, **values})
        return values

    def _conditions(self, net, s: dict[str, Any], device, null_text):
        """The clip's conditions as :class:`~ft_train.inference.pipeline.Conditions` (``latents``:
        its condition latents, ``first``: None)."""
        from ..inference.pipeline import Conditions

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
        return Conditions(first=None, text=s["text"][None].to(device), negative_text=negative,
                          clip=s["clip"][None].to(device), model_kwargs=extra,
                          latents=s["image_latents"][None].to(device))

    def _sample(self, net, s: dict[str, Any], index: int, device, null_text) -> Tensor:
        cond = self._conditions(net, s, device, null_text)
        return self.sampler(
            net, cond.latents, cond.clip, cond.text, s["audio"][None].to(device),
            negative_text=cond.negative_text,
            generator=[torch.Generator().manual_seed(self.seed + index)],
            model_kwargs=cond.model_kwargs,
        )

    def _sample_long(self, net, s: dict[str, Any], index: int, device, null_text, in_precision) -> np.ndarray:
        """The whole speech of clip ``index`` as one video, uint8 ``(T, H, W, 3)``: ft-infer's
        segment loop (:func:`~ft_train.inference.long_form.generate_long`) with the clip's own
        conditions and condition latents, each segment's speech through ``wav2vec``; segment k's
        noise is seeded ``seed + index + k`` (segment 0: the clip's own seed)."""
        from ..inference.pipeline import TalkingPortraitPipeline
        from ..models.encoders import load_audio_encoder

        if self.audio_encoder is None:
            self.audio_encoder = load_audio_encoder(self.wav2vec, device=device, key=f"{KEY}.wav2vec")
        sampler = self.sampler

        def sample(*args, **kwargs):  # the training precision for the DiT only, not the VAE
            with in_precision():
                return sampler(*args, **kwargs)

        vae = self._decoder(device)
        pipe = TalkingPortraitPipeline(net, None, None, self.audio_encoder, vae, sample, device)
        plan = self.plans[s["__key__"]]
        _, _, h, w = s["image_latents"].shape
        stride = vae.enc.spatial_stride
        out = np.zeros((plan[-1].start + plan[-1].frames, h * stride, w * stride, 3), dtype=np.uint8)
        generate_long(pipe, self._conditions(net, s, device, null_text), self.audio[s["__key__"]],
                      float(s["fps"]) or 25.0, plan, out, mode=self.long_mode, seed=self.seed + index)
        return out

    def _score_and_write(self, decode: Decoder, latents: Tensor | None, s: dict[str, Any], index: int,
                         out_dir: Path | None, show: Sequence[Any] = (), step: int = 0,
                         frames: np.ndarray | None = None) -> None:
        key = s["__key__"]
        fps = float(s["fps"]) or 25.0
        audio = self.audio.get(key)
        generated = decode(latents)[0].cpu() if frames is None else torch.from_numpy(frames)
        reference = decode(s["latents"][None])[0].cpu() if self.metrics.needs_reference() else None
        if audio is not None:
            # the clip's own span (what wav2vec saw when the latents were encoded)
            audio = audio[: int(generated.shape[0] / fps * AUDIO_RATE)]
        if self.metrics:
            self.metrics.update(generated, reference, fps, audio, key=key)
        if out_dir is not None:
            write_video(out_dir / f"{index:03d}_{key}.mp4", generated.numpy(), fps, audio=audio)
        for logger in show:
            logger.log_video_frames(f"val_samples/{index:03d}_{key}", generated.numpy(), step)


__all__ = ["ValidationCallback"]
