"""Latent-space operations on a trained :class:`cellvae.CountVAE`: interpolation, arithmetic and traversals,
with their figures.

- :func:`interpolate`: decode ``n_steps`` points on the straight line between the latent codes of two cells (or
  the means of two groups of cells), ``z(t) = (1 - t) z_a + t z_b``, ``t`` in [0, 1] (Bowman et al. 2016,
  "Generating sentences from a continuous space"; for single cells e.g. scGen, Lotfollahi et al. 2019).
- :func:`latent_arithmetic`: decode ``z_c + (mean z_plus - mean z_minus)`` for each base cell c (scGen's vector
  arithmetic, Lotfollahi, Wolf & Theis 2019, Nat. Methods 16:715; word2vec-style analogies).
- :func:`latent_traversal`: decode along each latent dimension from -3 to 3 with the others held at 0 (the
  prior mean), the usual view of what a (beta-)VAE dimension encodes (Higgins et al. 2017).
- :func:`plot_interpolation`, :func:`plot_latent_traversal`: matplotlib figures of decoded genes.

Latent codes of cells are posterior means ``E[z | x]`` (:meth:`CountVAE.get_latent_representation`). Decoded
expression is the decoder's ``rho`` (rows sum to 1) times ``library_size`` (default 1e4: counts per 10,000), or
the Gaussian mean in log1p units for a ``"normal"`` likelihood model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ..errors import CellvaeInputError
from .protocol import TrainedModel
from .generate import decode_latent, resolve_covariates


__all__ = ["select_cells", "interpolate", "latent_arithmetic", "latent_traversal", "plot_interpolation",
           "plot_latent_traversal"]


def select_cells(adata: ad.AnnData, cells, what: str = "cells") -> np.ndarray:
    """Positions in ``adata`` of ``cells``: an int position, an obs name, a list/array of positions or obs names,
    or a boolean mask of length ``n_obs``.

    Raises:
        CellvaeInputError: unknown obs names, positions out of range, a mask of the wrong length, or no cells.
    """
    n = adata.n_obs
    if isinstance(cells, (pd.Series, pd.Index)):
        cells = cells.to_numpy()
    if isinstance(cells, (str, np.str_)) or np.isscalar(cells):
        cells = [cells]
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise CellvaeInputError(f"{what}: a boolean mask needs length {n} (n_obs), got {arr.shape}.")
        pos = np.flatnonzero(arr)
    elif np.issubdtype(arr.dtype, np.integer):
        pos = arr.astype(np.int64).ravel()
        if ((pos < -n) | (pos >= n)).any():
            out = pos[(pos < -n) | (pos >= n)][:5]
            raise CellvaeInputError(f"{what}: positions out of range for {n} cells: {out}.")
        pos = np.where(pos < 0, pos + n, pos)
    else:
        names = adata.obs_names.astype(str)
        pos = names.get_indexer(arr.astype(str).ravel())
        if (pos < 0).any():
            raise CellvaeInputError(f"{what}: obs names not found: {list(arr.astype(str).ravel()[pos < 0][:5])}.")
    if len(pos) == 0:
        raise CellvaeInputError(f"{what}: no cells selected.")
    return pos


def _adata(model: TrainedModel, adata: ad.AnnData | None) -> ad.AnnData:
    a = adata if adata is not None else model.adata
    if a is None:
        raise CellvaeInputError("No AnnData attached to the model: pass adata=... .")
    return a


def _latent(model: TrainedModel, adata: ad.AnnData, pos: np.ndarray) -> np.ndarray:
    """Posterior means (len(pos), n_latent) of the cells at ``pos`` of ``adata``."""
    sub = adata[np.sort(np.unique(pos))]
    z = model.get_latent_representation(sub)
    order = {p: i for i, p in enumerate(np.sort(np.unique(pos)))}
    return z[[order[p] for p in pos]].astype(np.float64)


def _result(model: TrainedModel, X: np.ndarray, z: np.ndarray, obs: pd.DataFrame, uns_key: str, uns: dict,
            library_size: float) -> ad.AnnData:
    out = ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(model.spec.gene_names)))
    out.obsm["X_cellvae"] = z.astype(np.float32)
    unit = ("log1p-normalized (Gaussian mean)" if not model.module.likelihood.models_counts
            else f"rho * {library_size:g} (normalized expression)")
    out.uns[uns_key] = {**uns, "X": unit}
    return out


def interpolate(
    model: TrainedModel,
    cells_a,
    cells_b,
    n_steps: int = 10,
    adata: ad.AnnData | None = None,
    covariates: Mapping | None = None,
    library_size: float = 1e4,
) -> ad.AnnData:
    """Decode the straight latent path between two cells or the means of two groups of cells.

    Args:
        model: a trained CountVAE.
        cells_a, cells_b: endpoints: a cell (position or obs name) or several (list of positions/names, or a
            boolean mask): the endpoint is then the mean of their posterior means.
        n_steps: points on the path, including both endpoints (>= 2); ``t = linspace(0, 1, n_steps)``.
        adata: AnnData holding the cells (default: the model's training AnnData).
        covariates: covariates to decode with (``{obs_key: category}``; default the most frequent training
            category), see :func:`cellvae.generate.resolve_covariates`.
        library_size: scale of the decoded ``rho`` (1e4: counts per 10,000).

    Returns:
        AnnData (n_steps, n_genes): ``X`` decoded normalized expression, ``obs["t"]`` in [0, 1],
        ``obsm["X_cellvae"]`` the latent points (n_steps, n_latent), ``uns["cellvae_interpolation"]``.
        Row 0 is the decoding of ``z_a`` and row ``n_steps - 1`` that of ``z_b``.
    """
    if int(n_steps) < 2:
        raise CellvaeInputError(f"n_steps must be >= 2, got {n_steps}.")
    a = _adata(model, adata)
    pa, pb = select_cells(a, cells_a, "cells_a"), select_cells(a, cells_b, "cells_b")
    za, zb = _latent(model, a, pa).mean(0), _latent(model, a, pb).mean(0)
    t = np.linspace(0.0, 1.0, int(n_steps))
    z = (1 - t)[:, None] * za[None] + t[:, None] * zb[None]
    X = decode_latent(model, z, covariates=covariates, library_size=library_size)
    _, values = resolve_covariates(model, covariates)
    obs = pd.DataFrame({"t": t}, index=pd.Index([f"step_{i}" for i in range(len(t))]))
    return _result(model, X, z, obs, "cellvae_interpolation",
                   {"n_a": int(len(pa)), "n_b": int(len(pb)), "covariates": dict(values)}, library_size)


def latent_arithmetic(
    model: TrainedModel,
    adata: ad.AnnData | None = None,
    base=None,
    plus=None,
    minus=None,
    library_size: float = 1e4,
) -> ad.AnnData:
    """Decode ``z_c + (mean_{plus} z - mean_{minus} z)`` for every base cell c (scGen-style arithmetic).

    Example: ``latent_arithmetic(model, adata, base=type_c_ctrl, plus=type_b_stim, minus=type_b_ctrl)``
    predicts stimulated type-c cells from the stimulation vector of type b.

    Args:
        model: a trained CountVAE.
        adata: AnnData holding the cells (default: the model's training AnnData).
        base: the cells to shift (selection as in :func:`select_cells`).
        plus, minus: the groups whose mean latent codes define the shift ``delta = mean(plus) - mean(minus)``.
        library_size: scale of the decoded ``rho`` (1e4: counts per 10,000).

    Returns:
        AnnData (n_base, n_genes): ``X`` decoded normalized expression of the shifted codes, each decoded with
        the base cell's own covariates; ``obs`` copied from the base cells; ``obsm["X_cellvae"]`` the shifted
        codes; ``uns["cellvae_latent_arithmetic"]["delta"]`` (n_latent,).
    """
    if base is None or plus is None or minus is None:
        raise CellvaeInputError("latent_arithmetic needs base, plus and minus cells.")
    a = _adata(model, adata)
    pc = select_cells(a, base, "base")
    zp = _latent(model, a, select_cells(a, plus, "plus")).mean(0)
    zm = _latent(model, a, select_cells(a, minus, "minus")).mean(0)
    delta = zp - zm
    zc = _latent(model, a, pc) + delta[None]
    sub = a[pc]
    data = model.spec.prepare(sub)
    X = decode_latent(model, zc, library_size=library_size, cat=data.cat, cont=data.cont)
    obs = sub.obs.copy()
    obs.index = obs.index.astype(str)
    if not obs.index.is_unique:
        obs.index = pd.Index([f"{n}-{i}" for i, n in enumerate(obs.index)])
    return _result(model, X, zc, obs, "cellvae_latent_arithmetic", {"delta": delta.astype(np.float32)},
                   library_size)


def latent_traversal(
    model: TrainedModel,
    dims: Sequence[int] | None = None,
    n_steps: int = 13,
    limit: float = 3.0,
    covariates: Mapping | None = None,
    library_size: float = 1e4,
) -> ad.AnnData:
    """Decode along each latent dimension from ``-limit`` to ``limit`` (prior standard deviations), the other
    dimensions held at 0 (the prior mean).

    Returns:
        AnnData (len(dims) * n_steps, n_genes): ``X`` decoded normalized expression, ``obs["dim"]`` (int),
        ``obs["value"]`` (the value of that dimension), ``obsm["X_cellvae"]`` the codes.
    """
    n_latent = model.module.n_latent
    dims = list(range(n_latent)) if dims is None else [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < n_latent]
    if bad:
        raise CellvaeInputError(f"dims {bad} out of range for n_latent={n_latent}.")
    vals = np.linspace(-float(limit), float(limit), int(n_steps))
    z = np.zeros((len(dims) * len(vals), n_latent))
    rows_dim, rows_val = [], []
    for i, d in enumerate(dims):
        z[i * len(vals):(i + 1) * len(vals), d] = vals
        rows_dim += [d] * len(vals)
        rows_val += list(vals)
    X = decode_latent(model, z, covariates=covariates, library_size=library_size)
    obs = pd.DataFrame({"dim": rows_dim, "value": rows_val},
                       index=pd.Index([f"dim{d}_{j}" for d in dims for j in range(len(vals))]))
    return _result(model, X, z, obs, "cellvae_latent_traversal", {"limit": float(limit)}, library_size)


# ------------------------------------------------------------------------------------------------ figures
def plot_interpolation(ad_path: ad.AnnData, genes: Sequence[str], path: str | Path | None = None, log1p: bool = True):
    """Decoded expression of ``genes`` along an interpolation path (output of :func:`interpolate`).

    Args:
        ad_path: AnnData with ``obs["t"]``.
        genes: genes to draw (var names).
        path: save the figure there (PNG) when given.
        log1p: draw ``log1p`` of the decoded expression (counts per 10k by default).

    Returns:
        matplotlib Figure.
    """
    from ..plot import plt, save_figure

    genes = list(genes)
    missing = [g for g in genes if g not in ad_path.var_names]
    if missing:
        raise CellvaeInputError(f"Genes not in the path AnnData: {missing[:5]}.")
    X = ad_path[:, genes].X
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=float)
    t = ad_path.obs["t"].to_numpy(float)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for j, g in enumerate(genes):
        ax.plot(t, np.log1p(X[:, j]) if log1p else X[:, j], marker="o", ms=3, label=g)
    ax.set_xlabel("t (0 = cells_a, 1 = cells_b)")
    ax.set_ylabel("log1p(decoded expression)" if log1p else "decoded expression")
    ax.legend(fontsize=7, ncol=2 if len(genes) > 6 else 1)
    ax.set_title("Latent interpolation")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_latent_traversal(ad_trav: ad.AnnData, n_genes: int = 5, path: str | Path | None = None, ncols: int = 5):
    """One panel per latent dimension: ``log1p`` decoded expression of the ``n_genes`` genes that vary most
    (largest range of log1p expression) along that dimension's traversal (output of :func:`latent_traversal`).

    Returns:
        matplotlib Figure (saved as PNG to ``path`` when given).
    """
    from ..plot import plt, save_figure

    X = np.asarray(ad_trav.X, dtype=float)
    L = np.log1p(np.clip(X, 0, None)) if X.min() >= 0 else X
    dims = list(dict.fromkeys(ad_trav.obs["dim"].tolist()))
    ncols = min(ncols, len(dims))
    nrows = int(np.ceil(len(dims) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for k, d in enumerate(dims):
        ax = axes[k // ncols][k % ncols]
        rows = np.flatnonzero(ad_trav.obs["dim"].to_numpy() == d)
        v = ad_trav.obs["value"].to_numpy(float)[rows]
        rng = L[rows].max(0) - L[rows].min(0)
        top = np.argsort(-rng, kind="stable")[:n_genes]
        for g in top:
            ax.plot(v, L[rows, g], label=str(ad_trav.var_names[g]))
        ax.set_title(f"z[{d}]", fontsize=9)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    for k in range(len(dims), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.supxlabel("latent value (others at 0)")
    fig.supylabel("log1p(decoded expression)")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
