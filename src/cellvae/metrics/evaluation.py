"""One evaluation of a latent space against known labels, used by every benchmark and by ``cellvae evaluate``.

:func:`evaluate_latent` returns, for a latent representation (n_cells, n_latent) and labels (n_cells,):

- ``kmeans_ari``, ``kmeans_nmi``: KMeans with k = the number of labels (``n_init=10``) against the labels;
- ``leiden_ari``, ``leiden_nmi``: Leiden clusters of the 15-nearest-neighbour graph, the resolution bisected to k
  clusters (:func:`cellvae.metrics.leiden_agreement`);
- with scib-metrics installed (``pip install "cellvae[bench]"``): the bio-conservation metrics of scIB (Luecken et
  al. 2022, Nat. Methods 19:41), unscaled: ``isolated_labels``, ``silhouette_label``, ``clisi``, ``scib_kmeans_nmi``,
  ``scib_kmeans_ari`` and their mean ``bio_conservation`` (None without scib-metrics);
- with the cells' library sizes: ``depth_r2``, the R² of log library size regressed linearly on the latent (all
  cells), and ``depth_r2_within_labels``: the mean over labels with more than ``min_label_cells`` cells of that R²
  within the label (how much of the latent encodes sequencing depth beyond cell type; lower is better for a model
  whose likelihood already has the library size).

Held-out ELBO and IWAE log p(x) are properties of a model, not of a latent: each tool computes them with its own
methods (``CountVAE.get_elbo`` / ``get_marginal_ll``, K = 1000 importance samples) and passes them in, so that one
dict holds a run's whole evaluation.
"""

from __future__ import annotations

import numpy as np

from .clustering import kmeans_agreement, leiden_agreement

__all__ = ["evaluate_latent", "depth_r2", "bio_conservation", "METRICS"]

METRICS = ("kmeans_ari", "kmeans_nmi", "leiden_ari", "leiden_nmi", "bio_conservation", "isolated_labels",
           "silhouette_label", "clisi", "scib_kmeans_nmi", "scib_kmeans_ari", "depth_r2", "depth_r2_within_labels",
           "heldout_elbo", "heldout_log_px", "leiden_n_clusters")


def depth_r2(latent: np.ndarray, library, labels=None, min_label_cells: int = 50) -> dict:
    """How much of the latent space encodes sequencing depth.

    Args:
        latent: (n_cells, n_latent) latent means.
        library: (n_cells,) library sizes (total counts per cell, > 0).
        labels: (n_cells,) labels, or None.
        min_label_cells: labels with at most this many cells are left out of the within-label mean.

    Returns:
        ``{"depth_r2": R² over all cells, "depth_r2_within_labels": mean R² over the labels (None without labels or
        without a label that has more than ``min_label_cells`` cells)}``; R² of an ordinary least-squares fit of log
        library size on the latent coordinates (with an intercept), in [0, 1].

    Raises:
        ValueError: shapes that do not match, or library sizes that are not positive.
    """
    z = np.asarray(latent, dtype=np.float64)
    lib = np.asarray(library, dtype=np.float64).reshape(-1)
    if z.ndim != 2 or lib.shape != (z.shape[0],):
        raise ValueError(f"latent (n_cells, n_latent) and library (n_cells,) must match; got {z.shape}, {lib.shape}.")
    if (lib <= 0).any() or not np.isfinite(lib).all():
        raise ValueError("library sizes must be positive and finite.")
    y = np.log(lib)

    def r2(zz: np.ndarray, yy: np.ndarray) -> float:
        a = np.column_stack([zz, np.ones(len(yy))])
        coef, *_ = np.linalg.lstsq(a, yy, rcond=None)
        ss_tot = float(((yy - yy.mean()) ** 2).sum())
        return 0.0 if ss_tot == 0 else max(0.0, 1.0 - float(((yy - a @ coef) ** 2).sum()) / ss_tot)

    out = {"depth_r2": r2(z, y), "depth_r2_within_labels": None}
    if labels is not None:
        labels = np.asarray(labels).astype(str)
        vals = [r2(z[labels == lab], y[labels == lab]) for lab in np.unique(labels)
                if (labels == lab).sum() > min_label_cells]
        out["depth_r2_within_labels"] = float(np.mean(vals)) if vals else None
    return out


def bio_conservation(latent: np.ndarray, labels, n_jobs: int = 1) -> dict | None:
    """scIB's bio-conservation metrics of one embedding (scib-metrics, unscaled; Luecken et al. 2022), or None when
    scib-metrics is not installed: ``isolated_labels``, ``silhouette_label``, ``clisi``, ``scib_kmeans_nmi``,
    ``scib_kmeans_ari`` and their mean ``bio_conservation``. The batch-free versions: every cell is in one batch."""
    try:
        import scib_metrics
        from scib_metrics.nearest_neighbors import pynndescent
    except ImportError:
        return None
    z = np.asarray(latent, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    batch = np.zeros(len(labels), dtype=int)
    neigh = pynndescent(z, n_neighbors=90, random_state=0, n_jobs=n_jobs)
    km = scib_metrics.nmi_ari_cluster_labels_kmeans(z, labels)
    out = {
        "isolated_labels": float(scib_metrics.isolated_labels(z, labels, batch)),
        "silhouette_label": float(scib_metrics.silhouette_label(z, labels)),
        "clisi": float(scib_metrics.clisi_knn(neigh, labels)),
        "scib_kmeans_nmi": float(km["nmi"]),
        "scib_kmeans_ari": float(km["ari"]),
    }
    out["bio_conservation"] = float(np.mean(list(out.values())))
    return out


def evaluate_latent(latent: np.ndarray, labels, library=None, seed: int = 0, heldout_elbo: float | None = None,
                    heldout_log_px: float | None = None, scib: bool = True, n_jobs: int = 1) -> dict:
    """The evaluation of one latent space (module docstring).

    Args:
        latent: (n_cells, n_latent) latent means.
        labels: (n_cells,) known labels.
        library: (n_cells,) library sizes (total counts) for the depth R², or None.
        seed: seed of KMeans and Leiden.
        heldout_elbo, heldout_log_px: the model's held-out ELBO and IWAE log p(x) (nats per cell), stored as given.
        scib: compute scIB's bio-conservation metrics (when scib-metrics is installed).
        n_jobs: threads of the scib neighbour search.

    Returns:
        dict with the keys of :data:`METRICS` (None where not computed).

    Raises:
        ValueError: shapes that do not match.
    """
    z = np.asarray(latent, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"latent (n_cells, n_latent) and labels (n_cells,) must match; got {z.shape}, {labels.shape}.")
    out = dict.fromkeys(METRICS)
    km = kmeans_agreement(z, labels, seed=seed)
    out.update(kmeans_ari=km["ari"], kmeans_nmi=km["nmi"])
    le = leiden_agreement(z, labels, seed=seed)
    out.update(leiden_ari=le["ari"], leiden_nmi=le["nmi"], leiden_n_clusters=le["n_clusters"])
    if scib:
        bio = bio_conservation(z, labels, n_jobs=n_jobs)
        if bio is not None:
            out.update(bio)
    if library is not None:
        out.update(depth_r2(z, library, labels))
    out.update(heldout_elbo=heldout_elbo, heldout_log_px=heldout_log_px)
    return out
