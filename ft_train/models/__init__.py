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
from .encoders import EncoderWeightsError, FrozenEncoders, load_encoders
from .arcface import IResNet, load_iresnet
from .build import build_model, load_transformer, model_summary
from .fantasytalking import FantasyTalkingDiT
from .identity import (
    FACE_ENCODERS,
    ArcFaceEncoder,
    FaceEncoder,
    FaceKV,
    IdentityConfig,
    IdentityModel,
    PrecomputedFaceFeatures,
    QFormer,
    build_face_encoder,
    register_face_encoder,
)
from .motion import DEFAULT_OMEGA, MotionConfig, MotionHook, MotionModel, check_motion

__all__ = [
    "DEFAULT_OMEGA",
    "FACE_ENCODERS",
    "ArcFaceEncoder",
    "FaceEncoder",
    "FaceKV",
    "IResNet",
    "IdentityConfig",
    "IdentityModel",
    "MotionConfig",
    "MotionHook",
    "MotionModel",
    "PrecomputedFaceFeatures",
    "QFormer",
    "build_face_encoder",
    "check_motion",
    "load_iresnet",
    "register_face_encoder",
    "EncoderWeightsError",
    "FrozenEncoders",
    "load_encoders",
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
