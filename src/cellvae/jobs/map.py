"""The job behind ``cellvae map REF_MODEL_DIR QUERY --out DIR``: map a query dataset onto a saved reference model
(scArches surgery, :meth:`cellvae.CountVAE.map_query`) and, for a label-transfer reference
(``cellvae fit --semi-supervised``), transfer its labels.

Outputs in ``out_dir``:

- ``model/``: the mapped model (loads with ``cellvae.CountVAE.load`` / ``LabelTransferVAE.load``; its config
  records the reference in ``reference``);
- ``cellvae.h5ad``: the query's cells and genes with ``obsm['X_cellvae']`` (the latent mean in the reference's
  space), and for a label-transfer reference ``obs['cellvae_predicted_label']``, ``obs['cellvae_label_confidence']``
  (calibrated probability of that label), ``obs['cellvae_unknown_score']`` and ``obs['cellvae_unknown']``
  (unlike every reference label; :mod:`cellvae.models.label_transfer`); ``obsm['X_umap_joint']`` (the query's
  coordinates in the joint reference + query UMAP);
- ``figures/*.png``, ``report.html`` (label table, confidence histogram, joint UMAP, mixing score),
  ``metrics.json``, ``predictions.csv``.

The input files are never modified; every output is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np

from ..data.fileio import plain, write_atomic, write_h5ad_atomic, write_text_atomic
from ..data.read import read_data, resolve_data_path
from ..errors import CellvaeInputError
from ..metrics.integration import ilisi
from ..models.count_vae import CountVAE
from ..models.label_transfer import LabelTransferVAE
from ..plot import plot_embedding, plot_histogram, save_figure
from ..train.threads import torch_threads
from .outdir import OutputDir
from .report import html_table, render_report

__all__ = ["map_job", "MAP_OUTPUTS", "JOINT_UMAP_MAX_REFERENCE"]

MAP_OUTPUTS = ("model", "cellvae.h5ad", "figures", "report.html", "metrics.json", "predictions.csv")
JOINT_UMAP_MAX_REFERENCE = 20_000  # reference cells in the joint UMAP (the stored reference latent)


def map_job(model_dir: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
            batch_key: str | None = None, max_epochs: int | None = None, max_missing_genes: float = 0.2,
            seed: int = 0, ignore_query_labels: bool = False, overwrite: bool = False, progress_bar: bool = True,
            log=print) -> dict:
    """Map ``data`` onto the reference model in ``model_dir`` and write the outputs (module docstring).

    Args:
        model_dir: a saved :class:`cellvae.CountVAE` or :class:`cellvae.LabelTransferVAE` (``OUT/model`` of
            ``cellvae fit``; with ``--semi-supervised`` for labels).
        data: the query (path, name in ``$CELLVAE_DATA_DIR`` or URL) with raw counts.
        out_dir: the output directory.
        batch_key, max_epochs, max_missing_genes, seed: as :meth:`cellvae.CountVAE.map_query`.
        ignore_query_labels: for a label-transfer reference whose labels key is also a column of the query: do not
            use the query's labels (by default known labels are learned from and kept); every cell is predicted,
            and the agreement of the predictions with the query's own labels is reported (``query_label_*``).
        overwrite: replace the outputs of an earlier job in ``out_dir``.
        progress_bar, log: progress display and lines.

    Returns:
        The metrics dict (also in ``metrics.json``).

    Raises:
        CellvaeInputError: an unreadable model or query, too many missing genes, a bad output directory, and the
            errors of :meth:`cellvae.CountVAE.map_query`.
    """
    t0 = time.perf_counter()
    mdir = Path(model_dir).expanduser()
    path = resolve_data_path(data)
    with OutputDir(out_dir, [path, mdir], MAP_OUTPUTS, overwrite) as out:
        ref = CountVAE.load(mdir)
        labelled = isinstance(ref, LabelTransferVAE)
        log(f"reference: {ref!r}")
        query = read_data(path)
        log(f"read {path.name}: {query.n_obs} cells x {query.n_vars} genes")
        if batch_key is not None and batch_key not in query.obs.columns:
            raise CellvaeInputError(f"--batch-key {batch_key!r} is not an obs column of the query; available: "
                                    f"{list(query.obs.columns)}.")
        if not query.var_names.is_unique:
            query.var_names_make_unique()
        if not query.obs_names.is_unique:
            query.obs_names_make_unique()
        own_labels = None
        key = ref.spec.labels_key if labelled else None
        if key is not None and key in query.obs.columns:
            if ignore_query_labels:
                own_labels = query.obs[key].astype(str).to_numpy()
                query = query.copy()
                del query.obs[key]
                log(f"obs[{key!r}] of the query is ignored (--ignore-query-labels): every cell is predicted")
            else:
                log(f"the query has obs[{key!r}]: its known labels are learned from and kept "
                    "(--ignore-query-labels to predict every cell)")
        t_map = time.perf_counter()
        mapped = ref.map_query(query, batch_key=batch_key, max_epochs=max_epochs,
                               max_missing_genes=max_missing_genes, seed=seed, progress_bar=progress_bar)
        map_seconds = time.perf_counter() - t_map
        log(f"mapped {query.n_obs} cells in {len(mapped.history['epoch'])} epochs ({map_seconds:.1f} s)")
        with torch_threads(None):
            latent = mapped.get_latent_representation()
            table = mapped.predict_table() if labelled else None
        res = query.copy()
        res.obsm["X_cellvae"] = latent
        metrics: dict = {"n_query_cells": int(query.n_obs), "n_genes_reference": len(ref.spec.gene_names),
                         "n_genes_missing": int(mapped.reference["query_genes_missing"]),
                         "query_epochs": len(mapped.history["epoch"]), "map_seconds": round(map_seconds, 2),
                         "new_batches": [b for b in mapped.spec.batch_categories
                                         if b not in ref.spec.batch_categories]}
        sections, figures = [], []
        if table is not None:
            for col in ("predicted_label", "label_confidence", "unknown_score", "unknown"):
                res.obs[f"cellvae_{col}"] = table[col].to_numpy()
            metrics.update(n_unknown=int(table["unknown"].sum()),
                           mean_label_confidence=float(table["label_confidence"].mean()),
                           reference_ece_after_calibration=ref.calibration.get("ece_after"),
                           temperature=ref.temperature)
            sections.append(("Predicted labels", _label_table(table)))
            if own_labels is not None:
                sections.append((f"Agreement with the query's own {key!r}", _agreement(own_labels, table, ref.labels,
                                                                                       metrics)))
                res.obs[key] = own_labels
            figures.append((save_figure(plot_histogram(table["label_confidence"].to_numpy(), bins=20,
                                                       xlabel="label confidence", ylabel="query cells"),
                                        out / "figures" / "confidence_histogram.png"),
                            "Calibrated confidence of the predicted label (temperature-scaled probability)."))
            write_atomic(out / "predictions.csv", lambda p: table.to_csv(p, index_label="cell"))
        joint = _joint_embedding(mapped, latent, table, seed) if labelled else None
        if joint is not None:
            metrics["ilisi_reference_query"] = joint.uns["ilisi"]
            res.obsm["X_umap_joint"] = joint.obsm["X_umap"][joint.obs["dataset"].to_numpy() == "query"]
            for key, caption in (("dataset", "Joint UMAP of reference and query cells (the reference latent stored "
                                  "with the model) by dataset"),
                                 ("label", "Joint UMAP by label (reference: known; query: predicted)")):
                figures.append((save_figure(plot_embedding(joint, key), out / "figures" / f"joint_umap_{key}.png"),
                                caption))
        res.uns["cellvae"] = plain({"metrics": metrics, "reference": mapped.reference}, for_h5ad=True)
        mapped.save(out / "model", overwrite=True)
        write_h5ad_atomic(out / "cellvae.h5ad", res)
        metrics["total_seconds"] = round(time.perf_counter() - t0, 2)
        write_text_atomic(out / "metrics.json", json.dumps(plain({"metrics": metrics}), indent=2))
        notes = ["Query training: the reference's weights are frozen; only the new batch (and covariate) embedding "
                 "rows and the decoder's normalisation layers train (scArches, Lotfollahi et al. 2022)."]
        if labelled:
            notes += [
                "Label confidence: the classifier's probability after temperature scaling fitted on held-out "
                f"reference cells (temperature {ref.temperature:.3g}; ECE there {ref.calibration.get('ece_before', float('nan')):.3g}"
                f" before, {ref.calibration.get('ece_after', float('nan')):.3g} after).",
                "Unknown: the sum of the normal scores of three signals ranked against held-out reference cells (latent "
                "kNN distance to reference cells, 1 - confidence, gene surprise), above the 99th percentile of the "
                "held-out cells' own sums (about 1 % of reference-like cells are flagged).",
                "Mixing score: iLISI of reference vs query cells on the joint latent (0: separate, 1: fully mixed; "
                "scaled as scIB).",
            ]
        else:
            notes.append("The reference is a CountVAE: no labels to transfer (train it with cellvae fit "
                         "--labels-key K --semi-supervised for label transfer).")
        summary = {"reference model": str(mdir), "query": path.name, "query cells": query.n_obs,
                   "reference genes": len(ref.spec.gene_names),
                   "missing genes (zero-filled)": metrics["n_genes_missing"],
                   "new batches": ", ".join(metrics["new_batches"]) or "none"}
        training = {"query epochs": metrics["query_epochs"], "best epoch": mapped.history.get("best_epoch"),
                    "mapping time (s)": metrics["map_seconds"]}
        write_text_atomic(out / "report.html", render_report(
            f"{path.name} mapped onto {mdir.name}", summary, {"batch_key": batch_key, "max_epochs": max_epochs,
                                                               "seed": seed}, training,
            {k: v for k, v in metrics.items() if k != "new_batches"}, figures, notes, sections=sections))
        log(f"wrote {out / 'report.html'}")
        return metrics


def _label_table(table) -> str:
    rows = []
    for label, block in table.groupby("predicted_label", observed=False, sort=True):
        if len(block) == 0:
            continue
        rows.append([str(label), len(block), f"{len(block) / len(table):.1%}",
                     float(block["label_confidence"].mean()), int(block["unknown"].sum())])
    rows.append(["all", len(table), "100.0%", float(table["label_confidence"].mean()), int(table["unknown"].sum())])
    return html_table(["predicted label", "cells", "share", "mean confidence", "flagged unknown"], rows)


def _agreement(own: np.ndarray, table, known_labels: list[str], metrics: dict) -> str:
    """Accuracy of the predictions against the query's own labels (cells whose label the reference knows), the
    unknown flags of the others, and a confusion table; adds ``query_label_*`` entries to ``metrics``."""
    import pandas as pd
    from sklearn.metrics import balanced_accuracy_score

    pred = table["predicted_label"].astype(str).to_numpy()
    known = np.isin(own, known_labels)
    if known.any():
        metrics["query_label_accuracy"] = float((pred[known] == own[known]).mean())
        metrics["query_label_balanced_accuracy"] = float(balanced_accuracy_score(own[known], pred[known]))
    metrics["query_cells_label_not_in_reference"] = int((~known).sum())
    if (~known).any():
        metrics["query_unknown_rate_label_not_in_reference"] = float(table["unknown"].to_numpy()[~known].mean())
    metrics["query_unknown_rate_label_in_reference"] = float(table["unknown"].to_numpy()[known].mean()) \
        if known.any() else None
    tab = pd.crosstab(pd.Series(own, name="own"), pd.Series(pred, name="predicted"))
    rows = [[str(i), *[int(v) for v in tab.loc[i]]] for i in tab.index]
    return html_table(["query's label \\ predicted", *[str(c) for c in tab.columns]], rows)


def _joint_embedding(mapped: LabelTransferVAE, latent: np.ndarray, table, seed: int) -> ad.AnnData | None:
    """AnnData of the stored reference latent and the query's, with a UMAP and the reference-vs-query iLISI."""
    import scanpy as sc

    z_ref, labels_ref = mapped.reference_latent()
    if len(z_ref) > JOINT_UMAP_MAX_REFERENCE:
        keep = np.sort(np.random.default_rng(seed).choice(len(z_ref), JOINT_UMAP_MAX_REFERENCE, replace=False))
        z_ref, labels_ref = z_ref[keep], labels_ref[keep]
    z = np.concatenate([z_ref, latent]).astype(np.float32)
    joint = ad.AnnData(obsm={"X_cellvae": z}, obs={
        "dataset": np.r_[np.repeat("reference", len(z_ref)), np.repeat("query", len(latent))],
        "label": np.r_[labels_ref.astype(str), table["predicted_label"].astype(str).to_numpy()]})
    joint.obs_names = [f"cell{i}" for i in range(joint.n_obs)]
    joint.obs["dataset"] = joint.obs["dataset"].astype("category")
    joint.obs["label"] = joint.obs["label"].astype("category")
    sc.pp.neighbors(joint, use_rep="X_cellvae", random_state=seed)
    sc.tl.umap(joint, random_state=seed)
    joint.uns["ilisi"] = ilisi(z, joint.obs["dataset"].to_numpy(), sample_size=20_000, seed=seed)
    return joint
