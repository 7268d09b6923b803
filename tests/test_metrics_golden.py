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
