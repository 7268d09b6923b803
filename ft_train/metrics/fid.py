"""FID: the TF "inception-2015-12-05" Inception-v3 as ported by pytorch-fid, and the FID Metric.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid release ``fid_weights``), a plain
state dict. :class:`FIDInceptionV3` is our own module whose ``state_dict`` keys and shapes are
exactly those of that file (torchvision Inception-v3 names, 1008-class ``fc``, no aux head: 566
tensors with BatchNorm counters). torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` is
a conversion of the same TF graph with the same names, so it loads too.

Architecture facts from mseitzer/pytorch-fid ``src/pytorch_fid/inception.py`` (``fid_inception_v3``):
torchvision's Inception-v3 blocks with the TF graph's quirks — the pooling branch of the A, C and
first E blocks averages without counting padding (``count_include_pad=False``), and the last E
block max-pools instead of average-pooling. Features = the 2048-d global average pool.

Preprocessing matches **pytorch-fid** (the library Hallo/Hallo2 report using): uint8 → [0, 1] →
``F.interpolate(size=299, mode="bilinear", align_corners=False)`` with no antialiasing → 2x − 1.
torch-fidelity's TF1-style resize and torchmetrics ≥1.8's default ``antialias=True`` give other
numbers when the input is not 299×299 (we measured a 0.41 relative feature difference at
512 → 299); at 299×299 input all of them agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ft_train.metrics.frechet import FrechetFeatureDistance
from ft_train.metrics.weights import load_weights

FID_INPUT_SIZE = 299
FID_WEIGHTS_NAME = "FID Inception weights (pt_inception-2015-12-05-6726825d.pth)"


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, as in the TF graph) → ReLU."""

    def __init__(self, cin: int, cout: int, **conv: Any):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    # TF's average pool ignores the zero padding in the mean
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=True`` for Mixed_7c: the TF graph max-pools there (pytorch-fid ``FIDInceptionE_2``)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def fid_preprocess(frames: Tensor) -> Tensor:
    """uint8 ``(N, 3, H, W)`` RGB → float ``(N, 3, 299, 299)`` in [−1, 1], exactly as pytorch-fid.

    Bilinear, ``align_corners=False``, **no antialias** (torch's ``F.interpolate`` default).
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"FID expects uint8 RGB frames (N, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
    x = frames.float() / 255.0
    if x.shape[-2:] != (FID_INPUT_SIZE, FID_INPUT_SIZE):
        x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


class FIDInceptionV3(nn.Module):
    """FID Inception-v3: uint8 frames ``(N, 3, H, W)`` → pool features ``(N, 2048)`` (float32).

    Random-initialised on construction; use :func:`load_fid_inception` for the real weights.
    ``fc`` (2048 → 1008 logits) exists only so the weight file loads strictly; it is never run.
    """

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, frames: Tensor) -> Tensor:
        x = fid_preprocess(frames).to(self.fc.weight.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load ``pt_inception-2015-12-05-6726825d.pth`` from a local path."""
    return load_weights(FIDInceptionV3(), path, FID_WEIGHTS_NAME)


class FrechetInceptionDistance(FrechetFeatureDistance):
    """FID between real and generated frames, uint8 RGB ``(N, 3, H, W)``.

    ``update(frames, real=True|False)``; ``compute()`` → FID (float64 scalar tensor). Unbiased
    covariances, float64 sums synced across ranks (see :class:`FrechetFeatureDistance`).

    Why our own Metric rather than torchmetrics' ``FrechetInceptionDistance(feature=net)``: the
    same Fréchet code then serves FID and FVD, the network stays out of checkpoints, and no
    ``torchmetrics[image]``/torch-fidelity import path is touched. :class:`FIDInceptionV3` still
    works as torchmetrics' custom ``feature`` (uint8 input, ``num_features`` set) if wanted.

    Args:
        weights: local path of ``pt_inception-2015-12-05-6726825d.pth``.
        reset_real_features: keep the real statistics across ``reset()`` when False.
    """

    def __init__(self, weights: str | Path, reset_real_features: bool = True, **kwargs: Any):
        net = load_fid_inception(weights)
        super().__init__(net, FIDInceptionV3.num_features, reset_real_features=reset_real_features, **kwargs)
