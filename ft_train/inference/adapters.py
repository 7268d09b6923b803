"""What trained adapters need at inference: the model they belong to (read through the model
spec, whatever the file's layout) and, for the identity branch, the face its input comes from."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..models.lora import is_lora_key
from ..models.weights import AdapterCheckpoint
from ..spec import ModelSpec

log = logging.getLogger("ft_train.infer")

RELEASE_FPS = 23.0          # the released inference's --fps default (its infer.py)
RELEASE_AUDIO_MODE = "frame"  # the released code always cuts per-latent-frame audio windows
RELEASE_EXPAND = 4          # ... widened by 4 tokens per side
FACE_ENCODERS_READ = ("precomputed", "arcface")  # identity encoders whose input ft-infer can make

# ----------------------------------------------------------------------------------------------
# what the adapters need


@dataclass
class AdapterSpec:
    """The adapters' tensors and the model they belong to.

    Attributes:
        checkpoint: the tensors (this project's naming) and what the file says about itself.
        spec: the model to rebuild around them (:class:`~ft_train.spec.ModelSpec`): what the file
            says, with the audio widths read from the projector's weight, the caller's audio
            mode / widening, and only the identity / motion modules whose tensors are here.
    """

    checkpoint: AdapterCheckpoint
    spec: ModelSpec

    @property
    def has_motion(self) -> bool:
        return self.spec.motion is not None

    @property
    def has_identity(self) -> bool:
        return self.spec.identity is not None

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`ft_train.models.build_model` (besides the backbone)."""
        return self.spec.model_kwargs()


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
    from ..models.weights import AUDIO_PROJ_PREFIX, read_checkpoint, with_ema
    from ..spec import read_spec

    ckpt = read_checkpoint(path, key="adapters")
    if ema:
        ckpt = with_ema(ckpt, key="ema")
    where = f"adapters: {ckpt.path}"
    proj = ckpt.tensors.get(f"{AUDIO_PROJ_PREFIX}proj.weight")
    if proj is None or proj.ndim != 2:
        raise ValueError(f"{where} holds no audio adapter ({AUDIO_PROJ_PREFIX}proj.weight is missing)")
    found = read_spec(ckpt)  # the one reader of every layout's model description
    mode = audio_mode or (found.audio_mode if found else None) or ckpt.meta.get("audio_mode")
    if mode is None:
        mode = RELEASE_AUDIO_MODE
        if ckpt.layout != "official":
            log.info("adapters: %s does not say its audio mode; using %s (the release's)", ckpt.path, mode)
    expand = audio_expand if audio_expand is not None else (found.audio_expand if found else RELEASE_EXPAND)
    audio = {"audio_mode": mode, "audio_expand": expand,  # ModelSpec checks both, naming the key
             "audio_in_dim": int(proj.shape[1]), "audio_proj_dim": int(proj.shape[0])}
    spec = replace(found, **audio) if found else ModelSpec(**audio)

    motion_keys = [k for k in ckpt.tensors if k.startswith("motion.")]
    identity_keys = [k for k in ckpt.tensors if k.startswith(("identity.", "face_kv."))]
    for name, section, keys in (("motion", spec.motion, motion_keys), ("identity", spec.identity, identity_keys)):
        if section is not None and not keys:
            log.warning("adapters: %s enables model.%s but holds none of its weights; the module is left out",
                        ckpt.path, name)
    motion = spec.motion if motion_keys else None
    identity = spec.identity if identity_keys else None
    lora_keys = [k for k in ckpt.tensors if is_lora_key(k)]
    if spec.lora is not None and not lora_keys:
        log.warning("adapters: %s enables model.lora but holds none of its weights; the LoRA is left out", ckpt.path)
    if spec.lora is None and lora_keys:
        raise ValueError(
            f"{where} holds LoRA tensors but no model.lora settings (alpha sets their scale); export it with its run "
            "config: ft-export ckpt=... out=<folder> format=bundle config=<stage_dir>/config.yaml"
        )
    lora = spec.lora if lora_keys else None
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
    return AdapterSpec(checkpoint=ckpt, spec=replace(spec, identity=identity, motion=motion, lora=lora))


def check_lora_options(lora_scale: Any, extra_lora: Any, extra_lora_scale: Any) -> list[Path]:
    """ft-infer's LoRA keys, before anything is loaded: the scales are numbers, every
    ``extra_lora`` file exists and holds a LoRA. Returns the extra files."""
    import math

    for key, value in (("lora_scale", lora_scale), ("extra_lora_scale", extra_lora_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key}: must be a number (1 = as trained, 0 = off), got {value!r}")
    from ..models.lora import is_lora_file

    paths = [] if extra_lora in (None, "") else [extra_lora] if isinstance(extra_lora, (str, Path)) else list(extra_lora)
    out = []
    for path in paths:
        path = Path(str(path)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"extra_lora: no file at {path}; give a diffusers-format Wan LoRA (.safetensors)")
        if not is_lora_file(path):
            raise ValueError(f"extra_lora: {path} is not a LoRA .safetensors file (no lora_A / lora_down tensors)")
        out.append(path)
    return out


def apply_loras(model, lora_scale: float = 1.0, extra_lora: Sequence[str | Path] = (), extra_lora_scale: float = 1.0,
                dtype=None) -> dict[str, float]:
    """The LoRAs of an inference model: the adapters' own (``model.lora``, weighted ``lora_scale``)
    and each ``extra_lora`` file (diffusers' loader; weighted ``extra_lora_scale``), all in
    ``dtype``. Returns the active adapters and their weights (diffusers' ``set_adapters``)."""
    from ..models.lora import ADAPTER, add_extra_lora, read_lora_file, set_lora_scales

    scales: dict[str, float] = {}
    if model.lora_config.enabled:
        scales[ADAPTER] = float(lora_scale)
    elif lora_scale != 1.0:
        log.warning("lora_scale: the adapters carry no LoRA (model.lora); lora_scale=%g is ignored", lora_scale)
    for i, path in enumerate(extra_lora):
        lora = read_lora_file(path, "extra_lora")
        blocks = {int(k.split(".")[2]) for k in lora.tensors}
        if max(blocks) >= model.num_blocks:
            raise ValueError(f"extra_lora: {path} has layers for {max(blocks) + 1} blocks, the model has "
                             f"{model.num_blocks} (a LoRA of another model size?)")
        add_extra_lora(model.transformer, lora, f"extra_{i}")
        scales[f"extra_{i}"] = float(extra_lora_scale)
        log.info("extra_lora: %s (rank %d, %d layers) at weight %g", path, lora.rank, len(lora.layers), extra_lora_scale)
    if scales:
        set_lora_scales(model.transformer, scales)
        if dtype is not None:
            for name, param in model.transformer.named_parameters():
                if is_lora_key(name):
                    param.data = param.data.to(dtype)
    return scales


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
    from ..data.face import FrameAnalyzer, stack_results

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
