"""Decoder bias initialisation (``CountVAE.train(decoder_bias_init=...)``): the log gene frequencies of the training
cells (default) or PyTorch's initialisation, in memory and out of core, and its effect on early training."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import cellvae.models.count_vae as model_mod
from cellvae import CellvaeInputError, CountVAE
from cellvae.data.backed import BackedData
from cellvae.vae.module import VAEModule

TRAIN = dict(batch_size=64, seed=2, progress_bar=False, n_threads=1, early_stopping=False)


def _profile(X, rows, seed: int, n_blocks: int = 11) -> np.ndarray:
    """The median over seeded blocks of cells of their mean expression profile (counts / library size), computed
    here with dense numpy, independently of the model's sparse code (blocks as in ``decoder_bias_totals``)."""
    x = np.asarray(X[rows].toarray() if hasattr(X, "toarray") else X[rows], dtype=np.float64)
    p = x / np.maximum(x.sum(1, keepdims=True), 1.0)
    rng = np.random.default_rng(seed)
    k = min(n_blocks, len(rows) // 20)
    if k < 3:
        return p.mean(0)
    block = rng.permutation(len(rows)) % k
    return np.median(np.stack([p[block == b].mean(0) for b in range(k)]), axis=0)


def _frequencies(m: CountVAE, rows, seed: int) -> np.ndarray:
    """softmax of the initial bias: the robust profile's shares (a gene never seen: half the smallest share)."""
    genes = m.adata.var_names.get_indexer(m.spec.gene_names)
    s = _profile(m.adata.X[:, genes], rows, seed)
    share = s / s.sum()
    share = np.maximum(share, 0.5 * share[share > 0].min())
    return share / share.sum()


def test_bias_is_the_log_gene_frequency_of_the_training_cells(pbmc_small):
    """With a learning rate too small to move it, the trained bias is still the initial one: softmax(bias) = each
    gene's share of the robust (median of block means) expression profile of the training cells (validation cells
    left out)."""
    m = CountVAE(pbmc_small, n_hidden=32, n_latent=5).train(max_epochs=1, lr=1e-12, **TRAIN)
    bias = m.module.decoder.scale_decoder.bias.detach().double()
    np.testing.assert_allclose(torch.softmax(bias, 0).numpy(), _frequencies(m, m.train_indices, TRAIN["seed"]),
                               rtol=1e-5)
    assert abs(float(bias.mean())) < 1e-4  # centred (the softmax does not see a shift)
    assert not np.allclose(_frequencies(m, m.train_indices, 2), _frequencies(m, np.arange(300), 2))
    assert m.history["plan"]["decoder_bias_init"] == "frequency"


def test_default_keeps_pytorch_init_and_bad_values_are_refused(pbmc_small):
    m = CountVAE(pbmc_small, n_hidden=32, n_latent=5).train(max_epochs=1, lr=1e-12, decoder_bias_init="default",
                                                            **TRAIN)
    bias = m.module.decoder.scale_decoder.bias.detach()
    assert float(bias.abs().max()) <= 1 / 32 ** 0.5  # nn.Linear's uniform(-1/sqrt(n_hidden), 1/sqrt(n_hidden))
    with pytest.raises(CellvaeInputError, match="decoder_bias_init must be one of"):
        CountVAE(pbmc_small, n_hidden=32, n_latent=5).train(max_epochs=1, decoder_bias_init="mean", **TRAIN)


def test_module_init_decoder_bias_checks_and_normal_likelihood():
    mod = VAEModule(4, n_hidden=8, n_latent=2)
    assert mod.init_decoder_bias([3.0, 1.0, 0.0, 4.0])
    np.testing.assert_allclose(torch.softmax(mod.decoder.scale_decoder.bias.detach().double(), 0).numpy(),
                               np.array([3.0, 1.0, 0.5, 4.0]) / 8.5, rtol=1e-6)
    with pytest.raises(ValueError, match="4 finite non-negative totals"):
        mod.init_decoder_bias([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="4 finite non-negative totals"):
        mod.init_decoder_bias([1.0, -2.0, 3.0, 1.0])
    normal = VAEModule(4, n_hidden=8, n_latent=2, gene_likelihood="normal")
    before = normal.decoder.scale_decoder.bias.detach().clone()
    assert not normal.init_decoder_bias([3.0, 1.0, 0.0, 4.0])
    assert torch.equal(normal.decoder.scale_decoder.bias, before)


def test_out_of_core_totals_equal_in_memory_and_are_sampled_above_the_limit(pbmc_small, tmp_path, monkeypatch):
    path = tmp_path / "pbmc.h5ad"
    pbmc_small.write_h5ad(path)
    back = ad.read_h5ad(path, backed="r")
    m = CountVAE(pbmc_small)
    rows = np.arange(0, 300, 2)
    mem_tot = model_mod.decoder_bias_totals(m.prepared_data(), rows, seed=0)
    bd = BackedData(back, m.spec)
    np.testing.assert_allclose(model_mod.decoder_bias_totals(bd, rows, seed=0), mem_tot, rtol=1e-12)
    genes = pbmc_small.var_names.get_indexer(m.spec.gene_names)
    np.testing.assert_allclose(mem_tot, _profile(pbmc_small.X[:, genes], rows, 0), rtol=1e-9)
    monkeypatch.setattr(model_mod, "BIAS_INIT_MAX_CELLS", 40)
    sub = model_mod.decoder_bias_totals(bd, rows, seed=0)
    np.testing.assert_array_equal(sub, model_mod.decoder_bias_totals(bd, rows, seed=0))  # seeded
    chosen = np.random.default_rng(0).choice(rows, 40, replace=False)
    np.testing.assert_allclose(sub, _profile(pbmc_small.X[:, genes], chosen, 0), rtol=1e-9)  # 40 cells: a mean


def test_frequency_init_gives_a_higher_validation_elbo_early(pbmc_small):
    """The point of the default: after 5 epochs (real pbmc4k cells, same seed), a higher validation ELBO than
    PyTorch's initialisation."""
    elbo = {}
    for init in ("frequency", "default"):
        m = CountVAE(pbmc_small).train(max_epochs=5, decoder_bias_init=init, **TRAIN)
        elbo[init] = m.history["validation_elbo"][-1]
    assert elbo["frequency"] > elbo["default"] + 0.01 * abs(elbo["default"]), elbo


def test_totals_of_dense_and_sparse_storage_agree_with_repeated_rows(pbmc_small):
    """TensorData stores dense or CSR counts; the column totals count each listed cell as often as it is listed, times
    its weight."""
    from cellvae.data import TensorData

    x = pbmc_small.X.tocsr()[:, :50]
    cat = torch.zeros(x.shape[0], 1, dtype=torch.int64)
    dense, sparse = TensorData(x.toarray(), cat), TensorData(x, cat)
    assert dense.X is not None and sparse.X is None
    rows = np.array([0, 5, 5, 299, 17])
    w = np.array([1.0, 0.5, 2.0, 3.0, 0.25])
    want = np.asarray(x.toarray()[rows].sum(0), dtype=np.float64)
    want_w = (x.toarray()[rows] * w[:, None]).sum(0)
    for data in (dense, sparse):
        np.testing.assert_allclose(data.col_sums(rows), want, rtol=1e-12)
        np.testing.assert_allclose(data.col_sums(rows, weights=w), want_w, rtol=1e-12)
