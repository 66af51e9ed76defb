"""Perturbation prediction (cellvae.perturb) on a small real subset of Kang et al. 2018 (ctrl / IFN-beta stim)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cellvae import CellvaeInputError, CountVAE
from cellvae.analysis.perturb import latent_delta, predict_perturbation

HELD = "B cells"
OTHER = "CD14+ Monocytes"


def _fit(adata, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CountVAE(adata, n_hidden=32, n_latent=5, **kw)
        m.train(max_epochs=15, batch_size=64, progress_bar=False, n_threads=1, seed=0)
    return m


@pytest.fixture(scope="module")
def kang_pert(kang):
    """50 cells of each of (B cells, CD14+ Monocytes) x (ctrl, stim), 150 most detected genes; the training data
    leaves out the stimulated B cells."""
    rng = np.random.default_rng(0)
    ct = kang.obs["cell_type"].astype(str).to_numpy()
    cond = kang.obs["condition"].astype(str).to_numpy()
    cells = np.sort(np.concatenate([
        rng.choice(np.flatnonzero((ct == t) & (cond == c)), 50, replace=False)
        for t in (HELD, OTHER) for c in ("ctrl", "stim")
    ]))
    sub = kang[cells]
    detected = np.asarray((sub.X > 0).sum(0)).ravel()
    sub = sub[:, np.sort(np.argsort(-detected, kind="stable")[:150])].copy()
    held = ((sub.obs["cell_type"] == HELD) & (sub.obs["condition"] == "stim")).to_numpy()
    train = sub[~held].copy()
    la = _fit(train, batch_key="donor")
    ds = _fit(train, batch_key="donor", categorical_covariate_keys=["condition"])
    return sub, train, la, ds


@pytest.mark.parametrize("method", ["latent_arithmetic", "decoder_swap"])
def test_output_anndata(kang_pert, method):
    sub, train, la, ds = kang_pert
    model = la if method == "latent_arithmetic" else ds
    pred = predict_perturbation(model, sub, "condition", "ctrl", "stim", cell_type_key="cell_type",
                                cell_type=HELD, method=method, seed=0)
    ctrl = sub[(sub.obs["cell_type"] == HELD).to_numpy() & (sub.obs["condition"] == "ctrl").to_numpy()]
    assert pred.shape == (ctrl.n_obs, len(model.spec.gene_names))
    assert list(pred.var_names) == list(model.spec.gene_names) == list(sub.var_names)
    assert list(pred.obs_names) == list(ctrl.obs_names)
    assert (pred.obs["condition"] == "stim").all()
    assert (pred.obs["cellvae_source_condition"] == "ctrl").all()
    assert (pred.obs["cell_type"] == HELD).all()
    assert (pred.obs["donor"].to_numpy() == ctrl.obs["donor"].to_numpy()).all()
    # X: expected counts rho * observed library size
    assert pred.X.dtype == np.float32 and np.isfinite(pred.X).all() and (pred.X >= 0).all()
    np.testing.assert_allclose(pred.X.sum(1), np.asarray(ctrl.X.sum(1)).ravel(), rtol=1e-4)
    # layers['counts']: integer-valued non-negative draws from the likelihood
    c = pred.layers["counts"]
    assert c.shape == pred.shape and (c >= 0).all() and np.array_equal(c, np.round(c))
    assert c.sum() > 0
    assert pred.obsm["X_cellvae"].shape == (ctrl.n_obs, 5)
    assert pred.uns["cellvae_perturbation"]["method"] == method


def test_latent_arithmetic_delta_and_shift(kang_pert):
    sub, train, la, _ = kang_pert
    # delta = mean latent of stim - ctrl over the other cell type (the only one with both conditions)
    z = la.get_latent_representation()
    ct, cond = train.obs["cell_type"].to_numpy(), train.obs["condition"].to_numpy()
    expect = z[(ct == OTHER) & (cond == "stim")].mean(0) - z[(ct == OTHER) & (cond == "ctrl")].mean(0)
    delta, info = latent_delta(la, "condition", "ctrl", "stim", cell_type_key="cell_type", exclude_cell_types=HELD)
    np.testing.assert_allclose(delta, expect, atol=1e-5)
    assert list(info["cell_types"]) == [OTHER]
    pred = predict_perturbation(la, sub, "condition", "ctrl", "stim", "cell_type", HELD)
    ctrl = sub[(sub.obs["cell_type"] == HELD).to_numpy() & (sub.obs["condition"] == "ctrl").to_numpy()]
    np.testing.assert_allclose(pred.obsm["X_cellvae"], la.get_latent_representation(ctrl) + expect, atol=1e-4)


def test_deterministic_and_n_samples(kang_pert):
    sub, _, _, ds = kang_pert
    kw = dict(cell_type_key="cell_type", cell_type=HELD, method="decoder_swap")
    a = predict_perturbation(ds, sub, "condition", "ctrl", "stim", seed=3, **kw)
    b = predict_perturbation(ds, sub, "condition", "ctrl", "stim", seed=3, **kw)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.layers["counts"], b.layers["counts"])
    c = predict_perturbation(ds, sub, "condition", "ctrl", "stim", n_samples=4, seed=3, **kw)
    assert c.shape == a.shape and np.array_equal(c.layers["counts"], np.round(c.layers["counts"]))
    np.testing.assert_allclose(c.X.sum(1), a.X.sum(1), rtol=1e-4)


def test_decoder_swap_needs_condition_covariate(kang_pert):
    sub, _, la, _ = kang_pert
    with pytest.raises(CellvaeInputError, match=r"categorical_covariate_keys=\['condition'\]"):
        predict_perturbation(la, sub, "condition", "ctrl", "stim", method="decoder_swap")


def test_unknown_categories_and_no_cells(kang_pert):
    sub, _, la, ds = kang_pert
    for model, method in ((la, "latent_arithmetic"), (ds, "decoder_swap")):
        with pytest.raises(CellvaeInputError, match="perturbed='IFNg' is not a category"):
            predict_perturbation(model, sub, "condition", "ctrl", "IFNg", method=method)
        with pytest.raises(CellvaeInputError, match="control='untreated' is not a category"):
            predict_perturbation(model, sub, "condition", "untreated", "stim", method=method)
    with pytest.raises(CellvaeInputError, match="cell_type='NK cells' is not a category"):
        predict_perturbation(la, sub, "condition", "ctrl", "stim", "cell_type", "NK cells")
    with pytest.raises(CellvaeInputError, match="obs column 'treatment' not found"):
        predict_perturbation(la, sub, "treatment", "ctrl", "stim")
    with pytest.raises(CellvaeInputError, match="method must be one of"):
        predict_perturbation(la, sub, "condition", "ctrl", "stim", method="scgen")
    stim_only = sub[(sub.obs["condition"] == "stim").to_numpy()].copy()
    with pytest.raises(CellvaeInputError, match="No control cells"):
        predict_perturbation(la, stim_only, "condition", "ctrl", "stim", "cell_type", HELD)
    # predicting the other type: no cell type besides it has training cells of both conditions
    with pytest.raises(CellvaeInputError, match="No cell type of obs\\['cell_type'\\] other than"):
        predict_perturbation(la, sub, "condition", "ctrl", "stim", "cell_type", OTHER)


def test_loaded_without_adata(kang_pert, tmp_path):
    sub, train, la, ds = kang_pert
    la.save(tmp_path / "la")
    ds.save(tmp_path / "ds")
    la2 = CountVAE.load(tmp_path / "la")
    with pytest.raises(CellvaeInputError, match="no attached training AnnData"):
        predict_perturbation(la2, sub, "condition", "ctrl", "stim", "cell_type", HELD)
    # decoder swap needs only the control cells: works on a model loaded without data, same result
    ds2 = CountVAE.load(tmp_path / "ds")
    kw = dict(cell_type_key="cell_type", cell_type=HELD, method="decoder_swap", seed=0)
    a = predict_perturbation(ds2, sub, "condition", "ctrl", "stim", **kw)
    b = predict_perturbation(ds, sub, "condition", "ctrl", "stim", **kw)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5)
    # with the training data attached again, latent arithmetic works as before
    la3 = CountVAE.load(tmp_path / "la", adata=train)
    c = predict_perturbation(la3, sub, "condition", "ctrl", "stim", "cell_type", HELD)
    d = predict_perturbation(la, sub, "condition", "ctrl", "stim", "cell_type", HELD)
    np.testing.assert_allclose(c.X, d.X, rtol=1e-5)


def test_normal_likelihood_refused(kang_pert):
    sub, train, _, _ = kang_pert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CountVAE(train, gene_likelihood="normal", n_hidden=16, n_latent=3)
    with pytest.raises(CellvaeInputError, match="count likelihood"):
        predict_perturbation(m, sub, "condition", "ctrl", "stim")


@pytest.mark.parametrize("method", ["latent_arithmetic", "decoder_swap"])
def test_posterior_samples(kang_pert, method):
    sub, _, la, ds = kang_pert
    model = la if method == "latent_arithmetic" else ds
    kw = dict(cell_type_key="cell_type", cell_type=HELD, method=method, seed=5)
    base = predict_perturbation(model, sub, "condition", "ctrl", "stim", n_samples=6, **kw)
    res = predict_perturbation(model, sub, "condition", "ctrl", "stim", n_samples=6, return_samples=True, **kw)
    n, g = res.shape
    # return_samples only adds the per-cell draws: X and counts are those of the same call without it
    np.testing.assert_array_equal(res.X, base.X)
    np.testing.assert_array_equal(res.layers["counts"], base.layers["counts"])
    s = res.obsm["cellvae_samples"]
    assert s.shape == (n, 6, g) and s.dtype == np.float32 and np.isfinite(s).all()
    # X is the mean of the draws; the draws differ from each other (posterior spread)
    np.testing.assert_allclose(s.mean(1), res.X, rtol=1e-4, atol=1e-5)
    assert s.std(1).mean() > 0
    # per-gene population draws: rows of rho average to 1 over genes; perturbed = mean over cells of s / library
    pert, ctrl = res.varm["cellvae_perturbed_samples"], res.varm["cellvae_control_samples"]
    assert pert.shape == ctrl.shape == (g, 6)
    np.testing.assert_allclose(pert.sum(0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(ctrl.sum(0), 1.0, rtol=1e-4)
    lib = np.asarray(sub[res.obs_names].X.sum(1)).ravel()
    np.testing.assert_allclose(pert, (s / lib[:, None, None]).mean(0).T, rtol=1e-3, atol=1e-7)
    c = res.uns["cellvae_perturbation"]["pseudocount"]
    lfc = np.log2(pert + c) - np.log2(ctrl + c)
    np.testing.assert_allclose(res.var["cellvae_lfc_mean"], lfc.mean(1), rtol=1e-4, atol=1e-5)
    assert (res.var["cellvae_lfc_sd"] > 0).all()
    assert (res.var["cellvae_lfc_q05"] <= res.var["cellvae_lfc_q95"]).all()
    # the response differs more between cells than the population response between draws
    cq05, cq95 = res.var["cellvae_lfc_cells_q05"], res.var["cellvae_lfc_cells_q95"]
    assert (cq05 <= cq95).all()
    assert (cq95 - cq05).mean() > (res.var["cellvae_lfc_q95"] - res.var["cellvae_lfc_q05"]).mean()


def test_default_call_has_no_samples(kang_pert):
    sub, _, la, _ = kang_pert
    res = predict_perturbation(la, sub, "condition", "ctrl", "stim", "cell_type", HELD)
    assert "cellvae_samples" not in res.obsm and "cellvae_perturbed_samples" not in res.varm
    assert "cellvae_lfc_mean" not in res.var.columns
    with pytest.raises(CellvaeInputError, match="needs n_samples >= 2"):
        predict_perturbation(la, sub, "condition", "ctrl", "stim", "cell_type", HELD, return_samples=True)
    import cellvae.analysis.perturb as pmod
    old = pmod.MAX_SAMPLE_VALUES
    pmod.MAX_SAMPLE_VALUES = 1000
    try:
        with pytest.raises(CellvaeInputError, match="use n_samples <= 1"):
            predict_perturbation(la, sub, "condition", "ctrl", "stim", "cell_type", HELD, n_samples=3,
                                 return_samples=True)
    finally:
        pmod.MAX_SAMPLE_VALUES = old


def test_perturb_command_writes_report(kang_pert, tmp_path):
    """cellvae perturb on a model trained without the stimulated B cells; DATA holds them, so the report compares
    the prediction with them."""
    import anndata as ad
    from click.testing import CliRunner

    from cellvae.cli import main

    sub, train, la, _ = kang_pert
    la.save(tmp_path / "model")
    data = tmp_path / "data.h5ad"
    sub.write_h5ad(data)
    out = tmp_path / "pred.h5ad"
    args = ["perturb", str(tmp_path / "model"), str(data), "--condition-key", "condition", "--control", "ctrl",
            "--perturbed", "stim", "--cell-type-key", "cell_type", "--cell-type", HELD, "--n-samples", "8",
            "--out", str(out), "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    html_path = tmp_path / "pred.html"
    assert html_path.exists() and str(html_path) in r.output
    html = html_path.read_text()
    for heading in ("Predicted against real change per gene", "Top predicted responding genes",
                    "Control, predicted and real cells", "90% interval"):
        assert heading in html, heading
    assert html.count("data:image/png;base64,") >= 4  # training, scatter, intervals, UMAP
    assert "50 cells of data.h5ad with condition == &#x27;stim&#x27; and cell_type == &#x27;B cells&#x27;" in html
    pred = ad.read_h5ad(out)
    # X and counts: the default (posterior mean) prediction; the posterior summaries from 8 draws added
    ref = predict_perturbation(la, sub, "condition", "ctrl", "stim", "cell_type", HELD, seed=0)
    np.testing.assert_allclose(pred.X, ref.X, rtol=1e-5)
    assert pred.varm["cellvae_perturbed_samples"].shape == (pred.n_vars, 8)
    assert np.isfinite(pred.var["cellvae_lfc_mean"]).all() and (pred.var["cellvae_lfc_sd"] > 0).all()
    # --no-report writes no HTML; real cells lacking genes are refused
    r = CliRunner().invoke(main, args[:-3] + ["--out", str(tmp_path / "p2.h5ad"), "--no-report", "--quiet"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "p2.html").exists()
    few = tmp_path / "few.h5ad"
    sub[:, :100].copy().write_h5ad(few)
    r = CliRunner().invoke(main, args[:-3] + ["--out", str(tmp_path / "p3.h5ad"), "--real-data", str(few),
                                              "--quiet"])
    assert r.exit_code == 2 and "lack 50 of the model's genes" in r.output
    assert not (tmp_path / "p3.h5ad").exists()  # refused before anything is written
