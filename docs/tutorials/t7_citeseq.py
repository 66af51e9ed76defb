# %% [markdown]
# # RNA and surface protein (CITE-seq)
#
# CITE-seq measures each cell's RNA and a panel of surface proteins (antibody-derived tags, ADTs). `RNAProteinVAE`
# is the totalVI-class model (Gayoso et al. 2021): one latent space for both modalities, the scVI likelihood for the
# RNA, and for each protein a two-component negative-binomial mixture of background (ambient antibodies, unspecific
# binding) and foreground (the protein is on the cell). Its outputs are the latent representation, denoised RNA and
# protein, the probability that each protein is on each cell, held-out log-likelihoods per modality, and
# differential expression of genes and proteins together.
#
# Data: 8,617 cord-blood cells (Stoeckius et al. 2017), 2,000 genes and 13 ADTs as raw counts in
# `obsm["protein_expression"]`, with 13 annotated cell types (mouse cells were spiked in as a control).
#
# 100 epochs (under a minute on a laptop's CPU); `CELLVAE_TUTORIAL_FAST=1` (`make test`): 600 cells, 3 epochs.

# %%
import os

import numpy as np
import pandas as pd
import scanpy as sc
import torch

import cellvae

FAST = os.environ.get("CELLVAE_TUTORIAL_FAST") == "1"
torch.manual_seed(0)
adata = cellvae.read_data("cbmc_citeseq_stoeckius2017_8617cells.h5ad")
if FAST:
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 600, replace=False)].copy()
print(adata)
adata.obsm["protein_expression"].iloc[:3]

# %% [markdown]
# ## Training
#
# The model reads the RNA counts from `X` (or `layer=`) and the protein counts from `obsm[protein_key]`, a DataFrame
# with one column per protein. The prior of each protein's background is set from the data before training: from
# isotype-control antibodies when the panel names them, otherwise from a two-component fit of each protein's low
# counts. Proteins that a batch did not measure are masked, not read as zeros (`batch_key=`). `cellvae fit DATA
# --protein-key protein_expression` does all of this from the command line and adds protein panels to its report.

# %%
model = cellvae.RNAProteinVAE(adata, protein_key="protein_expression")
model.train(max_epochs=3 if FAST else 100, progress_bar=False, seed=0)
print(model)
print(f"{model.history['n_skipped_steps']} steps skipped for non-finite losses")

# %% [markdown]
# ## Held-out fit, per modality
#
# The cells the model did not train on (`validation_indices`) give the ELBO and the importance-sampled log p,
# in nats per cell (higher is better), for the RNA, the proteins, and both.

# %%
val = model.validation_indices
elbo = model.get_elbo(indices=val, modality="all", seed=0)
logp = {m: model.get_marginal_ll(indices=val, n_samples=20 if FAST else 100, modality=m, seed=0)
        for m in ("rna", "protein", "joint")}
pd.DataFrame({"ELBO": elbo, "log p (IWAE)": logp}).round(2)

# %% [markdown]
# ## The joint latent space
#
# One latent representation per cell, shape (n_cells, n_latent), for scanpy's neighbours, UMAP and Leiden.

# %%
adata.obsm["X_cellvae"] = model.get_latent_representation()
sc.pp.neighbors(adata, use_rep="X_cellvae", random_state=0)
sc.tl.umap(adata, random_state=0)
sc.pl.umap(adata, color="cell_type", frameon=False)

# %% [markdown]
# ## Denoised protein and the foreground probability
#
# `get_normalized_expression` returns the denoised RNA (rows sum to `library_size`) and the protein foreground
# intensity in counts: the expected protein counts with the background removed. `get_protein_foreground_probability`
# is `1 - pi`, the probability that a protein's counts come from the foreground. Raw ADT counts carry a background
# in every cell: below, CD3 (a T-cell protein) has counts in B cells, NK cells and monocytes too, and CD19 (a B-cell
# protein) in every type.

# %%
rna, protein = model.get_normalized_expression(library_size=1e4)
fg = model.get_protein_foreground_probability()
adata.obsm["protein_denoised"] = protein
for p in ("CD3", "CD19", "CD14"):
    adata.obs[f"{p} denoised (log1p)"] = np.log1p(protein[p].to_numpy())
sc.pl.umap(adata, color=[f"{p} denoised (log1p)" for p in ("CD3", "CD19", "CD14")], frameon=False)

# %%
types = ["B", "CD4 T", "CD8 T", "NK", "CD14+ Mono", "Mouse"]
raw = adata.obsm["protein_expression"]
keep = adata.obs["cell_type"].isin(types).to_numpy()
by_type = adata.obs["cell_type"][keep].astype(str).to_numpy()
pd.concat({
    "raw counts (mean)": raw[keep].groupby(by_type)[["CD3", "CD19", "CD14"]].mean(),
    "foreground probability (mean)": fg[keep].groupby(by_type)[["CD3", "CD19", "CD14"]].mean(),
}, axis=1).round(2)

# %% [markdown]
# The foreground probability is a call relative to the background the model learned for each protein, not a
# ground truth. For CD3 it is near 1 in T cells and near 0 elsewhere. Where a cell type has more counts of a protein
# than the others without carrying it (unspecific binding: NK cells and monocytes carry Fc receptors, which bind
# antibodies), it can be called foreground: compare CD19 in NK cells and CD14 in CD4 T cells with their raw counts.
# On this set, ranking marker-positive against marker-negative types by raw counts scores higher than ranking them by
# the foreground probability, for this model and for scvi-tools' TOTALVI (`benchmarks/results/rna_protein.md`).
# Check the calls against the raw counts and known biology before gating cells on them; isotype-control antibodies
# in the panel, when there are any, give the model a direct measure of the background (`isotype_controls=`).

# %% [markdown]
# ## Differential expression of genes and proteins together
#
# Bayes-factor DE (Lopez et al. 2018, Boyeau et al. 2019) with scvi-tools' column names: genes are compared on the
# decoder's normalized expression, proteins (indexed `<protein>_protein`) on their foreground intensity.

# %%
de = model.differential_expression(groupby="cell_type", group1="B", group2="CD4 T", n_samples=500 if FAST else 5000)
is_protein = de.index.str.endswith("_protein")
print("proteins, B against CD4 T:")
print(de.loc[is_protein, ["proba_de", "bayes_factor", "lfc_mean"]].sort_values("lfc_mean").round(2).to_string())
de.loc[~is_protein, ["proba_de", "bayes_factor", "lfc_mean"]].head(8)

# %% [markdown]
# ## MuData input
#
# The scverse convention for multimodal data is a `mudata.MuData` with `rna` and `prot` modalities; the model takes
# it as it is (the cells must be the same, in the same order).

# %%
import anndata as ad
import mudata as md

prot = ad.AnnData(adata.obsm["protein_expression"].to_numpy().astype(np.float32), obs=adata.obs[[]],
                  var=pd.DataFrame(index=adata.obsm["protein_expression"].columns))
md.set_options(pull_on_update=False)  # mudata >= 0.3.1: the coming default, and no FutureWarning
mdata = md.MuData({"rna": adata.copy(), "prot": prot})
print(cellvae.RNAProteinVAE(mdata))

# %% [markdown]
# `benchmarks/results/rna_protein.md` compares the model with scvi-tools' TOTALVI on this set and on 10x's pbmc10k
# CITE-seq set: held-out log p per modality, clustering, the foreground AUROC of marker proteins, and speed.
