# %% [markdown]
# # Generation, interpolation and anomaly scores
#
# A count VAE is a generative model: it can draw new cells, decode paths between cell states, and tell how unlike
# its training cells a new cell is. We train on the Kang et al. 2018 PBMCs **without the B cells**, generate cells
# of the types it knows, interpolate from CD4 T cells to CD14+ monocytes, and score the B cells as anomalies.
#
# 60 epochs (about half a minute); `CELLVAE_TUTORIAL_FAST=1` (`make test`): a subset and 3 epochs.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

import cellvae
from cellvae.analysis.latent import plot_interpolation

FAST = os.environ.get("CELLVAE_TUTORIAL_FAST") == "1"
EPOCHS = 3 if FAST else 60
torch.manual_seed(0)

adata = cellvae.read_data("kang2018_ifnb_pbmc_muscat.h5ad")
if FAST:
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 400, replace=False)].copy()
is_b = (adata.obs["cell_type"] == "B cells").to_numpy()
reference = adata[~is_b].copy()
model = cellvae.CountVAE(reference, labels_key="cell_type", gene_likelihood="nb")
model.train(max_epochs=EPOCHS, progress_bar=False, seed=0)

# %% [markdown]
# ## Generating cells
#
# `sample(n, labels=...)` draws `z` from the aggregated posterior of that label's training cells, decodes it, and
# samples counts from the likelihood at library sizes resampled from the training cells. Below: the mean log
# expression of known markers in real and generated cells of two types.

# %%
markers = ["CD3D", "IL7R", "CCL5", "NKG7", "LYZ", "CD14", "S100A9", "FCGR3A"]


def mean_log_cp10k(x, genes, names):
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    cp = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    idx = [list(names).index(g) for g in genes]
    return cp[:, idx].mean(0)


rows = {}
for label in ["CD4 T cells", "CD14+ Monocytes"]:
    gen = model.sample(200, labels=label, labels_key="cell_type", seed=0)
    real = reference[reference.obs["cell_type"] == label]
    rows[f"{label}: real"] = mean_log_cp10k(real[:, model.spec.gene_names].X, markers, model.spec.gene_names)
    rows[f"{label}: generated"] = mean_log_cp10k(gen.X, markers, gen.var_names)
pd.DataFrame(rows, index=markers).T.round(2)

# %% [markdown]
# ## Interpolation
#
# `interpolate` decodes the straight latent path between the mean codes of two groups of cells, as normalized
# expression (counts per 10,000). T-cell genes fall and monocyte genes rise along it.

# %%
path = model.interpolate(reference.obs["cell_type"] == "CD4 T cells",
                         reference.obs["cell_type"] == "CD14+ Monocytes", n_steps=12)
plot_interpolation(path, ["CD3D", "IL7R", "LYZ", "S100A9", "CD14"])
plt.show()

# %% [markdown]
# ## Anomaly scores
#
# `get_anomaly_score` scores cells against the training (reference) cells; higher is less like them. The default,
# `"latent_knn"`, is the mean latent distance to the nearest reference cells; `"gene_surprise"` looks at the genes
# the model explains worst. The B cells were never seen, so they should score high: the AUROC says how well each
# score separates them from the other (seen) types.

# %%
aurocs = {}
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, method in zip(axes, ["latent_knn", "gene_surprise"]):
    score = model.get_anomaly_score(adata, method=method)
    aurocs[method] = roc_auc_score(is_b, score)
    ax.hist([score[~is_b], score[is_b]], bins=40, histtype="step", density=True, label=["seen types", "B cells"])
    ax.set_title(f"{method}: AUROC {aurocs[method]:.3f}")
    ax.set_xlabel("anomaly score")
axes[0].legend()
plt.show()
aurocs

# %% [markdown]
# `annotate_anomalies` turns a score into a call, with a threshold at the 99th percentile of held-out reference
# cells' scores (about 1 % of cells like the reference are flagged). We use the score that separated the B cells
# better above.

# %%
best = max(aurocs, key=aurocs.get)
ann = model.annotate_anomalies(adata, method=best, copy=True)
pd.crosstab(adata.obs["cell_type"], ann.obs["cellvae_is_anomaly"], normalize="index").round(3)
