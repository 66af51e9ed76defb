"""Likelihoods: log_prob against scipy, gradients, moments, sampling, lgamma_ratio, shape checks.

References are computed in float64 with numpy/scipy. Two facts about the references shape the tolerances:

- ``scipy.stats.nbinom`` takes ``p = theta / (theta + mu)``; when ``mu << theta`` the float64 number ``p`` cannot carry
  ``1 - p = mu / (theta + mu)`` accurately (relative error ~ eps64 * (theta + mu) / mu), so its log-pmf is off by
  ~ x * eps64 * (theta + mu) / mu nats -- up to 80 nats at theta = 1e6, mu = 1e-8, x = 1e5 (checked with mpmath).
  The tight float64 comparison therefore uses the same formula written with ``scipy.special`` (gammaln, log1p,
  xlogy; ~1e-10 relative to mpmath on this grid), and is itself checked against ``scipy.stats.nbinom`` with a
  tolerance that includes scipy's p-rounding term, and against mpmath at the points where scipy.stats is off.
- ``gammaln(x + theta) - gammaln(theta)`` loses ~ eps64 * |gammaln(theta)| (~4e-7 nats at theta = 1e8); the
  Stirling branch of ``lgamma_ratio`` is more accurate than that reference there.

float32: the log-pmf is a sum of terms (lgamma(x + theta), lgamma(x + 1), x log mu, x log(theta + mu), ...) whose
magnitudes S can reach ~1e6 for x = 1e5 while the result is ~ -10; rounding each term costs ~ eps32 * S, so the
honest float32 bound is a small multiple of eps32 * S (observed <= 7.5 eps32 * S; we allow 32). For counts up to
1e4 this is also within 1e-3 * max(1, |ref|) (observed <= 6e-4); at x = 1e5 the relative error reaches ~1.6%
(~0.26 nats at ref ~ -12), which is float32 cancellation in the formula, not a bug (see the test docstrings).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sc
import scipy.stats as st
import torch

from cellvae.vae.distributions import (
    NegativeBinomial,
    Normal,
    Poisson,
    ZeroInflatedNegativeBinomial,
    lgamma_ratio,
    log_nb_positive,
    log_zinb_positive,
)

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

THETAS = np.logspace(-4, 6, 8)
MUS = np.logspace(-8, 5, 8)
XS = np.array([0, 1, 2, 5, 10, 100, 1000, 1e4, 1e5])
ZIS = np.array([-10.0, -1.0, 0.0, 2.0, 10.0])
DTYPES = [torch.float64, torch.float32]


# ----------------------------------------------------------------------------------------------- references


def _grid(*axes):
    return np.meshgrid(*axes, indexing="ij")


def _as_dtype(a, dtype):
    """Round a float64 array to ``dtype`` and back, so that references see the parameters the tensors hold."""
    return torch.as_tensor(a, dtype=dtype).double().numpy()


def _nb_ref(x, mu, theta):
    """log NB(x; mu, theta) in float64 via scipy.special (no p = theta/(theta+mu) rounding)."""
    return (
        sc.gammaln(x + theta)
        - sc.gammaln(theta)
        - sc.gammaln(x + 1)
        - theta * np.log1p(mu / theta)
        + sc.xlogy(x, mu)
        - sc.xlogy(x, theta + mu)
    )


def _nb_terms_scale(x, mu, theta):
    """Sum of the magnitudes of the terms of the log-pmf: what float32 rounding errors scale with."""
    return (
        np.abs(sc.gammaln(x + theta) - sc.gammaln(theta))
        + sc.gammaln(x + 1)
        + np.abs(theta * np.log1p(mu / theta))
        + np.abs(sc.xlogy(x, mu))
        + np.abs(sc.xlogy(x, theta + mu))
    )


def _zinb_ref(x, mu, theta, z):
    """log ZINB in float64: logaddexp(log pi, log(1-pi) + log NB(0)) at x = 0, log(1-pi) + log NB(x) otherwise."""
    log_pi = -np.logaddexp(0.0, -z)
    log_1m_pi = -np.logaddexp(0.0, z)
    nb = _nb_ref(x, mu, theta)
    return np.where(x == 0, np.logaddexp(log_pi, log_1m_pi + nb), log_1m_pi + nb)


def _t(a, dtype, requires_grad=False):
    return torch.tensor(np.asarray(a), dtype=dtype, requires_grad=requires_grad)


def _assert_within(got, ref, tol, what):
    err = np.abs(got - ref)
    bad = ~(err <= tol)
    if bad.any():
        i = np.argmax(np.where(bad, err / tol, 0))
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} points out of tolerance; worst at flat index {i}: "
            f"got {got.flat[i]!r}, ref {ref.flat[i]!r}, err {err.flat[i]:.3g}, tol {tol.flat[i]:.3g}"
        )


# ---------------------------------------------------------------------------------------- 1. log_prob values


def test_nb_reference_matches_scipy_stats():
    """The scipy.special reference agrees with scipy.stats.nbinom up to scipy's own p-rounding error."""
    T, M, X = _grid(THETAS, MUS, XS)
    ref = _nb_ref(X, M, T)
    stats = st.nbinom.logpmf(X, T, T / (T + M))
    # rel 1e-9 for the well-conditioned part, plus x * eps * (theta + mu) / mu for 1 - p (factor 8: margin).
    tol = 1e-9 * np.maximum(1, np.abs(ref)) + 8 * EPS64 * X * (T + M) / M
    _assert_within(stats, ref, tol, "scipy.special NB vs scipy.stats.nbinom")
    # Where 1 - p is well represented, the two agree to 1e-9 without the extra term.
    ok = M / (T + M) > 1e-4
    _assert_within(stats[ok], ref[ok], 1e-9 * np.maximum(1, np.abs(ref[ok])), "NB reference, well conditioned")


def test_nb_reference_against_mpmath_where_scipy_stats_is_off():
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    for theta, mu, x in [(1e6, 1e-8, 1e5), (1e6, 1e-8, 1.0), (3.7e4, 1e-8, 1e4), (1e6, 1e5, 1e5), (1e-4, 1e3, 1e5)]:
        t, m, k = mp.mpf(theta), mp.mpf(mu), mp.mpf(x)
        exact = float(
            mp.loggamma(k + t) - mp.loggamma(t) - mp.loggamma(k + 1) + t * mp.log(t / (t + m)) + k * mp.log(m / (t + m))
        )
        ours = log_nb_positive(_t(x, torch.float64), _t(mu, torch.float64), _t(theta, torch.float64)).item()
        ref = float(_nb_ref(np.float64(x), np.float64(mu), np.float64(theta)))
        assert abs(ours - exact) <= 1e-9 * max(1.0, abs(exact)), (theta, mu, x, ours, exact)
        assert abs(ref - exact) <= 1e-9 * max(1.0, abs(exact)), (theta, mu, x, ref, exact)


def test_nb_log_prob_float64():
    T, M, X = _grid(THETAS, MUS, XS)
    got = NegativeBinomial(_t(M, torch.float64), _t(T, torch.float64)).log_prob(_t(X, torch.float64)).numpy()
    ref = _nb_ref(X, M, T)
    # Observed <= 5e-11 relative (mpmath says the reference itself is good to ~2e-10); 1e-8 leaves margin.
    _assert_within(got, ref, 1e-8 * np.maximum(1, np.abs(ref)), "NB log_prob float64")
    # Also directly against scipy.stats where its p parameterisation is accurate (the brief's rtol/atol 1e-6).
    ok = M / (T + M) > 1e-4
    np.testing.assert_allclose(got[ok], st.nbinom.logpmf(X, T, T / (T + M))[ok], rtol=1e-6, atol=1e-6)


def test_nb_log_prob_float32():
    T, M, X = _grid(THETAS, MUS, XS)
    got = NegativeBinomial(_t(M, torch.float32), _t(T, torch.float32)).log_prob(_t(X, torch.float32))
    assert torch.isfinite(got).all()
    got = got.double().numpy()
    T3, M3, X3 = (_as_dtype(a, torch.float32) for a in (T, M, X))
    ref = _nb_ref(X3, M3, T3)
    _assert_within(got, ref, 32 * EPS32 * np.maximum(1, _nb_terms_scale(X3, M3, T3)), "NB float32 vs eps*terms")
    small = X <= 1e4  # realistic counts: within 1e-3 relative (observed <= 6e-4)
    _assert_within(got[small], ref[small], 1e-3 * np.maximum(1, np.abs(ref[small])), "NB float32, x <= 1e4")


def test_zinb_log_prob_float64():
    T, M, X, Z = _grid(THETAS, MUS, XS, ZIS)
    got = ZeroInflatedNegativeBinomial(_t(M, torch.float64), _t(T, torch.float64), _t(Z, torch.float64))
    got = got.log_prob(_t(X, torch.float64)).numpy()
    ref = _zinb_ref(X, M, T, Z)
    _assert_within(got, ref, 1e-8 * np.maximum(1, np.abs(ref)), "ZINB log_prob float64")
    # Same via scipy.stats' nbinom pmf (brief's definition), where scipy is accurate.
    pi = sc.expit(Z)
    with np.errstate(divide="ignore"):  # pmf underflows to 0 far in the tail; those points are masked out
        stats_ref = np.log(pi * (X == 0) + (1 - pi) * st.nbinom.pmf(X, T, T / (T + M)))
    ok = (M / (T + M) > 1e-4) & np.isfinite(stats_ref) & (stats_ref > -500)  # pmf not underflowed
    np.testing.assert_allclose(got[ok], stats_ref[ok], rtol=1e-6, atol=1e-6)
    # Function form agrees with the class.
    fn = log_zinb_positive(_t(X, torch.float64), _t(M, torch.float64), _t(T, torch.float64), _t(Z, torch.float64))
    np.testing.assert_array_equal(fn.numpy(), got)


def test_zinb_log_prob_float32():
    T, M, X, Z = _grid(THETAS, MUS, XS, ZIS)
    got = ZeroInflatedNegativeBinomial(_t(M, torch.float32), _t(T, torch.float32), _t(Z, torch.float32))
    got = got.log_prob(_t(X, torch.float32))
    assert torch.isfinite(got).all()
    got = got.double().numpy()
    T3, M3, X3, Z3 = (_as_dtype(a, torch.float32) for a in (T, M, X, Z))
    ref = _zinb_ref(X3, M3, T3, Z3)
    # + |z| term: softplus(z) and logaddexp(z, .) carry ~eps32 * |z| each.
    tol = 32 * EPS32 * (np.maximum(1, _nb_terms_scale(X3, M3, T3)) + np.abs(Z3))
    _assert_within(got, ref, tol, "ZINB float32 vs eps*terms")
    small = X <= 1e4
    _assert_within(got[small], ref[small], 1e-3 * np.maximum(1, np.abs(ref[small])), "ZINB float32, x <= 1e4")


@pytest.mark.parametrize("dtype", DTYPES)
def test_poisson_log_prob(dtype):
    M, X = _grid(MUS, XS)
    got = Poisson(_t(M, dtype)).log_prob(_t(X, dtype))
    assert torch.isfinite(got).all()
    got = got.double().numpy()
    M3, X3 = _as_dtype(M, dtype), _as_dtype(X, dtype)
    ref = st.poisson.logpmf(X3, M3)
    if dtype == torch.float64:
        _assert_within(got, ref, 1e-10 * np.maximum(1, np.abs(ref)), "Poisson float64")
    else:
        scale = np.abs(sc.xlogy(X3, M3)) + M3 + sc.gammaln(X3 + 1)
        _assert_within(got, ref, 32 * EPS32 * np.maximum(1, scale), "Poisson float32 vs eps*terms")
        small = X <= 1e4
        _assert_within(got[small], ref[small], 1e-3 * np.maximum(1, np.abs(ref[small])), "Poisson f32, x <= 1e4")


@pytest.mark.parametrize("dtype", DTYPES)
def test_normal_log_prob(dtype):
    L, S, X = _grid([-1e3, -1.0, 0.0, 2.5, 1e3], np.logspace(-4, 4, 5), [-10.0, -1.0, 0.0, 0.5, 3.0, 1e3])
    got = Normal(_t(L, dtype), _t(S, dtype)).log_prob(_t(X, dtype))
    assert torch.isfinite(got).all()
    L3, S3, X3 = (_as_dtype(a, dtype) for a in (L, S, X))
    ref = st.norm.logpdf(X3, L3, S3)
    rel = 1e-12 if dtype == torch.float64 else 1e-5  # float32: z = (x - loc) / scale has ~2 eps32 relative error
    _assert_within(got.double().numpy(), ref, rel * np.maximum(1, np.abs(ref)), f"Normal {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mu_zero_is_finite(dtype):
    """mu = 0: finite log-prob; log NB(0) = log Poisson(0) = 0 and ZINB(0) = 0; very negative for x > 0."""
    T, X = _grid(THETAS, XS)
    mu = torch.zeros(T.shape, dtype=dtype)
    nb = NegativeBinomial(mu, _t(T, dtype)).log_prob(_t(X, dtype))
    po = Poisson(mu).log_prob(_t(X, dtype))
    zi = ZeroInflatedNegativeBinomial(mu, _t(T, dtype), torch.full(T.shape, -1.0, dtype=dtype)).log_prob(_t(X, dtype))
    for lp in (nb, po, zi):
        assert torch.isfinite(lp).all()
        assert lp[X == 0].abs().max() < 1e-30
        assert (lp[X > 0] < -50).all()


# ------------------------------------------------------------------------------------------- 2. gradients


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_finite(dtype):
    mus = np.concatenate([[0.0], MUS])
    T, M, X, Z = _grid(THETAS, mus, XS, ZIS)
    mu, theta, z = _t(M, dtype, True), _t(T, dtype, True), _t(Z, dtype, True)
    lp = ZeroInflatedNegativeBinomial(mu, theta, z).log_prob(_t(X, dtype))
    assert torch.isfinite(lp).all()
    g_mu, g_theta, g_z = torch.autograd.grad(lp.sum(), (mu, theta, z))
    for name, g in (("mu", g_mu), ("theta", g_theta), ("zi_logits", g_z)):
        assert torch.isfinite(g).all(), f"non-finite d/d{name} at {np.argwhere(~torch.isfinite(g).numpy())[:5]}"

    mu, theta = _t(M[..., 0], dtype, True), _t(T[..., 0], dtype, True)
    lp = NegativeBinomial(mu, theta).log_prob(_t(X[..., 0], dtype))
    for g in torch.autograd.grad(lp.sum(), (mu, theta)):
        assert torch.isfinite(g).all()

    mu = _t(M[..., 0, 0], dtype, True)
    lp = Poisson(mu[:, None]).log_prob(_t(XS, dtype))
    (g,) = torch.autograd.grad(lp.sum(), (mu,))
    assert torch.isfinite(g).all()


def test_gradients_match_analytic_float64():
    """Autograd (incl. through the Stirling branch and the x == 0 logaddexp) equals the closed-form derivatives."""
    T, M, X, Z = _grid(THETAS, MUS, XS, ZIS)
    mu, theta, z = _t(M, torch.float64, True), _t(T, torch.float64, True), _t(Z, torch.float64, True)
    lp = log_zinb_positive(_t(X, torch.float64), mu, theta, z)
    g_mu, g_theta, g_z = (g.numpy() for g in torch.autograd.grad(lp.sum(), (mu, theta, z)))

    nb = _nb_ref(X, M, T)
    w = np.where(X == 0, sc.expit(nb - Z), 1.0)  # d log ZINB / d log NB
    d_mu = X / M - (X + T) / (T + M)
    d_theta = sc.digamma(X + T) - sc.digamma(T) - np.log1p(M / T) + (M - X) / (T + M)
    d_z = np.where(X == 0, sc.expit(Z - nb), 0.0) - sc.expit(Z)
    # Tolerances relative to the sum of magnitudes of the terms (the derivatives cancel, e.g. at mu = x); observed
    # <= 2e-15 of that scale.
    s_mu = np.abs(X / M) + np.abs((X + T) / (T + M))
    s_theta = np.abs(sc.digamma(X + T)) + np.abs(sc.digamma(T)) + np.log1p(M / T) + np.abs((M - X) / (T + M))
    _assert_within(g_mu, w * d_mu, 1e-10 * w * s_mu + 1e-300, "d/dmu")
    _assert_within(g_theta, w * d_theta, 1e-10 * w * s_theta + 1e-300, "d/dtheta")
    _assert_within(g_z, d_z, np.full(d_z.shape, 1e-12), "d/dzi_logits")


# ---------------------------------------------------------------------------------------- 3. mean, variance


def test_nb_mean_variance_vs_scipy():
    T, M = _grid(THETAS, np.concatenate([[0.0], MUS]))
    d = NegativeBinomial(_t(M, torch.float64), _t(T, torch.float64))
    mean, var = d.mean.numpy(), d.variance.numpy()
    s_mean, s_var = st.nbinom.stats(T, T / (T + M), moments="mv")
    # scipy's 1 - p carries relative error eps * (theta + mu) / mu (see module docstring).
    rtol = 1e-10 + 8 * EPS64 * (T + M) / np.maximum(M, 1e-300)
    _assert_within(mean, s_mean, rtol * np.abs(s_mean) + 1e-300, "NB mean")
    _assert_within(var, s_var, rtol * np.abs(s_var) + 1e-300, "NB variance")
    np.testing.assert_allclose(var, M + M**2 / T, rtol=1e-14)

    d32 = NegativeBinomial(_t(M, torch.float32), _t(T, torch.float32))
    assert torch.isfinite(d32.mean).all() and torch.isfinite(d32.variance).all()
    np.testing.assert_allclose(d32.variance.double().numpy(), var, rtol=1e-6)
    p = Poisson(_t(MUS, torch.float64))
    np.testing.assert_allclose(p.mean.numpy(), st.poisson.mean(MUS), rtol=1e-15)
    np.testing.assert_allclose(p.variance.numpy(), st.poisson.var(MUS), rtol=1e-15)
    n = Normal(_t([0.0, 1.0, -2.0], torch.float64), _t([0.5], torch.float64))
    np.testing.assert_allclose(n.variance.numpy(), [0.25] * 3)


def test_zinb_mean_variance():
    T, M, Z = _grid(THETAS, np.concatenate([[0.0], MUS]), ZIS)
    d = ZeroInflatedNegativeBinomial(_t(M, torch.float64), _t(T, torch.float64), _t(Z, torch.float64))
    pi = sc.expit(Z)
    nb_var = M + M**2 / T
    # Law of total variance: E[Var | zero-state] + Var[E | zero-state] -- an independent form of
    # (1 - pi) mu (1 + mu / theta + pi mu).
    np.testing.assert_allclose(d.mean.numpy(), (1 - pi) * M, rtol=1e-14)
    np.testing.assert_allclose(d.variance.numpy(), (1 - pi) * nb_var + pi * (1 - pi) * M**2, rtol=1e-12)
    np.testing.assert_allclose(d.variance.numpy(), (1 - pi) * M * (1 + M / T + pi * M), rtol=1e-12)
    d32 = ZeroInflatedNegativeBinomial(_t(M, torch.float32), _t(T, torch.float32), _t(Z, torch.float32))
    assert torch.isfinite(d32.mean).all() and torch.isfinite(d32.variance).all()

    # Against moments summed from scipy's pmf for a few moderate settings.
    for mu, theta, z in [(5.0, 2.0, 0.0), (20.0, 0.5, -1.0), (2.0, 10.0, 2.0)]:
        k = np.arange(0, 20000)
        p = sc.expit(z)
        pmf = (1 - p) * st.nbinom.pmf(k, theta, theta / (theta + mu))
        pmf[0] += p
        m1 = (k * pmf).sum()
        m2 = ((k - m1) ** 2 * pmf).sum()
        dd = ZeroInflatedNegativeBinomial(_t(mu, torch.float64), _t(theta, torch.float64), _t(z, torch.float64))
        assert dd.mean.item() == pytest.approx(m1, rel=1e-9)
        assert dd.variance.item() == pytest.approx(m2, rel=1e-9)


def test_log_prob_normalised_float64():
    """exp(log_prob) sums to 1 over the support (catches constant offsets the scipy checks share)."""
    k = torch.arange(0, 5000, dtype=torch.float64)[:, None].expand(-1, 4)  # log_prob wants x's last dim = genes
    mu = torch.tensor([0.01, 3.0, 40.0, 200.0], dtype=torch.float64)
    theta = torch.tensor([1e-1, 2.0, 150.0, 1e5], dtype=torch.float64)  # both lgamma_ratio branches
    z = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    for lp in (
        NegativeBinomial(mu, theta).log_prob(k),
        ZeroInflatedNegativeBinomial(mu, theta, z).log_prob(k),
        Poisson(mu).log_prob(k),
    ):
        np.testing.assert_allclose(lp.exp().sum(0).numpy(), 1.0, rtol=1e-8)


# ------------------------------------------------------------------------------------------------ 4. sample


N_SAMPLES = 20_000


def _pmf_moments(pmf, k):
    pmf = pmf / pmf.sum()
    m1 = (k * pmf).sum()
    m2 = ((k - m1) ** 2 * pmf).sum()
    m4 = ((k - m1) ** 4 * pmf).sum()
    return m1, m2, m4


def _check_moments(samples, mean, var, m4, n_se=5.0):
    """Empirical mean and variance within n_se standard errors (SE of the variance from the 4th moment)."""
    n = samples.shape[0]
    emp_mean = samples.mean(0)
    emp_var = samples.var(0, ddof=1)
    se_mean = np.sqrt(var / n)
    se_var = np.sqrt((m4 - var**2) / n)
    assert np.all(np.abs(emp_mean - mean) <= n_se * se_mean), (emp_mean, mean, se_mean)
    assert np.all(np.abs(emp_var - var) <= n_se * se_var), (emp_var, var, se_var)


def test_sample_shapes_and_support():
    torch.manual_seed(0)
    mu = torch.rand(3, 4, dtype=torch.float32) * 10
    mu[0, 0] = 0.0
    theta = torch.tensor([1e-4, 0.5, 10.0, 1e6])
    z = torch.linspace(-3, 3, 12).reshape(3, 4)
    dists = [
        Normal(mu, torch.full((4,), 0.5)),
        Poisson(mu),
        NegativeBinomial(mu, theta),
        ZeroInflatedNegativeBinomial(mu, theta, z),
    ]
    for d in dists:
        for shape in [(), (5,), (2, 7)]:
            s = d.sample(torch.Size(shape))
            assert s.shape == torch.Size(shape) + (3, 4)
            assert s.dtype == mu.dtype
            assert torch.isfinite(s).all()
            if not isinstance(d, Normal):
                assert (s >= 0).all() and torch.equal(s, s.round())
                assert (s[..., 0, 0] == 0).all()  # mu = 0 gives zeros
    # Seeded: same seed, same draws.
    for d in dists:
        torch.manual_seed(123)
        a = d.sample((4,))
        torch.manual_seed(123)
        b = d.sample((4,))
        assert torch.equal(a, b)


def test_sample_extreme_parameters_stay_valid():
    torch.manual_seed(1)
    T, M = _grid(THETAS, np.concatenate([[0.0], MUS]))
    for dtype in DTYPES:
        s = NegativeBinomial(_t(M, dtype), _t(T, dtype)).sample((50,))
        assert torch.isfinite(s).all() and (s >= 0).all() and torch.equal(s, s.round())
        z = torch.full(T.shape, 10.0, dtype=dtype)
        s = ZeroInflatedNegativeBinomial(_t(M, dtype), _t(T, dtype), z).sample((50,))
        assert torch.isfinite(s).all() and (s >= 0).all()


def test_nb_and_poisson_sample_moments():
    torch.manual_seed(2)
    mus = np.array([5.0, 100.0, 0.3, 50.0])
    thetas = np.array([2.0, 0.5, 50.0, 1e4])
    s = NegativeBinomial(_t(mus, torch.float64), _t(thetas, torch.float64)).sample((N_SAMPLES,)).numpy()
    k = np.arange(0, 50_000)
    mom = np.array([_pmf_moments(st.nbinom.pmf(k, t, t / (t + m)), k) for m, t in zip(mus, thetas)]).T
    np.testing.assert_allclose(mom[0], mus, rtol=1e-6)
    np.testing.assert_allclose(mom[1], mus + mus**2 / thetas, rtol=1e-6)
    _check_moments(s, mus, mus + mus**2 / thetas, mom[2])

    torch.manual_seed(3)
    pm = np.array([0.5, 30.0])
    s = Poisson(_t(pm, torch.float32)).sample((N_SAMPLES,)).double().numpy()
    _check_moments(s, pm, pm, pm + 3 * pm**2)  # Poisson 4th central moment: mu + 3 mu^2

    torch.manual_seed(4)
    s = Normal(_t([1.0, -2.0], torch.float64), _t([0.5, 3.0], torch.float64)).sample((N_SAMPLES,)).numpy()
    sd = np.array([0.5, 3.0])
    _check_moments(s, np.array([1.0, -2.0]), sd**2, 3 * sd**4)


def test_zinb_sample_moments_and_zero_fraction():
    torch.manual_seed(5)
    mus = np.array([5.0, 20.0, 2.0])
    thetas = np.array([2.0, 0.5, 10.0])
    zs = np.array([0.0, -1.0, 2.0])
    d = ZeroInflatedNegativeBinomial(_t(mus, torch.float64), _t(thetas, torch.float64), _t(zs, torch.float64))
    s = d.sample((N_SAMPLES,)).numpy()
    pi = sc.expit(zs)
    k = np.arange(0, 50_000)
    m4 = []
    for m, t, p in zip(mus, thetas, pi):
        pmf = (1 - p) * st.nbinom.pmf(k, t, t / (t + m))
        pmf[0] += p
        m4.append(_pmf_moments(pmf, k)[2])
    _check_moments(s, d.mean.numpy(), d.variance.numpy(), np.array(m4))

    p0 = pi + (1 - pi) * (thetas / (thetas + mus)) ** thetas
    frac0 = (s == 0).mean(0)
    assert np.all(np.abs(frac0 - p0) <= 5 * np.sqrt(p0 * (1 - p0) / N_SAMPLES)), (frac0, p0)
    np.testing.assert_allclose(np.exp(d.log_prob(torch.zeros(3, dtype=torch.float64)).numpy()), p0, rtol=1e-12)


# ------------------------------------------------------------------------------------------- 5. lgamma_ratio


def test_lgamma_ratio_float64():
    thetas = np.concatenate(
        [np.logspace(-4, 8, 25), [99.0, 99.999, 100.0, 100.0 + 1e-9, 100.0001, 100.001, 101.0, 150.0, 1e3]]
    )
    xs = np.array([0, 0.5, 1, 2, 3, 5, 10, 50, 100, 1000, 1e4, 1e5, 1e6])
    T, X = _grid(thetas, xs)
    got = lgamma_ratio(_t(X, torch.float64), _t(T, torch.float64)).numpy()
    ref = sc.gammaln(X + T) - sc.gammaln(T)
    # Reference cancellation: ~eps64 * (|gammaln(x+theta)| + |gammaln(theta)|) (4e-7 nats at theta = 1e8; ours is
    # better there, see below). Stirling truncation < 1/(360 theta^3) < 3e-9 nats. Observed rel <= 2e-11 vs mpmath.
    tol = 1e-9 * np.maximum(1, np.abs(ref)) + 8 * EPS64 * (np.abs(sc.gammaln(X + T)) + np.abs(sc.gammaln(T)))
    _assert_within(got, ref, tol, "lgamma_ratio float64")
    # x = 0 is exactly 0 on both branches.
    assert np.all(got[X == 0] == 0)


def test_lgamma_ratio_switch_point_and_mpmath():
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    for theta in [100.0, 100.0 + 1e-12, 100.5, 1e8]:
        for x in [1.0, 7.0, 1e3, 1e6]:
            exact = float(mp.loggamma(mp.mpf(x) + mp.mpf(theta)) - mp.loggamma(mp.mpf(theta)))
            got = lgamma_ratio(_t(x, torch.float64), _t(theta, torch.float64)).item()
            assert abs(got - exact) <= 1e-10 * max(1.0, abs(exact)), (theta, x, got, exact)
    # Continuity across the switch, value and derivative (digamma difference).
    th = torch.tensor([100.0 - 1e-9, 100.0 + 1e-9], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([37.0, 37.0], dtype=torch.float64)
    v = lgamma_ratio(x, th)
    (g,) = torch.autograd.grad(v.sum(), (th,))
    assert abs(v[0].item() - v[1].item()) < 1e-8
    dg = sc.digamma(37.0 + 100.0) - sc.digamma(100.0)
    np.testing.assert_allclose(g.numpy(), dg, rtol=1e-9)


def test_lgamma_ratio_float32():
    thetas = np.logspace(-4, 8, 13)
    xs = np.array([0, 1, 5, 100, 1e4, 1e6])
    T, X = _grid(thetas, xs)
    got = lgamma_ratio(_t(X, torch.float32), _t(T, torch.float32))
    assert torch.isfinite(got).all()
    T3, X3 = _as_dtype(T, torch.float32), _as_dtype(X, torch.float32)
    ref = sc.gammaln(X3 + T3) - sc.gammaln(T3)
    # The Stirling branch avoids lgamma(theta) ~ 1.7e9 at theta = 1e8; observed <= 2e-6 relative.
    _assert_within(got.double().numpy(), ref, 1e-5 * np.maximum(1, np.abs(ref)), "lgamma_ratio float32")


# ------------------------------------------------------------------------------------------ 6. shape errors


def test_last_dimension_mismatch_raises():
    mu = torch.ones(3, 5)
    theta = torch.ones(5)
    dists = [
        Normal(mu, theta),
        Poisson(mu),
        NegativeBinomial(mu, theta),
        ZeroInflatedNegativeBinomial(mu, theta, torch.zeros(3, 5)),
    ]
    for d in dists:
        with pytest.raises(ValueError, match=r"last dimension 4.*5 \(genes\)"):
            d.log_prob(torch.ones(3, 4))
        # Matching last dimension with broadcastable leading dims is fine.
        assert d.log_prob(torch.ones(5)).shape == (3, 5)
        assert d.log_prob(torch.ones(2, 3, 5)).shape == (2, 3, 5)
    assert math.isfinite(NegativeBinomial(mu, theta).log_prob(torch.ones(3, 5)).sum().item())


# ------------------------------------------------------------------- 7. full range, half precision, theta = inf

WIDE_THETAS = np.array([1e-4, 1e-2, 1.0, 99.0, 101.0, 1e4, 1e6, 1e7, 1e8])
WIDE_MUS = np.array([0.0, 1e-8, 1e-3, 1.0, 1e3, 1e5, 1e6, 1e7])
WIDE_XS = np.array([0, 1, 3, 100, 1e4, 1e5, 1e6])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_range_finite_and_accurate(dtype):
    """theta up to 1e8, mu from 0 up to 1e7, counts up to 1e6: finite everywhere, and within float rounding of
    the float64 reference (eps times the magnitude of the terms summed)."""
    T, M, X = _grid(WIDE_THETAS, WIDE_MUS, WIDE_XS)
    Z = np.full(T.shape, 0.5)
    nb = NegativeBinomial(_t(M, dtype), _t(T, dtype)).log_prob(_t(X, dtype))
    zi = ZeroInflatedNegativeBinomial(_t(M, dtype), _t(T, dtype), _t(Z, dtype)).log_prob(_t(X, dtype))
    po = Poisson(_t(M, dtype)).log_prob(_t(X, dtype))
    for lp in (nb, zi, po):
        assert torch.isfinite(lp).all() and lp.dtype == dtype
    T3, M3, X3 = (_as_dtype(a, dtype) for a in (T, M, X))
    pos = M3 > 0
    ref = _nb_ref(X3[pos], M3[pos], T3[pos])
    eps = EPS64 if dtype == torch.float64 else EPS32
    scale = _nb_terms_scale(X3[pos], M3[pos], T3[pos]) + X3[pos]
    # + the reference's gammaln cancellation, + the Stirling truncation (< 1/(360 theta^3) < 3e-9 nats) for theta > 100.
    ref_err = 8 * EPS64 * (np.abs(sc.gammaln(X3[pos] + T3[pos])) + np.abs(sc.gammaln(T3[pos]))) + 3e-9
    _assert_within(nb.double().numpy()[pos], ref, 32 * eps * np.maximum(1, scale) + ref_err, f"NB full range {dtype}")
    # mu = 0: log p(0) = 0, and x > 0 is (very) improbable.
    assert nb[~torch.from_numpy(pos) & (torch.from_numpy(X) == 0)].abs().max() < 1e-30
    assert (nb[~torch.from_numpy(pos) & (torch.from_numpy(X) > 0)] < -80).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    """float16 / bfloat16 parameters give float32 log-probabilities equal to the float32 computation on the same
    (rounded) values: finite wherever the rounded inputs are finite, although the value (here down to -1e7 nats)
    does not fit in float16."""
    T, M, X = _grid(WIDE_THETAS, WIDE_MUS, WIDE_XS)
    Z = np.full(T.shape, -1.0)
    t, m, x, z = (_t(a, dtype) for a in (T, M, X, Z))
    ok = torch.isfinite(t) & torch.isfinite(m) & torch.isfinite(x)
    if dtype == torch.bfloat16:
        assert ok.all()  # bfloat16 has float32's range
    for half, full in [
        (NegativeBinomial(m, t).log_prob(x), NegativeBinomial(m.float(), t.float()).log_prob(x.float())),
        (ZeroInflatedNegativeBinomial(m, t, z).log_prob(x),
         ZeroInflatedNegativeBinomial(m.float(), t.float(), z.float()).log_prob(x.float())),
        (Poisson(m).log_prob(x), Poisson(m.float()).log_prob(x.float())),
    ]:
        assert half.dtype == torch.float32
        assert torch.isfinite(half[ok]).all()
        torch.testing.assert_close(half[ok], full[ok], rtol=0, atol=0)
    n = Normal(_t([0.0, 300.0], dtype), _t([1e-2, 1.0], dtype)).log_prob(_t([300.0, 0.0], dtype))
    assert n.dtype == torch.float32 and torch.isfinite(n).all() and (n < -4e4).all()  # z^2/2 ~ 4.5e8, not inf


def test_theta_infinite_is_the_poisson_limit():
    mu = torch.tensor([0.0, 0.5, 3.0, 1e4, 1e7], dtype=torch.float64)
    x = torch.tensor([0.0, 1.0, 2.0, 1e4, 1e6], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        inf = torch.full_like(mu, math.inf, dtype=dtype)
        nb = NegativeBinomial(mu.to(dtype), inf).log_prob(x.to(dtype))
        po = Poisson(mu.to(dtype)).log_prob(x.to(dtype))
        assert torch.isfinite(nb).all()
        tol = 1e-9 if dtype == torch.float64 else 32 * EPS32
        scale = (x * torch.log(mu.clamp(min=1e-300)).abs() + mu + torch.lgamma(x + 1)).clamp(min=1).to(dtype)
        assert ((nb - po).abs() <= tol * scale).all(), (dtype, nb, po)
