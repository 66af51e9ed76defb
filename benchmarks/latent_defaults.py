#!/usr/bin/env python
"""Choosing the defaults that shape cellvae's latent space (issue 20): each configuration against the current
default, on one half of the labelled datasets (the choice) and then the other half (the confirmation).

Protocol, per dataset and seed (the split of ``benchmarks/vs_scvi.py``): one seeded 90/10 split of the cells;
``CountVAE(train_cells, **model_kw).train(**train_kw)`` with cellvae's defaults otherwise (its epoch heuristic, KL
warm-up, early stopping on its own 10 % validation cells, one thread); then

- held-out ELBO and IWAE log p(x) (``--n-samples`` importance samples) on the 10 % held-out cells, nats per cell;
- on the latent means of all cells: KMeans ARI / NMI and Leiden ARI / NMI (k = number of labels), and the R² of log
  library size on the latent, over all cells and within labels (``cellvae.metrics.evaluate_latent``, without scIB).

Datasets with more than 5,000 genes are reduced to 2,000 seurat_v3 genes (``_common.load_dataset``). The report
gives per dataset the mean over seeds of every metric and the paired difference to the reference configuration
(the first) with its t-based 95 % confidence interval.

    .venv/bin/python benchmarks/latent_defaults.py --half choose --seeds 0 1 2 --out benchmarks/results/latent_defaults_choose
    .venv/bin/python benchmarks/latent_defaults.py --half confirm --configs default log1p_cp10k ...
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write_text, default_data_dir, limit_threads, load_dataset, loadavg, machine_description  # noqa: E402
from vs_scvi import BATCH_KEYS  # noqa: E402

HALVES = {  # the datasets of each half (labels key); chosen before any run: small and large, PBMC and tissue in each
    "choose": {"zeisel2015_cortex_subset_1464cells": "cell_type", "kang2018_ifnb_pbmc_muscat": "cell_type",
               "pbmc4k_10x_top2000genes": "cell_type", "mouse_bladder_mca_2100cells": "cell_type",
               "pbmc_10x_3tech_savercat_2000cells": "cell_type", "mesc_kolodziejczyk2015_300cells": "cell_type"},
    "confirm": {"worm_neuron_cao2017": "cell_type", "human_kidney_top2000genes": "cell_type",
                "cbmc_citeseq_stoeckius2017_8617cells": "cell_type", "pbmc10k_citeseq_10x_6434cells": "cell_type",
                "pbmc_10x_3chemistries": "cell_type_marker", "cellline_mixology_tian2019_5batches": "cell_type"},
}
EQUAL_SCHEDULE = "equal_schedule"  # train keyword replaced by vs_scvi.py's equal schedule: E = scvi-tools' epoch
# heuristic on the training cells, KL warm-up over E epochs, no early stopping, train_size 0.9
CONFIGS = {  # name -> (CountVAE keyword arguments, train keyword arguments); the first is the reference
    "default": ({}, {}),
    "log1p_cp10k": ({"encoder_input": "log1p_cp10k"}, {}),
    "scvi_schedule": ({}, {"n_epochs_kl_warmup": 400, "early_stopping": False}),  # warm-up over the 400 epochs
    "warmup50": ({}, {"n_epochs_kl_warmup": 50}),
    "warmup100": ({}, {"n_epochs_kl_warmup": 100}),
    # the learning rate of log theta (30x the rest by default; 1x as scvi-tools; falling from 30x to 1x over the KL
    # warm-up or over the first 1000 / 2000 optimizer steps), each at
    # cellvae's defaults and on the equal schedule of vs_scvi.py (EQUAL_SCHEDULE). Rows named dlr_decay50 /
    # eq_dlr_decay50 in the choose study's JSON are of commit a5c3d33, where N counted epochs (over 50 epochs).
    "dlr1": ({}, {"dispersion_lr_multiplier": 1.0}),
    "dlr_decay": ({}, {"dispersion_lr_decay": "warmup"}),
    "dlr_decay1000s": ({}, {"dispersion_lr_decay": 1000}),
    "dlr_decay2000s": ({}, {"dispersion_lr_decay": 2000}),
    "eq_default": ({}, {EQUAL_SCHEDULE: True}),
    "eq_dlr1": ({}, {EQUAL_SCHEDULE: True, "dispersion_lr_multiplier": 1.0}),
    "eq_dlr_decay": ({}, {EQUAL_SCHEDULE: True, "dispersion_lr_decay": "warmup"}),
    "eq_dlr_decay1000s": ({}, {EQUAL_SCHEDULE: True, "dispersion_lr_decay": 1000}),
    "eq_dlr_decay2000s": ({}, {EQUAL_SCHEDULE: True, "dispersion_lr_decay": 2000}),
}
METRICS = ("heldout_log_px", "heldout_elbo", "kmeans_ari", "kmeans_nmi", "leiden_ari", "leiden_nmi",
           "depth_r2_within_labels", "depth_r2", "epochs", "best_epoch", "seconds")


def split(n: int, seed: int):
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n)
    n_train = min(int(np.ceil(0.9 * n)), n - 1)
    if n_train % 128 == 1:
        n_train -= 1
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def run_one(adata, labels, config: str, seed: int, n_samples: int, batch_key: str | None = None) -> dict:
    """One training and evaluation. With ``batch_key`` (the datasets of ``vs_scvi.BATCH_KEYS``) the model gets it,
    and the held-out metrics are computed as in ``vs_scvi.py`` (per-cell values averaged, ``seed`` passed), so the
    ``default`` / ``eq_default`` rows at ``--n-samples 1000`` repeat vs_scvi.py's cellvae rows."""
    import numpy as np
    import torch

    import cellvae
    from cellvae.metrics import evaluate_latent

    model_kw, train_kw = CONFIGS[config]
    tr, ho = split(adata.n_obs, seed)
    X = adata.X.tocsr()
    detected = np.asarray((X[tr] > 0).sum(0)).ravel() > 0
    full = adata[:, detected].copy()
    train, held = full[tr].copy(), full[ho].copy()
    held = held[np.asarray(held.X.sum(1)).ravel() > 0].copy()
    train_kw = dict(train_kw)
    if train_kw.pop(EQUAL_SCHEDULE, False):
        e = max(1, min(round(20000 / train.n_obs * 400), 400))
        train_kw.update(max_epochs=e, n_epochs_kl_warmup=e, early_stopping=False, train_size=0.9)
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    m = cellvae.CountVAE(train, batch_key=batch_key, **model_kw)
    m.train(seed=seed, progress_bar=False, n_threads=1, **train_kw)
    secs = time.perf_counter() - t0
    torch.manual_seed(seed)
    elbo = float(np.mean(np.asarray(m.get_elbo(held, return_mean=False, seed=seed), dtype=np.float64)))
    log_px = float(np.mean(np.asarray(m.get_marginal_ll(held, n_samples=n_samples, return_mean=False, seed=seed),
                                      dtype=np.float64)))
    z = m.get_latent_representation(full)
    lib = np.asarray(full.X.sum(1)).ravel()
    ev = evaluate_latent(z, labels, library=np.maximum(lib, 1.0), seed=0, heldout_elbo=elbo, heldout_log_px=log_px,
                         scib=False)
    ev.update(epochs=len(m.history["epoch"]), best_epoch=m.history["best_epoch"], seconds=secs)
    return {k: ev.get(k) for k in METRICS}


def report(rows: list[dict], configs: list[str], title: str, header: dict) -> str:
    import numpy as np
    from scipy import stats

    ref = configs[0]
    rest = {k: v for k, v in header.items() if k not in ("commit", "date")}
    lines = [f"# {title}", "", f"commit {header.get('commit', '?')}, {header.get('date', '?')}", "",
             *[f"- {k}: {v}" for k, v in rest.items()], ""]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for metric in ("heldout_log_px", "kmeans_ari", "leiden_ari", "depth_r2_within_labels", "kmeans_nmi",
                   "leiden_nmi", "heldout_elbo", "epochs"):
        lines += [f"## {metric}", "", "| dataset | " + " | ".join(configs) + " | "
                  + " | ".join(f"{c} - {ref} (95 % CI)" for c in configs[1:]) + " |",
                  "|---" * (1 + 2 * len(configs) - 1) + "|"]
        means = {c: [] for c in configs[1:]}
        for d in datasets:
            cells = []
            by = {c: {r["seed"]: r[metric] for r in rows if r["dataset"] == d and r["config"] == c
                      and r.get(metric) is not None} for c in configs}
            for c in configs:
                v = list(by[c].values())
                cells.append(f"{np.mean(v):.4g}" if v else "n/a")
            for c in configs[1:]:
                seeds = sorted(set(by[c]) & set(by[ref]))
                diff = np.array([by[c][s] - by[ref][s] for s in seeds])
                if len(diff) >= 2:
                    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
                    cells.append(f"{diff.mean():+.4g} ({diff.mean() - half:+.3g}, {diff.mean() + half:+.3g})")
                    means[c].append(diff.mean())
                elif len(diff) == 1:
                    cells.append(f"{diff[0]:+.4g}")
                    means[c].append(diff[0])
                else:
                    cells.append("n/a")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("| mean of the differences | " + " | ".join("" for _ in configs) + " | "
                     + " | ".join(f"{np.mean(means[c]):+.4g}" if means[c] else "n/a" for c in configs[1:]) + " |")
        lines.append("")
    return "\n".join(lines)


def rows_from_vs_scvi(paths: list[str], names: list[str], datasets: dict, seeds: list[int]) -> list[dict]:
    """cellvae rows of ``vs_scvi.py`` JSON files as rows of this study: the rows of ``paths[i]`` become configuration
    ``f"{names[i]} ({mode})"``. Only rows of ``datasets`` and ``seeds`` with the batch key of ``vs_scvi.BATCH_KEYS``
    are taken (that script's split and evaluation are this one's, so the numbers are the same computation)."""
    out = []
    for path, name in zip(paths, names):
        for r in json.loads(Path(path).read_text())["rows"]:
            if (r.get("tool") != "cellvae" or r.get("error") or r["dataset"] not in datasets
                    or int(r["seed"]) not in seeds or (r.get("batch_key") or None) != BATCH_KEYS.get(r["dataset"])):
                continue
            row = {k: r.get(k) for k in METRICS if k != "seconds"}
            row.update(seconds=r.get("train_seconds"), dataset=r["dataset"], config=f"{name} ({r['mode']})",
                       seed=int(r["seed"]), batch_key=r.get("batch_key"), commit=r.get("git_commit"),
                       settings=r.get("cellvae_plan"))
            out.append(row)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--half", choices=list(HALVES), default="choose")
    p.add_argument("--datasets", nargs="*", default=None, help="NAME:LABEL_KEY (default: the datasets of --half)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-samples", type=int, default=100, help="importance samples of the held-out log p(x)")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--out", required=True, help="path stem: writes STEM.md and STEM.json")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--merge", nargs="*", default=[], help="JSON files of other runs of this study whose rows join "
                                                           "--out's (with --run-configs and no names: report only)")
    p.add_argument("--run-configs", nargs="*", default=None, choices=list(CONFIGS),
                   help="train only these of --configs (the report covers all of --configs; with --resume, rows "
                        "of the others stay as they are); an empty list only rewrites the report")
    p.add_argument("--no-batch-key", action="store_true",
                   help="train the multi-technology sets without their batch key (vs_scvi.BATCH_KEYS)")
    p.add_argument("--compare-vs-scvi", nargs=2, metavar=("REFERENCE_JSON", "CANDIDATE_JSON"),
                   help="no training: compare the cellvae rows of two vs_scvi.py JSON files (the reference defaults "
                        "and the candidate ones) on the datasets of --half and --seeds, per mode")
    p.add_argument("--names", nargs=2, default=["reference", "candidate"], help="with --compare-vs-scvi")
    args = p.parse_args(argv)
    import numpy as np
    if args.compare_vs_scvi:
        datasets = dict(d.split(":") for d in args.datasets) if args.datasets else HALVES[args.half]
        rows = rows_from_vs_scvi(list(args.compare_vs_scvi), args.names, datasets, args.seeds)
        commits = sorted({r["commit"] for r in rows if r["config"].startswith(args.names[1])})
        header = {"commit": ", ".join(commits) or "?", "date": _dt.date.today().isoformat(),
                  "half": args.half, "seeds": args.seeds,
                  "source": f"cellvae rows of {args.compare_vs_scvi[0]} ({args.names[0]}) and "
                            f"{args.compare_vs_scvi[1]} ({args.names[1]}), benchmarks/vs_scvi.py"}
        parts = []
        for mode in ("defaults", "equal-schedule"):
            configs = [f"{n} ({mode})" for n in args.names]
            mode_rows = [r for r in rows if r["config"] in configs]
            if mode_rows:
                parts.append(report(mode_rows, configs, f"Confirmation ({args.half}), {mode}", header))
        out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
        atomic_write_text(out_json, json.dumps({"header": header, "rows": rows}, indent=1))
        atomic_write_text(out_md, "\n\n".join(parts))
        print(f"wrote {out_md}")
        return

    limit_threads(1)
    datasets = dict(d.split(":") for d in args.datasets) if args.datasets else HALVES[args.half]
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    rows = json.loads(out_json.read_text())["rows"] if args.resume and out_json.exists() else []
    for path in args.merge:  # rows of other runs of this study (e.g. split over datasets); the later file wins
        seen = {(r["dataset"], r["config"], r["seed"]): i for i, r in enumerate(rows)}
        for r in json.loads(Path(path).read_text())["rows"]:
            k = (r["dataset"], r["config"], r["seed"])
            if k in seen:
                rows[seen[k]] = r
            else:
                seen[k] = len(rows)
                rows.append(r)
    done = {(r["dataset"], r["config"], r["seed"]) for r in rows}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    header = {"commit": commit, "date": _dt.date.today().isoformat(), "machine": machine_description(),
              "half": args.half, "seeds": args.seeds,
              "batch keys": "none" if args.no_batch_key else {d: k for d, k in BATCH_KEYS.items() if d in datasets},
              "held-out log p(x) samples": args.n_samples,
              "configurations": {c: CONFIGS[c] for c in args.configs}}
    for name, key in datasets.items():
        if args.run_configs == []:
            break
        batch_key = None if args.no_batch_key else BATCH_KEYS.get(name)
        adata, labels, info = load_dataset(Path(args.data_dir), name, key,
                                           extra_obs=(batch_key,) if batch_key else ())
        keep = np.asarray(adata.X.sum(1)).ravel() > 0  # as vs_scvi.py: cells without counts are dropped first
        if not keep.all():
            adata, labels = adata[keep].copy(), np.asarray(labels)[keep]
        for seed in args.seeds:
            for config in args.configs:
                if (name, config, seed) in done or (args.run_configs is not None and config not in args.run_configs):
                    continue
                la0 = loadavg()
                r = run_one(adata, labels, config, seed, args.n_samples, batch_key)
                r.update(dataset=name, config=config, seed=seed, batch_key=batch_key, commit=commit, load_start=la0,
                         load_end=loadavg())
                rows.append(r)
                print(f"{name} seed {seed} {config}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, float)), flush=True)
                atomic_write_text(out_json, json.dumps({"header": header, "rows": rows}, indent=1))
                atomic_write_text(out_md, report(rows, args.configs, "Latent defaults study (" + args.half + ")",
                                                 header))
    if rows:
        atomic_write_text(out_json, json.dumps({"header": header, "rows": rows}, indent=1))
        atomic_write_text(out_md, report(rows, args.configs, "Latent defaults study (" + args.half + ")", header))


if __name__ == "__main__":
    main()
