"""FID: the Inception layout of the weight file, pytorch-fid's resize, loading through the path, torchmetrics parity."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ft_train.metrics.fid import FIDInceptionV3, FrechetInceptionDistance, fid_preprocess, load_fid_inception
from ft_train.metrics.frechet import FrechetFeatureDistance


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    # random init: only the plumbing is tested; real weights are pt_inception-2015-12-05-6726825d.pth
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


def test_state_dict_layout_matches_the_weight_file():
    sd = FIDInceptionV3().state_dict()
    assert len(sd) == 566  # torch-fidelity's conversion: 94 conv+BN units × 6 tensors + fc
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert "AuxLogits.fc.weight" not in sd
    assert FIDInceptionV3.num_features == 2048


def test_resize_is_bilinear_without_antialias():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 598, 598), dtype=torch.uint8, generator=g)
    # an exact 2× downscale with align_corners=False samples between pixel pairs: the 2×2 block mean;
    # an antialiased resize would spread wider
    block_mean = F.avg_pool2d(x.float() / 255, 2)
    torch.testing.assert_close(fid_preprocess(x), 2 * block_mean - 1, atol=1e-6, rtol=0)
    antialiased = F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", antialias=True)
    assert (fid_preprocess(x) - (2 * antialiased - 1)).abs().max() > 1e-2
    at_299 = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=g)
    torch.testing.assert_close(fid_preprocess(at_299), at_299.float() / 255 * 2 - 1)
    with pytest.raises(ValueError, match="uint8"):
        fid_preprocess(x.float())


def test_fid_through_the_weights_path(inception_file):
    # full-size random Inception and a 2048-d Fréchet distance: ~10 s on 2 cores, mostly the eigh
    fid = FrechetInceptionDistance(inception_file)
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8, generator=g)
    fid.update(frames, real=True)
    fid.update(frames, real=False)
    assert abs(float(fid.compute())) < 1e-6
    assert not any(k.startswith("net.") for k in fid.state_dict())
    assert torch.equal(fid.net.fc.weight, torch.load(inception_file)["fc.weight"])


def test_pytorch_fid_style_file_without_bn_counters_loads(tmp_path, inception_file):
    """pytorch-fid's file has no BatchNorm num_batches_tracked: it loads, and every tensor it holds
    (running statistics moved off their init values, so they count) is the net's."""
    g = torch.Generator().manual_seed(5)
    sd = {k: v for k, v in torch.load(inception_file).items() if not k.endswith("num_batches_tracked")}
    for k in sd:
        if k.endswith(("running_mean", "running_var")):
            sd[k] = torch.rand(sd[k].shape, generator=g) + 0.5
    torch.save(sd, tmp_path / "pt_inception.pth")
    loaded = load_fid_inception(tmp_path / "pt_inception.pth").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert {k for k in loaded if not k.endswith("num_batches_tracked")} == set(sd)


def test_bad_weight_file_fails_clearly(tmp_path, inception_file):
    sd = torch.load(inception_file)
    del sd["Mixed_5b.branch1x1.conv.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth .*missing keys: Mixed_5b\.branch1x1\.conv\.weight"):
        load_fid_inception(tmp_path / "broken.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_fid_inception(tmp_path / "garbage.pth")


class TinyExtractor(nn.Module):
    """uint8 frames → 16-d: a strided conv and a global mean (sanely initialised, so shifts show)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, stride=2)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))


def test_frechet_matches_torchmetrics_fid_with_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance as TorchmetricsFID

    g = torch.Generator().manual_seed(2)
    real = torch.randint(0, 196, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    fake = (torch.randint(0, 196, (40, 3, 32, 32), dtype=torch.uint8, generator=g) + 60).to(torch.uint8)
    ours, theirs = FrechetFeatureDistance(TinyExtractor(), 16), TorchmetricsFID(feature=TinyExtractor())
    for m in (ours, theirs):
        m.update(real, real=True)
        m.update(fake, real=False)
    assert float(ours.compute()) > 0.05
    assert float(ours.compute()) == pytest.approx(float(theirs.compute()), rel=1e-4)


def test_inception_works_as_torchmetrics_custom_feature():
    from torchmetrics.image.fid import FrechetInceptionDistance as TorchmetricsFID

    # accepted as `feature` (uint8 input, num_features known); compute() is covered by the tiny parity test
    m = TorchmetricsFID(feature=FIDInceptionV3().eval())
    m.update(torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8), real=True)
    assert int(m.real_features_num_samples) == 2 and m.real_features_sum.shape == (2048,)
