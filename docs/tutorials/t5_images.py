# %% [markdown]
# # Cell images: ImageVAE on Jurkat cell-cycle images
#
# Imaging flow cytometry of Jurkat cells (BBBC048; Blasi et al. 2016, Eulenberg et al. 2017): 40 x 40 pixel tiles
# with three channels (brightfield, a DNA stain, darkfield), each labelled with its cell-cycle phase. A convolutional
# VAE (`ImageVAE`) learns a 16-dimensional latent space from the pixels alone; we look at it by phase, decode a grid
# over it, and interpolate from G1 to mitosis.
#
# This page trains on 2,400 images (all phases, G1 subsampled) with a smaller network for 10 epochs, about a minute
# on two CPU cores; `benchmarks/results/image_vae.md` has the full model (30 epochs, all images).
# `CELLVAE_TUTORIAL_FAST=1` (`make test`): 300 images, 2 epochs.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.decomposition import PCA

import cellvae

FAST = os.environ.get("CELLVAE_TUTORIAL_FAST") == "1"
torch.manual_seed(0)
d = np.load(Path(os.environ["CELLVAE_DATA_DIR"]) / "images" / "jurkat_cellcycle_40px.npz")
images, labels, names = d["images"], d["labels"], [str(n) for n in d["label_names"]]
train = d["split"] == "train"
rng = np.random.default_rng(0)
n_g1 = 100 if FAST else 1000
keep = np.concatenate([rng.choice(np.flatnonzero(train & (labels == 0)), n_g1, replace=False),
                       *[np.flatnonzero(train & (labels == k))[: (40 if FAST else 400)] for k in range(1, 7)]])
x, y = images[keep], labels[keep]
print(f"{len(x)} training images:", {names[k]: int((y == k).sum()) for k in range(7)})

# %%
fig, axes = plt.subplots(3, 7, figsize=(10, 4.5))
for k in range(7):
    img = x[np.flatnonzero(y == k)[0]]
    for c in range(3):
        axes[c, k].imshow(img[..., c], cmap="gray")
        axes[c, k].axis("off")
    axes[0, k].set_title(names[k], fontsize=9)
fig.suptitle("One cell per phase; rows: brightfield, DNA stain, darkfield")
plt.show()

# %% [markdown]
# ## Training

# %%
vae = cellvae.ImageVAE(n_channels=3, image_size=40, n_latent=16, channels=(16, 32, 64))
vae.train(x, labels=y, max_epochs=2 if FAST else 10, batch_size=64, progress_bar=False, seed=0)
print(vae, f"validation ELBO {vae.history['validation_elbo'][-1]:.0f} nats per image")

# %% [markdown]
# ## The latent space by phase
#
# The first two principal components of the latent means (test-split images, not seen in training).

# %%
test = np.flatnonzero(d["split"] == "test")
test = test[(labels[test] != 0) | (rng.random(len(test)) < 0.3)][: 300 if FAST else 1200]
z = vae.get_latent_representation(images[test])
pca = PCA(2).fit(z)
pc = pca.transform(z)
fig, ax = plt.subplots(figsize=(5.5, 4.5))
for k in range(7):
    m = labels[test] == k
    ax.scatter(pc[m, 0], pc[m, 1], s=6, label=names[k])
ax.set_xlabel("latent PC 1")
ax.set_ylabel("latent PC 2")
ax.legend(markerscale=2, fontsize=8)
plt.show()

# %% [markdown]
# ## A grid over the latent space
#
# Codes on a 7 x 7 grid spanning two standard deviations along the two principal components (the other directions at
# the mean), decoded; the DNA-stain channel is shown.

# %%
steps = np.linspace(-2, 2, 7)
sd = np.sqrt(pca.explained_variance_)
grid = np.array([pca.mean_ + a * sd[0] * pca.components_[0] + b * sd[1] * pca.components_[1]
                 for b in steps[::-1] for a in steps], dtype=np.float32)
tiles = vae.decode(grid)
fig, axes = plt.subplots(7, 7, figsize=(6, 6))
for ax, t in zip(axes.ravel(), tiles):
    ax.imshow(t[..., 1], cmap="magma", vmin=0, vmax=float(tiles[..., 1].max()))
    ax.axis("off")
fig.suptitle("Decoded latent grid (DNA stain), PC 1 across, PC 2 down")
plt.show()

# %% [markdown]
# ## Interpolation from G1 to metaphase
#
# The mean codes of two phases (`group_latent_means`), and the straight path between them, decoded.

# %%
means = vae.group_latent_means(x, y)
path = vae.interpolate(means[0], means[4], n_steps=8)
fig, axes = plt.subplots(2, 8, figsize=(11, 3))
for i, img in enumerate(path):
    axes[0, i].imshow(img[..., 0], cmap="gray")
    axes[1, i].imshow(img[..., 1], cmap="magma")
    axes[0, i].set_title(f"t = {i / 7:.2f}", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
fig.suptitle("G1 (left) to metaphase (right): brightfield (top) and DNA stain (bottom)")
plt.show()
