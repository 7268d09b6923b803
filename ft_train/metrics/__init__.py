"""Validation metrics: FID, FVD, Sync-C/Sync-D as torchmetrics ``Metric``s, networks from local weight files."""

from ft_train.metrics.fid import FIDInceptionV3, FrechetInceptionDistance, load_fid_inception
from ft_train.metrics.frechet import FrechetFeatureDistance, frechet_distance
from ft_train.metrics.fvd import FrechetVideoDistance, load_i3d_torchscript, split_clips
from ft_train.metrics.mfcc import syncnet_mfcc
from ft_train.metrics.sync import (
    SyncMetric,
    SyncResult,
    offset_search,
    resample_fps,
    sync_scores,
    syncnet_face_crops,
)
from ft_train.metrics.syncnet import SyncNet, load_syncnet

__all__ = [
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
