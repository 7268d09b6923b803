"""``ft-infer``: one portrait photo + speech → a talking-portrait mp4 with the speech muxed in.

Usage::

    ft-infer image=face.png audio=speech.wav adapters=exports/run-frame \
        wan=weights/Wan2.1-I2V-14B-720P-Diffusers wav2vec=weights/wav2vec2-base-960h out=talk.mp4
    ft-infer ... adapters=fantasytalking_model.ckpt 'prompt="A woman is talking."'
    ft-infer ... omega_l=0.1 omega_b=0.1 sampler.steps=20 offload=true
    ft-infer ... adapters=exports/run-arcface arcface=weights/ms1mv3_arcface_r100/backbone.pth

Options are the keys of ``conf/infer.yaml`` (a prompt with a comma must be quoted as above, or
Hydra reads it as a list). ``adapters`` is an ``ft-export format=bundle`` folder, the released
``fantasytalking_model.ckpt`` (or its ``.safetensors`` form), or an ``ft-train`` step folder /
``.ckpt``. Nothing is downloaded: the base model comes from ``wan`` (a local diffusers-format
Wan2.1-I2V folder; by default the folder the bundle was trained on) and ``wav2vec``.

What runs, in the order of the released FantasyTalking ``infer.py``:

1. **Checks first.** Every path, ω, frame and device setting is checked before any weights are
   read; a bad one stops with one line naming its key.
2. **The model** = the Wan DiT from ``<wan>/transformer`` + the adapters, rebuilt with the
   settings the adapters were trained with: a bundle's JSON (or an ft-train run's
   ``config.yaml``) gives the audio mode, window widening and the identity / motion modules;
   the released file holds the audio adapter only and runs with frame-level windows widened by
   4 tokens, as the official code does.
3. **The image** is resized with Lanczos so its longest edge is ``max_side`` (512, scaling up
   or down), then each side is rounded *up* to the DiT grid (VAE stride 8 × patch 2 = 16 px), as
   the release does; the aspect ratio moves by at most that rounding.
4. **Frames from the speech**: the shortest 4k+1 clip that covers the audio at ``fps``
   (:func:`frames_for_audio`), at most ``max_frames``. The release's
   ``int(fps·duration // 4)·4 + 5`` adds 1–5 frames past the speech; this adds at most 3. The
   waveform given to wav2vec2 is cut — or padded with silence — to exactly ``frames / fps``
   seconds, so the per-frame audio windows stay at the 50 tokens/s they were trained with (the
   release's shorter-than-clip audio squeezes them instead).
5. **Sampling**: :class:`~ft_train.diffusion.FlowMatchSampler` (30 Euler steps, shift 5, text
   CFG 5, audio CFG 4.5, three passes per step), noise seeded on the CPU so a seed gives the
   same video on every device. The motion intensities (ω_l, ω_b) reach the model in every pass
   when the adapters have the motion module; otherwise setting them only logs a warning.
6. **Decoding** with the Wan VAE, and the mp4 (H.264 + AAC, :func:`ft_train.media.write_video`)
   carries the original speech.

**The identity branch**, when the adapters have one, reads the face of the photo as training did
(``face=auto``): the face is found with ``ft-prep``'s own mediapipe face mesh
(:class:`ft_train.data.face.FrameAnalyzer`), its box is the landmarks' extent (the box ``ft-prep``
stores), and the square crop around it is cut from the resized first frame by
:func:`ft_train.data.clip_prep.crop_face` with ``face_margin``. A ``precomputed`` branch gets the
crop's CLIP tokens, an ``arcface`` one the 112×112 crop itself (its ArcFace network comes from
``arcface``, default the path it was trained with). Without a face in the photo (or with
``face=none``) a ``precomputed`` branch reads the whole image's CLIP tokens, the fallback it was
built with, and says so; an ``arcface`` branch has no fallback and stops with one line.

Memory on one GPU: ``dtype`` (bfloat16 on CUDA by default) sets the DiT and the CLIP / umT5 /
wav2vec2 weights, ``vae_dtype`` the VAE's; ``offload=true`` keeps the encoders and the VAE on the
CPU and moves each to the GPU only while it runs, so during sampling the GPU holds the DiT alone.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cli import Tool
from .config import compose_tool_config
from .models.weights import AdapterCheckpoint

log = logging.getLogger("ft_train.infer")

EXAMPLE = ("ft-infer image=face.png audio=speech.wav adapters=fantasytalking_model.ckpt "
           "wan=weights/Wan2.1-I2V-14B-720P-Diffusers wav2vec=weights/wav2vec2-base-960h out=talk.mp4")
RELEASE_FPS = 23.0          # the released inference's --fps default (its infer.py)
RELEASE_AUDIO_MODE = "frame"  # the released code always cuts per-latent-frame audio windows
RELEASE_EXPAND = 4          # ... widened by 4 tokens per side
MIN_FRAMES = 5              # one latent frame after the reference frame
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}
# Sub-folders of a diffusers Wan2.1-I2V folder ft-infer reads, and the file each must hold.
WAN_NEEDS = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "image_encoder": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "spiece.model"),
}
WAN_HINT = "a local Wan2.1-I2V diffusers folder (transformer/, vae/, image_encoder/, text_encoder/, tokenizer/)"
FACE_MODES = ("auto", "none")  # the `face` key
FACE_ENCODERS_READ = ("precomputed", "arcface")  # identity encoders whose input ft-infer can make


# ----------------------------------------------------------------------------------------------
# sizes


def frames_for_audio(duration: float, fps: float, max_frames: int = 81) -> int:
    """Video frames for ``duration`` seconds of speech at ``fps``: the shortest 4k+1 clip that
    covers it (``frames / fps ≥ duration``), at least :data:`MIN_FRAMES`, at most ``max_frames``.

    4k+1 because the Wan VAE maps 4k+1 frames to k+1 latent frames. Covering rather than rounding
    to the nearest: the last syllable is never cut, and the silent tail is under 4 frames. Speech
    that overruns a frame boundary by under a hundredth of a frame (resampling and codecs shift
    lengths by a few samples) does not cost 4 more frames.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    needed = math.ceil(duration * fps - 0.01)
    frames = max(MIN_FRAMES, 4 * math.ceil((needed - 1) / 4) + 1)
    return max(1, min(frames, max_frames))


def target_size(width: int, height: int, max_side: int, multiple: int) -> tuple[int, int]:
    """(width, height) in px for an image of ``width``×``height``: longest edge scaled to
    ``max_side`` (truncated, as the release does), then each side rounded up to a multiple of
    ``multiple``."""
    scale = max_side / max(width, height)
    w, h = int(width * scale), int(height * scale)
    return max(multiple, -(-w // multiple) * multiple), max(multiple, -(-h // multiple) * multiple)


def resolve_device(name: str) -> torch.device:
    """``auto`` = cuda when torch sees a GPU, else cpu; ``cpu``, ``cuda``, ``cuda:N``."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: unknown {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name} requested but torch sees no CUDA device; use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {name} requested but only {torch.cuda.device_count()} CUDA devices are visible")
    elif device.type != "cpu":
        raise ValueError(f"device: unsupported {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype_name(name: str, device: torch.device, key: str = "dtype") -> str:
    """``auto`` = bfloat16 on CUDA (the release runs the DiT in bf16), float32 on the CPU (where
    bf16 matmuls are slow and gain nothing); else a float dtype name."""
    name = str(name).strip().lower()
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if name not in DTYPE_NAMES:
        raise ValueError(f"{key}: unknown {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[name]


def check_omega(value: Any, key: str) -> float | None:
    """A motion intensity from the config: None, or a number in [0, 1] (one line naming ``key`` otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: must be a number in [0, 1] (0.1 subtle, 0.5 natural, 1.0 intense), got {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
        raise ValueError(f"{key}: {value} is outside [0, 1] (0.1 subtle, 0.5 natural, 1.0 intense)")
    return float(value)


# ----------------------------------------------------------------------------------------------
# what the adapters need


@dataclass
class AdapterSpec:
    """The adapters' tensors and the settings to rebuild the model they belong to.

    Attributes:
        checkpoint: the tensors (this project's naming) and what the file says about itself.
        audio_mode: ``clip`` or ``frame`` audio attention.
        audio_expand: window widening per side, tokens (frame mode).
        audio_in_dim, audio_proj_dim: audio projector widths, read from its weight.
        identity, motion: ``model.identity`` / ``model.motion`` settings, or None (module absent).
        pretrained: the base folder the adapters were trained on, when known.
        fps: the training clips' frame rate, when known.
        num_frames: the training clips' length in frames, when known.
    """

    checkpoint: AdapterCheckpoint
    audio_mode: str
    audio_expand: int
    audio_in_dim: int
    audio_proj_dim: int
    identity: dict[str, Any] | None = None
    motion: dict[str, Any] | None = None
    pretrained: str | None = None
    fps: float | None = None
    num_frames: int | None = None

    @property
    def has_motion(self) -> bool:
        return self.motion is not None

    @property
    def has_identity(self) -> bool:
        return self.identity is not None

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`ft_train.models.build_model` (besides the backbone)."""
        return {
            "audio_mode": self.audio_mode,
            "audio_in_dim": self.audio_in_dim,
            "audio_proj_dim": self.audio_proj_dim,
            "audio_expand": self.audio_expand,
            "identity": self.identity,
            "motion": self.motion,
        }


def read_adapters(path: str | Path, audio_mode: str | None = None, audio_expand: int | None = None,
                  ema: bool = False) -> AdapterSpec:
    """Read ``path`` (any layout :func:`~ft_train.models.weights.read_checkpoint` reads) and
    work out the model it needs. ``audio_mode`` / ``audio_expand`` override what the file says;
    ``ema``: an ft-train checkpoint's moving average of the weights (``callbacks.ema``) instead.

    A module is present when its tensors are there. Motion tensors without settings rebuild the
    module from their shapes; identity tensors without settings cannot (the Q-Former's depth and
    heads are not in the shapes) and fail with a line saying to export a bundle. A module the
    config enables but whose tensors are absent would start zero-initialised, i.e. do nothing,
    so it is left out.
    """
    from .models.fantasytalking import AUDIO_MODES
    from .models.weights import AUDIO_PROJ_PREFIX, read_checkpoint, with_ema
    from .spec import read_spec

    ckpt = read_checkpoint(path, key="adapters")
    if ema:
        ckpt = with_ema(ckpt, key="ema")
    where = f"adapters: {ckpt.path}"
    proj = ckpt.tensors.get(f"{AUDIO_PROJ_PREFIX}proj.weight")
    if proj is None or proj.ndim != 2:
        raise ValueError(f"{where} holds no audio adapter ({AUDIO_PROJ_PREFIX}proj.weight is missing)")
    spec = read_spec(ckpt)  # the one reader of every layout's model description
    mode = audio_mode or (spec.audio_mode if spec else None) or ckpt.meta.get("audio_mode")
    if mode is None:
        mode = RELEASE_AUDIO_MODE
        if ckpt.layout != "official":
            log.info("adapters: %s does not say its audio mode; using %s (the release's)", ckpt.path, mode)
    if mode not in AUDIO_MODES:
        raise ValueError(f"audio_mode: {mode!r} is not one of {AUDIO_MODES}")
    expand = audio_expand if audio_expand is not None else (spec.audio_expand if spec else RELEASE_EXPAND)
    if isinstance(expand, bool) or not isinstance(expand, int) or expand < 0:
        raise ValueError(f"audio_expand: must be a whole number of tokens >= 0, got {expand!r}")

    motion = spec.motion if spec else None
    motion_keys = [k for k in ckpt.tensors if k.startswith("motion.")]
    identity = spec.identity if spec else None
    identity_keys = [k for k in ckpt.tensors if k.startswith(("identity.", "face_kv."))]
    for name, section, keys in (("motion", motion, motion_keys), ("identity", identity, identity_keys)):
        if section is not None and not keys:
            log.warning("adapters: %s enables model.%s but holds none of its weights; the module is left out",
                        ckpt.path, name)
    motion = motion if motion_keys else None
    identity = identity if identity_keys else None
    if motion is None and motion_keys:
        embed = ckpt.tensors.get("motion.embed.0.weight")
        if embed is None or embed.ndim != 2:
            raise ValueError(
                f"{where} holds motion tensors but not motion.embed.0.weight; export it as a bundle with its run config"
            )
        motion = {"enabled": True, "hidden_dim": int(embed.shape[0]), "freq_dim": int(embed.shape[1])}
    if identity is None and identity_keys:
        raise ValueError(
            f"{where} holds identity-branch tensors but no model.identity settings; export it with its run "
            "config: ft-export ckpt=... out=<folder> format=bundle config=<stage_dir>/config.yaml"
        )
    return AdapterSpec(
        checkpoint=ckpt,
        audio_mode=mode,
        audio_expand=int(expand),
        audio_in_dim=int(proj.shape[1]),
        audio_proj_dim=int(proj.shape[0]),
        identity=identity,
        motion=motion,
        pretrained=spec.pretrained if spec else None,
        fps=spec.fps if spec else None,
        num_frames=spec.num_frames if spec else None,
    )


def check_identity(identity: dict[str, Any] | None, clip_width: int | None) -> None:
    """The identity branch must read what ft-infer gives it: CLIP tokens (``clip_width``-d) of
    the face crop or of the whole image (``model.identity.encoder=precomputed`` with ``face_dim``
    = that width), or the face crop's pixels (``arcface``). Other encoders are refused."""
    if identity is None:
        return
    encoder = identity.get("encoder", "precomputed")
    if encoder not in FACE_ENCODERS_READ:
        raise ValueError(
            f"adapters: the identity branch was trained with model.identity.encoder={encoder}; ft-infer gives it "
            "CLIP tokens of the face crop (encoder=precomputed) or the crop's pixels (encoder=arcface) only"
        )
    face_dim = identity.get("face_dim")
    if encoder == "precomputed" and clip_width is not None and face_dim is not None and int(face_dim) != int(clip_width):
        raise ValueError(
            f"adapters: the identity branch takes {face_dim}-d face features, but ft-infer feeds it CLIP tokens "
            f"({clip_width}-d)"
        )


def resolve_arcface(identity: dict[str, Any], arcface: str | Path | None) -> dict[str, Any]:
    """``model.identity`` of an ``arcface`` branch with its network at ``arcface`` (None = the path
    it was trained with); one line naming ``arcface`` when that file is not here."""
    path = arcface or identity.get("arcface_path")
    hint = "point arcface at the insightface backbone.pth the adapters were trained with"
    if not path:
        raise FileNotFoundError(f"arcface: not set and the adapters name no model.identity.arcface_path; {hint}")
    path = Path(path).expanduser()
    if not path.is_file():
        given = "" if arcface else " (the adapters' model.identity.arcface_path)"
        raise FileNotFoundError(f"arcface: no file at {path}{given}; {hint}")
    return {**identity, "arcface_path": str(path)}


def detect_face_box(image) -> list[float] | None:
    """The face box ``(x0, y0, x1, y1)`` in px of an RGB ``PIL.Image``: the extent of mediapipe's
    478 face-mesh landmarks, found by ``ft-prep``'s :class:`~ft_train.data.face.FrameAnalyzer` —
    the box ``ft-prep`` stores for training clips, so the crop around it matches training's.
    None when no face is found; several faces log a warning (the mesh takes the most prominent)."""
    from .data.face import FrameAnalyzer, stack_results

    frame = np.array(image.convert("RGB"), dtype=np.uint8)
    with FrameAnalyzer(pose_every=0) as analyze:
        result = analyze(frame, detect=True)
    if result.face is None:
        return None
    if result.num_faces > 1:
        log.warning("face: %d faces in the image; the identity branch reads the most prominent one", result.num_faces)
    return [float(v) for v in stack_results([result])["face_box"][0]]


def scale_box(box: Sequence[float] | None, size: tuple[int, int], new_size: tuple[int, int]) -> list[float] | None:
    """A pixel box of an image of ``size`` (w, h) in the pixels of its resized copy of ``new_size``."""
    if box is None:
        return None
    sx, sy = new_size[0] / size[0], new_size[1] / size[1]
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def clip_width(wan: Path) -> int | None:
    """Width of the CLIP image tokens, from ``<wan>/image_encoder/config.json`` (None if unstated)."""
    try:
        config = json.loads((wan / "image_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    width = config.get("hidden_size", (config.get("vision_config") or {}).get("hidden_size"))
    return int(width) if isinstance(width, int) else None


# ----------------------------------------------------------------------------------------------
# inputs


def check_wan_folder(wan: str | Path | None, spec: AdapterSpec | None = None) -> Path:
    """The base model folder: ``wan``, else the folder the adapters were trained on; one line
    naming ``wan`` when it is not set or lacks a part ft-infer reads."""
    if not wan:
        if spec is not None and spec.pretrained and Path(spec.pretrained).expanduser().is_dir():
            wan = spec.pretrained
            log.info("wan: using %s, the base folder the adapters were trained on", wan)
        else:
            known = ""
            if spec is not None and spec.pretrained:
                known = f" (the adapters were trained on {spec.pretrained}, which is not a folder here)"
            raise FileNotFoundError(f"wan: not set{known}; point it at {WAN_HINT}")
    root = Path(wan).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"wan: no folder {root}; point it at {WAN_HINT}")
    for part, files in WAN_NEEDS.items():
        if not any((root / part / f).is_file() for f in files):
            raise FileNotFoundError(f"wan: {root} has no {part}/ (expected {part}/{files[0]}); point it at {WAN_HINT}")
    return root


def check_wav2vec_folder(wav2vec: str | Path | None) -> Path:
    hint = "a local wav2vec2 folder (e.g. wav2vec2-base-960h)"
    if not wav2vec:
        raise FileNotFoundError(f"wav2vec: not set; point it at {hint}")
    folder = Path(wav2vec).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"wav2vec: no wav2vec2 model at {folder} (expected config.json); point it at {hint}")
    return folder


def read_image(path: str | Path, key: str = "image"):
    """An RGB ``PIL.Image``; phone photos are turned upright from their EXIF orientation (the
    pixels of a portrait shot are often stored sideways)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no file at {path}")
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{key}: cannot read {path} as an image ({exc.__class__.__name__}: {exc})") from None


def read_speech(path: str | Path, key: str = "audio") -> np.ndarray:
    """The speech as mono float32 ``(N,)`` at 16 kHz (wav2vec2's rate), from any file FFmpeg reads."""
    from .media import AUDIO_RATE, read_audio

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no file at {path}")
    try:
        wave = read_audio(path, AUDIO_RATE)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    if wave.size == 0:
        raise ValueError(f"{key}: {path} holds no audio samples")
    return wave


def image_to_tensor(image) -> torch.Tensor:
    """``PIL.Image`` RGB → ``(1, 3, H, W)`` float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)


def fit_waveform(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """``wave`` cut, or padded at the end with silence, to exactly ``num_samples``."""
    if wave.shape[0] >= num_samples:
        return wave[:num_samples]
    return np.concatenate([wave, np.zeros(num_samples - wave.shape[0], dtype=wave.dtype)])


# ----------------------------------------------------------------------------------------------
# the pipeline


class TalkingPortraitPipeline:
    """The loaded networks of ft-infer: call it once per (image, speech) pair.

    Args:
        model: :class:`~ft_train.models.FantasyTalkingDiT` with its adapters loaded, on ``device``.
        image_encoder, text_encoder, audio_encoder: the frozen encoders of
            :mod:`ft_train.models.encoders`.
        vae: :class:`~ft_train.models.vae.WanVAEDecoder` (its ``enc`` also encodes the
            first-frame condition, so the VAE is loaded once).
        sampler: :class:`~ft_train.diffusion.FlowMatchSampler`.
        device: where the DiT runs (and the encoders while they run).
        offload: the encoders and VAE live on the CPU between uses.
        face_margin: context around the face box in the identity branch's crop
            (:func:`~ft_train.data.clip_prep.face_crop_box`); the training data's ``face_margin``.
    """

    def __init__(self, model, image_encoder, text_encoder, audio_encoder, vae, sampler,
                 device: torch.device, offload: bool = False, face_margin: float = 0.2):
        self.face_margin = float(face_margin)
        self.model = model
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.audio_encoder = audio_encoder
        self.vae = vae
        self.sampler = sampler
        self.device = torch.device(device)
        self.offload = bool(offload) and self.device.type != "cpu"

    @classmethod
    def load(cls, spec: AdapterSpec, wan: str | Path, wav2vec: str | Path, sampler=None, device="auto",
             dtype: str = "auto", vae_dtype: str = "float32", vae_tiling: bool = False,
             offload: bool = False, face_margin: float = 0.2,
             compile_blocks: bool = False, frozen_fp8: bool = False) -> "TalkingPortraitPipeline":
        """Load the DiT from ``<wan>/transformer``, put ``spec``'s adapters in it, and load the
        encoders and the VAE (on the CPU when ``offload``). ``compile_blocks``: ``torch.compile``
        the DiT's blocks; ``frozen_fp8``: their linear weights in float8, quantised once on
        ``device`` (both :func:`ft_train.speed.apply`)."""
        from .diffusion import FlowMatchSampler
        from .models.vae import WanVAEDecoder
        from .models import build_model
        from .models.encoders import load_audio_encoder, load_image_encoder, load_text_encoder
        from .models.weights import check_compatible
        from .speed import SpeedOptions, apply

        device = device if isinstance(device, torch.device) else resolve_device(device)
        dtype = resolve_dtype_name(dtype, device)
        vae_dtype = resolve_dtype_name(vae_dtype, device, key="vae_dtype")
        home = torch.device("cpu") if offload else device
        check_identity(spec.identity, clip_width(Path(wan)))

        model = build_model(pretrained=str(wan), dtype=dtype, **spec.model_kwargs())
        ckpt = spec.checkpoint
        loaded = check_compatible(model, ckpt, key="adapters")
        model.load_state_dict({k: ckpt.tensors[k] for k in loaded}, strict=False)
        # The release runs its adapter in the DiT's dtype too; the adapters are ~6% of 14B.
        for module in model.adapter_modules().values():
            module.to(getattr(torch, dtype))
        model.requires_grad_(False).eval().to(device)
        apply(model, SpeedOptions(compile_blocks=compile_blocks, frozen_fp8=frozen_fp8))

        vae = WanVAEDecoder(wan, device=home, dtype=vae_dtype, key="wan")
        if vae_tiling:
            vae.enc.vae.enable_tiling()
        image_encoder = load_image_encoder(wan, device=home, dtype=dtype, key="wan")
        text_encoder = load_text_encoder(wan, device=home, dtype=dtype, key="wan")
        audio_encoder = load_audio_encoder(wav2vec, device=home, dtype=dtype, key="wav2vec")
        return cls(model, image_encoder, text_encoder, audio_encoder, vae, sampler or FlowMatchSampler(),
                   device, offload, face_margin)

    @property
    def grid(self) -> int:
        """Pixels per DiT token side: VAE stride × patch (8 × 2 = 16 for Wan2.1)."""
        patch = self.model.transformer.config.patch_size
        return self.vae.enc.spatial_stride * int(patch[1])

    @contextmanager
    def _resident(self, module):
        """``module`` on the compute device for the duration (a no-op unless offloading)."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            torch.cuda.empty_cache()

    def _text(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Prompts → ``(1, 512, text_dim)`` embeddings, zero-padded (the DiT's I2V attention
        splits image from text tokens by the count 512)."""
        from .models.adapter import TEXT_TOKENS

        with self._resident(self.text_encoder) as enc:
            embeddings = enc(list(prompts))
        out = []
        for e in embeddings:
            padded = e.new_zeros(1, TEXT_TOKENS, e.shape[-1])
            padded[0, : min(e.shape[0], TEXT_TOKENS)] = e[:TEXT_TOKENS]
            out.append(padded.to(self.device))
        return out

    def _face(self, image, face_box: Sequence[float] | None) -> torch.Tensor | None:
        """The identity branch's ``face`` for ``image`` (see the module docstring): CLIP tokens
        ``(1, N, D)`` or pixels ``(1, 3, 112, 112)`` in [-1, 1] of the crop around ``face_box``;
        None = no face (a ``precomputed`` branch then reads the CLIP image tokens)."""
        from .data.clip_prep import FACE_PIXELS_SIZE, face_crops

        identity = self.model.identity
        if identity is None:
            return None
        frame = np.asarray(image, dtype=np.uint8)[None]
        if identity.encoder.input_kind == "pixels":
            if face_box is None:
                raise ValueError(
                    f"face: the identity branch (model.identity.encoder={identity.config.encoder}) reads a face crop, "
                    "and no face box was given"
                )
            crop = face_crops(frame, [face_box], self.face_margin, FACE_PIXELS_SIZE)
            return crop.float().div(127.5).sub(1.0).to(self.device)
        if face_box is None:
            return None
        crop = face_crops(frame, [face_box], self.face_margin)
        with self._resident(self.image_encoder) as enc:
            return enc(crop.float().div(127.5).sub(1.0)).to(self.device)

    @torch.no_grad()
    def __call__(self, image, speech: np.ndarray, num_frames: int, fps: float, prompt: str = "",
                 negative_prompt: str = "", omega: tuple[float | None, float | None] = (None, None),
                 seed: int = 0, progress: bool = False, face_box: Sequence[float] | None = None) -> torch.Tensor:
        """Generate a clip.

        Args:
            image: the reference frame, an RGB ``PIL.Image`` whose sides are multiples of
                :attr:`grid` px (see :func:`target_size`).
            speech: mono float32 ``(N,)`` at 16 kHz; cut or silence-padded to ``num_frames / fps`` s.
            num_frames: video frames, 4k+1.
            fps: frames per second (sets which speech each frame's audio window sees).
            prompt, negative_prompt: text and negative text ("" = the empty prompt).
            omega: (ω_l, ω_b) in [0, 1] for the motion module; None entries = its default.
            seed: initial-noise seed (CPU generator: the same noise on every device).
            progress: a bar over the sampling steps.
            face_box: the face's box (x0, y0, x1, y1) in ``image``'s px (:func:`detect_face_box`,
                scaled), for the identity branch; None = no face (whole-image CLIP tokens for a
                ``precomputed`` branch; an ``arcface`` branch needs a box).
        Returns:
            uint8 RGB frames ``(num_frames, H, W, 3)`` on the CPU.
        """
        from .data.clip_prep import clip_audio_samples

        width, height = image.size
        if width % self.grid or height % self.grid:
            raise ValueError(
                f"image: {width}×{height} px is not a multiple of the {self.grid}-px DiT grid (use target_size)"
            )
        first = image_to_tensor(image)
        wave = fit_waveform(np.asarray(speech, dtype=np.float32), clip_audio_samples(num_frames, fps))
        with self._resident(self.audio_encoder) as enc:
            audio = enc([wave])[0][None].to(self.device)
        wants_negative = any(p.text == "neg" for p in self.sampler.passes(has_audio=True))
        texts = self._text([prompt, negative_prompt] if wants_negative else [prompt])
        with self._resident(self.image_encoder) as enc:
            clip = enc(first).to(self.device)
        with self._resident(self.vae) as vae:
            image_latents = vae.enc.encode_condition(first, num_frames).to(self.device)

        extra: dict[str, torch.Tensor] = {}
        if self.model.motion is not None:
            default = self.model.motion_config.default
            pair = [default if w is None else float(w) for w in omega]
            extra["motion"] = torch.tensor([pair], dtype=torch.float32, device=self.device)
        face = self._face(image, face_box)
        if face is not None:
            extra["face"] = face
        latents = self.sampler(
            self.model, image_latents, clip, texts[0], audio,
            negative_text=texts[1] if wants_negative else None,
            generator=torch.Generator().manual_seed(int(seed)),
            num_frames=num_frames, progress=progress, model_kwargs=extra,
        )
        with self._resident(self.vae) as vae:
            frames = vae(latents)
        return frames[0].cpu()


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
    max_frames: int = 81,
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
) -> dict[str, Any]:
    """Generate ``out`` (mp4) from ``image`` and ``audio`` with ``adapters`` (keys of
    ``conf/infer.yaml``; ``sampler`` is a built :class:`~ft_train.diffusion.FlowMatchSampler`,
    None = the released settings). ``negative_prompt`` defaults to the empty prompt here; the
    command's default (``conf/infer.yaml``) is the release's.

    Returns ``out``, ``num_frames``, ``fps``, ``width``, ``height``, ``duration`` (video, s),
    ``audio_duration`` (s), ``audio_mode``, ``motion`` (the (ω_l, ω_b) used, or None),
    ``identity`` (bool), ``face_box`` (the face crop's box in the video's px, None when the
    identity branch read the whole image or is absent), ``layout`` (of the adapters),
    ``seconds`` (wall time).
    """
    from PIL import Image

    from .media import AUDIO_RATE, write_video

    started = time.perf_counter()
    # -- checks that need nothing loaded: every one names its key
    omega = (check_omega(omega_l, "omega_l"), check_omega(omega_b, "omega_b"))
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1 or (max_frames - 1) % 4:
        raise ValueError(
            f"max_frames: must be 4k+1 (e.g. 81, 49) for the Wan VAE's temporal stride 4, got {max_frames!r}"
        )
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16:
        raise ValueError(f"max_side: must be a whole number of px >= 16, got {max_side!r}")
    if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps: must be > 0 (or null for the adapters' own), got {fps!r}")
    if face not in FACE_MODES:
        raise ValueError(f"face: must be auto (find the face in the image) or none (the whole image), got {face!r}")
    if isinstance(face_margin, bool) or not isinstance(face_margin, (int, float)) or not face_margin >= 0:
        raise ValueError(f"face_margin: must be a number >= 0 (the training data's face_margin), got {face_margin!r}")
    torch_device = resolve_device(device)
    resolve_dtype_name(dtype, torch_device)
    resolve_dtype_name(vae_dtype, torch_device, key="vae_dtype")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ValueError(f"out: {out} is a folder; give the mp4 file to write")
    picture = read_image(image, "image")
    speech = read_speech(audio, "audio")
    wav2vec_dir = check_wav2vec_folder(wav2vec)
    spec = read_adapters(adapters, audio_mode, audio_expand, ema)
    wan_dir = check_wan_folder(wan, spec)
    check_identity(spec.identity, clip_width(wan_dir))
    face_box = None
    if spec.has_identity:
        encoder = spec.identity.get("encoder", "precomputed")
        if encoder == "arcface":
            spec.identity = resolve_arcface(spec.identity, arcface)
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

    if not spec.has_motion and any(w is not None for w in omega):
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
    num_frames = frames_for_audio(duration, fps, max_frames)
    if num_frames / fps < duration - 1e-6:
        log.warning("audio: %s lasts %.2f s; the video covers its first %.2f s (max_frames=%d at %g fps); "
                    "raise max_frames for longer clips", audio, duration, num_frames / fps, max_frames, fps)
    if spec.num_frames and num_frames > spec.num_frames:
        log.info("%d frames is longer than the %d-frame clips the adapters were trained on",
                 num_frames, spec.num_frames)

    pipe = TalkingPortraitPipeline.load(spec, wan_dir, wav2vec_dir, sampler=sampler, device=torch_device,
                                        dtype=dtype, vae_dtype=vae_dtype, vae_tiling=vae_tiling, offload=offload,
                                        face_margin=face_margin, compile_blocks=compile_blocks,
                                        frozen_fp8=frozen_fp8)
    spec.checkpoint.tensors.clear()  # copied into the model; drop the (possibly memory-mapped) originals
    width, height = target_size(*picture.size, max_side, pipe.grid)
    # Found in the full-resolution photo (a sharper face for the mesh), cropped from the first frame.
    face_box = scale_box(face_box, picture.size, (width, height))
    picture = picture.resize((width, height), Image.LANCZOS)
    log.info("%d×%d px, %d frames at %g fps (%.2f s), %s-level audio, %d steps on %s",
             width, height, num_frames, fps, num_frames / fps, spec.audio_mode, pipe.sampler.steps, torch_device)
    frames = pipe(picture, speech, num_frames, fps, prompt=prompt, negative_prompt=negative_prompt,
                  omega=omega, seed=seed, progress=progress, face_box=face_box)
    write_video(out, frames.numpy(), fps, audio=speech)
    used = None
    if pipe.model.motion is not None:
        used = [pipe.model.motion_config.default if w is None else w for w in omega]
    return {
        "out": str(out),
        "num_frames": int(frames.shape[0]),
        "fps": fps,
        "width": width,
        "height": height,
        "duration": frames.shape[0] / fps,
        "audio_duration": min(duration, frames.shape[0] / fps),
        "audio_mode": spec.audio_mode,
        "motion": used,
        "identity": spec.has_identity,
        "face_box": face_box,
        "layout": spec.checkpoint.layout,
        "seconds": time.perf_counter() - started,
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
    return (f"ft-infer: wrote {result['out']} ({result['width']}×{result['height']}, {result['num_frames']} frames at "
            f"{result['fps']:g} fps = {result['duration']:.2f} s, {result['audio_mode']}-level audio{motion}, "
            f"adapters: {result['layout']}, {result['seconds']:.0f} s)")


TOOL = Tool("ft-infer", "infer", __doc__, EXAMPLE, run=lambda cfg: infer(**cfg), report=_report, build=build_sampler)
main = TOOL.main  # console entry point: ``ft-infer key=value ...`` (keys of ``conf/infer.yaml``)


if __name__ == "__main__":
    sys.exit(main())
