"""Training throughput: cellvae vs scvi-tools 1.4.2 in one run (issue 6).

For each dataset this runs ``vs_scvi.py`` twice, so the measurement rules are that script's (same genes, the same
90/10 split of the cells, the same architecture: n_hidden 128, n_latent 10, 1 layer, ZINB, gene dispersion; batch
size 128; the same epochs; the same KL warm-up, ``--warmup-fraction`` of the epochs for both; no early stopping;
each training in a fresh child process; tool order alternating per seed; otherwise each tool's own defaults, for
cellvae the decoder bias initialised to the log gene frequencies of the training cells and log theta learning at
``dispersion_lr_multiplier`` (30) times the learning rate, for scvi-tools PyTorch's initialisation and one learning
rate):

1. main mode: training cells/s (training cells x epochs / seconds of ``train()``), peak RSS of the child, and the
   held-out ELBO (nats per cell) of both after the same epochs;
2. ``--time-to-quality`` mode: the wall time each tool needs to reach scvi-tools' final held-out ELBO (cellvae may
   train up to ``--ttq-extra-fraction`` (0.5) more epochs to reach it; its first epochs are those of an
   equal-epochs run, see ``vs_scvi.py --ttq-cellvae-extra-epochs``).

Datasets: ``pbmc4k_10x_top2000genes`` (4,340 cells), ``cbmc_citeseq_rna_top2000genes`` (8,617 cells) and a
generated 100,000-cell set (``benchmarks/make_large.py --n-cells 100000``: counts sampled from a CountVAE fitted on
pbmc4k). Threads: ``--threads`` for both tools (torch, BLAS and OpenMP), 1 by default: on this shared 2-core
machine a second thread makes steps slower when the other core is busy (see ``cellvae.train.default_n_threads``).

    .venv-bench/bin/python benchmarks/make_large.py --n-cells 100000 --out benchmarks/data/large_100000.h5ad
    .venv-bench/bin/python benchmarks/throughput.py [--threads 1] [--datasets pbmc4k,cbmc,large100k] [--seeds 0,1,2]

Several ``--seeds`` give one pair of trainings per seed and dataset, and a table of the per-dataset medians. The
committed results: ``--datasets large100k --seeds 0``, then ``--datasets pbmc4k,cbmc --seeds 0,1,2,3,4``, then
``--report-only`` (the default ``--datasets``) to write the table of all three.

Results: ``benchmarks/results/throughput.{md,json}`` (the two ``vs_scvi`` reports of each dataset are kept beside
them as ``throughput_<dataset>_{main,ttq}.{md,json}``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, default_data_dir, machine_description, package_version, write_json_and_md  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
DATASETS = {  # short name -> (file stem, label key, epochs)
    "pbmc4k": ("pbmc4k_10x_top2000genes", "cell_type", 40),
    "cbmc": ("cbmc_citeseq_rna_top2000genes", "cell_type", 20),
    "large100k": ("large_100000", "cell_type", 4),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", default=None, help="override, e.g. pbmc4k=40,cbmc=20,large100k=4")
    p.add_argument("--warmup-fraction", type=float, default=0.5, help="KL warm-up epochs / epochs, both tools")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--large-path", default=str(REPO_ROOT / "benchmarks" / "data" / "large_100000.h5ad"))
    p.add_argument("--skip-ttq", action="store_true", help="main mode only")
    p.add_argument("--ttq-extra-fraction", type=float, default=0.5,
                   help="time-to-quality mode: cellvae may train this fraction of the epochs beyond them to reach "
                        "the target (vs_scvi.py --ttq-cellvae-extra-epochs); its first epochs are unchanged")
    p.add_argument("--report-only", action="store_true", help="rebuild throughput.md from the kept reports")
    p.add_argument("--out", default=str(RESULTS / "throughput.md"))
    return p.parse_args(argv)


def _run_vs_scvi(args_list: list[str]) -> None:
    import vs_scvi

    rc = vs_scvi.main(args_list)
    if rc:
        raise SystemExit(f"vs_scvi.py failed with {rc}")


def run(args) -> None:
    epochs = {k: v[2] for k, v in DATASETS.items()}
    if args.epochs:
        for item in args.epochs.split(","):
            k, v = item.split("=")
            epochs[k] = int(v)
    for short in args.datasets.split(","):
        stem, label, _ = DATASETS[short]
        e = epochs[short]
        warm = max(1, round(args.warmup_fraction * e))
        with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
            data_dir = args.data_dir
            if short == "large100k":
                src = Path(args.large_path)
                if not src.exists():
                    raise SystemExit(f"{src} not found: run benchmarks/make_large.py --n-cells 100000 --out {src}")
                os.symlink(src.resolve(), Path(tmp) / f"{stem}.h5ad")
                data_dir = tmp
            common = ["--datasets", f"{stem}:{label}", "--seeds", *args.seeds.split(","), "--max-epochs", str(e),
                      "--threads", str(args.threads), "--data-dir", data_dir, "--scvi-kl-warmup", str(warm),
                      "--cellvae-kl-warmup", str(warm)]
            base = RESULTS / f"throughput_{short}"
            _run_vs_scvi([*common, "--n-mc-samples", "1", "--out", f"{base}_main.md", "--json", f"{base}_main.json"])
            if not args.skip_ttq:
                extra = str(round(args.ttq_extra_fraction * e))
                _run_vs_scvi([*common, "--time-to-quality", "--ttq-cellvae-extra-epochs", extra,
                              "--out", f"{base}_ttq.md", "--json", f"{base}_ttq.json"])


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def summarise(args) -> dict:
    import vs_scvi

    out = []
    for short in args.datasets.split(","):
        base = RESULTS / f"throughput_{short}"
        main = [r for r in _rows(Path(f"{base}_main.json")) if r.get("error") is None]
        ttq = [r for r in _rows(Path(f"{base}_ttq.json")) if r.get("error") is None]
        for seed in sorted({r["seed"] for r in main}):
            by = {r["tool"]: r for r in main if r["seed"] == seed}
            if set(by) != {"scvi", "cellvae"}:
                continue
            s, c = by["scvi"], by["cellvae"]
            row = {"dataset": short, "seed": seed, "n_cells": s.get("n_cells"), "n_genes": s.get("n_genes_model"),
                   "epochs": s["epochs"], "threads": s.get("threads"),
                   "scvi_cells_per_s": s["cells_per_s"], "cellvae_cells_per_s": c["cells_per_s"],
                   "speedup": c["cells_per_s"] / s["cells_per_s"],
                   "scvi_heldout_elbo": s["heldout_elbo"], "cellvae_heldout_elbo": c["heldout_elbo"],
                   "elbo_rel_diff": (c["heldout_elbo"] - s["heldout_elbo"]) / abs(s["heldout_elbo"]),
                   "scvi_rss_mb": s["rss_peak_train_mb"], "cellvae_rss_mb": c["rss_peak_train_mb"]}
            for item in vs_scvi.ttq_results([r for r in ttq if r["seed"] == seed]):
                sr, cr = item.get("scvi", {}).get("reached"), item.get("cellvae", {}).get("reached")
                row["ttq_target"] = item["target"]
                row["scvi_ttq_s"] = sr[1] if sr else None
                row["cellvae_ttq_s"] = cr[1] if cr else None
                row["cellvae_ttq_epoch"] = cr[0] if cr else None
                row["ttq_speedup"] = sr[1] / cr[1] if sr and cr else None
            out.append(row)
    return {"meta": {"ttq_extra_fraction": args.ttq_extra_fraction, "machine": machine_description(),
                     "cellvae": package_version("cellvae"), "scvi-tools": package_version("scvi-tools"), "torch": package_version("torch"),
                     "loadavg": os.getloadavg()}, "rows": out}


def render(payload: dict) -> str:
    import vs_scvi

    m = payload["meta"]
    lines = ["# Training throughput: cellvae vs scvi-tools (same run, alternating)", "",
             f"Machine: {m['machine']}; cellvae {m['cellvae']}, scvi-tools {m['scvi-tools']}, torch {m['torch']}; "
             f"load average when summarised {tuple(round(x, 2) for x in m['loadavg'])} (a shared machine: timings "
             "are approximate, ratios within one run are what to compare).", "",
             "Same genes, split, architecture (ZINB, n_hidden 128, n_latent 10), batch 128, epochs and KL warm-up "
             "for both; cells/s = training cells x epochs / seconds of `train()`; held-out ELBO in nats per cell "
             "after the same epochs; time to scvi quality = wall time until the held-out ELBO reaches scvi-tools' "
             f"final held-out ELBO (per-epoch times incl. the held-out evaluation; cellvae may run up to "
             f"{100 * m.get('ttq_extra_fraction', 0):.0f} % more epochs to reach it). Optimizer of both: Adam, lr 1e-3 "
             "constant, eps 0.01, weight decay 1e-6 (their defaults; cellvae's log theta learns at "
             f"{vs_scvi._cellvae_default('dispersion_lr_multiplier'):g} x lr, its default "
             "`dispersion_lr_multiplier`). Details: `benchmarks/vs_scvi.py`; "
             "per-dataset reports `throughput_<dataset>_{main,ttq}.md`.", "",
             "| dataset | seed | cells x genes | epochs | threads | scvi cells/s | cellvae cells/s | speed-up | "
             "held-out ELBO scvi / cellvae (diff) | time to scvi quality scvi / cellvae (speed-up) | "
             "peak RSS MiB scvi / cellvae |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        ttq = "-"
        if r.get("scvi_ttq_s") is not None:
            ttq = (f"{r['scvi_ttq_s']:.1f} s / " + (f"{r['cellvae_ttq_s']:.1f} s ({r['ttq_speedup']:.2f}x)"
                                                    if r.get("cellvae_ttq_s") else "not reached"))
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['n_cells']} x {r['n_genes']} | {r['epochs']} | {r['threads']} | "
            f"{r['scvi_cells_per_s']:,.0f} | {r['cellvae_cells_per_s']:,.0f} | **{r['speedup']:.2f}x** | "
            f"{r['scvi_heldout_elbo']:.1f} / {r['cellvae_heldout_elbo']:.1f} ({100 * r['elbo_rel_diff']:+.2f} %) | "
            f"{ttq} | {r['scvi_rss_mb']:.0f} / {r['cellvae_rss_mb']:.0f} |")
    by_dataset: dict = {}
    for r in payload["rows"]:
        by_dataset.setdefault(r["dataset"], []).append(r)
    if any(len(rs) > 1 for rs in by_dataset.values()):
        lines += ["", "Per dataset over the seeds (each seed: one scvi-tools and one cellvae training in alternating "
                  "order, on that seed's 90/10 split; the machine's speed drifts by 10-20 % over minutes, so the "
                  "median of several pairs is steadier than one pair):", "",
                  "| dataset | seeds | speed-up per seed | median speed-up | held-out ELBO diff per seed | "
                  "time-to-quality speed-up per seed | median |", "|---|---|---|---|---|---|---|"]
        for name, rs in by_dataset.items():
            sp = [r["speedup"] for r in rs]
            tq = [r["ttq_speedup"] for r in rs if r.get("ttq_speedup") is not None]
            seeds = ", ".join(str(r["seed"]) for r in rs)
            sp_each = " / ".join(f"{v:.2f}x" for v in sp)
            elbo_each = " / ".join(f"{100 * r['elbo_rel_diff']:+.2f} %" for r in rs)
            tq_each = " / ".join(f"{v:.2f}x" for v in tq) or "-"
            tq_med = f"**{statistics.median(tq):.2f}x**" if tq else "-"
            lines.append(f"| {name} | {seeds} | {sp_each} | **{statistics.median(sp):.2f}x** | {elbo_each} | "
                         f"{tq_each} | {tq_med} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        run(args)
    payload = summarise(args)
    write_json_and_md(Path(args.out), payload, render(payload))


if __name__ == "__main__":
    main()
