"""Zero-inflated Poisson (``gene_likelihood="zip"``): log_prob against scipy.stats.poisson, gradients, moments,
sampling, half precision and shape checks, as tests/test_distributions.py does for the other likelihoods.

Reference: ``log ZIP(x) = log(pi + (1 - pi) exp(-mu))`` at ``x = 0`` and ``log(1 - pi) + poisson.logpmf(x, mu)``
otherwise, in float64 with scipy (``pi = expit(zi_logits)``, the logs written with logaddexp).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special as sc
import scipy.stats as st
import torch

from cellvae.vae.distributions import Poisson, ZeroInflatedPoisson, log_zip_positive
from cellvae.vae.likelihoods import FUSED_POISSON, get_likelihood

EPS32 = float(np.finfo(np.float32).eps)
MUS = np.logspace(-8, 6, 9)
XS = np.array([0, 1, 2, 5, 10, 100, 1000, 1e4, 1e5])
ZIS = np.array([-10.0, -1.0, 0.0, 2.0, 10.0])


def _t(a, dtype=torch.float64, requires_grad=False):
    return torch.tensor(np.asarray(a), dtype=dtype, requires_grad=requires_grad)


def _zip_ref(x, mu, z):
    log_pi = -np.logaddexp(0.0, -z)
    log_1m_pi = -np.logaddexp(0.0, z)
    po = st.poisson.logpmf(x, mu)
    return np.where(x == 0, np.logaddexp(log_pi, log_1m_pi - mu), log_1m_pi + po)


def test_zip_log_prob_float64_vs_scipy():
    M, X, Z = np.meshgrid(MUS, XS, ZIS, indexing="ij")
    got = ZeroInflatedPoisson(_t(M), _t(Z)).log_prob(_t(X)).numpy()
    ref = _zip_ref(X, M, Z)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    # zi_logits -> -inf is the Poisson (where exp(-mu) >> sigmoid(-60) at x = 0)
    po = Poisson(_t(M)).log_prob(_t(X)).numpy()
    zp = ZeroInflatedPoisson(_t(M), _t(np.full(M.shape, -60.0))).log_prob(_t(X)).numpy()
    ok = (X > 0) | (M < 30)
    np.testing.assert_allclose(zp[ok], po[ok], rtol=1e-12, atol=1e-12)


def test_zip_log_prob_float32_and_half():
    M, X, Z = np.meshgrid(MUS, XS, ZIS, indexing="ij")
    ref = _zip_ref(X, M, Z)
    got = ZeroInflatedPoisson(_t(M, torch.float32), _t(Z, torch.float32)).log_prob(_t(X, torch.float32))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    M3 = torch.as_tensor(M, dtype=torch.float32).double().numpy()
    ref3 = _zip_ref(X, M3, Z)
    scale = np.abs(X * np.log(M3)) + M3 + sc.gammaln(X + 1) + np.abs(Z)
    assert np.all(np.abs(got.double().numpy() - ref3) <= 32 * EPS32 * np.maximum(1, scale)), np.abs(got - ref).max()
    for dtype in (torch.float16, torch.bfloat16):
        m, z, x = _t(np.minimum(M, 6e4), dtype), _t(Z, dtype), _t(np.minimum(X, 6e4), dtype)
        half = ZeroInflatedPoisson(m, z).log_prob(x)
        full = ZeroInflatedPoisson(m.float(), z.float()).log_prob(x.float())
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        torch.testing.assert_close(half, full, rtol=0, atol=0)


def test_zip_mu_zero_and_normalised():
    lp = log_zip_positive(_t([0.0, 1.0, 5.0]), _t([0.0, 0.0, 0.0]), _t([0.3, 0.3, 0.3]))
    assert abs(lp[0].item()) < 1e-12 and (lp[1:] < -80).all()
    k = torch.arange(0, 3000, dtype=torch.float64)[:, None].expand(-1, 4)
    d = ZeroInflatedPoisson(_t([0.01, 3.0, 40.0, 900.0]), _t([-2.0, 0.0, 1.0, 3.0]))
    np.testing.assert_allclose(d.log_prob(k).exp().sum(0).numpy(), 1.0, rtol=1e-10)


def test_zip_gradients_match_finite_differences():
    mu = _t([0.5, 3.0, 40.0], requires_grad=True)
    z = _t([-1.0, 0.5, 2.0], requires_grad=True)
    x = _t([0.0, 2.0, 35.0])
    assert torch.autograd.gradcheck(lambda m, zz: log_zip_positive(x, m, zz), (mu, z))


def test_zip_mean_variance_vs_pmf_moments():
    M, Z = np.meshgrid(MUS[:7], ZIS, indexing="ij")
    d = ZeroInflatedPoisson(_t(M), _t(Z))
    pi = sc.expit(Z)
    # law of total variance: E[Var | state] + Var[E | state]
    np.testing.assert_allclose(d.mean.numpy(), (1 - pi) * M, rtol=1e-14)
    np.testing.assert_allclose(d.variance.numpy(), (1 - pi) * M + pi * (1 - pi) * M**2, rtol=1e-12)
    for mu, zl in [(5.0, 0.0), (20.0, -1.0), (2.0, 2.0)]:
        k = np.arange(0, 2000)
        p = sc.expit(zl)
        pmf = (1 - p) * st.poisson.pmf(k, mu)
        pmf[0] += p
        m1 = (k * pmf).sum()
        m2 = ((k - m1) ** 2 * pmf).sum()
        dd = ZeroInflatedPoisson(_t(mu), _t(zl))
        assert dd.mean.item() == pytest.approx(m1, rel=1e-10)
        assert dd.variance.item() == pytest.approx(m2, rel=1e-10)


def test_zip_sample_moments_and_zero_fraction():
    torch.manual_seed(6)
    mus, zs = np.array([5.0, 20.0, 0.7]), np.array([0.0, -1.0, 2.0])
    d = ZeroInflatedPoisson(_t(mus), _t(zs))
    n = 20_000
    s = d.sample((n,)).numpy()
    assert s.shape == (n, 3) and (s >= 0).all() and np.array_equal(s, s.round())
    pi = sc.expit(zs)
    mean, var = d.mean.numpy(), d.variance.numpy()
    m4 = []
    for m, p in zip(mus, pi):
        k = np.arange(0, 2000)
        pmf = (1 - p) * st.poisson.pmf(k, m)
        pmf[0] += p
        m4.append(((k - (k * pmf).sum()) ** 4 * pmf).sum())
    assert np.all(np.abs(s.mean(0) - mean) <= 5 * np.sqrt(var / n))
    assert np.all(np.abs(s.var(0, ddof=1) - var) <= 5 * np.sqrt((np.array(m4) - var**2) / n))
    p0 = pi + (1 - pi) * np.exp(-mus)
    assert np.all(np.abs((s == 0).mean(0) - p0) <= 5 * np.sqrt(p0 * (1 - p0) / n))
    torch.manual_seed(1)
    a = d.sample((4,))
    torch.manual_seed(1)
    assert torch.equal(a, d.sample((4,)))


def test_zip_shape_check():
    d = ZeroInflatedPoisson(torch.ones(3, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"last dimension 4.*5 \(genes\)"):
        d.log_prob(torch.ones(3, 4))
    assert d.log_prob(torch.ones(2, 3, 5)).shape == (2, 3, 5)


def test_zip_likelihood_object():
    lik = get_likelihood("zip")
    assert lik.models_counts and lik.zero_inflated and not lik.has_theta
    assert lik.fused_loss("gene") is None  # no fused kernel: the distribution classes compute it
    assert get_likelihood("poisson").fused_loss("gene") == FUSED_POISSON
    rho = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    lib = torch.full((4, 1), np.log(100.0), dtype=torch.float64)
    zi = torch.randn(4, 6, dtype=torch.float64)
    px = lik.distribution(rho, lib, None, zi)
    assert isinstance(px, ZeroInflatedPoisson)
    torch.testing.assert_close(px.mu, 100.0 * rho)
