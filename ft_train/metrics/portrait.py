"""The paper's metrics that judge its own modules: IDC (identity), SD/BD (motion), Aes (aesthetics).

FantasyTalking (§4.1) reports them without code, so the exact tools and aggregation are not
published; these follow the paper's description with what installs here, and say how they differ:

* **IDC** — identity consistency: cosine similarity of DINO features of the face in each generated
  frame and of the face in the reference's first frame (the portrait the video starts from).
  DINO ViT through ``transformers`` from a local folder (e.g. ``facebook/dino-vitb16``), CLS token
  of the last layer; faces by mediapipe's detector, cropped to the square around its box. Frames
  without a face are counted, not averaged in. Mean over frames, then over videos.
* **SD / BD** — subject / background dynamics: mean optical-flow magnitude inside / outside the
  person. The paper uses SAM for the split and RAFT for the flow; here mediapipe's selfie
  segmentation (mask > 0.5) and OpenCV's Farnebäck flow, frames resized to a 256-px short side,
  in pixels per frame at that size. Mean over consecutive frame pairs, then over videos.
* **Aes** — the LAION aesthetic predictor: CLIP ViT-L/14 image embedding (``transformers``,
  local folder), L2-normalised, through the predictor's linear head
  (``sa_0_4_vit_l_14_linear.pth``: ``weight (1, 768)``, ``bias (1,)``); about 1–10. Mean over
  frames, then over videos.

Each is a torchmetrics ``Metric`` with sum states (exact across ranks). IDC and Aes are skipped
(one log line) when their weights are not given; SD/BD need none (``dynamics: true``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ft_train.metrics.base import FrozenNetMetric

DYNAMICS_SIZE = 256


def _evenly(n: int, k: int | None) -> np.ndarray:
    return np.arange(n) if k is None or k >= n else np.round(np.linspace(0, n - 1, k)).astype(int)


def _local_folder(path: Any, what: str) -> Path:
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: no folder at {p}; give a local transformers model folder")
    return p


class _HFImageEncoder(nn.Module):
    """uint8 RGB ``(N, H, W, 3)`` → features ``(N, D)`` through a transformers model and its image processor."""

    def __init__(self, model: nn.Module, processor: Any, kind: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.kind = kind

    def forward(self, images: np.ndarray) -> Tensor:
        param = next(self.model.parameters())
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(param.device, param.dtype)
        if self.kind == "clip":
            return self.model(pixel_values=pixels).image_embeds.float()
        return self.model(pixel_values=pixels).last_hidden_state[:, 0].float()  # CLS


def load_dino(path: Any) -> _HFImageEncoder:
    """A DINO ViT (``transformers`` ``AutoModel`` + ``AutoImageProcessor``) from a local folder."""
    from transformers import AutoImageProcessor, AutoModel

    folder = _local_folder(path, "idc (DINO ViT)")
    return _HFImageEncoder(AutoModel.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder), "dino")


def load_clip_vision(path: Any) -> _HFImageEncoder:
    """CLIP ViT-L/14's vision tower with its projection (``CLIPVisionModelWithProjection``) from a local folder."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = _local_folder(path, "aes (CLIP ViT-L/14)")
    return _HFImageEncoder(CLIPVisionModelWithProjection.from_pretrained(folder),
                           CLIPImageProcessor.from_pretrained(folder), "clip")


def face_crop(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The square around a face box ``x1, y1, x2, y2`` (side = the longer box side), clamped to the frame."""
    h, w = frame.shape[:2]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = max(box[2] - box[0], box[3] - box[1]) / 2
    x1, x2 = int(max(0, cx - half)), int(min(w, cx + half))
    y1, y2 = int(max(0, cy - half)), int(min(h, cy + half))
    return np.ascontiguousarray(frame[y1:y2, x1:x2])


def largest_faces(frames: np.ndarray) -> list[np.ndarray | None]:
    """The best-scoring face crop of each ``(H, W, 3)`` frame (mediapipe), or None."""
    from ..data.face import detect_face_boxes

    out = []
    for frame, boxes in zip(frames, detect_face_boxes(frames)):
        out.append(face_crop(frame, boxes[int(np.argmax(boxes[:, 4]))]) if len(boxes) else None)
    return out


class IdentityConsistency(FrozenNetMetric):
    """IDC: mean DINO cosine similarity of generated faces to the reference face (see the module docstring).

    ``update(generated (T, H, W, 3) uint8, reference_frame (H, W, 3) uint8)``. ``compute()`` →
    ``{"idc", "videos", "no_face_frames", "no_reference_face"}``.

    Args:
        weights: local DINO ViT folder, or ``net`` (anything mapping uint8 ``(N, H, W, 3)`` to ``(N, D)``).
        frames: generated frames per video, evenly spaced (None = all).
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, weights: Any = None, net: nn.Module | None = None, frames: int | None = 16, **kwargs: Any):
        if (weights is None) == (net is None):
            raise ValueError("IdentityConsistency: give exactly one of weights (DINO folder) or net")
        super().__init__(load_dino(weights) if weights is not None else net, **kwargs)
        self.frames = frames
        self.add_state("video_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("videos", "no_face_frames", "no_reference_face"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, generated: Any, reference_frame: Any) -> None:
        generated = np.asarray(generated.cpu() if isinstance(generated, Tensor) else generated)
        reference_frame = np.asarray(reference_frame.cpu() if isinstance(reference_frame, Tensor) else reference_frame)
        (ref_face,) = largest_faces(reference_frame[None])
        if ref_face is None:
            self.no_reference_face += 1
            return
        faces = largest_faces(generated[_evenly(len(generated), self.frames)])
        found = [f for f in faces if f is not None]
        self.no_face_frames += len(faces) - len(found)
        if not found:
            return
        feats = torch.cat([self.net(f[None]) for f in [ref_face, *found]])  # crops differ in size
        feats = torch.nn.functional.normalize(feats.double(), dim=1)
        self.video_sum += (feats[1:] @ feats[0]).mean()
        self.videos += 1

    def compute(self) -> dict[str, Tensor]:
        n = int(self.videos)
        return {"idc": self.video_sum / n if n else torch.tensor(float("nan"), dtype=torch.float64),
                "videos": self.videos.clone(), "no_face_frames": self.no_face_frames.clone(),
                "no_reference_face": self.no_reference_face.clone()}


class AestheticScore(FrozenNetMetric):
    """Aes: the LAION aesthetic predictor on CLIP ViT-L/14 (see the module docstring).

    ``update(generated (T, H, W, 3) uint8)``; ``compute()`` → ``{"aes", "videos"}``.

    Args:
        weights: local CLIP ViT-L/14 folder; ``head``: the linear head file
            (``sa_0_4_vit_l_14_linear.pth``); or ``net`` mapping uint8 ``(N, H, W, 3)`` → scores ``(N, 1)``.
        frames: frames per video, evenly spaced (None = all).
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, weights: Any = None, head: Any = None, net: nn.Module | None = None,
                 frames: int | None = 16, **kwargs: Any):
        if net is None:
            if weights is None or head is None:
                raise ValueError("aes: give the CLIP ViT-L/14 folder (aes) and the predictor's linear head (aes_head)")
            net = nn.Sequential(_Normalised(load_clip_vision(weights)), load_linear_head(head))
        super().__init__(net, **kwargs)
        self.frames = frames
        self.add_state("video_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("videos", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, generated: Any) -> None:
        generated = np.asarray(generated.cpu() if isinstance(generated, Tensor) else generated)
        scores = self.net(generated[_evenly(len(generated), self.frames)]).double().reshape(-1)
        self.video_sum += scores.mean()
        self.videos += 1

    def compute(self) -> dict[str, Tensor]:
        n = int(self.videos)
        return {"aes": self.video_sum / n if n else torch.tensor(float("nan"), dtype=torch.float64),
                "videos": self.videos.clone()}


class _Normalised(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images) -> Tensor:
        return torch.nn.functional.normalize(self.encoder(images), dim=-1)


def load_linear_head(path: Any) -> nn.Linear:
    """The LAION predictor's linear head: a file holding ``weight (1, D)`` and ``bias (1,)``."""
    from ft_train.metrics.weights import read_state_dict

    state = read_state_dict(path, "aes_head (LAION aesthetic linear head, sa_0_4_vit_l_14_linear.pth)")
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2 or state["weight"].shape[0] != 1:
        raise ValueError(f"aes_head: {path} is not a linear head (expected weight (1, D) and bias (1,), "
                         f"got {', '.join(f'{k} {tuple(v.shape)}' for k, v in state.items())})")
    head = nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


def person_masks(frames: np.ndarray) -> np.ndarray:
    """mediapipe selfie segmentation of ``(T, H, W, 3)`` uint8 RGB frames → bool ``(T, H, W)`` (person)."""
    import mediapipe as mp

    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg:
        return np.stack([seg.process(np.ascontiguousarray(f)).segmentation_mask > 0.5 for f in frames])


def flow_magnitudes(frames: np.ndarray) -> np.ndarray:
    """Farnebäck optical-flow magnitude between consecutive frames ``(T, H, W, 3)`` → ``(T − 1, H, W)`` pixels."""
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    out = []
    for a, b in zip(grey[:-1], grey[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        out.append(np.linalg.norm(flow, axis=-1))
    return np.stack(out) if out else np.zeros((0, *frames.shape[1:3]))


class SubjectBackgroundDynamics(Metric):
    """SD / BD: mean flow magnitude inside / outside the person (see the module docstring).

    ``update(generated (T, H, W, 3) uint8)``; ``compute()`` → ``{"sd", "bd", "videos", "too_short"}``.
    ``masks``: optional callable frames → bool person masks (tests); default mediapipe.
    """

    higher_is_better = None
    full_state_update = False

    def __init__(self, size: int = DYNAMICS_SIZE, masks: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.size = int(size)
        self.masks = masks or person_masks
        for name in ("sd_sum", "bd_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("sd_videos", "bd_videos", "too_short"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, generated: Any) -> None:
        frames = np.asarray(generated.cpu() if isinstance(generated, Tensor) else generated)
        if len(frames) < 2:
            self.too_short += 1
            return
        h, w = frames.shape[1:3]
        scale = self.size / min(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
        mag = flow_magnitudes(frames)
        mask = np.asarray(self.masks(frames), dtype=bool)[:-1]  # the person where each pair starts
        inside = [m[k].mean() for m, k in zip(mag, mask) if k.any()]
        outside = [m[~k].mean() for m, k in zip(mag, mask) if (~k).any()]
        if inside:
            self.sd_sum += float(np.mean(inside))
            self.sd_videos += 1
        if outside:
            self.bd_sum += float(np.mean(outside))
            self.bd_videos += 1

    def compute(self) -> dict[str, Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {"sd": self.sd_sum / self.sd_videos if int(self.sd_videos) else nan,
                "bd": self.bd_sum / self.bd_videos if int(self.bd_videos) else nan,
                "videos": self.sd_videos.clone(), "too_short": self.too_short.clone()}


__all__ = ["AestheticScore", "IdentityConsistency", "SubjectBackgroundDynamics", "face_crop", "flow_magnitudes",
           "load_clip_vision", "load_dino", "load_linear_head", "person_masks"]
