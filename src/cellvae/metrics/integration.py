"""Batch mixing and bio-conservation scores from the optional ``scib-metrics`` library.

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

__all__ = ["scib_available", "scib_benchmark", "SCIB_INSTALL_HINT"]

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
