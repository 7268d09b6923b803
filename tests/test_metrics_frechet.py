"""Fréchet distance: analytic Gaussians, scipy parity, the Metric's states, resets, checkpoints and DDP sync."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ft_train.metrics.frechet import FrechetFeatureDistance, frechet_distance, mean_cov


def _random_psd(d, seed):
    g = np.random.default_rng(seed)
    a = g.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_mean_shift_gives_squared_norm():
    d = 8
    delta = np.linspace(-1, 2, d)
    cov = _random_psd(d, 0)
    assert frechet_distance(np.zeros(d), cov, delta, cov) == pytest.approx(delta @ delta, rel=1e-9, abs=1e-9)


def test_scaled_covariance_closed_form():
    # Σ₂ = c·Σ₁ commute, so Tr(Σ₁Σ₂)^½ = √c·TrΣ₁ and FD = (1 − √c)²·TrΣ₁
    cov = _random_psd(16, 1)
    for c in (0.25, 2.0, 9.0):
        expected = (1 - np.sqrt(c)) ** 2 * np.trace(cov)
        assert frechet_distance(np.zeros(16), cov, np.zeros(16), c * cov) == pytest.approx(expected, rel=1e-9)


def test_matches_scipy_sqrtm_on_non_commuting_covariances():
    d = 32
    s1, s2 = _random_psd(d, 2), _random_psd(d, 3)
    mu1, mu2 = np.random.default_rng(4).normal(size=(2, d))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_identical_distributions_give_zero():
    cov = _random_psd(64, 5)
    mu = np.arange(64.0)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-9


def test_mean_cov_is_unbiased_like_np_cov():
    x = torch.randn(50, 6, dtype=torch.float64)
    mu, cov = mean_cov(x.sum(0), x.T @ x, 50)
    np.testing.assert_allclose(mu.numpy(), x.mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.numpy(), rowvar=False), atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        mean_cov(x[0], torch.outer(x[0], x[0]), 1)


def _metric(**kw):
    return FrechetFeatureDistance(nn.Identity(), 8, **kw)


def test_metric_on_samples_recovers_analytic_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 8, generator=g)
    y = torch.randn(20000, 8, generator=g)
    m = _metric()
    m.update(x, real=True)
    m.update(y + 0.5, real=False)  # ‖δ‖² = 8·0.25 = 2
    assert float(m.compute()) == pytest.approx(2.0, abs=0.1)
    m.reset()
    m.update(x, real=True)
    m.update(2 * y, real=False)  # d·(1 − 2)² = 8
    assert float(m.compute()) == pytest.approx(8.0, abs=0.4)
    m.reset()
    m.update(x, real=True)
    m.update(x, real=False)
    assert abs(float(m.compute())) < 1e-8


def test_split_updates_and_merge_state_equal_one_pass():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g) + 1
    whole = _metric()
    whole.update(real, real=True)
    whole.update(fake, real=False)
    a, b = _metric(), _metric()
    a.update(real[:25], real=True)
    a.update(fake[:5], real=False)
    b.update(real[25:], real=True)
    b.update(fake[5:], real=False)
    a.merge_state(b)
    assert float(a.compute()) == pytest.approx(float(whole.compute()), rel=1e-10)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_reset_and_reset_real_features():
    real, fake = torch.randn(10, 8), torch.randn(10, 8)
    m = _metric(reset_real_features=False)
    m.update(real, real=True)
    m.update(fake, real=False)
    m.reset()
    assert int(m.real_n) == 10 and int(m.fake_n) == 0
    m2 = _metric()
    m2.update(real, real=True)
    m2.reset()
    assert int(m2.real_n) == 0
    with pytest.raises(RuntimeError, match="at least 2 real"):
        m2.compute()


class _BN(nn.Module):
    """A net with BatchNorm: in train mode its output would depend on the batch."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(x)


def test_network_frozen_eval_and_left_out_of_checkpoints():
    parent = nn.Module()
    parent.metric = FrechetFeatureDistance(_BN(), 8)
    parent.train()
    assert not parent.metric.net.training
    assert not any(p.requires_grad for p in parent.metric.net.parameters())
    sd = parent.state_dict()
    assert not any(".net." in k for k in sd), list(sd)
    # a checkpoint without the network loads strictly and keeps the network's weights
    with torch.no_grad():
        parent.metric.net.bn.weight.fill_(3.0)
    parent.load_state_dict(sd, strict=True)
    assert torch.all(parent.metric.net.bn.weight == 3.0)


# -- two processes, gloo: states are summed by torchmetrics' own sync --------------------------------

def _ddp_worker(rank, world, init_file, out_dir, real, fake):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = _metric()
        m.update(real[rank::world], real=True)
        m.update(fake[rank::world], real=False)
        torch.save(m.compute(), f"{out_dir}/fd{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_sync_equals_single_process(tmp_path):
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(64, 8, generator=g), 1.5 * torch.randn(64, 8, generator=g) + 0.3
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), real, fake), nprocs=2, join=True)
    single = _metric()
    single.update(real, real=True)
    single.update(fake, real=False)
    expected = float(single.compute())
    for rank in range(2):
        assert float(torch.load(tmp_path / f"fd{rank}.pt")) == pytest.approx(expected, rel=1e-9)
