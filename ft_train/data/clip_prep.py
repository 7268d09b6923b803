"""Clips → what the frozen encoders take, and the one call that makes every conditioning tensor.

The encode pass (``ft-prep task=encode``), raw-mode training and ``ft-infer`` prepare clips through
these functions, so a clip is cut, cropped and masked the same way wherever it is encoded: the
audio window of a clip's frames, the face crop the identity branch reads in one of the
:data:`FACE_FORMS` (``clip`` = CLIP tokens of the crop for ``model.identity.encoder=precomputed``,
``pixels`` = the 112×112 crop itself for ``model.identity.encoder=arcface``), the lip mask on the
latent grid, and :func:`encode_clips` over the frozen encoders of :mod:`ft_train.models.encoders`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.arcface import ARCFACE_INPUT
from ..media import AUDIO_RATE
from ..models.encoders import FrozenEncoders

LIP_MASK_RESIZE = ("trilinear", "area")
#: Side of the face crop in pixels: the input size of CLIP ViT-H/14 (the crop is resized once, here).
FACE_CROP_SIZE = 224
#: Context added around the face box on each side, as a fraction of the box's longer side.
FACE_MARGIN = 0.2
#: What the data gives the identity branch as ``face`` (``encode.face`` / ``data.face``):
#: ``clip`` CLIP tokens of the face crop (shard member ``face.npy``; ``model.identity.encoder=precomputed``),
#: ``pixels`` the crop, (3, 112, 112) uint8 (``face_pixels.npy``; ``model.identity.encoder=arcface``),
#: ``none`` nothing (a precomputed identity branch then reads the whole frame's CLIP tokens).
FACE_FORMS = ("clip", "pixels", "none")
#: Side of the ``pixels`` face crop: the input size of the insightface ArcFace networks.
FACE_PIXELS_SIZE = ARCFACE_INPUT
#: Audio the clip may lack at its end and still be used (zero-padded), in 16 kHz samples: the
#: rounding of frame times to samples (data tools: ``round``, the cut: ``int``) can differ by one.
AUDIO_ROUNDING_SAMPLES = 1


def clip_audio_samples(num_frames: int, fps: float) -> int:
    """16 kHz samples of a clip's audio: ``int(num_frames / fps · 16000)``, the cut the released
    code makes before wav2vec2 (so the token count is :func:`ft_train.models.audio.clip_audio_tokens`)."""
    return int(num_frames / fps * AUDIO_RATE)


def clip_audio_window(audio: np.ndarray, start_frame: int, num_frames: int, fps: float) -> np.ndarray:
    """The audio of video frames ``start_frame … start_frame + num_frames − 1`` of a clip whose
    16 kHz ``audio`` (N,) starts at the time of its frame 0 (the data tools' ``flac``).

    Starts at sample ``round(start_frame / fps · 16000)`` and is :func:`clip_audio_samples` long,
    so audio token ``j`` lies at the same time relative to the window's first frame whatever the
    start (the frame-level audio windows depend on exactly that). Raises ``ValueError`` when the
    audio ends more than :data:`AUDIO_ROUNDING_SAMPLES` before the window does.
    """
    first = int(round(start_frame / fps * AUDIO_RATE))
    n = clip_audio_samples(num_frames, fps)
    out = np.asarray(audio, dtype=np.float32).reshape(-1)[first : first + n]
    if out.shape[0] < n - AUDIO_ROUNDING_SAMPLES:
        raise ValueError(f"{len(audio)} audio samples, frames {start_frame}+{num_frames} at {fps} fps need {first + n}")
    return np.pad(out, (0, n - out.shape[0])) if out.shape[0] < n else out


def face_crop_box(box_xyxy: Sequence[float], height: int, width: int, margin: float = FACE_MARGIN) -> tuple[int, int, int, int]:
    """Square pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) around a face box, for :func:`crop_face`.

    The side is ``(1 + 2·margin) ×`` the box's longer side, centred on the box. The data tools'
    box is the extent of the 478 face-mesh landmarks (brows to chin, cheek to cheek), so the
    default margin of 0.2 per side adds the forehead, the hair line and the jaw's outline —
    what makes an identity beyond the inner face — while keeping the background to a thin band.
    A square keeps the face's aspect through the resize to 224×224. The square is shifted to lie
    inside the frame when it fits; only a square larger than the frame reaches outside it
    (:func:`crop_face` pads that part).
    """
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    side = max(1, int(np.ceil((1 + 2 * margin) * max(x1 - x0, y1 - y0, 1.0))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    def place(centre: float, size: int) -> int:
        lo = int(round(centre - side / 2))
        return min(max(lo, 0), size - side) if side <= size else (size - side) // 2

    left, top = place(cx, width), place(cy, height)
    return left, top, left + side, top + side


def crop_face(
    frame: np.ndarray, box_xyxy: Sequence[float] | None, margin: float = FACE_MARGIN, size: int = FACE_CROP_SIZE
) -> np.ndarray:
    """Face crop of one frame for the identity branch: ``(H, W, 3)`` uint8 → ``(size, size, 3)`` uint8.

    ``box_xyxy`` is the data tools' face box in this frame's pixels (x0, y0, x1, y1); the crop is
    :func:`face_crop_box` (parts outside the frame, only when the square is larger than the
    frame, are black), resized with area averaging when shrinking and bicubic when enlarging.
    ``None`` (no face box known) crops nothing: the whole frame is resized (the view the CLIP
    image tokens have, which the identity branch falls back to without a face crop).
    """
    import cv2

    frame = np.ascontiguousarray(frame)
    h, w = frame.shape[:2]
    if box_xyxy is None:
        crop = frame
    else:
        x0, y0, x1, y1 = face_crop_box(box_xyxy, h, w, margin)
        crop = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = frame[sy0:sy1, sx0:sx1]
    if crop.shape[:2] == (size, size):
        return crop
    shrink = crop.shape[0] >= size and crop.shape[1] >= size
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def face_form(value, key: str = "face") -> str:
    """A face setting from a config → one of :data:`FACE_FORMS`. ``true`` / ``false`` (the
    setting's older boolean form) read as ``clip`` / ``none``; anything else fails naming ``key``."""
    if value is True:
        return "clip"
    if value is False or value is None:
        return "none"
    if value not in FACE_FORMS:
        raise ValueError(
            f"{key}={value!r} must be one of {', '.join(FACE_FORMS)} (clip for model.identity.encoder=precomputed, "
            "pixels for model.identity.encoder=arcface)"
        )
    return value


def face_crops(
    frames: np.ndarray, boxes: Sequence[Sequence[float] | None], margin: float = FACE_MARGIN, size: int = FACE_CROP_SIZE
) -> torch.Tensor:
    """:func:`crop_face` of each frame: ``(B, H, W, 3)`` uint8 + B boxes (None = whole frame) →
    ``(B, 3, size, size)`` uint8."""
    crops = np.stack([crop_face(f, box, margin, size) for f, box in zip(frames, boxes)])
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()


def frames_to_video(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, F, H, W, 3) → float video (B, 3, F, H, W) in [-1, 1]."""
    return frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def lip_mask_to_latent(masks: torch.Tensor, latent_size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Pixel lip masks (B, F, H, W) → the latent grid (B, F_lat, H_lat, W_lat), values in [0, 1].

    ``trilinear`` (default) is the paper's "trilinear interpolation" (§3.2), PyTorch's
    ``F.interpolate`` with ``align_corners=False``. ``area`` is the exact coverage instead: the
    mean over each latent cell's 8×8 pixels and its causal frame chunk (latent frame 0 = frame 0,
    latent frame i = frames 4i−3…4i), for when thin masks should not be point-sampled.
    """
    f_lat, h_lat, w_lat = (int(v) for v in latent_size)
    x = masks.float()[:, None]
    if mode == "trilinear":
        return F.interpolate(x, size=(f_lat, h_lat, w_lat), mode="trilinear", align_corners=False)[:, 0].clamp(0, 1)
    if mode == "area":
        x = F.adaptive_avg_pool3d(x, (x.shape[2], h_lat, w_lat))[:, 0]
        first, rest = x[:, :1], x[:, 1:]
        rest = rest.reshape(rest.shape[0], f_lat - 1, -1, h_lat, w_lat).mean(2) if f_lat > 1 else rest[:, :0]
        return torch.cat([first, rest], 1)
    raise ValueError(f"lip_mask_resize={mode!r}: choose one of {LIP_MASK_RESIZE}")


@torch.no_grad()
def encode_clips(
    encoders: FrozenEncoders,
    frames: torch.Tensor,
    audio: Sequence[np.ndarray | torch.Tensor],
    lip_masks: torch.Tensor,
    captions: Sequence[str],
    lip_mask_resize: str = "trilinear",
    face_boxes: Sequence[Sequence[float] | None] | None = None,
    face_margin: float = FACE_MARGIN,
    face: str = "clip",
    reference: Sequence[int] | None = None,
) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Every conditioning tensor of a batch of equally sized clips (float32, on the encoders' device).

    Args:
        frames: (B, F, H, W, 3) uint8 RGB, F = 4k+1, H and W multiples of 8.
        audio: B waveforms, 16 kHz mono, exactly the clips' audio (:func:`clip_audio_samples`).
        lip_masks: (B, F, H, W) pixel lip masks: bool, float in [0, 1], or uint8 read as /255
            (a resized mask's partial coverage).
        captions: B prompts (``""`` = the empty prompt).
        face_boxes: B face boxes (x0, y0, x1, y1) in frame 0's pixels, or None per clip for no
            known face; None for the whole argument = no face output.
        face_margin: see :func:`face_crop_box`.
        face: the form of the face output, :data:`FACE_FORMS` (``none`` = none, as without boxes).
        reference: per clip, the frame the image-to-video reference is taken from (``ft-prep``'s
            ``reference_frame``: a frame with the face found, not dark or blurred); None = frame 0.
            "frame 0" below means this frame; ``face_boxes`` are then its boxes.
    Returns:
        ``latents``, ``image_latents`` (B, 16, F_lat, H/8, W/8) — the clip and
        ``VAE([frame 0, zeros…])``, encoded in one VAE call; ``clip`` (B, N_img, D_img) of frame 0;
        ``text`` list of (L_t, D_t); ``audio`` list of (L_a, D_a); ``lip_mask`` (B, F_lat, H/8, W/8);
        with ``face_boxes`` and ``face=clip``: ``face`` (B, N_img, D_img) = CLIP tokens of frame 0's
        :func:`crop_face` (a clip whose box is None gets its ``clip`` tokens); with ``face=pixels``:
        ``face_pixels`` (B, 3, 112, 112) uint8 = the crop itself (a clip whose box is None gets its
        whole frame, resized). Each key is named as its latent-shard member.
    """
    vae, image, text, audio_enc = encoders.vae, encoders.image, encoders.text, encoders.audio
    if None in (vae, image, text, audio_enc):
        raise ValueError("encode_clips needs all four encoders (vae, image, text, audio)")
    b, f, h, w, _ = frames.shape
    _, f_lat, h_lat, w_lat = vae.latent_shape(f, h, w)
    video = frames_to_video(frames)
    ref = torch.as_tensor([0] * b if reference is None else [int(r) for r in reference], device=frames.device)
    if ref.shape != (b,) or bool(((ref < 0) | (ref >= f)).any()):
        raise ValueError(f"encode_clips: reference frames {ref.tolist()} must be {b} indices in [0, {f})")
    rows = torch.arange(b, device=frames.device)
    ref_frames = frames[rows, ref]  # (B, H, W, 3) uint8: each clip's reference frame
    ref_video = video[rows, :, ref]  # (B, 3, H, W) in [-1, 1]
    condition = torch.zeros_like(video)
    condition[:, :, 0] = ref_video
    both = vae(torch.cat([video, condition]))
    masks = lip_masks.float().div(255.0) if lip_masks.dtype == torch.uint8 else lip_masks
    out = {
        "latents": both[:b],
        "image_latents": both[b:],
        "clip": image(ref_video),
        "text": text(captions),
        "audio": audio_enc(audio),
        "lip_mask": lip_mask_to_latent(masks, (f_lat, h_lat, w_lat), lip_mask_resize),
    }
    face = face_form(face)
    if face_boxes is not None and face != "none":
        if len(face_boxes) != b:
            raise ValueError(f"encode_clips: {len(face_boxes)} face boxes for {b} clips")
        if face == "pixels":
            # No fallback features exist for a pixel encoder: a clip without a known box gets
            # the whole frame, a weak but well-formed identity input.
            out["face_pixels"] = face_crops(ref_frames.cpu().numpy(), face_boxes, face_margin, FACE_PIXELS_SIZE)
            return out
        # A clip without a known face box gets its CLIP image tokens: the identity branch's own
        # fallback, so such a clip trains exactly as it would without a `face` member.
        tokens = out["clip"].clone()
        have = [i for i in range(b) if face_boxes[i] is not None]
        if have:
            crops = face_crops(ref_frames[have].cpu().numpy(), [face_boxes[i] for i in have], face_margin)
            tokens[have] = image(crops.float().div(127.5).sub(1.0))
        out["face"] = tokens
    return out
