"""Columns of ``adata.obs`` that a model reads (batch, labels, covariates): checked and encoded, with messages that
say which column is wrong and how to fix it (missing values, unseen categories, non-numeric continuous values)."""

from __future__ import annotations

from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from ..errors import CellvaeInputError, warn


# --------------------------------------------------------------------------------------- covariates
def categories(adata: ad.AnnData, key: str, role: str = "obs key") -> list[str]:
    """The categories (as strings, sorted; a categorical column's own order) of ``obs[key]``, with a warning for
    categories of fewer than 3 cells (as scvi-tools' ``setup_anndata``).

    Raises:
        CellvaeInputError: a missing column or missing values (naming ``role``, e.g. ``"batch_key"``).
    """
    col = obs_column(adata, key, role)
    if col.isna().any():
        ex = adata.obs_names[np.flatnonzero(col.isna().to_numpy())[:3]].tolist()
        raise CellvaeInputError(
            f"obs[{key!r}] ({role}) has {int(col.isna().sum())} missing values (e.g. cells {ex}); fill them "
            f"(e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).fillna('unknown')) or drop those cells."
        )
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in col.cat.categories if (col == c).any()]
    else:
        cats = sorted(pd.unique(col.astype(str)).tolist())
    sizes = col.astype(str).value_counts()
    small = [c for c in cats if sizes.get(c, 0) < 3]
    if small:  # as scvi-tools' setup_anndata
        warn(f"obs[{key!r}] ({role}) has categories with fewer than 3 cells: {small[:5]}; the model may not learn "
             "them well. Merge or drop such categories if that matters.")
    return cats


def obs_column(adata: ad.AnnData, key: str, role: str = "obs key") -> pd.Series:
    """``adata.obs[key]``.

    Raises:
        CellvaeInputError: no such column (the message lists the columns).
    """
    if key not in adata.obs.columns:
        raise CellvaeInputError(
            f"obs key {key!r} not found ({role} must be an obs column); available obs columns: "
            f"{list(adata.obs.columns) or 'none'}. Pass one of them, or add the column to adata.obs."
        )
    return adata.obs[key]


def continuous(adata: ad.AnnData, keys: Sequence[str]) -> np.ndarray | None:
    """(n_cells, len(keys)) float32 values of numeric obs columns, or None without keys.

    Raises:
        CellvaeInputError: a missing column, non-numeric, NaN/inf or absurdly large (> 1e30) values.
    """
    """Continuous covariates as a float32 (n_cells, n_keys) array (None without keys).

    Raises:
        CellvaeInputError: a missing key, or NaN, inf or non-numeric values (naming the key and a few cells).
    """
    if not keys:
        return None
    cols = []
    for k in keys:
        col = obs_column(adata, k, "continuous covariate")
        num = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(num)
        if bad.any():
            i = np.flatnonzero(bad)[:3]
            ex = ", ".join(f"cell {adata.obs_names[j]!s}: {col.iloc[j]}" for j in i)
            raise CellvaeInputError(
                f"obs[{k!r}] (continuous covariate) has {int(bad.sum())} NaN, infinite or non-numeric values "
                f"(e.g. {ex}); fix or drop those cells, or pass the column as a categorical covariate if it is one."
            )
        if np.abs(num).max() > 1e30:
            raise CellvaeInputError(f"obs[{k!r}] (continuous covariate) has values beyond 1e30; rescale it.")
        cols.append(num.astype(np.float32))
    return np.stack(cols, axis=1)


def encode(adata: ad.AnnData, key: str, categories: Sequence[str], role: str = "obs key") -> np.ndarray:
    """(n_cells,) int64 codes of ``obs[key]`` in the order of ``categories`` (fixed at training).

    Raises:
        CellvaeInputError: a missing column, missing values, or categories unseen at training.
    """
    col = obs_column(adata, key, role)
    if col.isna().any():
        raise CellvaeInputError(f"obs[{key!r}] ({role}) has {int(col.isna().sum())} missing values; fill them "
                                "(e.g. 'unknown') or drop those cells.")
    values = col.astype(str).to_numpy()
    codes = pd.Index(categories).get_indexer(values)
    if (codes < 0).any():
        unknown = sorted(set(values[codes < 0]))[:5]
        n_unknown = int((codes < 0).sum())
        raise CellvaeInputError(
            f"obs[{key!r}] ({role}) has categories unseen at training time: {unknown} ({n_unknown} cells); the "
            f"model knows {list(categories)}. Rename them to known categories, drop those cells, or train a model "
            "that includes them."
        )
    return codes.astype(np.int64)


