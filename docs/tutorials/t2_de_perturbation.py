# %% [markdown]
# # Differential expression and perturbation prediction
#
# On the Kang et al. 2018 PBMCs (control and interferon-beta stimulated), we hold out the stimulated CD14+
# monocytes, train a count VAE on the rest, test which genes the stimulation changes, and predict the held-out cells
# from their control counterparts by latent arithmetic (scGen, Lotfollahi et al. 2019), comparing the prediction
# with the real stimulated monocytes the model never saw.
#
# 60 epochs here (about half a minute); with `CELLVAE_TUTORIAL_FAST=1` (`make test`) 3 epochs on a subset.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import cellvae

FAST = os.environ.get("CELLVAE_TUTORIAL_FAST") == "1"
EPOCHS = 3 if FAST else 60
torch.manual_seed(0)
HELD_OUT = "CD14+ Monocytes"

adata = cellvae.read_data("kang2018_ifnb_pbmc_muscat.h5ad")
if FAST:
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 400, replace=False)].copy()
held = (adata.obs["cell_type"] == HELD_OUT) & (adata.obs["condition"] == "stim")
train = adata[~held].copy()
print(f"training on {train.n_obs} cells; held out: {int(held.sum())} stimulated {HELD_OUT}")

# %%
model = cellvae.CountVAE(train, labels_key="cell_type")
model.train(max_epochs=EPOCHS, progress_bar=False, seed=0)

# %% [markdown]
# ## Stimulated against control
#
# `differential_expression` with two groups of a column. In `"change"` mode, `proba_de` is the posterior
# probability that the absolute log2 fold change exceeds `delta` (0.25), and `bayes_factor` its log odds; genes are
# called at a posterior expected false discovery rate of 5 %.

# %%
de = model.differential_expression(groupby="condition", group1="stim", group2="ctrl", mode="change",
                                   n_samples=300 if FAST else 3000, seed=0)
de[["lfc_mean", "proba_de", "bayes_factor", "is_de_fdr_0.05"]].head(15)

# %%
fig, ax = plt.subplots(figsize=(5, 4))
called = de["is_de_fdr_0.05"].astype(bool)
ax.scatter(de["lfc_mean"], de["bayes_factor"], s=4, c=np.where(called, "C3", "0.6"))
for g in de.index[:8]:
    ax.annotate(g, (de.loc[g, "lfc_mean"], de.loc[g, "bayes_factor"]), fontsize=7)
ax.set_xlabel("log2 fold change, stim vs ctrl (posterior mean)")
ax.set_ylabel("log Bayes factor")
ax.set_title(f"{int(called.sum())} genes called at FDR 5 %")
plt.show()

# %% [markdown]
# The interferon-stimulated genes (ISG15, IFIT1-3, MX1, ...) lead the list.
#
# ## Predicting the held-out cell type
#
# `predict_perturbation` moves each control CD14+ monocyte by the stimulation's latent shift, estimated on the other
# cell types only (balanced over them), and decodes it. The result holds expected counts at each cell's library
# size. We compare mean log expression (counts per 10,000, log1p) of the prediction and of the real stimulated
# monocytes; "no change" (the control cells themselves) is the baseline.

# %%
ctrl = adata[(adata.obs["cell_type"] == HELD_OUT) & (adata.obs["condition"] == "ctrl")].copy()
real = adata[held].copy()
pred = model.predict_perturbation(ctrl, condition_key="condition", control="ctrl", perturbed="stim",
                                  cell_type_key="cell_type", cell_type=HELD_OUT)


def mean_log_expression(a):
    x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4).mean(0)


genes = list(model.spec.gene_names)
m_ctrl = pd.Series(mean_log_expression(ctrl[:, genes]), index=genes)
m_real = pd.Series(mean_log_expression(real[:, genes]), index=genes)
m_pred = pd.Series(mean_log_expression(pred[:, genes]), index=genes)
top = (m_real - m_ctrl).abs().sort_values(ascending=False).index[:100]


def r2(a, b):
    return float(np.corrcoef(a, b)[0, 1] ** 2)


pd.DataFrame({"all genes": [r2(m_pred, m_real), r2(m_ctrl, m_real)],
              "100 most changed genes": [r2(m_pred[top], m_real[top]), r2(m_ctrl[top], m_real[top])]},
             index=["prediction vs real stim", "no change (ctrl) vs real stim"])

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
for ax, (name, m) in zip(axes, [("control (no change)", m_ctrl), ("predicted", m_pred)]):
    ax.scatter(m_real[top], m[top], s=6)
    lim = [0, float(max(m_real[top].max(), m[top].max())) * 1.05]
    ax.plot(lim, lim, color="0.5", lw=0.8)
    for g in ["ISG15", "IFIT1", "IFIT3", "CXCL10", "MX1"]:
        if g in top:
            ax.annotate(g, (m_real[g], m[g]), fontsize=7)
    ax.set_xlabel(f"real stimulated {HELD_OUT}")
    ax.set_ylabel(name)
fig.suptitle("Mean log expression of the 100 most changed genes")
plt.show()

# %% [markdown]
# The prediction recovers much of the interferon response of a cell type the model never saw stimulated (compare
# the two rows: "no change" explains none of the change in the most changed genes).
# `benchmarks/results/perturbation.md` measures this for every held-out type against baselines.
