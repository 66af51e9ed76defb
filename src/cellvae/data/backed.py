"""Out-of-core data: train, embed and evaluate on an ``.h5ad`` that does not fit in memory.

:class:`BackedData` serves minibatches from the counts matrix of a backed AnnData
(``anndata.read_h5ad(path, backed="r")``) with the interface of :class:`cellvae.data.TensorData` (``n_cells``,
``n_genes``, ``X = None``, ``cat``, ``cont``, ``batch``, ``iterate``), so the training loop and every analysis that
takes its cells from ``CountVAE.prepared_data`` run unchanged (``CountVAE(backed_adata, out_of_core=True)``). Only the
covariate codes (``cat``/``cont``: a few bytes per cell), the row pointers of the CSR matrix (8 bytes per cell) and
one shuffle buffer are held in memory.

Reading (see ``docs/backed.md``):

- The matrix is read in contiguous row **chunks** (:data:`DEFAULT_CHUNK_SIZE` = 16,384 rows): one slice of the
  stored ``data``/``indices`` arrays per chunk (rows are CSR, so a range of rows is a range of stored values).
- **Shuffled** iteration (training) shuffles the order of the chunks with the given ``generator``, loads
  :data:`DEFAULT_BUFFER_CHUNKS` = 8 chunks at a time into a **buffer** (a CSR matrix of the selected cells of those
  chunks, genes already subset to the model's), shuffles the cells within the buffer and cuts it into minibatches;
  a minibatch that straddles two buffers takes its first part from the old one. Cells not in ``indices`` (e.g. the
  validation cells) are never loaded into the buffer. Each index occurs as often per epoch as in ``indices``, the
  minibatch sizes are exactly those of :func:`cellvae.data.minibatch_slices` (so the KL warm-up's step count is the
  same as in memory), and the order is a function of the generator's state (reproducible, and restored by
  checkpoints like the in-memory order).
- **Ordered** iteration (latent representations, ELBO, normalized expression) yields ``indices`` in the given
  order; windows of about one chunk of indices are read at once (sorted and de-duplicated; nearby rows are read with
  one slice, far-apart rows with separate small reads).
- Only one minibatch is ever dense (``x``: float32 ``(batch, n_genes)``); peak memory is about twice the buffer in
  CSR form (8 chunks x 16,384 cells x stored values per cell x 8 bytes, e.g. ~0.2 GB for 200 values per cell).

Reads select the model's genes in model order (:meth:`cellvae.data.DataSpec.gene_indexer`), encode covariates with
:meth:`cellvae.data.DataSpec.covariate_tensors` and apply the ``normal`` likelihood's ``log1p_cp10k`` per cell, so
every minibatch equals the one :meth:`cellvae.data.DataSpec.prepare` gives in memory. :func:`scan_counts` streams
the whole-matrix checks of ``CountVAE.__init__`` (:func:`cellvae.data.check_values` with identical messages,
per-gene and per-cell totals, "is it a count matrix") over chunks.

Supported on disk: CSR ``X`` (anndata's sparse dataset, any index dtype) and dense ``X`` (an HDF5 dataset, read by
row ranges). A CSC ``X`` is refused (its rows are scattered over the whole file). ``layers`` of a backed AnnData
are loaded into memory by anndata itself; they work, without the memory saving.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from .tensors import SPARSE_MAX_DENSITY, CellData, minibatch_slices
from ..errors import CellvaeInputError
from .spec import DataSpec
from .checks import (canonical_sparse, check_values, counts_source, get_counts, is_count_matrix, merge_value_summaries,
                     raise_for_values, sparse_structure_problem, value_summary)
from .preprocess import log1p_cp10k
from .read import resolve_data_path
from .sparse import csr_tensor

__all__ = ["BackedData", "BackedRows", "ScanResult", "scan_counts", "summarize_counts", "is_backed", "open_backed",
           "DEFAULT_CHUNK_SIZE", "DEFAULT_BUFFER_CHUNKS"]

DEFAULT_CHUNK_SIZE = 1 << 14  # rows per contiguous read
DEFAULT_BUFFER_CHUNKS = 8  # chunks whose cells are shuffled together
_GAP = 1 << 14  # stored values between two wanted rows that are read through rather than starting a new read
_SPAN = 1 << 22  # stored values per read at most (~32 MB of float32 data + int32 indices)
_DENSE_GAP = 64  # dense X: rows read through between two wanted rows


def is_backed(adata) -> bool:
    """True for an AnnData opened with ``backed="r"`` (or ``"r+"``) whose matrix is read from disk; False for
    in-memory AnnData and for views of a backed one (a view's ``X`` is read into memory by anndata)."""
    return bool(getattr(adata, "isbacked", False)) and not getattr(adata, "is_view", False)


def open_backed(path: str | os.PathLike) -> ad.AnnData:
    """``anndata.read_h5ad(path, backed="r")`` (path, file name in ``$CELLVAE_DATA_DIR`` or URL), with readable errors.

    Raises:
        CellvaeInputError: not found, not an ``.h5ad``, or unreadable.
    """
    p = resolve_data_path(path)
    if not str(p).lower().endswith(".h5ad"):
        raise CellvaeInputError(f"Out-of-core reading needs an .h5ad file, got {str(p)!r}; convert it first "
                                "(cellvae.read_data(path).write_h5ad('data.h5ad')).")
    try:
        adata = ad.read_h5ad(p, backed="r")
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CellvaeInputError(f"Could not open {str(p)!r} as a backed .h5ad: {first}. The file is truncated, "
                                "damaged or not an .h5ad; check it.") from e
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CellvaeInputError(f"{str(p)!r} holds an empty matrix ({adata.n_obs} cells x {adata.n_vars} genes); "
                                "check the file.")
    return adata


# ------------------------------------------------------------------------------------------- row reader
class _RowReader:
    """Reads sets of rows of a stored matrix as CSR: anndata's on-disk CSR dataset (HDF5 or zarr), an in-memory
    sparse matrix (a backed AnnData's layers), or a dense HDF5 dataset / numpy array."""

    def __init__(self, X, where: str = "X"):
        self.dense = None
        self.where = where
        fmt = getattr(X, "format", None)
        if hasattr(X, "group") and fmt in ("csr", "csc"):  # anndata's backed sparse dataset
            if fmt == "csc":
                raise CellvaeInputError(
                    f"{where} is stored as CSC (columns) in the file; out-of-core reading needs rows (CSR). Convert "
                    "it once: a = anndata.read_h5ad(path); a.X = scipy.sparse.csr_matrix(a.X); a.write_h5ad(path2) "
                    "(or train in memory: out_of_core=False, or without --backed on the command line)."
                )
            g = X.group
            self.data, self.indices = g["data"], g["indices"]
            self.indptr = np.asarray(g["indptr"][()], dtype=np.int64)
            nnz = int(self.indices.shape[0])
            problem = sparse_structure_problem(self.indptr, None, int(X.shape[0]), int(X.shape[1]), nnz=nnz)
            if problem is None and int(self.data.shape[0]) != nnz:
                problem = f"{int(self.data.shape[0])} values but {nnz} indices are stored"
            if problem:
                raise _invalid(where, X.shape, problem)
        elif sp.issparse(X):
            X = canonical_sparse(sp.csr_matrix(X) if X.format != "csr" else X, where)
            self.data, self.indices, self.indptr = X.data, X.indices, X.indptr.astype(np.int64, copy=False)
        elif hasattr(X, "shape") and len(X.shape) == 2 and hasattr(X, "dtype"):  # h5py dataset or ndarray
            self.dense = X
        else:
            raise CellvaeInputError(f"{where} of type {type(X).__name__} cannot be read out of core; store it as a "
                                    "CSR or dense matrix in the .h5ad.")
        self.shape = tuple(int(s) for s in X.shape)
        self.dtype = np.dtype(X.dtype)
        if self.dtype == np.float16:  # scipy's sparse matrices do not hold float16: read as float32 (exact)
            self.dtype = np.dtype(np.float32)

    def _checked(self, m: sp.csr_matrix) -> sp.csr_matrix:
        """A block read from the file, its column indices checked (the file's indptr was checked when opened)."""
        idx = m.indices
        if len(idx) and (idx.min() < 0 or idx.max() >= self.shape[1]):
            bad = idx[(idx < 0) | (idx >= self.shape[1])][0]
            raise _invalid(self.where, self.shape, f"a column index {bad} is outside [0, {self.shape[1]})")
        return m

    def read(self, rows: np.ndarray, bufs: "_Buffers | None" = None) -> sp.csr_matrix:
        """Rows ``rows`` (sorted, unique, int64) as a CSR matrix of the stored dtype (all stored columns).

        With ``bufs``, the stored values are read into its reusable arrays (the result is valid until the next
        read with the same ``bufs``): an iteration then allocates its large arrays once, not once per read, which
        spares the C heap some of the fragmentation described at :func:`_release_free_memory`."""
        if self.dense is not None:
            return self._read_dense(rows)
        n = len(rows)
        if n == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        s, e = self.indptr[rows], self.indptr[rows + 1]
        idt = np.dtype(self.indices.dtype)
        if rows[-1] - rows[0] + 1 == n and (bufs is not None or e[-1] - s[0] <= 2 * _SPAN):  # one contiguous range
            a, b = int(s[0]), int(e[-1])
            ptr = self.indptr[rows[0]:rows[-1] + 2] - a
            if bufs is None:
                d = np.asarray(self.data[a:b], dtype=self.dtype)
                return self._checked(_csr(d, self.indices[a:b], ptr, (n, self.shape[1])))
            data = _read_into(self.data, a, b, bufs.get("data", b - a, self.dtype))
            indices = _read_into(self.indices, a, b, bufs.get("indices", b - a, idt))
            return self._checked(_csr(data, indices, ptr, (n, self.shape[1])))
        lens = e - s
        ptr = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=ptr[1:])
        nnz = int(ptr[-1])
        data = bufs.get("data", nnz, self.dtype) if bufs is not None else np.empty(nnz, self.dtype)
        indices = bufs.get("indices", nnz, idt) if bufs is not None else np.empty(nnz, idt)
        # Reads: a new one where the gap to the previous wanted row is large or a _SPAN window is crossed.
        new = np.ones(n, bool)
        new[1:] = (s[1:] - e[:-1] > _GAP) | (s[1:] // _SPAN != s[:-1] // _SPAN)
        starts = np.flatnonzero(new)
        for g0, g1 in zip(starts, np.append(starts[1:], n)):
            a, b = int(s[g0]), int(e[g1 - 1])
            o0, o1 = int(ptr[g0]), int(ptr[g1])
            if o1 == o0:
                continue
            if b - a == o1 - o0:  # the rows are adjacent in the file: read straight into place
                _read_into(self.data, a, b, data[o0:o1])
                _read_into(self.indices, a, b, indices[o0:o1])
                continue
            if bufs is not None:
                d = _read_into(self.data, a, b, bufs.get("scratch_data", b - a, self.dtype))
                ix = _read_into(self.indices, a, b, bufs.get("scratch_indices", b - a, idt))
            else:
                d, ix = np.asarray(self.data[a:b], dtype=self.dtype), self.indices[a:b]
            src = np.arange(o1 - o0) + np.repeat(s[g0:g1] - a - (ptr[g0:g1] - o0), lens[g0:g1])
            np.take(d, src, out=data[o0:o1])
            np.take(ix, src, out=indices[o0:o1])
        return self._checked(_csr(data, indices, ptr, (n, self.shape[1])))

    def _read_dense(self, rows: np.ndarray) -> sp.csr_matrix:
        if isinstance(self.dense, np.ndarray):
            return sp.csr_matrix(np.asarray(self.dense[rows], dtype=self.dtype if self.dtype.kind == "f" else None))
        n = len(rows)
        if n == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        new = np.ones(n, bool)
        new[1:] = (np.diff(rows) > _DENSE_GAP) | (rows[1:] // DEFAULT_CHUNK_SIZE != rows[:-1] // DEFAULT_CHUNK_SIZE)
        starts = np.flatnonzero(new)
        parts = []
        for g0, g1 in zip(starts, np.append(starts[1:], n)):
            r0, r1 = int(rows[g0]), int(rows[g1 - 1]) + 1
            block = np.asarray(self.dense[r0:r1], dtype=self.dtype if self.dtype.kind == "f" else None)
            parts.append(sp.csr_matrix(block[rows[g0:g1] - r0] if r1 - r0 != g1 - g0 else block))
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def _where(adata, layer: str | None) -> str:
    """How messages name the matrix: the file and ``X`` or the layer."""
    name = f"layers[{layer!r}]" if layer else "X"
    f = getattr(adata, "filename", None)
    return f"{os.path.basename(str(f))}: {name}" if f else name


def _csr(data, indices, indptr, shape) -> sp.csr_matrix:
    """A CSR matrix from parts whose structure is checked by the caller (scipy's constructor checks only lengths)."""
    return sp.csr_matrix((data, indices, indptr), shape=shape)


def _invalid(where: str, shape, problem: str) -> CellvaeInputError:
    return CellvaeInputError(
        f"{where} is not a valid CSR sparse matrix of shape {tuple(shape)}: {problem}. The file was written wrongly "
        "(e.g. by hand with h5py); write it again from a valid matrix (scipy.sparse.csr_matrix checks this: "
        "m.check_format(full_check=True))."
    )


class _Buffers:
    """Growable arrays reused by the reads of one iteration (see :meth:`_RowReader.read`)."""

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None or a.size < n or a.dtype != dtype:
            size = max(n, int(a.size * 1.25) if a is not None and a.dtype == dtype else n + n // 8)
            a = self._arrays[name] = np.empty(size, dtype)
        return a[:n]


def _read_into(ds, a: int, b: int, out: np.ndarray) -> np.ndarray:
    """``ds[a:b]`` written into ``out`` (length ``b - a``) without a temporary array where the store allows it
    (h5py's ``read_direct``); returns ``out``."""
    if b > a:
        if hasattr(ds, "read_direct"):
            ds.read_direct(out, source_sel=np.s_[a:b], dest_sel=np.s_[0:b - a])
        else:
            out[...] = ds[a:b]
    return out


_TRIM = None


def _release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Called between read windows and shuffle buffers. Streaming a million cells allocates and frees large arrays
    (dense minibatches, the model's activations) between small long-lived ones (results kept per minibatch);
    glibc's heap then fragments and keeps the freed memory: an out-of-core ``get_latent_representation`` of 1M
    cells ended with 1.0-4.5 GiB resident instead of 0.7 GiB. Trimming every 16 minibatches keeps it flat and costs
    well under 5% of the time."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def _as_numpy_indices(indices) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        return indices.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    return np.asarray(indices, dtype=np.int64).reshape(-1)


def _take(block: sp.csr_matrix, loc: np.ndarray) -> sp.csr_matrix:
    """Rows ``loc`` of ``block``; a slice when they are consecutive (cheaper than fancy indexing)."""
    if len(loc) and loc[-1] - loc[0] + 1 == len(loc) and (len(loc) == 1 or bool((np.diff(loc) == 1).all())):
        return block[int(loc[0]):int(loc[-1]) + 1]
    return block[loc]


# ------------------------------------------------------------------------------------------------ scans
@dataclass
class ScanResult:
    """Whole-matrix facts gathered in one streamed pass (:func:`scan_counts`).

    Attributes:
        summary: :func:`cellvae.data.value_summary` of all values (merged over chunks).
        gene_abs: (n_genes,) sum of |x| per gene (float64).
        cell_abs: (n_cells,) sum of |x| per cell (float64).
        cell_sum: (n_cells,) sum of x per cell (float64): the library sizes for counts.
        is_count: every value is a non-negative integer (:func:`cellvae.data.is_count_matrix`).
    """

    summary: dict
    gene_abs: np.ndarray
    cell_abs: np.ndarray
    cell_sum: np.ndarray
    is_count: bool


def _scan(reader: _RowReader, genes: np.ndarray | None, count_likelihood: bool, where: str,
          chunk_size: int) -> ScanResult:
    n = reader.shape[0]
    g = reader.shape[1] if genes is None else len(genes)
    gene_abs = np.zeros(g)
    cell_abs = np.zeros(n)
    cell_sum = np.zeros(n)
    summary = None
    n_dup = 0
    bufs = _Buffers()
    for a in range(0, n, chunk_size):
        b = min(n, a + chunk_size)
        m = reader.read(np.arange(a, b, dtype=np.int64), bufs)
        if genes is not None:
            m = m[:, genes]
        if not m.has_canonical_format:  # duplicated entries are summed wherever rows are read; say so once
            c = m.copy()
            c.sum_duplicates()
            n_dup += m.nnz - c.nnz
        summary = merge_value_summaries(summary, value_summary(m.data))
        dt = summary["dtype"]
        if not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
            break  # answered below, before any arithmetic on the values
        if summary["n_nonfinite"]:
            continue  # keep counting them for the message; totals are not needed
        absm = abs(m)  # (no sum_duplicates: it would work in place on an in-memory layer's arrays)
        gene_abs += np.asarray(absm.sum(0, dtype=np.float64)).ravel()
        cell_abs[a:b] = np.asarray(absm.sum(1, dtype=np.float64)).ravel()
        cell_sum[a:b] = np.asarray(m.sum(1, dtype=np.float64)).ravel()
    if summary is None:
        summary = value_summary(np.zeros(0, reader.dtype))
    if n_dup:
        warnings.warn(f"{where} stores {n_dup} duplicated entries (the same row and column twice); they are summed "
                      "when read, as scipy and a dense copy do.", UserWarning, stacklevel=3)
    raise_for_values(summary, count_likelihood, where)
    is_count = summary["size"] == 0 or (summary["min"] >= 0 and summary["n_nonint"] == 0)
    return ScanResult(summary, gene_abs, cell_abs, cell_sum, bool(is_count))


def scan_counts(adata: ad.AnnData, layer: str | None = None, count_likelihood: bool = True,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> ScanResult:
    """Check the values of a backed AnnData's matrix and total it per gene and per cell, chunk by chunk (the
    streamed form of what ``CountVAE.__init__`` computes on an in-memory matrix).

    Raises:
        CellvaeInputError: as :func:`cellvae.data.check_values` on the whole matrix (same messages and counts),
            a missing layer, or a matrix that cannot be read by rows (CSC).
    """
    where = _where(adata, layer)
    reader = _RowReader(counts_source(adata, layer), where)
    return _scan(reader, None, count_likelihood, where, int(chunk_size))


def summarize_counts(adata: ad.AnnData, layer: str | None = None, count_likelihood: bool = True,
                     out_of_core: bool = False) -> ScanResult:
    """Check the values of an AnnData's matrix and total it per gene and per cell: streamed over row chunks of a
    backed file with ``out_of_core`` (:func:`scan_counts`), else on the matrix in memory (the same checks and
    messages, :func:`cellvae.data.check_values`). ``summary`` is None in memory.

    Raises:
        CellvaeInputError: as :func:`cellvae.data.check_values`, or a missing layer.
    """
    if out_of_core:
        return scan_counts(adata, layer, count_likelihood)
    X = get_counts(adata, layer)
    check_values(X, count_likelihood, where=f"layers[{layer!r}]" if layer else "X")
    if sp.issparse(X):
        a = abs(X)
        gene_abs = np.asarray(a.sum(0, dtype=np.float64)).ravel()
        cell_abs = np.asarray(a.sum(1, dtype=np.float64)).ravel()
        cell_sum = np.asarray(X.sum(1, dtype=np.float64)).ravel()
    else:
        X = np.asarray(X)
        a = np.abs(X)
        gene_abs, cell_abs, cell_sum = a.sum(0, dtype=np.float64), a.sum(1, dtype=np.float64), X.sum(1, dtype=np.float64)
    return ScanResult(None, gene_abs, cell_abs, cell_sum, is_count_matrix(X))


# ------------------------------------------------------------------------------------------------ store
class BackedData(CellData):
    """Minibatches of a backed AnnData's cells, read from disk chunk by chunk (interface of
    :class:`cellvae.data.TensorData`; see the module docstring for the reading scheme).

    Args:
        adata: AnnData opened with ``backed="r"``, or a path to an ``.h5ad`` (opened backed).
        spec: the model's :class:`cellvae.data.DataSpec` (genes, layer, covariates, likelihood, transform).
        check: stream :func:`cellvae.data.check_values` over the model's genes first (as ``DataSpec.prepare``
            does); skipped when ``scan`` is given.
        chunk_size: rows per contiguous read.
        buffer_chunks: chunks shuffled together when training.
        scan: a :class:`ScanResult` of this matrix already computed (by ``CountVAE.__init__``), whose per-cell sums
            are then reused; valid when the genes it summed beyond the model's are empty (the genes CountVAE drops).

    Attributes:
        n_cells, n_genes: cells in the file, genes of the model.
        X: None (there is no in-memory matrix).
        csr: :class:`BackedRows`, a row-indexable view of the matrix (``csr[rows].toarray()``, ``csr.sum(1)``).
        cat: (n_cells, 1 + n_cat) int64 covariate codes, batch first; cont: (n_cells, n_cont) float32 or None.

    Raises:
        CellvaeInputError: bad values (with ``check``), missing genes or obs keys, unknown categories, a CSC matrix.
    """

    def __init__(self, adata, spec: DataSpec, check: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 buffer_chunks: int = DEFAULT_BUFFER_CHUNKS, scan: ScanResult | None = None):
        if isinstance(adata, (str, os.PathLike)):
            adata = open_backed(adata)
        if int(chunk_size) < 1 or int(buffer_chunks) < 1:
            raise CellvaeInputError(f"chunk_size and buffer_chunks must be >= 1, got {chunk_size}, {buffer_chunks}.")
        self.adata = adata
        self.spec = spec
        self.chunk_size, self.buffer_chunks = int(chunk_size), int(buffer_chunks)
        self.where = _where(adata, spec.layer)
        self._reader = _RowReader(counts_source(adata, spec.layer), self.where)
        self._genes = spec.gene_indexer(adata)
        self.n_cells, self.n_genes = int(adata.n_obs), len(spec.gene_names)
        self.X = None
        self._transform = not spec.is_counts and spec.normal_transform == "log1p_cp10k"
        self.cat, self.cont = spec.covariate_tensors(adata)
        if scan is None and check:
            scan = _scan(self._reader, self._genes, spec.is_counts, self.where, self.chunk_size)
        self._row_sums: dict = {} if (scan is None or self._transform) else {False: scan.cell_sum,
                                                                              True: scan.cell_abs}
        self.csr = BackedRows(self)
        self._batch_bufs = _Buffers()  # reused by batch(), whose result is copied (dense) before it returns
        self._sparse_ok: bool | None = None  # see sparse_counts

    def __repr__(self) -> str:
        return (f"BackedData({self.n_cells} cells x {self.n_genes} genes, chunk_size={self.chunk_size}, "
                f"buffer_chunks={self.buffer_chunks})")

    # -------------------------------------------------------------------------------------------- reads
    def read_rows(self, rows: np.ndarray, bufs: _Buffers | None = None) -> sp.csr_matrix:
        """Rows ``rows`` (sorted, unique) as a float32 CSR matrix over the model's genes, in model order, transformed
        like :meth:`cellvae.data.DataSpec.prepare` (``log1p_cp10k`` for a ``normal`` model of counts). With
        ``bufs`` the result may share memory with them (valid until their next use)."""
        m = self._reader.read(np.asarray(rows, dtype=np.int64), bufs)
        if self._genes is not None:
            m = m[:, self._genes]
        m = m.astype(np.float32, copy=False)
        if self._transform:
            m = log1p_cp10k(m)
        return m

    def _rows_any(self, idx: np.ndarray, bufs: _Buffers | None = None) -> sp.csr_matrix:
        """Rows ``idx`` in the given order, repeats allowed (sharing memory with ``bufs`` if given)."""
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_cells):
            raise IndexError(f"cell index out of range [0, {self.n_cells})")
        if len(idx) > 1 and bool((np.diff(idx) > 0).all()):
            return self.read_rows(idx, bufs)
        u, inv = np.unique(idx, return_inverse=True)
        return _take(self.read_rows(u, bufs), inv)

    def _pack(self, x, ids: np.ndarray) -> tuple:
        """``(x, cat, cont)`` tensors for the cells ``ids``; ``x`` a dense array or already a (CSR) tensor."""
        t = torch.from_numpy(ids)
        cont = self.cont.index_select(0, t) if self.cont is not None else None
        return x if isinstance(x, torch.Tensor) else torch.from_numpy(x), self.cat.index_select(0, t), cont

    def rows(self, idx) -> sp.csr_matrix:
        """Rows ``idx`` (any order, repeats allowed) read from disk as a float32 CSR matrix over the model's genes."""
        return self._rows_any(_as_numpy_indices(idx))

    def batch(self, idx) -> tuple:
        """Rows ``idx`` (int64 tensor or array; any order, repeats allowed) as ``(x, cat, cont)`` tensors."""
        i = _as_numpy_indices(idx)
        return self._pack(self._rows_any(i, self._batch_bufs).toarray(), i)

    def iterate(self, indices, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple]:
        """Yield ``(x, cat, cont)`` minibatches over ``indices`` with the sizes of
        :func:`cellvae.data.minibatch_slices`: in the given order, or shuffled chunk-wise with ``generator``."""
        yield from self._iterate(indices, batch_size, shuffle, generator, sparse=False)

    def iterate_sparse(self, indices, batch_size: int, shuffle: bool = False,
                       generator: torch.Generator | None = None) -> Iterator[tuple]:
        """As :meth:`iterate` (the same minibatches in the same order, for the same generator state), with ``x`` a
        torch sparse CSR tensor (n_batch, n_genes) float32 whose stored values are the non-zero counts: the rows
        are never densified (see :func:`cellvae.train.train_module`).

        Raises:
            ValueError: the data are too dense for sparse minibatches (:meth:`sparse_counts` is None).
        """
        if self.sparse_counts() is None:
            raise ValueError(f"iterate_sparse needs data with at most {SPARSE_MAX_DENSITY:.0%} non-zero entries; "
                             "use iterate().")
        yield from self._iterate(indices, batch_size, shuffle, generator, sparse=True)

    def sparse_counts(self) -> BackedRows | None:
        """The row view :attr:`csr` when the data are sparse enough for CSR minibatches (at most
        ``SPARSE_MAX_DENSITY`` non-zero entries, estimated on the first chunk of rows), else None; the counterpart of
        :meth:`cellvae.data.TensorData.sparse_counts` for the training loop."""
        if self._sparse_ok is None:
            m = self.read_rows(np.arange(min(self.n_cells, self.chunk_size), dtype=np.int64))
            m.eliminate_zeros()
            self._sparse_ok = m.nnz <= SPARSE_MAX_DENSITY * max(m.shape[0], 1) * self.n_genes
        return self.csr if self._sparse_ok else None

    def _iterate(self, indices, batch_size: int, shuffle: bool, generator, sparse: bool) -> Iterator[tuple]:
        idx = _as_numpy_indices(indices)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_cells):
            raise IndexError(f"cell index out of range [0, {self.n_cells})")
        if shuffle:
            yield from self._shuffled(idx, int(batch_size), generator, sparse)
        else:
            yield from self._ordered(idx, int(batch_size), sparse)

    def _minibatch(self, m: sp.csr_matrix, sparse: bool):
        """A minibatch's rows (CSR, may share memory with read buffers) as a dense array, or as a torch CSR tensor
        of their non-zero counts (copied: without stored zeros, sorted columns, int64 indices)."""
        if not sparse:
            return m.toarray()
        m = sp.csr_matrix((m.data.copy(), m.indices.copy(), m.indptr.copy()), shape=m.shape)
        m.sum_duplicates()
        m.eliminate_zeros()
        return csr_tensor(torch.from_numpy(m.indptr).long(), torch.from_numpy(m.indices).long(),
                          torch.from_numpy(m.data), m.shape)

    def _ordered(self, idx: np.ndarray, batch_size: int, sparse: bool = False) -> Iterator[tuple]:
        slices = minibatch_slices(len(idx), batch_size)
        window = max(self.chunk_size, batch_size)
        bufs = _Buffers()
        i = 0
        while i < len(slices):
            j = i
            while j < len(slices) and slices[j][1] - slices[i][0] <= window:
                j += 1
            j = max(j, i + 1)
            wa, wb = slices[i][0], slices[j - 1][1]
            rows = idx[wa:wb]
            if len(rows) > 1 and bool((np.diff(rows) > 0).all()):
                block, inv = self.read_rows(rows, bufs), np.arange(len(rows))
            else:
                u, inv = np.unique(rows, return_inverse=True)
                block = self.read_rows(u, bufs)
            for a, b in slices[i:j]:
                yield self._pack(self._minibatch(_take(block, inv[a - wa:b - wa]), sparse), idx[a:b])
            del block
            _release_free_memory()
            i = j

    def _shuffled(self, idx: np.ndarray, batch_size: int, generator, sparse: bool = False) -> Iterator[tuple]:
        sizes = [b - a for a, b in minibatch_slices(len(idx), batch_size)]
        if not sizes:
            return
        cs = self.chunk_size
        n_chunks = -(-self.n_cells // cs)
        sidx = np.sort(idx)
        bounds = np.searchsorted(sidx, np.arange(n_chunks + 1, dtype=np.int64) * cs)
        order = torch.randperm(n_chunks, generator=generator).numpy()
        bufs = _Buffers()
        k, need, parts = 0, sizes[0], []
        for s in range(0, n_chunks, self.buffer_chunks):
            chunks = np.sort(order[s:s + self.buffer_chunks])
            rows = np.concatenate([sidx[bounds[c]:bounds[c + 1]] for c in chunks])  # sorted, repeats kept
            if len(rows) == 0:
                continue
            dup = len(rows) > 1 and bool((np.diff(rows) == 0).any())
            if dup:
                u, local = np.unique(rows, return_inverse=True)
            else:
                u, local = rows, np.arange(len(rows))
            block = self.read_rows(u, bufs)  # the buffer
            local = local[torch.randperm(len(local), generator=generator).numpy()]
            pos = 0
            while pos < len(local):
                take = min(need, len(local) - pos)
                sel = local[pos:pos + take]
                parts.append((block[sel] if sparse else block[sel].toarray(), u[sel]))
                pos += take
                need -= take
                if need == 0:
                    if len(parts) == 1:
                        x, ids = parts[0]
                    else:
                        ids = np.concatenate([p[1] for p in parts])
                        x = (sp.vstack([p[0] for p in parts], format="csr") if sparse
                             else np.concatenate([p[0] for p in parts]))
                    parts = []
                    yield self._pack(self._minibatch(x, True) if sparse else x, ids)
                    k += 1
                    need = sizes[k] if k < len(sizes) else 0
            del block
            _release_free_memory()

    # ---------------------------------------------------------------------------------------- totals
    def row_sums(self, absolute: bool = False) -> np.ndarray:
        """(n_cells,) float64 sum (of |x| with ``absolute``) per cell over the model's genes (of the transformed
        data for a ``normal`` model of counts): from the scan when known, else streamed over chunks once."""
        if absolute not in self._row_sums:
            out = np.zeros(self.n_cells)
            bufs = _Buffers()
            for a in range(0, self.n_cells, self.chunk_size):
                m = self.read_rows(np.arange(a, min(self.n_cells, a + self.chunk_size), dtype=np.int64), bufs)
                out[a:a + m.shape[0]] = np.asarray((abs(m) if absolute else m).sum(1, dtype=np.float64)).ravel()
            self._row_sums[absolute] = out
        return self._row_sums[absolute]

    def col_sums(self, rows: np.ndarray | None = None, absolute: bool = False, weights=None) -> np.ndarray:
        """(n_genes,) float64 sum (of |x| with ``absolute``) per gene over ``rows`` (None: all cells; repeats
        count as often as they occur), each row times its entry of ``weights`` (aligned with ``rows``; None: 1),
        streamed over windows of ``chunk_size`` rows."""
        rows = np.arange(self.n_cells, dtype=np.int64) if rows is None else _as_numpy_indices(rows)
        wts = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        order = np.argsort(rows, kind="stable")
        rows, wts = rows[order], wts[order]
        out = np.zeros(self.n_genes)
        bufs = _Buffers()
        for a in range(0, len(rows), self.chunk_size):
            u, inv = np.unique(rows[a:a + self.chunk_size], return_inverse=True)
            wu = np.bincount(inv, weights=wts[a:a + self.chunk_size], minlength=len(u))
            m = self.read_rows(u, bufs)
            m = abs(m) if absolute else m
            if not (wu == 1).all():
                m = sp.csr_matrix(sp.diags(wu) @ m)
            out += np.asarray(m.sum(0, dtype=np.float64)).ravel()
        return out


class BackedRows:
    """Row access to a :class:`BackedData`'s matrix with the parts of scipy's CSR interface that cellvae uses on
    ``TensorData.csr``: ``shape``, ``rows[idx]`` (a lazy selection of rows, itself a :class:`BackedRows`; read by
    ``.toarray()`` / ``.tocsr()``), ``.sum(axis)`` and ``abs(rows)``. Per-cell sums come from the scan or one
    streamed pass (cached); per-gene sums are streamed; the whole matrix is never read into memory by a sum."""

    def __init__(self, data: BackedData, absolute: bool = False, rows: np.ndarray | None = None):
        self._data, self._abs, self._rows = data, absolute, rows

    @property
    def shape(self) -> tuple[int, int]:
        n = self._data.n_cells if self._rows is None else len(self._rows)
        return n, self._data.n_genes

    def __abs__(self) -> "BackedRows":
        return type(self)(self._data, True, self._rows)

    def __getitem__(self, key) -> "BackedRows":
        cols = None
        if isinstance(key, tuple):
            key, cols = key
            if cols is not None and not (isinstance(cols, slice) and cols == slice(None)):
                raise NotImplementedError("select genes after .toarray() / .tocsr()")
        if isinstance(key, slice):
            rows = np.arange(self.shape[0], dtype=np.int64)[key]
        else:
            rows = _as_numpy_indices(np.flatnonzero(key) if np.asarray(key).dtype == bool else key)
        if self._rows is not None:
            rows = self._rows[rows]
        return type(self)(self._data, self._abs, rows)

    def tocsr(self) -> sp.csr_matrix:
        """The selected rows as an in-memory float32 CSR matrix."""
        rows = np.arange(self._data.n_cells, dtype=np.int64) if self._rows is None else self._rows
        m = self._data._rows_any(rows)
        return abs(m) if self._abs else m

    def toarray(self) -> np.ndarray:
        return self.tocsr().toarray()

    def sum(self, axis: int | None = None, dtype=None):
        """Sum over ``axis`` (None: everything; 0: per gene, shape (1, n_genes); 1: per cell, (n_cells, 1))."""
        if axis == 1 or axis == -1:
            tot = self._data.row_sums(self._abs)
            out = (tot if self._rows is None else tot[self._rows]).reshape(-1, 1)
        elif axis == 0:
            out = self._data.col_sums(self._rows, self._abs).reshape(1, -1)
        elif axis is None:
            tot = self._data.row_sums(self._abs)
            out = np.float64((tot if self._rows is None else tot[self._rows]).sum())
        else:
            raise ValueError(f"axis must be None, 0 or 1, got {axis}")
        return out.astype(dtype) if dtype is not None else out
