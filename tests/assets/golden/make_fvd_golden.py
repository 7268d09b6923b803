"""Made tests/assets/golden/fvd_stylegan_v.json once, from StyleGAN-V's own FVD code.

Run: python tests/assets/golden/make_fvd_golden.py STYLEGAN_V_CHECKOUT (a checkout of
universome/stylegan-v; not needed by the tests). It writes the fixed input of
tests/test_metrics_golden.py (seeded uint8 frames, already square at 128 px so StyleGAN-V's
dataset takes them as stored) as PNG folders in its layout, saves the test's stand-in I3D
TorchScript (seeded random weights), and runs ``compute_fvd`` (``fvd2048_16f``'s call,
``generator_as_dataset=True`` as ``calc_metrics_for_dataset.py`` does) on CPU. Its unseeded
``random.randint`` draw for each real clip's start is answered with ``clip_offset``'s seeded one
for that video (video folders sorted by name = the dataset's index order).
"""

import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from ft_train.metrics.fvd import clip_offset  # noqa: E402
from tests.test_metrics_golden import FVD_SEED, fvd_golden_input  # noqa: E402
from tests.test_metrics_fvd import StandInI3D  # noqa: E402


def main(stylegan_v: str) -> None:
    sys.path.insert(0, stylegan_v)
    from omegaconf import OmegaConf
    from src import dnnlib
    from src.metrics import frechet_video_distance, metric_utils
    import src.training.dataset as dataset_module

    videos = fvd_golden_input()
    tmp = Path(tempfile.mkdtemp())
    offsets = []
    for side in ("real", "fake"):
        for name, pair in sorted(videos.items()):
            frames = pair[0] if side == "fake" else pair[1]
            d = tmp / side / name
            d.mkdir(parents=True)
            for t, f in enumerate(frames):
                PIL.Image.fromarray(f).save(d / f"{t:06d}.png")
            if side == "real":
                offsets.append(clip_offset(len(frames), name, FVD_SEED))
    detector = torch.jit.script(StandInI3D())
    metric_utils.get_feature_detector = lambda url, device=None, **kw: detector
    # the dataset draws randint(0, T - 16) inside __getitem__(idx): answer with video idx's seeded start
    current = {}
    original = dataset_module.VideoFramesFolderDataset.__getitem__

    def getitem(self, idx):
        current["idx"] = int(self._raw_idx[idx])
        return original(self, idx)

    def randint(a, b):
        start = offsets[current["idx"]]
        assert a == 0 and 0 <= start <= b, (a, b, start)
        return start

    dataset_module.VideoFramesFolderDataset.__getitem__ = getitem
    dataset_module.random.randint = randint

    cfg = OmegaConf.create({"max_num_frames": 10000})
    kw = dict(class_name="src.training.dataset.VideoFramesFolderDataset", cfg=cfg, xflip=False, resolution=128,
              use_labels=False)
    opts = metric_utils.MetricOptions(
        dataset_kwargs=dnnlib.EasyDict(path=str(tmp / "real"), **kw),
        gen_dataset_kwargs=dnnlib.EasyDict(path=str(tmp / "fake"), **kw),
        generator_as_dataset=True, device=torch.device("cpu"), cache=False, num_gpus=1, rank=0,
    )
    fvd = frechet_video_distance.compute_fvd(opts, max_real=2048, num_gen=2048, num_frames=16)
    out = {
        "fvd": fvd,
        "real_clip_starts": dict(zip(sorted(videos), offsets)),
        "made_with": "universome/stylegan-v src/metrics/frechet_video_distance.py compute_fvd, "
                     "generator_as_dataset=True, resolution 128, stand-in I3D (tests/test_metrics_fvd.py StandInI3D)",
    }
    path = Path(__file__).with_name("fvd_stylegan_v.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(path, out)


if __name__ == "__main__":
    main(sys.argv[1])
