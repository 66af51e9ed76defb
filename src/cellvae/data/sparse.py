"""Likelihoods for single-cell data as small distribution classes.

Each class holds its parameters as tensors of one broadcast shape, usually (n_cells, n_genes), and offers
``log_prob(x)`` (nats, element-wise, same shape as ``x``), ``mean``, ``variance`` and ``sample()``.
All log-probabilities are computed in log space with the stable forms below, so that they stay finite for
inverse dispersion theta in [1e-4, 1e8] (and beyond: theta = inf is the Poisson limit), mean mu in [0, 1e7] and
counts up to 1e6, in float64 and float32. float16 and bfloat16 parameters are computed in float32 and give a float32
log-probability: their range (float16: 65504) and precision (bfloat16: 8 bits) cannot hold the lgamma terms of
counts, and a log-probability of -1e5 nats is not representable in float16 (autocast does the same for ``lgamma``).

Parameterisations follow scVI (Lopez et al. 2018, Nat. Methods 15:1053, Methods "Model"):

- Negative binomial NB(mu, theta): mean ``mu``, inverse dispersion ``theta``, variance ``mu + mu**2 / theta``.
- Zero-inflated NB ZINB(mu, theta, zi_logits): with probability ``sigmoid(zi_logits)`` a structural zero,
  otherwise NB(mu, theta).
- Poisson(mu).
- Normal(loc, scale): for log1p-normalized expression (not counts).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ['csr_tensor', 'csr_rows']



# ------------------------------------------------------------------------- likelihood from the non-zero counts
def csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without invariant checks (callers pass valid CSR parts) and without torch's
    one-time "beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def csr_rows(x: torch.Tensor) -> torch.Tensor:
    """(nnz,) int64 row of each stored value of a sparse CSR matrix ``x``."""
    crow = x.crow_indices()
    return torch.repeat_interleave(torch.arange(len(crow) - 1, device=x.device), crow.diff())


