"""Prepared cells: the one minibatch and row-access interface (:class:`CellData`) that the training loop, the
models and the analyses use, held in memory (:class:`TensorData`) or read from disk (:class:`cellvae.data.BackedData`).

Everything AnnData- or pandas-shaped happens before, once (:meth:`cellvae.data.DataSpec.prepare`). The training loop
then slices a dense float32 tensor (or a CSR matrix) by integer index: no AnnData indexing, no DataFrame access and
no per-cell Python in the hot path.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from .sparse import csr_tensor
from ..errors import CellvaeInputError

__all__ = ['DENSE_MAX_ELEMENTS', 'SPARSE_MAX_DENSITY', 'CellData', 'TensorData', 'minibatch_slices', 'pass_order',
           'split_indices', 'as_indices']


DENSE_MAX_ELEMENTS = 300_000_000  # ~1.2 GB float32: above this, minibatches are densified from CSR per batch
SPARSE_MAX_DENSITY = 0.2  # sparse CSR training minibatches up to this fraction of non-zeros (slower above ~0.25)


# --------------------------------------------------------------------------------------- minibatches
class CellData:
    """The interface of prepared cells, in memory or on disk: callers never need to know which they hold.

    Attributes:
        n_cells, n_genes: the shape of the data (genes in model order).
        cat: (n_cells, 1 + n_cat_covariates) int64 covariate codes, batch first; cont: (n_cells, n_cont) float32 or
            None.

    Methods (each implementation documents its costs): :meth:`batch` (rows as tensors), :meth:`iterate` and
    :meth:`iterate_sparse` (minibatches), :meth:`sparse_counts` (whether CSR minibatches apply), :meth:`densify`,
    :meth:`rows` (rows as a float32 CSR matrix), :meth:`row_sums` and :meth:`col_sums` (totals, float64).
    """

    n_cells: int
    n_genes: int
    cat: torch.Tensor
    cont: torch.Tensor | None

    def __len__(self) -> int:
        return self.n_cells

    def densify(self) -> None:
        """Hold a dense copy when that makes dense minibatches cheaper (a no-op where it does not apply)."""

    def batch(self, idx) -> tuple:  # pragma: no cover - interface
        """Rows ``idx`` (int64 tensor; any order, repeats allowed) as ``(x, cat, cont)`` tensors; x (n, n_genes)."""
        raise NotImplementedError

    def rows(self, idx) -> sp.csr_matrix:  # pragma: no cover - interface
        """Rows ``idx`` (positions; any order) as a float32 CSR matrix (len(idx), n_genes)."""
        raise NotImplementedError

    def row_sums(self, absolute: bool = False) -> np.ndarray:  # pragma: no cover - interface
        """(n_cells,) float64 sum of each cell's values (of |x| with ``absolute``): the library sizes of counts."""
        raise NotImplementedError

    def col_sums(self, rows=None, absolute: bool = False, weights=None) -> np.ndarray:  # pragma: no cover
        """(n_genes,) float64 sum of each gene's values over the cells ``rows`` (None: all; a repeated cell counts
        as often as it occurs), each row times its entry of ``weights`` (aligned with ``rows``; None: 1)."""
        raise NotImplementedError

    def fingerprint(self, chunk: int = 4096) -> str:
        """SHA-256 (hex) of the values and covariates of every cell, the same whether the data are held dense, as
        CSR or read from disk (each block of rows is hashed as canonical CSR without stored zeros). A checkpoint
        stores it, so that resuming on changed counts is refused (one streamed pass over the data)."""
        import hashlib

        h = hashlib.sha256(f"{self.n_cells}x{self.n_genes}".encode())
        for a in range(0, self.n_cells, chunk):
            m = sp.csr_matrix(self.rows(np.arange(a, min(self.n_cells, a + chunk))), dtype=np.float32, copy=True)
            m.sum_duplicates()
            m.eliminate_zeros()
            for arr in (np.diff(m.indptr).astype(np.int64), m.indices.astype(np.int64), m.data):
                h.update(np.ascontiguousarray(arr).tobytes())
        for t in (self.cat, self.cont):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


class TensorData(CellData):
    """Prepared tensors for n cells: data (dense tensor or CSR), covariate codes and continuous covariates.

    Args:
        X: (n_cells, n_genes) numpy array or scipy sparse matrix. Kept as float32 CSR (and densified per
            minibatch where a dense one is needed) when it is sparse with at most ``SPARSE_MAX_DENSITY`` of its
            entries non-zero (most count matrices: a fifth of the memory of a dense copy, and what the sparse
            training minibatches read) or has more than ``DENSE_MAX_ELEMENTS`` entries; else stored densely.
        cat: (n_cells, 1 + n_cat_covariates) int64 codes (batch first).
        cont: (n_cells, n_cont) float32 or None.
    """

    def __init__(self, X, cat: torch.Tensor, cont: torch.Tensor | None = None):
        n, g = X.shape
        self.n_cells, self.n_genes = n, g
        sparse_enough = sp.issparse(X) and X.nnz <= SPARSE_MAX_DENSITY * n * g
        if n * g <= DENSE_MAX_ELEMENTS and not sparse_enough:
            dense = X.toarray() if sp.issparse(X) else np.asarray(X)
            self.X = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
            self.csr = None
        else:
            self.X = None
            self.csr = sp.csr_matrix(X, dtype=np.float32)
        self.cat = cat
        self.cont = cont
        self._sparse = None  # see sparse_counts

    def sparse_counts(self) -> sp.csr_matrix | None:
        """The data as a canonical float32 CSR matrix without stored zeros (for :meth:`iterate_sparse`) when at most
        ``SPARSE_MAX_DENSITY`` of its entries are non-zero, else None. Made on first use (a dense ``X`` is
        converted, a CSR one kept as it is when already canonical) and kept."""
        if self._sparse is None:
            nnz = self.csr.nnz if self.csr is not None else np.count_nonzero(self.X.numpy())
            if nnz > SPARSE_MAX_DENSITY * self.n_cells * self.n_genes:
                self._sparse = False
            else:
                m = self.csr if self.csr is not None else sp.csr_matrix(self.X.numpy())
                if not (m.has_canonical_format and m.data.all()):  # sorted, no duplicates, no stored zeros
                    m = m.copy()
                    m.sum_duplicates()
                    m.eliminate_zeros()
                self._sparse = m
        return self._sparse if self._sparse is not False else None

    def densify(self) -> None:
        """Store a dense float32 copy of CSR-kept data that has at most ``DENSE_MAX_ELEMENTS`` entries, so that
        :meth:`batch` selects rows instead of densifying every minibatch (for a training loop that feeds dense
        minibatches); a no-op otherwise."""
        if self.X is None and self.n_cells * self.n_genes <= DENSE_MAX_ELEMENTS:
            self.X = torch.from_numpy(self.csr.toarray().astype(np.float32, copy=False))

    def rows(self, idx) -> sp.csr_matrix:
        """Rows ``idx`` (positions; any order, repeats allowed) as a float32 CSR matrix (len(idx), n_genes)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if self.X is not None:
            return sp.csr_matrix(self.X.numpy()[idx])
        return self.csr[idx]

    def row_sums(self, absolute: bool = False) -> np.ndarray:
        """(n_cells,) float64 sum of each cell's values (of |x| with ``absolute``)."""
        if self.X is not None:
            x = self.X.abs() if absolute else self.X
            return x.sum(1, dtype=torch.float64).numpy()
        m = abs(self.csr) if absolute else self.csr
        return np.asarray(m.sum(1, dtype=np.float64)).ravel()

    def col_sums(self, rows=None, absolute: bool = False, weights=None) -> np.ndarray:
        """(n_genes,) float64 sum of each gene's values over the cells ``rows`` (None: all; repeats counted), each
        times its entry of ``weights`` (aligned with ``rows``; None: 1), from a per-cell weight vector (no copies
        of the rows)."""
        rows = np.arange(self.n_cells) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        wts = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        w = np.bincount(rows, weights=wts, minlength=self.n_cells).astype(np.float64)
        if self.X is None:
            m = abs(self.csr) if absolute else self.csr
            return np.asarray(m.T @ w).ravel()
        out = np.zeros(self.n_genes)
        for a in range(0, self.n_cells, 4096):  # float64 sums over blocks of the dense matrix
            block = self.X[a:a + 4096].numpy().astype(np.float64)
            out += w[a:a + 4096] @ (np.abs(block) if absolute else block)
        return out

    def batch(self, idx: torch.Tensor):
        """Rows ``idx`` (int64 tensor) as ``(x, cat, cont)`` tensors."""
        if self.X is not None:
            x = self.X.index_select(0, idx)
        else:
            x = torch.from_numpy(self.csr[idx.numpy()].toarray())
        cont = self.cont.index_select(0, idx) if self.cont is not None else None
        return x, self.cat.index_select(0, idx), cont

    def iterate(
        self,
        indices: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple]:
        """Yield ``(x, cat, cont)`` minibatches over ``indices``; see :func:`minibatch_slices`."""
        indices = pass_order(indices, shuffle, generator)
        for a, b in minibatch_slices(len(indices), batch_size):
            yield self.batch(indices[a:b])

    def iterate_sparse(
        self,
        indices: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple]:
        """As :meth:`iterate` (the same minibatches in the same order, for the same generator state), with ``x`` a
        torch sparse CSR tensor (n_batch, n_genes) float32 with int64 indices (converted once per minibatch, the
        form the native kernels read; the pass itself keeps scipy's index type). The rows of the whole pass are gathered once (scipy's
        O(nnz) row indexing), so each minibatch is a contiguous slice of them.

        Raises:
            ValueError: the data are too dense for sparse minibatches (:meth:`sparse_counts` is None).
        """
        counts = self.sparse_counts()
        if counts is None:
            raise ValueError(f"iterate_sparse needs data with at most {SPARSE_MAX_DENSITY:.0%} non-zero entries; "
                             "use iterate().")
        indices = pass_order(indices, shuffle, generator)
        m = counts[indices.numpy()]  # stored values are the non-zero counts, as the likelihood needs
        crow, col, val = (torch.from_numpy(a) for a in (m.indptr, m.indices, m.data))
        for a, b in minibatch_slices(len(indices), batch_size):
            s, e = int(crow[a]), int(crow[b])
            x = csr_tensor((crow[a:b + 1] - s).long(), col[s:e].long(), val[s:e], (b - a, self.n_genes))
            idx = indices[a:b]
            yield x, self.cat.index_select(0, idx), self.cont.index_select(0, idx) if self.cont is not None else None


def pass_order(indices: torch.Tensor, shuffle: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The cells of one pass in minibatch order: ``indices`` permuted with ``generator`` when ``shuffle``."""
    return indices[torch.randperm(len(indices), generator=generator)] if shuffle else indices


def minibatch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Start/stop pairs covering ``range(n)`` in batches of ``batch_size``.

    A last batch of a single cell is merged into the one before (batch normalisation cannot train on one cell:
    scvi-tools issues #426, #2214), so no batch has size 1 unless n == 1.
    """
    if n <= 0:
        return []
    bounds = list(range(0, n, batch_size)) + [n]
    pairs = list(zip(bounds[:-1], bounds[1:]))
    if len(pairs) > 1 and pairs[-1][1] - pairs[-1][0] == 1:
        pairs[-2] = (pairs[-2][0], n)
        pairs.pop()
    return pairs


def split_indices(n: int, train_size: float = 0.9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)`` into train and validation indices (sorted).

    ``train_size`` of 1.0 gives no validation cells. With fewer than 2 validation cells and ``train_size < 1``,
    at least one cell is kept for validation when n >= 2.
    """
    if not 0.0 < train_size <= 1.0:
        raise CellvaeInputError(f"train_size must be in (0, 1], got {train_size}.")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_train = int(np.ceil(train_size * n))
    if train_size < 1.0 and n_train >= n and n >= 2:
        n_train = n - 1
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def as_indices(indices, n_cells: int) -> torch.Tensor:
    """Cell indices as an int64 tensor.

    Args:
        indices: None (all cells), integer positions (array-like or tensor), or a boolean mask of length
            ``n_cells``.
        n_cells: number of cells in the data.

    Raises:
        CellvaeInputError: no cells, non-integer indices, or indices outside ``[0, n_cells)``.
    """
    if indices is None:
        idx = np.arange(n_cells)
    else:
        idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (n_cells,):
                raise CellvaeInputError(f"A boolean mask of cells needs length {n_cells}, got shape {idx.shape}.")
            idx = np.flatnonzero(idx)
        elif idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise CellvaeInputError(f"indices must be integer positions or a boolean mask, got dtype {idx.dtype}.")
        idx = idx.reshape(-1)
    if idx.size == 0:
        raise CellvaeInputError("No cells to evaluate (empty indices).")
    if idx.min() < 0 or idx.max() >= n_cells:
        raise CellvaeInputError(f"indices must lie in [0, {n_cells}), got range [{idx.min()}, {idx.max()}].")
    return torch.as_tensor(idx, dtype=torch.int64)


