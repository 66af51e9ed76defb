# %% [markdown]
# # Batch integration with and without the adversary
#
# PBMCs sequenced with three 10x chemistries (SAVER-CAT subset: 2,000 cells; `batch`, `cell_type`). The batch
# enters the decoder as a covariate in both models; the second adds an adversarial batch classifier on the latent
# space that the encoder learns to confuse (`adversarial_batch_weight=3`, the value that scored best in
# `benchmarks/results/integration.md`). We compare batch mixing and cell-type conservation.
#
# Metrics: cellvae's own scikit-learn metrics first (the batch classifier's balanced accuracy, lower is better mixed,
# chance 1/3; scIB's batch silhouette, 1 is fully mixed within each cell type; KMeans ARI/NMI and the label silhouette
# for cell types), then the scIB table of `scib-metrics` (`cellvae.metrics.scib_benchmark`, Luecken et al. 2022,
# *Nat Methods* 19:41; unscaled scores, higher is better, total = 0.6 bio conservation + 0.4 batch correction) for
# both models and an unintegrated PCA. `make docs` installs `scib-metrics` (the `docs` extra); without it the last
# cell says so and points to `benchmarks/results/integration.md`.
#
# 1,000 highly variable genes, 60 epochs per model; `CELLVAE_TUTORIAL_FAST=1` uses 300 cells, 200 genes, 3 epochs.

# %%
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import torch

import cellvae
from cellvae.data.preprocess import select_highly_variable_genes
from cellvae.metrics import batch_classifier_accuracy, batch_silhouette, kmeans_agreement, scib_available, \
    silhouette_labels

FAST = os.environ.get("CELLVAE_TUTORIAL_FAST") == "1"
EPOCHS = 3 if FAST else 60
torch.manual_seed(0)

adata = cellvae.read_data("pbmc_10x_3tech_savercat_2000cells.h5ad")
hvg = select_highly_variable_genes(adata, 200 if FAST else 1000, batch_key="batch")
adata = adata[:, hvg].copy()
if FAST:
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 300, replace=False)].copy()
pd.crosstab(adata.obs["cell_type"], adata.obs["batch"])

# %%
results, latents = {}, {}
for name, weight in [("batch covariate", 0.0), ("+ adversary (weight 3)", 3.0)]:
    model = cellvae.CountVAE(adata, batch_key="batch", labels_key="cell_type", adversarial_batch_weight=weight)
    model.train(max_epochs=EPOCHS, progress_bar=False, seed=0)
    z = model.get_latent_representation()
    latents[name] = z
    b = adata.obs["batch"].astype(str).to_numpy()
    y = adata.obs["cell_type"].astype(str).to_numpy()
    km = kmeans_agreement(z, y, seed=0)
    results[name] = {"batch classifier accuracy (chance 0.33)": batch_classifier_accuracy(z, b),
                     "batch ASW (1 = mixed)": batch_silhouette(z, b, y),
                     "KMeans ARI (cell type)": km["ari"], "KMeans NMI (cell type)": km["nmi"],
                     "label silhouette": silhouette_labels(z, y),
                     "validation ELBO": model.history["validation_elbo"][model.history["best_epoch"] - 1]}
pd.DataFrame(results).round(3)

# %% [markdown]
# The adversary lowers the batch classifier's accuracy towards chance (1/3); read the cell-type rows for what it
# costs in biological signal on these data. `benchmarks/results/integration.md` compares the two on several
# datasets and seeds with the scIB metrics.

# %%
fig, axes = plt.subplots(2, 2, figsize=(9, 8))
for row, (name, z) in enumerate(latents.items()):
    a = adata.copy()
    a.obsm["X_cellvae"] = z
    if FAST:  # UMAP's first call compiles for ~20 s: the reduced run plots two latent dimensions instead
        a.obsm["X_umap"] = z[:, :2]
    else:
        sc.pp.neighbors(a, use_rep="X_cellvae", random_state=0)
        sc.tl.umap(a, random_state=0)
    sc.pl.umap(a, color="batch", ax=axes[row, 0], show=False, title=f"{name}: batch")
    sc.pl.umap(a, color="cell_type", ax=axes[row, 1], show=False, title=f"{name}: cell type")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The scIB table
#
# The same latents scored by scib-metrics' `Benchmarker`, with the PCA of log-normalized counts (50 components, the
# embedding before integration) as a third column and as the reference of the PCR comparison score. Batch correction:
# iLISI, kBET, graph connectivity, batch ASW (BRAS) and PCR comparison; bio conservation: isolated labels, KMeans
# NMI/ARI, label silhouette and cLISI.

# %%
if scib_available():
    from cellvae.metrics import scib_benchmark

    y, b = adata.obs["cell_type"].astype(str).to_numpy(), adata.obs["batch"].astype(str).to_numpy()
    pca_input = adata.copy()
    sc.pp.normalize_total(pca_input, target_sum=1e4)
    sc.pp.log1p(pca_input)
    pca = sc.tl.pca(pca_input.X, n_comps=min(50, min(pca_input.shape) - 1), random_state=0)
    embeddings = {"PCA (unintegrated)": pca, **latents}
    with warnings.catch_warnings():  # PCA scored against itself: scib-metrics warns that its PCR comparison is 0
        warnings.filterwarnings("ignore", message="PCR comparison score is negative")
        scib_table = pd.DataFrame({name: scib_benchmark(z, y, b, pre_integrated=pca)
                                   for name, z in embeddings.items()}).T
    columns = ["ilisi", "kbet", "graph_connectivity", "bras", "pcr_comparison", "isolated_labels", "kmeans_nmi",
               "kmeans_ari", "silhouette_label", "clisi", "batch_correction", "bio_conservation", "total"]
    display_table = scib_table[[c for c in columns if c in scib_table.columns]].T.round(3)  # a row per metric
else:
    display_table = "scib-metrics is not installed here (`pip install scib-metrics`): see benchmarks/results/integration.md."
display_table
