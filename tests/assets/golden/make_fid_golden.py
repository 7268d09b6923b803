"""Made tests/assets/golden/fid_pytorch_fid.json and fid_pytorch_fid_features.npy once, with pytorch-fid.

Run: python tests/assets/golden/make_fid_golden.py DIR, where DIR holds
pytorch-fid 0.3.0 and torchvision 0.28.0 installed with ``pip install --no-deps --target DIR``
(not needed by the tests). torchvision's compiled ops do not load beside this project's torch, so
only its pure-Python ``torchvision.models.inception`` is imported (the package's ``__init__`` is
bypassed); pytorch-fid's own ``InceptionV3`` and ``calculate_frechet_distance`` run unchanged,
with ``load_state_dict_from_url`` answered by the test's seeded weights.
"""

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from tests.test_metrics_golden import fid_golden_input, seeded_inception_state  # noqa: E402


def main(site: str) -> None:
    state = seeded_inception_state()  # before the partial torchvision exists (torchmetrics probes for it)
    real, fake = fid_golden_input()
    sys.path.append(site)
    root = f"{site}/torchvision"
    tv = types.ModuleType("torchvision")
    tv.__path__, tv.__version__ = [root], "0.28.0"
    models = types.ModuleType("torchvision.models")
    models.__path__ = [f"{root}/models"]
    sys.modules.update({"torchvision": tv, "torchvision.models": models})
    tv.models = models
    inception = importlib.import_module("torchvision.models.inception")
    models.inception, models.inception_v3 = inception, inception.inception_v3

    import pytorch_fid.inception as pf
    from pytorch_fid.fid_score import calculate_frechet_distance

    pf.load_state_dict_from_url = lambda *a, **k: state
    net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        feats = [net(torch.from_numpy(x).float() / 255)[0].squeeze(-1).squeeze(-1).numpy() for x in (real, fake)]
    fid = calculate_frechet_distance(feats[0].mean(0), np.cov(feats[0], rowvar=False),
                                     feats[1].mean(0), np.cov(feats[1], rowvar=False))
    here = Path(__file__).parent
    np.save(here / "fid_pytorch_fid_features.npy", np.concatenate(feats).astype(np.float32))
    out = {"fid": float(fid), "made_with": "pytorch-fid 0.3.0 InceptionV3([3]) + calculate_frechet_distance, "
                                          "seeded weights (tests/test_metrics_golden.py seeded_inception_state)"}
    (here / "fid_pytorch_fid.json").write_text(json.dumps(out, indent=2) + "\n")
    print(out, np.abs(feats[0]).max(), feats[0].std())


if __name__ == "__main__":
    main(sys.argv[1])
