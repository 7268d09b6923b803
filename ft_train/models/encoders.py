"""The frozen conditioning encoders, loaded from local folders through the libraries' own loaders.

FantasyTalking conditions the Wan2.1 I2V DiT on four frozen networks; each is wrapped here in a
small ``nn.Module`` that owns its preprocessing and says its shapes:

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

What goes into them for a batch of clips (face crops, the audio window, lip masks on the latent
grid, the one call that makes every conditioning tensor) is :mod:`ft_train.data.clip_prep`.

Nothing here reaches a hub: every ``from_pretrained`` gets a local folder and
``local_files_only=True``. A missing or unloadable folder fails before anything heavy runs, with one
line naming the config key (``encoders.wan`` / ``encoders.wav2vec``). Output widths come from the
loaded models, so the tiny random encoders of the tests (:func:`ft_train.tiny.save_tiny_encoders`)
go through the very same code as the real weights.
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
