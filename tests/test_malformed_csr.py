"""Malformed sparse CSR input is refused with the same message on every path (native kernels and PyTorch code),
never read out of bounds: a column index >= n_genes or negative, a decreasing or misplaced ``crow``, unsorted or
duplicated columns. These tests also run under the address and undefined-behaviour sanitizers
(``make test-native-sanitize``)."""

from __future__ import annotations

import pytest
import torch

from cellvae import CellvaeInputError
from cellvae.data.sparse import csr_tensor
from cellvae.native import build as native
from cellvae.native import ops
from cellvae.vae.losses import count_log_prob_sum, linear_softmax_count_log_prob_sum, softmax_count_log_prob_sum
from cellvae.vae.nn import sparse_linear

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

N, G = 4, 6
GOOD = ([0, 2, 3, 3, 5], [0, 4, 1, 2, 5])  # crow, col of a valid (4, 6) matrix
BAD = {
    "column >= n_genes": ([0, 2, 3, 3, 5], [0, 4, 1, 2, 600]),
    "negative column": ([0, 2, 3, 3, 5], [0, 4, -7, 2, 5]),
    "decreasing crow": ([0, 3, 2, 3, 5], [0, 4, 1, 2, 5]),
    "crow past the values": ([0, 2, 3, 3, 9], [0, 4, 1, 2, 5]),
    "crow not from 0": ([1, 2, 3, 3, 5], [0, 4, 1, 2, 5]),
    "duplicate column": ([0, 2, 3, 3, 5], [4, 4, 1, 2, 5]),
    "unsorted columns": ([0, 2, 3, 3, 5], [4, 0, 1, 2, 5]),
}


def _x(crow, col):
    crow, col = torch.tensor(crow, dtype=torch.int64), torch.tensor(col, dtype=torch.int64)
    return csr_tensor(crow, col, torch.arange(1.0, len(col) + 1), (N, G))


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setitem(native._state, "lib", None)
        monkeypatch.setitem(native._state, "reason", "disabled for the test")
    elif not native.available():
        pytest.skip("no native kernels")
    return request.param


def _calls(x):
    torch.manual_seed(0)
    logits = torch.randn(N, G)
    lib = torch.full((N, 1), 2.0)
    lt = torch.zeros(G)
    h, w, b = torch.randn(N, 3), torch.randn(G, 3), torch.zeros(G)
    wt = torch.randn(G, 5)  # (n_in, n_out): the input-major first encoder weight
    return {
        "softmax_count_log_prob_sum": lambda: softmax_count_log_prob_sum(x, logits, lib, lt),
        "linear_softmax_count_log_prob_sum": lambda: linear_softmax_count_log_prob_sum(x, h, w, b, lib, lt),
        "count_log_prob_sum": lambda: count_log_prob_sum(x, torch.log_softmax(logits, -1) + lib, lt),
        "sparse_linear": lambda: sparse_linear(x, wt.t(), None),
    }


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_csr_is_refused_on_every_path(case, path):
    x = _x(*BAD[case])
    for name, call in _calls(x).items():
        with pytest.raises(CellvaeInputError, match="is not a valid CSR matrix"):
            call()


def test_valid_csr_agrees_across_paths(monkeypatch):
    x = _x(*GOOD)
    got = {k: f().detach() for k, f in _calls(x).items()}
    monkeypatch.setitem(native._state, "lib", None)
    want = {k: f().detach() for k, f in _calls(x).items()}
    dense = _calls(x.to_dense())
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
        if k != "sparse_linear":
            torch.testing.assert_close(dense[k]().detach(), want[k], rtol=1e-5, atol=1e-5, msg=k)


def test_native_boundary_checks_its_own_arguments():
    if not native.available():
        pytest.skip("no native kernels")
    crow, col = torch.tensor(BAD["column >= n_genes"][0]), torch.tensor(BAD["column >= n_genes"][1])
    with pytest.raises(CellvaeInputError, match="out of range"):
        ops.check_csr(crow, col, N, G)
    with pytest.raises(CellvaeInputError, match="must be a contiguous torch.int64"):
        ops.check_csr(crow.int(), col, N, G)
    with pytest.raises(CellvaeInputError, match="has shape"):
        ops.check_csr(crow[:-1], col, N, G)
    logits = torch.randn(N, G)
    with pytest.raises(CellvaeInputError, match="theta_rows must lie in"):
        ops.nb_loglik(logits, torch.zeros(N), torch.zeros(2, G), None, torch.tensor([0, 1, 2, 0]), None, None, None,
                      torch.ones(N, G), False)
    with pytest.raises(CellvaeInputError, match="log_theta must have shape"):
        ops.nb_loglik(logits, torch.zeros(N), torch.zeros(G + 1), None, None, None, None, None, torch.ones(N, G),
                      False)
    with pytest.raises(CellvaeInputError, match="has shape"):
        ops.csr_linear(torch.tensor(GOOD[0]), torch.tensor(GOOD[1]), torch.ones(4), torch.randn(G, 5), None)
    with pytest.raises(CellvaeInputError, match="at least 2 rows"):
        ops.bn_relu_dropout(torch.randn(1, 3), None, None, None, None, 1e-5, 0.1, 0, 1.0, (0, 0))
    with pytest.raises(CellvaeInputError, match="at least 1 column"):
        ops.ln_relu_dropout(torch.randn(3, 0), 1e-5, 0, 1.0, (0, 0))
    with pytest.raises(CellvaeInputError, match="contiguous torch.float32"):
        ops.ln_relu_dropout(torch.randn(8, 3).t(), 1e-5, 0, 1.0, (0, 0))
    y, mean, invstd = ops.ln_relu_dropout(torch.randn(4, 3), 1e-5, 0, 1.0, (0, 0))
    with pytest.raises(CellvaeInputError, match="has shape"):
        ops.ln_relu_dropout_backward(torch.randn(4, 3), y, torch.randn(4, 3), mean[:3], invstd, 1.0)
    with pytest.raises(CellvaeInputError, match="has shape"):
        ops.ln_relu_dropout_backward(torch.randn(4, 3), y, torch.randn(4, 2), mean, invstd, 1.0)
    with pytest.raises(CellvaeInputError, match="contiguous torch.float32"):
        ops.all_finite([torch.ones(3, dtype=torch.float64)])
