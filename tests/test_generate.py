"""Generation from a trained CountVAE: prior samples, label-conditional samples, posterior predictive samples."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cellvae import CellvaeInputError, CountVAE


def _small(kang, n_cells=240, n_genes=120):
    rng = np.random.default_rng(3)
    sub = kang[np.sort(rng.choice(kang.n_obs, n_cells, replace=False))]
    detected = np.asarray((sub.X > 0).sum(0)).ravel()
    return sub[:, np.sort(np.argsort(-detected, kind="stable")[:n_genes])].copy()


@pytest.fixture(scope="module")
def gen_model(kang):
    a = _small(kang)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CountVAE(a, batch_key="condition", labels_key="cell_type", n_hidden=32, n_latent=5)
        m.train(max_epochs=4, batch_size=64, progress_bar=False, n_threads=1, seed=0)
    return m


def _is_counts(X):
    return np.all(X >= 0) and np.array_equal(X, np.round(X)) and np.all(np.isfinite(X))


def test_sample_prior_shapes_counts_and_determinism(gen_model):
    s = gen_model.sample(30, seed=1)
    assert s.shape == (30, gen_model.adata.n_vars)
    assert list(s.var_names) == list(gen_model.spec.gene_names)
    assert _is_counts(s.X) and np.array_equal(s.X, s.layers["counts"])
    assert s.layers["mean"].shape == s.shape and np.all(s.layers["mean"] >= 0)
    np.testing.assert_allclose(s.layers["normalized"].sum(1), 1.0, rtol=1e-4)
    assert s.obsm["X_cellvae"].shape == (30, 5)
    # default covariate: the most frequent category among the training cells
    tr = gen_model.adata.obs["condition"].astype(str).to_numpy()[gen_model.train_indices]
    assert s.obs["condition"].astype(str).unique().tolist() == [max(set(tr), key=list(tr).count)]
    # library sizes are resampled from the observed ones
    totals = np.asarray(gen_model.adata.X.sum(1)).ravel()
    assert np.isin(s.obs["library_size"].to_numpy(), totals.astype(np.float32)).all()
    s2 = gen_model.sample(30, seed=1)
    np.testing.assert_array_equal(s.X, s2.X)
    assert not np.array_equal(s.X, gen_model.sample(30, seed=2).X)


def test_sample_covariates_library_and_labels(gen_model):
    s = gen_model.sample(12, covariates={"condition": "stim"}, library_size=500, seed=0)
    assert (s.obs["condition"] == "stim").all()
    np.testing.assert_allclose(s.layers["mean"].sum(1), 500, rtol=1e-3)
    for how in ("posterior", "gaussian"):
        lab = gen_model.sample(10, labels="B cells", label_sampling=how, seed=0)
        assert lab.shape == (10, gen_model.adata.n_vars) and _is_counts(lab.X)
        assert (lab.obs["label"] == "B cells").all()
    # label-conditional latents sit near that label's training cells, prior ones do not in general
    z = gen_model.get_latent_representation()
    b = (gen_model.adata.obs["cell_type"] == "B cells").to_numpy()
    zl = gen_model.sample(200, labels="B cells", seed=0).obsm["X_cellvae"]
    assert np.linalg.norm(zl.mean(0) - z[b].mean(0)) < np.linalg.norm(zl.mean(0) - z[~b].mean(0)) + 1e-6


def test_sample_errors(gen_model):
    with pytest.raises(CellvaeInputError, match="not known to the model"):
        gen_model.sample(5, covariates={"condition": "nope"})
    with pytest.raises(CellvaeInputError, match="not covariates of the model"):
        gen_model.sample(5, covariates={"donor": "101"})
    with pytest.raises(CellvaeInputError, match="no training cells"):
        gen_model.sample(5, labels="not a type")
    with pytest.raises(CellvaeInputError):
        gen_model.sample(0)


def test_posterior_predictive_sample(gen_model):
    n, g = gen_model.adata.shape
    x = gen_model.posterior_predictive_sample(seed=0)
    assert x.shape == (n, g) and x.dtype == np.float32 and _is_counts(x)
    np.testing.assert_array_equal(x, gen_model.posterior_predictive_sample(seed=0))
    x3 = gen_model.posterior_predictive_sample(indices=[0, 4, 7], n_samples=3, seed=0)
    assert x3.shape == (3, 3, g) and _is_counts(x3)
    # roughly the observed library sizes (observed library is used)
    obs = np.asarray(gen_model.adata.X.sum(1)).ravel()
    ratio = x.sum(1) / obs
    assert 0.5 < np.median(ratio) < 1.5
