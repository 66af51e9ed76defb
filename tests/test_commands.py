"""CLI analysis commands on a saved model: cellvae de, score, perturb, generate (real Kang subset)."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cellvae import CountVAE
from cellvae.cli import main


def _md5(p):
    return hashlib.md5(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, kang):
    """A small model trained on 400 Kang cells x 150 genes, saved, and its training data on disk."""
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(kang.n_obs, 400, replace=False))
    sub = kang[cells]
    detected = np.asarray((sub.X > 0).sum(0)).ravel()
    sub = sub[:, np.sort(np.argsort(-detected, kind="stable")[:150])].copy()
    d = tmp_path_factory.mktemp("cmd")
    data = d / "train.h5ad"
    sub.write_h5ad(data)
    model = CountVAE(sub)
    model.train(max_epochs=8, progress_bar=False, seed=0)
    model.save(d / "model")
    return d, data, sub


def test_de_command_writes_sorted_csv(saved):
    d, data, sub = saved
    before = _md5(data)
    out = d / "de_b.csv"
    r = CliRunner().invoke(main, ["de", str(d / "model"), str(data), "--groupby", "cell_type",
                                  "--group1", "B cells", "--n-samples", "500", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "B cells vs rest" in r.output
    df = pd.read_csv(out, index_col="gene")
    assert len(df) == sub.n_vars and set(df.index) == set(sub.var_names)
    assert {"proba_de", "bayes_factor", "lfc_mean", "is_de_fdr_0.05"} <= set(df.columns)
    assert (np.diff(df["bayes_factor"].to_numpy()) <= 1e-12).all()
    assert _md5(data) == before


def test_de_command_errors(saved):
    d, data, _ = saved
    r = CliRunner().invoke(main, ["de", str(d / "model"), str(data), "--groupby", "nope", "--out",
                                  str(d / "x.csv"), "--quiet"])
    assert r.exit_code == 2 and "nope" in r.output
    r = CliRunner().invoke(main, ["de", str(d / "model"), str(data), "--groupby", "cell_type", "--group1",
                                  "Martians", "--out", str(d / "x.csv"), "--quiet"])
    assert r.exit_code == 2 and "Martians" in r.output


def test_score_command_on_training_data_and_new_data(saved, kang):
    d, data, sub = saved
    out = d / "scores.csv"
    r = CliRunner().invoke(main, ["score", str(d / "model"), str(data), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    tab = pd.read_csv(out, index_col="cell")
    assert len(tab) == sub.n_obs and tab["cellvae_is_anomaly"].dtype == bool
    assert np.isfinite(tab["cellvae_anomaly"]).all()
    # new cells without --reference: no reference cells to compare with
    other = kang[~kang.obs_names.isin(sub.obs_names)][:50, sub.var_names].copy()
    new = d / "new.h5ad"
    other.write_h5ad(new)
    r = CliRunner().invoke(main, ["score", str(d / "model"), str(new), "--out", str(d / "s2.csv"), "--quiet"])
    assert r.exit_code == 2 and "--reference" in r.output
    out3 = d / "new_scored.h5ad"
    r = CliRunner().invoke(main, ["score", str(d / "model"), str(new), "--reference", str(data),
                                  "--out", str(out3), "--quiet"])
    assert r.exit_code == 0, r.output
    res = ad.read_h5ad(out3)
    assert {"cellvae_anomaly", "cellvae_is_anomaly"} <= set(res.obs.columns) and res.n_obs == 50


def test_perturb_command(saved):
    d, data, sub = saved
    out = d / "pred.h5ad"
    r = CliRunner().invoke(main, ["perturb", str(d / "model"), str(data), "--condition-key", "condition",
                                  "--control", "ctrl", "--perturbed", "stim", "--cell-type-key", "cell_type",
                                  "--cell-type", "B cells", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    pred = ad.read_h5ad(out)
    n_ctrl_b = int(((sub.obs["condition"] == "ctrl") & (sub.obs["cell_type"] == "B cells")).sum())
    assert pred.shape == (n_ctrl_b, sub.n_vars)
    assert list(pred.var_names) == list(sub.var_names)
    assert (pred.obs["condition"] == "stim").all()
    r = CliRunner().invoke(main, ["perturb", str(d / "model"), str(data), "--condition-key", "condition",
                                  "--control", "ctrl", "--perturbed", "stim", "--method", "decoder_swap",
                                  "--out", str(d / "p2.h5ad"), "--quiet"])
    assert r.exit_code == 2 and "categorical_covariate_keys" in r.output


def test_generate_command(saved):
    d, data, sub = saved
    out = d / "gen.h5ad"
    r = CliRunner().invoke(main, ["generate", str(d / "model"), str(data), "--n-cells", "30", "--labels-key",
                                  "cell_type", "--label", "B cells", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    gen = ad.read_h5ad(out)
    assert gen.shape == (30, sub.n_vars) and list(gen.var_names) == list(sub.var_names)
    x = gen.layers["counts"]
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    assert (x >= 0).all() and np.allclose(x, np.round(x))
    r = CliRunner().invoke(main, ["generate", str(d / "model"), str(data), "--n-cells", "5", "--label", "B cells",
                                  "--out", str(d / "g2.h5ad"), "--quiet"])
    assert r.exit_code == 2 and "--labels-key" in r.output
