"""Preprocessing on raw counts: highly variable genes (scanpy's ``seurat_v3``) and log1p normalisation
(``normalize_total`` to 10,000 + ``log1p``), on copies: the AnnData passed in is not modified.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp
from ..errors import CellvaeInputError
from .checks import get_counts
from .obs import categories

__all__ = ['select_highly_variable_genes', 'log1p_cp10k']



def select_highly_variable_genes(
    adata: ad.AnnData, n_top_genes: int, layer: str | None = None, batch_key: str | None = None
) -> np.ndarray:
    """Highly variable genes on raw counts with scanpy's ``seurat_v3`` flavour (Stuart et al. 2019).

    Works on a copy of the matrix; ``adata`` is not modified. When the flavour's loess fit fails (it can be singular
    when many genes are (nearly) undetected), the selection is retried on the genes detected in at least 3 cells,
    with a ``UserWarning``; other genes are then never selected.

    Args:
        adata: (n_cells, n_genes) raw counts in ``X`` or ``layer``.
        n_top_genes: number of genes to select; at least n_genes selects every gene.
        layer: layer holding the counts (default ``X``).
        batch_key: obs column for scanpy's per-batch selection.

    Returns:
        Boolean mask over genes, shape (n_genes,).

    Raises:
        CellvaeInputError: the fit fails even on the detected genes (too few cells or genes for a loess fit), or at
            most ``n_top_genes`` genes are detected in 3 cells; the message says to select fewer genes or none.
    """
    import scanpy as sc

    if n_top_genes >= adata.n_vars:
        return np.ones(adata.n_vars, dtype=bool)
    if batch_key is not None:
        categories(adata, batch_key, "batch_key")  # missing values: the model's message, before scanpy trips
    X = get_counts(adata, layer)
    _check_loess_points(X, adata.obs[batch_key].astype(str).to_numpy() if batch_key else None, n_top_genes)
    tmp = ad.AnnData(X=X, obs=adata.obs[[batch_key]] if batch_key else None)
    tmp.var_names = adata.var_names
    try:
        df = sc.pp.highly_variable_genes(
            tmp, flavor="seurat_v3", n_top_genes=int(n_top_genes), batch_key=batch_key, inplace=False
        )
        return np.asarray(df["highly_variable"], dtype=bool)
    except (ValueError, np.linalg.LinAlgError) as err:  # seurat_v3's loess fit can be singular (many undetected genes)
        detected = np.asarray((X > 0).sum(0)).ravel() >= 3
        if detected.sum() <= n_top_genes or detected.all() or getattr(err, "_cellvae_retry", False):
            msg = err.args[0].decode(errors="replace") if err.args and isinstance(err.args[0], bytes) else str(err)
            raise CellvaeInputError(
                f"Selecting {n_top_genes} highly variable genes (scanpy seurat_v3) failed: its loess fit of mean "
                f"against variance is singular on these data ({msg.strip()[:150]}; {adata.n_obs} cells, "
                f"{int(detected.sum())} genes detected in at least 3 cells). Select fewer genes (--n-top-genes) or "
                "none (drop the option), or filter the data first."
            ) from None
        warnings.warn(f"seurat_v3 highly variable genes failed ({err}); retrying on the {int(detected.sum())} "
                      "genes detected in at least 3 cells.", stacklevel=2)
        mask = np.zeros(adata.n_vars, dtype=bool)
        try:
            sub = select_highly_variable_genes(tmp[:, detected], n_top_genes, batch_key=batch_key)
        except CellvaeInputError:
            raise
        mask[np.flatnonzero(detected)[sub]] = True
        return mask


MIN_LOESS_GENES = 50  # seurat_v3 needs this many genes that vary (in every batch) for its loess fit


def _check_loess_points(X, batches, n_top_genes: int) -> None:
    """Refuse a seurat_v3 selection whose loess fit would have fewer than :data:`MIN_LOESS_GENES` points (genes
    that are not constant over the cells of a batch): scikit-misc's loess then fails, and on a handful of points it
    can corrupt memory and crash the interpreter (found by ``tests/fuzz_fit.py``: 3 cells x 15 genes).

    Raises:
        CellvaeInputError: too few varying genes or cells in a batch.
    """
    groups = [np.arange(X.shape[0])] if batches is None else [np.flatnonzero(batches == b) for b in np.unique(batches)]
    for rows in groups:
        sub = X[rows]
        if sp.issparse(sub):
            sub = sp.csr_matrix(sub, dtype=np.float64)
            mean = np.asarray(sub.mean(0)).ravel()
            var = np.asarray(sub.multiply(sub).mean(0)).ravel() - mean**2
        else:
            sub = np.asarray(sub, dtype=np.float64)
            var = sub.var(0) if len(rows) else np.zeros(X.shape[1])
        varying = int((var > 1e-12).sum())
        if len(rows) < 2 or varying < MIN_LOESS_GENES:
            where = "" if batches is None else f" in batch {batches[rows[0]]!r}"
            raise CellvaeInputError(
                f"Selecting {n_top_genes} highly variable genes (scanpy seurat_v3) needs at least {MIN_LOESS_GENES} "
                f"genes that vary across cells{where} for its loess fit; there are {varying} ({len(rows)} cells). "
                "Select no highly variable genes (drop --n-top-genes), or use more cells.")


def log1p_cp10k(X):
    """``log1p(x / total * 1e4)`` per cell (scanpy ``normalize_total`` + ``log1p``), sparse-preserving."""
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        tot = np.asarray(X.sum(1)).ravel()
        tot[tot == 0] = 1.0
        X = sp.csr_matrix(sp.diags((1e4 / tot).astype(np.float32)) @ X)
        np.log1p(X.data, out=X.data)
        return X
    X = np.asarray(X, dtype=np.float32)
    tot = X.sum(1, keepdims=True)
    tot[tot == 0] = 1.0
    return np.log1p(X / tot * 1e4)


