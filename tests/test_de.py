"""Bayesian differential expression (cellvae.de) on small real-data subsets."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from cellvae import CellvaeInputError, CountVAE
from cellvae.analysis.de import differential_expression, fdr_de_prediction, one_vs_rest

BASE_COLUMNS = [
    "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
    "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max",
    "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
    "raw_normalized_mean1", "raw_normalized_mean2", "is_de_fdr_0.05", "comparison", "group1", "group2",
]


def _fit(adata, epochs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CountVAE(adata, **kw)
        m.train(max_epochs=epochs, progress_bar=False, n_threads=1, seed=0)
    return m


@pytest.fixture(scope="module")
def spiked(zeisel):
    """150 interneurons (group "A") + 150 pyramidal cells ("B") x 200 genes of Zeisel; one gene with the same mean
    in both types gets its counts multiplied by 10 in group A. obs["group"] also has a category "C" without cells."""
    rng = np.random.default_rng(0)
    ct = zeisel.obs["cell_type"].astype(str).to_numpy()
    cells = np.sort(np.r_[rng.choice(np.flatnonzero(ct == "interneurons"), 150, replace=False),
                          rng.choice(np.flatnonzero(ct == "pyramidal CA1"), 150, replace=False)])
    sub = zeisel[cells]
    detected = np.asarray((sub.X > 0).sum(0)).ravel()
    sub = sub[:, np.sort(np.argsort(-detected, kind="stable")[:200])].copy()
    X = sub.X.toarray()
    a = sub.obs["cell_type"].astype(str).to_numpy() == "interneurons"
    m1, m2 = X[a].mean(0), X[~a].mean(0)
    flat = (np.abs(np.log2((m1 + 0.1) / (m2 + 0.1))) < 0.15) & ((m1 + m2) / 2 > 2)
    gene = int(np.flatnonzero(flat)[0])  # not differentially expressed before the spike
    X[a, gene] *= 10
    sub.X = X
    sub.obs["group"] = pd.Categorical(np.where(a, "A", "B"), categories=["A", "B", "C"])
    model = _fit(sub, 100)
    return sub, model, str(sub.var_names[gene])


def test_frame_columns_index_sorted(spiked):
    sub, model, _ = spiked
    df = differential_expression(model, groupby="group", group1="A", group2="B", n_samples=1000)
    assert list(df.columns) == BASE_COLUMNS
    assert sorted(df.index) == sorted(sub.var_names) and df.index.is_unique
    bf = df["bayes_factor"].to_numpy()
    assert np.all(np.diff(bf) <= 0)  # sorted, descending
    np.testing.assert_allclose(df["proba_de"] + df["proba_not_de"], 1.0)
    assert ((df["proba_de"] >= 0) & (df["proba_de"] <= 1)).all()
    np.testing.assert_allclose(df["scale1"].sum(), 1.0, rtol=1e-4)  # mean of rho, which sums to 1 over genes
    assert (df["lfc_min"] <= df["lfc_median"]).all() and (df["lfc_median"] <= df["lfc_max"]).all()
    assert (df["lfc_std"] >= 0).all()
    assert (df["comparison"] == "A vs B").all() and (df["group1"] == "A").all() and (df["group2"] == "B").all()
    # raw summaries are the plain per-group statistics of the counts
    X = np.asarray(sub.X)
    a = (sub.obs["group"] == "A").to_numpy()
    np.testing.assert_allclose(df.loc[sub.var_names, "raw_mean1"], X[a].mean(0), rtol=1e-6)
    np.testing.assert_allclose(df.loc[sub.var_names, "non_zeros_proportion2"], (X[~a] > 0).mean(0), rtol=1e-6)


def test_spiked_gene_is_top_and_de(spiked):
    sub, model, gene = spiked
    van = differential_expression(model, groupby="group", group1="A", group2="B", mode="vanilla")
    assert van.index[0] == gene
    assert van.loc[gene, "proba_de"] > 0.95 and van.loc[gene, "is_de_fdr_0.05"]
    assert van.loc[gene, "lfc_mean"] > 1.0  # true log2 fold change: log2(10) = 3.3, shrunk by the VAE
    chg = differential_expression(model, groupby="group", group1="A", group2="B", mode="change")
    assert chg.index[0] == gene and chg.loc[gene, "is_de_fdr_0.05"]
    assert (chg["delta"] == 0.25).all()
    # reversed comparison: the gene comes last in vanilla mode (lowest Bayes factor)
    rev = differential_expression(model, groupby="group", group1="B", group2="A", n_samples=1000)
    assert rev.index[-1] == gene and rev.loc[gene, "bayes_factor"] < -2


def test_deterministic_and_bounded_chunks(spiked):
    _, model, _ = spiked
    kw = dict(groupby="group", group1="A", n_samples=700, batch_size=128)
    a = differential_expression(model, **kw)
    b = differential_expression(model, **kw)
    pd.testing.assert_frame_equal(a, b)
    c = differential_expression(model, **kw, seed=1)
    assert not np.allclose(a.sort_index()["proba_de"], c.sort_index()["proba_de"])
    assert (a["group2"] == "rest").all() and (a["comparison"] == "A vs rest").all()


def test_bad_groups_raise(spiked):
    _, model, _ = spiked
    with pytest.raises(ValueError, match=r"Group 'Z' is not a value of obs\['group'\].*\['A', 'B', 'C'\]"):
        differential_expression(model, groupby="group", group1="Z")
    with pytest.raises(ValueError, match="Group 'C' .* has no cells"):
        differential_expression(model, groupby="group", group1="C")
    with pytest.raises(ValueError, match="Group 'Q' is not a value"):
        differential_expression(model, groupby="group", group1="A", group2="Q")
    with pytest.raises(ValueError, match="groupby 'nope' is not an obs column"):
        differential_expression(model, groupby="nope", group1="A")
    with pytest.raises(ValueError, match="same group"):
        differential_expression(model, groupby="group", group1="A", group2="A")
    with pytest.raises(ValueError, match="Pass groupby"):
        differential_expression(model)
    with pytest.raises(CellvaeInputError, match="mode must be one of"):
        differential_expression(model, groupby="group", group1="A", mode="fancy")
    with pytest.raises(CellvaeInputError, match="fdr_target"):
        differential_expression(model, groupby="group", group1="A", fdr_target=1.5)
    with pytest.raises(CellvaeInputError, match="batch_correction"):
        differential_expression(model, groupby="group", group1="A", batch_correction=True)


def test_index_selections_and_one_vs_rest(spiked):
    sub, model, gene = spiked
    a = (sub.obs["group"] == "A").to_numpy()
    df = differential_expression(model, idx1=a, idx2=np.flatnonzero(~a), n_samples=1000)
    assert df.index[0] == gene and (df["comparison"] == "idx1 vs idx2").all()
    with pytest.raises(ValueError, match="idx1 selects no cells"):
        differential_expression(model, idx1=np.zeros(sub.n_obs, bool))
    all_df = one_vs_rest(model, groupby="group", n_samples=500)
    assert list(pd.unique(all_df["comparison"])) == ["A vs rest", "B vs rest"]  # "C" has no cells: skipped
    assert len(all_df) == 2 * sub.n_vars
    same = differential_expression(model, groupby="group", n_samples=500)  # group1=None: every group
    pd.testing.assert_frame_equal(all_df, same)


def test_batch_correction_and_other_data(kang_small):
    model = _fit(kang_small, 5, batch_key="donor")
    df = differential_expression(model, groupby="condition", group1="stim", group2="ctrl", batch_correction=True,
                                 n_samples=600, mode="change")
    assert df.shape[0] == kang_small.n_vars and np.isfinite(df["bayes_factor"]).all()
    assert (df["comparison"] == "stim vs ctrl").all()


def test_fdr_de_prediction():
    p = np.array([0.5, 0.99, 0.97, 0.9, 0.2])
    # sorted: 0.99, 0.97, 0.9, 0.5, 0.2 -> running mean of 1-p: 0.01, 0.02, 0.0467, 0.16, ...
    np.testing.assert_array_equal(fdr_de_prediction(p, 0.05), [False, True, True, True, False])
    np.testing.assert_array_equal(fdr_de_prediction(p, 0.015), [False, True, False, False, False])
    with pytest.raises(ValueError):
        fdr_de_prediction(p, 0.0)
