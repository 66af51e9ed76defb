"""Metrics of a latent space against known labels (scikit-learn, scanpy).

- ARI: adjusted Rand index (Hubert & Arabie 1985); NMI: normalized mutual information (arithmetic mean
  normalisation, scikit-learn's default); both in [0, 1] for clusterings, 1 = identical partitions.
- KMeans clustering uses k = number of label categories (the protocol of the scVI paper's clustering benchmark).
- Leiden clustering (Traag et al. 2019) on the kNN graph of the latent space (scanpy ``neighbors``, 15
  neighbours), with the resolution found by bisection so that the number of clusters equals the number of labels
  (as scib's NMI/ARI, Luecken et al. 2022, optimise the resolution; here the target is the label count).
- ASW: silhouette width of the labels on the latent space, rescaled to [0, 1] as ``(s + 1) / 2`` (scib).

Inputs: ``latent`` (n_cells, n_latent) float array; ``labels`` / ``clusters`` (n_cells,) array-likes compared
as strings.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

__all__ = [
    "kmeans_clusters",
    "clustering_agreement",
    "kmeans_agreement",
    "silhouette_labels",
    "leiden_clusters",
    "leiden_n_clusters",
    "leiden_agreement",
]


def kmeans_clusters(latent: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """KMeans (10 initialisations, ``random_state=seed``) on ``latent`` (n_cells, n_latent) -> (n_cells,) int."""
    return KMeans(n_clusters=int(n_clusters), random_state=seed, n_init=10).fit_predict(np.asarray(latent))


def clustering_agreement(labels, clusters) -> dict:
    """ARI and NMI between known ``labels`` and ``clusters`` (each (n_cells,)). Returns ``{"ari", "nmi"}``."""
    labels = np.asarray(labels).astype(str)
    clusters = np.asarray(clusters).astype(str)
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
    }


def kmeans_agreement(latent: np.ndarray, labels, seed: int = 0) -> dict:
    """ARI and NMI of KMeans with k = number of distinct labels on ``latent`` (n_cells, n_latent)."""
    labels = np.asarray(labels).astype(str)
    k = len(np.unique(labels))
    return clustering_agreement(labels, kmeans_clusters(latent, k, seed))


def silhouette_labels(latent: np.ndarray, labels, sample_size: int | None = 5000, seed: int = 0) -> float:
    """Average silhouette width of ``labels`` on ``latent`` (n_cells, n_latent), Euclidean (Rousseeuw 1987),
    rescaled to [0, 1] as ``(s + 1) / 2``; computed on ``sample_size`` random cells (None: all). NaN with fewer
    than 2 labels."""
    labels = np.asarray(labels).astype(str)
    if len(np.unique(labels)) < 2:
        return float("nan")
    n = len(labels)
    s = silhouette_score(
        latent, labels, sample_size=min(sample_size, n) if sample_size else None, random_state=seed
    )
    return float((s + 1.0) / 2.0)


def _neighbors(latent: np.ndarray, n_neighbors: int, seed: int):
    """An AnnData holding scanpy's kNN graph (``sc.pp.neighbors``, UMAP connectivities) of ``latent``."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    latent = np.asarray(latent, dtype=np.float32)
    if latent.ndim != 2 or latent.shape[0] < 3:
        raise ValueError(f"latent must be (n_cells >= 3, n_latent), got shape {latent.shape}.")
    a = ad.AnnData(obs=pd.DataFrame(index=np.arange(latent.shape[0]).astype(str)), obsm={"X_latent": latent})
    sc.pp.neighbors(a, use_rep="X_latent", n_neighbors=min(int(n_neighbors), latent.shape[0] - 1),
                    random_state=seed)
    return a


def _leiden(graph, resolution: float, seed: int) -> np.ndarray:
    import scanpy as sc

    sc.tl.leiden(graph, resolution=float(resolution), flavor="igraph", n_iterations=2, directed=False,
                 random_state=seed, key_added="leiden")
    return graph.obs["leiden"].to_numpy().astype(str)


def leiden_clusters(latent: np.ndarray, resolution: float = 1.0, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """Leiden clusters (scanpy ``leiden``, igraph flavour, 2 iterations, undirected) of the kNN graph of
    ``latent`` (n_cells, n_latent) at ``resolution``. Returns (n_cells,) cluster names (str).

    Raises:
        ValueError: ``latent`` not 2-D or with fewer than 3 cells.
    """
    return _leiden(_neighbors(latent, n_neighbors, seed), resolution, seed)


def leiden_n_clusters(
    latent: np.ndarray,
    n_clusters: int,
    n_neighbors: int = 15,
    seed: int = 0,
    max_iter: int = 20,
) -> dict:
    """Leiden clustering of the latent kNN graph with the resolution chosen to give ``n_clusters`` clusters.

    The kNN graph is built once. Starting at resolution 1, the resolution is doubled until there are at least
    ``n_clusters`` clusters, then bisected between the last resolution with too few and the first with enough
    clusters. After ``max_iter`` Leiden runs without an exact match, the run whose cluster count is closest to
    ``n_clusters`` is returned (the first such run on a tie).

    Args:
        latent: (n_cells, n_latent).
        n_clusters: wanted number of clusters (e.g. the number of labels).
        n_neighbors: neighbours of the kNN graph (scanpy's default 15).
        seed: random state of the neighbour search and of Leiden.
        max_iter: most Leiden runs.

    Returns:
        dict with ``clusters`` ((n_cells,) str), ``resolution`` (float), ``n_clusters`` (found), ``n_iter`` (runs)
        and ``exact`` (whether the found count equals the wanted one).

    Raises:
        ValueError: ``n_clusters < 1``, ``max_iter < 1``, or a bad ``latent`` (see :func:`leiden_clusters`).
    """
    target = int(n_clusters)
    if target < 1 or int(max_iter) < 1:
        raise ValueError(f"n_clusters and max_iter must be at least 1, got {n_clusters} and {max_iter}.")
    graph = _neighbors(latent, n_neighbors, seed)
    best: dict = {}
    n_iter = 0

    def run(resolution: float) -> int:
        nonlocal n_iter
        n_iter += 1
        clusters = _leiden(graph, resolution, seed)
        k = len(np.unique(clusters))
        if not best or abs(k - target) < abs(best["n_clusters"] - target):
            best.update(clusters=clusters, resolution=float(resolution), n_clusters=k)
        return k

    lo, hi = 0.0, 1.0
    k = run(hi)
    while k < target and n_iter < max_iter:  # grow until the resolution gives enough clusters
        lo, hi = hi, 2.0 * hi
        k = run(hi)
    while k != target and n_iter < max_iter:  # k(lo) < target <= k(hi): bisect
        mid = 0.5 * (lo + hi)
        k = run(mid)
        if k < target:
            lo = mid
        elif k > target:
            hi = mid
    return {**best, "n_iter": n_iter, "exact": best["n_clusters"] == target}


def leiden_agreement(latent: np.ndarray, labels, n_neighbors: int = 15, seed: int = 0, max_iter: int = 20) -> dict:
    """ARI and NMI of Leiden clusters, with as many clusters as distinct ``labels`` (see
    :func:`leiden_n_clusters`), against ``labels`` (n_cells,).

    Returns:
        ``{"ari", "nmi", "resolution", "n_clusters"}`` (the found cluster count).
    """
    labels = np.asarray(labels).astype(str)
    res = leiden_n_clusters(latent, len(np.unique(labels)), n_neighbors=n_neighbors, seed=seed, max_iter=max_iter)
    return {**clustering_agreement(labels, res["clusters"]), "resolution": res["resolution"],
            "n_clusters": res["n_clusters"]}
