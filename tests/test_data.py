"""Data layer: readers, value checks, covariate encoding, gene alignment, minibatches."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import torch

from cellvae.data import (
    CellvaeInputError,
    DataSpec,
    TensorData,
    check_values,
    minibatch_slices,
    read_data,
    resolve_data_path,
    select_highly_variable_genes,
    split_indices,
)


def test_read_h5ad_and_data_dir(monkeypatch, data_dir, zeisel):
    monkeypatch.setenv("CELLVAE_DATA_DIR", str(data_dir))
    a = read_data("zeisel2015_cortex_subset_1464cells.h5ad")  # bare name found in $CELLVAE_DATA_DIR
    assert a.shape == (1464, 1095)
    assert resolve_data_path("zeisel2015_cortex_subset_1464cells.h5ad").is_file()


def test_missing_file_names_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLVAE_DATA_DIR", str(tmp_path))
    with pytest.raises(CellvaeInputError, match="not found"):
        read_data("no_such_file.h5ad")


def test_read_csv_tsv_and_10x_dir(tmp_path, zeisel_small):
    X = zeisel_small.X.toarray()[:20, :15]
    df = pd.DataFrame(X, index=zeisel_small.obs_names[:20], columns=zeisel_small.var_names[:15])
    df.to_csv(tmp_path / "x.csv")
    df.to_csv(tmp_path / "x.tsv", sep="\t")
    for name in ("x.csv", "x.tsv"):
        a = read_data(tmp_path / name)
        assert a.shape == (20, 15)
        np.testing.assert_array_equal(a.X, X)
        assert list(a.var_names) == list(df.columns)
    # 10x directory (matrix.mtx.gz genes x cells, features.tsv.gz, barcodes.tsv.gz)
    d = tmp_path / "tenx"
    d.mkdir()
    with gzip.open(d / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(X.T.astype(np.int64)))
    with gzip.open(d / "features.tsv.gz", "wt") as f:
        for g in df.columns:
            f.write(f"ID_{g}\t{g}\tGene Expression\n")
    with gzip.open(d / "barcodes.tsv.gz", "wt") as f:
        for c in df.index:
            f.write(f"{c}\n")
    a = read_data(d)
    assert a.shape == (20, 15)
    np.testing.assert_array_equal(a.X.toarray(), X)


def test_unreadable_and_unknown_format(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("this is not HDF5")
    with pytest.raises(CellvaeInputError, match="Could not read"):
        read_data(bad)
    other = tmp_path / "x.xyz"
    other.write_text("1")
    with pytest.raises(CellvaeInputError, match="Unknown data format"):
        read_data(other)


@pytest.mark.parametrize(
    "values, match",
    [
        ([1.0, np.nan], "NaN or infinite"),
        ([1.0, np.inf], "NaN or infinite"),
        ([1.0, -2.0], "negative values"),
        ([1.0, 0.5], "non-integer"),
    ],
)
def test_check_values_errors(values, match):
    X = sp.csr_matrix(np.array([values, [3.0, 4.0]], dtype=np.float32))
    with pytest.raises(CellvaeInputError, match=match) as e:
        check_values(X, count_likelihood=True)
    if match in ("negative values", "non-integer"):
        assert "gene_likelihood='normal'" in str(e.value)  # the fix is named


def test_check_values_normal_accepts_real_values():
    check_values(np.array([[0.3, -1.2]]), count_likelihood=False)
    with pytest.raises(CellvaeInputError):
        check_values(np.array([[np.nan, 1.0]]), count_likelihood=False)


def test_minibatch_slices_no_batch_of_one():
    assert minibatch_slices(257, 128) == [(0, 128), (128, 257)]
    assert minibatch_slices(256, 128) == [(0, 128), (128, 256)]
    assert minibatch_slices(130, 128) == [(0, 128), (128, 130)]
    assert minibatch_slices(1, 128) == [(0, 1)]
    for n in range(2, 400, 7):
        sizes = [b - a for a, b in minibatch_slices(n, 64)]
        assert sum(sizes) == n and min(sizes) >= 2


def test_split_is_seeded_and_disjoint():
    a_tr, a_va = split_indices(1000, 0.9, seed=3)
    b_tr, b_va = split_indices(1000, 0.9, seed=3)
    c_tr, _ = split_indices(1000, 0.9, seed=4)
    np.testing.assert_array_equal(a_tr, b_tr)
    assert len(a_tr) == 900 and len(a_va) == 100
    assert not set(a_tr) & set(a_va)
    assert not np.array_equal(a_tr, c_tr)


def test_spec_encodes_covariates_and_rejects_unknown(kang_small):
    spec = DataSpec.from_adata(kang_small, kang_small.var_names, batch_key="donor",
                               categorical_covariate_keys=["condition"])
    td = spec.prepare(kang_small)
    assert td.cat.shape == (kang_small.n_obs, 2)
    assert spec.batch_categories == ["101", "107"]
    assert set(td.cat[:, 1].tolist()) == {0, 1}
    other = kang_small.copy()
    other.obs["donor"] = other.obs["donor"].astype(str).replace({"107": "999"})
    with pytest.raises(CellvaeInputError, match="unseen at training time"):
        spec.prepare(other)
    with pytest.raises(CellvaeInputError, match="obs key 'nope' not found"):
        DataSpec.from_adata(kang_small, kang_small.var_names, batch_key="nope")


def test_categorical_nan_and_continuous_inf(kang_small):
    a = kang_small.copy()
    a.obs["cond"] = a.obs["condition"].astype(object)
    a.obs.iloc[0, a.obs.columns.get_loc("cond")] = np.nan
    with pytest.raises(CellvaeInputError, match="missing values"):
        DataSpec.from_adata(a, a.var_names, categorical_covariate_keys=["cond"])
    a.obs["score"] = 1.0
    spec = DataSpec.from_adata(a, a.var_names, continuous_covariate_keys=["score"])
    a.obs.iloc[3, a.obs.columns.get_loc("score")] = np.inf
    with pytest.raises(CellvaeInputError, match=r"obs\['score'\] \(continuous covariate\) has 1 NaN, infinite"):
        DataSpec.from_adata(a, a.var_names, continuous_covariate_keys=["score"])  # at set-up, before training
    with pytest.raises(CellvaeInputError, match=r"obs\['score'\] \(continuous covariate\)"):
        spec.prepare(a)  # and for new data at inference


def test_gene_alignment_reorders_and_reports_missing(zeisel_small):
    spec = DataSpec.from_adata(zeisel_small, zeisel_small.var_names)
    ref = spec.prepare(zeisel_small).X
    perm = np.random.default_rng(0).permutation(zeisel_small.n_vars)
    shuffled = zeisel_small[:, perm].copy()
    torch.testing.assert_close(spec.prepare(shuffled).X, ref)  # reordered by name
    with pytest.raises(CellvaeInputError, match="missing from the data"):
        spec.prepare(zeisel_small[:, 5:].copy())


def test_tensor_data_dense_and_csr_agree(monkeypatch, zeisel_small):
    import cellvae.data.tensors as data

    X = zeisel_small.X
    cat = torch.zeros(X.shape[0], 1, dtype=torch.int64)
    dense = TensorData(X, cat)
    monkeypatch.setattr(data, "DENSE_MAX_ELEMENTS", 10)
    sparse = data.TensorData(X, cat)
    assert dense.X is not None and sparse.csr is not None
    idx = torch.tensor([5, 0, 17, 3])
    torch.testing.assert_close(dense.batch(idx)[0], sparse.batch(idx)[0])
    seen = torch.cat([b[0] for b in sparse.iterate(torch.arange(X.shape[0]), 64)])
    torch.testing.assert_close(seen, dense.X)


def test_tensor_data_keeps_sparse_counts_as_csr(pbmc_small):
    """Counts with <= 20 % non-zeros stay CSR (no dense copy: 100k x 2000 cells trained at 1.2 instead of 1.9 GiB
    peak RSS), serve dense minibatches equal to the dense store's, and are the sparse minibatches' source."""
    X = pbmc_small.X
    assert X.nnz < 0.2 * X.shape[0] * X.shape[1]
    cat = torch.zeros(X.shape[0], 1, dtype=torch.int64)
    kept = TensorData(X, cat)
    dense = TensorData(X.toarray(), cat)  # a dense input stays dense
    assert kept.X is None and kept.csr is not None and dense.X is not None
    assert kept.sparse_counts() is kept.csr  # canonical CSR: no second copy
    idx = torch.tensor([5, 0, 17, 3])
    torch.testing.assert_close(kept.batch(idx)[0], dense.batch(idx)[0])
    kept.densify()  # a training loop with dense minibatches: one dense copy, the same rows
    assert kept.X is not None and kept.csr is not None
    torch.testing.assert_close(kept.batch(idx)[0], dense.batch(idx)[0])
    with pytest.raises(ValueError, match="at most 20% non-zero"):
        next(TensorData(X.toarray() + 1, cat).iterate_sparse(torch.arange(3), 2))


def test_hvg_selection_does_not_modify_input(zeisel):
    a = zeisel.copy()
    before = a.X.copy()
    mask = select_highly_variable_genes(a, 300)
    assert mask.sum() == 300 and mask.shape == (a.n_vars,)
    assert "highly_variable" not in a.var.columns
    assert (a.X != before).nnz == 0


def test_hvg_falls_back_to_detected_genes_when_loess_fails(zeisel, monkeypatch):
    """seurat_v3's loess can be singular with many undetected genes (it was on 2,000 random worm neurons): the
    selection is retried on genes detected in >= 3 cells, with a warning, and only such genes are chosen."""
    import scanpy as sc

    real = sc.pp.highly_variable_genes
    calls = []

    def flaky(adata, **kw):
        calls.append(adata.n_vars)
        if len(calls) == 1:
            raise ValueError("reciprocal condition number  6.2e-15")
        return real(adata, **kw)

    monkeypatch.setattr(sc.pp, "highly_variable_genes", flaky)
    a = zeisel[:300].copy()
    detected = np.asarray((a.X > 0).sum(0)).ravel() >= 3
    with pytest.warns(UserWarning, match="detected in at least 3 cells"):
        mask = select_highly_variable_genes(a, 200)
    assert calls == [a.n_vars, int(detected.sum())]
    assert mask.shape == (a.n_vars,) and mask.sum() == 200 and not mask[~detected].any()
