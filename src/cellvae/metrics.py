"""Metrics of a latent space against known labels (scikit-learn implementations).

- ARI: adjusted Rand index (Hubert & Arabie 1985); NMI: normalized mutual information (arithmetic mean
  normalisation, scikit-learn's default); both in [0, 1] for clusterings, 1 = identical partitions.
- KMeans clustering uses k = number of label categories (the protocol of the scVI paper's clustering benchmark).
- ASW: silhouette width of the labels on the latent space, rescaled to [0, 1] as ``(s + 1) / 2`` (scib).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

__all__ = ["kmeans_clusters", "clustering_agreement", "kmeans_agreement", "silhouette_labels"]


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
    """Average silhouette width of ``labels`` on ``latent`` (Euclidean), rescaled to [0, 1]."""
    labels = np.asarray(labels).astype(str)
    if len(np.unique(labels)) < 2:
        return float("nan")
    n = len(labels)
    s = silhouette_score(
        latent, labels, sample_size=min(sample_size, n) if sample_size else None, random_state=seed
    )
    return float((s + 1.0) / 2.0)
