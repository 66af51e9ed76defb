"""``cellvae evaluate``: likelihood, clustering and batch-mixing metrics of a saved model on a dataset.

- Likelihood (nats per cell) on the model's held-out validation cells when the dataset holds them (the model
  directory's ``split.json``), else on all cells: ELBO, its reconstruction error ``-log p(x | z)`` and KL parts,
  and the importance-sampled marginal log-likelihood (IWAE, Burda et al. 2016) with ``n_samples`` samples per
  cell (default 100 for speed; scvi-tools uses 1000, which is slower but tighter).
- Clustering of the latent means of all cells against ``labels_key``: KMeans and Leiden ARI/NMI with as many
  clusters as labels, and the label silhouette (ASW); see :mod:`cellvae.metrics.clustering`.
- Batch mixing against ``batch_key`` (with ``labels_key``) from scib-metrics, when it is installed; see
  :mod:`cellvae.metrics.integration`.

Results go to a JSON file and a Markdown file, each written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np

from ..errors import CellvaeInputError
from ..data.preprocess import log1p_cp10k
from ..data.read import read_data, resolve_data_path
from ..data.fileio import write_text_atomic
from ..metrics.integration import SCIB_INSTALL_HINT, scib_available, scib_benchmark
from ..train.evaluate import compute_elbo, compute_marginal_ll
from ..metrics.clustering import kmeans_agreement, leiden_agreement, silhouette_labels
from ..models.count_vae import CountVAE
from ..train.threads import torch_threads

__all__ = ["evaluate_model", "evaluate_job", "markdown_table", "markdown_report", "write_results",
           "DEFAULT_N_SAMPLES", "CELL_SETS"]

DEFAULT_N_SAMPLES = 100
CELL_SETS = ("auto", "validation", "all")

_DESCRIPTIONS = {
    "elbo": "ELBO, nats per cell (higher is better)",
    "reconstruction_loss": "reconstruction error -log p(x|z), nats per cell (lower is better)",
    "kl_local": "KL(q(z|x) || p(z)) (+ library KL), nats per cell",
    "marginal_ll": "marginal log-likelihood log p(x), IWAE estimate, nats per cell (higher is better)",
    "kmeans_ari": "KMeans (k = number of labels) vs labels: adjusted Rand index",
    "kmeans_nmi": "KMeans (k = number of labels) vs labels: normalized mutual information",
    "leiden_ari": "Leiden (as many clusters as labels) vs labels: adjusted Rand index",
    "leiden_nmi": "Leiden (as many clusters as labels) vs labels: normalized mutual information",
    "leiden_resolution": "Leiden resolution found by bisection",
    "leiden_n_clusters": "Leiden clusters found",
    "n_labels": "distinct labels",
    "silhouette_labels": "label silhouette width (ASW), rescaled to [0, 1]",
}


_SCIB_DESCRIPTIONS = {
    "ilisi": "batch mixing: integration LISI of kNN neighbourhoods",
    "kbet": "batch mixing: kBET acceptance rate, per label",
    "graph_connectivity": "batch correction: connectivity of each label's kNN subgraph",
    "bras": "batch mixing: batch ASW within labels, BRAS variant",
    "silhouette_batch": "batch mixing: batch ASW within labels",
    "batch_asw": "batch mixing: batch ASW within labels (scIB silhouette_batch; not in the aggregates)",
    "pcr_comparison": "batch correction: batch variance removed relative to PCA of log-normalized counts",
    "isolated_labels": "bio conservation: isolated-label score",
    "kmeans_nmi": "bio conservation: KMeans NMI",
    "kmeans_ari": "bio conservation: KMeans ARI",
    "silhouette_label": "bio conservation: label ASW",
    "clisi": "bio conservation: cell-type LISI",
    "batch_correction": "mean of the batch-correction scores",
    "bio_conservation": "mean of the bio-conservation scores",
    "total": "0.4 batch correction + 0.6 bio conservation",
}


def _check_keys(adata: ad.AnnData, labels_key: str | None, batch_key: str | None) -> None:
    for key, what in ((labels_key, "labels key (--labels-key)"), (batch_key, "batch key (--batch-key)")):
        if key is not None and key not in adata.obs.columns:
            raise CellvaeInputError(
                f"The {what} {key!r} is not an obs column of the data; available: {list(adata.obs.columns)}."
            )


def _likelihood_cells(model: CountVAE, adata: ad.AnnData, cells: str) -> tuple[str, np.ndarray | None]:
    if cells not in CELL_SETS:
        raise CellvaeInputError(f"cells must be one of {CELL_SETS}, got {cells!r}.")
    # validation_indices are positions in the model's attached AnnData
    known = adata is model.adata and model.validation_indices is not None and len(model.validation_indices) > 0
    if cells == "validation" and not known:
        raise CellvaeInputError(
            "The model's validation cells are unknown for this data: the model directory has no split.json, the "
            "data does not hold all of the model's training and validation cells (matched by obs name), or the "
            "data is not the AnnData attached to the model. Use --cells all."
        )
    if cells == "all" or not known:
        return "all", None
    return "validation", np.asarray(model.validation_indices)


def _pre_integrated(model: CountVAE, adata: ad.AnnData, n_comps: int = 50) -> np.ndarray:
    """PCA of log1p-normalized (10,000 per cell) counts of the model's genes: the unintegrated embedding."""
    from sklearn.decomposition import PCA, TruncatedSVD

    X = model.spec.counts_matrix(adata)
    X = log1p_cp10k(X) if model.module.likelihood.models_counts else X
    k = max(1, min(n_comps, min(X.shape) - 1))
    if hasattr(X, "toarray") and X.shape[0] * X.shape[1] > 50_000_000:
        return TruncatedSVD(k, random_state=0).fit_transform(X).astype(np.float32)
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    return PCA(k, random_state=0).fit_transform(X).astype(np.float32)


def evaluate_model(
    model: CountVAE,
    adata: ad.AnnData,
    labels_key: str | None = None,
    batch_key: str | None = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    cells: str = "auto",
    seed: int = 0,
    batch_size: int = 128,
    log=lambda msg: None,
) -> dict:
    """Compute the evaluation metrics of ``model`` on ``adata`` (see the module docstring).

    Args:
        model: a trained :class:`cellvae.CountVAE` (e.g. from :meth:`cellvae.CountVAE.load` with ``adata``).
        adata: (n_cells, n_genes) raw counts holding the model's genes. The model's validation cells are used
            only when ``adata`` is the model's attached AnnData (``model.adata``).
        labels_key: obs column of cell types for the clustering metrics (None: skipped).
        batch_key: obs column of batches for the scib batch-mixing metrics (needs ``labels_key`` and
            scib-metrics; otherwise a note says why they are missing).
        n_samples: importance samples per cell for the marginal log-likelihood.
        cells: cells for the likelihood metrics: ``"validation"`` (the model's held-out cells), ``"all"``, or
            ``"auto"`` (validation when known for ``adata``, else all).
        seed: seed of the Monte Carlo samples, KMeans and Leiden.
        batch_size: cells per pass of the marginal log-likelihood.
        log: receives progress lines.

    Returns:
        dict with ``n_cells``, ``n_genes_modelled``, ``likelihood_cells`` (``"validation"`` or ``"all"``),
        ``n_likelihood_cells``, ``n_samples``, ``seed``, ``labels_key``, ``batch_key``, ``metrics`` (name ->
        float or int; scib scores prefixed ``scib_``) and ``notes`` (list of str).

    Raises:
        CellvaeInputError: a missing obs key, ``n_samples < 1``, ``cells="validation"`` without known
            validation cells, or data the model cannot read (missing genes, non-counts).
    """
    _check_keys(adata, labels_key, batch_key)
    if int(n_samples) < 1:
        raise CellvaeInputError(f"n_samples must be at least 1, got {n_samples}.")
    which, idx = _likelihood_cells(model, adata, cells)
    data = model.prepared_data(adata)
    notes: list[str] = []
    metrics: dict = {}

    n_lik = data.n_cells if idx is None else len(idx)
    log(f"ELBO and marginal log-likelihood (K={n_samples}) on {n_lik} {which} cells")
    metrics.update(compute_elbo(model.module, data, idx, return_mean=True, seed=seed))
    metrics["marginal_ll"] = compute_marginal_ll(model.module, data, idx, n_samples=n_samples,
                                                 batch_size=batch_size, return_mean=True, seed=seed)
    if which == "all" and model.is_trained:
        notes.append("Likelihood metrics are on all cells, training cells included (the model's validation cells "
                     "are unknown for this data), so they are optimistic.")

    latent = model.get_latent_representation(adata)
    if labels_key is not None:
        labels = adata.obs[labels_key].astype(str).to_numpy()
        log(f"clustering metrics against {labels_key!r} ({len(np.unique(labels))} labels)")
        km = kmeans_agreement(latent, labels, seed=seed)
        lei = leiden_agreement(latent, labels, seed=seed)
        metrics.update(
            n_labels=int(len(np.unique(labels))), kmeans_ari=km["ari"], kmeans_nmi=km["nmi"],
            leiden_ari=lei["ari"], leiden_nmi=lei["nmi"], leiden_resolution=lei["resolution"],
            leiden_n_clusters=int(lei["n_clusters"]), silhouette_labels=silhouette_labels(latent, labels, seed=seed),
        )
        if lei["n_clusters"] != metrics["n_labels"]:
            notes.append(f"Leiden: no resolution gave {metrics['n_labels']} clusters; the closest "
                         f"({lei['n_clusters']}) is reported.")
    if batch_key is not None:
        if labels_key is None:
            notes.append("Batch-mixing metrics (scib-metrics) need --labels-key as well as --batch-key.")
        elif not scib_available():
            notes.append(f"Batch-mixing metrics (scib-metrics) not computed: they need the bench extra, "
                         f"{SCIB_INSTALL_HINT}.")
        else:
            log(f"batch-mixing metrics (scib-metrics) against {batch_key!r}")
            try:
                scib = scib_benchmark(latent, adata.obs[labels_key].astype(str).to_numpy(),
                                      adata.obs[batch_key].astype(str).to_numpy(),
                                      pre_integrated=_pre_integrated(model, adata))
                metrics.update({f"scib_{k}": v for k, v in scib.items()})
            except (ValueError, RuntimeError) as e:
                notes.append(f"Batch-mixing metrics (scib-metrics) failed: {e}")
    return {
        "n_cells": int(adata.n_obs),
        "n_genes_modelled": len(model.spec.gene_names),
        "likelihood_cells": which,
        "n_likelihood_cells": int(n_lik),
        "n_samples": int(n_samples),
        "seed": int(seed),
        "labels_key": labels_key,
        "batch_key": batch_key,
        "metrics": metrics,
        "notes": notes,
    }


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.4g}" if abs(float(v)) < 1e4 else f"{float(v):.1f}"


def markdown_table(result: dict) -> str:
    """The metrics of :func:`evaluate_model` as a Markdown table (metric, value, meaning)."""
    rows = ["| metric | value | meaning |", "|---|---|---|"]
    for k, v in result["metrics"].items():
        if k.startswith("scib_"):
            desc = _SCIB_DESCRIPTIONS.get(k[5:], "scib-metrics score") + "; in [0, 1], higher is better"
        else:
            desc = _DESCRIPTIONS.get(k, "")
        if k in ("elbo", "reconstruction_loss", "kl_local", "marginal_ll"):
            desc += f"; {result['n_likelihood_cells']} {result['likelihood_cells']} cells"
            if k == "marginal_ll":
                desc += f", K = {result['n_samples']}"
        rows.append(f"| {k} | {_fmt(v)} | {desc} |")
    if result.get("batch_key") and not any(k.startswith("scib_") for k in result["metrics"]):
        rows.append("| scib batch-mixing metrics | not computed | see notes |")
    return "\n".join(rows)


def markdown_report(result: dict) -> str:
    """A Markdown document: inputs, the metrics table and notes."""
    lines = ["# cellvae evaluation", ""]
    for k in ("model_dir", "data", "n_cells", "n_genes_modelled", "labels_key", "batch_key", "seed"):
        if result.get(k) is not None:
            lines.append(f"- {k}: `{result[k]}`")
    lines += ["", markdown_table(result), ""]
    if result["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)




def write_results(result: dict, json_path: str | os.PathLike, md_path: str | os.PathLike) -> None:
    """Write ``result`` as JSON (non-finite numbers as null) and as Markdown, each atomically."""
    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.integer, np.floating, np.bool_)):
            o = o.item()
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return o

    write_text_atomic(Path(json_path), json.dumps(clean(result), indent=2))
    write_text_atomic(Path(md_path), markdown_report(result))


def evaluate_job(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    labels_key: str | None = None,
    batch_key: str | None = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    cells: str = "auto",
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    log=lambda msg: None,
) -> tuple[dict, Path, Path]:
    """Read ``data``, load the model from ``model_dir``, evaluate (:func:`evaluate_model`) and write the results.

    Output: ``<out_dir>/evaluation.json`` and ``evaluation.md``; without ``out_dir``, next to the model
    directory: ``<parent of model_dir>/<model dir name>_evaluation.json`` and ``.md``. Existing files are replaced.

    Returns:
        (result, json_path, md_path).

    Raises:
        CellvaeInputError: unreadable data, a missing obs key, a bad model directory, or data without the model's
            genes; raised before any metric is computed.
    """
    t0 = time.perf_counter()
    path = resolve_data_path(data)
    adata = read_data(path)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    if not adata.obs_names.is_unique:
        adata.obs_names_make_unique()
    _check_keys(adata, labels_key, batch_key)
    mdir = Path(model_dir).expanduser().resolve()
    model = CountVAE.load(mdir, adata=adata)
    log(f"loaded {model!r}; data {path.name}: {adata.n_obs} cells x {adata.n_vars} genes")
    if out_dir is None:
        json_path = mdir.parent / f"{mdir.name}_evaluation.json"
    else:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        json_path = Path(out_dir) / "evaluation.json"
    md_path = json_path.with_suffix(".md")
    with torch_threads(None):
        result = evaluate_model(model, adata, labels_key=labels_key, batch_key=batch_key, n_samples=n_samples,
                                cells=cells, seed=seed, log=log)
    result = {"model_dir": str(mdir), "data": str(path.resolve()), **result,
              "seconds": round(time.perf_counter() - t0, 2)}
    write_results(result, json_path, md_path)
    return result, json_path, md_path
