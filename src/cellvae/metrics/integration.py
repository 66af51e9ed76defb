"""Batch mixing scores: two light ones with scikit-learn, and the scIB set from the optional ``scib-metrics``.

- :func:`batch_classifier_accuracy`: how well a linear classifier predicts the batch from the latent space
  (balanced accuracy; lower is better mixed, ``1 / n_batches`` is chance);
- :func:`ilisi`: the integration LISI (Korsunsky et al. 2019, Nat. Methods 16:1289), scaled to [0, 1] as scIB's
  ``ilisi_knn`` (0: each cell's neighbourhood holds one batch; 1: every batch in equal shares), computed with
  scikit-learn's neighbours;
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

__all__ = ["scib_available", "scib_benchmark", "SCIB_INSTALL_HINT", "batch_classifier_accuracy", "batch_silhouette",
           "ilisi"]

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


def _lisi_weights(dist: np.ndarray, perplexity: float, n_iter: int = 50) -> np.ndarray:
    """(n_cells, k) Gaussian kernel weights over each cell's neighbours whose entropy is ``log(perplexity)`` (a
    bisection on the precision per cell, as t-SNE and LISI)."""
    d2 = dist.astype(np.float64) ** 2
    d2 = d2 - d2[:, :1]  # shift by the nearest distance: the weights are unchanged, exp() cannot underflow
    target = np.log(perplexity)
    beta = np.ones(len(d2))
    lo, hi = np.zeros(len(d2)), np.full(len(d2), np.inf)
    for _ in range(n_iter):
        w = np.exp(-d2 * beta[:, None])
        sw = w.sum(1)
        h = np.log(sw) + beta * (d2 * w).sum(1) / sw  # entropy of the normalised weights
        too_flat = h > target  # entropy too high: sharpen (larger beta)
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2.0, (lo + hi) / 2.0)
    w = np.exp(-d2 * beta[:, None])
    return w / w.sum(1, keepdims=True)


def ilisi(latent: np.ndarray, batches, n_neighbors: int = 90, perplexity: float | None = None,
          sample_size: int | None = None, seed: int = 0) -> float:
    """Integration LISI (Korsunsky et al. 2019): per cell, the inverse Simpson index of the batches among its
    ``n_neighbors`` nearest neighbours in ``latent`` weighted by a Gaussian kernel of perplexity
    ``n_neighbors / 3`` (30 for 90), then ``(median - 1) / (n_batches - 1)``, the scaling of scIB's ``ilisi_knn``
    (Luecken et al. 2022). Higher is better mixed.

    Args:
        latent: (n_cells, n_latent).
        batches: (n_cells,) batch of each cell (or e.g. reference vs query).
        n_neighbors: neighbours per cell (at most n_cells - 1).
        perplexity: of the kernel (None: ``n_neighbors / 3``).
        sample_size: score at most this many cells (a seeded sample; their neighbours come from all cells).
        seed: of that sample.

    Returns:
        float in [0, 1].

    Raises:
        ValueError: mismatched shapes or fewer than 2 batches.
    """
    from sklearn.neighbors import NearestNeighbors

    latent, batches = _check(latent, batches, "batches")
    cats, codes = np.unique(batches, return_inverse=True)
    k = int(min(n_neighbors, len(latent) - 1))
    perp = float(perplexity) if perplexity is not None else max(k / 3.0, 1.0)
    idx = np.arange(len(latent))
    if sample_size is not None and len(idx) > sample_size:
        idx = np.sort(np.random.default_rng(seed).choice(idx, sample_size, replace=False))
    dist, ind = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent[idx])
    dist, ind = dist[:, 1:], ind[:, 1:]  # drop the cell itself
    w = _lisi_weights(dist, min(perp, k))
    share = np.zeros((len(idx), len(cats)))
    np.add.at(share, (np.repeat(np.arange(len(idx)), k), codes[ind].ravel()), w.ravel())
    lisi = 1.0 / (share**2).sum(1)
    return float((np.median(lisi) - 1.0) / (len(cats) - 1))


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
