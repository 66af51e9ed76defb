"""What a matrix must satisfy before a model trains on it, with messages that say what is wrong and how to fix it.

:func:`check_values` refuses non-numeric dtypes, NaN/inf, values beyond float32 and, for a count likelihood,
negative or non-integer values. :func:`value_summary` and :func:`merge_value_summaries` compute the same facts chunk by
chunk, so that an out-of-core file (:mod:`cellvae.data.backed`) gets the same checks and messages as a matrix in
memory. :func:`get_counts` and :func:`counts_source` find the matrix (``X`` or a layer).
"""

from __future__ import annotations

import warnings


import anndata as ad
import numpy as np
import scipy.sparse as sp
from ..errors import CellvaeInputError

__all__ = ['get_counts', 'canonical_sparse', 'sparse_structure_problem', 'counts_source', 'is_count_matrix', 'check_values', 'value_summary', 'merge_value_summaries', 'raise_for_values']



_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_EXACT = float(2**24)  # every integer up to this is exact in float32


# ------------------------------------------------------------------------------------------- checking
def get_counts(adata: ad.AnnData, layer: str | None = None):
    """The matrix the model is fitted on: ``adata.layers[layer]`` or ``adata.X`` (n_cells, n_genes), in memory; a
    sparse matrix is checked and made canonical (:func:`canonical_sparse`; the AnnData is not modified).

    Raises:
        CellvaeInputError: a missing layer, no ``X``, or a sparse matrix whose structure is invalid.
    """
    X = _in_memory(counts_source(adata, layer))
    return canonical_sparse(X, f"layers[{layer!r}]" if layer else "X") if sp.issparse(X) else X


def sparse_structure_problem(indptr: np.ndarray, indices: np.ndarray | None, n_major: int, n_minor: int,
                             minor: str = "columns", nnz: int | None = None) -> str | None:
    """What is wrong with the structure of a compressed sparse matrix (CSR: rows major), or None when it is valid:
    ``indptr`` of ``n_major + 1`` entries starting at 0, never decreasing and ending at the number of stored values
    (``nnz``, default ``len(indices)``), and every index in ``[0, n_minor)`` (not checked when ``indices`` is None:
    a file read in chunks checks them chunk by chunk). Duplicated or unsorted indices are valid here (see
    :func:`canonical_sparse`)."""
    indptr = np.asarray(indptr)
    nnz = len(indices) if nnz is None else int(nnz)
    if indptr.ndim != 1 or len(indptr) != n_major + 1:
        return f"indptr has {indptr.size} entries, not {n_major + 1} (one more than the rows)"
    if indptr[0] != 0:
        return f"indptr starts at {indptr[0]}, not 0"
    if len(indptr) > 1 and (np.diff(indptr) < 0).any():
        return f"indptr decreases (first at row {int(np.argmax(np.diff(indptr) < 0))})"
    if indptr[-1] != nnz:
        return f"indptr ends at {indptr[-1]}, but {nnz} values are stored"
    if indices is not None and len(indices) and (indices.min() < 0 or indices.max() >= n_minor):
        bad = int(np.flatnonzero((indices < 0) | (indices >= n_minor))[0])
        return f"index {indices[bad]} (stored value {bad}) is outside [0, {n_minor}) for {n_minor} {minor}"
    return None


def canonical_sparse(X, where: str = "X"):
    """``X`` (scipy sparse) checked and in canonical form: CSR or CSC with sorted indices and no duplicates.

    A structure that would let counts land in other cells or outside the matrix (indices out of range, a bad
    ``indptr``) is refused. Duplicated entries are summed (scipy's ``sum_duplicates``, the value a dense copy would
    have) on a copy, with a ``UserWarning`` naming how many; unsorted indices are sorted on a copy. The input is
    never changed.

    Raises:
        CellvaeInputError: an invalid structure, naming ``where`` and the problem.
    """
    if X.format not in ("csr", "csc"):
        return sp.csr_matrix(X)  # COO and others: converting sums duplicates and checks the coordinates
    n_major, n_minor = X.shape if X.format == "csr" else X.shape[::-1]
    problem = sparse_structure_problem(X.indptr, X.indices, n_major, n_minor,
                                       "columns" if X.format == "csr" else "rows")
    if problem is None and len(X.data) != len(X.indices):
        problem = f"{len(X.data)} stored values but {len(X.indices)} indices"
    if problem:
        raise CellvaeInputError(
            f"{where} is not a valid {X.format.upper()} sparse matrix of shape {X.shape}: {problem}. The file was "
            "written wrongly (e.g. by hand with h5py); write it again from a valid matrix (scipy.sparse.csr_matrix "
            "checks this: m.check_format(full_check=True))."
        )
    if X.has_canonical_format:
        return X
    X = X.copy()
    n0 = X.nnz
    X.sum_duplicates()  # sorts the indices too
    if X.nnz < n0:
        warnings.warn(f"{where} stores {n0 - X.nnz} duplicated entries (the same row and column twice); they were "
                      "summed, as scipy and a dense copy do.", UserWarning, stacklevel=3)
    return X


def counts_source(adata: ad.AnnData, layer: str | None = None):
    """``adata.layers[layer]`` or ``adata.X`` as stored: for a backed AnnData (``backed="r"``) the on-disk
    dataset, not read into memory (see :mod:`cellvae.backed`); otherwise the in-memory matrix.

    Raises:
        CellvaeInputError: a missing layer, or no ``X``.
    """
    if layer is not None:
        if layer not in adata.layers:
            layers = list(adata.layers.keys())
            fix = ("Pass layer=... (--layer) with one of them, or omit it to use X." if layers else
                   "Omit layer (--layer) to use X, or store the raw counts first: adata.layers[...] = counts.")
            raise CellvaeInputError(f"Layer {layer!r} not found; available layers: {layers or 'none'}. {fix}")
        return adata.layers[layer]
    if adata.X is None:
        raise CellvaeInputError("adata.X is empty; pass the layer holding raw counts (layer=... / --layer).")
    return adata.X


def _in_memory(X):
    """A backed matrix (``ad.read_h5ad(..., backed="r")``: an h5py dataset or anndata's sparse dataset) read into
    memory; in-memory matrices unchanged. Training visits every cell each epoch, so the counts are read once."""
    if hasattr(X, "to_memory"):  # anndata's backed CSR/CSC dataset
        return X.to_memory()
    if type(X).__module__.startswith("h5py"):  # backed dense X
        return X[()]
    return X


def _values(X) -> np.ndarray:
    if sp.issparse(X):
        return X.data if X.format in ("csr", "csc") else X.tocsr().data  # COO: duplicates summed first
    return np.asarray(X)


def _non_integer(v: np.ndarray) -> np.ndarray:
    return np.abs(v - np.round(v)) > 1e-6 * np.maximum(1.0, np.abs(v))


def is_count_matrix(X) -> bool:
    """True when every value of ``X`` (dense or sparse) is a non-negative integer (up to 1e-6 relative)."""
    v = _values(X)
    return bool(v.size == 0 or (v.min() >= 0 and not _non_integer(v).any()))


def check_values(X, count_likelihood: bool, where: str = "X") -> None:
    """Check a data matrix before training.

    Args:
        X: (n_cells, n_genes) dense or sparse.
        count_likelihood: True for zinb/nb/poisson/zip: values must be non-negative integers.
        where: name of the matrix, for messages.

    Raises:
        CellvaeInputError: a dtype other than integers or floats; NaN or inf anywhere; values beyond the float32
            range; negative or non-integer values for a count likelihood.
    """
    raise_for_values(value_summary(_values(X), integers=count_likelihood), count_likelihood, where)


def value_summary(v: np.ndarray, integers: bool = True) -> dict:
    """What :func:`check_values` needs to know about the values ``v`` (a 1-d or 2-d array), mergeable over
    chunks with :func:`merge_value_summaries`: dtype, size, number of NaN/inf, min, max and (with ``integers``)
    the number of non-integer values and the first three of them."""
    out = {"dtype": v.dtype, "size": int(v.size), "n_nonfinite": 0, "min": None, "max": None,
           "n_nonint": 0, "nonint": []}
    if not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)) or not v.size:
        return out
    if np.issubdtype(v.dtype, np.floating):
        out["n_nonfinite"] = int((~np.isfinite(v)).sum())
        if out["n_nonfinite"]:
            return out
    out["min"], out["max"] = v.min(), v.max()
    if integers and np.issubdtype(v.dtype, np.floating):
        frac = _non_integer(v)
        out["n_nonint"] = int(frac.sum())
        out["nonint"] = list(v[frac][:3]) if out["n_nonint"] else []
    return out


def merge_value_summaries(a: dict | None, b: dict) -> dict:
    """The :func:`value_summary` of two chunks together (``a`` None: ``b``)."""
    if a is None:
        return dict(b)
    out = dict(a)
    if not (np.issubdtype(out["dtype"], np.integer) or np.issubdtype(out["dtype"], np.floating)):
        return out  # the first (non-numeric) dtype is what is reported
    out["size"] += b["size"]
    out["n_nonfinite"] += b["n_nonfinite"]
    for key, pick in (("min", min), ("max", max)):
        vals = [x for x in (a[key], b[key]) if x is not None]
        out[key] = pick(vals) if vals else None
    out["n_nonint"] += b["n_nonint"]
    out["nonint"] = (a["nonint"] + b["nonint"])[:3]
    return out


def raise_for_values(summary: dict, count_likelihood: bool, where: str = "X") -> None:
    """Raise :func:`check_values`' error for a :func:`value_summary` (of a whole matrix, or merged over chunks).

    Raises:
        CellvaeInputError: as :func:`check_values`.
    """
    dtype = summary["dtype"]
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise CellvaeInputError(
            f"{where} has dtype {dtype}, not integer or floating point numbers. Store the counts as numbers "
            f"(e.g. adata.X = adata.X.astype('float32') if they are numbers held as {dtype}), or pass the layer "
            "that holds them."
        )
    if summary["n_nonfinite"]:
        raise CellvaeInputError(
            f"{where} contains {summary['n_nonfinite']} NaN or infinite values; remove or fix those cells/genes "
            "first."
        )
    vmin, vmax = summary["min"], summary["max"]
    big = max(abs(float(vmax)), abs(float(vmin))) if summary["size"] else 0.0
    if big > _FLOAT32_MAX:
        raise CellvaeInputError(
            f"{where} contains values beyond the float32 range (max |x| {big:g} > 3.4e38), which "
            "training cannot represent; these are not counts: fix or remove them."
        )
    if not count_likelihood:
        return
    if summary["size"] and vmin < 0:
        raise CellvaeInputError(
            f"{where} contains negative values (min {vmin:g}): a count likelihood needs raw counts. "
            "Pass the raw-count layer (layer=... / --layer counts) or use gene_likelihood='normal'."
        )
    if summary["size"] and float(vmax) > _FLOAT32_EXACT:
        raise CellvaeInputError(
            f"{where} contains counts above 2^24 = 16,777,216 (max {float(vmax):.10g}), which float32, the precision "
            "cellvae computes in, cannot hold exactly. One gene in one cell does not reach that many UMIs: check "
            "that these are raw counts (not summed over cells, scaled or corrupted), or divide them if the scale is "
            "intended."
        )
    if summary["n_nonint"]:
        ex = summary["nonint"]
        raise CellvaeInputError(
            f"{where} contains non-integer values (e.g. {', '.join(f'{e:g}' for e in ex)}): a count likelihood "
            "needs raw counts, not normalized or log-transformed data. Pass the raw-count layer "
            "(layer=... / --layer counts) or use gene_likelihood='normal' (--gene-likelihood normal)."
        )


