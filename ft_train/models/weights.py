"""Adapter weights in and out of a :class:`FantasyTalkingDiT`: every checkpoint layout we read.

:func:`read_checkpoint` recognises a checkpoint by its content (not its name) and returns its
tensors in this project's naming — the keys of ``FantasyTalkingDiT.state_dict()``
(``audio_proj.proj.weight``, ``audio_kv.{i}.k_proj.weight``, ``transformer.…``) — so loading and
exporting deal with one naming only. Layouts:

``lightning``
    A Lightning ``.ckpt`` file written by ``ft-train``: ``state_dict`` holds the trainable tensors
    under ``net.``; ``checkpoint["ft_train"] = {"stage", "audio_mode"}``; ``global_step``. Also
    a step folder ``step-XXXXXXXX/`` holding it as ``model.ckpt``.
``official``
    The released ``fantasytalking_model.ckpt`` (acvlab/FantasyTalking on Hugging Face): a ``torch.save``d dict
    ``{"proj_model": {"proj.weight", "norm.weight", "norm.bias"}, "audio_processor":
    {"blocks.{i}.cross_attn.processor.{k,v}_proj.weight"}}`` (original Wan block naming, where
    diffusers says ``attn2``), or the same as ``.safetensors`` with flat ``proj_model.`` /
    ``audio_processor.`` prefixes (what the official loader also accepts).
``bundle``
    An ``ft-export format=bundle`` folder: ``adapter.safetensors`` (this project's naming) and
    ``adapter.json`` (the model spec, step, data statistics; :data:`BUNDLE_VERSION`).
``state_dict``
    A bare dict of tensors in this project's naming (with or without ``net.``).

``deepspeed``
    A DeepSpeed ZeRO-2/3 checkpoint folder (``step-XXXXXXXX/model.ckpt/`` under a DeepSpeed
    strategy): the trainable fp32 master weights, gathered on CPU with DeepSpeed's ``zero_to_fp32``.
"""

from __future__ import annotations

import json
import logging
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fantasytalking import FantasyTalkingDiT
from .lora import is_lora_key

log = logging.getLogger(__name__)

NET_PREFIX = "net."
EMA_KEY = "ft_train_ema"  # where ft_train.lit.ema.AdapterEMA saves its average in a checkpoint
# The released file's two sub-dicts, and the flat prefixes of its safetensors form.
OFFICIAL_PROJ = "proj_model"
OFFICIAL_AUDIO = "audio_processor"
AUDIO_PROJ_PREFIX = "audio_proj."
AUDIO_KV_KEY = re.compile(r"^audio_kv\.(\d+)\.([kv])_proj\.weight$")
OFFICIAL_KV_KEY = re.compile(r"^blocks\.(\d+)\.cross_attn\.processor\.([kv])_proj\.weight$")
# Optional modules (FantasyTalkingDiT.adapter_modules) by the config section that switches them,
# with the prefixes of their tensors. A checkpoint without any tensor of one (the released file,
# or a run trained without it) leaves that module at its zero-initialised start.
OPTIONAL_MODULES = {"model.identity": ("identity.", "face_kv."), "model.motion": ("motion.",)}
# The trained LoRA on the DiT (model.lora): optional like them, its tensors known by name, not prefix.
LORA_SECTION = "model.lora"


def optional_section(name: str) -> str | None:
    """The config section of an optional module (identity, motion, the LoRA) that tensor ``name``
    belongs to; None for the audio adapter and the backbone."""
    if is_lora_key(name):
        return LORA_SECTION
    return next((s for s, p in OPTIONAL_MODULES.items() if name.startswith(p)), None)


# Bundle folder (ft-export format=bundle).
BUNDLE_FORMAT = "ft_train.adapter"
# 1: the run's model config + an audio section; 2: one model spec (ft_train.spec.ModelSpec).
BUNDLE_VERSION = 2
BUNDLE_WEIGHTS = "adapter.safetensors"
BUNDLE_CONFIG = "adapter.json"
# The Lightning file inside an ft-train step folder (ft_train/lit/checkpointing.py: CKPT_NAME);
# repeated here because models/ must not import Lightning code.
STEP_CKPT_NAME = "model.ckpt"


@dataclass
class AdapterCheckpoint:
    """Tensors of a checkpoint in this project's naming, with what the file says about itself.

    Attributes:
        path: the file or folder read.
        layout: ``lightning`` | ``official`` | ``bundle`` | ``state_dict`` | ``deepspeed``.
        tensors: ``FantasyTalkingDiT.state_dict()`` names → tensors (CPU, possibly memory-mapped).
        meta: ``stage``, ``audio_mode``, ``global_step`` when known; a bundle's whole JSON under
            ``bundle``.
        ema: the run's average of the trained tensors (``callbacks.ema``), same names; empty
            when the checkpoint holds none.
    """

    path: Path
    layout: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)


# -- naming ------------------------------------------------------------------------------------
def is_audio_key(name: str) -> bool:
    """True for tensors of the audio adapter (the part the official format can carry)."""
    return name.startswith(AUDIO_PROJ_PREFIX) or AUDIO_KV_KEY.match(name) is not None


def audio_block_count(tensors: dict[str, Any]) -> int:
    """Number of blocks with audio k/v projections (highest block index + 1; 0 if none)."""
    blocks = [int(m.group(1)) for k in tensors if (m := AUDIO_KV_KEY.match(k))]
    return max(blocks) + 1 if blocks else 0


def to_official(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The released nested layout ``{"proj_model": …, "audio_processor": …}`` of the audio tensors
    in ``tensors`` (this project's naming); other tensors are left out."""
    proj, audio = {}, {}
    for name, value in tensors.items():
        if name.startswith(AUDIO_PROJ_PREFIX):
            proj[name[len(AUDIO_PROJ_PREFIX):]] = value
        elif m := AUDIO_KV_KEY.match(name):
            audio[f"blocks.{m.group(1)}.cross_attn.processor.{m.group(2)}_proj.weight"] = value
    return {OFFICIAL_PROJ: proj, OFFICIAL_AUDIO: audio}


def from_official(nested: dict[str, dict[str, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_official`; ``where`` (``"key: path"``) prefixes the error for a key
    the released layout does not have."""
    out = {}
    for name, value in nested[OFFICIAL_PROJ].items():
        out[AUDIO_PROJ_PREFIX + name] = value
    for name, value in nested[OFFICIAL_AUDIO].items():
        m = OFFICIAL_KV_KEY.match(name)
        if m is None:
            raise ValueError(
                f"{where}: unexpected key {OFFICIAL_AUDIO}[{name!r}] in an official-layout checkpoint "
                "(expected blocks.<i>.cross_attn.processor.{k,v}_proj.weight)"
            )
        out[f"audio_kv.{m.group(1)}.{m.group(2)}_proj.weight"] = value
    return out


def flatten_official(nested: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The released ``.safetensors`` form: ``proj_model.proj.weight``, ``audio_processor.blocks…``."""
    return {f"{group}.{name}": value for group, sd in nested.items() for name, value in sd.items()}


# -- reading -----------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, key: str = "init_from") -> AdapterCheckpoint:
    """Read any layout in the module docstring. ``key`` (the config key that named the file)
    starts every error message, which is one line naming the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}: no checkpoint at {path}")
    if path.is_dir():
        return _read_directory(path, key)
    if path.name in (BUNDLE_CONFIG, BUNDLE_WEIGHTS) and (path.parent / BUNDLE_CONFIG).is_file():
        return _read_bundle(path.parent, key)
    if _is_safetensors(path):
        return _from_flat(path, _load_safetensors(path, key), key)
    return _from_torch(path, key)


def with_ema(checkpoint: AdapterCheckpoint, key: str = "ema") -> AdapterCheckpoint:
    """``checkpoint`` with its trained tensors replaced by the run's average of them
    (``callbacks.ema``); ``key`` (the setting that asked for it) starts the error when it has none."""
    if not checkpoint.ema:
        raise ValueError(
            f"{key}: {checkpoint.path} holds no EMA average (a run keeps one with callbacks.ema.decay > 0, "
            f"e.g. 0.9999); use its weights with {key}=false"
        )
    foreign = sorted(set(checkpoint.ema) - set(checkpoint.tensors))
    if foreign:
        raise ValueError(f"{key}: {checkpoint.path}'s average has tensors its weights lack (first: {foreign[0]})")
    return dataclasses.replace(checkpoint, tensors={**checkpoint.tensors, **checkpoint.ema})


def read_state_dict(path: str | Path, key: str = "init_from") -> dict[str, torch.Tensor]:
    """The tensors of any readable checkpoint, in this project's naming (``net.`` removed)."""
    return read_checkpoint(path, key).tensors


def _read_directory(path: Path, key: str) -> AdapterCheckpoint:
    if (path / BUNDLE_CONFIG).is_file():
        return _read_bundle(path, key)
    if (path / STEP_CKPT_NAME).exists():  # an ft-train step folder: read what it holds
        return read_checkpoint(path / STEP_CKPT_NAME, key)
    if (path / "latest").is_file() or (path / "checkpoint").is_dir() or any(path.glob("*model_states.pt")):
        return _read_deepspeed(path, key)
    raise ValueError(
        f"{key}: {path} is a folder but neither an ft-export bundle ({BUNDLE_CONFIG} + {BUNDLE_WEIGHTS}) "
        f"nor an ft-train step folder ({STEP_CKPT_NAME})"
    )


# Prefixes DeepSpeed/Lightning put in front of the LightningModule's own parameter names.
_ENGINE_PREFIXES = ("_forward_module.", "module.")


def _read_deepspeed(path: Path, key: str) -> AdapterCheckpoint:
    """A DeepSpeed ZeRO-2/3 checkpoint folder (what ``ft-train`` writes under a DeepSpeed strategy
    as ``step-XXXXXXXX/model.ckpt/``): the fp32 master weights of the trainable tensors, gathered
    from every rank's shards on CPU with DeepSpeed's own ``zero_to_fp32``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), exclude_frozen_parameters=True)
    except Exception as exc:
        raise ValueError(f"{key}: cannot gather the DeepSpeed checkpoint {path} ({_first_line(exc)})") from exc
    tensors = {}
    for name, value in state.items():
        for prefix in _ENGINE_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        tensors[name[len(NET_PREFIX):] if name.startswith(NET_PREFIX) else name] = value
    meta: dict[str, Any] = {}
    ema: dict[str, torch.Tensor] = {}
    states = sorted(path.glob("*/mp_rank_00_model_states.pt")) + sorted(path.glob("mp_rank_00_model_states.pt"))
    if states:  # Lightning's client state (step, stage, the EMA) sits beside the module weights
        try:
            client = torch.load(states[0], map_location="cpu", weights_only=False)
            meta = dict(client.get("ft_train") or {})
            if "global_step" in client:
                meta["global_step"] = int(client["global_step"])
            ema = _ema_of(client)
        except Exception as exc:  # the weights are what matter; the metadata is a bonus
            log.warning("%s: could not read DeepSpeed client state from %s (%s)", key, states[0], _first_line(exc))
    return AdapterCheckpoint(path, "deepspeed", tensors, meta, ema)


def _ema_of(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``callbacks.ema`` average a Lightning checkpoint (or DeepSpeed client state) holds."""
    state = checkpoint.get(EMA_KEY)
    weights = state.get("weights") if isinstance(state, dict) else None
    return dict(weights) if isinstance(weights, dict) else {}


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _load_safetensors(path: Path, key: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"{key}: cannot read {path} as safetensors ({_first_line(exc)})") from exc


def _torch_load(path: Path, key: str) -> Any:
    """``torch.load`` on CPU, tensors-only (``weights_only``: never run code from a downloaded
    file), memory-mapped when the file allows it (a 14B training checkpoint holds ~10 GB of
    optimiser state that export and import never touch)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        pass  # e.g. the legacy (non-zip) torch format cannot be memory-mapped; read it whole
    except Exception as exc:
        raise ValueError(f"{key}: cannot read {path} as a torch checkpoint ({_first_line(exc)})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{key}: cannot read {path} as a torch checkpoint ({_first_line(exc)})") from exc


def _first_line(exc: Exception) -> str:
    """A one-line cause; torch's many-line weights-only message reduced to what went wrong."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            return f"it holds pickled Python objects ({found.group(1)}), and only tensors are read from checkpoints"
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return f"unreadable pickle: {found.group(1).strip() if found else 'unknown error'}"
    lines = text.strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0] if lines else 'empty or truncated file'}"


def _from_torch(path: Path, key: str) -> AdapterCheckpoint:
    obj = _torch_load(path, key)
    if not isinstance(obj, dict):
        raise ValueError(f"{key}: {path} holds a {type(obj).__name__}, not a checkpoint dict")
    if isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
        tensors = {k[len(NET_PREFIX):] if k.startswith(NET_PREFIX) else k: v for k, v in state.items()}
        meta = dict(obj.get("ft_train") or {})
        if "global_step" in obj:
            meta["global_step"] = int(obj["global_step"])
        return AdapterCheckpoint(path, "lightning", tensors, meta, _ema_of(obj))
    if isinstance(obj.get(OFFICIAL_PROJ), dict) and isinstance(obj.get(OFFICIAL_AUDIO), dict):
        nested = {OFFICIAL_PROJ: obj[OFFICIAL_PROJ], OFFICIAL_AUDIO: obj[OFFICIAL_AUDIO]}
        return AdapterCheckpoint(path, "official", from_official(nested, f"{key}: {path}"))
    return _from_flat(path, obj, key)


def _from_flat(path: Path, flat: dict[str, Any], key: str) -> AdapterCheckpoint:
    """A flat name → tensor dict: the official safetensors form, or our own naming."""
    if flat and all(isinstance(v, torch.Tensor) for v in flat.values()):
        groups = {k.split(".", 1)[0] for k in flat}
        if groups <= {OFFICIAL_PROJ, OFFICIAL_AUDIO} and all("." in k for k in flat):
            nested: dict[str, dict[str, torch.Tensor]] = {OFFICIAL_PROJ: {}, OFFICIAL_AUDIO: {}}
            for k, v in flat.items():
                group, name = k.split(".", 1)
                nested[group][name] = v
            return AdapterCheckpoint(path, "official", from_official(nested, f"{key}: {path}"))
        tensors = {k[len(NET_PREFIX):] if k.startswith(NET_PREFIX) else k: v for k, v in flat.items()}
        if any(is_audio_key(k) for k in tensors):
            return AdapterCheckpoint(path, "state_dict", tensors)
    sample = ", ".join(sorted(map(str, flat))[:4]) or "nothing"
    raise ValueError(
        f"{key}: {path} has an unknown layout (top-level keys: {sample}); expected an ft-train Lightning "
        "checkpoint, the released fantasytalking_model.ckpt layout or an ft-export bundle"
    )


def _read_bundle(folder: Path, key: str) -> AdapterCheckpoint:
    config_path, weights_path = folder / BUNDLE_CONFIG, folder / BUNDLE_WEIGHTS
    try:
        info = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{key}: {config_path} is not valid JSON ({exc})") from exc
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{key}: {config_path} is not an ft_train adapter bundle (format should be {BUNDLE_FORMAT!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_VERSION:
        raise ValueError(
            f"{key}: {config_path} has bundle format_version {version!r}; this ft_train reads up to {BUNDLE_VERSION} (upgrade ft_train)"
        )
    if not weights_path.is_file():
        raise FileNotFoundError(f"{key}: bundle {folder} lacks {BUNDLE_WEIGHTS}")
    tensors = _load_safetensors(weights_path, key)
    meta = {k: info.get(k) for k in ("stage", "audio_mode", "global_step")}  # format_version 1
    if isinstance(info.get("spec"), dict):  # format_version 2: the model spec holds the audio mode
        meta["audio_mode"] = info["spec"].get("audio_mode")
    meta["bundle"] = info
    return AdapterCheckpoint(folder, "bundle", tensors, meta)


# -- loading into a model ----------------------------------------------------------------------
def check_compatible(model: FantasyTalkingDiT, ckpt: AdapterCheckpoint, key: str = "init_from") -> list[str]:
    """Names of ``ckpt``'s tensors that ``model`` has; raise one line naming the file otherwise.

    Checked in this order, so the message names the cause: the number of blocks with audio
    layers (a 14B checkpoint has 40, the 1.3B shape 30), missing adapter tensors, shapes.

    The audio adapter must be complete. An optional module the model has (identity: Q-Former +
    ``face_kv``; motion) may be absent from the checkpoint *as a whole* — the released file never
    has them, and a run trained without them is a valid start — and then keeps its fresh,
    zero-initialised state (logged); a checkpoint holding only part of one is an error.
    """
    path = ckpt.path
    own = model.state_dict()
    blocks = audio_block_count(ckpt.tensors)
    if blocks and blocks != model.num_blocks:
        raise ValueError(
            f"{key}: {path} has audio layers for {blocks} blocks, the model has {model.num_blocks} "
            "(a checkpoint of another model size? Wan2.1-14B has 40 blocks)"
        )
    required = set(model.adapter_state_dict())
    fresh = []
    for section in [*OPTIONAL_MODULES, LORA_SECTION]:
        keys = {k for k in required if optional_section(k) == section}
        if keys and not any(optional_section(k) == section for k in ckpt.tensors):
            required -= keys
            fresh.append(section)
    missing = sorted(required - ckpt.tensors.keys())
    if missing:
        section = optional_section(missing[0])
        hint = f" (a partial {section} module: was it trained with other {section} settings?)" if section else ""
        raise KeyError(
            f"{key}: {path} ({ckpt.layout} layout) lacks {len(missing)} adapter tensors the model has "
            f"(first: {missing[0]}){hint}"
        )
    if fresh:
        log.log(
            logging.INFO if ckpt.layout == "official" else logging.WARNING,
            "%s: %s has no %s weights; %s start%s from the zero-initialised state (no effect until trained)",
            key, path, " / ".join(fresh), " and ".join(fresh), "" if len(fresh) > 1 else "s",
        )
    usable = []
    for name, value in ckpt.tensors.items():
        if name not in own:
            continue
        if own[name].shape != value.shape:
            section = optional_section(name)
            cause = f"{section} settings differ?" if section else "checkpoint from another model size?"
            raise ValueError(
                f"{key}: {path} has {name} of shape {tuple(value.shape)}, the model expects {tuple(own[name].shape)} "
                f"({cause})"
            )
        usable.append(name)
    unused = sorted(ckpt.tensors.keys() - own.keys())
    if unused:
        log.warning("%s: %s holds %d tensors this model has no place for, ignored (first: %s)", key, path, len(unused), unused[0])
    return usable


def load_adapter_weights(model: FantasyTalkingDiT, path: str | Path, key: str = "init_from") -> list[str]:
    """Copy every adapter tensor from ``path`` (any layout of :func:`read_checkpoint`) into
    ``model``, and any backbone tensors it holds; values are cast to the model's dtypes.

    Fails with one line naming the file for an unknown layout, a block count or shape mismatch
    (e.g. a 14B checkpoint into a 1.3B model) or missing adapter tensors. Returns the loaded keys.
    """
    ckpt = read_checkpoint(path, key)
    loaded = check_compatible(model, ckpt, key)
    model.load_state_dict({k: ckpt.tensors[k] for k in loaded}, strict=False)
    parts = sorted({k.split(".", 1)[0] for k in loaded})
    log.info("%s: loaded %d tensors (%s) from %s (%s%s)", key, len(loaded), ", ".join(parts), path, ckpt.layout,
             f", step {ckpt.meta['global_step']}" if ckpt.meta.get("global_step") is not None else "")
    model.initialised_from = str(path)
    return loaded
