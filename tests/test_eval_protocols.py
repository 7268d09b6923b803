"""ft-eval and validation under the reference protocols: what is recorded, what a damaged audio track
costs (only Sync), and FID's frame count."""

import json
import math
import shutil

import pytest
import torch

from ft_train.eval import evaluate
from ft_train.lit.validation import ValidationCallback
from ft_train.metrics import FrechetFeatureDistance, SyncMetric
from ft_train.metrics.video import VideoMetrics

from .test_metrics_audio import damaged_audio_mp4
from .test_metrics_fid import TinyExtractor
from .test_metrics_sync import BrightnessEnergyEncoder
from .test_validation import _video_folder, i3d_file  # noqa: F401  (fixture)


def test_damaged_audio_is_scored_by_fid_and_fvd_and_counted_for_sync(tmp_path, i3d_file):  # noqa: F811
    gen = _video_folder(tmp_path / "gen")
    damaged_audio_mp4(gen / "d.mp4")
    ref = tmp_path / "ref"
    shutil.copytree(gen, ref)
    res = evaluate(gen, ref, fid=FrechetFeatureDistance(TinyExtractor(), 16), fvd=str(i3d_file),
                   sync=SyncMetric(net=BrightnessEnergyEncoder(), crop="none"), fvd_resolution=64)
    assert res["pairs"] == 4 and not res["skipped"]  # the damaged file's frames are in FID/FVD
    assert res["sync_no_audio"] == 1 and list(res["audio_errors"]) == ["d.mp4"]
    assert "audio track is damaged" in res["audio_errors"]["d.mp4"]
    m = res["metrics"]
    assert all(math.isfinite(m[k]) for k in ("fid", "fvd", "sync_c", "sync_d"))
    assert int(res["sync_too_short"]) == 0

    written = json.loads((gen / "metrics.json").read_text())
    assert written["protocol"] == {
        "fid_frames": "all", "fvd_protocol": "stylegan_v", "fvd_resolution": 64, "fvd_seed": 0,
        "fvd_covariance": "biased (N)", "sync_crop": "none",
    }


def test_fid_frames_all_feeds_every_frame_and_bad_values_name_the_key(tmp_path):
    frames = torch.randint(0, 255, (21, 16, 16, 3), dtype=torch.uint8)
    for value, n in (("all", 21), (None, 21), (8, 8)):
        vm = VideoMetrics(fid=FrechetFeatureDistance(TinyExtractor(), 16), fid_frames=value)
        vm.update(frames, frames, 25.0, None)
        assert int(vm.metrics["fid"].fake_n) == n and int(vm.metrics["fid"].real_n) == n
    with pytest.raises(ValueError, match=r"callbacks\.validation\.fid_frames: expected a number of frames or 'all'"):
        ValidationCallback(shards="x", vae=str(tmp_path), fid=FrechetFeatureDistance(TinyExtractor(), 16),
                           fid_frames="most")
    with pytest.raises(ValueError, match=r"callbacks\.validation\.fvd_protocol: 'best' is not one of"):
        ValidationCallback(shards="x", vae=str(tmp_path), fid=FrechetFeatureDistance(TinyExtractor(), 16),
                           fvd_protocol="best")
