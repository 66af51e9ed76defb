"""Figures: training curves and embeddings (matplotlib; embeddings drawn with scanpy's plotting)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_training_curves", "plot_embedding", "plot_histogram", "save_figure"]


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
