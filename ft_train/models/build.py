"""Build the network: load or build the Wan DiT, add the adapters, apply the speed options.

``build_model`` is the Hydra entry point of ``conf/model/*.yaml``: it takes every ``model.*``
key, gives the network its own and the speed keys (:class:`ft_train.speed.SpeedOptions`) to
:func:`ft_train.speed.apply`, so the network class takes no speed flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from ..speed.fp8 import Fp8FrozenLinear
from .fantasytalking import FantasyTalkingDiT
from .lora import is_lora_file, load_lora_file_into, read_lora_file
from .weights import load_adapter_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def transformer_folder(path: str | Path) -> Path:
    """The folder holding the transformer's ``config.json``: ``path/transformer`` or ``path``."""
    root = Path(path).expanduser()
    for candidate in (root / "transformer", root):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"model.pretrained: no diffusers Wan transformer at {root} "
        "(expected transformer/config.json or config.json); point it at a local "
        "Wan2.1-I2V diffusers folder"
    )


def cast_keeping_fp32_modules(model: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` but keep the modules diffusers wants in float32 (norms, time embedder,
    RoPE, modulation tables), as ``from_pretrained(torch_dtype=...)`` does for loaded weights."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)


def load_transformer(
    pretrained: str | Path | None = None,
    config: dict[str, Any] | None = None,
    dtype: str | torch.dtype = "float32",
) -> WanTransformer3DModel:
    """Build the Wan DiT from ``config`` or load it from a local diffusers folder (never a hub).

    Raises a one-line error when the weights are not an image-to-video DiT (36 input channels and
    an image embedder), since the adapter relies on the I2V cross-attention layout.
    """
    torch_dtype = resolve_dtype(dtype)
    if pretrained:
        folder = transformer_folder(pretrained)
        model = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True)
    elif config is not None:
        model = WanTransformer3DModel(**dict(config))
        if torch_dtype != torch.float32:
            cast_keeping_fp32_modules(model, torch_dtype)
    else:
        raise ValueError("model: set model.pretrained (a local Wan2.1-I2V folder) or model.transformer (a config)")
    cfg = model.config
    where = pretrained or "model.transformer"
    if cfg.in_channels != 36 or cfg.image_dim is None or cfg.added_kv_proj_dim is None:
        raise ValueError(
            f"{where}: not a Wan2.1 image-to-video DiT (in_channels={cfg.in_channels}, "
            f"image_dim={cfg.image_dim}); FantasyTalking needs the I2V model (36 input channels, image_dim set)"
        )
    return model


def build_model(
    pretrained: str | None = None,
    transformer: dict[str, Any] | None = None,
    dtype: str = "float32",
    identity: dict[str, Any] | None = None,
    motion: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    init_from: str | list[str] | None = None,
    **options: Any,
) -> FantasyTalkingDiT:
    """Hydra entry point (``conf/model/*.yaml``): load or build the DiT, then add the adapter
    (and the identity / motion modules when ``identity.enabled`` / ``motion.enabled``).

    ``options`` are the other model keys: the speed options (``gradient_checkpointing``,
    ``checkpoint_keep``, ``frozen_fp8``, ...; :class:`~ft_train.speed.SpeedOptions`, applied to the
    built network) and :class:`FantasyTalkingDiT`'s arguments (``audio_mode``, ...) by name; an
    unknown key fails there.

    ``init_from`` starts the adapters from trained weights: the released
    ``fantasytalking_model.ckpt`` (audio only; identity / motion stay at their zero start), an
    ``ft-export`` bundle or an ft-train checkpoint. It belongs to the network, whatever the stage;
    ``stage.init_from`` (the previous stage's result) is loaded after it when both are set.
    It may also be a diffusers-format Wan LoRA file (``.safetensors``), which starts the trained
    LoRA (``lora``: same rank, its layers among the targets), or a list of such paths, loaded in order.
    """
    from ..speed import SpeedOptions, apply  # here: ft_train.speed imports ft_train.models

    net_options, speed = SpeedOptions.split(options)
    dit = load_transformer(pretrained, transformer, dtype)
    net = FantasyTalkingDiT(
        dit,
        identity=dict(identity) if identity is not None else None,
        motion=dict(motion) if motion is not None else None,
        lora=dict(lora) if lora is not None else None,
        **net_options,
    )
    sources = [init_from] if isinstance(init_from, (str, Path)) else list(init_from or [])
    for source in sources:  # before apply: float8 conversion frees the bf16 weights a LoRA file is checked against
        if is_lora_file(source):
            load_lora_file_into(net, read_lora_file(source, "model.init_from"), net.lora_config, "model.init_from")
        else:
            load_adapter_weights(net, source, key="model.init_from")
    apply(net, speed)
    return net


def _build_model_keys() -> list[str]:
    """The ``model.*`` keys :func:`build_model` reads: its own arguments, the speed options and
    :class:`FantasyTalkingDiT`'s (its ``**options``). ft-train refuses a ``+model.KEY`` outside them."""
    import inspect

    own = [n for n in inspect.signature(build_model).parameters if n != "options"]
    net = [n for n in inspect.signature(FantasyTalkingDiT.__init__).parameters if n not in ("self", "transformer")]
    from ..speed import SpeedOptions

    return own + list(SpeedOptions.keys()) + net


build_model.config_keys = _build_model_keys


def model_summary(model: FantasyTalkingDiT) -> dict[str, Any]:
    """Parameter counts (total, trainable, adapter, LoRA) for logs and reports; float8-stored frozen
    weights (``model.frozen_fp8``), weights swapped to host memory (``model.block_swap_resident``)
    and ZeRO-3's partitioned parameters count whole."""
    from ..speed.block_swap import swapped_numel

    def numel(p: torch.Tensor) -> int:  # a ZeRO-3 partitioned parameter holds 0 elements here
        return getattr(p, "ds_numel", p.numel())

    fp8 = sum(m.weight_bits.numel() for m in model.modules() if isinstance(m, Fp8FrozenLinear))
    total = sum(numel(p) for p in model.parameters()) + fp8 + swapped_numel(model)
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    adapter = sum(numel(p) for m in model.adapter_modules().values() for p in m.parameters())
    lora = sum(numel(p) for _, p in model.lora_state())
    return {"params_total": total, "params_trainable": trainable, "params_adapter": adapter, "params_lora": lora}


__all__ = ["build_model", "load_transformer", "model_summary", "resolve_dtype"]
