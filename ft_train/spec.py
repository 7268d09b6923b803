"""The model a set of adapter weights needs: one typed description, one writer, one reader.

ft-train writes it beside every checkpoint (``model_spec.json`` in each step folder), ft-export
into every bundle (``adapter.json``'s ``spec``), and ft-export, ft-infer and ``stage.init_from``
read it back through :func:`read_spec`, whatever the layout: a step folder, a bundle (of this
format or the first one, which kept the run's ``model`` config and an ``audio`` section), or an
older step folder with only its run's ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .models.identity import IdentityConfig
from .models.lora import LoraSettings
from .models.motion import MotionConfig
from .models.weights import AdapterCheckpoint

log = logging.getLogger(__name__)

SPEC_FILE = "model_spec.json"
# 1: audio, identity, motion, backbone shape; 2: + ``lora`` (written only when the run has one,
# so specs without a LoRA stay readable by an ft_train that knows version 1 only).
SPEC_VERSION = 2
AUDIO_MODES = ("clip", "frame")


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds the network around trained adapters.

    Attributes:
        audio_mode: ``clip`` (every video token sees the whole clip's audio) or ``frame`` (each
            latent frame sees its own window); the network's mode when the weights were saved.
        audio_in_dim: speech-encoder width (768 for wav2vec2-base).
        audio_proj_dim: width of the projected audio tokens (2048 in the release).
        audio_expand: frame mode's window widening per side, in audio tokens.
        identity, motion: the complete ``model.identity`` / ``model.motion`` settings when the
            run had the module, else None.
        transformer: the backbone's diffusers config (its shape), when the run built it from one.
        pretrained: the base folder the adapters were trained on, when known.
        fps, num_frames: the training clips' frame rate and length, when known.
        lora: the complete ``model.lora`` settings when the run trained a LoRA on the DiT, else None.
    """

    audio_mode: str
    audio_in_dim: int
    audio_proj_dim: int
    audio_expand: int
    identity: dict[str, Any] | None = None
    motion: dict[str, Any] | None = None
    transformer: dict[str, Any] | None = None
    pretrained: str | None = None
    fps: float | None = None
    num_frames: int | None = None
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.audio_mode not in AUDIO_MODES:
            raise ValueError(f"audio_mode: {self.audio_mode!r} is not one of {AUDIO_MODES}")
        if isinstance(self.audio_expand, bool) or not isinstance(self.audio_expand, int) or self.audio_expand < 0:
            raise ValueError(f"audio_expand: must be a whole number of tokens >= 0, got {self.audio_expand!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["lora"] is None:
            del data["lora"]
            return {"version": 1, **data}
        return {"version": SPEC_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> "ModelSpec":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: not a model spec (a JSON object)")
        version = data.get("version", SPEC_VERSION)
        if not isinstance(version, int) or version > SPEC_VERSION:
            raise ValueError(f"{where}: model spec version {version!r}; this ft_train reads up to {SPEC_VERSION} (upgrade ft_train)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            raise ValueError(f"{where}: unknown model spec keys {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_run_config(cls, cfg: dict[str, Any], audio_mode: str | None = None,
                        data_stats: dict[str, Any] | None = None) -> "ModelSpec":
        """From an ft-train config (resolved, as a dict): its ``model`` section, ``audio_mode``
        (the network's, saved in the checkpoint; else ``model.audio_mode``), and the training
        clips' fps from ``data.fps`` or the shards' ``stats.json`` (``data_stats``)."""
        model = dict(cfg.get("model") or {})
        data = dict(cfg.get("data") or {})
        mode = audio_mode or model.get("audio_mode")
        if mode is None:
            raise ValueError("the run's audio mode is unknown (neither the checkpoint nor model.audio_mode says it)")
        pretrained = model.get("pretrained")
        fps = next((float(v) for v in (data.get("fps"), (data_stats or {}).get("fps"))
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0), None)
        frames = data.get("num_frames") or (data_stats or {}).get("num_frames")
        return cls(
            audio_mode=mode,
            audio_in_dim=int(model.get("audio_in_dim", 768)),
            audio_proj_dim=int(model.get("audio_proj_dim", 2048)),
            audio_expand=int(model.get("audio_expand", 4)),
            identity=_section(IdentityConfig, model.get("identity")),
            motion=_section(MotionConfig, model.get("motion")),
            transformer=dict(model["transformer"]) if isinstance(model.get("transformer"), dict) else None,
            pretrained=str(pretrained) if isinstance(pretrained, str) and "${" not in pretrained else None,
            fps=fps,
            num_frames=int(frames) if isinstance(frames, int) and not isinstance(frames, bool) else None,
            lora=lora_section(model.get("lora")),
        )

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``build_model`` besides the backbone."""
        return {"audio_mode": self.audio_mode, "audio_in_dim": self.audio_in_dim,
                "audio_proj_dim": self.audio_proj_dim, "audio_expand": self.audio_expand,
                "identity": self.identity, "motion": self.motion, "lora": self.lora}


def _section(cls, section: Any) -> dict[str, Any] | None:
    """A complete identity / motion section (every key, defaults filled) when enabled, else None."""
    if not isinstance(section, dict) or not section.get("enabled"):
        return None
    return cls.from_dict(section).to_dict()


def lora_section(section: Any) -> dict[str, Any] | None:
    """A complete ``model.lora`` section (every key) when its rank is > 0, else None."""
    if section is None:
        return None
    settings = LoraSettings.from_dict(dict(section) if isinstance(section, dict) else section)
    return settings.to_dict() if settings.enabled else None


def write_spec(folder: str | Path, spec: ModelSpec) -> Path:
    path = Path(folder) / SPEC_FILE
    path.write_text(json.dumps(spec.to_dict(), indent=1))
    return path


# -- reading ------------------------------------------------------------------------------------
def find_run_config(ckpt_path: str | Path) -> Path | None:
    """The run's ``config.yaml``: in the stage folder above ``<stage_dir>/checkpoints/step-XXXXXXXX[/model.ckpt]``."""
    ckpt_path = Path(ckpt_path)
    here = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    for folder in [here, *here.parents][:4]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def load_run_config(path: str | Path) -> dict[str, Any]:
    """An ft-train ``config.yaml`` as a dict; one-line errors naming the file."""
    from omegaconf import OmegaConf

    path = Path(path)
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:
        raise ValueError(f"config: cannot read {path} as YAML ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ValueError(f"config: {path} has no `model` section; pass the run's config.yaml (written by ft-train)")
    return cfg


def stats_beside_shards(run_cfg: dict[str, Any]) -> Path | None:
    """The ``stats.json`` that ft-prep (and the encode pass, copying it) wrote beside the run's
    ``data.shards`` when that is a folder; raw mode reads the same file when ``data.stats`` is null."""
    shards = (run_cfg.get("data") or {}).get("shards")
    if not isinstance(shards, str) or "${" in shards:
        return None
    path = Path(shards).expanduser() / "stats.json"
    return path if path.is_file() else None


def read_data_stats(run_cfg: dict[str, Any], stats: str | Path | None = None) -> dict[str, Any] | None:
    """The run's ω statistics (ft-prep's ``stats.json``): ``stats``, else ``data.stats``, else the
    file beside ``data.shards``; None when there is none."""
    path = stats or (run_cfg.get("data") or {}).get("stats") or stats_beside_shards(run_cfg)
    if not path:
        return None
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"stats: no file at {path} (ft-prep writes stats.json next to the shards)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"stats: {path} is not valid JSON ({exc})") from exc


def read_spec(ckpt: AdapterCheckpoint, config: str | Path | None = None) -> ModelSpec | None:
    """The spec of ``ckpt``'s adapters: from ``config`` (a run's ``config.yaml``) when given, a
    bundle's ``adapter.json``, a step folder's ``model_spec.json`` or the run's ``config.yaml``
    above it; None for files that carry none (the released checkpoint, a bare state dict)."""
    if config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"config: no file at {path}")
        cfg = load_run_config(path)
        return ModelSpec.from_run_config(cfg, ckpt.meta.get("audio_mode"), _stats_or_none(cfg))
    if ckpt.layout == "bundle":
        info = ckpt.meta["bundle"]
        if "spec" in info:
            return ModelSpec.from_dict(info["spec"], where=f"{ckpt.path}/adapter.json")
        # format_version 1: the run's model config, and the data settings under "audio".
        audio = dict(info.get("audio") or {})
        return ModelSpec.from_run_config({"model": {**(info.get("model") or {}), "audio_expand": audio.get(
            "expand", (info.get("model") or {}).get("audio_expand", 4))}, "data": audio},
            info.get("audio_mode") or audio.get("mode"), info.get("data_stats"))
    if ckpt.layout not in ("lightning", "deepspeed"):
        return None
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    for candidate in (folder / SPEC_FILE, folder.parent / SPEC_FILE):
        if candidate.is_file():
            try:
                return ModelSpec.from_dict(json.loads(candidate.read_text()), where=str(candidate))
            except ValueError as exc:
                raise ValueError(f"{candidate}: {exc}") from None
    path = find_run_config(ckpt.path)  # a step folder written before model_spec.json existed
    if path is None:
        return None
    cfg = load_run_config(path)
    return ModelSpec.from_run_config(cfg, ckpt.meta.get("audio_mode"), _stats_or_none(cfg))


def _stats_or_none(cfg: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return read_data_stats(cfg)
    except (FileNotFoundError, ValueError) as exc:
        log.warning("%s; the training clips' fps is read from the config alone", exc)
        return None
