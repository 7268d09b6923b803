"""The Fréchet distance between Gaussians fitted to network features, and the Metric base for FID/FVD.

FD(N(μ₁,Σ₁), N(μ₂,Σ₂)) = ‖μ₁−μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁Σ₂)^½   (Dowson & Landau 1982;
Heusel et al. 2017 for FID, Unterthiner et al. 2018 for FVD).

Covariance estimator: **unbiased (divide by N−1)** by default, like ``np.cov``, pytorch-fid and
torchmetrics; ``covariance="biased"`` divides by N, as StyleGAN-V's FVD and cd-fvd do (its
``FeatureStats.get_mean_cov``). The two differ by a factor N/(N−1) on the covariances,
which is negligible at the usual 2048+ samples but not on tiny validation sets — compare numbers
only under the same estimator and sample count.

Trace of the matrix square root: instead of ``scipy.linalg.sqrtm(Σ₁Σ₂)`` (pytorch-fid, StyleGAN-V)
or the eigenvalues of the non-symmetric Σ₁Σ₂ (torchmetrics), we use that Σ₁Σ₂ is similar to the
symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½, so Tr (Σ₁Σ₂)^½ = Σᵢ √λᵢ(Σ₁^½ Σ₂ Σ₁^½): two symmetric
eigendecompositions in float64, real by construction and a few times faster at 2048-d. The tests
check it against ``scipy.linalg.sqrtm``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ft_train.metrics.base import FrozenNetMetric


def _f64(x: Any) -> Tensor:
    # stays on the tensor's device: at 2048-d two float64 eigendecompositions take ~10 s on 2 CPU
    # cores and well under a second on a GPU
    return (x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))).to(dtype=torch.float64)


def _psd_sqrt(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (tiny negative eigenvalues from rounding → 0)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def trace_sqrt_product(sigma1: Any, sigma2: Any) -> float:
    """Tr (Σ₁Σ₂)^½ for symmetric PSD ``(D, D)`` matrices, computed in float64."""
    s1, s2 = _f64(sigma1), _f64(sigma2)
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    ev = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    return float(ev.sqrt().sum())


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Args:
        mu1, mu2: means, shape ``(D,)``.
        sigma1, sigma2: covariances, shape ``(D, D)``, symmetric PSD.
    Returns:
        The distance, in squared feature units (≥ 0 up to rounding).
    """
    m1, m2, s1, s2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.numel(), m1.numel()):
        raise ValueError(f"frechet_distance: shapes do not fit: mu {m1.shape}/{m2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace()) - 2.0 * trace_sqrt_product(s1, s2)


COVARIANCES = ("unbiased", "biased")


def mean_cov(feat_sum: Tensor, outer_sum: Tensor, n: int | Tensor, covariance: str = "unbiased") -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and covariance ``(D, D)`` from running sums Σx and Σxxᵀ over n samples.

    ``covariance``: ``unbiased`` divides by n − 1, ``biased`` by n (StyleGAN-V).
    """
    n = int(n)
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    mu = feat_sum.double() / n
    cov = (outer_sum.double() - n * torch.outer(mu, mu)) / (n - 1 if covariance == "unbiased" else n)
    return mu, cov


class FrechetFeatureDistance(FrozenNetMetric):
    """Fréchet distance between the feature distributions of real and generated samples.

    States are running sums (Σx ``(D,)`` and Σxxᵀ ``(D, D)`` in float64, and the count, per side),
    all reduced across ranks with ``"sum"``, so any split of the data over ranks or update calls
    gives the same result as one pass. ``update(x, real=True|False)``; ``compute()`` → scalar
    float64 tensor.

    The feature network is held as ``self.net`` (frozen, eval, not checkpointed: see
    :class:`~ft_train.metrics.base.FrozenNetMetric`); ``net(x)`` must return ``(N, D)``.

    Args:
        feature_net: module mapping a batch to ``(N, num_features)`` features.
        num_features: D.
        reset_real_features: if False, ``reset()`` keeps the real-side statistics, so a fixed
            reference set is encoded once (same meaning as in torchmetrics' FID).
        covariance: ``unbiased`` (N − 1) or ``biased`` (N).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, feature_net: nn.Module, num_features: int, reset_real_features: bool = True,
                 covariance: str = "unbiased", **kwargs: Any):
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        super().__init__(feature_net, **kwargs)
        self.covariance = covariance
        self.num_features = int(num_features)
        self.reset_real_features = reset_real_features
        d = self.num_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer_sum", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: Tensor, real: bool) -> None:
        """Add a batch of real (``real=True``) or generated samples."""
        with torch.no_grad():
            f = self.net(x)
        if f.ndim != 2 or f.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: feature network returned {tuple(f.shape)}, expected (N, {self.num_features})"
            )
        f = f.double()
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_outer_sum", getattr(self, f"{side}_outer_sum") + f.T @ f)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + f.shape[0])

    def compute(self) -> Tensor:
        for side in ("real", "fake"):
            if int(getattr(self, f"{side}_n")) < 2:
                raise RuntimeError(
                    f"{type(self).__name__}: need at least 2 {side} samples, got {int(getattr(self, f'{side}_n'))}"
                )
        mu1, s1 = mean_cov(self.real_sum, self.real_outer_sum, self.real_n, self.covariance)
        mu2, s2 = mean_cov(self.fake_sum, self.fake_outer_sum, self.fake_n, self.covariance)
        return torch.tensor(frechet_distance(mu1, s1, mu2, s2), dtype=torch.float64)

    def reset(self) -> None:
        if self.reset_real_features:
            return super().reset()
        kept = {k: getattr(self, k) for k in ("real_sum", "real_outer_sum", "real_n")}
        super().reset()
        for k, v in kept.items():
            setattr(self, k, v)
