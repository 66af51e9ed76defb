"""The HTML report of ``cellvae perturb``: predicted against real changes, the top responding genes with their
posterior uncertainty, and a UMAP of control, predicted and real cells.

Units. Per-gene changes are log2 fold changes of population-mean normalized expression (fraction of a cell's
counts) between the perturbed and the control state, with the pseudocount of the prediction (0.1 counts in a
control cell of median size, :func:`cellvae.analysis.de.default_pseudocount`):

- *predicted*: the posterior draws of :func:`cellvae.analysis.perturb.predict_perturbation` with
  ``n_samples = K`` (``var['cellvae_lfc_mean']`` and its 5 % / 95 % quantiles): each draw of the control cells'
  latent codes decoded perturbed and unperturbed;
- *real*: ``log2(mean(x / library) over real perturbed cells + c) - log2(mean(x / library) over control cells + c)``.

The UMAP is drawn on expression, not on the latent space (for the decoder swap, predicted and control cells share
their latent codes): log1p(counts per 10,000) of the control cells, of the predicted cells' sampled counts
(``layers['counts']``) and of the real perturbed cells, 30 principal components, 15 neighbours.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ..data.fileio import write_text_atomic
from ..plot import plot_embedding, plot_gene_intervals, plot_response_scatter, plot_training_curves, save_figure
from .report import html_figure, html_table, render_report

__all__ = ["write_perturbation_report", "N_TOP_GENES", "UMAP_MAX_CELLS_PER_GROUP"]

N_TOP_GENES = 25  # genes in the table and the interval plot
UMAP_MAX_CELLS_PER_GROUP = 3000
_N_DEG = 100  # "top-100 real responders" for the summary statistics


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)


def _normalized_mean(X) -> np.ndarray:
    """Mean over cells of x / library (n_genes,)."""
    X = _dense(X)
    lib = X.sum(1, keepdims=True)
    lib[lib == 0] = 1.0
    return (X / lib).mean(0)


def _lognorm(X) -> np.ndarray:
    X = _dense(X)
    lib = X.sum(1, keepdims=True)
    lib[lib == 0] = 1.0
    return np.log1p(X / lib * 1e4)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _joint_umap(ctrl: np.ndarray, pred: np.ndarray, real: np.ndarray | None, seed: int) -> ad.AnnData:
    """AnnData of the three groups (subsampled to UMAP_MAX_CELLS_PER_GROUP each) with ``obsm['X_umap']``."""
    import scanpy as sc

    rng = np.random.default_rng(seed)
    blocks, groups = [], []
    for name, X in (("control", ctrl), ("predicted", pred), ("real perturbed", real)):
        if X is None or len(X) == 0:
            continue
        if len(X) > UMAP_MAX_CELLS_PER_GROUP:
            X = X[np.sort(rng.choice(len(X), UMAP_MAX_CELLS_PER_GROUP, replace=False))]
        blocks.append(X)
        groups += [name] * len(X)
    X = np.vstack(blocks).astype(np.float32)
    joint = ad.AnnData(X, obs=pd.DataFrame({"group": pd.Categorical(groups)},
                                           index=[f"cell{i}" for i in range(len(X))]))
    n_comps = int(max(2, min(30, X.shape[0] - 1, X.shape[1] - 1)))
    sc.pp.pca(joint, n_comps=n_comps, random_state=seed)
    sc.pp.neighbors(joint, n_neighbors=min(15, max(2, X.shape[0] - 1)), random_state=seed)
    sc.tl.umap(joint, random_state=seed)
    return joint


def write_perturbation_report(path: str | Path, model, pred: ad.AnnData, ctrl: ad.AnnData,
                              real: ad.AnnData | None, settings: dict, real_source: str | None = None,
                              seed: int = 0) -> dict:
    """Write the HTML report of a perturbation prediction to ``path`` (figures embedded) and return its metrics.

    Args:
        path: the ``.html`` file to write (atomically).
        model: the trained :class:`cellvae.CountVAE` (its training history is shown).
        pred: the output of :meth:`cellvae.CountVAE.predict_perturbation` (n_cells, n_genes) with the posterior
            summaries of ``n_samples > 1`` (``var['cellvae_lfc_mean']``, ``cellvae_lfc_q05``, ``cellvae_lfc_q95``,
            ``cellvae_lfc_sd``; ``uns['cellvae_perturbation']['pseudocount']``).
        ctrl: the control cells that were perturbed (raw counts, genes of ``pred``, same order).
        real: real perturbed cells (raw counts, genes of ``pred``), or None.
        settings: shown as the report's settings table.
        real_source: where the real cells come from (shown).
        seed: seeds the UMAP.

    Returns:
        The metrics shown (dict): cell counts; with real cells, the Pearson r of predicted and real log2 fold
        changes (all genes, the top-100 real responders), the R² of mean log1p(counts per 10,000) of the sampled
        predicted counts against the real cells (scGen's score), the overlap of the top-100 predicted and real
        up-regulated genes, and the share of the top-100 real responders whose real change lies in the 90 %
        posterior interval.
    """
    path = Path(path)
    genes = np.asarray(pred.var_names).astype(str)
    uns = pred.uns.get("cellvae_perturbation", {})
    has_post = "cellvae_lfc_mean" in pred.var.columns
    c = float(uns.get("pseudocount", 0.0))
    metrics: dict = {"control cells": int(ctrl.n_obs), "predicted cells": int(pred.n_obs),
                     "real perturbed cells": int(real.n_obs) if real is not None else 0,
                     "genes": int(len(genes))}
    if has_post:
        lfc = pred.var["cellvae_lfc_mean"].to_numpy(np.float64)
        lo = pred.var["cellvae_lfc_q05"].to_numpy(np.float64)
        hi = pred.var["cellvae_lfc_q95"].to_numpy(np.float64)
        sd = pred.var["cellvae_lfc_sd"].to_numpy(np.float64)
        clo = pred.var["cellvae_lfc_cells_q05"].to_numpy(np.float64)
        chi = pred.var["cellvae_lfc_cells_q95"].to_numpy(np.float64)
    else:  # n_samples = 1: the change of the expected counts, without an interval
        ctrl_mean = _normalized_mean(ctrl.X)
        c = c or 0.1 / max(float(np.median(_dense(ctrl.X).sum(1))), 1.0)
        lfc = np.log2(_normalized_mean(pred.X) + c) - np.log2(ctrl_mean + c)
        lo = hi = clo = chi = lfc
        sd = np.full(len(lfc), np.nan)
    real_lfc = None
    if real is not None and real.n_obs > 0:
        real_lfc = np.log2(_normalized_mean(real.X) + c) - np.log2(_normalized_mean(ctrl.X) + c)
        top_real = np.argsort(-np.abs(real_lfc), kind="stable")[:_N_DEG]
        up_real = set(np.argsort(-real_lfc, kind="stable")[:_N_DEG].tolist())
        up_pred = set(np.argsort(-lfc, kind="stable")[:_N_DEG].tolist())
        pm, rm = _lognorm(pred.layers["counts"]).mean(0), _lognorm(real.X).mean(0)
        r_all = _pearson(lfc, real_lfc)
        r_top = _pearson(lfc[top_real], real_lfc[top_real])
        r2 = _pearson(pm, rm)
        metrics.update({
            "r (predicted vs real log2 FC), all genes": r_all,
            f"r (predicted vs real log2 FC), top-{min(_N_DEG, len(genes))} real responders": r_top,
            "R² mean log1p expression (sampled counts vs real)": None if r2 is None else r2 ** 2,
            f"overlap of top-{min(_N_DEG, len(genes))} up-regulated genes": len(up_pred & up_real) / max(
                len(up_real), 1),
        })
        if has_post:
            metrics["real change inside the 90% interval (top real responders)"] = float(np.mean(
                (real_lfc[top_real] >= lo[top_real]) & (real_lfc[top_real] <= hi[top_real])))
    order = np.argsort(-np.abs(lfc), kind="stable")[:N_TOP_GENES]
    header = ["gene", "predicted log2 FC", "90% posterior interval", "posterior sd", "5-95% over cells"] + (
        ["real log2 FC"] if real_lfc is not None else [])
    rows = [[genes[i], float(lfc[i]), f"{lo[i]:.3g} to {hi[i]:.3g}" if has_post else "-",
             float(sd[i]) if has_post else "-", f"{clo[i]:.3g} to {chi[i]:.3g}" if has_post else "-"]
            + ([float(real_lfc[i])] if real_lfc is not None else []) for i in order]
    sections = []
    with tempfile.TemporaryDirectory(prefix="cellvae_perturb_report_") as tmp:
        tmp = Path(tmp)
        figs: list[tuple[Path, str]] = []
        if model.history.get("epoch"):
            figs.append((save_figure(plot_training_curves(model.history), tmp / "training.png"),
                         "Training of the model: ELBO per epoch and KL warm-up."))
        top_html = html_table(header, rows)
        fig_int = save_figure(plot_gene_intervals(genes[order], lfc[order], lo[order], hi[order],
                                                  real=None if real_lfc is None else real_lfc[order],
                                                  cell_lower=clo[order] if has_post else None,
                                                  cell_upper=chi[order] if has_post else None),
                              tmp / "intervals.png")
        intro = ("<p class=muted>Genes with the largest predicted change (|posterior mean log2 fold change| of the "
                 "population), perturbed vs control state of the same cells. <i>90% posterior interval</i>: the "
                 "5-95 % range of the population change over posterior draws of the cells' latent codes"
                 + (f" ({uns.get('n_samples')} draws)" if has_post else " (none: run with --n-samples > 1)")
                 + "; narrow when many cells are predicted, since every draw averages over them. <i>5-95% over "
                 "cells</i>: how differently single cells are predicted to respond. Neither includes the "
                 "uncertainty of the perturbation itself (latent arithmetic estimates the shift from the other "
                 "cell types; the decoder swap learns it from the perturbed training cells): in the "
                 "leave-one-cell-type-out benchmark (benchmarks/results/perturbation.md) that error is larger "
                 "than these intervals.</p>")
        sections.append(("Top predicted responding genes", intro + top_html + html_figure(
            fig_int, "Posterior mean and 90 % interval of the predicted log2 fold change (thick), spread over "
            "cells (thin)" + ("; crosses: real change" if real_lfc is not None else ""))))
        if real_lfc is not None:
            fig_sc = save_figure(plot_response_scatter(lfc, real_lfc, lo if has_post else None,
                                                       hi if has_post else None, labels=genes),
                                 tmp / "scatter.png")
            sections.insert(0, ("Predicted against real change per gene", (
                f"<p class=muted>Real perturbed cells: {real_source or 'given'}. One point per gene; horizontal "
                "bars: 90 % posterior interval of the predicted change; dashed: y = x.</p>"
                + html_figure(fig_sc, "Predicted vs real log2 fold change of every gene"))))
        joint = _joint_umap(_lognorm(ctrl.X), _lognorm(pred.layers["counts"]),
                            None if real is None or real.n_obs == 0 else _lognorm(real.X), seed)
        figs.append((save_figure(plot_embedding(joint, "group", title="control, predicted and real cells"),
                                 tmp / "umap.png"),
                     "UMAP of log1p(counts per 10,000): control cells, predicted cells (counts sampled from the "
                     "model), real perturbed cells"))
        data_summary = {"control cells": int(ctrl.n_obs), "genes": int(len(genes)),
                        "real perturbed cells": real_source if real is not None else "none given"}
        hist = model.history
        training = {"epochs": len(hist.get("epoch", [])), "best epoch": hist.get("best_epoch"),
                    "final validation ELBO (nats per cell)": (hist.get("validation_elbo") or [None])[-1]}
        notes = ["Predicted log2 fold change: posterior draws of each control cell's latent code, decoded with and "
                 "without the perturbation; population-mean normalized expression; pseudocount "
                 f"{c:.3g} (0.1 counts in a control cell of median size).",
                 "X of the output: expected counts (decoded mean x the control cell's library size); "
                 "layers['counts']: counts sampled from the model's likelihood."]
        html = render_report(f"perturbation: {settings.get('control')} -> {settings.get('perturbed')}",
                             data_summary, settings, training, metrics, figs, notes, sections=sections,
                             figures_heading="Control, predicted and real cells")
    write_text_atomic(path, html)
    return metrics
