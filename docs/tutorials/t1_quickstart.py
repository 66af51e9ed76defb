# %% [markdown]
# # Quick start: Kang et al. 2018 PBMCs
#
# Peripheral blood mononuclear cells of eight lupus patients, half of each sample stimulated with interferon-beta
# (Kang et al. 2018, *Nat. Biotechnol.* 36:89; the muscat subset: 1,556 cells, 1,267 genes, two donors, five cell
# types). We fit a count VAE, embed and cluster its latent space, find marker genes with Bayes-factor differential
# expression, and write the HTML report that `cellvae fit` makes.
#
# This page was executed when the site was built. The model trains for 60 epochs here (about half a minute on two
# CPU cores); `cellvae fit` would choose 400 with early stopping. `make test` runs the same script with
# `CELLVAE_TUTORIAL_FAST=1`: 300 cells and 3 epochs, to check that it still runs, not what it shows.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
import torch

import cellvae

FAST = os.environ.get("CELLVAE_TUTORIAL_FAST") == "1"
EPOCHS = 3 if FAST else 60
torch.manual_seed(0)

adata = cellvae.read_data("kang2018_ifnb_pbmc_muscat.h5ad")  # found in $CELLVAE_DATA_DIR
if FAST:
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 300, replace=False)].copy()
adata

# %% [markdown]
# `X` holds raw counts, which the model needs. `cell_type`, `condition` (ctrl / stim) and `donor` are in `obs`.

# %%
adata.obs[["cell_type", "condition", "donor"]].value_counts().unstack("condition")

# %% [markdown]
# ## Fit the model
#
# `CountVAE` is the scVI model: a ZINB likelihood by default, the donor as a batch covariate of the decoder. Every
# setting defaults to scvi-tools' (`n_latent=10`, `n_hidden=128`, ...). `train` holds out 10 % of the cells as a
# validation set, warms the KL weight up over the first half of the epochs, and keeps the best weights.

# %%
model = cellvae.CountVAE(adata, batch_key="donor", labels_key="cell_type")
model.train(max_epochs=EPOCHS, progress_bar=False, seed=0)
model

# %%
h = model.history
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(h["epoch"], h["train_elbo"], label="training")
ax.plot(h["epoch"], h["validation_elbo"], label="validation")
ax.set_xlabel("epoch")
ax.set_ylabel("ELBO (nats per cell)")
ax.legend()
plt.show()
print(f"validation ELBO {h['validation_elbo'][-1]:.1f} nats/cell; held-out log p(x) "
      f"{model.get_marginal_ll(indices=model.validation_indices, n_samples=50 if FAST else 200, seed=0):.1f}")

# %% [markdown]
# ## Latent space, UMAP and clusters
#
# The latent representation is the mean of `q(z | x)`, one row per cell. scanpy builds the neighbour graph on it,
# then UMAP and Leiden clusters, as for a PCA.

# %%
adata.obsm["X_cellvae"] = model.get_latent_representation()
sc.pp.neighbors(adata, use_rep="X_cellvae", random_state=0)
if FAST:  # UMAP's first call compiles for ~20 s: the reduced run plots two latent dimensions instead
    adata.obsm["X_umap"] = adata.obsm["X_cellvae"][:, :2]
else:
    sc.tl.umap(adata, random_state=0)
sc.tl.leiden(adata, key_added="cellvae_leiden", flavor="igraph", n_iterations=2, directed=False, random_state=0)
sc.pl.umap(adata, color=["cell_type", "condition", "cellvae_leiden"], wspace=0.4, show=False)
plt.show()

# %%
from cellvae.metrics import clustering_agreement

clustering_agreement(adata.obs["cell_type"].astype(str), adata.obs["cellvae_leiden"].astype(str))

# %% [markdown]
# The cell types separate; the stimulation moves every type along the same direction, which tutorial 2 uses.
#
# ## Marker genes
#
# `differential_expression` compares each cell type with the rest by sampling normalized expression from the model
# (Bayes factors, Lopez et al. 2018; `mode="change"` tests a log fold change above `delta`).

# %%
de = model.differential_expression(groupby="cell_type", mode="change", n_samples=200 if FAST else 2000, seed=0)
top = (de[de["lfc_mean"] > 0].groupby("group1", observed=True).head(5)
       .rename_axis("gene").reset_index()[["group1", "gene", "lfc_mean", "proba_de"]])
top

# %%
markers = {g: list(b["gene"][:3]) for g, b in top.groupby("group1", observed=True)}
sc.pl.dotplot(adata, markers, groupby="cell_type", show=False)
plt.show()

# %% [markdown]
# ## The same in one command, with its report
#
# `cellvae fit` runs all of the above (and more: metrics, figures, saved model) and writes `report.html`. Here it
# runs in-process through the job it calls, with few epochs; the report is copied next to this page.

# %%
from cellvae.jobs.fit import fit_job

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "kang.h5ad"
    adata.write_h5ad(path)
    metrics = fit_job(path, Path(tmp) / "out", labels_key="cell_type", batch_key="donor", max_epochs=EPOCHS,
                      progress_bar=False, log=lambda m: None)
    report = Path("t1_report.html")
    report.write_text((Path(tmp) / "out" / "report.html").read_text())
{k: metrics[k] for k in ("n_epochs", "validation_elbo", "leiden_ari", "kmeans_ari", "batch_asw")}

# %% [markdown]
# The report: [t1_report.html](../t1_report.html) (data, settings, training curves, metrics, UMAPs, marker genes).
#
# Next: [differential expression and perturbation](../t2_de_perturbation/) on the same data.
