"""Latent interpolation, arithmetic and traversals, and the MIG disentanglement metric."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cellvae import CellvaeInputError, CountVAE
from cellvae.analysis.generate import decode_latent
from cellvae.analysis.latent import plot_interpolation, plot_latent_traversal
from cellvae.metrics import mutual_information_gap


@pytest.fixture(scope="module")
def lat_model(zeisel):
    rng = np.random.default_rng(0)
    sub = zeisel[np.sort(rng.choice(zeisel.n_obs, 240, replace=False))]
    detected = np.asarray((sub.X > 0).sum(0)).ravel()
    a = sub[:, np.sort(np.argsort(-detected, kind="stable")[:120])].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CountVAE(a, labels_key="cell_type", n_hidden=32, n_latent=4)
        m.train(max_epochs=4, batch_size=64, progress_bar=False, n_threads=1, seed=0)
    return m


def test_interpolation_endpoints(lat_model, tmp_path):
    a = lat_model.adata
    p = lat_model.interpolate(0, a.obs_names[7], n_steps=6)
    assert p.shape == (6, a.n_vars)
    np.testing.assert_allclose(p.obs["t"].to_numpy(), np.linspace(0, 1, 6))
    # endpoints = decoding of the endpoint cells' posterior means (no batch: same as normalized expression)
    ne = lat_model.get_normalized_expression(a[[0, 7]], library_size=1e4, return_numpy=True)
    np.testing.assert_allclose(p.X[0], ne[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p.X[-1], ne[1], rtol=1e-4, atol=1e-4)
    z = lat_model.get_latent_representation()
    np.testing.assert_allclose(p.obsm["X_cellvae"][[0, -1]], z[[0, 7]], rtol=1e-5, atol=1e-5)
    # group endpoints (mask / list): the mean latent code, decoded
    ct = a.obs["cell_type"].astype(str).to_numpy()
    t0, t1 = sorted(set(ct))[:2]
    g = lat_model.interpolate(ct == t0, list(np.flatnonzero(ct == t1)), n_steps=3)
    np.testing.assert_allclose(g.obsm["X_cellvae"][0], z[ct == t0].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.X[-1], decode_latent(lat_model, z[ct == t1].mean(0, keepdims=True))[0],
                               rtol=1e-4, atol=1e-3)
    fig = plot_interpolation(g, list(a.var_names[:3]), tmp_path / "interp.png")
    assert fig is not None and (tmp_path / "interp.png").stat().st_size > 0
    with pytest.raises(CellvaeInputError):
        lat_model.interpolate("no such cell", 0)
    with pytest.raises(CellvaeInputError):
        lat_model.interpolate(0, 1, n_steps=1)


def test_latent_arithmetic_and_traversal(lat_model, tmp_path):
    a = lat_model.adata
    ct = a.obs["cell_type"].astype(str).to_numpy()
    t0, t1 = sorted(set(ct))[:2]
    r = lat_model.latent_arithmetic(a, base=ct == t0, plus=ct == t1, minus=ct == t0)
    assert r.shape == ((ct == t0).sum(), a.n_vars)
    z = lat_model.get_latent_representation()
    delta = z[ct == t1].mean(0) - z[ct == t0].mean(0)
    np.testing.assert_allclose(r.obsm["X_cellvae"], z[ct == t0] + delta, rtol=1e-4, atol=1e-4)
    # plus == minus: no shift, the cells' own decoding
    same = lat_model.latent_arithmetic(a, base=[1, 2], plus=ct == t1, minus=ct == t1)
    ne = lat_model.get_normalized_expression(a[[1, 2]], library_size=1e4, return_numpy=True)
    np.testing.assert_allclose(same.X, ne, rtol=1e-4, atol=1e-4)
    tr = lat_model.latent_traversal(n_steps=5)
    assert tr.shape == (4 * 5, a.n_vars) and set(tr.obs["dim"]) == {0, 1, 2, 3}
    assert np.allclose(tr.obs["value"].min(), -3) and np.allclose(tr.obs["value"].max(), 3)
    plot_latent_traversal(tr, n_genes=3, path=tmp_path / "trav.png")
    assert (tmp_path / "trav.png").exists()


def test_mig_aligned_beats_random():
    rng = np.random.default_rng(0)
    n = 600
    f1, f2 = rng.integers(0, 3, n), rng.integers(0, 4, n)
    aligned = np.column_stack([f1 + 0.05 * rng.normal(size=n), f2 + 0.05 * rng.normal(size=n),
                               rng.normal(size=n), rng.normal(size=n)])
    mixed = aligned[:, :2] @ np.array([[1.0, 1.0], [1.0, -1.0]])  # each dim carries both factors
    random = rng.normal(size=(n, 4))
    fac = {"a": f1, "b": f2}
    hi = mutual_information_gap(aligned, fac)
    lo = mutual_information_gap(random, fac)
    mid = mutual_information_gap(np.column_stack([mixed, random[:, :2]]), fac)
    assert hi["mig"] > 0.8 and lo["mig"] < 0.1 and hi["mig"] > mid["mig"] > lo["mig"] - 1e-9
    assert hi["best_dim"] == {"a": 0, "b": 1}
    assert hi["mutual_info"].shape == (4, 2)
    with pytest.raises(ValueError):
        mutual_information_gap(random[:, :1], fac)
