"""Networks as plain ``nn.Module``s (no Lightning imports here)."""

from .adapter import AdapterContext, AudioKV, FantasyTalkingAttnProcessor, audio_attention
from .audio import (
    AudioProjModel,
    audio_window_index,
    audio_window_ranges,
    clip_audio_tokens,
    split_audio_windows,
    wav2vec_num_tokens,
)
from .encoders import (
    EncoderWeightsError,
    FrozenEncoders,
    encode_clips,
    load_encoders,
    lip_mask_to_latent,
    save_tiny_encoders,
)
from .fantasytalking import FantasyTalkingDiT, build_model, load_transformer, model_summary

__all__ = [
    "EncoderWeightsError",
    "FrozenEncoders",
    "encode_clips",
    "load_encoders",
    "lip_mask_to_latent",
    "save_tiny_encoders",
    "AdapterContext",
    "AudioKV",
    "AudioProjModel",
    "FantasyTalkingAttnProcessor",
    "FantasyTalkingDiT",
    "audio_attention",
    "audio_window_index",
    "audio_window_ranges",
    "build_model",
    "clip_audio_tokens",
    "load_transformer",
    "model_summary",
    "split_audio_windows",
    "wav2vec_num_tokens",
]
