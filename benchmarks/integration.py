"""Batch integration: cellvae (with and without the adversarial batch classifier) vs scvi-tools SCVI vs
unintegrated PCA, scored with the scib-metrics Benchmarker (Luecken et al. 2022, Nat. Methods 19:41).

Datasets (``../shared/data``; > 5000 genes are reduced to 2000 seurat_v3 HVGs on the raw counts, as in
``vs_scvi.py``), each with a batch key that carries no biology (issue 20):

- ``pbmc_10x_3tech_savercat_2000cells``: batch key ``batch`` = the 10x technology (3), labels ``cell_type``;
- ``pbmc_10x_3chemistries``: ``batch`` = the 10x chemistry (3), labels ``cell_type_marker``;
- ``kang2018_ifnb_pbmc_muscat``: ``donor`` (2), labels ``cell_type``. Its ``batch`` column (donor x ctrl/stim) is
  not used: removing it would also remove the interferon response, and scIB would score that as integration;
- ``cellline_mixology_tian2019_5batches``: ``batch`` (5 plates / runs on CEL-seq2 and Drop-seq), labels
  ``cell_type`` (5 cell lines, from genotypes).

Embeddings, all of all cells:

- ``PCA (unintegrated)``: 50 PCs of log1p counts per 10,000 (scanpy ``normalize_total``, ``log1p``, ``pca``); also
  the pre-integration embedding of scIB's PCR-comparison score;
- ``scvi-tools SCVI``: ``SCVI(batch_key=...)`` at its defaults (n_hidden 128, n_latent 10, ZINB, 400 epochs of
  KL warm-up, ``max_epochs`` = min(400, 20000/n_cells*400), no early stopping, train_size 0.9);
- ``cellvae``: ``CountVAE(batch_key=...)`` at its defaults (same architecture and epoch heuristic, KL warm-up
  over half the epochs, early stopping on the validation ELBO);
- ``cellvae + adversary``: the same with ``adversarial_batch_weight`` (``--adv-weight``, default 3, the value ``cellvae fit
  --adversarial-batch-weight`` recommends), with the
  encoder trained against the latent batch classifier by domain confusion (``adversarial_mode="confusion"``, the
  default) or by gradient reversal (``"gradient_reversal"``).

Scores: scib-metrics' Benchmarker without min-max scaling (``cellvae.metrics.integration.scib_benchmark``), so
each embedding's scores do not depend on the others: bio conservation (isolated labels, KMeans NMI/ARI, label
silhouette, cLISI), batch correction (silhouette batch / BRAS, iLISI, kBET, graph connectivity, PCR comparison),
total = 0.6 bio + 0.4 batch. Also the balanced accuracy of a 5-fold logistic regression predicting the batch from
the embedding (lower = better mixed; chance = 1 / n_batches).

    .venv-bench/bin/python benchmarks/integration.py [--seeds 0,1] [--datasets savercat,...] [--adv-weight 3]
    .venv-bench/bin/python benchmarks/integration.py --report-only a.json,b.json   # merge runs, re-render

Results: ``benchmarks/results/integration.{md,json}``. Needs scvi-tools and scib-metrics (``make bench-install``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import limit_threads  # noqa: E402

limit_threads(1)

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

from _common import (  # noqa: E402
    cap_loaded_threads,
    default_data_dir,
    fmt_mean_sd,
    git_commit,
    import_tool,
    load_dataset,
    loadavg,
    machine_description,
    mean_sd,
    package_version,
    rows_stamp,
    write_json_and_md,
)

DATASETS = {  # short name -> (file name, label key, batch key)
    "savercat": ("pbmc_10x_3tech_savercat_2000cells", "cell_type", "batch"),
    "3chem": ("pbmc_10x_3chemistries", "cell_type_marker", "batch"),
    "kang": ("kang2018_ifnb_pbmc_muscat", "cell_type", "donor"),
    "cellline": ("cellline_mixology_tian2019_5batches", "cell_type", "batch"),
}
METHODS = ("pca", "scvi", "cellvae", "cellvae_adv", "cellvae_grl")
METHOD_LABEL = {"pca": "PCA (unintegrated)", "scvi": "scvi-tools SCVI", "cellvae": "cellvae",
                "cellvae_adv": "cellvae + adversary (confusion)",
                "cellvae_grl": "cellvae + adversary (gradient reversal)"}
ADV_MODE = {"cellvae_adv": "confusion", "cellvae_grl": "gradient_reversal"}
SCORE_COLS = ("bio_conservation", "batch_correction", "total")
DETAIL_COLS = ("isolated_labels", "kmeans_nmi", "kmeans_ari", "silhouette_label", "clisi", "bras", "ilisi", "kbet",
               "graph_connectivity", "pcr_comparison")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {list(DATASETS)}")
    p.add_argument("--seeds", default="0", help="comma list of seeds (training seed of each model)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--adv-weight", type=float, default=3.0, help="cellvae adversarial_batch_weight")
    p.add_argument("--max-epochs", type=int, default=None, help="both tools (default: each tool's heuristic)")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--out", default="benchmarks/results/integration.md")
    p.add_argument("--report-only", default=None,
                   help="re-render the Markdown from this JSON (a comma list: their rows merged, e.g. one run per seed)")
    return p.parse_args(argv)


def pca_embedding(adata, n_comps: int = 50) -> np.ndarray:
    import scanpy as sc

    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=min(n_comps, a.n_vars - 1, a.n_obs - 1), random_state=0)
    return np.asarray(a.obsm["X_pca"], dtype=np.float32)


def run_scvi(adata, seed: int, max_epochs: int | None, batch_key: str) -> tuple[np.ndarray, dict]:
    import torch

    scvi, _ = import_tool("scvi")
    scvi.settings.seed = seed
    torch.set_num_threads(1)
    a = adata.copy()
    scvi.model.SCVI.setup_anndata(a, batch_key=batch_key)
    model = scvi.model.SCVI(a)
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs, accelerator="cpu", enable_progress_bar=False)
    secs = time.perf_counter() - t0
    epochs = len(model.history["elbo_train"])
    return model.get_latent_representation(a).astype(np.float32), {"train_seconds": secs, "epochs": epochs}


def run_cellvae(adata, seed: int, max_epochs: int | None, adv_weight: float, adv_mode: str | None, batch_key: str):
    cellvae, _ = import_tool("cellvae")
    kw = {"adversarial_batch_weight": adv_weight, "adversarial_mode": adv_mode} if adv_mode else {}
    model = cellvae.CountVAE(adata, batch_key=batch_key, **kw)
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs, seed=seed, progress_bar=False, n_threads=1)
    secs = time.perf_counter() - t0
    return model.get_latent_representation().astype(np.float32), {
        "train_seconds": secs, "epochs": len(model.history["epoch"]), "best_epoch": model.history["best_epoch"],
        "validation_elbo": model.history["validation_elbo"][model.history["best_epoch"] - 1],
    }


def run(args) -> dict:
    from cellvae.metrics.integration import batch_classifier_accuracy, scib_benchmark

    cap_loaded_threads(1)
    warnings.filterwarnings("ignore")
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    rows = []
    for short in args.datasets.split(","):
        name, label_key, batch_key = DATASETS[short]
        adata, labels, info = load_dataset(Path(args.data_dir), name, label_key, extra_obs=(batch_key,))
        batches = adata.obs[batch_key].astype(str).to_numpy()
        x_pca = pca_embedding(adata)
        print(f"{short}: {adata.n_obs} cells x {adata.n_vars} genes, {len(set(batches))} batches, "
              f"{len(set(labels))} labels", flush=True)
        for seed in seeds:
            for method in methods:
                if method == "pca" and seed != seeds[0]:
                    continue  # deterministic
                t0 = time.perf_counter()
                if method == "pca":
                    z, extra = x_pca, {}
                elif method == "scvi":
                    z, extra = run_scvi(adata, seed, args.max_epochs, batch_key)
                else:
                    z, extra = run_cellvae(adata, seed, args.max_epochs, args.adv_weight, ADV_MODE.get(method),
                                           batch_key)
                scores = scib_benchmark(z, labels, batches, pre_integrated=x_pca)
                row = {**info, "dataset": short, "file": name, "batch_key": batch_key, "seed": seed, "method": method,
                       **extra, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "commit": git_commit("src")["commit"], "loadavg": loadavg(),
                       **scores, "batch_accuracy": batch_classifier_accuracy(z, batches),
                       "chance_batch_accuracy": 1.0 / len(set(batches)),
                       "adv_weight": args.adv_weight if method in ADV_MODE else None}
                rows.append(row)
                print(f"  seed {seed} {method:12s} bio {scores['bio_conservation']:.3f} batch "
                      f"{scores['batch_correction']:.3f} total {scores['total']:.3f} batch acc "
                      f"{row['batch_accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    meta = {"machine": machine_description(), "cellvae": package_version("cellvae"),
            "scvi-tools": package_version("scvi-tools"), "scib-metrics": package_version("scib-metrics"),
            "torch": package_version("torch"), "seeds": seeds, "adv_weight": args.adv_weight,
            "max_epochs": args.max_epochs, "command": " ".join(["benchmarks/integration.py", *sys.argv[1:]]),
            "commit": git_commit("src"), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    return {"meta": meta, "rows": rows}


def render(payload: dict) -> str:
    meta, rows = payload["meta"], payload["rows"]
    lines = [rows_stamp(rows), "",
             "# Batch integration: cellvae vs scvi-tools SCVI vs unintegrated PCA (scib-metrics)", "",
             "Batch keys (no biology in them): " + ", ".join(
                 f"{d} `{b}`" for d, b in dict.fromkeys((r["dataset"], r.get("batch_key", "?")) for r in rows)) + ".",
             f"Machine: {meta['machine']}; cellvae {meta['cellvae']}, scvi-tools {meta['scvi-tools']}, "
             f"scib-metrics {meta['scib-metrics']}, torch {meta['torch']}; 1 thread.",
             f"Command: `{meta['command']}`; seeds {meta['seeds']}; adversary weight {meta['adv_weight']}; "
             f"epochs: {meta['max_epochs'] or 'each tool default heuristic'}.", "",
             "Scores from scib-metrics' Benchmarker without min-max scaling (higher is better; total = 0.6 bio + "
             "0.4 batch). `batch acc`: 5-fold balanced accuracy of a logistic regression predicting the batch from "
             "the embedding (lower = better mixed; chance in brackets). Mean ± sd over seeds.", ""]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = [m for m in METHOD_LABEL if any(r["method"] == m for r in rows)]
    lines += ["| dataset | method | bio conservation | batch correction | total | batch acc (chance) | epochs |",
              "|---|---|---|---|---|---|---|"]
    verdicts = []
    for d in datasets:
        for m in methods:
            rs = [r for r in rows if r["dataset"] == d and r["method"] == m]
            if not rs:
                continue
            ep = fmt_mean_sd([r.get("epochs") for r in rs], 0) if m != "pca" else "-"
            lines.append(f"| {d} | {METHOD_LABEL[m]} | " + " | ".join(fmt_mean_sd([r[c] for r in rs])
                                                                    for c in SCORE_COLS)
                         + f" | {fmt_mean_sd([r['batch_accuracy'] for r in rs])} ({rs[0]['chance_batch_accuracy']:.2f})"
                         + f" | {ep} |")
        tot = {m: mean_sd([r["total"] for r in rows if r["dataset"] == d and r["method"] == m])[0] for m in methods}
        bio = {m: mean_sd([r["bio_conservation"] for r in rows if r["dataset"] == d and r["method"] == m])[0]
               for m in methods}
        cv = [m for m in ("cellvae", *ADV_MODE) if tot.get(m) is not None]
        if cv and tot.get("scvi") is not None and bio.get("pca") is not None:
            parts = []
            for m in cv:
                ok = tot[m] >= tot["scvi"] and bio[m] - bio["pca"] >= -0.05
                parts.append(f"{METHOD_LABEL[m]}: total {tot[m]:.3f} vs scvi {tot['scvi']:.3f}, bio {bio[m]:.3f} vs "
                             f"PCA {bio['pca']:.3f} ({bio[m] - bio['pca']:+.3f}) -> {'both met' if ok else 'not met'}")
            verdicts.append(f"- {d} (mean over seeds): " + "; ".join(parts) + ".")
    lines += ["", "## Against the issue's bar (total >= scvi-tools, bio conservation >= PCA - 0.05)", "", *verdicts, "", "## All scib-metrics scores", "",
              "| dataset | method | " + " | ".join(DETAIL_COLS) + " |", "|---|---|" + "---|" * len(DETAIL_COLS)]
    for d in datasets:
        for m in methods:
            rs = [r for r in rows if r["dataset"] == d and r["method"] == m]
            if rs:
                lines.append(f"| {d} | {METHOD_LABEL[m]} | " + " | ".join(
                    fmt_mean_sd([r.get(c) for r in rs]) for c in DETAIL_COLS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report_only:
        parts = [json.loads(Path(p).read_text()) for p in args.report_only.split(",")]
        payload = {"meta": {**parts[0]["meta"], "command": " + ".join(p["meta"]["command"] for p in parts),
                            "seeds": sorted({s for p in parts for s in p["meta"]["seeds"]})},
                   "rows": [r for p in parts for r in p["rows"]]}
    else:
        payload = run(args)
    write_json_and_md(Path(args.out), payload, render(payload))


if __name__ == "__main__":
    main()
