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
