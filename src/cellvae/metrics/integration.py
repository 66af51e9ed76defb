"""Batch mixing scores: two light ones with scikit-learn, and the scIB set from the optional ``scib-metrics``.

- :func:`batch_classifier_accuracy`: how well a linear classifier predicts the batch from the latent space
  (balanced accuracy; lower is better mixed, ``1 / n_batches`` is chance);
- :func:`batch_silhouette`: scIB's batch ASW (1 - |silhouette of the batch| per cell, averaged within labels;
  Luecken et al. 2022), computed with scikit-learn;
- :func:`scib_benchmark`: the scib-metrics Benchmarker (below).

A thin wrapper over ``scib_metrics.benchmark.Benchmarker`` (the JAX re-implementation of the scIB benchmark,
Luecken et al. 2022, Nat. Methods 19:41): batch correction (iLISI, kBET per label, graph connectivity, batch
ASW / BRAS, PCR comparison) and bio conservation (isolated labels, KMeans NMI/ARI, label silhouette, cLISI),
their means per category and the total ``0.4 * batch correction + 0.6 * bio conservation``. Scores lie in
[0, 1], higher is better; they are not min-max scaled across embeddings.

``scib-metrics`` is imported only when a function here is called. Install it with ``pip install "cellvae[bench]"``
(or ``pip install scib-metrics``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["scib_available", "scib_benchmark", "SCIB_INSTALL_HINT", "batch_classifier_accuracy", "batch_silhouette"]

SCIB_INSTALL_HINT = 'pip install "cellvae[bench]" (or pip install scib-metrics)'

# scib-metrics raw metric names (get_results(clean_names=False)) -> keys returned here
_KEYS = {
    "isolated_labels": "isolated_labels",
    "nmi_ari_cluster_labels_kmeans_nmi": "kmeans_nmi",
    "nmi_ari_cluster_labels_kmeans_ari": "kmeans_ari",
    "nmi_ari_cluster_labels_leiden_nmi": "leiden_nmi",
    "nmi_ari_cluster_labels_leiden_ari": "leiden_ari",
    "silhouette_label": "silhouette_label",
    "clisi_knn": "clisi",
    "ilisi_knn": "ilisi",
    "kbet_per_label": "kbet",
    "graph_connectivity": "graph_connectivity",
    "silhouette_batch": "silhouette_batch",
    "bras": "bras",
    "pcr_comparison": "pcr_comparison",
    "Batch correction": "batch_correction",
    "Bio conservation": "bio_conservation",
    "Total": "total",
}


def _check(latent, groups, what: str) -> tuple[np.ndarray, np.ndarray]:
    latent = np.asarray(latent, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    if latent.ndim != 2 or groups.shape != (latent.shape[0],):
        raise ValueError(f"latent must be (n_cells, n_latent) and {what} (n_cells,); got {latent.shape}, "
                         f"{groups.shape}.")
    if len(np.unique(groups)) < 2:
        raise ValueError(f"Batch-mixing scores need at least 2 {what}, got {len(np.unique(groups))}.")
    return latent, groups


def batch_classifier_accuracy(latent: np.ndarray, batches, n_folds: int = 5, seed: int = 0) -> float:
    """Balanced accuracy of a logistic regression predicting the batch from the latent space, by stratified
    ``n_folds``-fold cross-validation (features standardised). Lower is better mixed; ``1 / n_batches`` is chance.
    The classifier test of domain-adversarial training (Ganin & Lempitsky 2015): what the adversary should remove.

    Args:
        latent: (n_cells, n_latent) embedding.
        batches: (n_cells,) batch of each cell (any labels).

    Raises:
        ValueError: mismatched shapes, fewer than 2 batches, or a batch with fewer cells than ``n_folds``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    latent, batches = _check(latent, batches, "batches")
    smallest = min(np.unique(batches, return_counts=True)[1])
    if smallest < n_folds:
        raise ValueError(f"A batch has only {smallest} cells, fewer than the {n_folds} cross-validation folds.")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, latent, batches, cv=cv, scoring="balanced_accuracy").mean())


def batch_silhouette(latent: np.ndarray, batches, labels=None, sample_size: int | None = 5000,
                     seed: int = 0) -> float:
    """scIB's batch ASW in [0, 1] (higher is better mixed): for each cell, 1 - |silhouette width with batches
    as clusters|, averaged over the cells of each label and then over labels (Luecken et al. 2022, Nat. Methods
    19:41, "batch ASW"); without ``labels`` all cells form one group. Labels present in a single batch are
    skipped. At most ``sample_size`` cells (seeded) are used.

    Args:
        latent: (n_cells, n_latent) embedding.
        batches: (n_cells,) batch of each cell.
        labels: (n_cells,) cell types, or None.

    Raises:
        ValueError: mismatched shapes or fewer than 2 batches.
    """
    from sklearn.metrics import silhouette_samples

    latent, batches = _check(latent, batches, "batches")
    labels = np.zeros(len(batches), dtype=str) if labels is None else np.asarray(labels).astype(str)
    if labels.shape != batches.shape:
        raise ValueError(f"labels must be (n_cells,) like batches; got {labels.shape}.")
    idx = np.arange(len(batches))
    if sample_size is not None and len(idx) > sample_size:
        idx = np.sort(np.random.default_rng(seed).choice(idx, sample_size, replace=False))
    scores = []
    for lab in np.unique(labels[idx]):
        sel = idx[labels[idx] == lab]
        n_b = len(np.unique(batches[sel]))
        if n_b < 2 or n_b >= len(sel):  # silhouettes need 2 <= batches <= cells - 1
            continue
        s = silhouette_samples(latent[sel], batches[sel])
        scores.append(float(np.mean(1.0 - np.abs(s))))
    return float(np.mean(scores)) if scores else float("nan")


def scib_available() -> bool:
    """Whether ``scib-metrics`` can be imported."""
    try:
        import scib_metrics  # noqa: F401
    except ImportError:
        return False
    return True


def _import_benchmark():
    try:
        import scib_metrics
        from scib_metrics.benchmark import BatchCorrection, Benchmarker
    except ImportError as e:
        raise ImportError(
            f"Batch-mixing metrics need the optional dependency scib-metrics: {SCIB_INSTALL_HINT}."
        ) from e
    return scib_metrics, Benchmarker, BatchCorrection


def scib_benchmark(
    latent: np.ndarray,
    labels,
    batches,
    pre_integrated: np.ndarray | None = None,
    n_jobs: int = 1,
    progress_bar: bool = False,
) -> dict[str, float]:
    """scIB batch-correction and bio-conservation scores of one embedding (``scib_metrics`` Benchmarker).

    Args:
        latent: (n_cells, n_latent) embedding to score.
        labels: (n_cells,) cell types.
        batches: (n_cells,) batches.
        pre_integrated: (n_cells, n_pcs) embedding before integration (e.g. PCA of log-normalized counts) for
            the PCR comparison score; None leaves that score out.
        n_jobs: threads of the neighbour search.
        progress_bar: show scib-metrics' progress bars.

    Returns:
        dict of floats in [0, 1] (higher is better): ``ilisi``, ``kbet``, ``graph_connectivity``, ``bras`` (batch
        ASW as "batch removal adapted silhouette", Rautenstrauch & Ohler 2025; older scib-metrics report
        ``silhouette_batch``), ``pcr_comparison`` (with ``pre_integrated``), ``batch_asw`` (scIB's batch ASW,
        ``scib_metrics.silhouette_batch``, Luecken et al. 2022), ``isolated_labels``, ``kmeans_nmi``,
        ``kmeans_ari``, ``silhouette_label``, ``clisi``, and the aggregates ``batch_correction``,
        ``bio_conservation`` and ``total``.

    Raises:
        ImportError: scib-metrics is not installed (the message says how to install it).
        ValueError: shapes that do not match, or fewer than 2 batches or 2 labels.
    """
    scib_metrics, Benchmarker, BatchCorrection = _import_benchmark()
    import anndata as ad
    import pandas as pd

    latent = np.asarray(latent, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    batches = np.asarray(batches).astype(str)
    n = latent.shape[0]
    if latent.ndim != 2 or labels.shape != (n,) or batches.shape != (n,):
        raise ValueError(f"latent (n_cells, n_latent), labels and batches (n_cells,) must match; got "
                         f"{latent.shape}, {labels.shape}, {batches.shape}.")
    if len(np.unique(batches)) < 2 or len(np.unique(labels)) < 2:
        raise ValueError("Batch-mixing metrics need at least 2 batches and 2 labels.")
    obs = pd.DataFrame({"labels": labels, "batch": batches}, index=np.arange(n).astype(str))
    a = ad.AnnData(obs=obs, obsm={"X_emb": latent})
    pcr = pre_integrated is not None
    a.obsm["X_pre"] = np.asarray(pre_integrated, dtype=np.float32) if pcr else latent
    bm = Benchmarker(
        a, batch_key="batch", label_key="labels", embedding_obsm_keys=["X_emb"],
        batch_correction_metrics=BatchCorrection(pcr_comparison=pcr),
        pre_integrated_embedding_obsm_key="X_pre", n_jobs=n_jobs, progress_bar=progress_bar,
    )
    bm.benchmark()
    row = bm.get_results(min_max_scale=False, clean_names=False).loc["X_emb"]
    out = {_KEYS.get(k, str(k).lower().replace(" ", "_")): float(v) for k, v in row.items()}
    out["batch_asw"] = float(scib_metrics.silhouette_batch(latent, labels, batches))
    return out
