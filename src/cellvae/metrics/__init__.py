"""Evaluation metrics for cellvae models.

Likelihood (:mod:`cellvae.metrics.likelihood`; a module, prepared cells and cell indices; nats per cell):

- :func:`compute_elbo`: ELBO per cell and its reconstruction and KL parts (Kingma & Welling 2014);
- :func:`compute_marginal_ll`: importance-sampled ``log p(x)``, the IWAE estimator (Burda et al. 2016), batched
  over cells and samples so K = 1000 samples fit in memory;
- :func:`compute_reconstruction_error`: ``-log p(x | z)`` with z sampled from q.

Clustering against known labels (:mod:`cellvae.metrics.clustering`; a latent (n_cells, n_latent) and labels):

- :func:`kmeans_agreement`, :func:`leiden_agreement`: ARI and NMI of KMeans / Leiden clusters with as many
  clusters as labels; :func:`leiden_n_clusters`: the resolution search; :func:`silhouette_labels`: ASW.

Disentanglement (:mod:`cellvae.metrics.disentangle`; a latent and discrete factors such as cell type or batch):

- :func:`mutual_information_gap`: MIG (Chen et al. 2018) on latent dimensions discretized into 20 bins;
  :func:`latent_factor_mutual_info`, :func:`discretize_latent`: its parts.

Batch mixing (:mod:`cellvae.metrics.integration`):

- :func:`batch_classifier_accuracy`: cross-validated balanced accuracy of a batch classifier on the latent space;
- :func:`batch_silhouette`: scIB's batch ASW;
- :func:`scib_benchmark` (needs the optional ``scib-metrics``): iLISI, kBET, graph connectivity, batch ASW, PCR
  comparison, bio conservation, total.

:class:`cellvae.CountVAE` wraps the likelihood metrics as ``get_elbo``, ``get_marginal_ll`` and
``get_reconstruction_error``; ``cellvae evaluate`` (:mod:`cellvae.evaluate`) reports all of them.
"""

from .clustering import clustering_agreement, kmeans_agreement, kmeans_clusters, leiden_agreement, leiden_clusters, leiden_n_clusters, silhouette_labels
from .evaluation import METRICS, bio_conservation, depth_r2, evaluate_latent
from .disentangle import discretize_latent, latent_factor_mutual_info, mutual_information_gap
from .integration import SCIB_INSTALL_HINT, batch_classifier_accuracy, batch_silhouette, scib_available, scib_benchmark
from ..data.tensors import as_indices
from ..train.evaluate import compute_elbo, compute_marginal_ll, compute_reconstruction_error

__all__ = [
    "evaluate_latent",
    "depth_r2",
    "bio_conservation",
    "METRICS",
    "compute_elbo",
    "compute_marginal_ll",
    "compute_reconstruction_error",
    "as_indices",
    "kmeans_clusters",
    "clustering_agreement",
    "kmeans_agreement",
    "silhouette_labels",
    "leiden_clusters",
    "leiden_n_clusters",
    "leiden_agreement",
    "batch_classifier_accuracy",
    "batch_silhouette",
    "scib_available",
    "scib_benchmark",
    "SCIB_INSTALL_HINT",
    "mutual_information_gap",
    "latent_factor_mutual_info",
    "discretize_latent",
]
