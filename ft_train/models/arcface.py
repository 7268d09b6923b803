"""ArcFace face-recognition backbone (insightface ``arcface_torch`` IResNet), loaded from a local file.

The paper's identity branch starts from ArcFace embeddings of the reference face (§3.3). The
public ArcFace weights users have are insightface ``arcface_torch`` checkpoints (e.g.
``ms1mv3_arcface_r100_fp16/backbone.pth``, glint360k r100, webface r50): plain state dicts of an
"improved ResNet" (IResNet, Deng et al. 2019 / Duta et al. 2020). This file is our own
implementation of that public architecture, with the same module names so those files load
as they are; nothing is downloaded.

Architecture, input 112×112 RGB in [-1, 1] (what insightface's ``inference.py`` feeds):
stem conv3×3(3→64) + BN + PReLU; four stages of pre-activation basic blocks
(BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, + shortcut), the first block of each stage
with stride 2 and a conv1×1 + BN shortcut; 112 → 56 → 28 → 14 → 7; BN → flatten (7·7·512) →
dropout → Linear → BatchNorm1d = the 512-d embedding. Depths: r18 (2,2,2,2), r34 (3,4,6,3),
r50 (3,4,14,3), r100 (3,13,30,3), r200 (6,26,60,6).

:func:`load_iresnet` reads the depths and widths from the file itself by default
(``model.identity.arcface_arch=auto``), so every variant (and the tiny ones tests save) loads
without a second setting; naming the variant makes a wrong file fail on its first mismatching
tensor instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

# Blocks per stage of the insightface variants (arcface_torch/backbones/iresnet.py).
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
IRESNET_WIDTHS = (64, 128, 256, 512)
ARCFACE_INPUT = 112  # pixels; the stem keeps it, four stride-2 stages give the 7×7 map fc expects
ARCFACE_DIM = 512
ARCHS = ("auto", *IRESNET_LAYERS)
# Counters BatchNorm keeps but never uses in eval mode; older checkpoints do not have them.
_IGNORED_SUFFIX = "num_batches_tracked"
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.conv1\.weight$")


class IBasicBlock(nn.Module):
    """Pre-activation basic block: ``bn1 → conv1 → bn2 → prelu → conv2(stride) → bn3`` + shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """insightface IResNet: ``(B, 3, 112, 112)`` in [-1, 1] → ``(B, num_features)`` (not normalised).

    Args:
        layers: blocks per stage, e.g. ``IRESNET_LAYERS["iresnet100"]``.
        widths: channels per stage (insightface: 64, 128, 256, 512; the stem has ``widths[0]``).
        num_features: embedding width (512 in every released model).
        dropout: before the final Linear (a no-op here: the encoder only runs in eval mode).
    """

    def __init__(self, layers: Sequence[int], widths: Sequence[int] = IRESNET_WIDTHS,
                 num_features: int = ARCFACE_DIM, dropout: float = 0.0):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet needs 4 stages of >= 1 block, got layers={tuple(layers)} widths={tuple(widths)}")
        self.layers_per_stage = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        self.num_features = num_features
        self.conv1 = nn.Conv2d(3, self.widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0], eps=1e-5)
        self.prelu = nn.PReLU(self.widths[0])
        inplanes = self.widths[0]
        for i, (blocks, planes) in enumerate(zip(self.layers_per_stage, self.widths), start=1):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
            stage = [IBasicBlock(inplanes, planes, 2, downsample)]
            stage += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        side = ARCFACE_INPUT // 16
        self.fc = nn.Linear(inplanes * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


# -- loading -----------------------------------------------------------------------------------
def _read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of an arcface_torch file: a bare ``backbone.pth`` state dict, a
    training checkpoint's ``state_dict_backbone``, or the same as ``.safetensors``; ``module.``
    (DDP) prefixes removed."""
    if path.suffix == ".onnx":
        raise ValueError(
            f"{key}: {path} is an ONNX model; ONNX files are not read, give the arcface_torch "
            "PyTorch weights (backbone.pth) of the same model"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one, in one line
        lines = str(exc).strip().splitlines()
        raise ValueError(f"{key}: cannot read {path} as PyTorch weights ({exc.__class__.__name__}: "
                         f"{lines[0] if lines else 'empty file'})") from exc
    if isinstance(obj, dict):
        for inner in ("state_dict_backbone", "state_dict"):
            if isinstance(obj.get(inner), dict):
                obj = obj[inner]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{key}: {path} is not a state dict of tensors (an arcface_torch backbone.pth)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def infer_iresnet_shape(state: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], int] | None:
    """(blocks per stage, widths, num_features) read off an IResNet state dict; None when the
    dict does not look like one (no ``layer{1..4}.{j}.conv1.weight`` or no ``fc.weight``)."""
    counts = [0, 0, 0, 0]
    for name in state:
        if m := _BLOCK_KEY.match(name):
            stage = int(m.group(1)) - 1
            counts[stage] = max(counts[stage], int(m.group(2)) + 1)
    if min(counts) < 1 or "fc.weight" not in state:
        return None
    widths = tuple(int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5))
    return tuple(counts), widths, int(state["fc.weight"].shape[0])


def load_iresnet(path: str | Path, arch: str = "auto", key: str = "model.identity.arcface_path") -> IResNet:
    """Build an :class:`IResNet` and load ``path`` into it, frozen and in eval mode.

    ``arch``: ``auto`` (depths, widths and embedding width read from the file) or one of
    :data:`IRESNET_LAYERS` (insightface widths, 512-d). Every problem is one line that starts
    with ``key`` and names the file and the first offending tensor: no file, not a state dict, a
    tensor the architecture needs but the file lacks, a tensor of another shape, a tensor the
    architecture has no place for.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}: no file at {path}; point it at an insightface arcface_torch backbone "
            "(e.g. ms1mv3_arcface_r100_fp16/backbone.pth)"
        )
    if arch not in ARCHS:
        raise ValueError(f"model.identity.arcface_arch: unknown {arch!r}; use one of {list(ARCHS)}")
    state = _read_state_dict(path, key)
    if arch == "auto":
        shape = infer_iresnet_shape(state)
        if shape is None:
            sample = ", ".join(sorted(state)[:4])
            raise ValueError(
                f"{key}: {path} is not an arcface_torch IResNet state dict (no layer1.0.conv1.weight / fc.weight; "
                f"first keys: {sample})"
            )
        layers, widths, num_features = shape
        what = f"the IResNet{list(layers)} read from its own layer keys"
    else:
        layers, widths, num_features = IRESNET_LAYERS[arch], IRESNET_WIDTHS, ARCFACE_DIM
        what = arch
    model = IResNet(layers, widths, num_features)
    own = model.state_dict()
    needed = [k for k in own if not k.endswith(_IGNORED_SUFFIX)]
    missing = [k for k in needed if k not in state]
    if missing:
        raise KeyError(
            f"{key}: {path} lacks {missing[0]} ({len(missing)} tensors missing for {what}); "
            "set model.identity.arcface_arch to the file's variant, or auto"
        )
    for name in needed:
        if tuple(state[name].shape) != tuple(own[name].shape):
            raise ValueError(
                f"{key}: {path} has {name} of shape {tuple(state[name].shape)}, {what} expects "
                f"{tuple(own[name].shape)}; set model.identity.arcface_arch to the file's variant, or auto"
            )
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise ValueError(
            f"{key}: {path} has {unexpected[0]} ({len(unexpected)} tensors) that {what} has no place for; "
            "set model.identity.arcface_arch to the file's variant, or auto"
        )
    model.load_state_dict({k: state[k].float() for k in state}, strict=False)
    model.requires_grad_(False)
    return model.eval()


__all__ = ["ARCFACE_DIM", "ARCFACE_INPUT", "ARCHS", "IRESNET_LAYERS", "IBasicBlock", "IResNet",
           "infer_iresnet_shape", "load_iresnet"]
