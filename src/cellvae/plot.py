"""Figures: training curves and embeddings (matplotlib; embeddings drawn with scanpy's plotting)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

# Headless PNGs for the CLI and scripts, unless the user chose a backend: MPLBACKEND (a Jupyter kernel sets it to its
# inline backend) or an IPython session (%matplotlib). Forcing Agg there would hide every later figure of a notebook.
if not os.environ.get("MPLBACKEND") and getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)() is None:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_training_curves", "plot_embedding", "plot_histogram", "save_figure", "plot_response_scatter",
           "plot_gene_intervals"]


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG atomically (temporary file, then rename) and close it."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_training_curves(history: dict):
    """Train and validation ELBO (nats per cell) per epoch, and the KL weight; returns a Figure."""
    epochs = history.get("epoch", [])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(epochs, history.get("train_elbo", []), label="train ELBO")
    if history.get("validation_elbo"):
        ax[0].plot(epochs, history["validation_elbo"], label="validation ELBO")
        best = history.get("best_epoch")
        if best and 0 < best <= len(epochs):
            ax[0].axvline(best, color="grey", ls="--", lw=0.8, label=f"best epoch {best}")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("ELBO (nats per cell)")
    vals = history.get("train_elbo", [])
    if len(vals) > 5:  # the first epochs dwarf the rest: clip the y range to the last 90%
        lo = min(min(vals[len(vals) // 10:]), min(history.get("validation_elbo") or vals))
        hi = max(max(vals), max(history.get("validation_elbo") or vals))
        ax[0].set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax[0].legend()
    ax[0].set_title("ELBO")
    ax[1].plot(epochs, history.get("kl_weight", []), color="C2")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("KL weight")
    ax[1].set_ylim(-0.02, max(1.0, max(history.get("kl_weight") or [1.0])) * 1.05)  # beta-VAE: up to beta
    ax[1].set_title("KL warm-up")
    fig.tight_layout()
    return fig


def plot_embedding(adata, color: str, basis: str = "umap", title: str | None = None):
    """Scatter of ``obsm['X_' + basis]`` colored by ``obs[color]``; returns a Figure."""
    import scanpy as sc

    fig = sc.pl.embedding(adata, basis=basis, color=color, show=False, return_fig=True, title=title or color,
                          frameon=False)
    return fig


def plot_histogram(values, bins: int = 20, xlabel: str = "", ylabel: str = "cells"):
    """Histogram of ``values`` (1-D); returns a Figure."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(values, bins=bins, color="#4477aa", edgecolor="white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def plot_response_scatter(predicted, real, lower=None, upper=None, labels=None, n_labels: int = 12,
                          xlabel: str = "predicted log2 fold change", ylabel: str = "real log2 fold change"):
    """Predicted against real change per gene (n_genes,) with optional intervals ``lower``-``upper`` on the
    predicted change; the ``n_labels`` genes with the largest predicted change are named (``labels``). Returns a
    Figure."""
    import numpy as np

    x, y = np.asarray(predicted, float), np.asarray(real, float)
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    if lower is not None and upper is not None:
        lo, hi = np.asarray(lower, float), np.asarray(upper, float)
        ax.errorbar(x, y, xerr=np.vstack([x - lo, hi - x]).clip(min=0), fmt="none", ecolor="#bbbbbb", lw=0.6,
                    zorder=1)
    ax.scatter(x, y, s=7, color="#4477aa", alpha=0.75, zorder=2, linewidths=0)
    lim = [min(x.min(), y.min()), max(x.max(), y.max())]
    pad = 0.05 * (lim[1] - lim[0] or 1.0)
    ax.plot([lim[0] - pad, lim[1] + pad], [lim[0] - pad, lim[1] + pad], color="grey", lw=0.8, ls="--", zorder=0)
    ax.axhline(0, color="#dddddd", lw=0.6, zorder=0)
    ax.axvline(0, color="#dddddd", lw=0.6, zorder=0)
    if labels is not None and n_labels > 0:
        for i in np.argsort(-np.abs(x), kind="stable")[:n_labels]:
            ax.annotate(str(labels[i]), (x[i], y[i]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def plot_gene_intervals(genes, mean, lower, upper, real=None, cell_lower=None, cell_upper=None,
                        xlabel: str = "log2 fold change"):
    """Point-range plot of one value per gene (e.g. the posterior mean of a predicted change) with its interval,
    genes top to bottom in the given order; optionally a wider range per gene (``cell_lower``-``cell_upper``,
    thin grey, e.g. the spread over cells) and a real value per gene (cross). Returns a Figure."""
    import numpy as np

    n = len(genes)
    yy = np.arange(n)[::-1]
    fig, ax = plt.subplots(figsize=(5.6, max(2.5, 0.24 * n + 0.8)))
    m, lo, hi = (np.asarray(v, float) for v in (mean, lower, upper))
    if cell_lower is not None and cell_upper is not None:
        ax.hlines(yy, np.asarray(cell_lower, float), np.asarray(cell_upper, float), color="#aaaaaa", lw=0.8,
                  label="5-95% over cells")
    ax.hlines(yy, lo, hi, color="#4477aa", lw=2.2, label="90% posterior interval")
    ax.plot(m, yy, "o", color="#4477aa", ms=4, label="posterior mean")
    if real is not None:
        ax.plot(np.asarray(real, float), yy, "x", color="#cc3311", ms=5, label="real")
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_yticks(yy)
    ax.set_yticklabels([str(g) for g in genes], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
