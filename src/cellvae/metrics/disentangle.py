"""Disentanglement of a latent space with respect to known discrete factors.

Mutual information gap (MIG; Chen, Li, Grosse & Duvenaud 2018, "Isolating sources of disentanglement in
variational autoencoders", NeurIPS, Eq. 6): for each factor ``v_k`` (e.g. cell type, batch, condition),

    MIG_k = (I(z_{j(k)}; v_k) - max_{j != j(k)} I(z_j; v_k)) / H(v_k),   j(k) = argmax_j I(z_j; v_k),

and MIG is the mean over factors. Mutual information is estimated as in disentanglement_lib (Locatello et al.
2019): each latent dimension is discretized into ``n_bins`` equal-width bins over its range, and ``I`` is the
plug-in (empirical) mutual information of the discrete variables, in nats; ``H(v_k)`` is the empirical entropy
of the factor. MIG lies in [0, 1]: 1 when one dimension alone carries all information about a factor and no
other dimension carries any; near 0 when the information is spread over dimensions (or absent).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

__all__ = ["discretize_latent", "latent_factor_mutual_info", "mutual_information_gap"]


def discretize_latent(latent: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Bin each column of ``latent`` (n_cells, n_latent) into ``n_bins`` equal-width bins over its range.

    Returns:
        int64 array (n_cells, n_latent) of bin codes in ``[0, n_bins)`` (a constant column is all 0).
    """
    Z = np.asarray(latent, dtype=np.float64)
    if Z.ndim != 2:
        raise ValueError(f"latent must be 2-D (n_cells, n_latent), got shape {Z.shape}.")
    if not np.isfinite(Z).all():
        raise ValueError("latent holds NaN or inf values.")
    out = np.zeros(Z.shape, dtype=np.int64)
    for j in range(Z.shape[1]):
        edges = np.histogram_bin_edges(Z[:, j], bins=int(n_bins))
        out[:, j] = np.clip(np.digitize(Z[:, j], edges[1:-1]), 0, int(n_bins) - 1)
    return out


def _factor_table(factors, n: int) -> pd.DataFrame:
    if isinstance(factors, pd.DataFrame):
        df = factors
    elif isinstance(factors, Mapping):
        df = pd.DataFrame({str(k): np.asarray(v) for k, v in factors.items()})
    else:
        arr = np.asarray(factors)
        arr = arr.reshape(-1, 1) if arr.ndim == 1 else arr
        df = pd.DataFrame(arr, columns=[f"factor_{i}" for i in range(arr.shape[1])])
    if len(df) != n:
        raise ValueError(f"factors have {len(df)} rows but the latent has {n} cells.")
    return df


def latent_factor_mutual_info(latent: np.ndarray, factors, n_bins: int = 20) -> tuple[pd.DataFrame, pd.Series]:
    """Mutual information (nats) between each discretized latent dimension and each discrete factor.

    Args:
        latent: (n_cells, n_latent) float array.
        factors: a DataFrame (e.g. ``adata.obs[["cell_type", "batch"]]``), a mapping name -> (n_cells,) array,
            or an (n_cells,) / (n_cells, n_factors) array of discrete values. Rows with a missing value of a
            factor are left out for that factor.
        n_bins: bins per latent dimension.

    Returns:
        ``(mi, entropy)``: DataFrame (n_latent, n_factors) of ``I(z_j; v_k)`` and Series (n_factors,) of
        ``H(v_k)``, nats.
    """
    from sklearn.metrics import mutual_info_score

    Zd = discretize_latent(latent, n_bins)
    df = _factor_table(factors, Zd.shape[0])
    mi = pd.DataFrame(0.0, index=[f"z{j}" for j in range(Zd.shape[1])], columns=[str(c) for c in df.columns])
    ent = pd.Series(0.0, index=mi.columns)
    for c, col in zip(mi.columns, df.columns):
        v = df[col]
        ok = ~pd.isna(v).to_numpy()
        codes = pd.factorize(v[ok].astype(str))[0]
        p = np.bincount(codes) / len(codes) if len(codes) else np.array([1.0])
        ent[c] = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        for j in range(Zd.shape[1]):
            mi.iloc[j, mi.columns.get_loc(c)] = mutual_info_score(codes, Zd[ok, j]) if len(codes) else 0.0
    return mi, ent


def mutual_information_gap(latent: np.ndarray, factors, n_bins: int = 20) -> dict:
    """Mutual information gap (MIG, Chen et al. 2018) of a latent space for known discrete factors.

    Args:
        latent: (n_cells, n_latent) float array (e.g. ``model.get_latent_representation()``); at least 2
            dimensions.
        factors: as in :func:`latent_factor_mutual_info` (e.g. ``adata.obs[["cell_type", "batch"]]``).
        n_bins: equal-width bins per latent dimension (20, as disentanglement_lib).

    Returns:
        dict with ``"mig"`` (float in [0, 1], mean over factors with more than one level), ``"per_factor"``
        (factor -> normalized gap), ``"best_dim"`` (factor -> index of the most informative dimension),
        ``"mutual_info"`` (DataFrame (n_latent, n_factors), nats) and ``"entropy"`` (Series, nats).
        A factor with a single level (zero entropy) gets NaN and is left out of the mean.

    Raises:
        ValueError: a latent that is not (n_cells, >= 2) or holds NaN/inf, or factors whose length is not n_cells.
    """
    Z = np.asarray(latent)
    if Z.ndim != 2 or Z.shape[1] < 2:
        raise ValueError(f"MIG needs a latent of shape (n_cells, >= 2), got {Z.shape}.")
    mi, ent = latent_factor_mutual_info(Z, factors, n_bins)
    per, best = {}, {}
    for c in mi.columns:
        col = np.sort(mi[c].to_numpy())[::-1]
        best[c] = int(np.argmax(mi[c].to_numpy()))
        per[c] = float((col[0] - col[1]) / ent[c]) if ent[c] > 0 else float("nan")
    vals = [v for v in per.values() if np.isfinite(v)]
    return {"mig": float(np.mean(vals)) if vals else float("nan"), "per_factor": per, "best_dim": best,
            "mutual_info": mi, "entropy": ent}
