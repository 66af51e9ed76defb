"""Where a joint model's clustering score is lost: the label x cluster tables of Leiden (as many clusters as labels)
and KMeans on one tool's latent, trained as in ``benchmarks/rna_protein.py`` (issue 25).

Run with the benchmark environment (scvi-tools 1.5.1 for ``--tool scvi``)::

    .venv-bench/bin/python benchmarks/rna_protein_diagnose.py --dataset cbmc --seed 1              # cellvae
    .venv-bench/bin/python benchmarks/rna_protein_diagnose.py --dataset cbmc --seed 1 --tool scvi  # TOTALVI

Same split (:func:`rna_protein.split`), same training (``--epochs`` epochs without early stopping, 1 thread, each
tool's other defaults: the benchmark's equal-epochs mode) and the same clustering functions as the benchmark
(:func:`cellvae.metrics.clustering.leiden_n_clusters`, :func:`cellvae.metrics.clustering.kmeans_clusters`), so the
ARI printed here is the row's ARI. Prints both tables; writes nothing. With ``--label L``: also, for each Leiden
cluster holding at least 20 cells of label L, those cells' mean log1p raw protein counts and median RNA library size
(what separates the parts of a type that Leiden splits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_data_dir, import_tool  # noqa: E402
from rna_protein import DATASETS, PROTEIN_KEY, split  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cbmc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tool", choices=("cellvae", "scvi"), default="cellvae")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument("--label", default=None, help="profile the Leiden clusters of this label's cells")
    args = p.parse_args(argv)

    import anndata as ad
    import numpy as np
    import pandas as pd
    import torch

    from cellvae.metrics.clustering import clustering_agreement, kmeans_clusters, leiden_n_clusters

    torch.set_num_threads(1)
    mod, version = import_tool(args.tool)
    file, label_key = DATASETS[args.dataset]
    full = ad.read_h5ad(Path(args.data_dir) / file)
    full = ad.AnnData(X=full.X, obs=full.obs[[label_key]].copy(), var=full.var[[]].copy(),
                      obsm={PROTEIN_KEY: full.obsm[PROTEIN_KEY]})
    tr, _ = split(full.n_obs, args.seed)
    train = full[tr].copy()
    if args.tool == "scvi":
        mod.settings.seed = args.seed
        mod.model.TOTALVI.setup_anndata(train, protein_expression_obsm_key=PROTEIN_KEY)
        model = mod.model.TOTALVI(train)
        model.train(max_epochs=args.epochs, early_stopping=False, accelerator="cpu", enable_progress_bar=False)
    else:
        model = mod.RNAProteinVAE(train)
        model.train(max_epochs=args.epochs, early_stopping=False, seed=args.seed, progress_bar=False, n_threads=1)
    z = model.get_latent_representation(full)
    labels = full.obs[label_key].astype(str).to_numpy()
    n = len(set(labels))
    lei = leiden_n_clusters(z, n, seed=0)
    km = kmeans_clusters(z, n, seed=0)
    print(f"{args.tool} {version}, {args.dataset}, seed {args.seed}, {args.epochs} epochs")
    for name, cl in ((f"Leiden (resolution {lei['resolution']:.4g}, {lei['n_clusters']} clusters)", lei["clusters"]),
                     (f"KMeans ({n} clusters)", km)):
        agree = clustering_agreement(labels, cl)
        print(f"\n{name}: ARI {agree['ari']:.3f}, NMI {agree['nmi']:.3f}")
        print(pd.crosstab(pd.Series(labels, name="label"), pd.Series(cl, name="cluster")).to_string())
    if args.label is not None:
        prot = full.obsm[PROTEIN_KEY]
        names = list(prot.columns) if isinstance(prot, pd.DataFrame) else [f"protein_{i}" for i in range(prot.shape[1])]
        logp = np.log1p(np.asarray(prot, dtype=np.float64))
        lib = np.asarray(full.X.sum(1)).ravel()
        is_l = labels == args.label
        rows = {}
        for c in pd.Series(lei["clusters"][is_l]).value_counts().index:
            sel = is_l & (lei["clusters"] == c)
            if sel.sum() >= 20:
                rows[f"cluster {c} ({int(sel.sum())} cells)"] = [*logp[sel].mean(0).round(2), int(np.median(lib[sel]))]
        print(f"\n{args.label} by Leiden cluster: mean log1p protein counts, median RNA counts")
        print(pd.DataFrame(rows, index=[*names, "median RNA counts"]).T.to_string())


if __name__ == "__main__":
    main()
