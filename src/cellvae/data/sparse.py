"""Sparse CSR tensors: how cellvae makes them, takes them apart, and checks them.

A CSR matrix that cellvae computes on must be canonical: ``crow`` starts at 0, never decreases and ends at the
number of stored values, and each row's column indices are strictly increasing in ``[0, n_cols)`` (sorted, no
duplicates). Data files with duplicate entries are summed when they are read (scipy's ``sum_duplicates``, as
anndata and scanpy do); a CSR tensor passed to a public function that breaks these rules is refused with
:func:`check_csr_tensor`, on every code path (the native kernels check the same in C, :mod:`cellvae.native.ops`).
"""

from __future__ import annotations

import warnings

import torch

from ..errors import CellvaeInputError

__all__ = ["csr_tensor", "csr_rows", "csr_parts", "check_csr_tensor"]


def csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` from parts that cellvae made itself (canonical by construction), without torch's
    invariant checks and its one-time "beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def csr_rows(x: torch.Tensor) -> torch.Tensor:
    """(nnz,) int64 row of each stored value of a sparse CSR matrix ``x``."""
    crow = x.crow_indices()
    return torch.repeat_interleave(torch.arange(len(crow) - 1, device=x.device), crow.diff())


def csr_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow, col, values)`` of a sparse CSR tensor with int64 indices, as the native kernels take them (int32
    indices are converted: a copy; the training minibatches already come with int64 indices)."""
    return x.crow_indices().long(), x.col_indices().long(), x.values()


def check_csr_tensor(x: torch.Tensor, name: str = "x") -> None:
    """Raise unless the sparse CSR tensor ``x`` (n_rows, n_cols) is canonical (module docstring): a few vectorised
    passes over its indices.

    Raises:
        CellvaeInputError: which rule is broken and how to fix it.
    """
    n, m = x.shape[-2], x.shape[-1]
    crow, col = x.crow_indices().long(), x.col_indices().long()
    problem = None
    if x.dim() != 2 or crow.numel() != n + 1:
        problem = f"expected a 2-d CSR tensor with {n + 1} row pointers"
    elif n >= 0 and int(crow[0]) != 0:
        problem = "crow_indices does not start at 0"
    elif bool((crow.diff() < 0).any()):
        problem = "crow_indices decreases"
    elif int(crow[-1]) != col.numel() or x.values().numel() != col.numel():
        problem = "crow_indices does not end at the number of stored values"
    elif col.numel() and (int(col.min()) < 0 or int(col.max()) >= m):
        problem = f"a column index is out of range [0, {m})"
    elif col.numel() > 1:
        step = col.diff()
        new_row = torch.zeros(col.numel() - 1, dtype=torch.bool, device=col.device)
        starts = crow[1:-1]
        starts = starts[(starts > 0) & (starts < col.numel())]
        new_row[starts - 1] = True
        if bool(((step <= 0) & ~new_row).any()):
            problem = "column indices are not strictly increasing within a row (unsorted or duplicated)"
    if problem:
        raise CellvaeInputError(f"{name} is not a valid CSR matrix of shape ({n}, {m}): {problem}. Sort the column "
                                "indices and sum duplicates (scipy: m.sum_duplicates(); torch: "
                                "x.to_sparse_coo().coalesce().to_sparse_csr()).")
