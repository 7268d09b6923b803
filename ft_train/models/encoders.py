"""The frozen conditioning encoders, loaded from local folders through the libraries' own loaders.

FantasyTalking conditions the Wan2.1 I2V DiT on four frozen networks (../shared/research/paper.md
§5.2, §5.4); each is wrapped here in a small ``nn.Module`` that owns its preprocessing and says its
shapes:

==============================  ===================================  ==============================
wrapper                         weights (diffusers Wan folder /      output (real widths)
                                wav2vec2 folder)
==============================  ===================================  ==============================
:class:`WanVAEEncoder`          ``vae/`` (``AutoencoderKLWan``)      (B, 16, F_lat, H/8, W/8),
                                                                     normalised per channel
:class:`CLIPImageEncoder`       ``image_encoder/``                   (B, 257, 1280) penultimate
                                (``CLIPVisionModel``)                hidden state at 224 px
:class:`UMT5TextEncoder`        ``text_encoder/`` + ``tokenizer/``   per prompt (L ≤ 512, 4096),
                                (``UMT5EncoderModel``)               real tokens only
:class:`Wav2VecAudioEncoder`    wav2vec2 folder (``Wav2Vec2Model``)  per clip (L_a, 768), 50 tokens/s
==============================  ===================================  ==============================

The identity branch's face input (:mod:`.identity`) is made from a square crop around the
reference frame's face (:func:`crop_face`) in one of the :data:`FACE_FORMS`: ``clip`` = CLIP vision
tokens of the crop by the same :class:`CLIPImageEncoder` (for ``model.identity.encoder=precomputed``),
``pixels`` = the crop itself, 112×112 uint8 (for ``model.identity.encoder=arcface``, which runs
ArcFace on it). The encode pass, raw-mode training and ``ft-infer`` all crop through these functions.

Nothing here reaches a hub: every ``from_pretrained`` gets a local folder and
``local_files_only=True``. A missing or unloadable folder fails before anything heavy runs, with one
line naming the config key (``encoders.wan`` / ``encoders.wav2vec``). Output widths come from the
loaded models, so the tiny random encoders of the tests (:func:`save_tiny_encoders`) go through the
very same code as the real weights.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..media import AUDIO_RATE
from .arcface import ARCFACE_INPUT
from .build import resolve_dtype

#: Sub-folders of a diffusers-format Wan2.1 I2V folder that the encoders read.
WAN_PARTS = {"vae": "vae", "image": "image_encoder", "text": "text_encoder", "tokenizer": "tokenizer"}
ALL_ENCODERS = ("vae", "image", "text", "audio")
TEXT_TOKENS = 512
# OpenAI CLIP normalisation, which Wan's open-clip ViT-H/14 also uses (Wan clip.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WAN_LAYOUT_HINT = "a local Wan2.1-I2V diffusers folder (vae/, image_encoder/, text_encoder/, tokenizer/)"


class EncoderWeightsError(FileNotFoundError):
    """An encoder folder is missing or does not hold what the loader expects (message names the key)."""


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------
# wrappers


class WanVAEEncoder(nn.Module):
    """Encoder half of the Wan VAE: pixels in [-1, 1] → normalised latents.

    Latents are the posterior mean, ``(μ − latents_mean) / latents_std`` with the per-channel
    constants of the VAE's config (what Wan's own VAE wrapper and diffusers' Wan pipelines do).
    Frames are encoded causally in chunks 1, 4, 4, …, so latent frame 0 sees only video frame 0.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = _frozen(vae)
        cfg = vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape), persistent=False)
        self.z_dim = int(cfg.z_dim)
        self.spatial_stride = int(vae.spatial_compression_ratio)
        self.temporal_stride = int(cfg.scale_factor_temporal or 4)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F_lat, H_lat, W_lat) of a clip; raises for sizes the VAE cannot take exactly."""
        s, t = self.spatial_stride, self.temporal_stride
        if (num_frames - 1) % t or height % s or width % s:
            raise ValueError(
                f"clip of {num_frames}×{height}×{width}: frames must be {t}k+1 and height/width multiples of {s}"
            )
        return self.z_dim, (num_frames - 1) // t + 1, height // s, width // s

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``video`` (B, 3, F, H, W) in [-1, 1] → latents (B, 16, (F−1)/4+1, H/8, W/8) float32."""
        self.latent_shape(*video.shape[2:])
        device, dtype = _module_device_dtype(self.vae)
        mu = self.vae.encode(video.to(device, dtype)).latent_dist.mode()
        return (mu.float() - self.mean) / self.std

    def encode_condition(self, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The I2V condition ``VAE([first frame, zeros × (F−1)])`` (Wan image2video.py).

        ``first_frame`` (B, 3, H, W) in [-1, 1] → (B, 16, (F−1)/4+1, H/8, W/8).
        """
        b, c, h, w = first_frame.shape
        video = first_frame.new_zeros(b, c, num_frames, h, w)
        video[:, :, 0] = first_frame
        return self(video)


class CLIPImageEncoder(nn.Module):
    """CLIP vision tower → the image tokens of Wan's I2V cross-attention.

    Preprocessing follows Wan's own CLIP wrapper (Wan clip.py, which the released FantasyTalking
    used): the whole frame is resized (bicubic, no crop, aspect not kept) to the model's
    ``image_size``, then normalised with the CLIP mean/std. The output is the penultimate hidden
    state (``use_31_block`` in Wan, ``hidden_states[-2]`` in diffusers), with no final norm.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        self.model = _frozen(model)
        self.image_size = int(model.config.image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // int(self.model.config.patch_size)) ** 2 + 1

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) in [-1, 1] → tokens (B, 1 + (S/P)², D) float32 (257×1280 real)."""
        device, dtype = _module_device_dtype(self.model)
        x = images.to(device, torch.float32)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        out = self.model(pixel_values=x.to(dtype), output_hidden_states=True)
        return out.hidden_states[-2].float()


def clean_prompt(text: str) -> str:
    """Wan's ``prompt_clean`` without ftfy: unescape HTML twice, collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class UMT5TextEncoder(nn.Module):
    """umT5 encoder + tokenizer → prompt embeddings of the real tokens only.

    As in Wan's pipeline: the prompt is tokenised to ``max_length`` (512) with padding and
    truncation, encoded with the attention mask, and only the first ``mask.sum()`` tokens (the
    prompt and its ``</s>``) are kept; the DiT input zero-pads them back to 512.
    """

    def __init__(self, tokenizer, model: nn.Module, max_length: int = TEXT_TOKENS):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = _frozen(model)
        self.max_length = max_length

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """``prompts`` (B strings) → B float32 tensors (L_i ≤ 512, D); ``""`` gives the null text."""
        device, _ = _module_device_dtype(self.model)
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", max_length=self.max_length,
            truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        hidden = self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n].float() for h, n in zip(hidden, lengths)]


class Wav2VecAudioEncoder(nn.Module):
    """wav2vec2 ``last_hidden_state`` of 16 kHz mono audio, 50 tokens/s (or that of another model
    of the wav2vec2 family: HuBERT, WavLM; :func:`load_audio_encoder`).

    When the folder has a ``preprocessor_config.json`` (wav2vec2-base-960h does), its feature
    extractor normalises each waveform as the model was trained (zero mean, unit variance), as
    the released FantasyTalking inference does. Waveforms of equal length run as one batch;
    nothing is padded, so a clip's features never depend on its batch neighbours.
    """

    def __init__(self, model: nn.Module, feature_extractor=None):
        super().__init__()
        self.model = _frozen(model)
        self.feature_extractor = feature_extractor

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def forward(self, waveforms: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """B waveforms (N_i,) float in [-1, 1] at 16 kHz → B float32 tensors (L_i, D)."""
        device, dtype = _module_device_dtype(self.model)
        arrays = [np.asarray(w.cpu() if torch.is_tensor(w) else w, dtype=np.float32).reshape(-1) for w in waveforms]
        out: list[torch.Tensor | None] = [None] * len(arrays)
        by_length: dict[int, list[int]] = {}
        for i, a in enumerate(arrays):
            by_length.setdefault(a.shape[0], []).append(i)
        for idx in by_length.values():
            batch = [arrays[i] for i in idx]
            if self.feature_extractor is not None:
                values = self.feature_extractor(batch, sampling_rate=AUDIO_RATE, return_tensors="np").input_values
                x = torch.from_numpy(np.asarray(values, dtype=np.float32))
            else:
                x = torch.from_numpy(np.stack(batch))
            hidden = self.model(x.to(device, dtype)).last_hidden_state.float()
            for j, i in enumerate(idx):
                out[i] = hidden[j]
        return out  # type: ignore[return-value]


@dataclass
class FrozenEncoders:
    """The encoders that were asked for (others are None)."""

    vae: WanVAEEncoder | None = None
    image: CLIPImageEncoder | None = None
    text: UMT5TextEncoder | None = None
    audio: Wav2VecAudioEncoder | None = None

    def widths(self) -> dict[str, int]:
        """Output widths of the loaded encoders: ``image``/``text``/``audio`` (1280/4096/768 real)."""
        return {k: m.width for k, m in (("image", self.image), ("text", self.text), ("audio", self.audio)) if m}


# ----------------------------------------------------------------------------------------------
# one batch of clips → every conditioning tensor (the encode pass and raw-mode training share it)

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
    condition = torch.zeros_like(video)
    condition[:, :, 0] = video[:, :, 0]
    both = vae(torch.cat([video, condition]))
    masks = lip_masks.float().div(255.0) if lip_masks.dtype == torch.uint8 else lip_masks
    out = {
        "latents": both[:b],
        "image_latents": both[b:],
        "clip": image(video[:, :, 0]),
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
            out["face_pixels"] = face_crops(frames[:, 0].cpu().numpy(), face_boxes, face_margin, FACE_PIXELS_SIZE)
            return out
        # A clip without a known face box gets its CLIP image tokens: the identity branch's own
        # fallback, so such a clip trains exactly as it would without a `face` member.
        tokens = out["clip"].clone()
        have = [i for i in range(b) if face_boxes[i] is not None]
        if have:
            crops = face_crops(frames[have, 0].cpu().numpy(), [face_boxes[i] for i in have], face_margin)
            tokens[have] = image(crops.float().div(127.5).sub(1.0))
        out["face"] = tokens
    return out


# ----------------------------------------------------------------------------------------------
# loading


def _need_config(folder: Path, key: str, what: str, hint: str, files: Sequence[str] = ("config.json",)) -> Path:
    if not any((folder / f).is_file() for f in files):
        raise EncoderWeightsError(f"{key}: no {what} at {folder} (expected {' or '.join(files)}); point {key} at {hint}")
    return folder


def check_encoder_paths(
    wan: str | Path | None,
    wav2vec: str | Path | None,
    encoders: Sequence[str] = ALL_ENCODERS,
    key: str = "encoders",
) -> None:
    """Fail fast, before loading anything, if a folder an encoder needs is missing."""
    wanted = set(encoders)
    if wanted & {"vae", "image", "text"}:
        if not wan:
            raise EncoderWeightsError(f"{key}.wan: not set; point it at {WAN_LAYOUT_HINT}")
        root = Path(wan).expanduser()
        if not root.is_dir():
            raise EncoderWeightsError(f"{key}.wan: no folder {root}; point it at {WAN_LAYOUT_HINT}")
        parts = {"vae": ["vae"], "image": ["image"], "text": ["text", "tokenizer"]}
        for name in encoders:
            for part in parts.get(name, []):
                files = ("tokenizer_config.json", "tokenizer.json", "spiece.model") if part == "tokenizer" else ("config.json",)
                _need_config(root / WAN_PARTS[part], f"{key}.wan", f"{WAN_PARTS[part]}/", WAN_LAYOUT_HINT, files)
    if "audio" in wanted:
        if not wav2vec:
            raise EncoderWeightsError(f"{key}.wav2vec: not set; point it at a local wav2vec2 folder (e.g. wav2vec2-base-960h)")
        _need_config(Path(wav2vec).expanduser(), f"{key}.wav2vec", "wav2vec2 model", "a local wav2vec2 folder (e.g. wav2vec2-base-960h)")


def _load(key: str, folder: Path, what: str, loader):
    """Run a library loader; turn its deep errors into one line naming the key and folder."""
    try:
        return loader()
    except Exception as exc:  # library errors (bad config, wrong class, truncated weights)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EncoderWeightsError(
            f"{key}: cannot load {what} from {folder} ({exc.__class__.__name__}: {first[:200]})"
        ) from exc


def load_vae_encoder(wan: str | Path, device="cpu", dtype="float32", key: str = "encoders.wan") -> WanVAEEncoder:
    """``AutoencoderKLWan`` from ``<wan>/vae`` (float32 by default: the VAE is the precision-critical part)."""
    from diffusers import AutoencoderKLWan

    folder = _need_config(Path(wan).expanduser() / WAN_PARTS["vae"], key, "vae/", WAN_LAYOUT_HINT)
    vae = _load(key, folder, "AutoencoderKLWan", lambda: AutoencoderKLWan.from_pretrained(
        folder, torch_dtype=resolve_dtype(dtype), local_files_only=True))
    return WanVAEEncoder(vae).to(device)


def load_image_encoder(wan: str | Path, device="cpu", dtype="float32", key: str = "encoders.wan") -> CLIPImageEncoder:
    """``CLIPVisionModel`` from ``<wan>/image_encoder``; mean/std from ``<wan>/image_processor`` if present."""
    from transformers import CLIPVisionModel

    root = Path(wan).expanduser()
    folder = _need_config(root / WAN_PARTS["image"], key, "image_encoder/", WAN_LAYOUT_HINT)
    model = _load(key, folder, "CLIPVisionModel", lambda: CLIPVisionModel.from_pretrained(
        folder, dtype=resolve_dtype(dtype), local_files_only=True))
    mean, std = CLIP_MEAN, CLIP_STD
    processor = root / "image_processor" / "preprocessor_config.json"
    if processor.is_file():
        conf = json.loads(processor.read_text())
        mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
    return CLIPImageEncoder(model, mean, std).to(device)


def load_text_encoder(
    wan: str | Path, device="cpu", dtype="float32", max_length: int = TEXT_TOKENS, key: str = "encoders.wan"
) -> UMT5TextEncoder:
    """``UMT5EncoderModel`` from ``<wan>/text_encoder`` and its tokenizer from ``<wan>/tokenizer``."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = Path(wan).expanduser()
    tok_folder = _need_config(root / WAN_PARTS["tokenizer"], key, "tokenizer/", WAN_LAYOUT_HINT,
                              ("tokenizer_config.json", "tokenizer.json", "spiece.model"))
    folder = _need_config(root / WAN_PARTS["text"], key, "text_encoder/", WAN_LAYOUT_HINT)
    tokenizer = _load(key, tok_folder, "the umT5 tokenizer", lambda: AutoTokenizer.from_pretrained(
        tok_folder, local_files_only=True))
    model = _load(key, folder, "UMT5EncoderModel", lambda: UMT5EncoderModel.from_pretrained(
        folder, dtype=resolve_dtype(dtype), local_files_only=True))
    return UMT5TextEncoder(tokenizer, model, max_length).to(device)


def load_audio_encoder(wav2vec: str | Path, device="cpu", dtype="float32", key: str = "encoders.wav2vec") -> Wav2VecAudioEncoder:
    """The speech encoder of a local folder, plus its feature extractor if any.

    wav2vec2-base-960h is the released adapter's (a ``Wav2Vec2ForCTC`` checkpoint: its CTC head is
    dropped). Any model of the wav2vec2 family that ``transformers.AutoModel`` loads works too
    (HuBERT, WavLM, data2vec-audio, wav2vec2 XLS-R; e.g. a Chinese HuBERT to train for Chinese
    speech), provided it has wav2vec2's feature convolutions: the audio windows count 50
    tokens/s with their arithmetic (:data:`~ft_train.models.audio.WAV2VEC2_CONV`). Its
    ``hidden_size`` is ``model.audio_in_dim``.
    """
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    from .audio import WAV2VEC2_CONV

    folder = _need_config(Path(wav2vec).expanduser(), key, "wav2vec2 model",
                          "a local wav2vec2 folder (e.g. wav2vec2-base-960h)")
    config = _load(key, folder, "the model config", lambda: AutoConfig.from_pretrained(folder, local_files_only=True))
    conv = tuple(zip(getattr(config, "conv_kernel", ()), getattr(config, "conv_stride", ())))
    if conv != WAV2VEC2_CONV:
        raise EncoderWeightsError(
            f"{key}: {folder} holds a {config.model_type} model without wav2vec2's feature convolutions "
            f"(kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: 50 tokens/s, which the audio windows assume); "
            "use a wav2vec2, HuBERT or WavLM folder")
    model = _load(key, folder, f"the {config.model_type} model", lambda: AutoModel.from_pretrained(
        folder, dtype=resolve_dtype(dtype), local_files_only=True))
    extractor = None
    if (folder / "preprocessor_config.json").is_file():
        extractor = _load(key, folder, "the feature extractor", lambda: AutoFeatureExtractor.from_pretrained(
            folder, local_files_only=True))
    return Wav2VecAudioEncoder(model, extractor).to(device)


def load_encoders(
    wan: str | Path | None,
    wav2vec: str | Path | None,
    encoders: Sequence[str] = ALL_ENCODERS,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    vae_dtype: str | torch.dtype = "float32",
    key: str = "encoders",
) -> FrozenEncoders:
    """Load the requested encoders (``vae``, ``image``, ``text``, ``audio``), frozen, in eval mode.

    Args:
        wan: local diffusers-format Wan2.1 I2V folder (``vae/``, ``image_encoder/``,
            ``text_encoder/``, ``tokenizer/``); config key ``{key}.wan``.
        wav2vec: local wav2vec2 folder; config key ``{key}.wav2vec``.
        device: where the encoders run.
        dtype: weights of CLIP, umT5 and wav2vec2 (``bfloat16`` halves memory on GPU).
        vae_dtype: weights of the VAE.
    Every folder is checked before any weights are read.
    """
    unknown = set(encoders) - set(ALL_ENCODERS)
    if unknown:
        raise ValueError(f"{key}: unknown encoders {sorted(unknown)}; choose from {ALL_ENCODERS}")
    check_encoder_paths(wan, wav2vec, encoders, key)
    out = FrozenEncoders()
    if "vae" in encoders:
        out.vae = load_vae_encoder(wan, device, vae_dtype, f"{key}.wan")
    if "image" in encoders:
        out.image = load_image_encoder(wan, device, dtype, f"{key}.wan")
    if "text" in encoders:
        out.text = load_text_encoder(wan, device, dtype, key=f"{key}.wan")
    if "audio" in encoders:
        out.audio = load_audio_encoder(wav2vec, device, dtype, f"{key}.wav2vec")
    return out


# ----------------------------------------------------------------------------------------------
# tiny random encoders (tests, the CPU demo)

TINY_VOCAB = ("a person man woman is talking speaking speaks sings the an astronaut smiles "
              "and to camera in front of at looks").split()


def save_tiny_encoders(
    wan: str | Path,
    wav2vec: str | Path,
    image_dim: int = 1280,
    text_dim: int = 4096,
    audio_dim: int = 768,
    image_size: int = 224,
    patch_size: int = 14,
    seed: int = 0,
) -> None:
    """Write random tiny encoders in the real folder layouts, for tests and the CPU demo.

    ``wan`` gets ``vae/``, ``image_encoder/``, ``text_encoder/``, ``tokenizer/`` (a WordLevel
    tokenizer over a few words, built offline); ``wav2vec`` a ``Wav2Vec2Model`` with the real
    convolution stack (so token counts are real) and a feature extractor config. Widths default to
    the real ones, so their outputs fit the tiny DiT of ``conf/model/tiny.yaml``; everything else
    is one layer deep. They load back through :func:`load_encoders` like real weights.
    """
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel,
        Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model,
    )

    wan, wav2vec = Path(wan), Path(wav2vec)
    torch.manual_seed(seed)
    # The smallest VAE diffusers' own tests use: same strides (4, 8, 8) and z_dim 16 as the real one.
    AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(wan / WAN_PARTS["vae"])
    clip = CLIPVisionConfig(hidden_size=image_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, projection_dim=32)
    CLIPVisionModel(clip).save_pretrained(wan / WAN_PARTS["image"])

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(TINY_VOCAB))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=TEXT_TOKENS).save_pretrained(wan / WAN_PARTS["tokenizer"])
    t5 = UMT5Config(vocab_size=len(vocab), d_model=text_dim, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(t5).save_pretrained(wan / WAN_PARTS["text"])

    w2v = Wav2Vec2Config(hidden_size=audio_dim, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                         vocab_size=32)
    Wav2Vec2Model(w2v).save_pretrained(wav2vec)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=AUDIO_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(wav2vec)
