"""``ft-export``: a trained checkpoint → the official FantasyTalking file or an ft_train bundle.

Usage::

    ft-export ckpt=<stage_dir>/checkpoints/step-00020000 out=fantasytalking_model.ckpt
    ft-export ckpt=... out=fantasytalking_fp16.safetensors dtype=fp16
    ft-export ckpt=... out=exports/my-run format=bundle
    ft-export ckpt=... out=exports/my-run-lora.safetensors format=lora

Options are the keys of ``conf/export.yaml``. Runs on CPU; nothing but the checkpoint is loaded
(no backbone weights, no model is built). Formats:

``official``
    Exactly the released ``fantasytalking_model.ckpt`` layout (the released FantasyTalking weights),
    so the official inference code and ComfyUI ports load it: a ``torch.save``d dict
    ``{"proj_model": {"proj.weight" [2048, 768], "norm.weight", "norm.bias"}, "audio_processor":
    {"blocks.{i}.cross_attn.processor.{k,v}_proj.weight" [dim, 2048] for every block}}`` with the
    original Wan name ``cross_attn`` (diffusers: ``attn2``); fp32 like the release unless
    ``dtype`` says otherwise. An ``out`` ending in ``.safetensors`` gives the flat second form
    (``proj_model.…``, ``audio_processor.…``). It carries the audio adapter only: trained backbone
    or other modules in the checkpoint are reported and left out — the official code has no
    identity or motion module, so those weights are reported by name with a pointer to
    ``format=bundle``.
``lora``
    The trained LoRA on the DiT (``model.lora``) alone, as one ``.safetensors`` file in the key
    format diffusers saves and ``WanImageToVideoPipeline.load_lora_weights`` loads
    (``transformer.blocks.{i}.attn1.to_q.lora_A.weight``, …), the scale alpha/r folded into B
    (:func:`ft_train.models.lora.to_diffusers`).
``bundle``
    A folder with ``adapter.safetensors`` (every adapter tensor, this project's naming: audio,
    identity Q-Former + ``face_kv``, motion, the LoRA) and ``adapter.json`` (:func:`bundle_info`; its
    ``model.identity`` / ``model.motion`` say how to rebuild those modules), read back by
    ``stage.init_from`` and ``ft-infer``. Frozen encoders (an ArcFace network) are not adapter
    weights and stay out; ``model.identity.arcface_path`` records where they came from.
"""

from __future__ import annotations


import json
import logging
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .cli import Tool
from .config import compose_tool_config
from .models.weights import (
    AUDIO_PROJ_PREFIX,
    BUNDLE_CONFIG,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    BUNDLE_WEIGHTS,
    OPTIONAL_MODULES,
    AdapterCheckpoint,
    audio_block_count,
    flatten_official,
    is_audio_key,
    read_checkpoint,
    to_official,
    with_ema,
)
from .models.lora import LoraSettings, is_lora_key, to_diffusers
from .spec import SPEC_FILE, ModelSpec, find_run_config, load_run_config, read_data_stats, read_spec

FORMATS = ("official", "bundle", "lora")
EXPORT_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
OFFICIAL_NAME = "fantasytalking_model.ckpt"  # the released file's name, used when `out` is a folder
BACKBONE_PREFIX = "transformer."

log = logging.getLogger("ft_train.export")


def export_dtype(name: str) -> torch.dtype:
    if name not in EXPORT_DTYPES:
        raise ValueError(f"dtype: unknown {name!r}; use fp32, fp16 or bf16")
    return EXPORT_DTYPES[name]


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in ``dtype``, each contiguous and owning exactly its storage (a view of a
    larger buffer would otherwise be saved whole)."""
    out = {}
    for name, value in tensors.items():
        value = value.detach().to(dtype=dtype if value.is_floating_point() else value.dtype).contiguous()
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()
        out[name] = value
    return out


def audio_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The complete audio adapter in ``tensors``: projector + k/v of blocks 0…N−1; one-line
    error naming the file ``path`` when any of it is missing."""
    audio = {k: v for k, v in tensors.items() if is_audio_key(k)}
    blocks = audio_block_count(audio)
    if not audio or not blocks:
        raise ValueError(f"ckpt: {path} holds no audio adapter (no audio_proj / audio_kv tensors)")
    expected = {f"{AUDIO_PROJ_PREFIX}{n}" for n in ("proj.weight", "norm.weight", "norm.bias")}
    expected |= {f"audio_kv.{i}.{kv}_proj.weight" for i in range(blocks) for kv in "kv"}
    missing = sorted(expected - audio.keys())
    if missing:
        raise KeyError(f"ckpt: {path} has an incomplete audio adapter: {len(missing)} tensors missing (first: {missing[0]})")
    return audio


def non_audio_summary(ckpt: AdapterCheckpoint) -> tuple[int, int, list[str]]:
    """(backbone tensors, other non-audio tensors, their names) held by ``ckpt``."""
    names = sorted(k for k in ckpt.tensors if not is_audio_key(k))
    backbone = sum(k.startswith(BACKBONE_PREFIX) and not is_lora_key(k) for k in names)
    return backbone, len(names) - backbone, names


def optional_module_tensors(tensors: dict[str, Any]) -> dict[str, list[str]]:
    """Names of the identity / motion tensors in ``tensors``, by config section
    (``model.identity``, ``model.motion``); sections without tensors are left out."""
    found = {section: sorted(k for k in tensors if k.startswith(prefixes)) for section, prefixes in OPTIONAL_MODULES.items()}
    return {section: names for section, names in found.items() if names}


def module_warnings(spec: ModelSpec, tensors: dict[str, Any], path: Path) -> list[str]:
    """Where the spec and the weights disagree: a bundle is rebuilt from its spec, so trained
    weights of a module the spec lacks would be ignored, and a module without weights would run at
    its zero-initialised no-op."""
    held = optional_module_tensors(tensors)
    warnings = []
    for name in ("identity", "motion"):
        section, enabled = f"model.{name}", getattr(spec, name) is not None
        if section in held and not enabled:
            warnings.append(
                f"{path} holds {len(held[section])} trained {section} tensors but the run's config says {section}.enabled=false, "
                "so a model rebuilt from this bundle ignores them; pass config=<the run's config.yaml>"
            )
        elif enabled and section not in held:
            warnings.append(
                f"the config enables {section} but {path} holds no weights for it; "
                "a model rebuilt from this bundle runs it at its zero-initialised state (no effect)"
            )
    return warnings


def export_official(ckpt: AdapterCheckpoint, out: Path, dtype: torch.dtype) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write the released layout to ``out`` (``.safetensors`` = flat form). Returns the path and
    the flat tensors written."""
    nested = to_official(cast(audio_tensors(ckpt.tensors, ckpt.path), dtype))
    flat = flatten_official(nested)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        _atomic(out, lambda tmp: save_file(flat, str(tmp), metadata={"format": "pt"}))
    else:
        _atomic(out, lambda tmp: torch.save(nested, tmp))
    return out, flat


def bundle_info(ckpt: AdapterCheckpoint, spec: ModelSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                data_stats: dict[str, Any] | None, run: dict[str, Any]) -> dict[str, Any]:
    """``adapter.json``: what ``ft-infer`` and ``stage.init_from`` need to rebuild the model.

    Keys: ``format``/``format_version``; ``spec`` (:class:`~ft_train.spec.ModelSpec`: audio mode,
    widths and window widening, identity / motion settings, backbone shape, the training clips'
    fps and length); ``global_step``; ``num_blocks``; ``modules`` (parameters per adapter module);
    ``data_stats`` (ft-prep's ``stats.json``, normalises the motion intensities) or null; ``run``
    (name, run id, seed); ``source``.
    """
    modules: dict[str, int] = {}
    for name, value in tensors.items():
        modules[name.split(".", 1)[0]] = modules.get(name.split(".", 1)[0], 0) + value.numel()
    try:
        version = metadata.version("ft_train")
    except metadata.PackageNotFoundError:  # running from a source tree
        version = "unknown"
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "weights": BUNDLE_WEIGHTS,
        "dtype": str(dtype).removeprefix("torch."),
        "global_step": ckpt.meta.get("global_step"),
        "num_blocks": audio_block_count(tensors),
        "modules": modules,
        "spec": spec.to_dict(),
        "data_stats": data_stats,
        "run": run,
        "source": {"checkpoint": str(ckpt.path), "layout": ckpt.layout, "ft_train": version},
    }


def export_bundle(ckpt: AdapterCheckpoint, out: Path, dtype: torch.dtype, spec: ModelSpec,
                  data_stats: dict[str, Any] | None, run: dict[str, Any] | None = None,
                  ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """Write ``out/adapter.safetensors`` + ``out/adapter.json``. Returns the folder, tensors, info."""
    from safetensors.torch import save_file

    tensors = cast(adapter_tensors(ckpt.tensors), dtype)
    if not tensors:
        raise ValueError(f"ckpt: {ckpt.path} holds no adapter tensors (only backbone weights)")
    audio_tensors(tensors, ckpt.path)  # fail early if the audio adapter is incomplete
    info = bundle_info(ckpt, spec, tensors, dtype, data_stats, run or {})
    if spec.fps is None:
        log.warning("the run's data records no frame rate (shards from before ft-prep wrote fps into stats.json?): "
                    "the bundle carries fps null and ft-infer will use the release's 23 fps unless given fps=")
    layers = (spec.transformer or {}).get("num_layers")
    if layers is not None and layers != info["num_blocks"]:
        log.warning("config says model.transformer.num_layers=%s but %s has %d blocks: is it this run's config?",
                    layers, ckpt.path, info["num_blocks"])

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / BUNDLE_WEIGHTS), metadata={"format": "pt", "ft_train": BUNDLE_FORMAT})
        (tmp / BUNDLE_CONFIG).write_text(json.dumps(info, indent=2) + "\n")

    _atomic(out, write)
    return out, tensors, info


def adapter_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every adapter tensor: all but the trained backbone's (the LoRA on it is an adapter)."""
    return {k: v for k, v in tensors.items() if not k.startswith(BACKBONE_PREFIX) or is_lora_key(k)}


def export_lora(ckpt: AdapterCheckpoint, out: Path, dtype: torch.dtype, spec: ModelSpec | None
                ) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write the trained LoRA as diffusers' ``.safetensors`` (written by
    ``WanImageToVideoPipeline.save_lora_weights``). Returns the path and tensors."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    if not any(is_lora_key(k) for k in ckpt.tensors):
        raise ValueError(f"ckpt: {ckpt.path} holds no LoRA tensors; train with model.lora.rank > 0 "
                         "(format=official or bundle export the adapters)")
    if spec is None or spec.lora is None:
        raise FileNotFoundError(
            f"config: {ckpt.path} holds LoRA tensors but says nothing of their model.lora settings (alpha sets their "
            f"scale); pass config=<stage_dir>/config.yaml (the run's resolved config, written by ft-train)")
    if out.suffix != ".safetensors":
        raise ValueError(f"out: {out} must end in .safetensors (the form diffusers and ComfyUI load LoRAs from)")
    settings = LoraSettings.from_dict(spec.lora)
    tensors = to_diffusers(cast(ckpt.tensors, torch.float32), settings, where=f"ckpt: {ckpt.path}")
    tensors = cast(tensors, dtype)

    # diffusers writes into a folder: a temporary sibling, whose file then replaces `out` at once.
    staging = out.with_name(f".{out.name}.tmp")
    _remove(staging)
    staging.mkdir(parents=True)
    try:
        layers = {k.removeprefix("transformer."): v for k, v in tensors.items()}  # diffusers adds the prefix
        WanLoraLoaderMixin.save_lora_weights(staging, transformer_lora_layers=layers, weight_name=out.name)
        _plain_modes(staging / out.name)
        os.replace(staging / out.name, out)
    finally:
        _remove(staging)
    return out, tensors


def _atomic(out: Path, write) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written export."""
    tmp = out.with_name(f".{out.name}.tmp")
    _remove(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    _plain_modes(tmp)
    if out.is_dir() or (out.exists() and tmp.is_dir()):
        _remove(out)  # os.replace swaps files atomically but cannot replace a folder
    os.replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _plain_modes(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode a plain ``open()``/``mkdir``
    would: safetensors writes through a private temporary file, which leaves it 0600, readable by
    its owner only."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _run_info(checkpoint: AdapterCheckpoint, config: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's config as a dict, or {}; its name, run id and seed) for a bundle's ``run``."""
    if checkpoint.layout == "bundle" and config is None:
        return {}, dict(checkpoint.meta["bundle"].get("run") or {})
    path = Path(config).expanduser() if config is not None else find_run_config(checkpoint.path)
    if path is None or not path.is_file():
        return {}, {}
    cfg = load_run_config(path)
    return cfg, {k: cfg.get(k) for k in ("name", "run_id", "seed")}


def export(ckpt: str | Path, out: str | Path, format: str = "official", dtype: str = "fp32",
           config: str | Path | None = None, stats: str | Path | None = None, overwrite: bool = False,
           ema: bool = False) -> dict[str, Any]:
    """Export ``ckpt`` (any layout :func:`~ft_train.models.weights.read_checkpoint` reads) as
    ``format`` into ``out``; ``ema``: the run's average of the weights (``callbacks.ema``) instead
    of the weights. Returns ``out`` (the path written), ``format``, ``layout`` (of the source),
    ``tensors``, ``params``, ``bytes``, ``dtype``, ``ema``, ``warnings`` (also logged)."""
    if format not in FORMATS:
        raise ValueError(f"format: unknown {format!r}; use official, bundle or lora")
    torch_dtype = export_dtype(dtype)
    out = Path(out).expanduser()
    target = out / OFFICIAL_NAME if format == "official" and out.is_dir() else out
    if target.exists() and not overwrite:
        raise FileExistsError(f"out: {target} exists; choose another path or set overwrite=true")
    checkpoint = read_checkpoint(ckpt, key="ckpt")
    if ema:
        checkpoint = with_ema(checkpoint, key="ema")

    warnings: list[str] = []
    backbone, other, names = non_audio_summary(checkpoint)
    if format == "official" and names:
        held = optional_module_tensors(checkpoint.tensors)
        modules = ", ".join(f"{section} ({len(keys)})" for section, keys in held.items())
        warnings.append(
            f"{checkpoint.path} holds {len(names)} trained tensors outside the audio adapter ({backbone} backbone, "
            f"{other} other modules; first: {names[0]}); the official format and code use the audio adapter only, "
            "so they are left out"
            + (f"; the official code has no identity or motion module and cannot use the {modules} weights"
               if held else "")
            + (" (format=bundle keeps the other adapters)" if other else "")
            + (" (format=lora writes the LoRA for diffusers / ComfyUI)" if any(map(is_lora_key, names)) else "")
        )
    if format == "bundle" and backbone:
        warnings.append(
            f"{checkpoint.path} holds {backbone} trained backbone tensors (first: "
            f"{next(n for n in names if n.startswith(BACKBONE_PREFIX) and not is_lora_key(n))}); a bundle holds adapters only, so they are left out"
        )
    for message in warnings:
        log.warning(message)

    if format == "official":
        written, tensors = export_official(checkpoint, target, torch_dtype)
    elif format == "lora":
        written, tensors = export_lora(checkpoint, out, torch_dtype, read_spec(checkpoint, config))
    else:
        spec = read_spec(checkpoint, config)
        if spec is None:
            raise FileNotFoundError(
                f"config: {checkpoint.path} says nothing of its model (no {SPEC_FILE} or config.yaml beside it); "
                "pass config=<stage_dir>/config.yaml (the run's resolved config, written by ft-train)")
        run_cfg, run = _run_info(checkpoint, config)
        bundle_tensors = adapter_tensors(checkpoint.tensors)
        for message in module_warnings(spec, bundle_tensors, checkpoint.path):
            log.warning(message)
            warnings.append(message)
        data_stats = read_data_stats(run_cfg, stats) if (stats or run_cfg) else None
        if data_stats is None and checkpoint.layout == "bundle":
            data_stats = checkpoint.meta["bundle"].get("data_stats")
        written, tensors, _ = export_bundle(checkpoint, out, torch_dtype, spec, data_stats, run)
    size = sum(p.stat().st_size for p in ([written] if written.is_file() else written.rglob("*")) if p.is_file())
    return {
        "out": str(written),
        "format": format,
        "layout": checkpoint.layout,
        "tensors": len(tensors),
        "params": sum(v.numel() for v in tensors.values()),
        "bytes": size,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "ema": bool(ema),
        "warnings": warnings,
    }


def load_config(overrides: list[str]) -> dict[str, Any]:
    """Compose ``conf/export.yaml`` with Hydra override strings."""
    return compose_tool_config("export", overrides, "ft-export", EXAMPLE)


def _report(result: dict[str, Any]) -> str:
    return (f"ft-export: wrote {result['out']} ({result['format']}, {result['tensors']} tensors, "
            f"{result['params']:,} parameters, {result['dtype']}, {result['bytes'] / 2**20:.1f} MiB"
            + (", the EMA average)" if result["ema"] else ")"))


EXAMPLE = "ft-export ckpt=<stage_dir>/checkpoints/step-00001000 out=fantasytalking_model.ckpt"
TOOL = Tool("ft-export", "export", __doc__, EXAMPLE, run=lambda cfg: export(**cfg), report=_report)
main = TOOL.main  # console entry point: ``ft-export key=value ...`` (keys of ``conf/export.yaml``)


if __name__ == "__main__":
    sys.exit(main())
