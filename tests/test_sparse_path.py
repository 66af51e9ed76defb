"""Sparse (CSR) training minibatches equal the dense path (issue 6: every optional speed-up has an equal-results
test): the sparse first encoder layer, the CSR minibatches of
``TensorData.iterate_sparse``, a module given sparse real counts and a whole training run with
``use_sparse_counts`` on and off. The likelihood from sparse counts is checked against the distribution classes
in tests/test_fast_path.py."""

from __future__ import annotations


import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import assert_same_training

from cellvae.data import TensorData
from cellvae.module import VAEModule
from cellvae.nn import sparse_linear
from cellvae.train import _sparse_minibatches

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")  # from x.to_sparse_csr()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _counts(pbmc, n=128):
    x = torch.as_tensor(pbmc.X[:n].toarray(), dtype=torch.float32)
    x[0, :3] = torch.tensor([33.0, 150.0, 5e4])  # counts above the lookup table (32) and far above
    return x


def test_sparse_linear_equals_linear():
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(50, 300, generator=gen) ** 6 * 4, generator=gen)
    lin = torch.nn.Linear(300, 20)
    lin.weight = torch.nn.Parameter(lin.weight.detach().t().contiguous().t())  # the Encoder's column-major layout
    g = torch.randn(50, 20, generator=gen)
    outs = []
    for xi in (x, x.to_sparse_csr()):
        lin.zero_grad()
        y = sparse_linear(xi, lin.weight, lin.bias) if xi.layout == torch.sparse_csr else lin(xi)
        (y * g).sum().backward()
        outs.append((y.detach(), lin.weight.grad.clone(), lin.bias.grad.clone()))
        assert lin.weight.grad.stride() == lin.weight.stride()  # no transposing copy of the gradient
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [
    {"gene_likelihood": "zinb"},
    {"gene_likelihood": "nb", "dispersion": "gene-batch", "encoder_input": "log1p_cp10k"},
    {"gene_likelihood": "poisson", "use_observed_lib_size": False},
    {"gene_likelihood": "zinb", "dispersion": "gene-cell"},  # no sparse path: densified, same result
])
def test_module_sparse_input_same_loss_and_gradients(pbmc_small, kw):
    x = _counts(pbmc_small)
    cat = (torch.arange(len(x)) % 2).view(-1, 1)
    if kw.get("use_observed_lib_size") is False:
        kw = {**kw, "library_log_means": np.array([7.0, 7.0]), "library_log_vars": np.array([0.5, 0.5])}
    torch.manual_seed(0)
    m = VAEModule(x.shape[1], n_batch=2, **kw)
    assert m.sparse_input == (kw.get("dispersion") != "gene-cell")
    results = []
    for xi in (x, x.to_sparse_csr()):
        m.zero_grad()
        torch.manual_seed(1)
        out = m(xi, cat, None, kl_weight=0.7)
        out.loss.backward()
        results.append((out, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}))
    (o_dense, g_dense), (o_sparse, g_sparse) = results
    assert abs(o_sparse.loss.item() - o_dense.loss.item()) <= 1e-5 * abs(o_dense.loss.item())
    torch.testing.assert_close(o_sparse.reconstruction_loss, o_dense.reconstruction_loss, rtol=1e-5, atol=1e-3)
    assert sorted(g_sparse) == sorted(g_dense)
    flat_s = torch.cat([g_sparse[k].flatten() for k in sorted(g_dense)])
    flat_d = torch.cat([g_dense[k].flatten() for k in sorted(g_dense)])
    assert (flat_s - flat_d).norm() <= 1e-5 * flat_d.norm()


def test_iterate_sparse_gives_the_same_minibatches():
    gen = torch.Generator().manual_seed(0)
    X = torch.poisson(torch.rand(90, 40, generator=gen) ** 8 * 3, generator=gen).numpy()
    csr = sp.csr_matrix(X)
    csr.data[::7] = 0.0  # stored zeros are dropped from the minibatches
    cat = torch.arange(90).view(-1, 1) % 3
    cont = torch.randn(90, 2, generator=gen)
    data = TensorData(csr, cat, cont)
    assert data.sparse_counts() is not None
    idx = torch.arange(5, 90)
    dense = list(data.iterate(idx, 16, shuffle=True, generator=torch.Generator().manual_seed(4)))
    sparse = list(data.iterate_sparse(idx, 16, shuffle=True, generator=torch.Generator().manual_seed(4)))
    assert len(dense) == len(sparse) == 6  # 85 cells: five of 16 and one of 5
    for (xd, cd, ud), (xs, cs, us) in zip(dense, sparse):
        assert xs.layout == torch.sparse_csr and bool((xs.values() > 0).all())
        assert torch.equal(xs.to_dense(), xd) and torch.equal(cs, cd) and torch.equal(us, ud)
    assert TensorData(np.ones((10, 5), np.float32), cat[:10]).sparse_counts() is None  # dense data: dense batches


def test_training_with_sparse_minibatches_same_weights(train_pbmc_small):
    runs = []
    for sparse in (True, False):
        runs.append(train_pbmc_small(use_sparse_counts=sparse))
        assert _sparse_minibatches(runs[-1][0], train_pbmc_small.data, torch.device("cpu")) == sparse
    assert_same_training(*runs)
