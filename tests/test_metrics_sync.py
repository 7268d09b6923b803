"""Sync-C / Sync-D: SyncNet layout and loading, the offset search's sign, and end-to-end on a synthetic clip."""

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from ft_train.metrics.sync import (
    SyncMetric,
    num_sync_windows,
    offset_search,
    resample_fps,
    sync_scores,
    syncnet_face_crops,
)
from ft_train.metrics.syncnet import SyncNet, load_syncnet


@pytest.fixture(scope="module")
def syncnet_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    torch.save(SyncNet().state_dict(), path)
    return path


# -- architecture and weights ----------------------------------------------------------------------

def test_layout_matches_reference():
    net = SyncNet().eval()
    sd = net.state_dict()
    assert len(sd) == 102
    assert sum(p.numel() for p in net.parameters()) == 13_631_616
    for key in ("netcnnaud.0.weight", "netcnnaud.18.weight", "netfcaud.3.weight", "netfclip.1.running_var",
                "netcnnlip.0.weight", "netcnnlip.18.weight", "netcnnlip.19.running_mean"):
        assert key in sd
    with torch.no_grad():
        assert net.forward_lip(torch.rand(2, 3, 5, 224, 224) * 255).shape == (2, 1024)
        assert net.forward_aud(torch.randn(2, 1, 13, 20)).shape == (2, 1024)
        with pytest.raises(RuntimeError):
            net.forward_lip(torch.rand(1, 3, 6, 224, 224))


def test_loads_through_the_real_loader(syncnet_file):
    net = load_syncnet(syncnet_file)
    saved = torch.load(syncnet_file)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_file_without_batchnorm_counters_loads(tmp_path, syncnet_file):
    """syncnet_v2.model predates BatchNorm's num_batches_tracked: such a file loads, and every
    tensor it holds (running statistics moved off their init values, so they count) is the net's."""
    g = torch.Generator().manual_seed(5)
    sd = {k: v for k, v in torch.load(syncnet_file).items() if not k.endswith("num_batches_tracked")}
    for k in sd:
        if k.endswith(("running_mean", "running_var")):
            sd[k] = torch.rand(sd[k].shape, generator=g) + 0.5
    torch.save(sd, tmp_path / "old.model")
    loaded = load_syncnet(tmp_path / "old.model").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert {k for k in loaded if not k.endswith("num_batches_tracked")} == set(sd)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda sd: sd.pop("netcnnlip.0.weight"), "missing keys: netcnnlip.0.weight"),
        (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), "unexpected keys: extra.weight"),
        (lambda sd: sd.__setitem__("netfcaud.0.bias", torch.zeros(7)), r"wrong shapes .*netfcaud.0.bias \(7,\)"),
    ],
)
def test_bad_weight_file_fails_in_one_line_naming_the_file(tmp_path, syncnet_file, damage, message):
    sd = torch.load(syncnet_file)
    damage(sd)
    path = tmp_path / "bad.model"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=message) as err:
        load_syncnet(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.model"):
        load_syncnet(tmp_path / "nothere.model")


# -- offset search ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [-5, -2, 0, 3, 7])
def test_offset_search_recovers_a_known_shift_with_its_sign(k):
    # audio feature at window t is the video feature of window t − k: audio lags video by k → offset −k
    g = torch.Generator().manual_seed(k + 10)
    n, d, margin = 200, 64, 20
    base = torch.randn(n + 2 * margin, d, generator=g)
    t = torch.arange(n) + margin
    lip, aud = base[t], base[t - k]
    res = offset_search(lip, aud, vshift=15)
    assert res.offset == -k
    assert res.confidence > 5
    assert res.mean_dists.shape == (31,)
    if k == 0:
        assert res.min_dist == pytest.approx(8e-6, rel=0.01)  # sqrt(D)·eps of pairwise_distance


def test_window_count_matches_reference():
    # min(frames, samples // 640) − 5, the reference's range(0, lastframe)
    assert num_sync_windows(50, 32000) == 45
    assert num_sync_windows(50, 20000) == 26
    assert num_sync_windows(5, 32000) == 0


# -- end to end with a stand-in encoder ------------------------------------------------------------

class BrightnessEnergyEncoder(nn.Module):
    """Stand-in SyncNet: lips → per-frame mean brightness; audio → per-video-frame mean of MFCC c0 (log energy).

    Both are centred and normalised over the 5 frames of a window, so matching windows are close.
    """

    @staticmethod
    def _norm(x):
        x = x - x.mean(1, keepdim=True)
        return x / (x.norm(dim=1, keepdim=True) + 1e-8)

    def forward_lip(self, x):  # (N, 3, 5, 224, 224)
        assert x.shape[1:] == (3, 5, 224, 224)
        return self._norm(x.mean(dim=(1, 3, 4)))

    def forward_aud(self, x):  # (N, 1, 13, 20)
        assert x.shape[1:] == (1, 13, 20)
        return self._norm(x[:, 0, 0, :].reshape(-1, 5, 4).mean(-1))


def _synthetic_clip(k, n_frames=150, seed=0):
    """Grey frames whose brightness follows the audio envelope delayed by k frames (video lags by k)."""
    g = np.random.default_rng(seed)
    s = g.uniform(0.2, 1.0, n_frames + 40)  # s[i + 20] is the level at frame i
    level = np.array([s[t - k + 20] for t in range(n_frames)])
    frames = torch.from_numpy(np.round(255 * level).astype(np.uint8))[:, None, None, None].expand(n_frames, 3, 32, 32)
    n = np.arange(n_frames * 640)
    amp = np.repeat(s[20 : 20 + n_frames], 640)
    audio = (0.5 * amp * np.sin(2 * np.pi * 200 * n / 16000)).astype(np.float32)
    return frames.contiguous(), audio


@pytest.mark.parametrize("k", [-4, 0, 2, 6])
def test_end_to_end_delayed_envelope_gives_the_delay(k):
    frames, audio = _synthetic_clip(k)
    res = sync_scores(BrightnessEnergyEncoder(), frames, audio)
    assert res.offset == k
    assert res.num_windows == 145
    assert res.confidence > 0.5


def test_metric_averages_videos_counts_skips_and_merges():
    enc = BrightnessEnergyEncoder()
    clips = [_synthetic_clip(k, n_frames=60, seed=k + 3) for k in (0, 2, 5)]
    whole = SyncMetric(net=enc, crop="none")  # the synthetic clips are crops already
    for f, a in clips:
        whole.update(f, a)
    whole.update(clips[0][0][:5], clips[0][1][: 5 * 640])  # no full window: skipped, not averaged
    out = whole.compute()
    assert int(out["videos"]) == 3 and int(out["skipped"]) == 1
    assert float(out["av_offset"]) == pytest.approx((0 + 2 + 5) / 3)
    singles = [sync_scores(enc, f, a) for f, a in clips]
    assert float(out["sync_c"]) == pytest.approx(np.mean([r.confidence for r in singles]), rel=1e-9)
    assert float(out["sync_d"]) == pytest.approx(np.mean([r.min_dist for r in singles]), rel=1e-9)

    a, b = SyncMetric(net=enc, crop="none"), SyncMetric(net=enc, crop="none")
    a.update(*clips[0])
    b.update(*clips[1])
    b.update(*clips[2])
    a.merge_state(b)
    merged = a.compute()
    assert float(merged["sync_c"]) == pytest.approx(float(out["sync_c"]), rel=1e-12)
    assert int(merged["videos"]) == 3


def test_random_syncnet_end_to_end_through_weights_file(syncnet_file):
    """SyncMetric from the weights file equals the reference's procedure written out here: the
    file's SyncNet on each 5-frame BGR window and its 20 MFCC columns, then for each candidate
    offset the mean distance of lip window i to audio window i + j − 15 (zeros outside)."""
    from ft_train.metrics.mfcc import syncnet_mfcc

    frames, audio = _synthetic_clip(0, n_frames=12)
    m = SyncMetric(weights=syncnet_file, crop="none")
    m.update(frames, audio)
    out = m.compute()
    assert not any(k.startswith("net.") for k in m.state_dict())

    net = SyncNet().eval()
    net.load_state_dict(torch.load(syncnet_file))
    video = torch.nn.functional.interpolate(frames.flip(1).float(), size=(224, 224), mode="bilinear", align_corners=False)
    mfcc = torch.from_numpy(syncnet_mfcc(audio)).float().T
    windows = min(len(frames), len(audio) // 640) - 5
    assert windows == 7
    with torch.no_grad():
        lip = net.forward_lip(torch.stack([video[v : v + 5].transpose(0, 1) for v in range(windows)])).double()
        aud = net.forward_aud(torch.stack([mfcc[None, :, 4 * v : 4 * v + 20] for v in range(windows)])).double()
    mean = []
    for j in range(31):
        dists = []
        for i in range(windows):
            a = i + j - 15
            other = aud[a] if 0 <= a < windows else torch.zeros_like(aud[0])
            dists.append(float(torch.sqrt(((lip[i] - other + 1e-6) ** 2).sum())))
        mean.append(sum(dists) / windows)
    best = min(range(31), key=lambda j: mean[j])
    assert int(out["videos"]) == 1 and int(out["skipped"]) == 0
    assert float(out["av_offset"]) == 15 - best
    assert float(out["sync_d"]) == pytest.approx(mean[best], rel=1e-4)
    assert float(out["sync_c"]) == pytest.approx(sorted(mean)[15] - mean[best], rel=1e-3, abs=1e-5)


def test_rejects_non_uint8_frames():
    with pytest.raises(ValueError, match="uint8 RGB"):
        sync_scores(BrightnessEnergyEncoder(), torch.rand(20, 3, 32, 32), np.zeros(20 * 640, np.int16))


# -- crops and frame rate --------------------------------------------------------------------------

def test_face_crop_geometry_matches_run_pipeline():
    g = np.random.default_rng(0)
    img = g.integers(0, 255, (200, 240, 3), dtype=np.uint8)
    frames = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(15, 1, 1, 1)
    # box 100×80 centred at (120, 100): s = 50;
    # rows [cy − s, cy + 1.8s) = [50, 190), cols [cx − 1.4s, cx + 1.4s) = [50, 190)
    boxes = np.tile([70.0, 60.0, 170.0, 140.0], (15, 1))
    crops = syncnet_face_crops(frames, boxes)
    assert crops.shape == (15, 3, 224, 224) and crops.dtype == torch.uint8
    expected = cv2.resize(img[50:190, 50:190], (224, 224))
    assert torch.equal(crops[7].permute(1, 2, 0), torch.from_numpy(expected))
    # a box at the border pulls in the grey (110) padding
    edge = syncnet_face_crops(frames, np.tile([0.0, 0.0, 60.0, 60.0], (15, 1)))
    assert (edge[0, :, :10, :10] == 110).all()


def test_resample_fps_nearest_frame():
    frames = torch.arange(81)
    out = resample_fps(frames, 23, 25)
    assert len(out) == 88
    assert out[0] == 0 and out[-1] == 80 and torch.all(out[1:] >= out[:-1])
    assert torch.equal(resample_fps(frames, 25, 25), frames)
