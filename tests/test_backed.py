"""Out-of-core data (cellvae.backed): a backed .h5ad gives the same minibatches, checks and model results as the
same data in memory; shuffled iteration covers every index once per epoch, reproducibly; make_large.py writes a
valid file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import assert_same_training

from cellvae import CellvaeInputError, CountVAE
from cellvae.data.backed import BackedData, is_backed, scan_counts
from cellvae.data import DataSpec, check_values, minibatch_slices

REPO = Path(__file__).resolve().parents[1]


def _backed(adata: ad.AnnData, path: Path) -> ad.AnnData:
    adata.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


@pytest.fixture()
def kang_pair(kang_small, tmp_path):
    """(in-memory, backed) Kang subset: 250 cells x 150 genes, batch and donor covariates."""
    mem = kang_small
    mem.obs["score"] = np.linspace(0.0, 1.0, mem.n_obs).astype(np.float32)
    return mem, _backed(mem.copy(), tmp_path / "kang.h5ad")


def _spec(adata, **kw) -> DataSpec:
    return DataSpec.from_adata(adata, gene_names=adata.var_names, batch_key="batch",
                               categorical_covariate_keys=["donor"], continuous_covariate_keys=["score"], **kw)


def _all(it):
    xs, cats, conts = zip(*it)
    return torch.cat(xs), torch.cat(cats), None if conts[0] is None else torch.cat(conts)


def test_backed_rows_equal_in_memory(kang_pair):
    mem, back = kang_pair
    assert is_backed(back) and not is_backed(mem) and not is_backed(back[:10])
    rng = np.random.default_rng(0)
    genes = list(rng.permutation(mem.var_names)[:100])  # a subset, in another order: DataSpec.gene_indexer
    normal = _spec(mem, normal_transform="log1p_cp10k", gene_likelihood="normal")
    normal.gene_names = genes
    for spec in (_spec(mem), normal):
        td = spec.prepare(mem)
        bd = BackedData(back, spec, chunk_size=32, buffer_chunks=2)
        assert (bd.n_cells, bd.n_genes, bd.X) == (td.n_cells, td.n_genes, None)
        torch.testing.assert_close(bd.cat, td.cat, rtol=0, atol=0)
        for idx in (torch.arange(mem.n_obs), torch.as_tensor(rng.choice(mem.n_obs, 300)),  # repeats, any order
                    torch.as_tensor(np.sort(rng.choice(mem.n_obs, 90, replace=False)))):
            for a, b in zip(bd.iterate(idx, 40), td.iterate(idx, 40)):
                for u, v in zip(a, b):
                    torch.testing.assert_close(u, v, rtol=0, atol=0)
            for u, v in zip(bd.batch(idx[:50]), td.batch(idx[:50])):
                torch.testing.assert_close(u, v, rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(bd.csr.sum(1)).ravel(), td.X.sum(1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(bd.csr[[3, 1, 3]].toarray(), td.X[[3, 1, 3]].numpy())
        np.testing.assert_allclose(np.asarray(bd.csr.sum(0)).ravel(), td.X.sum(0).numpy(), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(abs(bd.csr)[[5, 5, 2]].sum(0)).ravel(),
                                   td.X[[5, 5, 2]].abs().sum(0).numpy(), rtol=1e-5)


def test_dense_backed_x_and_csc_refused(kang_small, tmp_path):
    dense = kang_small.copy()
    dense.X = dense.X.toarray()
    back = _backed(dense, tmp_path / "dense.h5ad")
    spec = DataSpec.from_adata(kang_small, gene_names=kang_small.var_names)
    x, _, _ = _all(BackedData(back, spec, chunk_size=50).iterate(torch.arange(kang_small.n_obs), 64))
    np.testing.assert_array_equal(x.numpy(), kang_small.X.toarray())
    csc = kang_small.copy()
    csc.X = sp.csc_matrix(csc.X)
    with pytest.raises(CellvaeInputError, match="CSC"):
        CountVAE(_backed(csc, tmp_path / "csc.h5ad"), out_of_core=True)


def _id_file(tmp_path, n=1000) -> ad.AnnData:
    """Backed file whose row i has the count i + 1 in gene 0 (so a minibatch row tells which cell it is)."""
    rng = np.random.default_rng(0)
    X = sp.random(n, 20, density=0.3, random_state=1, data_rvs=lambda k: rng.integers(1, 5, k)).tolil()
    X[:, 0] = (np.arange(n) + 1).reshape(-1, 1)
    a = ad.AnnData(sp.csr_matrix(X, dtype=np.float32))
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = [f"g{j}" for j in range(20)]
    return _backed(a, tmp_path / "ids.h5ad")


def test_shuffled_epoch_covers_each_index_once_and_is_reproducible(tmp_path):
    back = _id_file(tmp_path)
    spec = DataSpec.from_adata(back, gene_names=back.var_names)
    bd = BackedData(back, spec, chunk_size=64, buffer_chunks=3)
    idx = torch.as_tensor(np.sort(np.random.default_rng(2).choice(1000, 900, replace=False)))

    def epoch(seed, indices=idx):
        gen = torch.Generator().manual_seed(seed)
        batches = [x for x, _, _ in bd.iterate(indices, 128, shuffle=True, generator=gen)]
        return [len(x) for x in batches], torch.cat(batches)[:, 0].long().numpy() - 1

    sizes, ids = epoch(0)
    assert sizes == [b - a for a, b in minibatch_slices(900, 128)]
    np.testing.assert_array_equal(np.sort(ids), idx.numpy())  # each training cell once, no other cell
    assert not np.array_equal(ids, idx.numpy())  # shuffled
    np.testing.assert_array_equal(epoch(0)[1], ids)  # reproducible with a seeded generator
    assert not np.array_equal(epoch(1)[1], ids)
    dup = torch.as_tensor([5, 5, 7, 999, 0, 5])  # repeats are served as often as they occur
    assert sorted(epoch(0, dup)[1].tolist()) == sorted(dup.tolist())


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_minibatches_equal_dense_ones(tmp_path):
    """iterate_sparse gives the minibatches of iterate (same cells, order and values) as CSR tensors of the
    non-zero counts, shuffled or not; too dense data are refused."""
    rng = np.random.default_rng(0)
    X = sp.random(700, 200, density=0.08, random_state=3, data_rvs=lambda k: rng.integers(1, 9, k)).tocsr()
    X.data[::11] = 0.0  # stored zeros in the file are dropped from the sparse minibatches
    a = ad.AnnData(X.astype(np.float32))
    a.var_names = [f"g{j}" for j in range(200)]
    back = _backed(a, tmp_path / "sparse.h5ad")
    bd = BackedData(back, DataSpec.from_adata(back, gene_names=back.var_names), chunk_size=64, buffer_chunks=3)
    assert bd.sparse_counts() is not None
    idx = torch.arange(3, 700)
    for shuffle in (True, False):
        dense = list(bd.iterate(idx, 50, shuffle=shuffle, generator=torch.Generator().manual_seed(5)))
        csr = list(bd.iterate_sparse(idx, 50, shuffle=shuffle, generator=torch.Generator().manual_seed(5)))
        assert len(dense) == len(csr) == 14
        for (xd, cd, _), (xs, cs, _) in zip(dense, csr):
            assert xs.layout == torch.sparse_csr and bool((xs.values() > 0).all())
            assert torch.equal(xs.to_dense(), xd) and torch.equal(cs, cd)
    dense_file = _id_file(tmp_path)  # 30 % non-zero: dense minibatches only
    bd2 = BackedData(dense_file, DataSpec.from_adata(dense_file, gene_names=dense_file.var_names))
    assert bd2.sparse_counts() is None
    with pytest.raises(ValueError, match="iterate_sparse"):
        next(bd2.iterate_sparse(torch.arange(10), 5))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_out_of_core_training_with_sparse_minibatches_same_weights(pbmc_small, tmp_path):
    """Out-of-core training feeds CSR minibatches on sparse data (pbmc, ~10 % non-zero) and ends like
    the same run on dense minibatches (to rounding)."""
    from cellvae.train.evaluate import sparse_minibatches as _sparse_minibatches

    back = _backed(pbmc_small.copy(), tmp_path / "pbmc.h5ad")
    runs = []
    for sparse in (True, False):
        torch.manual_seed(0)
        m = CountVAE(back, out_of_core=True, use_sparse_counts=sparse)
        assert _sparse_minibatches(m.module, m.prepared_data(), torch.device("cpu")) == sparse
        m.train(max_epochs=2, batch_size=64, progress_bar=False, n_threads=1, early_stopping=False)
        runs.append((m.module, m.history))
    assert_same_training(*runs)  # two code paths: ELBO histories at 1e-4 relative (weights differ by rounding)


def test_backed_countvae_matches_in_memory(kang_pair, tmp_path):
    mem, back = kang_pair
    kw = dict(batch_key="batch", categorical_covariate_keys=["donor"], use_observed_lib_size=False, n_latent=5)
    m_mem, m_back = CountVAE(mem, **kw), CountVAE(back, out_of_core=True, **kw)
    assert isinstance(m_back.prepared_data(), BackedData) and m_back.spec == m_mem.spec
    np.testing.assert_array_equal(m_back._train_cells, m_mem._train_cells)
    torch.testing.assert_close(m_back.module.library_log_means, m_mem.module.library_log_means)
    torch.testing.assert_close(m_back.module.library_log_vars, m_mem.module.library_log_vars)
    m_back.train(max_epochs=3, batch_size=64, progress_bar=False, n_threads=1)
    assert np.isfinite(m_back.history["train_elbo"]).all() and np.isfinite(m_back.history["validation_elbo"]).all()
    assert m_back.history["train_elbo"][-1] > m_back.history["train_elbo"][0]
    m_mem.module.load_state_dict(m_back.module.state_dict())  # same weights -> same results on either data
    m_mem.is_trained = True
    z = m_back.get_latent_representation()
    assert z.shape == (mem.n_obs, 5)
    np.testing.assert_allclose(z, m_mem.get_latent_representation(), atol=1e-5)
    assert m_back.get_elbo(seed=0) == pytest.approx(m_mem.get_elbo(seed=0), rel=1e-6)
    np.testing.assert_allclose(m_back.get_elbo(indices=[4, 2], return_mean=False, seed=1),
                               m_mem.get_elbo(indices=[4, 2], return_mean=False, seed=1), rtol=1e-6)
    np.testing.assert_allclose(m_back.get_normalized_expression(return_numpy=True),
                               m_mem.get_normalized_expression(return_numpy=True), rtol=1e-5, atol=1e-8)
    # a saved model loaded onto the backed data trains on (the cells with counts come from a streamed pass)
    m_back.save(tmp_path / "model")
    again = CountVAE.load(tmp_path / "model", adata=back, out_of_core=True)
    again.train(max_epochs=1, batch_size=64, progress_bar=False, n_threads=1)
    assert again.get_latent_representation().shape == (mem.n_obs, 5)
    # anomaly scores whose reference statistics come from the backed training cells
    from cellvae.analysis.anomaly import anomaly_score
    s = anomaly_score(again, mem[:20].copy(), method="latent_knn_gene")
    assert s.shape == (20,) and np.isfinite(s).all()


@pytest.mark.parametrize("value, match", [(np.nan, "2 NaN or infinite"), (-2.0, r"negative values \(min -2\)"),
                                          (0.5, "non-integer values")])
def test_bad_values_raise_as_in_memory(kang_small, tmp_path, value, match):
    X = kang_small.X.toarray()
    X[3, 4] = value
    X[200, 7] = value  # a second one in another chunk (chunk_size 50 below)
    kang_small.X = sp.csr_matrix(X)
    with pytest.raises(CellvaeInputError, match=match) as in_memory:
        CountVAE(kang_small)
    back = _backed(kang_small.copy(), tmp_path / "bad.h5ad")
    with pytest.raises(CellvaeInputError) as out_of_core:
        CountVAE(back, out_of_core=True)
    # the same message, with the file named out of core
    assert str(out_of_core.value) == "bad.h5ad: " + str(in_memory.value)
    with pytest.raises(CellvaeInputError) as chunked:
        scan_counts(back, count_likelihood=True, chunk_size=50)
    assert str(chunked.value) == "bad.h5ad: " + str(in_memory.value)
    if not np.isnan(value):
        scan_counts(back, count_likelihood=False, chunk_size=50)  # the normal likelihood accepts real values


def test_scan_totals_match_check_values(kang_small, tmp_path):
    X = kang_small.X.toarray()
    X[:, 3] = 0  # an empty gene
    kang_small.X = sp.csr_matrix(X)
    back = _backed(kang_small.copy(), tmp_path / "k.h5ad")
    scan = scan_counts(back, chunk_size=40)
    check_values(kang_small.X, True)
    np.testing.assert_allclose(scan.gene_abs, np.asarray(kang_small.X.sum(0)).ravel())
    np.testing.assert_allclose(scan.cell_sum, np.asarray(kang_small.X.sum(1)).ravel())
    assert scan.is_count
    with pytest.warns(UserWarning, match="1 genes with zero counts"):
        m = CountVAE(back, out_of_core=True)
    assert len(m.spec.gene_names) == kang_small.n_vars - 1


def test_out_of_core_needs_a_backed_anndata(kang_pair):
    mem, back = kang_pair
    assert not isinstance(CountVAE(back).prepared_data(), BackedData)  # default: read into memory, as before
    for bad in (mem, back[:50]):
        with pytest.raises(CellvaeInputError, match="out_of_core=True needs an AnnData opened with"):
            CountVAE(bad, out_of_core=True)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_large_tiny(tmp_path, data_dir):
    if not (data_dir / "pbmc4k_10x_top2000genes.h5ad").exists():
        pytest.skip("pbmc4k not available")
    make_large = _load_script("make_large")
    out = tmp_path / "large.h5ad"
    res = make_large.main(["--n-cells", "3000", "--epochs", "2", "--chunk-size", "1000", "--out", str(out),
                           "--data-dir", str(data_dir), "--quiet"])
    assert out.exists() and not list(tmp_path.glob(".large.h5ad.part*"))
    a = ad.read_h5ad(out, backed="r")
    assert a.shape == (3000, 2000) and res["nnz"] > 0
    assert {"cell_type", "batch", "source_cell", "library_size"} <= set(a.obs.columns)
    assert a.obs["cell_type"].nunique() > 3 and a.obs["batch"].nunique() == 2
    rows = a.X[1500:1510]
    assert sp.issparse(rows) and rows.shape == (10, 2000)
    v = rows.data
    assert (v >= 0).all() and (v == np.round(v)).all()
    full = ad.read_h5ad(out)
    assert (full.X[1500:1510] != rows).nnz == 0
    assert isinstance(full.obs, pd.DataFrame)


@pytest.mark.parametrize("gap, span", [(0, 1 << 22), (50, 64), (1 << 14, 1 << 22)])
def test_row_reader_groups_and_buffers(tmp_path, monkeypatch, gap, span):
    """Rows read with separate reads (large gaps), merged reads (small gaps) and capped spans, into fresh arrays
    or reused buffers, equal scipy's row selection."""
    from cellvae.data import backed

    monkeypatch.setattr(backed, "_GAP", gap)
    monkeypatch.setattr(backed, "_SPAN", span)
    back = _id_file(tmp_path, n=600)
    ref = back.X.to_memory()
    reader = backed._RowReader(back.X)
    bufs = backed._Buffers()
    rng = np.random.default_rng(0)
    for rows in (np.arange(100, 300), np.sort(rng.choice(600, 80, replace=False)), np.array([0, 1, 2, 400, 401, 599]),
                 np.array([7])):
        for b in (None, bufs):
            got = reader.read(rows.astype(np.int64), b)
            np.testing.assert_array_equal(got.toarray(), ref[rows].toarray())


def test_checkpoint_of_out_of_core_run_resumes_only_out_of_core(kang_pair, tmp_path):
    mem, back = kang_pair
    ck = tmp_path / "ck"
    CountVAE(back, out_of_core=True).train(max_epochs=1, batch_size=64, progress_bar=False, n_threads=1,
                                           checkpoint_dir=ck)
    with pytest.raises(CellvaeInputError, match="out_of_core differs"):
        CountVAE(mem).train(max_epochs=2, batch_size=64, progress_bar=False, n_threads=1, checkpoint_dir=ck,
                            resume=True)
    m = CountVAE(back, out_of_core=True).train(max_epochs=2, batch_size=64, progress_bar=False, n_threads=1,
                                               checkpoint_dir=ck, resume=True)
    assert m.history["resumed_from_epoch"] == 1


def test_cli_fit_backed_writes_outputs_without_reading_the_matrix(tmp_path, kang_small):
    from click.testing import CliRunner

    from cellvae.cli import main

    path = tmp_path / "k.h5ad"
    kang_small.write_h5ad(path)
    out = tmp_path / "out"
    args = ["fit", str(path), "--out", str(out), "--backed", "--labels-key", "cell_type", "--batch-key", "donor",
            "--max-epochs", "3", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["backed"] is True and m["metrics"]["kmeans_ari"] is not None
    annotated = ad.read_h5ad(out / "cellvae.h5ad")
    assert annotated.X is None and annotated.obsm["X_cellvae"].shape == (kang_small.n_obs, 10)
    assert "cellvae_normalized" not in annotated.layers
    res = CliRunner().invoke(main, [*args[:4], "--backed", "--n-top-genes", "50", "--overwrite"])
    assert res.exit_code == 2 and "--n-top-genes" in res.output
