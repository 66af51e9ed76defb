#!/usr/bin/env python
"""Clustering quality of the latent space: cellvae ``CountVAE`` vs scvi-tools ``SCVI`` (defaults).

For each labelled dataset (AnnData ``.h5ad`` with raw counts in ``X``) and each seed, both tools
are trained with their default architecture (scvi-tools: n_hidden 128, n_latent 10, n_layers 1,
ZINB likelihood, gene-wise dispersion; cellvae: ``CountVAE(adata, gene_likelihood="zinb")``) for
``--max-epochs`` epochs (default 100) on a 90 % training split, batch size 128 and no early
stopping. The latent representation of *all* cells is clustered with scikit-learn
``KMeans(n_clusters=<number of label categories>, random_state=0, n_init=10)`` and compared with the
labels by ARI and NMI (scikit-learn). Training wall time and throughput
(cells/s = n_train_cells * epochs / train seconds) are recorded too.

Datasets with more than 5000 genes are first reduced to 2000 highly variable genes with
``scanpy.pp.highly_variable_genes(flavor="seurat_v3", n_top_genes=2000)`` on the raw counts, so both
tools see exactly the same genes (needs ``scikit-misc``). The report says which datasets were reduced.
If skmisc's loess fails on very shallow data (``ValueError: reciprocal condition number``, seen on
``worm_neuron_cao2017``), genes detected in fewer than 3 cells are dropped and the HVG call is retried;
the report says so for that dataset.

Setup (a separate venv so the reference tool does not touch the project's environment; the torch
wheel is installed first and pinned so pip never pulls a CUDA build)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -q torch==2.13.0
    echo "torch==2.13.0+cpu" > /tmp/bench-constraints.txt
    .venv-bench/bin/pip install -q -c /tmp/bench-constraints.txt scvi-tools==1.4.2 scikit-misc
    .venv-bench/bin/pip install -q -c /tmp/bench-constraints.txt -e .

Usage (from the repository root)::

    .venv-bench/bin/python benchmarks/clustering_vs_scvi.py                      # all datasets, both tools, seeds 0 1 2
    .venv-bench/bin/python benchmarks/clustering_vs_scvi.py --tools scvi \\
        --datasets pbmc4k_10x_top2000genes zeisel2015_cortex_subset_1464cells \\
        --out benchmarks/results/scvi_defaults.md --json benchmarks/results/scvi_defaults.json
    .venv-bench/bin/python benchmarks/clustering_vs_scvi.py --tools cellvae --seeds 0 --resume

A dataset may be given as ``NAME`` (label key from the built-in table, else ``cell_type``) or
``NAME:LABEL_KEY``. Results are written after every dataset (Markdown to ``--out``, raw rows to
``--json``), so partial results survive an interruption; with ``--resume`` rows already in
``--json`` are kept and their (tool, dataset, seed) runs are skipped.

If ``import cellvae`` (or its ``CountVAE``) fails, the cellvae runs are skipped with a message and
the scvi-tools runs still happen; likewise for scvi-tools. Use ``--threads`` (default 1) to cap
torch / BLAS / OpenMP threads: throughput numbers are only comparable at equal thread counts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, for _common
from _common import (  # noqa: E402
    DEFAULT_DATASETS,
    HVG_GENE_THRESHOLD,
    N_HVG,
    REPO_ROOT,
    TOOL_LABEL,
    TOOLS,
    atomic_write_text,
    cluster_scores,
    default_data_dir,
    fmt_mean_sd as _fmt_ms,
    import_tool,
    limit_threads as _limit_threads,
    load_dataset,
    mean_sd as _ms,
)


def parse_args(argv=None) -> argparse.Namespace:
    default_data = default_data_dir()
    p = argparse.ArgumentParser(
        description="Clustering quality (KMeans ARI/NMI on the latent space) of cellvae vs scvi-tools SCVI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS),
                   help="dataset names (file stem in --data-dir), optionally NAME:LABEL_KEY")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--data-dir", default=default_data,
                   help="folder with the .h5ad files (env CELLVAE_DATA_DIR overrides the default)")
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS / OpenMP threads")
    p.add_argument("--cellvae-kl-warmup", type=int, default=None,
                   help="cellvae n_epochs_kl_warmup (default: cellvae's own, half of --max-epochs); 400 mimics "
                        "scvi-tools, whose KL weight then ends a 100-epoch run at 0.25")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "clustering_vs_scvi.md"),
                   help="Markdown report")
    p.add_argument("--json", default=str(REPO_ROOT / "benchmarks" / "results" / "clustering_vs_scvi.json"),
                   help="raw per-run rows (JSON)")
    p.add_argument("--resume", action="store_true",
                   help="keep rows already in --json and skip their (tool, dataset, seed) runs")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- tools
def run_scvi(scvi, adata, seed: int, max_epochs: int, threads: int) -> dict:
    import torch
    import warnings

    scvi.settings.seed = seed
    torch.set_num_threads(threads)
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        model.train(max_epochs=max_epochs, train_size=0.9, enable_progress_bar=False)
        secs = time.perf_counter() - t0
    n_train = int(len(model.train_indices))
    hist = model.history or {}
    epochs = len(hist["elbo_train"]) if "elbo_train" in hist else max_epochs
    z = model.get_latent_representation()
    return {"z": z, "train_seconds": secs, "n_train_cells": n_train, "epochs": int(epochs)}


CELLVAE_TRAIN_KWARGS: dict = {}


def run_cellvae(cellvae, adata, seed: int, max_epochs: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    adata = adata.copy()
    model = cellvae.CountVAE(adata, gene_likelihood="zinb")
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs, train_size=0.9, seed=seed, progress_bar=False, n_threads=threads,
                **CELLVAE_TRAIN_KWARGS)
    secs = time.perf_counter() - t0
    n_train = None
    for attr in ("train_indices", "train_indices_"):
        idx = getattr(model, attr, None)
        if idx is not None:
            n_train = int(len(idx))
            break
    if n_train is None:
        n_train = int(round(0.9 * adata.n_obs))
    epochs = max_epochs
    hist = getattr(model, "history", None)
    if isinstance(hist, dict):
        for key in ("elbo_train", "loss_train", "train_loss"):
            if key in hist:
                epochs = len(hist[key])
                break
    z = model.get_latent_representation()
    return {"z": z, "train_seconds": secs, "n_train_cells": n_train, "epochs": int(epochs)}


RUNNERS = {"scvi": run_scvi, "cellvae": run_cellvae}


# ----------------------------------------------------------------------------- report
def render_markdown(rows: list[dict], meta: dict) -> str:
    ok = [r for r in rows if r.get("error") is None]
    order = {d: i for i, d in enumerate(DEFAULT_DATASETS)}
    datasets = sorted(dict.fromkeys(r["dataset"] for r in rows), key=lambda d: order.get(d, len(order)))
    tools = [t for t in TOOLS if any(r["tool"] == t for r in rows)]
    out = ["# Clustering quality: cellvae vs scvi-tools (defaults)", ""]
    out.append(f"Generated {meta['date']} by `benchmarks/clustering_vs_scvi.py` "
               f"({meta['command']}).")
    out.append("")
    out.append(f"- Machine: {meta['machine']}; torch {meta['torch']} with {meta['threads']} thread(s); "
               + ", ".join(f"{TOOL_LABEL[t]} {v}" for t, v in meta["tool_versions"].items()) + ".")
    out.append(f"- Training: max_epochs={meta['max_epochs']}, train_size=0.9, batch size 128, no early stopping; "
               "scvi-tools `SCVI(adata)` defaults (n_hidden 128, n_latent 10, n_layers 1, ZINB, gene dispersion); "
               "cellvae `CountVAE(adata, gene_likelihood=\"zinb\")`.")
    out.append("- Metric: KMeans(n_clusters = number of label categories, random_state=0, n_init=10) on the "
               "latent mean of all cells; ARI / NMI vs labels (scikit-learn). Mean ± sd over seeds.")
    out.append("- Throughput: cells/s = n_train_cells × epochs / training wall time.")
    hvg = sorted({r["dataset"] for r in rows if r.get("hvg_seurat_v3")})
    if hvg:
        out.append(f"- Datasets with > {HVG_GENE_THRESHOLD} genes were reduced to {N_HVG} highly variable genes "
                   "(`scanpy.pp.highly_variable_genes(flavor=\"seurat_v3\", n_top_genes=2000)` on raw counts; same "
                   "genes for both tools): " + ", ".join(f"`{d}`" for d in hvg) + ".")
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    out.append("")

    for d in datasets:
        drows = [r for r in rows if r["dataset"] == d]
        r0 = drows[0]
        genes = (f"{r0['n_genes']} HVG of {r0['n_genes_file']} genes" if r0.get("hvg_seurat_v3")
                 else f"{r0['n_genes']} genes")
        if r0.get("hvg_prefilter_min_cells"):
            genes += (f" (seurat_v3 loess failed on all genes, so genes detected in < "
                      f"{r0['hvg_prefilter_min_cells']} cells were dropped before the HVG call)")
        out.append(f"## {d}")
        out.append("")
        out.append(f"{r0['n_cells']} cells, {genes}, labels `{r0['label_key']}` ({r0['n_labels']} categories).")
        out.append("")
        out.append("| tool | seeds | ARI | NMI | cells/s | train s |")
        out.append("|---|---|---|---|---|---|")
        for t in tools:
            tr = [r for r in drows if r["tool"] == t and r.get("error") is None]
            err = [r for r in drows if r["tool"] == t and r.get("error") is not None]
            if not tr and not err:
                continue
            if not tr:
                out.append(f"| {TOOL_LABEL[t]} | failed | - | - | - | - |")
                continue
            seeds = " ".join(str(r["seed"]) for r in sorted(tr, key=lambda r: r["seed"]))
            cps, _ = _ms([r["cells_per_s"] for r in tr])
            secs, _ = _ms([r["train_seconds"] for r in tr])
            out.append(f"| {TOOL_LABEL[t]} | {seeds} | {_fmt_ms([r['ari'] for r in tr])} | "
                       f"{_fmt_ms([r['nmi'] for r in tr])} | {cps:,.0f} | {secs:.1f} |")
        for r in [r for r in drows if r.get("error") is not None]:
            out.append("")
            out.append(f"Failed: {r['tool']} seed {r['seed']}: `{r['error']}`")
        out.append("")

    out.append("## Summary (mean over seeds)")
    out.append("")
    both = "scvi" in tools and "cellvae" in tools
    head = "| dataset |"
    sep = "|---|"
    for t in tools:
        head += f" {t} ARI | {t} NMI |"
        sep += "---|---|"
    if both:
        head += " ΔARI (cellvae − scvi) | ΔNMI (cellvae − scvi) |"
        sep += "---|---|"
    out += [head, sep]
    agg = {t: {"ari": [], "nmi": []} for t in tools}
    for d in datasets:
        line = f"| {d} |"
        means = {}
        for t in tools:
            tr = [r for r in ok if r["dataset"] == d and r["tool"] == t]
            a, _ = _ms([r["ari"] for r in tr])
            n, _ = _ms([r["nmi"] for r in tr])
            means[t] = (a, n)
            line += (f" {a:.3f} | {n:.3f} |" if a is not None else " - | - |")
        if both:
            (a1, n1), (a0, n0) = means["cellvae"], means["scvi"]
            if a1 is not None and a0 is not None:
                line += f" {a1 - a0:+.3f} | {n1 - n0:+.3f} |"
                for t in tools:
                    agg[t]["ari"].append(means[t][0])
                    agg[t]["nmi"].append(means[t][1])
            else:
                line += " - | - |"
        out.append(line)
    if not both:
        for t in tools:
            for d in datasets:
                tr = [r for r in ok if r["dataset"] == d and r["tool"] == t]
                if tr:
                    agg[t]["ari"].append(_ms([r["ari"] for r in tr])[0])
                    agg[t]["nmi"].append(_ms([r["nmi"] for r in tr])[0])
    if any(agg[t]["ari"] for t in tools):
        line = "| **mean over datasets**" + (" (where both ran)" if both else "") + " |"
        for t in tools:
            a, n = _ms(agg[t]["ari"])[0], _ms(agg[t]["nmi"])[0]
            line += (f" {a:.3f} | {n:.3f} |" if a is not None else " - | - |")
        if both and agg["scvi"]["ari"]:
            line += (f" {_ms(agg['cellvae']['ari'])[0] - _ms(agg['scvi']['ari'])[0]:+.3f} |"
                     f" {_ms(agg['cellvae']['nmi'])[0] - _ms(agg['scvi']['nmi'])[0]:+.3f} |")
        out.append(line)
    out.append("")
    return "\n".join(out)


def write_outputs(rows, meta, md_path: Path, json_path: Path) -> None:
    atomic_write_text(json_path, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    atomic_write_text(md_path, render_markdown(rows, meta))


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    _limit_threads(args.threads)
    if args.cellvae_kl_warmup is not None:
        CELLVAE_TRAIN_KWARGS["n_epochs_kl_warmup"] = args.cellvae_kl_warmup

    import torch  # noqa: E402  (after thread env vars)

    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except Exception:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass

    data_dir = Path(args.data_dir)
    md_path, json_path = Path(args.out), Path(args.json)

    modules, versions = {}, {}
    for t in args.tools:
        try:
            modules[t], versions[t] = import_tool(t)
        except Exception as e:  # noqa: BLE001 - any import problem only skips that tool
            print(f"[skip] {t}: cannot import ({type(e).__name__}: {e}); its runs are skipped", flush=True)
    if not modules:
        print("no tool could be imported; nothing to do", file=sys.stderr)
        return 1

    rows: list[dict] = []
    meta: dict = {}
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        rows = [r for r in old.get("rows", []) if r.get("error") is None]
        meta = old.get("meta", {})
        print(f"[resume] kept {len(rows)} rows from {json_path}", flush=True)
    done = {(r["tool"], r["dataset"], r["seed"]) for r in rows}

    tool_versions = dict(meta.get("tool_versions", {}))
    tool_versions.update(versions)
    meta = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "`" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) + "`",
        "machine": f"{platform.machine()} {os.cpu_count()} logical CPUs, Python {platform.python_version()}",
        "torch": torch.__version__,
        "threads": args.threads,
        "max_epochs": args.max_epochs,
        "tool_versions": {t: tool_versions[t] for t in TOOLS if t in tool_versions},
        "notes": meta.get("notes", []),
    }

    t_start = time.perf_counter()
    for spec in args.datasets:
        name, _, key = spec.partition(":")
        label_key = key or DEFAULT_DATASETS.get(name, "cell_type")
        try:
            adata, labels, info = load_dataset(data_dir, name, label_key)
        except Exception as e:  # noqa: BLE001
            print(f"[skip] dataset {name}: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"== {name}: {info['n_cells']} cells x {info['n_genes']} genes"
              f"{' (seurat_v3 HVG of ' + str(info['n_genes_file']) + ')' if info['hvg_seurat_v3'] else ''}, "
              f"{info['n_labels']} labels ({label_key})", flush=True)
        for tool, mod in modules.items():
            for seed in args.seeds:
                if (tool, name, seed) in done:
                    print(f"  {tool:8s} seed {seed}: already in {json_path.name}, skipped", flush=True)
                    continue
                row = {"tool": tool, "tool_version": versions[tool], "seed": seed, **info,
                       "max_epochs": args.max_epochs, "threads": args.threads, "error": None}
                try:
                    res = RUNNERS[tool](mod, adata, seed, args.max_epochs, args.threads)
                    ari, nmi = cluster_scores(res["z"], labels, info["n_labels"])
                    row.update(
                        ari=ari, nmi=nmi, train_seconds=res["train_seconds"],
                        n_train_cells=res["n_train_cells"], epochs=res["epochs"],
                        cells_per_s=res["n_train_cells"] * res["epochs"] / res["train_seconds"],
                        latent_dim=int(res["z"].shape[1]),
                    )
                    print(f"  {tool:8s} seed {seed}: ARI {ari:.3f} NMI {nmi:.3f}  "
                          f"{row['train_seconds']:.1f} s  {row['cells_per_s']:,.0f} cells/s", flush=True)
                except Exception as e:  # noqa: BLE001 - record and go on
                    traceback.print_exc()
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    print(f"  {tool:8s} seed {seed}: FAILED {row['error']}", flush=True)
                rows.append(row)
        write_outputs(rows, meta, md_path, json_path)  # after every dataset
    write_outputs(rows, meta, md_path, json_path)
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; wrote {md_path} and {json_path}\n", flush=True)
    print(render_markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
