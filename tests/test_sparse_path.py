"""Sparse (CSR) training minibatches equal the dense path (issue 6: every optional speed-up has an equal-results
test): the sparse first encoder layer, the CSR minibatches of
``TensorData.iterate_sparse``, a module given sparse real counts and a whole training run with
``use_sparse_counts`` on and off. The likelihood from sparse counts is checked against the distribution classes
in tests/test_fast_path.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import assert_same_training

from cellvae.data import TensorData
from cellvae.vae.module import VAEModule
from cellvae.vae.nn import Encoder, InputMajorLinear, sparse_linear
from cellvae.train import TrainingPlan, make_optimizer
from cellvae.train.evaluate import sparse_minibatches as _sparse_minibatches
from cellvae.train.optim import _transpose_old_states

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
    lin = InputMajorLinear(300, 20)  # the Encoder's first layer
    g = torch.randn(50, 20, generator=gen)
    outs = []
    for xi in (x, x.to_sparse_csr()):
        lin.zero_grad()
        y = sparse_linear(xi, lin.weight, lin.bias) if xi.layout == torch.sparse_csr else lin(xi)
        (y * g).sum().backward()
        outs.append((y.detach(), lin.weight_t.grad.clone(), lin.bias.grad.clone()))
        assert lin.weight_t.grad.is_contiguous()  # no transposing copy of the gradient
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [
    {"gene_likelihood": "zinb"},
    {"gene_likelihood": "nb", "dispersion": "gene-batch", "encoder_input": "log1p_cp10k"},
    {"gene_likelihood": "nb", "encoder_input": "log1p_mean"},
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


def test_input_major_linear_is_nn_linear_with_a_contiguous_transposed_weight():
    """Same initialisation, function, state_dict keys and shapes as torch.nn.Linear; the parameter is the
    contiguous (n_in, n_out) transpose, so fused Adam updates it in place (no per-step copy)."""
    torch.manual_seed(5)
    ref = torch.nn.Linear(30, 7)
    torch.manual_seed(5)
    lin = InputMajorLinear(30, 7)
    assert lin.weight_t.shape == (30, 7) and lin.weight_t.is_contiguous()
    torch.testing.assert_close(lin.weight, ref.weight, rtol=0, atol=0)
    x = torch.randn(4, 30)
    torch.testing.assert_close(lin(x), ref(x), rtol=1e-6, atol=1e-6)  # x @ W^T by another BLAS call: rounding
    sd, ref_sd = lin.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) == ["weight", "bias"]
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    with torch.no_grad():
        ref.weight.mul_(2)
    lin.load_state_dict(ref.state_dict())  # from nn.Linear's state dict, and the other way round
    torch.testing.assert_close(lin.weight, ref.weight, rtol=0, atol=0)
    assert lin.weight_t.is_contiguous()
    ref2 = torch.nn.Linear(30, 7)
    ref2.load_state_dict(lin.state_dict())
    torch.testing.assert_close(ref2.weight, ref.weight, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with shape "
                                           r"torch.Size\(\[7, 31\]\)"):
        lin.load_state_dict(torch.nn.Linear(31, 7).state_dict())
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight"'):
        lin.load_state_dict({"bias": torch.zeros(7)})
    enc = Encoder(50, 4)
    assert all(p.is_contiguous() for p in enc.parameters())


def test_old_checkpoint_adam_moments_are_transposed():
    """Adam moments saved when the first encoder weight was an (n_out, n_in) parameter are resumed transposed;
    the Adam step is then the one of the old layout."""
    torch.manual_seed(0)
    w = torch.randn(6, 4)  # old layout (n_out, n_in)
    g = torch.randn(6, 4)
    old = torch.nn.Parameter(w.clone())
    opt_old = make_optimizer([old], TrainingPlan())
    old.grad = g.clone()
    opt_old.step()
    new = torch.nn.Parameter(w.t().contiguous())  # InputMajorLinear layout (n_in, n_out)
    opt_new = make_optimizer([new], TrainingPlan())
    opt_new.load_state_dict(copy.deepcopy(opt_old.state_dict()))  # as from a file: no shared tensors
    _transpose_old_states(opt_new)
    assert opt_new.state[new]["exp_avg"].shape == (4, 6)
    with torch.no_grad():
        new.copy_(old.t())
    old.grad, new.grad = g.clone(), g.t().contiguous()
    opt_old.step()
    opt_new.step()
    torch.testing.assert_close(new.detach(), old.detach().t(), rtol=0, atol=0)


def test_old_checkpoint_square_weight_moments_are_told_apart_by_layout(tmp_path):
    """n_in = n_out: an old checkpoint's moments (column-major, as the old parameter, kept so by torch.save /
    torch.load) are transposed; a new checkpoint's (contiguous) are left alone."""
    torch.manual_seed(1)
    w = torch.randn(5, 5)
    old = torch.nn.Parameter(w.t().contiguous().t())  # the old Encoder layout: (n_out, n_in) column-major
    opt_old = make_optimizer([old], TrainingPlan())
    old.grad = torch.randn(5, 5).t().contiguous().t()
    opt_old.step()
    torch.save(opt_old.state_dict(), tmp_path / "old.pt")
    loaded = torch.load(tmp_path / "old.pt", weights_only=True)
    assert not loaded["state"][0]["exp_avg"].is_contiguous()
    new = torch.nn.Parameter(w.t().contiguous())
    opt_new = make_optimizer([new], TrainingPlan())
    opt_new.load_state_dict(loaded)
    _transpose_old_states(opt_new)
    torch.testing.assert_close(opt_new.state[new]["exp_avg"], opt_old.state[old]["exp_avg"].t(), rtol=0, atol=0)
    assert opt_new.state[new]["exp_avg"].is_contiguous()
    again = make_optimizer([new], TrainingPlan())
    again.load_state_dict(copy.deepcopy(opt_new.state_dict()))  # a checkpoint of the new layout
    _transpose_old_states(again)
    torch.testing.assert_close(again.state[new]["exp_avg"], opt_new.state[new]["exp_avg"], rtol=0, atol=0)
