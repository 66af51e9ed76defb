"""The imputation benchmark's protocol (``benchmarks/imputation.py``): corruption, re-indexing, baseline, scoring,
and one tiny cellvae run through the same code path as the benchmark's child process (scvi-tools not needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def imp():
    sys.path.insert(0, str(_BENCH))
    try:
        spec = importlib.util.spec_from_file_location("imputation_bench", _BENCH / "imputation.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(_BENCH))


def _counts(seed=0, n=60, g=40):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.gamma(0.5, 2.0, size=(n, g))).astype(np.float32)
    return sp.csr_matrix(dense)


def test_corrupt_hides_fraction_of_nonzeros(imp):
    X = _counts()
    Xc, rows, cols, vals = imp.corrupt(X, 0.1, seed=3)
    assert len(vals) == round(0.1 * X.nnz)
    assert (vals > 0).all()
    assert np.array_equal(vals, np.asarray(X[rows, cols]).ravel())  # the true values
    assert np.all(np.asarray(Xc[rows, cols]).ravel() == 0)  # hidden in the corrupted matrix
    assert Xc.nnz == X.nnz - len(vals) and (Xc.data > 0).all()  # no explicit zeros
    restored = Xc.toarray()
    restored[rows, cols] = vals
    assert np.array_equal(restored, X.toarray())  # nothing else changed
    assert len(set(zip(rows.tolist(), cols.tolist()))) == len(vals)  # without replacement
    # seeded
    Xc2, rows2, cols2, _ = imp.corrupt(X, 0.1, seed=3)
    assert np.array_equal(rows, rows2) and np.array_equal(cols, cols2) and (Xc2 != Xc).nnz == 0
    _, rows3, cols3, _ = imp.corrupt(X, 0.1, seed=4)
    assert not (np.array_equal(rows, rows3) and np.array_equal(cols, cols3))
    assert X.nnz == _counts().nnz  # the input is not modified


def test_drop_empty_reindexes_hidden_entries(imp):
    dense = np.array([[1, 0, 2, 0],
                      [0, 0, 3, 1],
                      [5, 0, 0, 0],
                      [0, 0, 0, 0]], dtype=np.float32)
    Xc = sp.csr_matrix(dense)
    # hidden: (2, 1) in a gene left empty; (3, 3) in a cell left empty; (1, 2) and (0, 3) kept
    rows = np.array([0, 1, 2, 3])
    cols = np.array([3, 2, 1, 3])
    vals = np.array([4.0, 7.0, 2.0, 9.0])
    X2, r, c, v, cells, genes, n_drop = imp.drop_empty(Xc, rows, cols, vals)
    assert list(cells) == [0, 1, 2] and list(genes) == [0, 2, 3] and n_drop == 2
    assert np.array_equal(X2.toarray(), dense[:3][:, [0, 2, 3]])
    assert list(r) == [0, 1] and list(c) == [2, 1] and list(v) == [4.0, 7.0]


def test_gene_mean_baseline_and_scores(imp):
    Xc = sp.csr_matrix(np.array([[1, 3], [2, 0], [0, 4]], dtype=np.float32))  # libraries 4, 2, 4; total 10
    imputed = imp.gene_mean_baseline(Xc, np.array([1, 2]), np.array([1, 0]))
    assert np.allclose(imputed, [2 * 7 / 10, 4 * 3 / 10])
    s = imp.l1_scores([1.0, 2.0, 6.0], [1.0, 4.0, 3.0])
    assert s == {"median_l1": 2.0, "mean_l1": pytest.approx(5 / 3), "mean_signed_error": pytest.approx(1 / 3)}


def test_active_variants(imp):
    assert imp.active_variants(["scvi", "cellvae", "cellvae_kl400"], 100) == ["scvi", "cellvae", "cellvae_kl400"]
    assert imp.active_variants(["scvi", "cellvae", "cellvae_kl400"], 800) == ["scvi", "cellvae"]
    from cellvae.train import TrainingPlan

    for epochs in (1, 2, 100, 801, 5000):
        assert imp.cellvae_default_warmup(epochs) == TrainingPlan(max_epochs=epochs).warmup_epochs


def test_cellvae_child_imputes_rho_times_corrupted_library(imp, zeisel, tmp_path):
    from conftest import _subset

    adata = _subset(zeisel, 200, 80)
    paths, info = imp.prepare_seed(adata, seed=0, fraction=0.1, tmpdir=tmp_path)
    assert info["n_hidden_scored"] == len(info["vals"]) > 0
    task = {"variant": "cellvae_kl400", "seed": 0, "epochs": 2, "threads": 1, "n_samples": 3, **paths}
    res = imp._child(task)
    for key in ("imp_nb", "imp_zinb", "imp_nb_api_n1"):
        assert res[key].shape == info["vals"].shape and np.isfinite(res[key]).all() and (res[key] >= 0).all()
    assert np.all(res["imp_zinb"] <= res["imp_nb"] * (1 + 1e-5))  # (1 - pi) mu <= mu, same z draws
    assert res["latent_vs_rho_l_max_rel_diff"] < 1e-5  # rho * corrupted library == library_size="latent"
    assert res["module_vs_api_nb_max_rel_diff"] < 1e-5
    assert res["kl_warmup_epochs"] == 400 and res["epochs"] == 2
    scores = imp.l1_scores(res["imp_nb"], info["vals"])
    assert all(np.isfinite(v) for v in scores.values()) and scores["median_l1"] >= 0
