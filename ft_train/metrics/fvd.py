"""FVD with the StyleGAN-V I3D TorchScript (``i3d_torchscript.pt``), the canonical FVD backbone.

Call convention, from universome/stylegan-v ``src/metrics/frechet_video_distance.py`` and
``metric_utils.py``: the detector takes uint8 videos ``(B, 3, T, H, W)`` and is called with
``rescale=True`` (x/255·2 − 1 inside), ``resize=True`` (to 224×224 inside) and
``return_features=True`` (the 400-d Kinetics logits before the softmax, averaged over time). That
TorchScript is a port of the TF-Hub I3D used by the original TF FVD (Unterthiner et al.), so
these flags reproduce that preprocessing. Clips are 16 consecutive frames (``fvd2048_16f``).

Not matched on purpose: LatentSync calls the same file with ``rescale=False`` on [0, 1] input
(non-canonical), and DisCo/Hallo2 use ``i3d_pretrained_400.pt`` with a PIL bicubic resize; never
mix variants in one comparison. The covariance estimator is unbiased (N−1) where StyleGAN-V
divides by N — see :mod:`ft_train.metrics.frechet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ft_train.metrics.frechet import FrechetFeatureDistance

FVD_CLIP_FRAMES = 16
FVD_NUM_FEATURES = 400
I3D_NAME = "FVD I3D TorchScript (i3d_torchscript.pt)"


def load_i3d_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` the StyleGAN-V I3D from a local path (on CPU, eval, no gradients)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{I3D_NAME}: no file at {path}; set the FVD weights path to a local copy")
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{I3D_NAME}: cannot load {path} as TorchScript ({first})") from None
    for p in net.parameters():  # ScriptModules refuse requires_grad_()
        p.requires_grad_(False)
    return net.eval()


def split_clips(video: Tensor, clip_frames: int = FVD_CLIP_FRAMES) -> Tensor:
    """Cut one video ``(3, T, H, W)`` into consecutive, non-overlapping clips.

    Returns ``(T // clip_frames, 3, clip_frames, H, W)``.

    The trailing ``T % clip_frames`` frames are dropped. (StyleGAN-V takes one clip per video;
    DisCo slides a window; record which sampler produced a number.)
    """
    if video.ndim != 4:
        raise ValueError(f"split_clips expects (3, T, H, W), got {tuple(video.shape)}")
    n = video.shape[1] // clip_frames
    clips = video[:, : n * clip_frames].reshape(video.shape[0], n, clip_frames, *video.shape[2:])
    return clips.transpose(0, 1).contiguous()


class _I3DFeatures(nn.Module):
    """Wraps the TorchScript so it is called with the StyleGAN-V flags and checked inputs."""

    def __init__(self, detector: nn.Module, clip_frames: int):
        super().__init__()
        self.detector = detector
        self.clip_frames = clip_frames

    def forward(self, videos: Tensor) -> Tensor:
        if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"FVD expects uint8 RGB clips (B, 3, T, H, W), got {videos.dtype} {tuple(videos.shape)}")
        if videos.shape[2] != self.clip_frames:
            raise ValueError(
                f"FVD expects clips of {self.clip_frames} frames, got T={videos.shape[2]}; "
                "cut videos with split_clips()"
            )
        return self.detector(videos, rescale=True, resize=True, return_features=True).float()


class FrechetVideoDistance(FrechetFeatureDistance):
    """FVD between real and generated clips, uint8 RGB ``(B, 3, 16, H, W)`` (any H, W).

    ``update(clips, real=True|False)``; ``compute()`` → FVD (float64 scalar tensor). Features are
    the detector's 400-d logits; sums in float64, unbiased covariance, summed across ranks.

    Args:
        weights: local path of ``i3d_torchscript.pt`` (StyleGAN-V).
        clip_frames: frames per clip (16 for the standard FVD).
        num_features: feature size the detector returns (400 for I3D logits).
        reset_real_features: keep the real statistics across ``reset()`` when False.
    """

    def __init__(
        self,
        weights: str | Path,
        clip_frames: int = FVD_CLIP_FRAMES,
        num_features: int = FVD_NUM_FEATURES,
        reset_real_features: bool = True,
        **kwargs: Any,
    ):
        net = _I3DFeatures(load_i3d_torchscript(weights), clip_frames)
        super().__init__(net, num_features, reset_real_features=reset_real_features, **kwargs)
