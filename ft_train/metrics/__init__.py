"""Validation metrics: FID, FVD, Sync-C/Sync-D (and the paper's IDC, SD/BD, Aes) as torchmetrics
``Metric``s, networks from local weight files."""

from ft_train.metrics.audio import AudioReadError, read_sync_audio, to_int16
from ft_train.metrics.facetrack import FaceTrack, TrackRules, build_tracks, face_tracks
from ft_train.metrics.fid import FIDInceptionV3, FrechetInceptionDistance, load_fid_inception
from ft_train.metrics.frechet import FrechetFeatureDistance, frechet_distance
from ft_train.metrics.fvd import (
    FrechetVideoDistance,
    clip_offset,
    load_i3d_torchscript,
    split_clips,
    styleganv_clip,
    styleganv_resize,
)
from ft_train.metrics.mfcc import syncnet_mfcc
from ft_train.metrics.portrait import AestheticScore, IdentityConsistency, SubjectBackgroundDynamics
from ft_train.metrics.sync import (
    SyncMetric,
    SyncResult,
    offset_search,
    resample_fps,
    score_face_tracks,
    sync_scores,
    syncnet_face_crops,
)
from ft_train.metrics.syncnet import SyncNet, load_syncnet

__all__ = [
    "AestheticScore",
    "IdentityConsistency",
    "SubjectBackgroundDynamics",
    "AudioReadError",
    "FaceTrack",
    "TrackRules",
    "build_tracks",
    "clip_offset",
    "face_tracks",
    "read_sync_audio",
    "score_face_tracks",
    "styleganv_clip",
    "styleganv_resize",
    "to_int16",
    "FIDInceptionV3",
    "FrechetFeatureDistance",
    "FrechetInceptionDistance",
    "FrechetVideoDistance",
    "SyncMetric",
    "SyncNet",
    "SyncResult",
    "frechet_distance",
    "load_fid_inception",
    "load_i3d_torchscript",
    "load_syncnet",
    "offset_search",
    "resample_fps",
    "split_clips",
    "sync_scores",
    "syncnet_face_crops",
    "syncnet_mfcc",
]
