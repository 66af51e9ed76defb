#!/usr/bin/env python
"""cellvae ``CountVAE`` vs scvi-tools ``SCVI``: speed, memory, held-out likelihood and clustering (issue 3).

For each dataset and seed, both tools get the same genes, the same 90/10 split of the cells, the same
architecture (n_hidden 128, n_latent 10, n_layers 1, ZINB likelihood, gene-wise dispersion), batch size 128,
the same number of epochs (``--max-epochs``, default 100) and no early stopping. Everything runs in one process
run; each training + evaluation happens in a fresh child process (multiprocessing, 'spawn' start method), one at
a time, and the order of the two tools alternates from seed to seed (scvi-tools first for the 1st, 3rd, ...
seed of ``--seeds``, cellvae first for the 2nd, 4th, ...).

Data and split (identical for both tools):

- A dataset with more than 5000 genes is reduced to 2000 seurat_v3 highly variable genes (``_common.load_dataset``,
  the rule of ``clustering_vs_scvi.py``); cells with zero counts are dropped.
- Per seed, one permutation ``numpy.random.default_rng(seed).permutation(n_cells)`` gives the training cells (its
  first ``ceil(0.9 n)``) and the held-out cells (the rest). If that leaves ``n_train % 128 == 1`` one more cell
  goes to the held-out set, so no training minibatch holds a single cell (batch norm; scvi-tools would fail).
- Genes detected in no training cell of the seed are removed for both tools (scvi-tools would otherwise model
  them and cellvae drop them, and the two held-out likelihoods would cover different genes).

Main mode (default): both tools are trained on an AnnData holding only the training cells, with no validation
set (scvi-tools: ``train_size=1.0``; cellvae: ``train_size=1.0``), and evaluated on an AnnData holding the
held-out cells. Recorded per (tool, dataset, seed):

- training cells/s = n_train_cells * epochs / seconds of the ``train()`` call, and that wall time (each child
  first builds one throwaway ``torch.optim.Adam``: torch imports ``torch._dynamo`` lazily at the first optimizer,
  1-2 s that ``import scvi`` pays at import time and cellvae would otherwise pay inside ``train()``);
- peak RSS: ``ru_maxrss`` of the child process itself (``resource.getrusage(RUSAGE_SELF)``) read right after
  ``train()`` returns: the process's high-water mark, which includes the interpreter, torch, the tool's imports
  and the data, plus the same reading just before ``train()``;
- held-out ELBO and held-out marginal log-likelihood log p(x) (importance sampling with K = ``--n-mc-samples``
  samples for both), in nats per cell with the log-likelihood sign (higher is better), and the held-out
  reconstruction error -log p(x | z) (nats per cell, lower is better);
- ARI / NMI of ``KMeans(k = number of labels, random_state=0, n_init=10)`` on the latent mean of all cells
  (training + held-out), and the label silhouette (ASW) of that latent mean.

Sign conventions checked in scvi-tools 1.4.2: ``get_elbo`` returns ``-compute_elbo(...)`` where ``compute_elbo``
sums reconstruction loss and KL, i.e. the ELBO itself ("not the negative ELBO, so higher is better");
``get_marginal_ll`` returns log p(x) (higher is better; with ``return_mean=True`` it averages per-minibatch means,
so this script takes ``return_mean=False`` and averages over cells itself); ``get_reconstruction_error`` returns
the positive loss -log p(x | z) (its docstring's "higher is better" notwithstanding). The training history's
``elbo_validation`` is the mean of reconstruction loss + KL, a *negative* ELBO, and is sign-flipped here.

``--time-to-quality`` mode: per seed, scvi-tools is trained for ``--max-epochs`` on the training cells with the
held-out cells as its validation set (split forced with ``datasplitter_kwargs={"external_indexing": [...]}``,
validation every epoch); its held-out ELBO after the last epoch is the target. cellvae is trained on the same
cells with the same split (its own seeded split; the cells are reordered so that it picks exactly the benchmark's
training cells, which is checked) and records its held-out ELBO after every epoch. The time to target is the sum
of the per-epoch wall times (training pass + that epoch's held-out ELBO evaluation) up to the first epoch whose
held-out ELBO is at least the target. Per-epoch times: scvi-tools, a Lightning callback (from
``on_train_epoch_start`` to the later of ``on_validation_epoch_end`` / ``on_train_epoch_end``); cellvae,
``history["seconds"]`` (from the start of the epoch's training pass to the end of its validation evaluation).
Set-up before the first epoch and book-keeping between epochs are excluded for both; the whole ``train()`` wall
time is reported beside them.

Usage (from the repository root; ``make bench-install`` sets up ``.venv-bench``)::

    .venv-bench/bin/python benchmarks/vs_scvi.py                                    # all labelled datasets
    .venv-bench/bin/python benchmarks/vs_scvi.py --datasets zeisel2015_cortex_subset_1464cells \\
        --seeds 0 --max-epochs 3 --n-mc-samples 20 --out /tmp/vs.md --json /tmp/vs.json   # smoke test
    .venv-bench/bin/python benchmarks/vs_scvi.py --time-to-quality --datasets pbmc4k_10x_top2000genes
    .venv-bench/bin/python benchmarks/vs_scvi.py --resume                           # continue an interrupted run

A dataset may be given as ``NAME`` or ``NAME:LABEL_KEY``. Markdown goes to ``--out`` and raw rows to ``--json``,
both rewritten (atomically) after every dataset; ``--resume`` keeps the successful rows already in ``--json``
and skips their (mode, tool, dataset, seed) runs. Timings on a shared machine are approximate: compare the
per-seed cellvae/scvi ratios rather than absolute numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, for _common
from _common import (  # noqa: E402
    loadavg,
    DEFAULT_DATASETS,
    REPO_ROOT,
    TOOL_LABEL,
    TOOLS,
    atomic_write_text,
    cap_loaded_threads,
    cluster_scores,
    default_data_dir,
    fmt_mean_sd,
    import_tool,
    limit_threads,
    load_dataset,
    machine_description,
    mean_sd,
    package_version,
    parse_dataset_spec,
    silhouette_scores,
)

BATCH_SIZE = 128
TRAIN_FRACTION = 0.9
ARCH = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "gene_likelihood": "zinb", "dispersion": "gene"}
SCVI_DEFAULT_KL_WARMUP = 400  # scvi-tools TrainingPlan n_epochs_kl_warmup default
MARGINAL_LL_MAX_ELEMENTS = 1 << 22  # samples x cells x genes per decoder pass for scvi-tools' marginal_ll
RESULTS = REPO_ROOT / "benchmarks" / "results"

# scVI paper (Lopez et al., Nat. Methods 15:1053, 2018), numbers as quoted in issue 3 from the paper's table;
# settings from its Online Methods ("Datasets and preprocessing", "Clustering metrics", "Silhouette width").
PAPER = {
    "zeisel2015_cortex_subset_1464cells": {
        "name": "CORTEX", "cells": "3,005", "genes": "558 (top variance)", "types": "7",
        "asw": 0.300, "ari": 0.778, "nmi": 0.744, "neg_elbo": 1196.37,
    },
    "pbmc4k_10x_top2000genes": {
        "name": "PBMC", "cells": "12,039 (10x PBMC 4k + 8k)", "genes": "3,346", "types": "Seurat clusters",
        "asw": None, "ari": 0.797, "nmi": 0.710, "neg_elbo": None,
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="cellvae CountVAE vs scvi-tools SCVI: training speed, peak RSS, held-out ELBO / marginal "
                    "log-likelihood / reconstruction error, and KMeans ARI/NMI, on the same genes, split and "
                    "architecture. --time-to-quality: wall time to reach scvi-tools' final held-out ELBO.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS),
                   help="dataset names (file stem in --data-dir), optionally NAME:LABEL_KEY")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--n-mc-samples", type=int, default=1000,
                   help="importance samples K for the held-out marginal log-likelihood (same for both tools)")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="folder with the .h5ad files (env CELLVAE_DATA_DIR overrides the default)")
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS / OpenMP threads (parent and children)")
    p.add_argument("--max-cells", type=int, default=None,
                   help="subsample datasets with more cells to this many (seeded; reported in the tables)")
    p.add_argument("--cellvae-kl-warmup", type=int, default=None,
                   help="cellvae n_epochs_kl_warmup (default: cellvae's own, half of --max-epochs)")
    p.add_argument("--cellvae-lr", type=float, default=None,
                   help="cellvae (peak) learning rate (default: cellvae's own, 1e-3)")
    p.add_argument("--cellvae-lr-schedule", choices=["cosine", "constant"], default=None,
                   help="cellvae learning-rate schedule (default: cellvae's own, constant)")
    p.add_argument("--scvi-kl-warmup", type=int, default=None,
                   help=f"scvi-tools n_epochs_kl_warmup (default: scvi-tools' own, {SCVI_DEFAULT_KL_WARMUP})")
    p.add_argument("--time-to-quality", action="store_true",
                   help="instead of the main benchmark: wall time each tool needs to reach scvi-tools' final "
                        "held-out ELBO")
    p.add_argument("--ttq-cellvae-extra-epochs", type=int, default=0,
                   help="--time-to-quality: let cellvae train this many epochs beyond --max-epochs, so that a run "
                        "that ends just short of the target still gets a time (its KL warm-up stays that of "
                        "--max-epochs, so with a constant learning rate its first --max-epochs epochs are those "
                        "of a run of --max-epochs)")
    p.add_argument("--out", default=None,
                   help="Markdown report (default benchmarks/results/vs_scvi.md, or vs_scvi_time_to_quality.md "
                        "with --time-to-quality)")
    p.add_argument("--json", default=None,
                   help="raw per-run rows (default benchmarks/results/vs_scvi.json, or "
                        "vs_scvi_time_to_quality.json with --time-to-quality)")
    p.add_argument("--resume", action="store_true",
                   help="keep successful rows already in --json and skip their (mode, tool, dataset, seed) runs")
    args = p.parse_args(argv)
    stem = "vs_scvi_time_to_quality" if args.time_to_quality else "vs_scvi"
    args.out = args.out or str(RESULTS / f"{stem}.md")
    args.json = args.json or str(RESULTS / f"{stem}.json")
    if args.n_mc_samples < 1:
        p.error("--n-mc-samples must be >= 1")
    return args


# ----------------------------------------------------------------------------- split
def make_split(n: int, seed: int):
    """(sorted train positions, sorted held-out positions, cells moved to held-out) from one seeded permutation."""
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n)
    n_train = min(int(math.ceil(TRAIN_FRACTION * n)), n - 1)
    moved = 0
    if n_train % BATCH_SIZE == 1:  # a last minibatch of one cell: batch norm cannot train on it
        n_train -= 1
        moved = 1
    return np.sort(perm[:n_train]), np.sort(perm[n_train:]), moved


def cellvae_split_positions(n: int, train_size: float, seed: int):
    """The positions ``cellvae.data.split_indices(n, train_size, seed)`` picks (same algorithm; the cellvae child
    checks that ``model.train_indices`` equals them)."""
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(np.ceil(train_size * n))
    if train_size < 1.0 and n_train >= n and n >= 2:
        n_train = n - 1
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def prepare_seed(adata, seed: int, tmpdir: Path) -> tuple[Path, dict]:
    """Split, gene filter and (for --time-to-quality) cell order for one seed, saved as an .npz for the children.

    Positions ``train`` / ``heldout`` index ``adata[cells][:, genes]``; ``ttq_order`` reorders those cells so that
    cellvae's own split (``train_size=ttq_train_size``, ``seed``) selects the training cells at ``ttq_train``.
    """
    import numpy as np

    X = adata.X.tocsr() if hasattr(adata.X, "tocsr") else adata.X
    tr, ho, moved = make_split(adata.n_obs, seed)
    detected = np.asarray((X[tr] > 0).sum(0)).ravel() > 0
    ho_tot = np.asarray(X[ho][:, detected].sum(1)).ravel()
    ho_empty = ho[ho_tot == 0]  # held-out cells left without counts on the kept genes (rare)
    ho = ho[ho_tot > 0]
    cells = np.sort(np.concatenate([tr, ho]))
    tr_pos = np.searchsorted(cells, tr)
    ho_pos = np.searchsorted(cells, ho)
    n = len(cells)
    ttq_train_size = (len(tr_pos) - 0.5) / n  # ceil(ttq_train_size * n) == n_train
    cv_tr, cv_ho = cellvae_split_positions(n, ttq_train_size, seed)
    assert len(cv_tr) == len(tr_pos) and len(cv_ho) == len(ho_pos)
    order = np.empty(n, dtype=np.int64)
    order[cv_tr] = tr_pos
    order[cv_ho] = ho_pos
    path = tmpdir / f"split_seed{seed}.npz"
    np.savez(path, cells=cells, genes=detected, train=tr_pos, heldout=ho_pos, ttq_order=order,
             ttq_train=cv_tr, ttq_heldout=cv_ho, ttq_train_size=np.float64(ttq_train_size))
    info = {
        "n_cells_seed": int(n),
        "n_train": int(len(tr_pos)),
        "n_heldout": int(len(ho_pos)),
        "moved_to_heldout_for_batch_size": int(moved),
        "n_heldout_dropped_empty": int(len(ho_empty)),
        "n_genes_model": int(detected.sum()),
        "n_genes_not_in_train": int((~detected).sum()),
        "cells_index": cells,  # removed before the row is stored
    }
    return path, info


# ----------------------------------------------------------------------------- child process
def _maxrss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 / 1024.0 if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB on Linux


def _mean(x):
    import numpy as np

    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return float(np.mean(np.asarray(x, dtype=np.float64)))


def _child(task: dict) -> dict:
    """One training + evaluation, in a fresh process. Returns plain Python / numpy data."""
    import warnings

    cap_loaded_threads(task["threads"])
    mod, version = import_tool(task["tool"])
    import anndata as ad
    import numpy as np
    import torch

    # The first torch.optim.Adam of a process imports torch._dynamo (1-2 s, more memory). `import scvi` does that
    # already (through lightning), cellvae only inside train(): build one throwaway optimizer here so that this
    # one-time import is charged to neither tool's train() time.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])

    out: dict = {"tool_version": version, "rss_after_import_mb": _maxrss_mb(), "warnings": []}
    adata = ad.read_h5ad(task["h5ad"])
    sp = np.load(task["split"])
    full = adata[sp["cells"]][:, sp["genes"]].copy()
    del adata
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if task["mode"] == "main":
            train = full[sp["train"]].copy()
            held = full[sp["heldout"]].copy()
            fn = _main_scvi if task["tool"] == "scvi" else _main_cellvae
            out.update(fn(mod, task, train, held, full))
        else:
            ttq = full[sp["ttq_order"]].copy()
            fn = _ttq_scvi if task["tool"] == "scvi" else _ttq_cellvae
            out.update(fn(mod, task, ttq, sp["ttq_train"], sp["ttq_heldout"], float(sp["ttq_train_size"])))
    msgs = list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught))
    out["warnings"] = msgs[:8]
    return out


def _scvi_plan_kwargs(task) -> dict | None:
    return {"n_epochs_kl_warmup": task["scvi_kl_warmup"]} if task["scvi_kl_warmup"] is not None else None


def _scvi_final_kl_weight(model, task, epochs: int) -> float:
    hist = getattr(model, "history", None) or {}
    if "kl_weight" in hist and len(hist["kl_weight"]):
        return float(hist["kl_weight"].iloc[-1, 0])
    warm = task["scvi_kl_warmup"] if task["scvi_kl_warmup"] is not None else SCVI_DEFAULT_KL_WARMUP
    return 1.0 if not warm else min(1.0, (epochs - 1) / warm)  # per-epoch schedule: weight = epoch / warm


def _main_scvi(scvi, task, train, held, full) -> dict:
    import torch

    seed, threads = task["seed"], task["threads"]
    scvi.settings.seed = seed
    torch.set_num_threads(threads)
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train, **ARCH)
    rss0 = _maxrss_mb()
    t0 = time.perf_counter()
    model.train(max_epochs=task["max_epochs"], train_size=1.0, batch_size=BATCH_SIZE, early_stopping=False,
                accelerator="cpu", enable_progress_bar=False, plan_kwargs=_scvi_plan_kwargs(task))
    secs = time.perf_counter() - t0
    rss1 = _maxrss_mb()
    hist = model.history or {}
    epochs = len(hist["elbo_train"]) if "elbo_train" in hist else task["max_epochs"]
    val_idx = getattr(model, "validation_indices", None)
    n_val = 0 if val_idx is None else len(val_idx)
    assert n_val == 0 and len(model.train_indices) == train.n_obs, "scvi-tools did not train on all given cells"

    t1 = time.perf_counter()
    torch.manual_seed(seed)
    elbo = _mean(model.get_elbo(held, batch_size=BATCH_SIZE))
    per_pass = max(1, min(task["n_mc_samples"], MARGINAL_LL_MAX_ELEMENTS // (BATCH_SIZE * held.n_vars)))
    mll = _mean(model.get_marginal_ll(held, n_mc_samples=task["n_mc_samples"], batch_size=BATCH_SIZE,
                                      return_mean=False, n_mc_samples_per_pass=per_pass))
    rec = _mean(model.get_reconstruction_error(held, batch_size=BATCH_SIZE)["reconstruction_loss"])
    z = model.get_latent_representation(full)
    return {
        "train_seconds": secs, "epochs": int(epochs), "n_train_cells": int(train.n_obs),
        "rss_before_train_mb": rss0, "rss_peak_train_mb": rss1, "rss_peak_total_mb": _maxrss_mb(),
        "heldout_elbo": elbo, "heldout_marginal_ll": mll, "heldout_reconstruction_error": rec,
        "eval_seconds": time.perf_counter() - t1, "z": z.astype("float32"),
        "kl_weight_final": _scvi_final_kl_weight(model, task, int(epochs)),
        "kl_warmup_epochs": task["scvi_kl_warmup"] if task["scvi_kl_warmup"] is not None else SCVI_DEFAULT_KL_WARMUP,
    }


def _cellvae_default(name: str):
    """Default of a ``CountVAE.train`` argument (for the report's description of the settings)."""
    import inspect

    import cellvae

    return inspect.signature(cellvae.CountVAE.train).parameters[name].default


def _cellvae_train_kwargs(task) -> dict:
    kw = {"max_epochs": task["max_epochs"], "batch_size": BATCH_SIZE, "early_stopping": False,
          "seed": task["seed"], "progress_bar": False, "n_threads": task["threads"]}
    if task["cellvae_kl_warmup"] is not None:
        kw["n_epochs_kl_warmup"] = task["cellvae_kl_warmup"]
    if task.get("cellvae_lr") is not None:
        kw["lr"] = task["cellvae_lr"]
    if task.get("cellvae_lr_schedule") is not None:
        kw["lr_schedule"] = task["cellvae_lr_schedule"]
    return kw


def _main_cellvae(cellvae, task, train, held, full) -> dict:
    import torch

    seed = task["seed"]
    torch.set_num_threads(task["threads"])
    model = cellvae.CountVAE(train, **ARCH)
    rss0 = _maxrss_mb()
    t0 = time.perf_counter()
    model.train(train_size=1.0, **_cellvae_train_kwargs(task))
    secs = time.perf_counter() - t0
    rss1 = _maxrss_mb()
    hist = model.history or {}
    epochs = len(hist.get("epoch", [])) or task["max_epochs"]
    n_tr = len(model.train_indices) if getattr(model, "train_indices", None) is not None else train.n_obs
    assert n_tr == train.n_obs, f"cellvae trained on {n_tr} of {train.n_obs} cells"

    t1 = time.perf_counter()
    torch.manual_seed(seed)
    elbo = mll = rec = None
    missing = []
    if hasattr(model, "get_elbo"):
        elbo = _mean(model.get_elbo(held))
    else:
        missing.append("get_elbo")
    if hasattr(model, "get_marginal_ll"):
        mll = _mean(model.get_marginal_ll(held, n_samples=task["n_mc_samples"]))
    else:
        missing.append("get_marginal_ll")
    if hasattr(model, "get_reconstruction_error"):
        r = model.get_reconstruction_error(held)
        rec = _mean(r["reconstruction_loss"] if isinstance(r, dict) else r)
    else:
        missing.append("get_reconstruction_error")
    z = model.get_latent_representation(full)
    klw = hist.get("kl_weight", [None])[-1] if hist.get("kl_weight") else None
    warm = (hist.get("plan") or {}).get("n_epochs_kl_warmup")
    return {
        "train_seconds": secs, "epochs": int(epochs), "n_train_cells": int(n_tr),
        "rss_before_train_mb": rss0, "rss_peak_train_mb": rss1, "rss_peak_total_mb": _maxrss_mb(),
        "heldout_elbo": elbo, "heldout_marginal_ll": mll, "heldout_reconstruction_error": rec,
        "eval_seconds": time.perf_counter() - t1, "z": z.astype("float32"),
        "kl_weight_final": klw, "missing_methods": missing,
        "kl_warmup_epochs": warm if warm is not None else max(1, min(400, task["max_epochs"] // 2)),
    }


def _ttq_scvi(scvi, task, adata, tr, ho, _train_size) -> dict:
    import numpy as np
    import torch
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.start, self.val_end, self.end = [], [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self.start.append(time.perf_counter())

        def on_validation_epoch_end(self, trainer, pl_module):
            self.val_end.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module):
            self.end.append(time.perf_counter())

    scvi.settings.seed = task["seed"]
    torch.set_num_threads(task["threads"])
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, **ARCH)
    timer = EpochTimer()
    t0 = time.perf_counter()
    model.train(max_epochs=task["max_epochs"], batch_size=BATCH_SIZE, early_stopping=False, accelerator="cpu",
                enable_progress_bar=False, check_val_every_n_epoch=1, callbacks=[timer],
                datasplitter_kwargs={"external_indexing": [np.asarray(tr), np.asarray(ho)]},
                plan_kwargs=_scvi_plan_kwargs(task))
    secs = time.perf_counter() - t0
    assert np.array_equal(np.sort(np.asarray(model.train_indices)), tr), "scvi-tools ignored the forced split"
    assert np.array_equal(np.sort(np.asarray(model.validation_indices)), ho), "scvi-tools ignored the forced split"
    val = (-model.history["elbo_validation"]["elbo_validation"].to_numpy(dtype=float)).tolist()
    torch.manual_seed(task["seed"])
    check = _mean(model.get_elbo(adata, indices=ho, batch_size=BATCH_SIZE))  # cross-check of the last value
    n = len(timer.start)
    ends = [max(timer.end[i], timer.val_end[i] if i < len(timer.val_end) else 0.0) for i in range(n)]
    ep_secs = [ends[i] - timer.start[i] for i in range(n)]
    val_inside = all(i < len(timer.val_end) and timer.start[i] <= timer.val_end[i] <= timer.end[i] for i in range(n))
    return {"epochs": n, "val_elbo": val, "epoch_seconds": ep_secs, "train_seconds": secs,
            "n_train_cells": int(len(tr)), "validation_inside_epoch_window": bool(val_inside),
            "final_heldout_elbo_get_elbo": check,
            "kl_weight_final": _scvi_final_kl_weight(model, task, n)}


def _ttq_cellvae(cellvae, task, adata, tr, ho, train_size) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(task["threads"])
    model = cellvae.CountVAE(adata, **ARCH)
    kw = _cellvae_train_kwargs(task)
    if task.get("ttq_cellvae_extra_epochs"):
        kw.setdefault("n_epochs_kl_warmup", cellvae.train.TrainingPlan(max_epochs=kw["max_epochs"]).warmup_epochs)
        kw["max_epochs"] += task["ttq_cellvae_extra_epochs"]
    t0 = time.perf_counter()
    model.train(train_size=train_size, **kw)
    secs = time.perf_counter() - t0
    if not (np.array_equal(np.asarray(model.train_indices), tr)
            and np.array_equal(np.asarray(model.validation_indices), ho)):
        raise RuntimeError("cellvae's split differs from the benchmark's: update cellvae_split_positions() in "
                           "benchmarks/vs_scvi.py to match cellvae.data.split_indices")
    hist = model.history
    if not hist.get("validation_elbo"):
        raise RuntimeError("cellvae history has no per-epoch 'validation_elbo'")
    return {"epochs": len(hist["validation_elbo"]), "val_elbo": [float(v) for v in hist["validation_elbo"]],
            "epoch_seconds": [float(s) for s in hist["seconds"]], "train_seconds": secs,
            "n_train_cells": int(len(tr)), "kl_weight_final": hist.get("kl_weight", [None])[-1]}


def run_in_child(task: dict) -> dict:
    """Run :func:`_child` in a fresh 'spawn' process and return its result (exceptions are re-raised here)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_child, task).result()


# ----------------------------------------------------------------------------- report: helpers
def _vals(rows, key):
    return [r.get(key) for r in rows]


def _fmt(vals, digits, missing="n/a"):
    return fmt_mean_sd(vals, digits, missing=missing)


def _paired(drows, key, op):
    """Per-seed cellvae-vs-scvi values (op(cellvae, scvi)) for the seeds where both ran and have the key."""
    by = {}
    for r in drows:
        if r.get("error") is None:
            by.setdefault(r["seed"], {})[r["tool"]] = r
    out = []
    for _seed, d in sorted(by.items()):
        if "scvi" in d and "cellvae" in d and d["scvi"].get(key) is not None and d["cellvae"].get(key) is not None:
            out.append(op(d["cellvae"][key], d["scvi"][key]))
    return out


def _ratio(a, b):
    return a / b if b else None


def _diff(a, b):
    return a - b


def _datasets(rows):
    order = {d: i for i, d in enumerate(DEFAULT_DATASETS)}
    return sorted(dict.fromkeys(r["dataset"] for r in rows), key=lambda d: order.get(d, len(order)))


def _dataset_line(r0: dict, seed_rows: list[dict]) -> str:
    genes = (f"{r0['n_genes']} seurat_v3 HVG of {r0['n_genes_file']} genes" if r0.get("hvg_seurat_v3")
             else f"{r0['n_genes']} genes")
    if r0.get("hvg_prefilter_min_cells"):
        genes += f" (HVG call after dropping genes detected in < {r0['hvg_prefilter_min_cells']} cells)"
    cells = f"{r0['n_cells']} cells"
    if r0.get("subsampled_from"):
        cells += (f" (**subsampled** at random from {r0['subsampled_from']} with --max-cells, after the HVG "
                  "selection)")
    if r0.get("n_empty_cells_dropped"):
        cells += f" ({r0['n_empty_cells_dropped']} cells without counts dropped)"
    per_seed = {}
    for r in seed_rows:
        per_seed.setdefault(r["seed"], r)
    split = "; ".join(
        f"seed {s}: {r['n_train']} train / {r['n_heldout']} held-out cells, {r['n_genes_model']} genes"
        + (f" ({r['n_genes_not_in_train']} genes absent from the training cells removed)"
           if r.get("n_genes_not_in_train") else "")
        + (" (1 cell moved to held-out: n_train % 128 == 1)" if r.get("moved_to_heldout_for_batch_size") else "")
        + (f" ({r['n_heldout_dropped_empty']} held-out cells without counts on those genes dropped)"
           if r.get("n_heldout_dropped_empty") else "")
        for s, r in sorted(per_seed.items()))
    return (f"{cells}, {genes}, labels `{r0['label_key']}` ({r0['n_labels']} categories). Split: {split}.")


def _header(meta: dict, title: str) -> list[str]:
    out = [f"# {title}", ""]
    out.append(f"Generated {meta['date']} by `benchmarks/vs_scvi.py` ({meta['command']}).")
    out.append("")
    out.append(f"- Machine: {meta['machine']}. Versions: torch {meta['versions'].get('torch')}, scvi-tools "
               f"{meta['versions'].get('scvi-tools')} (lightning {meta['versions'].get('lightning')}), cellvae "
               f"{meta['versions'].get('cellvae')}, scikit-learn {meta['versions'].get('scikit-learn')}. "
               f"{meta['threads']} torch / BLAS / OpenMP thread(s) in every process; CPU only.")
    out.append(f"- **Timings are approximate**: this ran on a shared machine ({meta['cpus']} logical CPUs, other "
               f"jobs running; 1-minute load average {meta.get('loadavg_start', '?')} at the start"
               + (f", {meta['loadavg_end']} at the end" if meta.get("loadavg_end") else "")
               + "). Trainings ran one at a time with alternating tool order; compare the per-seed "
               "cellvae/scvi ratios rather than absolute numbers.")
    kl_s = meta.get("scvi_kl_warmup") or SCVI_DEFAULT_KL_WARMUP
    kl_c = meta.get("cellvae_kl_warmup")
    out.append(f"- Settings: max_epochs={meta['max_epochs']}, batch size {BATCH_SIZE}, no early stopping, seeds "
               f"{' '.join(map(str, meta['seeds']))}; same architecture for both (n_hidden 128, n_latent 10, "
               "n_layers 1, ZINB, gene-wise dispersion, observed library size): scvi-tools "
               "`SCVI(adata, n_hidden=128, n_latent=10, n_layers=1, gene_likelihood=\"zinb\", dispersion=\"gene\")`, "
               "cellvae `CountVAE(adata, <same>)`. KL warm-up: scvi-tools "
               f"{'default ' if not meta.get('scvi_kl_warmup') else ''}{kl_s} epochs (KL weight "
               f"{min(1.0, (meta['max_epochs'] - 1) / kl_s):.2f} in the last epoch), cellvae "
               + (f"{kl_c} epochs" if kl_c is not None else
                  f"default max_epochs // 2 = {max(1, min(400, meta['max_epochs'] // 2))} epochs (full weight "
                  "afterwards)")
               + ". Held-out ELBO and log p(x) are evaluated at KL weight 1, so they partly reflect this "
               "difference of the tools' defaults (`--scvi-kl-warmup` / `--cellvae-kl-warmup` align them). "
               "Optimizer: Adam (eps 0.01, weight decay 1e-6) in both; scvi-tools lr 1e-3 constant (its default), "
               f"cellvae lr {meta.get('cellvae_lr') or 1e-3:g} "
               f"{meta.get('cellvae_lr_schedule') or 'constant'}"
               + (" (its default)" if not meta.get("cellvae_lr") and not meta.get("cellvae_lr_schedule") else "")
               + f", log theta at {_cellvae_default('dispersion_lr_multiplier'):g} x that rate (its default "
               "`dispersion_lr_multiplier`).")
    out.append("- Data: datasets with > 5000 genes are reduced to 2000 highly variable genes "
               "(`scanpy.pp.highly_variable_genes(flavor=\"seurat_v3\", n_top_genes=2000)` on raw counts); cells "
               "without counts are dropped. Per seed, one permutation `numpy.random.default_rng(seed)` of the "
               "cells gives the training cells (first ceil(0.9 n)) and the held-out cells (the rest); genes with "
               "no count in the training cells are removed for both tools. Both tools get exactly these cells "
               "and genes.")
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    return out


# ----------------------------------------------------------------------------- report: main mode
MAIN_COLS = [  # key, header, digits
    ("cells_per_s", "train cells/s", 0),
    ("train_seconds", "train wall s", 1),
    ("rss_peak_train_mb", "peak RSS MiB", 0),
    ("rss_before_train_mb", "RSS before train MiB", 0),
    ("heldout_elbo", "held-out ELBO", 1),
    ("heldout_marginal_ll", "held-out log p(x)", 1),
    ("heldout_reconstruction_error", "held-out recon. error", 1),
    ("ari", "ARI", 3),
    ("nmi", "NMI", 3),
    ("asw_raw", "ASW (raw)", 3),
]
RATIO_KEYS = {"cells_per_s", "train_seconds", "rss_peak_train_mb", "rss_before_train_mb"}


def render_main(rows: list[dict], meta: dict) -> str:
    out = _header(meta, "cellvae vs scvi-tools: speed, memory, held-out likelihood, clustering")
    out.append("- Protocol: every training + evaluation runs in a fresh child process (multiprocessing 'spawn'), "
               "one at a time; scvi-tools first for the 1st, 3rd, ... seed, cellvae first for the 2nd, 4th, .... "
               "Both tools train on an AnnData of the training cells only, with no validation set (scvi-tools "
               "`train(train_size=1.0, batch_size=128, early_stopping=False, accelerator=\"cpu\")`, cellvae "
               "`train(train_size=1.0, batch_size=128, early_stopping=False, seed=seed)`), and are evaluated on an "
               "AnnData of the held-out cells.")
    out.append("- train cells/s = n_train_cells × epochs / wall time of the `train()` call (model construction, "
               "data registration and evaluation excluded); train wall s = that wall time. Before timing, each "
               "child builds one throwaway `torch.optim.Adam`, so torch's one-time lazy import of `torch._dynamo` "
               "(1-2 s; `import scvi` triggers it already, cellvae only at its first optimizer) is charged to "
               "neither tool.")
    out.append("- Peak RSS = `resource.getrusage(RUSAGE_SELF).ru_maxrss` **of the child process itself**, read "
               "right after `train()` returns: the process's high-water mark, including Python, torch, the "
               "tool's own imports and the data. RSS before train = the same reading just before `train()` "
               "(after imports, data loading and model construction); the difference is what training added.")
    out.append(f"- Held-out ELBO and log p(x): nats per cell, log-likelihood sign (**higher is better**), KL weight 1. "
               f"ELBO with one z sample per cell (scvi-tools `get_elbo`, which returns +ELBO; cellvae `get_elbo`). "
               f"log p(x): importance-sampled estimate with K = {meta['n_mc_samples']} samples of q(z|x) for both "
               "(scvi-tools `get_marginal_ll(n_mc_samples=K, return_mean=False)` averaged over cells; cellvae "
               "`get_marginal_ll(n_samples=K)`). Held-out recon. error = -log p(x|z), one z sample, nats per "
               "cell (**lower is better**; scvi-tools `get_reconstruction_error()[\"reconstruction_loss\"]`).")
    out.append("- ARI / NMI: `KMeans(n_clusters = number of labels, random_state=0, n_init=10)` on the latent mean "
               "of all cells (training + held-out) against the labels. ASW (raw): "
               "`sklearn.metrics.silhouette_score(latent mean, labels)` in [-1, 1] (the scib-style (s + 1) / 2 is "
               "in the JSON as `asw_scaled`).")
    out.append("- Mean ± sd (sample sd) over seeds. The `cellvae / scvi` row gives per-seed ratios cellvae/scvi "
               "(cells/s, wall time, RSS) and per-seed differences cellvae − scvi (ELBO, log p(x), reconstruction "
               "error, ARI, NMI, ASW), mean ± sd over the seeds where both ran. n/a: not available (e.g. a cellvae "
               "version without that method).")
    out.append("")
    datasets = _datasets(rows)
    tools = [t for t in TOOLS if any(r["tool"] == t for r in rows)]
    summary = []
    for d in datasets:
        drows = [r for r in rows if r["dataset"] == d]
        ok = [r for r in drows if r.get("error") is None]
        out.append(f"## {d}")
        out.append("")
        out.append(_dataset_line(drows[0], ok or drows))
        out.append("")
        out.append("| tool | seeds | " + " | ".join(h for _, h, _ in MAIN_COLS) + " |")
        out.append("|---|---|" + "---|" * len(MAIN_COLS))
        for t in tools:
            tr = sorted([r for r in ok if r["tool"] == t], key=lambda r: r["seed"])
            if not tr:
                if any(r["tool"] == t for r in drows):
                    out.append(f"| {TOOL_LABEL[t]} | failed |" + " - |" * len(MAIN_COLS))
                continue
            seeds = " ".join(str(r["seed"]) for r in tr)
            cells = [_fmt(_vals(tr, k), dg) for k, _, dg in MAIN_COLS]
            out.append(f"| {TOOL_LABEL[t]} | {seeds} | " + " | ".join(cells) + " |")
        if "scvi" in tools and "cellvae" in tools:
            cells = []
            srow = {"dataset": d}
            for k, _, dg in MAIN_COLS:
                if k in RATIO_KEYS:
                    v = [x for x in _paired(drows, k, _ratio) if x is not None]
                    cells.append(_fmt(v, 2, missing="-") + ("×" if v else ""))
                else:
                    v = _paired(drows, k, _diff)
                    cells.append(("Δ " if v else "") + _fmt(v, dg, missing="-"))
                srow[k] = mean_sd(v)[0]
            n_pairs = len(_paired(drows, "train_seconds", _diff))
            out.append(f"| **cellvae / scvi** | {n_pairs} pair(s) | " + " | ".join(cells) + " |")
            summary.append(srow)
        for r in [r for r in drows if r.get("error") is not None]:
            out.append("")
            out.append(f"Failed: {r['tool']} seed {r['seed']}: `{r['error']}`")
        kl = {t: [r.get("kl_weight_final") for r in ok if r["tool"] == t] for t in tools}
        kl_txt = ", ".join(f"{t} {mean_sd(v)[0]:.2f}" for t, v in kl.items() if mean_sd(v)[0] is not None)
        if kl_txt:
            out.append("")
            out.append(f"KL weight in the last epoch: {kl_txt}.")
        warns = {}
        for r in ok:
            for w in r.get("warnings") or []:
                warns.setdefault(r["tool"], dict.fromkeys([]))[w] = None
        for t, ws in warns.items():
            out.append("")
            out.append(f"Warnings seen in the {t} child: " + "; ".join(f"`{w}`" for w in list(ws)[:4]) + ".")
        out.append("")

    if summary:
        out.append("## Summary: cellvae relative to scvi-tools (mean over seeds)")
        out.append("")
        out.append("| dataset | cells/s ratio | wall-time ratio | peak RSS ratio | Δ held-out ELBO | Δ held-out log p(x) "
                   "| Δ ARI | Δ NMI |")
        out.append("|---|---|---|---|---|---|---|---|")

        def f(v, dg, suffix=""):
            return "-" if v is None else (f"{v:.{dg}f}{suffix}" if suffix else f"{v:+.{dg}f}")

        for s in summary:
            out.append(f"| {s['dataset']} | {f(s['cells_per_s'], 2, '×')} | {f(s['train_seconds'], 2, '×')} | "
                       f"{f(s['rss_peak_train_mb'], 2, '×')} | {f(s['heldout_elbo'], 1)} | "
                       f"{f(s['heldout_marginal_ll'], 1)} | {f(s['ari'], 3)} | {f(s['nmi'], 3)} |")
        out.append("")
        out.append("Ratios > 1 in cells/s and < 1 in wall time / RSS favour cellvae; positive Δ in ELBO, log p(x), "
                   "ARI, NMI favour cellvae.")
        out.append("")

    out += _render_paper(rows, meta)
    return "\n".join(out)


def _render_paper(rows: list[dict], meta: dict) -> list[str]:
    present = [d for d in PAPER if any(r["dataset"] == d and r.get("error") is None for r in rows)]
    if not present:
        return []
    out = ["## Beside the scVI paper", ""]
    out.append("The scVI paper (Lopez et al., *Nat. Methods* 15:1053, 2018) reports for scVI on CORTEX "
               "ASW .300, ARI .778, NMI .744 and a held-out negative ELBO of 1196.37 nats (558 genes), and on PBMC "
               "ARI .797, NMI .710 (numbers as quoted in issue 3 from the paper's table; not re-checked here). "
               "Its silhouette is the raw mean silhouette width s(i) = (b − a) / max(a, b) in [-1, 1] (Online "
               "Methods, \"Silhouette width\"; the original scVI code calls `sklearn.metrics.silhouette_score` on "
               "the latent space with the labels), so the **raw** silhouette is shown here, not scib's (s + 1) / 2. "
               "Our held-out numbers are shown as negative ELBO and negative log p(x) (nats per cell, lower is "
               "better) to match the paper's sign.")
    out.append("")
    out.append("| source | data | cells | genes | types | epochs | ASW (raw) | ARI | NMI | held-out −ELBO | "
               "−ELBO / gene | held-out −log p(x) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in present:
        p = PAPER[d]
        pv = lambda v, dg=3: "-" if v is None else f"{v:.{dg}f}"  # noqa: E731
        out.append(f"| scVI paper | {p['name']} | {p['cells']} | {p['genes']} | {p['types']} | 120-250 "
                   f"(\"until convergence\") | {pv(p['asw'])} | {pv(p['ari'])} | {pv(p['nmi'])} | "
                   f"{pv(p['neg_elbo'], 2)} | {pv(p['neg_elbo'] / 558 if p['neg_elbo'] else None, 2)} | - |")
        ok = [r for r in rows if r["dataset"] == d and r.get("error") is None]
        for t in TOOLS:
            tr = [r for r in ok if r["tool"] == t]
            if not tr:
                continue
            r0 = tr[0]
            neg = lambda k: [None if r.get(k) is None else -r[k] for r in tr]  # noqa: E731
            per_gene = [None if r.get("heldout_elbo") is None else -r["heldout_elbo"] / r["n_genes_model"] for r in tr]
            out.append(
                f"| {TOOL_LABEL[t]} (ours) | `{d}` | {r0['n_cells']} ({r0['n_train']} train) | {r0['n_genes_model']} | "
                f"{r0['n_labels']} | {r0['epochs']} | {_fmt(_vals(tr, 'asw_raw'), 3)} | {_fmt(_vals(tr, 'ari'), 3)} | "
                f"{_fmt(_vals(tr, 'nmi'), 3)} | {_fmt(neg('heldout_elbo'), 1)} | "
                f"{_fmt(per_gene, 2)} | "
                f"{_fmt(neg('heldout_marginal_ll'), 1)} |")
    out.append("")
    out.append("Differences in setting (the numbers are **not** directly comparable):")
    out.append("")
    if "zeisel2015_cortex_subset_1464cells" in present:
        out.append("- CORTEX: the paper used the full Zeisel et al. 2015 data, 3,005 cells with 7 cell types and "
                   "the 558 genes of highest variance; `zeisel2015_cortex_subset_1464cells` is a 1,464-cell subset "
                   "with 3 classes (CA1 pyramidal, interneurons, endothelial-mural; 939 / 290 / 235 cells) and "
                   "1,095 genes. ARI, NMI and ASW depend on the number and balance of the classes, so they do not "
                   "carry over between the two label sets; the negative ELBO is a sum over genes and tends to grow "
                   "with their number (the per-gene column is only a rough scale: genes differ in depth and "
                   "variability).")
    if "pbmc4k_10x_top2000genes" in present:
        out.append("- PBMC: the paper used 12,039 PBMCs (10x PBMC 4k + 8k, two batches) with 3,346 genes and "
                   "Seurat cluster labels; `pbmc4k_10x_top2000genes` is the 4k run alone (4,271 cells), the scDCC "
                   "authors' 2,000 most variable genes and 8 labels.")
    out.append(f"- Training: the paper trained \"until convergence, usually between 120 and 250 epochs\" with "
               f"hyper-parameters from a small grid search on held-out likelihood; here both tools train exactly "
               f"{meta['max_epochs']} epochs with the default architecture. The 2018 scVI model inferred the "
               "library size as a latent variable; scvi-tools' and cellvae's defaults (used here) take the "
               "observed library size.")
    out.append("- Clustering: the paper ran k-means with 200 initialisations; here `n_init=10`, on all cells.")
    out.append("- Held-out split: ours is a seeded 90/10 split of the cells; the paper's held-out protocol is "
               "described in its Supplementary Note 6 and may differ.")
    out.append("")
    return out


# ----------------------------------------------------------------------------- report: time to quality
def ttq_results(rows: list[dict]) -> list[dict]:
    """Per (dataset, seed): scvi's target and each tool's first epoch / time reaching it."""
    res = []
    for d in _datasets(rows):
        ok = [r for r in rows if r["dataset"] == d and r.get("error") is None]
        for seed in sorted({r["seed"] for r in ok}):
            by = {r["tool"]: r for r in ok if r["seed"] == seed}
            target = by["scvi"]["val_elbo"][-1] if "scvi" in by else None
            item = {"dataset": d, "seed": seed, "target": target}
            for t, r in by.items():
                cum = 0.0
                reached = None
                for i, (v, s) in enumerate(zip(r["val_elbo"], r["epoch_seconds"])):
                    cum += s
                    if target is not None and v >= target and reached is None:
                        reached = (i + 1, cum)
                item[t] = {"reached": reached, "epochs_seconds": sum(r["epoch_seconds"]),
                           "train_seconds": r["train_seconds"], "final": r["val_elbo"][-1],
                           "epochs": r["epochs"]}
            res.append(item)
    return res


def render_ttq(rows: list[dict], meta: dict) -> str:
    out = _header(meta, "cellvae vs scvi-tools: time to reach scvi-tools' final held-out ELBO")
    out.append("- Target: per seed, scvi-tools is trained for max_epochs on the training cells with the held-out "
               "cells as its validation set (forced with `datasplitter_kwargs={\"external_indexing\": [train, "
               "held_out]}`, `check_val_every_n_epoch=1`); the target is its held-out ELBO after the last epoch "
               "(`-history[\"elbo_validation\"]`, nats per cell, higher is better).")
    extra = meta.get("ttq_cellvae_extra_epochs") or 0
    out.append("- cellvae is trained for the same number of epochs"
               + (f" plus {extra} (`--ttq-cellvae-extra-epochs`: so that a run ending just short of the target "
                  "still gets a time; KL warm-up and, with a constant learning rate, the first max_epochs epochs "
                  "are those of a max_epochs run, so its ELBO after max_epochs is unchanged)" if extra else "")
               + " on the same cells with the same split "
               "(`train(train_size=...)` on cells reordered so that its seeded split picks exactly the "
               "benchmark's training cells; checked against `model.train_indices`) and records its held-out "
               "ELBO after every epoch (`history[\"validation_elbo\"]`). Both evaluate the held-out ELBO at KL "
               "weight 1 with one z sample per cell, in eval mode.")
    out.append("- Time to target = sum of the per-epoch wall times up to the first epoch whose held-out ELBO is "
               ">= the target. A per-epoch wall time covers the training pass and that epoch's held-out ELBO "
               "evaluation: scvi-tools, a Lightning callback from `on_train_epoch_start` to the later of "
               "`on_validation_epoch_end` / `on_train_epoch_end`; cellvae, `history[\"seconds\"]`. Excluded for "
               "both: set-up before the first epoch and book-keeping between epochs (the whole `train()` wall time "
               "is given for reference; torch's lazy `torch._dynamo` import is done before it, as in the main "
               "mode). scvi-tools reaches its own target at its last epoch at the latest, by "
               "construction. Each training runs in a fresh child process; tool order alternates per seed.")
    out.append("")
    res = ttq_results(rows)
    tools = [t for t in TOOLS if any(r["tool"] == t for r in rows)]
    summary = {}
    for d in _datasets(rows):
        drows = [r for r in rows if r["dataset"] == d]
        ok = [r for r in drows if r.get("error") is None]
        out.append(f"## {d}")
        out.append("")
        out.append(_dataset_line(drows[0], ok or drows))
        out.append("")
        head = "| seed | target ELBO |"
        sep = "|---|---|"
        for t in tools:
            head += f" {t}: epoch reached | {t}: s to target | {t}: s all epochs (train() s) | {t}: final ELBO |"
            sep += "---|---|---|---|"
        if len(tools) == 2:
            head += " time-to-target ratio cellvae/scvi |"
            sep += "---|"
        out += [head, sep]
        for item in [x for x in res if x["dataset"] == d]:
            target = "-" if item["target"] is None else f"{item['target']:.1f}"
            line = f"| {item['seed']} | {target} |"
            for t in tools:
                x = item.get(t)
                if x is None:
                    line += " failed | - | - | - |"
                    continue
                if x["reached"] is None:
                    line += f" not reached in {x['epochs']} | - |"
                else:
                    line += f" {x['reached'][0]} of {x['epochs']} | {x['reached'][1]:.1f} |"
                line += f" {x['epochs_seconds']:.1f} ({x['train_seconds']:.1f}) | {x['final']:.1f} |"
            if len(tools) == 2:
                a, b = item.get("cellvae"), item.get("scvi")
                if a and b and a["reached"] and b["reached"]:
                    ratio = a["reached"][1] / b["reached"][1]
                    line += f" {ratio:.2f}× |"
                    summary.setdefault(d, []).append(ratio)
                else:
                    line += " - |"
            out.append(line)
        for r in [r for r in drows if r.get("error") is not None]:
            out.append("")
            out.append(f"Failed: {r['tool']} seed {r['seed']}: `{r['error']}`")
        out.append("")
    if summary:
        out.append("## Summary")
        out.append("")
        out.append("| dataset | time-to-target ratio cellvae/scvi (mean ± sd over seeds where both reached it) |")
        out.append("|---|---|")
        for d, v in summary.items():
            out.append(f"| {d} | {fmt_mean_sd(v, 2)}× |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def write_outputs(rows, meta, md_path: Path, json_path: Path, ttq: bool) -> None:
    atomic_write_text(json_path, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    atomic_write_text(md_path, (render_ttq if ttq else render_main)(rows, meta) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_threads(args.threads)
    cap_loaded_threads(args.threads)
    import numpy as np

    mode = "ttq" if args.time_to_quality else "main"
    data_dir = Path(args.data_dir)
    md_path, json_path = Path(args.out), Path(args.json)

    rows: list[dict] = []
    old_meta: dict = {}
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        rows = [r for r in old.get("rows", []) if r.get("error") is None and r.get("mode", "main") == mode]
        old_meta = old.get("meta", {})
        print(f"[resume] kept {len(rows)} rows from {json_path}", flush=True)
    done = {(r["tool"], r["dataset"], r["seed"]) for r in rows}

    meta = {
        "mode": mode,
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "`" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) + "`",
        "machine": machine_description(),
        "cpus": os.cpu_count(),
        "versions": {p: package_version(p) for p in
                     ("torch", "scvi-tools", "lightning", "cellvae", "scikit-learn", "anndata", "scanpy")},
        "threads": args.threads,
        "max_epochs": args.max_epochs,
        "seeds": args.seeds,
        "n_mc_samples": args.n_mc_samples,
        "scvi_kl_warmup": args.scvi_kl_warmup,
        "cellvae_kl_warmup": args.cellvae_kl_warmup,
        "cellvae_lr": args.cellvae_lr,
        "cellvae_lr_schedule": args.cellvae_lr_schedule,
        "ttq_cellvae_extra_epochs": args.ttq_cellvae_extra_epochs,
        "loadavg_start": old_meta.get("loadavg_start", loadavg()),
        "notes": old_meta.get("notes", []),
    }
    if args.resume and old_meta:
        meta["notes"] = list(dict.fromkeys(meta["notes"] + [
            f"Resumed run: rows from an earlier run started {old_meta.get('date', '?')} were kept."]))
        for key in ("max_epochs", "n_mc_samples", "threads", "scvi_kl_warmup", "cellvae_kl_warmup", "cellvae_lr",
                    "cellvae_lr_schedule", "ttq_cellvae_extra_epochs"):
            if key in old_meta and old_meta[key] != meta[key]:
                msg = (f"--resume: kept rows were made with {key}={old_meta[key]}, this run uses {meta[key]}; "
                       "the tables mix both")
                print(f"[warning] {msg}", flush=True)
                meta["notes"] = list(dict.fromkeys(meta["notes"] + [f"**Warning**: {msg}."]))

    t_start = time.perf_counter()
    for spec in args.datasets:
        name, label_key = parse_dataset_spec(spec)
        todo = [(s, t) for s in args.seeds for t in args.tools if (t, name, s) not in done]
        if not todo:
            print(f"== {name}: all runs already in {json_path.name}, skipped", flush=True)
            continue
        try:
            adata, labels, info = load_dataset(data_dir, name, label_key)
        except Exception as e:  # noqa: BLE001
            print(f"[skip] dataset {name}: {type(e).__name__}: {e}", flush=True)
            continue
        tot = np.asarray(adata.X.sum(1)).ravel()
        keep = tot > 0
        info["n_empty_cells_dropped"] = int((~keep).sum())
        if not keep.all():
            adata, labels = adata[keep].copy(), labels[keep]
        if args.max_cells and adata.n_obs > args.max_cells:
            idx = np.sort(np.random.default_rng(12345).choice(adata.n_obs, args.max_cells, replace=False))
            info["subsampled_from"] = int(adata.n_obs)
            adata, labels = adata[idx].copy(), labels[idx]
        info["n_cells"] = int(adata.n_obs)
        info["n_labels"] = int(len(np.unique(labels)))
        print(f"== {name}: {info['n_cells']} cells x {info['n_genes']} genes"
              f"{' (seurat_v3 HVG of ' + str(info['n_genes_file']) + ')' if info['hvg_seurat_v3'] else ''}, "
              f"{info['n_labels']} labels ({label_key})", flush=True)

        with tempfile.TemporaryDirectory(prefix="vs_scvi_") as tmp:
            tmpdir = Path(tmp)
            h5ad = tmpdir / "data.h5ad"
            adata.write_h5ad(h5ad)
            for pos, seed in enumerate(args.seeds):
                order = list(TOOLS) if pos % 2 == 0 else list(reversed(TOOLS))
                order = [t for t in order if t in args.tools and (t, name, seed) not in done]
                if not order:
                    continue
                split_path, sinfo = prepare_seed(adata, seed, tmpdir)
                cells_index = sinfo.pop("cells_index")
                seed_labels = labels[cells_index]
                for k, tool in enumerate(order):
                    row = {"mode": mode, "tool": tool, "seed": seed, "order_in_seed": k + 1, **info, **sinfo,
                           "max_epochs": args.max_epochs, "threads": args.threads, "error": None}
                    task = {"mode": mode, "tool": tool, "seed": seed, "threads": args.threads,
                            "max_epochs": args.max_epochs, "n_mc_samples": args.n_mc_samples,
                            "h5ad": str(h5ad), "split": str(split_path),
                            "scvi_kl_warmup": args.scvi_kl_warmup, "cellvae_kl_warmup": args.cellvae_kl_warmup,
                            "cellvae_lr": args.cellvae_lr, "cellvae_lr_schedule": args.cellvae_lr_schedule,
                            "ttq_cellvae_extra_epochs": args.ttq_cellvae_extra_epochs}
                    t0 = time.perf_counter()
                    try:
                        res = run_in_child(task)
                        if mode == "main":
                            z = res.pop("z")
                            ari, nmi = cluster_scores(z, seed_labels, len(np.unique(seed_labels)))
                            asw_raw, asw_scaled = silhouette_scores(z, seed_labels)
                            res.update(ari=ari, nmi=nmi, asw_raw=asw_raw, asw_scaled=asw_scaled,
                                       cells_per_s=res["n_train_cells"] * res["epochs"] / res["train_seconds"],
                                       n_mc_samples=args.n_mc_samples)
                            checks = []
                            if res.get("heldout_elbo") is not None and res["heldout_elbo"] > 0:
                                checks.append("held-out ELBO > 0 for counts: sign convention suspect")
                            if (res.get("heldout_marginal_ll") is not None and res.get("heldout_elbo") is not None
                                    and res["heldout_marginal_ll"] < res["heldout_elbo"] - 1.0):
                                checks.append("log p(x) estimate below the ELBO by > 1 nat")
                            res["checks"] = checks
                        row.update(res)
                        row["child_wall_seconds"] = time.perf_counter() - t0
                        if mode == "main":
                            fmt = lambda v, d=1: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
                            print(f"  seed {seed} {tool:8s}: {row['train_seconds']:.1f} s "
                                  f"({row['cells_per_s']:,.0f} cells/s), peak RSS {row['rss_peak_train_mb']:.0f} MiB, "
                                  f"held-out ELBO {fmt(row['heldout_elbo'])} log p(x) "
                                  f"{fmt(row['heldout_marginal_ll'])} recon {fmt(row['heldout_reconstruction_error'])}, "
                                  f"ARI {row['ari']:.3f} NMI {row['nmi']:.3f} ASW {row['asw_raw']:.3f}"
                                  + (f"  [{'; '.join(row['checks'])}]" if row["checks"] else ""), flush=True)
                        else:
                            print(f"  seed {seed} {tool:8s}: {row['epochs']} epochs, final held-out ELBO "
                                  f"{row['val_elbo'][-1]:.1f}, {sum(row['epoch_seconds']):.1f} s in epochs "
                                  f"({row['train_seconds']:.1f} s train())", flush=True)
                    except Exception as e:  # noqa: BLE001 - record and go on
                        traceback.print_exc()
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                        print(f"  seed {seed} {tool:8s}: FAILED {row['error']}", flush=True)
                    rows.append(row)
        meta["loadavg_end"] = loadavg()
        write_outputs(rows, meta, md_path, json_path, mode == "ttq")  # after every dataset
    meta["loadavg_end"] = loadavg()
    write_outputs(rows, meta, md_path, json_path, mode == "ttq")
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; wrote {md_path} and {json_path}\n", flush=True)
    print((render_ttq if mode == "ttq" else render_main)(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
