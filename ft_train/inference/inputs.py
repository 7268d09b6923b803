"""ft-infer's inputs, checked before anything loads: sizes, frame counts, devices and dtypes,
the base-weight folders, the photo and the speech."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..spec import ModelSpec

log = logging.getLogger("ft_train.infer")

MIN_FRAMES = 5              # one latent frame after the reference frame
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}
# Sub-folders of a diffusers Wan2.1-I2V folder ft-infer reads, and the file each must hold.
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
# inputs


def check_wan_folder(wan: str | Path | None, spec: ModelSpec | None = None) -> Path:
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


def check_wav2vec_folder(wav2vec: str | Path | None, key: str = "wav2vec") -> Path:
    hint = "a local wav2vec2 folder (e.g. wav2vec2-base-960h)"
    if not wav2vec:
        raise FileNotFoundError(f"{key}: not set; point it at {hint}")
    folder = Path(wav2vec).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{key}: no wav2vec2 model at {folder} (expected config.json); point it at {hint}")
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
    from ..media import AUDIO_RATE, read_audio

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
