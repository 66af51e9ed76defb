"""Marker genes from Bayesian differential expression (:mod:`cellvae.de`) on Kang et al. 2018 PBMCs.

Trains a CountVAE on the full ``kang2018_ifnb_pbmc_muscat.h5ad`` (1556 cells x 1267 genes, ``batch_key='donor'``,
``--epochs`` epochs, seed 0, 1 thread), then:

- one-vs-rest DE (``mode="vanilla"``, the default, and ``mode="change"``) for B cells, CD14+ Monocytes and CD4 T
  cells: the top-20 genes by Bayes factor and whether the canonical markers (MS4A1/CD79A/CD79B, CD14/LYZ,
  CD3D/CD3E/IL7R) are among them;
- stimulated vs control (``obs['condition']``: ``stim`` vs ``ctrl``): the top-10 genes and whether ISG15, IFI6 or
  IFIT1 are among them;
- overlap of the top-50 genes with scanpy's ``rank_genes_groups(method="wilcoxon")`` on log1p(counts per 10k)
  (one-vs-rest, and stim vs ctrl as reference).

Results: ``benchmarks/results/de_markers.{md,json}``.

    .venv/bin/python benchmarks/de_markers.py [--epochs 100]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, for _common
from _common import atomic_write_text, run_record_line  # noqa: E402

from cellvae import CountVAE  # noqa: E402
from cellvae.analysis.de import differential_expression  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CELLVAE_DATA_DIR") or ROOT.parent / "shared" / "data")
CELL_TYPES = {  # name in the file -> canonical markers
    "B cells": ["MS4A1", "CD79A", "CD79B"],
    "CD14+ Monocytes": ["CD14", "LYZ"],
    "CD4 T cells": ["CD3D", "CD3E", "IL7R"],
}
ISGS = ["ISG15", "IFI6", "IFIT1"]


def wilcoxon_top(adata: ad.AnnData, groupby: str, group: str, reference: str, n: int) -> list[str]:
    import scanpy as sc

    b = ad.AnnData(adata.X.copy(), obs=adata.obs[[groupby]].copy(), var=adata.var[[]].copy())
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.tl.rank_genes_groups(b, groupby, groups=[group], reference=reference, method="wilcoxon", n_genes=n)
    return [str(g) for g in b.uns["rank_genes_groups"]["names"][group][:n]]


def rank_of(df, genes):
    pos = {g: i + 1 for i, g in enumerate(df.index)}
    return {g: pos.get(g) for g in genes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "de_markers"))
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    adata = ad.read_h5ad(DATA / "kang2018_ifnb_pbmc_muscat.h5ad")
    t0 = time.perf_counter()
    model = CountVAE(adata, batch_key="donor")
    model.train(max_epochs=args.epochs, progress_bar=False, n_threads=1, seed=0)
    train_s = time.perf_counter() - t0
    res = {"data": {"n_cells": adata.n_obs, "n_genes": adata.n_vars,
                    "cell_types": adata.obs["cell_type"].value_counts().to_dict(),
                    "condition": adata.obs["condition"].value_counts().to_dict()},
           "train_seconds": round(train_s, 1), "epochs_run": len(model.history["epoch"]),
           "validation_elbo": model.history["validation_elbo"][-1], "comparisons": []}

    jobs = [("cell_type", t, None, markers, 20) for t, markers in CELL_TYPES.items()]
    jobs.append(("condition", "stim", "ctrl", ISGS, 10))
    for groupby, g1, g2, markers, top_n in jobs:
        entry = {"groupby": groupby, "group1": g1, "group2": g2 or "rest", "markers": markers, "top_n": top_n}
        for mode in ("vanilla", "change"):
            t1 = time.perf_counter()
            df = differential_expression(model, groupby=groupby, group1=g1, group2=g2, mode=mode)
            secs = time.perf_counter() - t1
            top = list(df.index[:top_n])
            top50 = list(df.index[:50]) if mode == "vanilla" else list(
                df[df["lfc_mean"] > 0].index[:50])  # change mode is two-sided: up-regulated genes for the overlap
            entry[mode] = {
                "seconds": round(secs, 2),
                "top": top,
                "top_bayes_factor": [round(float(v), 2) for v in df["bayes_factor"].iloc[:top_n]],
                "top_lfc_mean": [round(float(v), 2) for v in df["lfc_mean"].iloc[:top_n]],
                "markers_in_top": [g for g in markers if g in top],
                "marker_ranks": rank_of(df, markers),
                "n_de_fdr_0.05": int(df["is_de_fdr_0.05"].sum()),
                "top50": top50,
            }
        wil = wilcoxon_top(adata, groupby, g1, g2 or "rest", 50)
        entry["wilcoxon_top50"] = wil
        for mode in ("vanilla", "change"):
            entry[mode]["overlap_top50_wilcoxon"] = len(set(entry[mode]["top50"]) & set(wil))
        entry["wilcoxon_markers_in_top"] = [g for g in markers if g in wil[:top_n]]
        res["comparisons"].append(entry)
        print(g1, "vs", g2 or "rest", {m: (entry[m]["markers_in_top"], entry[m]["overlap_top50_wilcoxon"])
                                        for m in ("vanilla", "change")}, flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res["run_record"] = run_record_line()
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1))
    write_md(res, out.with_suffix(".md"), args)
    print("wrote", out.with_suffix(".md"))


def write_md(res: dict, path: Path, args) -> None:
    d = res["data"]
    lines = [
        res.get("run_record", "commit ?"),
        "",
        "# Marker genes by Bayesian differential expression (cellvae.de), Kang et al. 2018 PBMCs",
        "",
        f"Produced by `benchmarks/de_markers.py --epochs {args.epochs}` (1 torch thread, seed 0). Data: "
        f"`kang2018_ifnb_pbmc_muscat.h5ad`, {d['n_cells']} cells x {d['n_genes']} genes; cell types "
        + ", ".join(f"{k} ({v})" for k, v in d["cell_types"].items())
        + "; condition " + ", ".join(f"{k} ({v})" for k, v in d["condition"].items()) + ".",
        f"Model: CountVAE(batch_key='donor'), defaults otherwise; {res['epochs_run']} epochs in "
        f"{res['train_seconds']} s; validation ELBO {res['validation_elbo']:.1f} nats/cell.",
        "",
        "DE: `cellvae.de.differential_expression` with 5000 pairs of posterior draws per comparison (defaults). "
        "`vanilla`: genes sorted by log Bayes factor of rho1 > rho2 (up in group 1 first). `change`: "
        "P(|log2 FC| >= 0.25), two-sided; its top-50 for the overlap keeps genes with lfc_mean > 0. "
        "Wilcoxon: `scanpy.tl.rank_genes_groups(method='wilcoxon')` on log1p(counts per 10k), top 50 by score.",
        "",
        "| comparison | markers checked | in top-N (vanilla) | ranks (vanilla) | in top-N (change) | "
        "ranks (change) | in top-N (Wilcoxon) | top-50 overlap with Wilcoxon (vanilla / change) | "
        "DE genes at FDR 5% (vanilla / change) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in res["comparisons"]:
        v, c = e["vanilla"], e["change"]
        lines.append(
            f"| {e['group1']} vs {e['group2']} (top {e['top_n']}) | {', '.join(e['markers'])} | "
            f"{', '.join(v['markers_in_top']) or '-'} | "
            + ", ".join(f"{g} {r or 'not in data'}" for g, r in v["marker_ranks"].items()) + " | "
            f"{', '.join(c['markers_in_top']) or '-'} | "
            + ", ".join(f"{g} {r or 'not in data'}" for g, r in c["marker_ranks"].items()) + " | "
            f"{', '.join(e['wilcoxon_markers_in_top']) or '-'} | "
            f"{v['overlap_top50_wilcoxon']} / {c['overlap_top50_wilcoxon']} | "
            f"{v['n_de_fdr_0.05']} / {c['n_de_fdr_0.05']} |"
        )
    lines.append("")
    for e in res["comparisons"]:
        lines += [f"## {e['group1']} vs {e['group2']}", ""]
        for mode in ("vanilla", "change"):
            m = e[mode]
            lines.append(f"- {mode} top {e['top_n']} ({m['seconds']} s): "
                         + ", ".join(f"{g} ({bf}, {lfc:+.2f})" for g, bf, lfc in
                                     zip(m["top"], m["top_bayes_factor"], m["top_lfc_mean"])))
        lines.append(f"- Wilcoxon top {e['top_n']}: " + ", ".join(e["wilcoxon_top50"][:e["top_n"]]))
        lines.append("")
    lines.append("Entries are gene (log Bayes factor, mean log2 fold change).")
    lines.append("")
    atomic_write_text(path, "\n".join(lines))


if __name__ == "__main__":
    main()
