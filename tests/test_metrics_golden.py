"""Golden comparisons with the reference implementations, whose code is not packaged: numbers made
once by running the reference code on a small fixed input with seeded random weights (the scripts
in tests/assets/golden/ say how), compared here with ours. Tolerance: 1e-3 absolute on scores."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).parent / "assets" / "golden"
FVD_SEED = 7


# -- FID ----------------------------------------------------------------------------------------------

def fid_golden_input() -> tuple[np.ndarray, np.ndarray]:
    """Three real and three generated uint8 RGB images (N, 3, 48, 64), seeded (resized to 299 inside)."""
    g = np.random.default_rng(99)
    base = g.integers(0, 200, (1, 3, 6, 8)).repeat(8, 2).repeat(8, 3)
    real = np.clip(base + g.integers(0, 56, (3, 3, 48, 64)), 0, 255).astype(np.uint8)
    fake = np.clip(base[:, ::-1] + g.integers(0, 56, (3, 3, 48, 64)), 0, 255).astype(np.uint8)
    return real, fake


def seeded_inception_state() -> dict[str, torch.Tensor]:
    """FID Inception weights from a seeded NumPy generator (the same on any torch version): convs
    N(0, 2/fan_in) so activations neither vanish nor explode, BatchNorm at its initial state."""
    from ft_train.metrics.fid import FIDInceptionV3

    g = np.random.default_rng(3)
    state = {}
    for name, t in FIDInceptionV3().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = torch.ones(t.shape)
        elif name.endswith(("running_mean", "bn.bias")):
            state[name] = torch.zeros(t.shape)
        elif t.ndim == 1:
            state[name] = torch.from_numpy(g.normal(0.0, 0.01, t.shape)).float()
        else:
            fan_in = int(np.prod(t.shape[1:]))
            state[name] = torch.from_numpy(g.standard_normal(t.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in)))
    return state


def test_fid_features_and_score_match_pytorch_fid(tmp_path):
    """pytorch-fid itself cannot be installed beside this torch (it needs torchvision), so its
    features and score were computed once (tests/assets/golden/make_fid_golden.py) and stored."""
    from ft_train.metrics.fid import FrechetInceptionDistance

    golden = json.loads((GOLDEN / "fid_pytorch_fid.json").read_text())
    want = np.load(GOLDEN / "fid_pytorch_fid_features.npy")
    path = tmp_path / "inception.pth"
    torch.save(seeded_inception_state(), path)
    real, fake = fid_golden_input()
    m = FrechetInceptionDistance(path)  # through the weights loader
    with torch.no_grad():
        got = m.net(torch.from_numpy(np.concatenate([real, fake]))).numpy()
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
    # the score from those features, through the Metric's states (one Inception pass is ~30 s here)
    m.net = torch.nn.Identity()
    m.update(torch.from_numpy(got[:3]), real=True)
    m.update(torch.from_numpy(got[3:]), real=False)
    assert float(m.compute()) == pytest.approx(golden["fid"], abs=1e-3)


def fvd_golden_input() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four (generated, reference) uint8 videos (T, 128, 128, 3) of 16 to 31 frames, seeded."""
    g = np.random.default_rng(2024)
    out = {}
    for i, t in enumerate((20, 31, 16, 25)):
        base = g.integers(0, 200, (1, 8, 8, 3)).repeat(16, 1).repeat(16, 2)
        motion = g.integers(0, 40, (t, 1, 1, 1))
        gen = np.clip(base + motion + g.integers(0, 30, (t, 128, 128, 3)), 0, 255).astype(np.uint8)
        ref = np.clip(base + 15 * i + motion[::-1] + g.integers(0, 30, (t, 128, 128, 3)), 0, 255).astype(np.uint8)
        out[f"video{i}"] = (gen, ref)
    return out


def test_fvd_matches_stylegan_v_code(tmp_path):
    from ft_train.metrics.fvd import clip_offset
    from ft_train.metrics.video import VideoMetrics, build_metric

    from .test_metrics_fvd import StandInI3D

    golden = json.loads((GOLDEN / "fvd_stylegan_v.json").read_text())
    path = tmp_path / "i3d.pt"
    torch.jit.script(StandInI3D()).save(str(path))
    vm = VideoMetrics(fvd=build_metric(str(path), "fvd", "fvd"), fvd_resolution=128, fvd_seed=FVD_SEED)
    for name, (gen, ref) in sorted(fvd_golden_input().items()):
        assert clip_offset(len(ref), name, FVD_SEED) == golden["real_clip_starts"][name]
        vm.update(torch.from_numpy(gen), torch.from_numpy(ref), 25.0, None, key=name)
    assert vm.compute()["fvd"] == pytest.approx(golden["fvd"], abs=1e-3)


# -- SyncNet ------------------------------------------------------------------------------------------

SYNC_INPUT = GOLDEN / "sync_input.mp4"  # 224×224, 25 fps, 48 kHz stereo AAC with different channels


def seeded_syncnet_state() -> dict[str, torch.Tensor]:
    """SyncNet weights from a seeded NumPy generator (the same on any torch version): weights
    N(0, 1/fan_in), biases N(0, 0.01), BatchNorm at its initial state."""
    from ft_train.metrics.syncnet import SyncNet

    g = np.random.default_rng(11)
    state = {}
    for name, t in SyncNet().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = torch.ones(t.shape)
        elif name.endswith("running_mean"):
            state[name] = torch.zeros(t.shape)
        elif t.ndim == 1:  # biases, BN weights
            state[name] = torch.from_numpy(g.normal(1.0 if "netcnn" in name and _is_bn(name) else 0.0, 0.1, t.shape)).float()
        else:
            fan_in = int(np.prod(t.shape[1:]))
            state[name] = torch.from_numpy(g.normal(0.0, 1.0 / np.sqrt(fan_in), t.shape)).float()
    return state


def _is_bn(name: str) -> bool:
    from ft_train.metrics.syncnet import SyncNet

    module = SyncNet().get_submodule(name.rsplit(".", 1)[0])
    return isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))


def reference_frames(video, out_dir):
    """The frames exactly as syncnet_python's evaluate reads them: ffmpeg to JPEG, cv2.imread (BGR)."""
    import subprocess

    import cv2

    from ft_train.metrics.audio import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-i", str(video), "-threads", "1", "-f", "image2",
                    str(out_dir / "%06d.jpg")], check=True)
    return np.stack([cv2.imread(str(p)) for p in sorted(out_dir.glob("*.jpg"))])


def test_sync_matches_syncnet_python_code(tmp_path):
    from ft_train.metrics.audio import read_sync_audio
    from ft_train.metrics.sync import SyncMetric
    from ft_train.metrics.syncnet import SyncNet

    golden = json.loads((GOLDEN / "sync_syncnet_python.json").read_text())
    net = SyncNet()
    net.load_state_dict(seeded_syncnet_state())
    bgr = reference_frames(SYNC_INPUT, tmp_path)
    frames = torch.from_numpy(bgr[..., ::-1].copy()).permute(0, 3, 1, 2).contiguous()  # RGB, as ours takes it
    m = SyncMetric(net=net, crop="none")
    m.update(frames, read_sync_audio(SYNC_INPUT))
    out = m.compute()
    assert int(out["videos"]) == 1
    assert float(out["av_offset"]) == golden["offset"]
    assert float(out["sync_d"]) == pytest.approx(golden["min_dist"], abs=1e-3)
    assert float(out["sync_c"]) == pytest.approx(golden["confidence"], abs=1e-3)
