"""Training defaults of ``CountVAE.train``, each against the default, on five labelled datasets:

- ``--study lr_schedule``: the default optimizer (Adam, lr 1e-3 constant, as scvi-tools) against cosine annealing of
  the learning rate to lr / 100 at ``max_epochs`` (``lr_schedule="cosine"``) with peak lr 1e-3, 2e-3 and 3e-3
  (results in ``benchmarks/results/lr_schedule.md``);
- ``--study decoder_bias_init``: the decoder's logits bias initialised to the log gene frequencies of the training
  cells (``decoder_bias_init="frequency"``, the default) against PyTorch's initialisation (``"default"``, as
  scvi-tools) (``benchmarks/results/decoder_bias_init.md``).
- ``--study dispersion_init``: log theta drawn from N(0, 1) per gene (``dispersion_init="random"``, the default, as
  scvi-tools) against log theta 1.0 for every gene (the constant chosen on CBMC, which this study does not use)
  (``benchmarks/results/dispersion_init.md``).
- ``--study dispersion_lr``: log theta (``px_r``) learning at the rate of the other weights
  (``dispersion_lr_multiplier=1``, as scvi-tools) against 10, 30 and 100 times that rate
  (``benchmarks/results/dispersion_lr.md``).

Each run is a default ``CountVAE.train`` (default ``max_epochs`` = min(400, 20000 / n_cells * 400), KL warm-up over
half of it, early stopping with patience 45 after the warm-up, best weights restored, 10 % validation cells), ZINB,
n_hidden 128, n_latent 10, batch 128, one thread; only the studied setting differs. Reported per dataset and
seed: the best validation ELBO (nats per cell; higher is better), the epoch it was reached, the first epoch at which
the run reached the best ELBO of the reference run (the first configuration) of the same seed ("epochs to
reference"), the epochs run, and the KMeans ARI / NMI (k = number of labels) of the final latent representation
against the labels.

The datasets are labelled sets of ``../shared/data`` that are *not* used by ``benchmarks/throughput.py`` (pbmc4k,
cbmc), so that the choice of default is not tuned on the data of the throughput comparison; datasets with more
than 5,000 genes are reduced to 2,000 seurat_v3 genes (``_common.load_dataset``).

    .venv/bin/python benchmarks/training_defaults.py [--study lr_schedule|decoder_bias_init|dispersion_init|dispersion_lr]
        [--seeds 0,1] [--datasets a,b] [--out benchmarks/results/<study>]

Runs split over processes (``--datasets a,b --out /tmp/part1`` and ``--datasets c,d,e --out /tmp/part2``) are joined
into one report by ``--merge /tmp/part1.json,/tmp/part2.json`` (with the same ``--study``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (atomic_write_text, cluster_scores, default_data_dir, git_commit, limit_threads,  # noqa: E402
                     load_dataset, loadavg, machine_description, rows_stamp)

DATASETS = ("zeisel2015_cortex_subset_1464cells", "kang2018_ifnb_pbmc_muscat", "human_kidney_top2000genes",
            "mouse_bladder_mca_2100cells", "worm_neuron_cao2017")
STUDIES = {  # study -> (title, {configuration name -> CountVAE.train keyword arguments}); the first is the reference
    "lr_schedule": ("Learning-rate schedule: constant (default, as scvi-tools) vs cosine annealing", {
        "default (lr 1e-3 constant, as scvi-tools)": {"lr": 1e-3, "lr_schedule": "constant",
                                                      "decoder_bias_init": "default"},
        "lr 1e-3 cosine": {"lr": 1e-3, "lr_schedule": "cosine", "decoder_bias_init": "default"},
        "lr 2e-3 cosine": {"lr": 2e-3, "lr_schedule": "cosine", "decoder_bias_init": "default"},
        "lr 3e-3 cosine": {"lr": 3e-3, "lr_schedule": "cosine", "decoder_bias_init": "default"},
    }),
    "decoder_bias_init": ("Decoder bias initialisation: PyTorch's (as scvi-tools) vs log gene frequencies", {
        "PyTorch init (as scvi-tools)": {"decoder_bias_init": "default"},
        "log gene frequency (default)": {"decoder_bias_init": "frequency"},
    }),
    "dispersion_init": ("Dispersion initialisation: one N(0, 1) log theta per gene (as scvi-tools) vs log theta 1.0 "
                        "for every gene", {
        "random log theta (default, as scvi-tools)": {"dispersion_init": "random"},
        "log theta 1.0": {"dispersion_init": 1.0},
    }),
    "dispersion_lr": ("Learning rate of log theta: the rate of the other weights (as scvi-tools) vs 10, 30 and 100 "
                      "times it", {
        "log theta lr x 1 (as scvi-tools)": {"dispersion_lr_multiplier": 1.0},
        "log theta lr x 10": {"dispersion_lr_multiplier": 10.0},
        "log theta lr x 30": {"dispersion_lr_multiplier": 30.0},
        "log theta lr x 100": {"dispersion_lr_multiplier": 100.0},
    }),
}


def _now() -> str:
    """UTC now as ISO text to the minute (the ``date`` of a row)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="minutes")


def run_one(adata, labels, train_kwargs: dict, seed: int) -> dict:
    import numpy as np
    import torch

    import cellvae

    torch.set_num_threads(1)
    model = cellvae.CountVAE(adata, n_hidden=128, n_latent=10, gene_likelihood="zinb")
    t0 = time.perf_counter()
    model.train(**train_kwargs, seed=seed, progress_bar=False, n_threads=1)
    secs = time.perf_counter() - t0
    v = np.asarray(model.history["validation_elbo"], dtype=float)
    ari, nmi = cluster_scores(model.get_latent_representation(), labels, len(set(labels)))
    return {"val_elbo": v.tolist(), "best": float(v.max()), "best_epoch": int(v.argmax()) + 1, "epochs": len(v),
            "seconds": secs, "ari": ari, "nmi": nmi}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--study", choices=sorted(STUDIES), default="lr_schedule")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--out", default=None)
    p.add_argument("--merge", default=None, help="comma-separated .json files of earlier runs: report them together")
    args = p.parse_args(argv)
    title, configs = STUDIES[args.study]
    out = args.out or str(Path(__file__).resolve().parent / "results" / args.study)
    limit_threads(1)
    import json

    import numpy as np

    seeds = [int(s) for s in args.seeds.split(",")]
    rows, commands = [], []
    if args.merge:
        for f in args.merge.split(","):
            part = json.loads(Path(f).read_text())
            rows += part["rows"]
            commands += part.get("commands", [])
    commands.append(" ".join(sys.argv))
    gc = git_commit("src")  # the code the rows below run (uncommitted src is named in the commit)
    commit = gc["commit"] + (" (+uncommitted src)" if gc["dirty"] else "")
    for name in ([] if args.merge else args.datasets.split(",")):
        adata, labels, _info = load_dataset(Path(args.data_dir), name, "cell_type")
        for seed in seeds:
            ref = None
            for cname, kwargs in configs.items():
                r = run_one(adata, labels, kwargs, seed)
                if ref is None:
                    ref = r["best"]
                v = np.asarray(r["val_elbo"])
                r.update(dataset=name, n_cells=adata.n_obs, n_genes=adata.n_vars, seed=seed, config=cname,
                         epochs_to_reference=int(np.argmax(v >= ref)) + 1 if (v >= ref).any() else None,
                         commit=commit, date=_now())
                rows.append(r)
                print(f"{name} seed {seed} {cname}: best {r['best']:.2f} (epoch {r['best_epoch']}), reference at "
                      f"{r['epochs_to_reference']}, {r['epochs']} epochs, {r['seconds']:.0f} s, ARI {r['ari']:.3f}",
                      flush=True)
    md = [rows_stamp(rows), "", f"# {title}", "",
          f"Machine: {machine_description()}; load average {loadavg()} at the end. "
          + ", then ".join(f"`{c}`" for c in commands), "",
          *[para.replace("\n", " ") + "\n" for para in __doc__.split("\n\n")[2:4]],
          "| dataset | cells x genes | seed | configuration | best validation ELBO (epoch) | diff vs reference | "
          "epochs to reference's best | epochs run | KMeans ARI / NMI |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["dataset"] == r["dataset"] and x["seed"] == r["seed"])
        diff = (r["best"] - base["best"]) / abs(base["best"]) * 100
        md.append(f"| {r['dataset']} | {r['n_cells']} x {r['n_genes']} | {r['seed']} | {r['config']} | "
                  f"{r['best']:.2f} ({r['best_epoch']}) | {diff:+.3f} % | {r['epochs_to_reference'] or 'not reached'}"
                  f" | {r['epochs']} | {r['ari']:.3f} / {r['nmi']:.3f} |")
    md += ["", "Mean over datasets and seeds:", "", "| configuration | best ELBO diff vs reference | epochs to "
           "reference's best / reference's best epoch | KMeans ARI |", "|---|---|---|---|"]
    for cname in configs:
        sel = [r for r in rows if r["config"] == cname]
        diffs, fr = [], []
        for r in sel:
            base = next(x for x in rows if x["dataset"] == r["dataset"] and x["seed"] == r["seed"])
            diffs.append((r["best"] - base["best"]) / abs(base["best"]) * 100)
            if r["epochs_to_reference"]:
                fr.append(r["epochs_to_reference"] / base["best_epoch"])
        reached = f"{np.mean(fr):.2f} ({len(fr)} of {len(sel)} runs reached it)" if fr else "never reached"
        md.append(f"| {cname} | {np.mean(diffs):+.3f} % | {reached} | {np.mean([r['ari'] for r in sel]):.3f} |")
    atomic_write_text(Path(out).with_suffix(".json"), json.dumps({"rows": rows, "commands": commands}, indent=1))
    atomic_write_text(Path(out).with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
