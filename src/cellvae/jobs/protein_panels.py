"""The protein part of ``cellvae fit`` on CITE-seq data (a joint :class:`cellvae.RNAProteinVAE`): the denoised
protein and foreground probability in the output AnnData, and the report's protein panels.

Panels (PNG files in ``figures/``):

- ``protein_umap.png``: the UMAP of the joint latent space colored by each protein's denoised expression (``log1p``
  of the foreground intensity ``(1 - pi) alpha beta``, counts), for up to :data:`MAX_PROTEINS` proteins;
- ``protein_raw_vs_denoised.png``: per cell type (``--labels-key``, else the Leiden clusters), the mean ``log1p``
  raw counts next to the mean ``log1p`` denoised expression of each protein, each protein scaled to its own range:
  the background that the model removes shows as the raw signal in types where the denoised one vanishes;
- ``protein_foreground_probability.png``: the mean foreground probability ``1 - pi`` of each protein per cell type.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ..data.fileio import plain
from ..data.protein import isotype_controls
from .report import html_table

__all__ = ["MAX_PROTEINS", "PROTEIN_DENOISED_KEY", "PROTEIN_FOREGROUND_KEY", "annotate_proteins", "protein_figures",
           "protein_section"]

MAX_PROTEINS = 12
PROTEIN_DENOISED_KEY = "cellvae_protein_denoised"  # obsm: (n_cells, n_proteins) foreground intensity, counts
PROTEIN_FOREGROUND_KEY = "cellvae_protein_foreground_probability"  # obsm: (n_cells, n_proteins) in [0, 1]
FIGURES = ("protein_umap.png", "protein_raw_vs_denoised.png", "protein_foreground_probability.png")


def annotate_proteins(res: ad.AnnData, vae) -> None:
    """Add the denoised protein (``obsm['cellvae_protein_denoised']``, counts: the foreground intensity at the
    posterior mean) and the foreground probability (``obsm['cellvae_protein_foreground_probability']``) of every
    cell of ``res`` (the model's cells, in order) as DataFrames, proteins as columns."""
    _, denoised = vae.get_normalized_expression()
    fg = vae.get_protein_foreground_probability()
    res.obsm[PROTEIN_DENOISED_KEY] = pd.DataFrame(denoised.to_numpy(), index=res.obs_names, columns=denoised.columns)
    res.obsm[PROTEIN_FOREGROUND_KEY] = pd.DataFrame(fg.to_numpy(), index=res.obs_names, columns=fg.columns)


def _shown(res: ad.AnnData) -> list[str]:
    """Up to :data:`MAX_PROTEINS` proteins: all when few, else the most variable denoised ones (isotype controls
    last)."""
    den = res.obsm[PROTEIN_DENOISED_KEY]
    names = list(den.columns)
    if len(names) <= MAX_PROTEINS:
        return names
    iso = set(isotype_controls(names))
    var = np.log1p(den.to_numpy()).var(0)
    order = sorted(range(len(names)), key=lambda i: (names[i] in iso, -var[i]))
    return [names[i] for i in order[:MAX_PROTEINS]]


def _group_means(values: np.ndarray, groups: np.ndarray, levels: list[str]) -> np.ndarray:
    return np.stack([values[groups == g].mean(0) for g in levels])


def _heatmap(ax, mat: np.ndarray, rows: list[str], cols: list[str], title: str, vmin=None, vmax=None,
             cmap: str = "viridis", label: str = ""):
    im = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label(label, fontsize=8)


def protein_figures(res: ad.AnnData, protein_key: str, group_key: str | None, embed: bool,
                    fig_dir: Path) -> list[tuple[Path, str]]:
    """The protein panels (module docstring) as (PNG path, caption) pairs for :func:`cellvae.jobs.report.
    render_report`. ``res`` holds the raw counts in ``obsm[protein_key]``, the outputs of :func:`annotate_proteins`
    and, with ``embed``, ``obsm['X_umap']``; ``group_key`` is the obs column of the cell types (None: no per-type
    panels)."""
    import matplotlib.pyplot as plt

    from ..plot import save_figure

    shown = _shown(res)
    den = np.log1p(res.obsm[PROTEIN_DENOISED_KEY][shown].to_numpy())
    raw_df = res.obsm[protein_key]
    raw = np.log1p(np.nan_to_num(np.asarray(raw_df[shown] if isinstance(raw_df, pd.DataFrame)
                                            else raw_df, dtype=np.float64)))
    fgp = res.obsm[PROTEIN_FOREGROUND_KEY][shown].to_numpy()
    figures = []
    if embed and "X_umap" in res.obsm:
        u = np.asarray(res.obsm["X_umap"])
        nc = 4
        nr = int(np.ceil(len(shown) / nc))
        fig, axes = plt.subplots(nr, nc, figsize=(3.2 * nc, 3.0 * nr), squeeze=False)
        order = np.random.default_rng(0).permutation(len(u))
        for i, ax in enumerate(axes.ravel()):
            ax.axis("off")
            if i >= len(shown):
                continue
            v = den[:, i]
            sc = ax.scatter(u[order, 0], u[order, 1], c=v[order], s=2, cmap="viridis", rasterized=True,
                            vmin=np.percentile(v, 1), vmax=np.percentile(v, 99))
            ax.set_title(shown[i], fontsize=10)
            fig.colorbar(sc, ax=ax, fraction=0.04, pad=0.01)
        fig.suptitle("Denoised protein, log1p(foreground intensity), on the UMAP of the joint latent space")
        fig.tight_layout()
        figures.append((save_figure(fig, fig_dir / FIGURES[0]),
                        f"Protein overlays ({len(shown)} proteins): denoised protein expression, log1p of the "
                        "foreground intensity (1 - pi) alpha beta in counts, on the UMAP of the joint latent space."))
    if group_key is not None and group_key in res.obs.columns:
        groups = res.obs[group_key].astype(str).to_numpy()
        levels = [g for g in pd.unique(groups) if (groups == g).sum() >= 3]
        levels = sorted(levels, key=lambda g: -(groups == g).sum())[:30]
        mr, md = _group_means(raw, groups, levels), _group_means(den, groups, levels)

        def scaled(m):
            lo, hi = m.min(0), m.max(0)
            return (m - lo) / np.where(hi > lo, hi - lo, 1.0)

        fig, ax = plt.subplots(1, 2, figsize=(2 + 0.9 * len(shown), 1.5 + 0.32 * len(levels)), sharey=True)
        _heatmap(ax[0], scaled(mr), levels, shown, "raw: mean log1p counts", 0, 1, label="scaled per protein")
        _heatmap(ax[1], scaled(md), levels, shown, "denoised: mean log1p foreground", 0, 1,
                 label="scaled per protein")
        fig.tight_layout()
        figures.append((save_figure(fig, fig_dir / FIGURES[1]),
                        f"Raw against denoised protein per {group_key}: mean log1p raw counts (left) and mean log1p "
                        "denoised expression (right), each protein scaled to its own range over the types; signal "
                        "that is raw only is background the model removed."))
        fig, ax = plt.subplots(figsize=(1.5 + 0.55 * len(shown), 1.5 + 0.32 * len(levels)))
        _heatmap(ax, _group_means(fgp, groups, levels), levels, shown, "mean foreground probability 1 - pi", 0, 1,
                 cmap="magma", label="probability")
        fig.tight_layout()
        figures.append((save_figure(fig, fig_dir / FIGURES[2]),
                        f"Protein foreground probability (1 - pi: the probability that the counts come from protein "
                        f"on the cell rather than background), mean per {group_key}."))
    return figures


def protein_section(vae, res: ad.AnnData, metrics: dict) -> tuple[str, str]:
    """The report section on the proteins: the panel, the masked proteins, the background prior, and per protein
    the mean raw and denoised counts and the share of cells with foreground probability above 0.5."""
    den = res.obsm[PROTEIN_DENOISED_KEY]
    fgp = res.obsm[PROTEIN_FOREGROUND_KEY]
    raw_df = res.obsm[vae.spec.protein_key]
    raw = pd.DataFrame(np.nan_to_num(np.asarray(raw_df[den.columns] if isinstance(raw_df, pd.DataFrame)
                                                else raw_df, dtype=np.float64)), columns=den.columns)
    rows = [[p, float(raw[p].mean()), float(den[p].mean()), float((fgp[p] > 0.5).mean())] for p in den.columns]
    info = plain(vae.protein_info)
    masked = info.get("masked") or {}
    head = (f"<p class=muted>{len(den.columns)} proteins modelled with the RNA in one latent space (totalVI class, "
            f"Gayoso et al. 2021). Background prior started from: {info.get('background_prior')} (isotype controls: "
            f"{', '.join(info.get('isotype_controls') or []) or 'none'}). Proteins not measured in a batch (masked): "
            f"{'; '.join(f'{b}: {v}' for b, v in masked.items()) or 'none'}. Held-out ELBO (nats/cell): RNA "
            f"{metrics.get('validation_elbo_rna', float('nan')):.2f}, protein "
            f"{metrics.get('validation_elbo_protein', float('nan')):.2f}.</p>")
    table = html_table(["protein", "mean raw counts", "mean denoised (foreground) counts",
                        "cells with foreground probability > 0.5"], rows)
    return "Proteins", head + table
