"""``ft-infer``: one portrait photo + speech → a talking-portrait mp4 with the speech muxed in.

Usage::

    ft-infer image=face.png audio=speech.wav adapters=exports/run-frame \
        wan=weights/Wan2.1-I2V-14B-720P-Diffusers wav2vec=weights/wav2vec2-base-960h out=talk.mp4
    ft-infer ... adapters=fantasytalking_model.ckpt 'prompt="A woman is talking."'
    ft-infer ... omega_l=0.1 omega_b=0.1 sampler.steps=20 offload=true
    ft-infer ... adapters=exports/run-arcface arcface=weights/ms1mv3_arcface_r100/backbone.pth
    ft-infer ... adapters=exports/run-lora lora_scale=0.8 extra_lora=style.safetensors
    ft-infer ... audio=long_speech.wav segment_frames=81 overlap_frames=5 long_mode=continue

Options are the keys of ``conf/infer.yaml`` (a prompt with a comma must be quoted as above, or
Hydra reads it as a list). ``adapters`` is an ``ft-export format=bundle`` folder, the released
``fantasytalking_model.ckpt`` (or its ``.safetensors`` form), or an ``ft-train`` step folder /
``.ckpt``. Nothing is downloaded: the base model comes from ``wan`` (a local diffusers-format
Wan2.1-I2V folder; by default the folder the bundle was trained on) and ``wav2vec``.

It follows the released FantasyTalking ``infer.py`` step by step (image size, frame count,
three-pass guidance), so bundles of ours and the released checkpoint sample as the official code
would; docs/inference.md says where and why it differs (audio cut to the clip, the face crop of
the identity branch) and how it uses memory.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .cli import Tool
from .config import compose_tool_config
from .inference.adapters import (
    RELEASE_FPS, check_identity, check_lora_options, clip_width, detect_face_box, read_adapters, resolve_arcface, scale_box,
)
from .inference.inputs import (
    FACE_MODES, check_omega, check_wan_folder, check_wav2vec_folder, frames_for_audio, read_image, read_speech,
    resolve_device, resolve_dtype_name, target_size,
)
from .inference.long_form import check_duration, check_long_form, generate_long, plan_for_speech
from .inference.pipeline import TalkingPortraitPipeline

log = logging.getLogger("ft_train.infer")
EXAMPLE = ("ft-infer image=face.png audio=speech.wav adapters=fantasytalking_model.ckpt "
           "wan=weights/Wan2.1-I2V-14B-720P-Diffusers wav2vec=weights/wav2vec2-base-960h out=talk.mp4")
# ----------------------------------------------------------------------------------------------
# the command


def infer(
    image: str | Path,
    audio: str | Path,
    adapters: str | Path,
    out: str | Path,
    wav2vec: str | Path | None,
    wan: str | Path | None = None,
    prompt: str = "A person is talking.",
    negative_prompt: str = "",
    max_side: int = 512,
    fps: float | None = None,
    segment_frames: int = 81,
    overlap_frames: int = 5,
    max_seconds: float = 120.0,
    long_mode: str = "continue",
    omega_l: float | None = None,
    omega_b: float | None = None,
    seed: int = 1111,
    face: str = "auto",
    face_margin: float = 0.2,
    arcface: str | Path | None = None,
    audio_mode: str | None = None,
    audio_expand: int | None = None,
    sampler=None,
    device: str = "auto",
    dtype: str = "auto",
    vae_dtype: str = "float32",
    vae_tiling: bool = False,
    offload: bool = False,
    progress: bool = True,
    compile_blocks: bool = False,
    frozen_fp8: bool = False,
    ema: bool = False,
    lora_scale: float = 1.0,
    extra_lora: str | Path | list | None = None,
    extra_lora_scale: float = 1.0,
) -> dict[str, Any]:
    """Generate ``out`` (mp4) from ``image`` and ``audio`` with ``adapters`` (keys of
    ``conf/infer.yaml``; ``sampler`` is a built :class:`~ft_train.diffusion.FlowMatchSampler`,
    None = the released settings). ``negative_prompt`` defaults to the empty prompt here; the
    command's default (``conf/infer.yaml``) is the release's.

    Returns ``out``, ``num_frames``, ``fps``, ``width``, ``height``, ``duration`` (video, s),
    ``audio_duration`` (s), ``audio_mode``, ``motion`` (the (ω_l, ω_b) used, or None),
    ``identity`` (bool), ``face_box`` (the face crop's box in the video's px, None when the
    identity branch read the whole image or is absent), ``layout`` (of the adapters),
    ``seconds`` (wall time), ``segments`` (windows sampled; more than 1 = long-form) and
    ``segment_seconds`` (wall time of each).
    """
    from PIL import Image

    from .media import AUDIO_RATE, write_video

    started = time.perf_counter()
    # -- checks that need nothing loaded: every one names its key
    omega = (check_omega(omega_l, "omega_l"), check_omega(omega_b, "omega_b"))
    check_long_form(segment_frames, overlap_frames, max_seconds, long_mode)
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16:
        raise ValueError(f"max_side: must be a whole number of px >= 16, got {max_side!r}")
    if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps: must be > 0 (or null for the adapters' own), got {fps!r}")
    if face not in FACE_MODES:
        raise ValueError(f"face: must be auto (find the face in the image) or none (the whole image), got {face!r}")
    if isinstance(face_margin, bool) or not isinstance(face_margin, (int, float)) or not face_margin >= 0:
        raise ValueError(f"face_margin: must be a number >= 0 (the training data's face_margin), got {face_margin!r}")
    extra_loras = check_lora_options(lora_scale, extra_lora, extra_lora_scale)
    torch_device = resolve_device(device)
    resolve_dtype_name(dtype, torch_device)
    resolve_dtype_name(vae_dtype, torch_device, key="vae_dtype")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ValueError(f"out: {out} is a folder; give the mp4 file to write")
    picture = read_image(image, "image")
    speech = read_speech(audio, "audio")
    check_duration(speech.shape[0] / AUDIO_RATE, max_seconds, audio)
    wav2vec_dir = check_wav2vec_folder(wav2vec)
    trained = read_adapters(adapters, audio_mode, audio_expand, ema)
    spec = trained.spec
    wan_dir = check_wan_folder(wan, spec)
    check_identity(spec.identity, clip_width(wan_dir))
    face_box = None
    if trained.has_identity:
        encoder = spec.identity.get("encoder", "precomputed")
        if encoder == "arcface":
            trained.spec = spec = replace(spec, identity=resolve_arcface(spec.identity, arcface))
            if face == "none":
                raise ValueError("face: none, but the adapters' identity branch (model.identity.encoder=arcface) "
                                 "reads a face crop; use face=auto")
        if face == "auto":
            face_box = detect_face_box(picture)
            if face_box is None and encoder == "arcface":
                raise ValueError(f"face: no face found in {image}; the identity branch (model.identity.encoder=arcface) "
                                 "needs a face crop: use a photo with the face clearly visible")
            if face_box is None:
                log.warning("face: no face found in %s; the identity branch reads the whole image's CLIP tokens "
                            "instead (as with face=none)", image)
            else:
                log.info("identity branch: conditioned on the face crop (%s)",
                         "its CLIP tokens" if encoder == "precomputed" else "ArcFace on its pixels")
        else:
            log.info("identity branch: conditioned on the whole image's CLIP tokens (face=none)")

    if not trained.has_motion and any(w is not None for w in omega):
        log.warning("omega_l/omega_b: the adapters have no motion module (model.motion), "
                    "so the motion intensities are ignored")
    if fps is not None:
        fps, why = float(fps), "fps= given"
    elif spec.fps:
        fps, why = spec.fps, "the frame rate of the adapters' training clips"
    else:
        fps, why = RELEASE_FPS, "the released adapter's rate: the adapters record no training frame rate; set fps= to choose"
    log.info("%g fps: %s", fps, why)
    duration = speech.shape[0] / AUDIO_RATE
    plan = plan_for_speech(duration, fps, segment_frames, overlap_frames)
    num_frames = plan[-1].start + plan[-1].frames
    if len(plan) > 1:
        log.info("long-form: %d frames in %d segments of up to %d frames overlapping by %d (long_mode=%s)",
                 num_frames, len(plan), segment_frames, overlap_frames, long_mode)
    if spec.num_frames and plan[0].frames > spec.num_frames:
        log.info("%d-frame windows are longer than the %d-frame clips the adapters were trained on",
                 plan[0].frames, spec.num_frames)

    pipe = TalkingPortraitPipeline.load(trained, wan_dir, wav2vec_dir, sampler=sampler, device=torch_device,
                                        dtype=dtype, vae_dtype=vae_dtype, vae_tiling=vae_tiling, offload=offload,
                                        face_margin=face_margin, compile_blocks=compile_blocks,
                                        frozen_fp8=frozen_fp8, lora_scale=lora_scale, extra_lora=extra_loras,
                                        extra_lora_scale=extra_lora_scale)
    trained.checkpoint.tensors.clear()  # copied into the model; drop the (possibly memory-mapped) originals
    width, height = target_size(*picture.size, max_side, pipe.grid)
    # Found in the full-resolution photo (a sharper face for the mesh), cropped from the first frame.
    face_box = scale_box(face_box, picture.size, (width, height))
    picture = picture.resize((width, height), Image.LANCZOS)
    log.info("%d×%d px, %d frames at %g fps (%.2f s), %s-level audio, %d steps on %s",
             width, height, num_frames, fps, num_frames / fps, spec.audio_mode, pipe.sampler.steps, torch_device)
    if len(plan) == 1:
        window_started = time.perf_counter()
        frames = pipe(picture, speech, num_frames, fps, prompt=prompt, negative_prompt=negative_prompt,
                      omega=omega, seed=seed, progress=progress, face_box=face_box).numpy()
        write_video(out, frames, fps, audio=speech)
        segment_seconds = [time.perf_counter() - window_started]
    else:
        cond = pipe.conditions(picture, prompt, negative_prompt, omega, face_box)
        out.parent.mkdir(parents=True, exist_ok=True)
        # The frames wait on disk, not in memory, until they are encoded: a long video at 512 px is
        # ~0.8 MB per frame.
        with tempfile.TemporaryDirectory(prefix=".ft-infer-", dir=out.parent) as scratch:
            frames = np.lib.format.open_memmap(Path(scratch) / "frames.npy", mode="w+", dtype=np.uint8,
                                               shape=(num_frames, height, width, 3))
            segment_seconds = generate_long(pipe, cond, speech, fps, plan, frames, mode=long_mode, seed=seed,
                                            progress=progress)
            write_video(out, frames, fps, audio=speech)
            del frames
    used = None
    if pipe.model.motion is not None:
        used = [pipe.model.motion_config.default if w is None else w for w in omega]
    return {
        "out": str(out),
        "num_frames": num_frames,
        "fps": fps,
        "width": width,
        "height": height,
        "duration": num_frames / fps,
        "audio_duration": min(duration, num_frames / fps),
        "audio_mode": spec.audio_mode,
        "motion": used,
        "identity": trained.has_identity,
        "face_box": face_box,
        "layout": trained.checkpoint.layout,
        "seconds": time.perf_counter() - started,
        "segments": len(plan),
        "long_mode": long_mode if len(plan) > 1 else None,
        "segment_seconds": segment_seconds,
    }


def build_sampler(cfg: dict[str, Any]) -> dict[str, Any]:
    """The composed ``conf/infer.yaml`` with its sampler built (errors name its key)."""
    from hydra.utils import instantiate

    try:
        cfg["sampler"] = instantiate(cfg["sampler"])
    except Exception as exc:
        cause = exc.__cause__ or exc
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else cause.__class__.__name__
        raise SystemExit(f"ft-infer: {text if text.startswith('sampler.') else 'sampler: ' + text}") from None
    return cfg


def load_config(argv: list[str]) -> dict[str, Any]:
    """``conf/infer.yaml`` with ``key=value`` overrides, the sampler built."""
    return build_sampler(compose_tool_config("infer", argv, "ft-infer", EXAMPLE))


def _report(result: dict[str, Any]) -> str:
    motion = "" if result["motion"] is None else ", ω_l {:g} ω_b {:g}".format(*result["motion"])
    if result["identity"]:
        motion += ", identity: " + ("face crop" if result["face_box"] is not None else "whole image")
    long = f", {result['segments']} segments (long_mode={result['long_mode']})" if result["segments"] > 1 else ""
    return (f"ft-infer: wrote {result['out']} ({result['width']}×{result['height']}, {result['num_frames']} frames at "
            f"{result['fps']:g} fps = {result['duration']:.2f} s, {result['audio_mode']}-level audio{motion}, "
            f"adapters: {result['layout']}{long}, {result['seconds']:.0f} s)")


TOOL = Tool("ft-infer", "infer", __doc__, EXAMPLE, run=lambda cfg: infer(**cfg), report=_report, build=build_sampler)
main = TOOL.main  # console entry point: ``ft-infer key=value ...`` (keys of ``conf/infer.yaml``)


if __name__ == "__main__":
    sys.exit(main())
