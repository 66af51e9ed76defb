"""Issue 20 diagnostic: scvi-tools SCVI and cellvae CountVAE at their defaults on the same cells (all cells, 2,000
seurat_v3 HVGs when > 5,000 genes), one seed: KMeans / Leiden ARI, scIB batch ASW, label silhouette, and the share of
latent variance between labels, between batches, and between batches within labels. Needs .venv-bench.

    .venv-bench/bin/python benchmarks/latent_diagnose_geometry.py DATASET SEED
"""
from pathlib import Path
import os, warnings, sys, numpy as np, anndata as ad, scanpy as sc, torch, json, time
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
name, seed = sys.argv[1], int(sys.argv[2])
DATA = Path(os.environ.get("CELLVAE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
a = ad.read_h5ad(DATA / f"{name}.h5ad")
if a.n_vars > 5000:
    sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=2000); a = a[:, a.var["highly_variable"]].copy()
y = a.obs["cell_type"].astype(str).to_numpy(); b = a.obs["batch"].astype(str).to_numpy()
from cellvae import CountVAE
from cellvae.metrics import kmeans_agreement, leiden_agreement, batch_silhouette, silhouette_labels
import scvi
scvi.settings.seed = seed
t = time.time(); s = a.copy(); scvi.model.SCVI.setup_anndata(s); ms = scvi.model.SCVI(s); ms.train(accelerator="cpu", enable_progress_bar=False)
zs = ms.get_latent_representation(); ts = time.time() - t
t = time.time(); mc = CountVAE(a); mc.train(seed=seed, progress_bar=False, n_threads=1); zc = mc.get_latent_representation(); tc = time.time() - t
for tool, z in (("scvi", zs), ("cellvae", zc)):
    # share of latent variance explained by batch and by label (one-way, summed over dims)
    tot = ((z - z.mean(0)) ** 2).sum()
    def expl(g):
        return sum(((z[g == k].mean(0) - z.mean(0)) ** 2).sum() * (g == k).sum() for k in np.unique(g)) / tot
    print(json.dumps(dict(tool=tool, km=round(kmeans_agreement(z, y, seed=0)["ari"], 3), leiden=round(leiden_agreement(z, y, seed=0)["ari"], 3),
        batch_asw=round(batch_silhouette(z, b, y), 3), label_sil=round(silhouette_labels(z, y), 3),
        var_by_label=round(float(expl(y)), 3), var_by_batch=round(float(expl(b)), 3),
        var_by_batch_within_label=round(float(sum(((z[(y==l)&(b==k)].mean(0)-z[y==l].mean(0))**2).sum()*((y==l)&(b==k)).sum() for l in np.unique(y) for k in np.unique(b) if ((y==l)&(b==k)).any())/tot), 3))), flush=True)
print("seconds scvi", round(ts), "cellvae", round(tc))
