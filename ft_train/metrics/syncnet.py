"""SyncNet (Chung & Zisserman 2016, the ``syncnet_v2.model`` release) as a plain module.

Layer list and parameter names from joonson/syncnet_python ``SyncNetModel.py`` (class ``S``), so
``syncnet_v2.model`` (a flat ``{name: tensor}`` dict) loads key for key: 102 tensors with BatchNorm
counters, 13,631,616 parameters. Two streams, each a CNN to 512-d then Linear-BN-ReLU-Linear to
1024-d (not normalised):

- audio: MFCC ``(N, 1, 13, 20)`` — 13 coefficients × 20 steps of 10 ms (0.2 s) → ``(N, 1024)``;
- lips: BGR face crops ``(N, 3, 5, 224, 224)``, float 0…255 with no normalisation — 5 frames at
  25 fps (0.2 s) → ``(N, 1024)``. Any other size or frame count fails inside the network.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ft_train.metrics.weights import load_weights

SYNCNET_NAME = "SyncNet weights (syncnet_v2.model)"


def _conv2d_bn(cin: int, cout: int, relu_inplace: bool = True, **conv) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, **conv), nn.BatchNorm2d(cout), nn.ReLU(inplace=relu_inplace)]


def _conv3d_bn(cin: int, cout: int, **conv) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, **conv), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]


def _head(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, dim))


class SyncNet(nn.Module):
    """The two-stream SyncNet; Sequential indices reproduce the reference key names."""

    def __init__(self, embed_dim: int = 1024):
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_conv2d_bn(1, 64, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=1, stride=1),  # a no-op in the reference; kept for the indices
            *_conv2d_bn(64, 192, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=(1, 2)),
            *_conv2d_bn(192, 384, kernel_size=3, padding=1),
            *_conv2d_bn(384, 256, kernel_size=3, padding=1),
            *_conv2d_bn(256, 256, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv2d_bn(256, 512, relu_inplace=False, kernel_size=(5, 4)),
        )
        self.netfcaud = _head(embed_dim)
        self.netfclip = _head(embed_dim)
        self.netcnnlip = nn.Sequential(
            *_conv3d_bn(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv3d_bn(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *_conv3d_bn(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            *_conv3d_bn(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            *_conv3d_bn(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv3d_bn(256, 512, kernel_size=(1, 6, 6)),
        )

    def forward_aud(self, mfcc: Tensor) -> Tensor:
        """MFCC windows ``(N, 1, 13, 20)`` → audio embeddings ``(N, 1024)``."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, frames: Tensor) -> Tensor:
        """BGR crops ``(N, 3, 5, 224, 224)`` float 0…255 → lip embeddings ``(N, 1024)``."""
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def load_syncnet(path: str | Path) -> SyncNet:
    """Build :class:`SyncNet` and load ``syncnet_v2.model`` from a local path (eval, frozen).

    A file with missing/unexpected keys or wrong shapes raises one ``ValueError`` naming it.
    """
    return load_weights(SyncNet(), path, SYNCNET_NAME)
