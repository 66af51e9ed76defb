"""Leave-one-cell-type-out novelty detection with :mod:`cellvae.anomaly`.

For each labelled dataset and each cell type T: train a CountVAE (default settings, ``--epochs`` epochs, seed 0,
1 thread) on a seeded random 90% of the cells of all other types; score the remaining 10% of those types
(held-out reference, label 0) and every cell of T (novel, label 1); report the AUROC (``roc_auc_score``) of
each score. Scores: ``latent_knn`` (the default of :func:`cellvae.anomaly.anomaly_score`), ``gene_surprise``,
``latent_knn_gene``, the negative ELBO
with each ``normalize_library`` option, and the negative IWAE marginal log-likelihood (100 samples) regressed on
log library size. For the default score it also reports the flag rates at the threshold calibrated with
:func:`cellvae.anomaly.calibrate_threshold` (quantile 0.99 of the model's own validation cells).

Datasets with more than ``--max-cells`` cells are subsampled (seeded, uniformly over cells); datasets with more
than 5000 genes are reduced to 2000 seurat_v3 highly variable genes. Results:
``benchmarks/results/anomaly_loo.{md,json}``.

    .venv/bin/python benchmarks/anomaly_loo.py [--datasets zeisel2015_cortex_subset_1464cells ...] [--epochs 100]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from cellvae import CountVAE  # noqa: E402
from cellvae.analysis.anomaly import anomaly_score, calibrate_threshold  # noqa: E402
from cellvae.data import select_highly_variable_genes  # noqa: E402
from cellvae.data.fileio import write_text_atomic  # noqa: E402

from _common import run_record_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CELLVAE_DATA_DIR") or ROOT.parent / "shared" / "data")
DEFAULT_DATASETS = [  # every dataset in ../shared/data with obs['cell_type']
    "zeisel2015_cortex_subset_1464cells", "pbmc4k_10x_top2000genes", "kang2018_ifnb_pbmc_muscat",
    "pbmc_10x_3tech_savercat_2000cells", "human_kidney_top2000genes", "mouse_bladder_mca_2100cells",
    "worm_neuron_cao2017", "cbmc_citeseq_rna_top2000genes", "mesc_kolodziejczyk2015_300cells"]
DEV_DATASETS = ("kang2018_ifnb_pbmc_muscat", "pbmc4k_10x_top2000genes")  # where gene_surprise was designed
SCORES = {  # name -> anomaly_score kwargs
    "latent_knn": dict(method="latent_knn"),
    "gene_surprise": dict(method="gene_surprise"),
    "latent_knn_gene": dict(method="latent_knn_gene"),
    "elbo_regress": dict(method="elbo", normalize_library="regress"),
    "elbo_per_count": dict(method="elbo", normalize_library="per_count"),
    "elbo_none": dict(method="elbo", normalize_library="none"),
    "marginal_ll_regress": dict(method="marginal_ll", normalize_library="regress", n_samples=100),
}


def load(name: str, max_cells: int, seed: int = 0) -> ad.AnnData:
    a = ad.read_h5ad(DATA / f"{name}.h5ad")
    if a.n_obs > max_cells:
        cells = np.sort(np.random.default_rng(seed).choice(a.n_obs, max_cells, replace=False))
        a = a[cells].copy()
    if a.n_vars > 5000:
        a = a[:, select_highly_variable_genes(a, 2000)].copy()
    return a


def run_type(a: ad.AnnData, types: np.ndarray, t: str, epochs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + 1)
    ref = rng.permutation(np.flatnonzero(types != t))
    n_hold = int(round(0.1 * len(ref)))
    hold, train = np.sort(ref[:n_hold]), np.sort(ref[n_hold:])
    novel = np.flatnonzero(types == t)
    tr = a[train].copy()
    t0 = time.perf_counter()
    model = CountVAE(tr)  # defaults; genes without counts in the training cells are left out (with a warning)
    model.train(max_epochs=epochs, progress_bar=False, n_threads=1, seed=seed)
    train_s = time.perf_counter() - t0
    test = a[np.concatenate([hold, novel])].copy()
    y = np.r_[np.zeros(len(hold)), np.ones(len(novel))]
    out = {"type": t, "n_train": len(train), "n_heldout_reference": len(hold), "n_novel": len(novel),
           "train_seconds": round(train_s, 1), "epochs_run": len(model.history["epoch"]), "auroc": {}}
    t1 = time.perf_counter()
    for name, kw in SCORES.items():
        s = anomaly_score(model, test, **kw)
        out["auroc"][name] = float(roc_auc_score(y, s))
        if name == "latent_knn":
            thr = calibrate_threshold(model, quantile=0.99, **kw)
            out["flagged_heldout_reference"] = float((s[y == 0] > thr).mean())
            out["flagged_novel"] = float((s[y == 1] > thr).mean())
    out["score_seconds"] = round(time.perf_counter() - t1, 1)
    return out


def write_md(results: dict, path: Path, args) -> None:
    names = list(SCORES)
    lines = [
        *run_record_header(results),
        "# Leave-one-cell-type-out novelty detection (cellvae.anomaly)",
        "",
        "Produced by `benchmarks/anomaly_loo.py` "
        f"(`--epochs {args.epochs} --max-cells {args.max_cells}`, 1 torch thread, seed 0).",
        "For each cell type T: CountVAE with default settings trained on a random 90% of the cells of the other "
        "types; AUROC of the anomaly score separating every cell of T (positives) from the other 10% "
        "(held-out reference cells, negatives). `latent_knn` is the default score (mean distance to the 10 nearest "
        "training cells in the latent space); `gene_surprise` the mean of the 20 largest per-gene NLL z-scores "
        "(against the training cells) at the posterior mean; `latent_knn_gene` the sum of both, each z-scored on "
        "the training cells; `elbo_*` is the negative ELBO (5 z samples) with each "
        "`normalize_library` option; `marginal_ll_regress` the negative IWAE log-likelihood (100 samples) "
        "regressed on log library size. Flag rates: fraction of cells above the threshold calibrated as the 0.99 "
        "quantile of `latent_knn` on the model's own validation cells (`calibrate_threshold`).",
        "",
    ]
    all_default = []
    for ds, res in results.items():
        info = res["info"]
        lines += [f"## {ds}", "", f"{info['n_cells']} cells x {info['n_genes']} genes"
                  + (f" (subsampled from {info['n_cells_file']} cells)" if info["subsampled"] else "")
                  + (" (2000 HVGs)" if info["hvg"] else "") + f"; {len(res['types'])} cell types.", ""]
        lines.append("| left-out type | n novel | n held-out ref. | " + " | ".join(names)
                     + " | flagged ref. | flagged novel | train s |")
        lines.append("|---|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|")
        for r in res["types"]:
            lines.append(f"| {r['type']} | {r['n_novel']} | {r['n_heldout_reference']} | "
                         + " | ".join(f"{r['auroc'][n]:.3f}" for n in names)
                         + f" | {r['flagged_heldout_reference']:.3f} | {r['flagged_novel']:.3f}"
                         + f" | {r['train_seconds']} |")
        means = {n: float(np.mean([r["auroc"][n] for r in res["types"]])) for n in names}
        lines.append("| **mean** | | | " + " | ".join(f"**{means[n]:.3f}**" for n in names) + " | | | |")
        lines.append("")
        all_default.append(means["latent_knn"])
    lines += ["## Summary", "",
              "Mean AUROC over the leave-one-type-out runs of each dataset. `gene_surprise` and `latent_knn_gene` "
              f"were designed on {' and '.join(DEV_DATASETS)} (marked *dev*); the other datasets were not looked "
              "at before these scores were fixed. `latent_knn` (the default) was chosen on Zeisel, pbmc4k and Kang.",
              "", "| dataset | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    per_ds = {}
    for ds, res in results.items():
        m = {n: float(np.mean([r["auroc"][n] for r in res["types"]])) for n in names}
        per_ds[ds] = m
        lines.append(f"| {ds}{' (*dev*)' if ds in DEV_DATASETS else ''} | "
                     + " | ".join(f"{m[n]:.3f}" for n in names) + " |")
    lines.append("| **mean over datasets** | " + " | ".join(
        f"**{np.mean([m[n] for m in per_ds.values()]):.3f}**" for n in names) + " |")
    lines += ["", "Datasets with mean AUROC >= 0.9 (the issue's bar: two labelled datasets): "
              + "; ".join(f"`{n}` {sum(m[n] >= 0.9 for m in per_ds.values())} of {len(per_ds)} "
                          f"({', '.join(ds for ds, m in per_ds.items() if m[n] >= 0.9) or 'none'})"
                          for n in ("latent_knn", "gene_surprise", "latent_knn_gene")) + ".",
              "", f"Total runtime: {results_runtime(results):.0f} s (wall clock, on a shared 2-core machine).", ""]
    write_text_atomic(path, "\n".join(lines))


def run_record_header(results: dict) -> list[str]:
    """The ``commit ..., date, load`` line of the newest dataset run (and of the first, when they differ)."""
    records = [res["info"]["run_record"] for res in results.values() if res["info"].get("run_record")]
    if not records:
        return []
    return [records[-1] + (f" (the first dataset: {records[0]})" if records[0] != records[-1] else ""), ""]


def results_runtime(results: dict) -> float:
    return sum(r["info"]["seconds"] for r in results.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-cells", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "anomaly_loo"))
    p.add_argument("--from-json", action="store_true", help="only rewrite the .md from an existing .json")
    args = p.parse_args()
    if args.from_json:
        out = Path(args.out)
        write_md(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md"), args)
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results = {}
    for ds in args.datasets:
        t0 = time.perf_counter()
        record = run_record_line()
        shape_file = ad.read_h5ad(DATA / f"{ds}.h5ad", backed="r").shape
        a = load(ds, args.max_cells)
        types = a.obs["cell_type"].astype(str).to_numpy()
        res = []
        for t in sorted(set(types), key=lambda s: (len(s), s)):
            r = run_type(a, types, t, args.epochs)
            print(ds, t, r["n_novel"], " ".join(f"{k}={v:.3f}" for k, v in r["auroc"].items()),
                  f"flag ref {r['flagged_heldout_reference']:.3f} novel {r['flagged_novel']:.3f}",
                  f"train {r['train_seconds']}s", flush=True)
            res.append(r)
        results[ds] = {"info": {"n_cells": a.n_obs, "n_genes": a.n_vars, "n_cells_file": shape_file[0],
                                "subsampled": a.n_obs < shape_file[0], "hvg": a.n_vars < shape_file[1],
                                "seconds": time.perf_counter() - t0, "run_record": record},
                       "types": res}
        print(ds, "mean", {k: round(float(np.mean([r["auroc"][k] for r in res])), 3) for k in SCORES}, flush=True)
        out = Path(args.out)  # written after every dataset, so that a stopped run keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out.with_suffix(".json"), json.dumps(results, indent=1))
        write_md(results, out.with_suffix(".md"), args)
    print("wrote", Path(args.out).with_suffix(".md"))


if __name__ == "__main__":
    main()
