"""FVD with the StyleGAN-V I3D TorchScript (``i3d_torchscript.pt``), the canonical FVD backbone.

Call convention, from universome/stylegan-v ``src/metrics/frechet_video_distance.py`` and
``metric_utils.py``: the detector takes uint8 videos ``(B, 3, T, H, W)`` and is called with
``rescale=True`` (x/255·2 − 1 inside), ``resize=True`` (to 224×224 inside) and
``return_features=True`` (the 400-d Kinetics logits before the softmax, averaged over time). That
TorchScript is a port of the TF-Hub I3D used by the original TF FVD (Unterthiner et al.), so
these flags reproduce that preprocessing. Clips are 16 consecutive frames (``fvd2048_16f``).

Two protocols (``fvd_protocol``):

* ``stylegan_v`` (default; the one StyleGAN-V's ``calc_metrics_for_dataset.py`` runs on two
  folders of videos, and that talking-head evaluations reuse): **one 16-frame clip per video**.
  The real video's clip starts at ``random.randint(0, T − 16)`` (its ``VideoFramesFolderDataset``
  with ``load_n_consecutive_random_offset``), seeded here per video; the generated video's clip
  starts at frame 0 (the generated set is loaded with the random offset off). Frames are first
  brought to the dataset resolution as its ``convert_videos_to_frames.py`` does — PIL Lanczos
  resize of the short side to ``resolution``, then a centre square crop
  (:func:`styleganv_resize`) — and the detector resizes to 224 inside. Covariances divide by N.
* ``all_clips``: every non-overlapping 16-frame clip of every video at its own size, unbiased
  covariance (N − 1): more samples from few videos, but not comparable with papers.

Not matched on purpose: LatentSync calls the same file with ``rescale=False`` on [0, 1] input
(non-canonical), and DisCo/Hallo2 use ``i3d_pretrained_400.pt`` with a PIL bicubic resize; never
mix variants in one comparison.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ft_train.metrics.frechet import FrechetFeatureDistance

FVD_CLIP_FRAMES = 16
FVD_PROTOCOLS = ("stylegan_v", "all_clips")
STYLEGAN_V_RESOLUTION = 256
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


def styleganv_resize(frames: Tensor, resolution: int = STYLEGAN_V_RESOLUTION) -> Tensor:
    """Frames as StyleGAN-V's ``convert_videos_to_frames.py`` stores them: uint8 ``(T, 3, H, W)`` → ``(T, 3, r, r)``.

    torchvision's ``resize(img, r, LANCZOS)`` on a PIL image (short side → r, long side →
    ``int(r · long / short)``), then ``center_crop(r)`` (offsets ``round((size − r) / 2)``).
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"FVD expects uint8 RGB frames (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
    h, w = frames.shape[-2:]
    r = int(resolution)
    if (h, w) == (r, r):
        return frames
    new_long = int(r * max(h, w) / min(h, w))
    size = (new_long, r) if w > h else (r, new_long)  # (width, height), PIL's order
    top, left = int(round((size[1] - r) / 2.0)), int(round((size[0] - r) / 2.0))
    out = []
    for img in frames.permute(0, 2, 3, 1).cpu().numpy():
        im = Image.fromarray(img).resize(size, Image.LANCZOS)
        out.append(np.asarray(im)[top : top + r, left : left + r])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous().to(frames.device)


def clip_offset(num_frames: int, key: str, seed: int = 0, clip_frames: int = FVD_CLIP_FRAMES) -> int:
    """StyleGAN-V's random clip start ``randint(0, T − clip_frames)``, seeded by ``(seed, key)``.

    Seeded per video (by its name), so the draw is the same whatever the order of the videos or
    the split over ranks.
    """
    return random.Random(f"{int(seed)}/{key}").randint(0, num_frames - clip_frames)


def styleganv_clip(video: Tensor, offset: int, resolution: int = STYLEGAN_V_RESOLUTION,
                   clip_frames: int = FVD_CLIP_FRAMES) -> Tensor:
    """One clip from uint8 frames ``(T, 3, H, W)``: frames ``[offset, offset + 16)`` resized → ``(1, 3, 16, r, r)``."""
    if not 0 <= offset <= video.shape[0] - clip_frames:
        raise ValueError(f"clip offset {offset} does not fit {clip_frames} frames in a {video.shape[0]}-frame video")
    clip = styleganv_resize(video[offset : offset + clip_frames], resolution)
    return clip.transpose(0, 1)[None].contiguous()


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
    the detector's 400-d logits; sums in float64, summed across ranks. How videos become clips is
    the caller's part (:class:`ft_train.metrics.video.VideoMetrics`); ``protocol`` sets the
    covariance estimator that goes with it (``stylegan_v``: divide by N; ``all_clips``: N − 1).

    Args:
        weights: local path of ``i3d_torchscript.pt`` (StyleGAN-V).
        protocol: ``stylegan_v`` or ``all_clips`` (see the module docstring).
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
        protocol: str = "stylegan_v",
        **kwargs: Any,
    ):
        if protocol not in FVD_PROTOCOLS:
            raise ValueError(f"fvd_protocol: {protocol!r} is not one of {', '.join(FVD_PROTOCOLS)}")
        net = _I3DFeatures(load_i3d_torchscript(weights), clip_frames)
        covariance = "biased" if protocol == "stylegan_v" else "unbiased"
        super().__init__(net, num_features, reset_real_features=reset_real_features, covariance=covariance, **kwargs)
        self.protocol = protocol
