"""LoRA on the Wan DiT's blocks (``model.lora``), made by diffusers' own PEFT integration.

The layers come from ``WanTransformer3DModel.add_adapter`` (peft's ``lora.Linear``), so they have
the names and the maths of every Wan LoRA that diffusers loads and saves: an exported file
(:func:`to_diffusers`) goes into ``WanImageToVideoPipeline.load_lora_weights`` unchanged, and a
file someone else trained (:func:`read_lora_file`, through diffusers' own reader, which also
converts the original-Wan / ComfyUI and musubi key forms) starts training or joins inference.

Default targets: the blocks' self- and cross-attention q/k/v/o and both FFN linears — the set
DiffSynth-Studio trains by default for Wan (``q,k,v,o,ffn.0,ffn.2``), where motion, appearance
and how the text/audio query is read live (the audio branch reuses ``attn2.to_q`` / ``to_out``). The image k/v (``attn2.add_k_proj``/``add_v_proj``, the CLIP
path of the reference photo), the embedders and the modulation tables stay as trained, so the
photo's identity conditioning is the base model's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name for the trained adapter; it appears in state-dict keys
KEY = "model.lora"
# Linear layers of a Wan block, by their name inside the block (diffusers naming).
BLOCK_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj",
    "ffn.net.0.proj", "ffn.net.2",
)
DEFAULT_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)
# ``transformer.blocks.3.attn1.to_q.lora_A.default.weight`` (our state dict) and
# ``transformer.blocks.3.attn1.to_q.lora_A.weight`` (diffusers' files).
_OURS = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)\.lora_([AB])\.(\w+)\.weight$")
_DIFFUSERS = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def is_lora_key(name: str) -> bool:
    """True for the tensors of a peft LoRA layer (``….lora_A.<adapter>.weight`` / ``lora_B``)."""
    return ".lora_A." in name or ".lora_B." in name


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: a LoRA of ``rank`` on the ``targets`` of every block.

    Args:
        rank: LoRA rank r; 0 = no LoRA (no layers, no checkpoint keys).
        alpha: peft's ``lora_alpha``; the update is ``(alpha / rank) · B·A``. None = ``rank``
            (scale 1, the form diffusers assumes for files without metadata).
        targets: linear layers inside each block (:data:`BLOCK_LINEARS` names).
        dropout: dropout on the LoRA input while training (0 = none).
    """

    rank: int = 0
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        rank, alpha, dropout = self.rank, self.alpha, self.dropout
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"{KEY}.rank: must be a whole number >= 0 (0 = no LoRA), got {rank!r}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
            raise ValueError(f"{KEY}.alpha: must be a number > 0 (or null = the rank), got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{KEY}.dropout: must be in [0, 1), got {dropout!r}")
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"{KEY}.targets: must be a non-empty list of block layers, e.g. [attn1.to_q, ffn.net.2], "
                             f"got {targets!r}")
        unknown = [t for t in targets if t not in BLOCK_LINEARS]
        if unknown:
            raise ValueError(f"{KEY}.targets: {unknown[0]!r} is not a linear layer of a Wan block; "
                             f"choose from {', '.join(BLOCK_LINEARS)}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        object.__setattr__(self, "dropout", float(dropout))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """The factor peft multiplies ``B·A`` by: ``alpha / rank``."""
        return self.lora_alpha / self.rank

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "LoraSettings":
        if data is None:
            return cls()
        if isinstance(data, LoraSettings):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"{KEY}: must be a section (rank, alpha, targets, dropout), got {data!r}")
        known = {"rank", "alpha", "targets", "dropout"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{KEY}.{unknown[0]}: unknown key; {KEY} takes {', '.join(sorted(known))}")
        values = dict(data)
        targets = values.get("targets")
        if isinstance(targets, Sequence) and not isinstance(targets, str):  # a list, or Hydra's ListConfig
            values["targets"] = tuple(targets)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out

    def target_regex(self) -> str:
        """peft's ``target_modules`` as one regex matched in full: the targets inside blocks only."""
        names = "|".join(re.escape(t) for t in self.targets)
        return rf"blocks\.\d+\.({names})"

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.lora_alpha, lora_dropout=self.dropout,
                          target_modules=self.target_regex(), init_lora_weights=True)


def add_lora(transformer: nn.Module, settings: LoraSettings) -> list[str]:
    """Put the LoRA layers in ``transformer`` (``add_adapter``; B starts at zero, so the model's
    output is unchanged). The LoRA weights are float32 and trainable whatever the backbone's dtype
    (they are the trained master weights). Returns the wrapped layers' names."""
    transformer.add_adapter(settings.peft_config(), adapter_name=ADAPTER)
    wrapped = sorted({n.rsplit(".lora_", 1)[0] for n, _ in transformer.named_parameters() if is_lora_key(n)})
    for name, param in transformer.named_parameters():
        if is_lora_key(name):
            param.data = param.data.float()
            param.requires_grad_(True)
    return wrapped


def lora_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if is_lora_key(n)]


def backbone_trains(net: nn.Module) -> bool:
    """Whether any backbone weight of the DiT blocks (LoRA layers aside) requires grad."""
    return any(p.requires_grad for n, p in net.transformer.blocks.named_parameters() if not is_lora_key(n))


# -- diffusers' file format --------------------------------------------------------------------
def to_diffusers(tensors: dict[str, torch.Tensor], settings: LoraSettings, where: str = "ckpt") -> dict[str, torch.Tensor]:
    """Our LoRA tensors (``transformer.blocks.i.<layer>.lora_{A,B}.default.weight``, other keys
    ignored) → diffusers' keys (``transformer.blocks.i.<layer>.lora_{A,B}.weight``).

    The scale ``alpha / rank`` is folded into B and no adapter metadata is written: every loader
    then reads the file as alpha = rank and applies the same update — diffusers infers its config
    from the keys (including the zero image k/v LoRA its Wan loader adds to LoRAs without one,
    which a metadata target list would not name), and ComfyUI reads no metadata at all."""
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        m = _OURS.match(name)
        if m is None:
            continue
        block, layer, ab, adapter = m.groups()
        if adapter != ADAPTER:
            continue
        out[f"transformer.blocks.{block}.{layer}.lora_{ab}.weight"] = value * settings.scale if ab == "B" else value
    if not out:
        raise ValueError(f"{where}: holds no LoRA tensors (was it trained with {KEY}.rank > 0?)")
    return out


@dataclass
class LoraFile:
    """A diffusers-format Wan LoRA read back: ``tensors`` in diffusers' keys with the scale folded
    into B (so the update is ``B·A``), its ``rank``, and the block layers it covers."""

    path: Path
    tensors: dict[str, torch.Tensor]
    rank: int
    layers: tuple[str, ...] = field(default_factory=tuple)


def looks_like_lora(keys) -> bool:
    """Whether a flat state dict's keys are a LoRA's (diffusers, original-Wan/ComfyUI, musubi forms)."""
    keys = list(keys)
    return bool(keys) and any(("lora_A" in k or "lora_down" in k) for k in keys) and all(
        "lora" in k or k.endswith(".alpha") for k in keys)


def is_lora_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``.safetensors`` file of LoRA tensors (reads its header only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return looks_like_lora(f.keys())
    except Exception:  # not safetensors: a torch checkpoint, read elsewhere
        return False


def read_lora_file(path: str | Path, key: str) -> LoraFile:
    """A Wan LoRA file (``.safetensors``: diffusers' form, or the original-Wan / ComfyUI /
    musubi forms diffusers' ``WanLoraLoaderMixin.lora_state_dict`` converts). ``key`` (the setting
    that named it) starts every error."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no LoRA file at {path}")
    try:
        state, metadata = WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as exc:  # a truncated or foreign file
        text = str(exc).strip().splitlines()
        raise ValueError(f"{key}: cannot read {path} as a Wan LoRA ({exc.__class__.__name__}: "
                         f"{text[0] if text else 'unreadable'})") from exc
    scale = 1.0
    meta = (metadata or {})
    meta = meta.get("transformer", meta) if isinstance(meta.get("transformer"), dict) else meta
    if meta.get("r") and meta.get("lora_alpha") and not meta.get("rank_pattern") and not meta.get("alpha_pattern"):
        scale = float(meta["lora_alpha"]) / float(meta["r"])
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        m = _DIFFUSERS.match(name)
        if m is None:
            if name.endswith(".lora_B.bias"):
                raise ValueError(f"{key}: {path} has LoRA biases ({name}); only bias-free LoRAs are read")
            raise ValueError(f"{key}: {path} has {name!r}, not a LoRA of the Wan DiT's blocks "
                             "(expected transformer.blocks.<i>.<layer>.lora_A/B.weight)")
        tensors[name] = value.float() * scale if m.group(3) == "B" else value.float()
    ranks = {int(v.shape[0]) for k, v in tensors.items() if ".lora_A." in k}
    if not tensors or len(ranks) != 1:
        raise ValueError(f"{key}: {path} holds {'no LoRA tensors' if not tensors else f'LoRA ranks {sorted(ranks)}'}; "
                         "one rank for every layer is read")
    layers = tuple(sorted({_DIFFUSERS.match(k).group(2) for k in tensors}))
    return LoraFile(path, tensors, ranks.pop(), layers)


def load_lora_file_into(net: nn.Module, lora: LoraFile, settings: LoraSettings, key: str) -> int:
    """Start ``net``'s trained LoRA (``model.lora``) from ``lora``: same rank, its layers among
    ``model.lora.targets``; layers it lacks keep their zero start. Returns the layers loaded."""
    if not settings.enabled:
        raise ValueError(f"{key}: {lora.path} is a rank-{lora.rank} LoRA; set {KEY}.rank={lora.rank} to train it "
                         "(or pass it to ft-infer's extra_lora)")
    if lora.rank != settings.rank:
        raise ValueError(f"{key}: {lora.path} is a rank-{lora.rank} LoRA but {KEY}.rank={settings.rank}; "
                         f"set {KEY}.rank={lora.rank}")
    outside = [layer for layer in lora.layers if layer not in settings.targets]
    if outside:
        raise ValueError(f"{key}: {lora.path} adapts {outside[0]}, which {KEY}.targets leaves out; "
                         f"add it to {KEY}.targets")
    own = dict(lora_parameters(net.transformer))
    values = {}
    for name, value in lora.tensors.items():
        block, layer, ab = _DIFFUSERS.match(name).groups()
        ours = f"blocks.{block}.{layer}.lora_{ab}.{ADAPTER}.weight"
        if ours not in own:
            raise ValueError(f"{key}: {lora.path} has a LoRA on block {block}, the model has {net.num_blocks} blocks "
                             "(a LoRA of another model size?)")
        if own[ours].shape != value.shape:
            raise ValueError(f"{key}: {lora.path} has {name} of shape {tuple(value.shape)}, the model expects "
                             f"{tuple(own[ours].shape)} (a LoRA of another model size?)")
        # the file's update is B·A; ours is scale·B·A
        values[ours] = value / settings.scale if ab == "B" else value
    with torch.no_grad():
        for name, value in values.items():
            own[name].copy_(value.to(own[name].dtype))
    covered = len({n.rsplit(".lora_", 1)[0] for n in values})
    total = len({n.rsplit(".lora_", 1)[0] for n in own})
    log.info("%s: started the LoRA from %s (rank %d, %d of %d layers; the others start at zero)",
             key, lora.path, lora.rank, covered, total)
    return covered


def add_extra_lora(transformer: nn.Module, lora: LoraFile, name: str) -> None:
    """Add ``lora`` to ``transformer`` as one more (frozen) adapter called ``name``, through
    diffusers' ``load_lora_adapter`` (the scale is folded into B, so its config says alpha = r)."""
    metadata = {f"transformer.{k}": v for k, v in {
        "r": lora.rank, "lora_alpha": lora.rank, "init_lora_weights": True,
        "target_modules": LoraSettings(rank=lora.rank, targets=lora.layers).target_regex()}.items()}
    transformer.load_lora_adapter(dict(lora.tensors), prefix="transformer", adapter_name=name, metadata=metadata)
    for n, p in transformer.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


def set_lora_scales(transformer: nn.Module, scales: dict[str, float]) -> None:
    """Activate the adapters in ``scales`` with those weights (diffusers' ``set_adapters``)."""
    transformer.set_adapters(list(scales), weights=[float(s) for s in scales.values()])


__all__ = [
    "ADAPTER", "BLOCK_LINEARS", "DEFAULT_TARGETS", "LoraFile", "LoraSettings", "add_extra_lora", "add_lora",
    "backbone_trains", "is_lora_file", "is_lora_key", "load_lora_file_into", "looks_like_lora", "lora_parameters", "read_lora_file",
    "set_lora_scales", "to_diffusers",
]
