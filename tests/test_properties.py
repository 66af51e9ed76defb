"""Property tests (hypothesis, derandomized): likelihoods against scipy.stats over the whole supported range, and
fuzzed inputs to the data layer, which either succeed or raise a clean CellvaeInputError, never anything else.

Ranges: inverse dispersion theta in [1e-4, 1e8], mean mu in {0} or [1e-8, 1e7], counts x in [0, 1e6], zero-
inflation logits in [-15, 15]. References are scipy.stats in float64 (NB: ``nbinom(n=theta, p=theta/(theta+mu))``;
ZINB: the mixture ``pi [x = 0] + (1 - pi) NB(x)`` in log space; Poisson; Normal). Tolerances, as in
tests/test_distributions.py: in float64 scipy's own error (``p`` cannot carry ``1 - p = mu/(theta+mu)`` when
``mu << theta``; ``gammaln(x+theta) - gammaln(theta)`` cancels); in float32 a small multiple of eps32 times the
magnitude of the terms summed. float16/bfloat16 parameters are computed in float32: where the rounded inputs are
finite the result must be finite and as accurate as float32 on those rounded inputs.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.special as sc
import scipy.stats as stats
import torch

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install -e '.[dev]'")
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cellvae import CellvaeInputError, CellvaeTrainingError, CountVAE, read_data  # noqa: E402
from cellvae.data import check_values  # noqa: E402
from cellvae.distributions import NegativeBinomial, Normal, Poisson, ZeroInflatedNegativeBinomial  # noqa: E402

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------------------------------- strategies


def _log_uniform(lo: float, hi: float):
    return st.floats(np.log10(lo), np.log10(hi)).map(lambda e: float(10.0**e))


thetas = _log_uniform(1e-4, 1e8)
mus = st.one_of(st.just(0.0), _log_uniform(1e-8, 1e7), st.floats(0.0, 50.0))
counts = st.one_of(st.integers(0, 20), st.integers(0, 1_000_000), _log_uniform(1, 1e6).map(round)).map(float)
logits = st.floats(-15.0, 15.0)
points = st.lists(st.tuples(thetas, mus, counts, logits), min_size=1, max_size=40)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _rounded(values, dtype):
    """The parameters as the tensors hold them (rounded to ``dtype``), back in float64 for the references."""
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    return t, t.double().numpy()


def _nb_logpmf_scipy(x, mu, theta):
    with np.errstate(all="ignore"):
        return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def _nb_terms(x, mu, theta):
    """Magnitude of the terms of the log-pmf (float32 rounding errors scale with it)."""
    mu = np.maximum(mu, 1e-300)
    return (np.abs(sc.gammaln(x + theta) - sc.gammaln(theta)) + sc.gammaln(x + 1) + np.abs(theta * np.log1p(mu / theta))
            + np.abs(sc.xlogy(x, mu)) + np.abs(sc.xlogy(x, theta + mu)) + x)


def _nb_tol(x, mu, theta, dtype):
    if dtype == torch.float64:
        scipy_p = 8 * EPS64 * x * (theta + mu) / np.maximum(mu, 1e-300)  # scipy's error from p = theta/(theta+mu)
        cancel = 8 * EPS64 * (np.abs(sc.gammaln(x + theta)) + np.abs(sc.gammaln(theta)))
        return 1e-8 * np.maximum(1, np.abs(_nb_logpmf_scipy(x, mu, theta))) + scipy_p + cancel
    return 32 * EPS32 * np.maximum(1, _nb_terms(x, mu, theta)) + 8 * EPS64 * x * (theta + mu) / np.maximum(mu, 1e-300)


def _check(got: torch.Tensor, ref: np.ndarray, tol: np.ndarray, x: np.ndarray, what: str):
    assert got.dtype in (torch.float64, torch.float32), what
    g = got.double().numpy()
    assert np.isfinite(g).all(), f"{what}: non-finite {g[~np.isfinite(g)][:3]}"
    fin = np.isfinite(ref)
    err = np.abs(g - ref)
    bad = fin & ~(err <= tol)
    assert not bad.any(), f"{what}: got {g[bad][:3]}, ref {ref[bad][:3]}, tol {tol[bad][:3]}"
    # scipy's -inf (mu = 0, or p rounded to 1, with x > 0): ours is finite and very negative.
    assert (g[~fin & (x > 0)] < -15).all(), what


def _inputs(pts, dtype):
    th, mu, x, z = zip(*pts)
    (tt, T), (mt, M), (xt, X), (zt, Z) = (_rounded(v, dtype) for v in (th, mu, x, z))
    finite = np.isfinite(T).all() and np.isfinite(M).all() and np.isfinite(X).all() and (T > 0).all()
    return tt, mt, xt, zt, T, M, X, Z, finite


# ----------------------------------------------------------------------------------------- likelihoods


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@FAST
@given(pts=points)
def test_nb_log_prob_vs_scipy(dtype, pts):
    tt, mt, xt, _, T, M, X, _, finite = _inputs(pts, dtype)
    assume(finite)  # float16 cannot hold theta, mu or x above 65504: there is no true value to compare with
    got = NegativeBinomial(mt, tt).log_prob(xt)
    _check(got, _nb_logpmf_scipy(X, M, T), _nb_tol(X, M, T, dtype), X, f"NB {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@FAST
@given(pts=points)
def test_zinb_log_prob_vs_scipy_mixture(dtype, pts):
    tt, mt, xt, zt, T, M, X, Z, finite = _inputs(pts, dtype)
    assume(finite)
    got = ZeroInflatedNegativeBinomial(mt, tt, zt).log_prob(xt)
    nb = _nb_logpmf_scipy(X, M, T)
    log_pi, log_1m_pi = -np.logaddexp(0, -Z), -np.logaddexp(0, Z)
    ref = np.where(X == 0, np.logaddexp(log_pi, log_1m_pi + nb), log_1m_pi + nb)
    tol = _nb_tol(X, M, T, dtype) + (16 * EPS32 if dtype != torch.float64 else 1e-12) * (1 + np.abs(Z))
    _check(got, ref, tol, X, f"ZINB {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@FAST
@given(pts=points)
def test_poisson_log_prob_vs_scipy(dtype, pts):
    _, mt, xt, _, _, M, X, _, finite = _inputs(pts, dtype)
    assume(finite)
    got = Poisson(mt).log_prob(xt)
    ref = stats.poisson.logpmf(X, M)
    scale = np.abs(sc.xlogy(X, M)) + M + sc.gammaln(X + 1)
    tol = (1e-10 if dtype == torch.float64 else 32 * EPS32) * np.maximum(1, scale)
    _check(got, ref, tol, X, f"Poisson {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@FAST
@given(loc=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=20), scale=_log_uniform(1e-3, 1e3),
       shift=st.floats(-1e3, 1e3))
def test_normal_log_prob_vs_scipy(dtype, loc, scale, shift):
    lt, L = _rounded(loc, dtype)
    st_, S = _rounded([scale] * len(loc), dtype)
    xt, X = _rounded([v + shift for v in loc], dtype)
    got = Normal(lt, st_).log_prob(xt)
    ref = stats.norm.logpdf(X, L, S)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    _check(got, ref, rel * np.maximum(1, np.abs(ref)), np.zeros_like(X), f"Normal {dtype}")


# ---------------------------------------------------------------------------------------- data layer

_DTYPES = [np.float16, np.float32, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint32, bool,
           object]
_SPECIAL = [0.0, 1.0, 2.0, 7.0, -1.0, 0.5, np.nan, np.inf, -np.inf, 1e6, 3e38, 1e300, 65504.0, 255.0]


@st.composite
def matrices(draw):
    n = draw(st.one_of(st.integers(0, 3), st.integers(4, 12)))
    g = draw(st.one_of(st.just(0), st.integers(1, 6)))
    base = draw(st.sampled_from(["counts", "counts", "counts", "zeros", "special"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if base == "counts":
        X = rng.poisson(draw(st.floats(0.1, 20)), size=(n, g)).astype(np.float64)
    elif base == "zeros":
        X = np.zeros((n, g))
    else:
        X = rng.choice(_SPECIAL, size=(n, g))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):  # a few special entries anywhere
        if n and g:
            X[draw(st.integers(0, n - 1)), draw(st.integers(0, g - 1))] = draw(st.sampled_from(_SPECIAL))
    dtype = draw(st.sampled_from(_DTYPES))
    with np.errstate(all="ignore"):
        X = X.astype(dtype) if dtype is not object else X.astype(object)
    form = draw(st.sampled_from(["dense", "csr", "csc", "csr_array"]))
    if form != "dense" and dtype not in (object, np.float16):  # scipy.sparse holds neither
        X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "csr_array": sp.csr_array}[form](X)
    return X


@st.composite
def obs_columns(draw, n):
    kind = draw(st.sampled_from(["none", "none", "batch", "cont", "both"]))
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    fine = draw(st.booleans())  # only valid values, or any
    if kind in ("batch", "both"):
        vals = ["a", "b"] if fine else ["a", "b", None, np.nan, 3]
        obs["b"] = draw(st.lists(st.sampled_from(vals), min_size=n, max_size=n))
    if kind in ("cont", "both"):
        vals = [0.0, 1.5, -3.0] if fine else [0.0, 1.5, -3.0, np.nan, np.inf, "x", 1e40]
        obs["s"] = draw(st.lists(st.sampled_from(vals), min_size=n, max_size=n))
    return obs, "b" if "b" in obs else None, ["s"] if "s" in obs else None


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_count_vae_input_fuzz(data):
    """Random matrices (shape, dtype, sparse format, NaN/inf/negative/fractional/huge entries) and covariates:
    CountVAE either builds and prepares finite float32 tensors, or raises CellvaeInputError."""
    X = data.draw(matrices())
    obs, batch_key, cont_keys = data.draw(obs_columns(X.shape[0]))
    likelihood = data.draw(st.sampled_from(["zinb", "nb", "poisson", "normal"]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])]))
    except Exception:  # noqa: BLE001 - anndata's own refusal, before cellvae sees the data
        assume(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = CountVAE(adata, batch_key=batch_key, continuous_covariate_keys=cont_keys, gene_likelihood=likelihood,
                         n_hidden=4, n_latent=2)
            td = m.prepared_data()
    except CellvaeInputError as e:
        assert str(e)  # a message
        event("refused")
        return
    assert td.X.dtype == torch.float32 and td.X.shape == (adata.n_obs, len(m.spec.gene_names))
    assert torch.isfinite(td.X).all()
    if td.cont is not None:
        assert torch.isfinite(td.cont).all()
    # A short training run ends normally or with one of cellvae's errors.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.train(max_epochs=1, batch_size=2, progress_bar=False, n_threads=1)
    except (CellvaeInputError, CellvaeTrainingError) as e:
        event(f"built, training refused: {type(e).__name__}")
        return
    event("built and trained")
    assert np.isfinite(m.get_latent_representation()).all()


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 12), g=st.integers(1, 6), rate=st.floats(0.5, 30), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint32]),
       form=st.sampled_from(["dense", "csr", "csc", "csr_array"]),
       likelihood=st.sampled_from(["zinb", "nb", "poisson", "normal"]))
def test_valid_counts_in_any_form_are_accepted(n, g, rate, seed, dtype, form, likelihood):
    """Raw counts in any numeric dtype and sparse format are accepted, converted exactly, and train."""
    counts = np.random.default_rng(seed).poisson(rate, size=(n, g)).clip(max=100)
    X = counts.astype(dtype)
    if form != "dense" and dtype is not np.float16:
        X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "csr_array": sp.csr_array}[form](X)
    adata = ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty cells or genes are dropped with a warning
        try:
            m = CountVAE(adata, gene_likelihood=likelihood, n_hidden=4, n_latent=2)
        except CellvaeInputError as e:
            assert "zero counts" in str(e) and counts.sum() == 0
            return
        kept = np.isin(adata.var_names, m.spec.gene_names)
        if likelihood != "normal":
            np.testing.assert_array_equal(m.prepared_data().X.numpy(), counts[:, kept].astype(np.float32))
        try:
            m.train(max_epochs=1, batch_size=2, progress_bar=False, n_threads=1)
        except CellvaeInputError as e:
            assert "at least 3 are needed" in str(e) and (counts[:, kept].sum(1) > 0).sum() < 3
            return
    assert np.isfinite(m.get_latent_representation()).all()


@FAST
@given(X=matrices(), count=st.booleans())
def test_check_values_fuzz(X, count):
    try:
        check_values(X, count_likelihood=count)
    except CellvaeInputError:
        return
    v = X.data if sp.issparse(X) else np.asarray(X)
    assert np.isfinite(v.astype(np.float64)).all()
    if count and v.size:
        assert v.min() >= 0 and np.allclose(v, np.round(v))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=300),
                         st.lists(st.lists(st.sampled_from(["", "1", "x", "2.5", "c", "nan", ",", "3"]),
                                           min_size=1, max_size=5), min_size=1, max_size=5)
                         .map(lambda rows: "\n".join(",".join(r) for r in rows).encode())),
       suffix=st.sampled_from([".h5ad", ".csv", ".tsv", ".h5"]))
def test_read_data_fuzz(tmp_path_factory, content, suffix):
    """Random bytes or ragged text as a data file: read_data returns an AnnData or raises CellvaeInputError."""
    p = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    p.write_bytes(content)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = read_data(p)
    except CellvaeInputError as e:
        assert str(e)
        return
    assert a.n_obs > 0 and a.n_vars > 0
