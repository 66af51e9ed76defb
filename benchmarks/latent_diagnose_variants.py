"""Issue 20 diagnostic: cellvae defaults against one training change each (dispersion LR x1, scVI decoder-bias init,
scvi-tools schedule) on one dataset, all cells, 2,000 seurat_v3 HVGs when > 5,000 genes: KMeans / Leiden ARI (k = labels),
batch classifier balanced accuracy, best validation ELBO. Prints one JSON line per run.

    .venv/bin/python benchmarks/latent_diagnose_variants.py DATASET default,disp_lr1,bias_default,scvi_schedule 0,1,2
"""
from pathlib import Path
import os, warnings, sys, time, json, numpy as np, anndata as ad, torch, scanpy as sc
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from cellvae import CountVAE
from cellvae.metrics import kmeans_agreement, leiden_agreement, batch_classifier_accuracy
name = sys.argv[1]; variants = sys.argv[2].split(","); seeds = [int(s) for s in sys.argv[3].split(",")]
DATA = Path(os.environ.get("CELLVAE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
a = ad.read_h5ad(DATA / f"{name}.h5ad")
if a.n_vars > 5000:
    sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=2000)
    a = a[:, a.var["highly_variable"]].copy()
y = a.obs["cell_type"].astype(str).to_numpy(); b = a.obs["batch"].astype(str).to_numpy()
V = {"default": ({}, {}), "disp_lr1": ({}, {"dispersion_lr_multiplier": 1.0}),
     "bias_default": ({}, {"decoder_bias_init": "default"}),
     "scvi_schedule": ({}, {"max_epochs": 400, "n_epochs_kl_warmup": 400, "early_stopping": False}),
     "nb": ({"gene_likelihood": "nb"}, {})}
for seed in seeds:
    for v in variants:
        mk, tk = V[v]; t = time.time()
        m = CountVAE(a, **mk); m.train(seed=seed, progress_bar=False, n_threads=1, **tk)
        z = m.get_latent_representation()
        r = dict(v=v, seed=seed, epochs=len(m.history["epoch"]), km=round(kmeans_agreement(z, y, seed=0)["ari"], 3),
                 leiden=round(leiden_agreement(z, y, seed=0)["ari"], 3), batch_acc=round(batch_classifier_accuracy(z, b), 3),
                 val_elbo=round(float(max(m.history["validation_elbo"])), 1), s=round(time.time() - t))
        print(json.dumps(r), flush=True)
