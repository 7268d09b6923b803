"""FVD: the StyleGAN-V TorchScript call convention with a stand-in TorchScript saved and loaded by path."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ft_train.metrics.fvd import FrechetVideoDistance, load_i3d_torchscript, split_clips


class StandInI3D(nn.Module):
    """Same signature as ``i3d_torchscript.pt``; refuses any call that is not the StyleGAN-V convention.

    Features: per-clip channel means and stds after the detector-side rescale/resize, projected
    to 400-d by a fixed linear map (deterministic, so shifted videos give a clearly positive FVD).
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 400)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if not (rescale and resize and return_features):
            raise RuntimeError("stand-in I3D: expected rescale=True, resize=True, return_features=True")
        if x.dtype != torch.uint8:
            raise RuntimeError("stand-in I3D: expected uint8 videos")
        x = x.float() / 255.0 * 2 - 1
        x = F.interpolate(x, size=[x.shape[2], 224, 224], mode="trilinear", align_corners=False)
        stats = torch.cat([x.mean(dim=[2, 3, 4]), x.std(dim=[2, 3, 4])], 1)
        return self.proj(stats)


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fvd") / "i3d_torchscript.pt"
    torch.jit.script(StandInI3D()).save(str(path))
    return path


def _clips(n, seed, shift=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 180, (n, 3, 16, 48, 64), generator=g) + shift).to(torch.uint8)


def test_fvd_identical_zero_and_shift_positive(i3d_file):
    fvd = FrechetVideoDistance(i3d_file)
    real = _clips(12, 0)
    fvd.update(real, real=True)
    fvd.update(real, real=False)
    assert abs(float(fvd.compute())) < 1e-6
    fvd.reset()
    fvd.update(real, real=True)
    fvd.update(_clips(12, 1, shift=60), real=False)
    assert float(fvd.compute()) > 1.0
    assert not any(k.startswith("net.") for k in fvd.state_dict())


def test_fvd_input_contract(i3d_file):
    fvd = FrechetVideoDistance(i3d_file)
    with pytest.raises(ValueError, match="16 frames"):
        fvd.update(_clips(2, 0)[:, :, :8], real=True)
    with pytest.raises(ValueError, match="uint8"):
        fvd.update(_clips(2, 0).float(), real=True)


def test_split_clips():
    video = torch.arange(40).view(1, 40, 1, 1).expand(3, 40, 2, 2)
    clips = split_clips(video)
    assert clips.shape == (2, 3, 16, 2, 2)
    assert clips[1, 0, :, 0, 0].tolist() == list(range(16, 32))


def test_loader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="i3d_missing.pt"):
        load_i3d_torchscript(tmp_path / "i3d_missing.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "not_script.pt")
    with pytest.raises(ValueError, match="not_script.pt"):
        load_i3d_torchscript(tmp_path / "not_script.pt")


# -- StyleGAN-V's protocol ---------------------------------------------------------------------------

def test_styleganv_resize_is_lanczos_short_side_then_centre_crop():
    """convert_videos_to_frames.py: torchvision resize(r) on a PIL image (short side → r, long side
    int(r·long/short), Lanczos), then center_crop(r) at round((size − r)/2)."""
    import numpy as np
    import PIL.Image

    from ft_train.metrics.fvd import styleganv_resize

    g = np.random.default_rng(0)
    frames = torch.from_numpy(g.integers(0, 255, (2, 3, 48, 64), dtype=np.uint8))  # landscape 64×48
    out = styleganv_resize(frames, 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    img = PIL.Image.fromarray(frames[1].permute(1, 2, 0).numpy()).resize((42, 32), PIL.Image.LANCZOS)
    assert torch.equal(out[1], torch.from_numpy(np.asarray(img)[:, 5:37]).permute(2, 0, 1))
    tall = styleganv_resize(frames.transpose(2, 3).contiguous(), 32)  # portrait: crop rows instead
    assert tall.shape == (2, 3, 32, 32)
    assert torch.equal(styleganv_resize(out, 32), out)  # already at the resolution: untouched


def test_clip_offsets_are_seeded_per_video_and_cover_the_range():
    from ft_train.metrics.fvd import clip_offset

    starts = [clip_offset(40, f"v{i}.mp4", seed=0) for i in range(300)]
    assert min(starts) == 0 and max(starts) == 24  # randint(0, T − 16), both ends included
    assert starts == [clip_offset(40, f"v{i}.mp4", seed=0) for i in range(300)]
    assert starts != [clip_offset(40, f"v{i}.mp4", seed=1) for i in range(300)]


def _frechet_like_styleganv(feat_real, feat_gen):
    """StyleGAN-V's compute_fvd: FeatureStats.get_mean_cov (raw sums / N) and sqrtm of the product."""
    import numpy as np
    import scipy.linalg

    stats = []
    for f in (feat_real, feat_gen):
        f = f.astype(np.float64)
        mean = f.sum(0) / len(f)
        cov = f.T @ f / len(f) - np.outer(mean, mean)
        stats.append((mean, cov))
    (mu_real, s_real), (mu_gen, s_gen) = stats
    m = np.square(mu_gen - mu_real).sum()
    s, _ = scipy.linalg.sqrtm(np.dot(s_gen, s_real), disp=False)
    return float(np.real(m + np.trace(s_gen + s_real - s * 2)))


def test_stylegan_v_protocol_end_to_end(i3d_file, caplog):
    """VideoMetrics under fvd_protocol=stylegan_v equals the protocol written out by hand: the
    generated video's frames [0, 16), the reference's 16 frames from its seeded start, both
    Lanczos-resized to 64 (here), the detector with StyleGAN-V's flags, covariances over N, and
    StyleGAN-V's Fréchet formula. The order the videos come in does not change it."""
    import numpy as np

    from ft_train.metrics.fvd import clip_offset, styleganv_resize
    from ft_train.metrics.video import VideoMetrics, build_metric

    g = np.random.default_rng(0)
    videos = {}
    for i, t in enumerate((20, 31, 16, 25)):
        gen = g.integers(0, 255, (t, 40, 56, 3), dtype=np.uint8)
        ref = np.clip(gen.astype(int) + 20 * i, 0, 255).astype(np.uint8)
        videos[f"v{i}.mp4"] = (torch.from_numpy(gen), torch.from_numpy(ref))

    def run(order):
        vm = VideoMetrics(fvd=build_metric(str(i3d_file), "fvd", "fvd"), fvd_resolution=64, fvd_seed=3)
        for name in order:
            vm.update(*videos[name], 25.0, None, key=name)
        return vm.compute()["fvd"], vm

    got, vm = run(sorted(videos))
    assert vm.protocol()["fvd_protocol"] == "stylegan_v" and vm.protocol()["fvd_covariance"] == "biased (N)"
    assert run(sorted(videos, reverse=True))[0] == pytest.approx(got, rel=1e-9)

    net = load_i3d_torchscript(i3d_file)
    feats = {"real": [], "gen": []}
    for name, (gen, ref) in sorted(videos.items()):
        start = clip_offset(ref.shape[0], name, seed=3)
        for side, frames in (("gen", gen[:16]), ("real", ref[start : start + 16])):
            clip = styleganv_resize(frames.permute(0, 3, 1, 2), 64).transpose(0, 1)[None]
            with torch.no_grad():
                feats[side].append(net(clip, rescale=True, resize=True, return_features=True).double().numpy())
    want = _frechet_like_styleganv(np.concatenate(feats["real"]), np.concatenate(feats["gen"]))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)

    one = VideoMetrics(fvd=build_metric(str(i3d_file), "fvd", "fvd"), fvd_resolution=64)
    one.update(*videos["v0.mp4"], 25.0, None, key="v0.mp4")
    one.update(videos["v2.mp4"][0][:10], videos["v2.mp4"][1][:10], 25.0, None, key="short")
    with caplog.at_level("WARNING"):
        assert np.isnan(one.compute()["fvd"])
    assert one.fvd_too_short == 1
    assert "need at least 2 real samples, got 1" in caplog.text and "one clip per video" in caplog.text
