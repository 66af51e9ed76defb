#!/usr/bin/env python
"""cellvae ``CountVAE`` vs scvi-tools ``SCVI``: quality of each tool as a new user runs it (issue 3).

For every labelled dataset of ``../shared/data`` and every seed, both tools are trained on the same 90 % of the
cells and evaluated on the same held-out 10 %; the latent space of all cells is scored against the labels.

Data and split (identical for both tools):

- A dataset with more than 5000 genes is reduced to 2000 seurat_v3 highly variable genes (``_common.load_dataset``);
  cells with zero counts are dropped.
- Per seed, one permutation ``numpy.random.default_rng(seed).permutation(n_cells)`` gives the training cells (its
  first ``ceil(0.9 n)``) and the held-out cells (the rest). If that leaves ``n_train % 128 == 1`` one more cell
  goes to the held-out set, so no training minibatch holds a single cell (batch norm).
- Genes detected in no training cell of the seed are removed for both tools (otherwise the held-out likelihoods
  would cover different genes); held-out cells left without counts on the kept genes are dropped (rare).
- Both tools train on an AnnData holding only the training cells; what each does inside it (its own validation
  split, early stopping) is its own business.
- Datasets whose cells come from more than one technology (``BATCH_KEYS``) give both tools that obs column as the
  batch key, as a user of either tool would; ``--no-batch-key`` runs them without it (rows reported separately).

Modes (``--mode``; default both):

- ``defaults``: each tool exactly as a new user runs it. scvi-tools: ``SCVI.setup_anndata(train);
  m = SCVI(train); m.train(accelerator="cpu", enable_progress_bar=False)`` with ``scvi.settings.seed = seed``:
  its epoch heuristic ``min(400, round(20000 / n_train * 400))``, 400-epoch KL warm-up, its own internal 90 %
  train split (the last weights are kept), no early stopping. cellvae: ``m = CountVAE(train);
  m.train(seed=seed, progress_bar=False, n_threads=1)``: its own defaults (epoch heuristic, early stopping on its
  own internal validation split, best weights restored; ``history["plan"]`` is recorded in every row).
- ``equal-schedule``: the schedule of scvi-tools' defaults for both, no early stopping: ``E = min(400,
  round(20000 / n_train * 400))`` epochs, KL warm-up over E epochs, ``train_size=0.9``, batch 128. scvi-tools' run
  in this mode is its defaults run (same settings, same seed), so the ``defaults`` scvi row is used for both modes
  (it is trained once). cellvae: ``m.train(max_epochs=E, n_epochs_kl_warmup=E, early_stopping=False,
  train_size=0.9, seed=seed, progress_bar=False, n_threads=1)``.

Recorded per (mode, tool, dataset, seed), one JSON row: tool version, epochs run, ``train()`` wall seconds,
held-out ELBO (nats per cell, higher is better; one z sample per cell), held-out IWAE log p(x) with K =
``--n-mc-samples`` (1000) importance samples, averaged over cells, and on the latent means of all cells (training
+ held-out) ``cellvae.metrics.evaluate_latent`` (KMeans / Leiden ARI and NMI with k = number of labels, scIB bio
conservation, depth R^2 overall and within labels; library = total counts per cell over the modelled genes).
Also: the 1-minute load average at the start and end of the run, the git commit of the repository (and whether
``src/`` had uncommitted changes), the date, and for cellvae its settings (``history["plan"]``, ``m.settings``)
so that rows made with older cellvae defaults can be recognised.

Sign conventions checked in scvi-tools 1.5.1: ``get_elbo`` returns ``-compute_elbo(...)`` where ``compute_elbo``
sums reconstruction loss and (unweighted) KL, i.e. the ELBO itself (its docstring: "not the negative ELBO, so
higher is better"); ``get_marginal_ll`` returns log p(x) (higher is better). With ``return_mean=True`` it
averages per-minibatch means, so this script takes ``return_mean=False`` and averages over cells itself; its
estimator runs ``ceil(K / n_mc_samples_per_pass)`` passes but divides by K, so ``n_mc_samples_per_pass`` is taken
as a divisor of K (the largest that keeps one pass under ~4M cells x samples x genes).

Every training + evaluation runs in a fresh child process (multiprocessing 'spawn', niceness at least 5, one
torch / BLAS / OpenMP / numba / XLA thread), one at a time. Work order: seeds in waves (the first two seeds of
``--seeds`` for every dataset, then each further seed for every dataset), so partial results cover all datasets.

Usage (from the repository root; ``make bench-install`` sets up ``.venv-bench``)::

    .venv-bench/bin/python benchmarks/vs_scvi.py                               # all, both modes, seeds 0-4
    nohup nice -n 5 .venv-bench/bin/python benchmarks/vs_scvi.py --mode defaults --tools scvi --resume \\
        > benchmarks/results/vs_scvi_scvi_runs.log 2>&1 &                      # scvi-tools rows only
    .venv-bench/bin/python benchmarks/vs_scvi.py --tools cellvae --rerun-tool cellvae   # redo all cellvae rows
    .venv-bench/bin/python benchmarks/vs_scvi.py --report-only                 # rebuild the Markdown

Rows are keyed by (mode, tool, dataset, seed) and merged into ``--json`` (default
``benchmarks/results/vs_scvi.json``); the JSON and the Markdown (``--out``, default ``benchmarks/results/vs_scvi.md``)
are rewritten atomically after every run, re-reading the JSON first so that rows written meanwhile by another
invocation are kept. ``--resume`` skips runs whose row is already there (failed rows are retried); without it the
requested runs are redone and replace their rows. ``--rerun-tool cellvae`` first drops that tool's rows of the
selected modes, datasets and seeds (e.g. after cellvae's defaults changed).

The old speed / memory / time-to-quality modes of this script moved out (to ``throughput.py``); they are in git
history (``git show 4219f44:benchmarks/vs_scvi.py``). ``ARCH``, ``BATCH_SIZE``, ``TRAIN_FRACTION``,
``SCVI_DEFAULT_KL_WARMUP``, ``ttq_results`` and ``_cellvae_default`` stay importable for the scripts that use them.
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
    REPO_ROOT,
    TOOLS,
    atomic_write_text,
    cap_loaded_threads,
    default_data_dir,
    git_commit,
    import_tool,
    limit_threads,
    load_dataset,
    machine_description,
    mean_sd,
    package_version,
    paired_t_ci,
    parse_dataset_spec,
)

BATCH_SIZE = 128
TRAIN_FRACTION = 0.9
# The architecture of both tools' defaults (used by crosscheck_scvi.py and imputation.py; this script passes none).
ARCH = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "gene_likelihood": "zinb", "dispersion": "gene"}
SCVI_DEFAULT_KL_WARMUP = 400  # scvi-tools TrainingPlan n_epochs_kl_warmup default
MARGINAL_LL_MAX_ELEMENTS = 1 << 22  # cells x samples x genes per decoder pass for scvi-tools' marginal_ll
MIN_NICE = 5
RESULTS = REPO_ROOT / "benchmarks" / "results"
MODES = ("defaults", "equal-schedule")

# Every labelled dataset of ../shared/data and its label key, in report order. cbmc_citeseq_rna_top2000genes is
# left out: its RNA is that of cbmc_citeseq_stoeckius2017_8617cells (which has named labels).
DATASETS: dict[str, str] = {
    "pbmc4k_10x_top2000genes": "cell_type",
    "zeisel2015_cortex_subset_1464cells": "cell_type",
    "kang2018_ifnb_pbmc_muscat": "cell_type",
    "pbmc_10x_3chemistries": "cell_type_marker",
    "pbmc_10x_3tech_savercat_2000cells": "cell_type",
    "mouse_bladder_mca_2100cells": "cell_type",
    "worm_neuron_cao2017": "cell_type",
    "human_kidney_top2000genes": "cell_type",
    "mesc_kolodziejczyk2015_300cells": "cell_type",
    "cbmc_citeseq_stoeckius2017_8617cells": "cell_type",
    "pbmc10k_citeseq_10x_6434cells": "cell_type",
    "cellline_mixology_tian2019_5batches": "cell_type",
}
# Datasets whose cells come from more than one technology (10x chemistries, CEL-seq2 plates and Drop-seq): a user
# of either tool passes the technology as the batch key (scvi-tools' `setup_anndata(batch_key=...)`, cellvae's
# `CountVAE(batch_key=...)`), so both tools get it in every mode. Without it, both latent spaces keep technology as
# a local structure (95-97 % of a cell's 15 nearest neighbours share its technology on pbmc_10x_3tech, either tool),
# and Leiden with k = 3 clusters splits by technology or by cell type on a near tie (issue 20).
# `--no-batch-key` runs these datasets without it (the earlier protocol; its rows are reported separately).
BATCH_KEYS: dict[str, str] = {
    "pbmc_10x_3chemistries": "batch",
    "pbmc_10x_3tech_savercat_2000cells": "batch",
    "cellline_mixology_tian2019_5batches": "batch",
}
LEFT_OUT = {"cbmc_citeseq_rna_top2000genes": "same RNA counts as cbmc_citeseq_stoeckius2017_8617cells, which "
                                             "replaces it (named labels)"}

# (key, header, digits, direction): +1 higher is better, -1 lower is better, 0 no verdict
METRICS = [
    ("kmeans_ari", "KMeans ARI", 3, +1),
    ("leiden_ari", "Leiden ARI", 3, +1),
    ("bio_conservation", "scIB bio conservation", 3, +1),
    ("heldout_log_px", "held-out log p(x) (nats/cell, IWAE)", 1, +1),
    ("kmeans_nmi", "KMeans NMI", 3, +1),
    ("leiden_nmi", "Leiden NMI", 3, +1),
    ("heldout_elbo", "held-out ELBO (nats/cell)", 1, +1),
    ("depth_r2_within_labels", "depth R² within labels (lower is better)", 3, -1),
    ("epochs", "epochs run", 0, 0),
    ("train_seconds", "train() wall seconds", 0, 0),
]
_LEGACY_OPTS = ("--time-to-quality", "--max-epochs", "--scvi-kl-warmup", "--cellvae-kl-warmup", "--cellvae-lr",
                "--cellvae-lr-schedule", "--ttq-cellvae-extra-epochs", "--max-cells")


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    legacy = [a for a in argv if a.split("=")[0] in _LEGACY_OPTS]
    if legacy:
        raise SystemExit(f"vs_scvi.py: {' '.join(legacy)}: the speed / time-to-quality modes were removed from this "
                         "script (quality at each tool's defaults only); they are in "
                         "`git show 4219f44:benchmarks/vs_scvi.py` until throughput.py carries them.")
    p = argparse.ArgumentParser(
        description="cellvae CountVAE vs scvi-tools SCVI at each tool's defaults (and on scvi-tools' schedule): "
                    "held-out ELBO and log p(x), KMeans / Leiden ARI and NMI, scIB bio conservation, depth R².",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--mode", nargs="+", choices=[*MODES, "both"], default=["both"],
                   help="defaults: each tool as a new user runs it; equal-schedule: scvi-tools' schedule for both")
    p.add_argument("--defaults", dest="mode_flags", action="append_const", const="defaults",
                   help="same as --mode defaults (combinable with --equal-schedule)")
    p.add_argument("--equal-schedule", dest="mode_flags", action="append_const", const="equal-schedule",
                   help="same as --mode equal-schedule")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS),
                   help="dataset names (file stem in --data-dir), optionally NAME:LABEL_KEY")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="run in waves: the first two seeds on every dataset, then each further seed")
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--n-mc-samples", type=int, default=1000,
                   help="importance samples K for the held-out log p(x) (same for both)")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="folder with the .h5ad files (env CELLVAE_DATA_DIR overrides the default)")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS / OpenMP threads (parent and children)")
    p.add_argument("--out", default=str(RESULTS / "vs_scvi.md"), help="Markdown report")
    p.add_argument("--json", default=str(RESULTS / "vs_scvi.json"), help="rows (merged by mode, tool, dataset, seed)")
    p.add_argument("--resume", action="store_true",
                   help="skip runs whose row is already in --json (failed rows are retried)")
    p.add_argument("--rerun-tool", nargs="+", choices=TOOLS, default=[],
                   help="drop this tool's rows of the selected modes, datasets and seeds before running")
    p.add_argument("--no-batch-key", action="store_true",
                   help="run the multi-technology datasets (BATCH_KEYS) without their batch key (the earlier "
                        "protocol; reported in a separate section)")
    p.add_argument("--report-only", action="store_true", help="only rebuild --out from --json")
    p.add_argument("--max-epochs-override", type=int, default=None, help=argparse.SUPPRESS)  # smoke tests only
    args = p.parse_args(argv)
    modes = set(args.mode_flags or []) or set(args.mode)
    if "both" in modes:
        modes = set(MODES)
    args.modes = [m for m in MODES if m in modes]
    if args.n_mc_samples < 1:
        p.error("--n-mc-samples must be >= 1")
    if args.max_epochs_override is not None and args.max_epochs_override < 1:
        p.error("--max-epochs-override must be >= 1")
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


def scvi_max_epochs_heuristic(n_obs: int) -> int:
    """scvi-tools' ``get_max_epochs_heuristic(n_obs)`` (1.5.1): ``max(1, min(round(20000 / n_obs * 400), 400))``."""
    return max(1, min(round((20000 / n_obs) * 400), 400))


def marginal_ll_per_pass(k: int, n_genes: int) -> int:
    """Largest divisor of ``k`` that keeps one scvi-tools marginal_ll pass under :data:`MARGINAL_LL_MAX_ELEMENTS`
    (scvi-tools runs ``ceil(k / per_pass)`` passes but divides by ``k``: a divisor keeps the estimator exact)."""
    cap = max(1, MARGINAL_LL_MAX_ELEMENTS // (BATCH_SIZE * max(1, n_genes)))
    return max(d for d in range(1, min(k, cap) + 1) if k % d == 0)


def prepare_seed(adata, labels, seed: int, tmpdir: Path) -> tuple[Path, dict]:
    """Split, gene filter, labels and library sizes for one seed, saved as an .npz for the child.

    ``cells`` index ``adata`` (training + kept held-out cells, sorted); ``train`` / ``heldout`` index
    ``adata[cells][:, genes]``.
    """
    import numpy as np

    X = adata.X.tocsr() if hasattr(adata.X, "tocsr") else adata.X
    tr, ho, moved = make_split(adata.n_obs, seed)
    detected = np.asarray((X[tr] > 0).sum(0)).ravel() > 0
    ho_tot = np.asarray(X[ho][:, detected].sum(1)).ravel()
    ho_empty = ho[ho_tot == 0]
    ho = ho[ho_tot > 0]
    cells = np.sort(np.concatenate([tr, ho]))
    tr_pos = np.searchsorted(cells, tr)
    ho_pos = np.searchsorted(cells, ho)
    library = np.asarray(X[cells][:, detected].sum(1), dtype=np.float64).ravel()
    path = tmpdir / f"split_seed{seed}.npz"
    np.savez(path, cells=cells, genes=detected, train=tr_pos, heldout=ho_pos,
             labels=np.asarray(labels)[cells].astype(str), library=library)
    info = {
        "n_cells_seed": int(len(cells)),
        "n_train": int(len(tr_pos)),
        "n_heldout": int(len(ho_pos)),
        "moved_to_heldout_for_batch_size": int(moved),
        "n_heldout_dropped_empty": int(len(ho_empty)),
        "n_genes_model": int(detected.sum()),
        "n_genes_not_in_train": int((~detected).sum()),
    }
    return path, info


# ----------------------------------------------------------------------------- child process
def _mean(x):
    import numpy as np

    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return float(np.mean(np.asarray(x, dtype=np.float64)))


def _jsonable(v):
    """Settings values as JSON-ready plain values."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item"):
        try:
            return v.item()
        except (ValueError, TypeError):
            pass
    return repr(v)


def _child(task: dict) -> dict:
    """One training + evaluation, in a fresh process. Returns JSON-ready data."""
    import warnings

    try:  # at least MIN_NICE (a parent started with `nice -n 5` stays at 5)
        cur = os.nice(0)
        if cur < MIN_NICE:
            os.nice(MIN_NICE - cur)
    except OSError:  # pragma: no cover
        pass
    cap_loaded_threads(task["threads"])
    mod, version = import_tool(task["tool"])
    import anndata as ad
    import numpy as np
    import torch

    # The first torch.optim.Adam of a process imports torch._dynamo (1-2 s): `import scvi` does that already
    # (through lightning), cellvae only inside train(). One throwaway optimizer here charges it to neither.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    out: dict = {"tool_version": version}
    adata = ad.read_h5ad(task["h5ad"])
    sp = np.load(task["split"])
    full = adata[sp["cells"]][:, sp["genes"]].copy()
    del adata
    train = full[sp["train"]].copy()
    held = full[sp["heldout"]].copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = _run_scvi if task["tool"] == "scvi" else _run_cellvae
        res = fn(mod, task, train, held, full)
        z = res.pop("z")
        t1 = time.perf_counter()
        from cellvae.metrics import evaluate_latent

        ev = evaluate_latent(z, sp["labels"], library=sp["library"], seed=0, heldout_elbo=res["heldout_elbo"],
                             heldout_log_px=res["heldout_log_px"], n_jobs=task["threads"])
        res["latent_eval_seconds"] = time.perf_counter() - t1
    out.update(res)
    out.update({k: _jsonable(v) for k, v in ev.items()})
    checks = []
    if out.get("heldout_elbo") is not None and out["heldout_elbo"] > 0:
        checks.append("held-out ELBO > 0 for counts: sign convention suspect")
    if (out.get("heldout_log_px") is not None and out.get("heldout_elbo") is not None
            and out["heldout_log_px"] < out["heldout_elbo"] - 1.0):
        checks.append("log p(x) estimate below the ELBO by > 1 nat")
    out["checks"] = checks
    msgs = list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught))
    out["warnings"] = msgs[:8]
    return out


def _run_scvi(scvi, task, train, held, full) -> dict:
    """scvi-tools at its defaults (the row of both modes)."""
    import torch

    seed = task["seed"]
    scvi.settings.seed = seed
    torch.set_num_threads(task["threads"])
    scvi.model.SCVI.setup_anndata(train, batch_key=task.get("batch_key"))
    model = scvi.model.SCVI(train)
    kw = {"max_epochs": task["max_epochs_override"]} if task.get("max_epochs_override") else {}
    t0 = time.perf_counter()
    model.train(accelerator="cpu", enable_progress_bar=False, **kw)
    secs = time.perf_counter() - t0
    hist = model.history or {}
    epochs = len(hist["elbo_train"]) if "elbo_train" in hist else None
    val_idx = getattr(model, "validation_indices", None)
    klw = float(hist["kl_weight"].iloc[-1, 0]) if "kl_weight" in hist and len(hist["kl_weight"]) else None
    val_elbo = (-float(hist["elbo_validation"].iloc[-1, 0]) if "elbo_validation" in hist
                and len(hist["elbo_validation"]) else None)  # history holds the negative ELBO

    t1 = time.perf_counter()
    torch.manual_seed(seed)
    elbo = _mean(model.get_elbo(held, batch_size=BATCH_SIZE, return_mean=False))
    per_pass = marginal_ll_per_pass(task["n_mc_samples"], held.n_vars)
    mll = _mean(model.get_marginal_ll(held, n_mc_samples=task["n_mc_samples"], batch_size=BATCH_SIZE,
                                      return_mean=False, n_mc_samples_per_pass=per_pass))
    z = model.get_latent_representation(full)
    return {
        "train_seconds": secs, "epochs": epochs, "n_train_cells": int(train.n_obs),
        "scvi_max_epochs_heuristic": scvi_max_epochs_heuristic(train.n_obs),
        "internal_n_train": int(len(model.train_indices)),
        "internal_n_validation": 0 if val_idx is None else int(len(val_idx)),
        "internal_validation_elbo_last": val_elbo, "kl_weight_final": klw,
        "heldout_elbo": elbo, "heldout_log_px": mll, "n_mc_samples": task["n_mc_samples"],
        "n_mc_samples_per_pass": per_pass, "heldout_eval_seconds": time.perf_counter() - t1,
        "z": z.astype("float32"),
    }


def _run_cellvae(cellvae, task, train, held, full) -> dict:
    import dataclasses

    import torch

    seed, mode = task["seed"], task["mode"]
    torch.set_num_threads(task["threads"])
    model = cellvae.CountVAE(train, batch_key=task.get("batch_key"))
    kw = {"seed": seed, "progress_bar": False, "n_threads": task["threads"]}
    if mode == "equal-schedule":
        e = task.get("max_epochs_override") or scvi_max_epochs_heuristic(train.n_obs)
        kw.update(max_epochs=e, n_epochs_kl_warmup=e, early_stopping=False, train_size=TRAIN_FRACTION)
    elif task.get("max_epochs_override"):
        kw["max_epochs"] = task["max_epochs_override"]
    t0 = time.perf_counter()
    model.train(**kw)
    secs = time.perf_counter() - t0
    hist = model.history or {}
    epochs = len(hist.get("epoch", [])) or None
    settings = getattr(model, "settings", None)
    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    val = hist.get("validation_elbo") or []
    best = hist.get("best_epoch")

    t1 = time.perf_counter()
    torch.manual_seed(seed)
    elbo = _mean(model.get_elbo(held, return_mean=False, seed=seed))
    mll = _mean(model.get_marginal_ll(held, n_samples=task["n_mc_samples"], return_mean=False, seed=seed))
    z = model.get_latent_representation(full)
    return {
        "train_seconds": secs, "epochs": epochs, "n_train_cells": int(train.n_obs),
        "train_kwargs": _jsonable(kw),
        "internal_n_train": int(len(model.train_indices)),
        "internal_n_validation": 0 if model.validation_indices is None else int(len(model.validation_indices)),
        "best_epoch": _jsonable(best), "stopped_early": _jsonable(hist.get("stopped_early")),
        "internal_validation_elbo_best": (float(val[best - 1]) if isinstance(best, int) and 0 < best <= len(val)
                                          else None),
        "kl_weight_final": float(hist["kl_weight"][-1]) if hist.get("kl_weight") else None,
        "cellvae_plan": _jsonable(hist.get("plan")), "cellvae_settings": _jsonable(settings),
        "heldout_elbo": elbo, "heldout_log_px": mll, "n_mc_samples": task["n_mc_samples"],
        "heldout_eval_seconds": time.perf_counter() - t1, "z": z.astype("float32"),
    }


def run_in_child(task: dict) -> dict:
    """Run :func:`_child` in a fresh 'spawn' process and return its result (exceptions are re-raised here)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_child, task).result()


# ----------------------------------------------------------------------------- rows and files
def row_key(r: dict) -> tuple:
    """(mode, tool, dataset, seed, batch key or ""): rows with and without a batch key are different runs."""
    return (r["mode"], r["tool"], r["dataset"], int(r["seed"]), r.get("batch_key") or "")


def stored_mode(mode: str, tool: str) -> str:
    """scvi-tools' equal-schedule run is its defaults run: its row is stored (and trained) once, as 'defaults'."""
    return "defaults" if tool == "scvi" else mode


def read_json(path: Path) -> dict:
    if not path.exists():
        return {"meta": {}, "rows": []}
    data = json.loads(path.read_text())
    rows = data.get("rows", [])
    keep = [r for r in rows if r.get("mode") in MODES and all(k in r for k in ("tool", "dataset", "seed"))]
    meta = data.get("meta", {})
    if len(keep) < len(rows) or (rows and "invocations" not in meta):
        # rows of the old speed / time-to-quality script (mode "main" / "ttq"): not comparable, not kept
        print(f"[json] {path}: ignoring {len(rows) - len(keep)} row(s) and the meta of an older format of this "
              "benchmark (they stay in git history)", flush=True)
        meta = {k: v for k, v in meta.items() if k == "invocations"}
    return {"meta": meta, "rows": keep}


class Store:
    """The rows of --json, merged on every write with what is on disk (another invocation may add or drop rows)."""

    def __init__(self, json_path: Path, md_path: Path, invocation: dict | None):
        self.json_path, self.md_path = json_path, md_path
        data = read_json(json_path)
        self.meta = data["meta"]
        self.rows = {row_key(r): r for r in data["rows"]}
        self.own: dict[tuple, dict] = {}  # rows written by this invocation
        self.dropped: set[tuple] = set()
        self.invocation = invocation
        if invocation is not None:
            self.meta.setdefault("invocations", []).append(invocation)

    def drop(self, keys) -> int:
        keys = [k for k in keys if k in self.rows]
        for k in keys:
            self.rows.pop(k)
            self.dropped.add(k)
        return len(keys)

    def put(self, row: dict) -> None:
        k = row_key(row)
        self.own[k] = row
        self.rows[k] = row
        self.dropped.discard(k)

    def write(self) -> None:
        on_disk = self.json_path.exists()
        disk = read_json(self.json_path)
        merged = {row_key(r): r for r in disk["rows"] if row_key(r) not in self.dropped}
        merged.update(self.own)
        if not on_disk:  # the file went away: keep the rows this invocation read
            for k, r in self.rows.items():
                merged.setdefault(k, r)
        # Otherwise the file is the truth beside this invocation's own rows and drops: a row read at start that is
        # gone from it was dropped by a concurrent invocation (--rerun-tool) and must not come back.
        self.rows = merged
        meta = dict(self.meta)
        invs: dict[str, dict] = {}  # one record per invocation id (the latest written), whoever wrote it
        for i in [*self.meta.get("invocations", []), *disk["meta"].get("invocations", [])]:
            k = i.get("id") or json.dumps(i, sort_keys=True)
            if k not in invs or i.get("date_end", "") >= invs[k].get("date_end", ""):
                invs[k] = i
        if self.invocation is not None:
            self.invocation["loadavg_end"] = _loadavg()
            self.invocation["date_end"] = _now()
            invs = {k: v for k, v in invs.items() if v.get("id") != self.invocation["id"]}
            invs[self.invocation["id"]] = self.invocation
        meta["invocations"] = sorted(invs.values(), key=lambda i: i.get("date", ""))
        self.meta = meta
        rows = sorted(merged.values(), key=_row_order)
        atomic_write_text(self.json_path, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        atomic_write_text(self.md_path, render(rows, meta) + "\n")


def _row_order(r: dict) -> tuple:
    order = {d: i for i, d in enumerate(DATASETS)}
    return (MODES.index(r["mode"]) if r["mode"] in MODES else 9, order.get(r["dataset"], 99), r["dataset"],
            int(r["seed"]), r["tool"])


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


# ----------------------------------------------------------------------------- report
def _f(v, digits):
    return "-" if v is None else f"{v:.{digits}f}"


def _entry_name(entry: tuple[str, str | None]) -> str:
    d, bk = entry
    return f"{d} (batch key `{bk}`)" if bk else d


def main_entries(datasets: list[str]) -> list[tuple[str, str | None]]:
    """(dataset, batch key) of the main tables: each dataset with its batch key in :data:`BATCH_KEYS`, if any."""
    return [(d, BATCH_KEYS.get(d)) for d in datasets]


def _paired(rows: list[dict], mode: str, entry: tuple[str, str | None], key: str):
    """Per seed (cellvae value, scvi value) where both tools have a successful row with the key (scvi's row is its
    defaults row in both modes) for ``entry`` = (dataset, batch key or None). Also returns the seeds each tool has."""
    dataset, batch_key = entry
    by: dict[int, dict] = {}
    for r in rows:
        if r["dataset"] != dataset or (r.get("batch_key") or None) != batch_key or r.get("error") is not None:
            continue
        if (r["tool"] == "cellvae" and r["mode"] == mode) or (r["tool"] == "scvi" and r["mode"] == "defaults"):
            by.setdefault(int(r["seed"]), {})[r["tool"]] = r
    seeds = {t: sorted(s for s, d in by.items() if t in d) for t in TOOLS}
    pairs = [(s, d["cellvae"][key], d["scvi"][key]) for s, d in sorted(by.items())
             if "cellvae" in d and "scvi" in d and d["cellvae"].get(key) is not None
             and d["scvi"].get(key) is not None]
    return pairs, seeds


def _verdict(m, h, n, direction) -> str:
    if direction == 0 or m is None:
        return "-"
    if n < 2 or h is None:
        return f"n = {n}"
    lo, hi = m - h, m + h
    if direction < 0:
        lo, hi = -hi, -lo
    if lo >= 0:
        return "≥ 0" if direction > 0 else "≤ 0"
    if hi < 0:
        return "worse"
    return "CI contains 0"


def _metric_table(rows, mode, key, header, digits, direction, datasets) -> list[str]:
    out = [f"#### {header}", "",
           "| dataset | cellvae | scvi-tools | Δ cellvae − scvi [95 % CI] | n | verdict |",
           "|---|---|---|---|---|---|"]
    diffs, verdicts = [], []
    for entry in datasets:
        d = _entry_name(entry)
        pairs, seeds = _paired(rows, mode, entry, key)
        if not pairs:
            miss = [t for t in TOOLS if not seeds[t]]
            if miss:
                have = "; ".join(f"{t} has seed(s) {' '.join(map(str, seeds[t]))}" for t in TOOLS if seeds[t])
                txt = " and ".join(f"{'cellvae' if t == 'cellvae' else 'scvi-tools'} missing" for t in miss)
                out.append(f"| {d} | - | - | {txt}{' (' + have + ')' if have else ''} | 0 | - |")
            else:
                out.append(f"| {d} | - | - | no seed with both tools (cellvae seeds "
                           f"{' '.join(map(str, seeds['cellvae']))}, scvi seeds {' '.join(map(str, seeds['scvi']))}) "
                           "| 0 | - |")
            continue
        c = [p[1] for p in pairs]
        s = [p[2] for p in pairs]
        m, h, n = paired_t_ci([a - b for a, b in zip(c, s)])
        ci = "" if h is None else f" [{m - h:+.{digits}f}, {m + h:+.{digits}f}]"
        cm, cs = mean_sd(c)
        sm, ss = mean_sd(s)
        pm = (lambda mm, sd: f"{mm:.{digits}f}" if n == 1 else f"{mm:.{digits}f} ± {sd:.{digits}f}")  # noqa: E731
        v = _verdict(m, h, n, direction)
        extra = ""
        if len(seeds["cellvae"]) != n or len(seeds["scvi"]) != n:
            extra = f" (of cellvae {len(seeds['cellvae'])} / scvi {len(seeds['scvi'])} seeds)"
        out.append(f"| {d} | {pm(cm, cs)} | {pm(sm, ss)} | "
                   f"{m:+.{digits}f}{ci} | {n}{extra} | {v} |")
        diffs.append(m)
        verdicts.append(v)
    if diffs:
        counts = {}
        for v in verdicts:
            counts[v] = counts.get(v, 0) + 1
        vtxt = ", ".join(f"{k}: {c}" for k, c in counts.items()) if direction else "-"
        out.append(f"| **mean over datasets** | | | {sum(diffs) / len(diffs):+.{digits}f} | {len(diffs)} dataset(s) | "
                   f"{vtxt} |")
    out.append("")
    return out


def _settings_summary(rows: list[dict]) -> list[str]:
    """The distinct cellvae settings among the rows of each mode (stale rows stand out)."""
    out = []
    per_run = ("max_epochs", "n_epochs_kl_warmup", "seed", "progress_bar", "n_threads")  # set per run, not defaults
    for mode in MODES:
        cv = [r for r in rows if r["tool"] == "cellvae" and r["mode"] == mode and r.get("error") is None]
        if not cv:
            continue
        groups: dict[str, list[dict]] = {}
        for r in cv:
            plan = {k: v for k, v in (r.get("cellvae_plan") or {}).items() if k not in per_run}
            sig = json.dumps({"plan": plan, "model": r.get("cellvae_settings")}, sort_keys=True)
            groups.setdefault(sig, []).append(r)
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        out.append(f"- cellvae settings in mode {mode}: {len(groups)} distinct combination(s) of `history[\"plan\"]` "
                   f"(less {', '.join(per_run)}) and `m.settings`"
                   + (" — **the tables mix rows made with different cellvae settings** (`--rerun-tool cellvae` "
                      "redoes them)" if len(groups) > 1 else "") + ":")
        base = json.loads(ordered[0][0])
        for i, (sig, rs) in enumerate(ordered):
            commits = sorted({f"{r.get('git_commit')}{'+dirty src' if r.get('git_dirty_src') else ''}" for r in rs})
            dates = sorted(r.get("date", "") for r in rs)
            cur = json.loads(sig)
            if i == 0:
                txt = f"`{sig}`"
            else:
                diff = {f"{part}.{k}": cur[part].get(k) for part in ("plan", "model")
                        for k in sorted(set(cur[part] or {}) | set(base[part] or {}))
                        if (cur[part] or {}).get(k) != (base[part] or {}).get(k)}
                txt = "differs from set 1 in " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in diff.items())
            out.append(f"  - set {i + 1}: {len(rs)} row(s), commit(s) {', '.join(commits)}, {dates[0][:16]} … "
                       f"{dates[-1][:16]}: {txt}")
    return out


def _dataset_details(rows: list[dict], datasets: list[str]) -> list[str]:
    out = ["## Datasets and splits", ""]
    for d in datasets:
        drows = [r for r in rows if r["dataset"] == d]
        if not drows:
            continue
        r0 = drows[0]
        genes = (f"{r0['n_genes']} seurat_v3 HVG of {r0['n_genes_file']} genes" if r0.get("hvg_seurat_v3")
                 else f"{r0['n_genes']} genes")
        if r0.get("hvg_prefilter_min_cells"):
            genes += f" (HVG call after dropping genes detected in < {r0['hvg_prefilter_min_cells']} cells)"
        cells = f"{r0['n_cells']} cells"
        if r0.get("n_empty_cells_dropped"):
            cells += f" ({r0['n_empty_cells_dropped']} cells without counts dropped)"
        per_seed = {}
        for r in drows:
            per_seed.setdefault(int(r["seed"]), r)
        split = "; ".join(
            f"seed {s}: {r['n_train']} train / {r['n_heldout']} held-out, {r['n_genes_model']} genes"
            + (f" ({r['n_genes_not_in_train']} absent from the training cells removed)"
               if r.get("n_genes_not_in_train") else "")
            + (" (1 cell moved to held-out: n_train % 128 == 1)" if r.get("moved_to_heldout_for_batch_size") else "")
            + (f" ({r['n_heldout_dropped_empty']} held-out cells without counts dropped)"
               if r.get("n_heldout_dropped_empty") else "")
            for s, r in sorted(per_seed.items()))
        parts = []
        for m in MODES:
            for t in TOOLS:
                for bk in ([BATCH_KEYS[d], None] if d in BATCH_KEYS else [None]):
                    seeds = sorted(int(r["seed"]) for r in drows if r["mode"] == m and r["tool"] == t
                                   and r.get("error") is None and (r.get("batch_key") or None) == bk)
                    if seeds:
                        how = f" with batch key `{bk}`" if bk else (" without batch key" if d in BATCH_KEYS else "")
                        parts.append(f"{t} {m}{how}: seeds {' '.join(map(str, seeds))}")
        runs = "; ".join(parts)
        out.append(f"- **{d}**: {cells}, {genes}, labels `{r0['label_key']}` ({r0['n_labels']}). {split}. "
                   f"Rows: {runs or 'none'}.")
        for r in drows:
            if r.get("error"):
                out.append(f"  - FAILED {r['mode']} {r['tool']} seed {r['seed']}: `{r['error']}`")
            if r.get("checks"):
                out.append(f"  - check {r['mode']} {r['tool']} seed {r['seed']}: {'; '.join(r['checks'])}")
            if r.get("max_epochs_override"):
                out.append(f"  - {r['mode']} {r['tool']} seed {r['seed']}: **max_epochs overridden to "
                           f"{r['max_epochs_override']} (smoke test, not a real run)**")
        ws = {}
        for r in drows:
            for w in r.get("warnings") or []:
                ws.setdefault(r["tool"], {})[w] = None
        for t, w in ws.items():
            out.append(f"  - warnings in the {t} child: " + "; ".join(f"`{x}`" for x in list(w)[:4]))
    out.append("")
    return out


def render(rows: list[dict], meta: dict) -> str:
    ok = [r for r in rows if r.get("error") is None]
    names = list(dict.fromkeys([*[d for d in DATASETS if any(r["dataset"] == d for r in rows)],
                                *[r["dataset"] for r in rows]]))
    invs = meta.get("invocations", [])
    versions = {}
    for t in TOOLS:
        versions[t] = sorted({str(r.get("tool_version")) for r in ok if r["tool"] == t})
    commits = sorted({f"{r.get('git_commit')}{' (src/ with uncommitted changes)' if r.get('git_dirty_src') else ''}"
                      for r in rows})
    dates = sorted(r.get("date", "") for r in rows)
    la = [x for r in rows for x in (r.get("loadavg_start"), r.get("loadavg_end")) if x is not None]
    out = ["# cellvae vs scvi-tools: quality at each tool's defaults", ""]
    out.append(f"Report rebuilt {_now()[:16]} by `benchmarks/vs_scvi.py` from {len(rows)} row(s)"
               + (f" made {dates[0][:16]} … {dates[-1][:16]}" if dates else "") + ".")
    out.append("")
    v0 = invs[-1].get("versions", {}) if invs else {}
    out.append(f"- Commit(s) of the rows: {', '.join(commits) or '-'}. Machine: "
               f"{invs[-1]['machine'] if invs else machine_description()}.")
    out.append(f"- Versions: scvi-tools {', '.join(versions['scvi']) or v0.get('scvi-tools', '?')}, cellvae "
               f"{', '.join(versions['cellvae']) or v0.get('cellvae', '?')}, torch {v0.get('torch', '?')}, "
               f"lightning {v0.get('lightning', '?')}, scib-metrics {v0.get('scib-metrics', '?')}, scanpy "
               f"{v0.get('scanpy', '?')}, scikit-learn {v0.get('scikit-learn', '?')}.")
    out.append("- Load: the machine (2 logical CPUs) is shared with other work; every run used one thread at niceness "
               f">= {MIN_NICE}; 1-minute load average at the start / end of the runs: "
               + (f"min {min(la):.2f}, median {sorted(la)[len(la) // 2]:.2f}, max {max(la):.2f}" if la else "-")
               + ". Wall times are approximate.")
    for i in invs:
        out.append(f"  - invocation {i.get('date', '?')[:16]} (commit {i.get('git_commit')}, load "
                   f"{i.get('loadavg_start')} → {i.get('loadavg_end', '?')}): `{i.get('command')}`")
    out.append("")
    out.append("## Protocol")
    out.append("")
    out.append("- Data: every labelled dataset of `shared/data`; a dataset with > 5000 genes is reduced to 2000 highly "
               "variable genes (`scanpy.pp.highly_variable_genes(flavor=\"seurat_v3\", n_top_genes=2000)` on the raw "
               "counts); cells without counts are dropped. Left out: "
               + "; ".join(f"`{k}` ({v})" for k, v in LEFT_OUT.items()) + ".")
    out.append("- Split, per (dataset, seed): `numpy.random.default_rng(seed).permutation(n_cells)`; the first "
               "ceil(0.9 n) cells train, the rest are held out (one more cell is held out when n_train % 128 == 1); "
               "genes never detected in the training cells are removed for both tools. Both tools get an AnnData of "
               "the training cells only; the held-out cells are used only for evaluation.")
    out.append("- Batch key: on the datasets whose cells come from more than one technology ("
               + ", ".join(f"`{d}`: `{k}`" for d, k in BATCH_KEYS.items()) + ") both tools get that obs column as "
               "the batch key, as a user of either would pass it (`SCVI.setup_anndata(train, batch_key=...)`, "
               "`CountVAE(train, batch_key=...)`); the other datasets have none. Their earlier rows without a batch "
               "key are in a separate section below.")
    out.append("- Mode **defaults** — each tool exactly as a new user runs it. scvi-tools: "
               "`scvi.settings.seed = seed; SCVI.setup_anndata(train[, batch_key]); m = SCVI(train); "
               "m.train(accelerator=\"cpu\", enable_progress_bar=False)`: its epoch heuristic min(400, "
               "round(20000 / n_train × 400)) (400 for all these datasets), KL warm-up over 400 epochs (per epoch), "
               "its own internal 90 % train / 10 % validation split of the training cells, no early stopping, the "
               "last weights. cellvae: `m = CountVAE(train[, batch_key]); m.train(seed=seed, progress_bar=False, n_threads=1)`: "
               "its own defaults (epoch heuristic, KL warm-up, its own internal 90/10 split with early stopping on it "
               "and the best validation weights restored; each row stores `history[\"plan\"]` and `m.settings`).")
    out.append("- Mode **equal-schedule** — scvi-tools' default schedule for both, no early stopping: E = min(400, "
               "round(20000 / n_train × 400)) epochs, KL warm-up over E epochs, train_size 0.9, batch 128. cellvae: "
               "`m.train(max_epochs=E, n_epochs_kl_warmup=E, early_stopping=False, train_size=0.9, seed=seed, "
               "progress_bar=False, n_threads=1)` (its warm-up rises per step, scvi-tools' per epoch; cellvae keeps "
               "the best-validation weights among epochs at full KL weight, which with a warm-up of E epochs is the "
               "last epoch). scvi-tools' run in this mode is identical to its defaults run (same settings, same "
               "seed), so **its defaults rows are reused** (trained once).")
    out.append("- Held-out ELBO: nats per cell, higher is better, one z sample per cell at KL weight 1 (scvi-tools "
               "`get_elbo(held, return_mean=False)`, which returns +ELBO in 1.5.1; cellvae `get_elbo(held)`). "
               "Held-out log p(x): IWAE estimate with K = "
               f"{sorted({r.get('n_mc_samples') for r in ok if r.get('n_mc_samples')}) or '?'} importance samples "
               "(scvi-tools `get_marginal_ll(held, n_mc_samples=K, return_mean=False, n_mc_samples_per_pass=P)` "
               "with P a divisor of K, averaged over cells; cellvae `get_marginal_ll(held, n_samples=K)`).")
    out.append("- Latent metrics: `cellvae.metrics.evaluate_latent(latent mean of all cells (train + held-out), "
               "labels, library = total counts per cell over the modelled genes, seed=0)`: KMeans and Leiden "
               "(resolution bisected to k clusters) ARI / NMI with k = number of labels; scIB bio conservation "
               "(scib-metrics, unscaled mean of isolated labels, label silhouette, cLISI, scIB KMeans NMI / ARI); "
               "depth R² of log library size on the latent, within labels (mean over labels with > 50 cells; lower "
               "is better).")
    out.append("- Tables: per dataset, only seeds where both tools have a row. cellvae and scvi-tools: mean ± sd over "
               "those seeds; Δ: mean of the per-seed differences cellvae − scvi-tools with its t-based 95 % CI "
               "(± t_{0.975, n−1} · sd / √n); verdict: **≥ 0** when the whole CI is ≥ 0 (for depth R², where lower "
               "is better: **≤ 0** when the whole CI is ≤ 0), **worse** when the whole CI is on the bad side, "
               "**CI contains 0** otherwise (n = 1: no CI). Last row: the mean over datasets of the per-dataset "
               "mean differences, and the count of each verdict.")
    out += _settings_summary(rows)
    over = sorted({r.get("max_epochs_override") for r in rows if r.get("max_epochs_override")})
    if over:
        out.append(f"- **Smoke test: max_epochs overridden to {over} in some rows; these numbers are not results.**")
    out.append("")
    for mode in MODES:
        if not any(r["mode"] == mode and r["tool"] == "cellvae" for r in rows) and not (
                mode == "defaults" and any(r["tool"] == "scvi" for r in rows)):
            continue
        out.append(f"## Mode: {mode}")
        out.append("")
        if mode == "equal-schedule":
            out.append("scvi-tools columns: its defaults rows (identical settings and seed).")
            out.append("")
        for key, header, digits, direction in METRICS:
            out += _metric_table(rows, mode, key, header, digits, direction, main_entries(names))
    nobk = [(d, None) for d in names if d in BATCH_KEYS]
    if any(r["dataset"] == d and not r.get("batch_key") for d, _ in nobk for r in ok):
        out.append("## Without a batch key on the multi-technology datasets (earlier protocol, mode defaults)")
        out.append("")
        out.append("The same datasets as above with neither tool given the technology (`--no-batch-key`). Both "
                   "latent spaces then keep technology as a local structure, and Leiden with k = number of labels "
                   "can split by technology instead of by label; see issue 20. Not part of the means above.")
        out.append("")
        for key, header, digits, direction in METRICS[:4]:
            out += _metric_table(rows, "defaults", key, header, digits, direction, nobk)
    out += _dataset_details(rows, names)
    return "\n".join(out)


# ----------------------------------------------------------------------------- legacy helpers (throughput.py)
def _cellvae_default(name: str):
    """Default of a ``CountVAE.train`` argument (throughput.py's report names it)."""
    import dataclasses

    import cellvae

    try:
        from cellvae.settings import TrainSettings

        return {f.name: f.default for f in dataclasses.fields(TrainSettings)}[name]
    except (ImportError, KeyError):
        import inspect

        return inspect.signature(cellvae.CountVAE.train).parameters[name].default


def ttq_results(rows: list[dict]) -> list[dict]:
    """Per (dataset, seed) of an old time-to-quality JSON: scvi's target and each tool's first epoch / time
    reaching it (kept for ``throughput.py --report-only``)."""
    res = []
    for d in dict.fromkeys(r["dataset"] for r in rows):
        ok = [r for r in rows if r["dataset"] == d and r.get("error") is None]
        for seed in sorted({r["seed"] for r in ok}):
            by = {r["tool"]: r for r in ok if r["seed"] == seed}
            target = by["scvi"]["val_elbo"][-1] if "scvi" in by else None
            item = {"dataset": d, "seed": seed, "target": target}
            for t, r in by.items():
                cum, reached = 0.0, None
                for i, (v, s) in enumerate(zip(r["val_elbo"], r["epoch_seconds"])):
                    cum += s
                    if target is not None and v >= target and reached is None:
                        reached = (i + 1, cum)
                item[t] = {"reached": reached, "epochs_seconds": sum(r["epoch_seconds"]),
                           "train_seconds": r["train_seconds"], "final": r["val_elbo"][-1], "epochs": r["epochs"]}
            res.append(item)
    return res


# ----------------------------------------------------------------------------- main
def seed_waves(seeds: list[int]) -> list[list[int]]:
    """The first two seeds together, then one seed per wave."""
    return [seeds[:2]] + [[s] for s in seeds[2:]] if seeds else []


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_threads(args.threads)
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=false "
                                       f"intra_op_parallelism_threads={args.threads}")
    cap_loaded_threads(args.threads)
    md_path, json_path = Path(args.out), Path(args.json)
    if args.report_only:
        store = Store(json_path, md_path, None)
        store.write()
        print(f"wrote {md_path}")
        return 0

    import numpy as np

    gc = git_commit("src")
    invocation = {
        "id": f"{_now()}-{os.getpid()}",
        "date": _now(),
        "command": " ".join(["vs_scvi.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "git_commit": gc["commit"], "git_dirty_src": gc["dirty"],
        "machine": machine_description(),
        "versions": {p: package_version(p) for p in ("torch", "scvi-tools", "lightning", "cellvae", "scib-metrics",
                                                      "scikit-learn", "anndata", "scanpy", "jax")},
        "threads": args.threads, "n_mc_samples": args.n_mc_samples, "modes": args.modes, "tools": args.tools,
        "seeds": args.seeds, "max_epochs_override": args.max_epochs_override, "loadavg_start": _loadavg(),
    }
    store = Store(json_path, md_path, invocation)
    specs = []
    for spec in args.datasets:
        name, _, key = spec.partition(":")
        specs.append((name, key or DATASETS.get(name) or parse_dataset_spec(name)[1]))

    # the runs, in waves of seeds; scvi-tools' equal-schedule run is its defaults run
    plan: list[tuple] = []
    for wave in seed_waves(args.seeds):
        for name, label_key in specs:
            for seed in wave:
                tools = list(args.tools) if args.seeds.index(seed) % 2 == 0 else list(reversed(args.tools))
                for mode in args.modes:
                    for tool in tools:
                        key = (stored_mode(mode, tool), tool, name, seed,
                               "" if args.no_batch_key else BATCH_KEYS.get(name, ""))
                        if key not in [p[0] for p in plan]:
                            plan.append((key, label_key))
    if args.rerun_tool:
        n = store.drop([k for k, _ in plan if k[1] in args.rerun_tool])
        print(f"[rerun-tool] dropped {n} row(s) of {', '.join(args.rerun_tool)}", flush=True)
    todo = [(k, lk) for k, lk in plan
            if not (args.resume and k in store.rows and store.rows[k].get("error") is None)]
    print(f"{len(plan)} run(s) requested, {len(plan) - len(todo)} already in {json_path.name}, {len(todo)} to do "
          f"(commit {gc['commit']}{', src/ has uncommitted changes' if gc['dirty'] else ''})", flush=True)
    store.write()
    if not todo:
        return 0

    t_start = time.perf_counter()
    cache: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="vs_scvi_") as tmp:
        tmpdir = Path(tmp)
        for i, ((mode, tool, name, seed, batch_key), label_key) in enumerate(todo):
            if name not in cache:
                try:
                    extra = (BATCH_KEYS[name],) if name in BATCH_KEYS else ()
                    adata, labels, info = load_dataset(Path(args.data_dir), name, label_key, extra_obs=extra)
                except Exception as e:  # noqa: BLE001
                    print(f"[skip] dataset {name}: {type(e).__name__}: {e}", flush=True)
                    cache[name] = (None, None, None)
                    continue
                tot = np.asarray(adata.X.sum(1)).ravel()
                keep = tot > 0
                info["n_empty_cells_dropped"] = int((~keep).sum())
                if not keep.all():
                    adata, labels = adata[keep].copy(), labels[keep]
                info["n_cells"] = int(adata.n_obs)
                info["n_labels"] = int(len(np.unique(labels)))
                ddir = tmpdir / name
                ddir.mkdir()
                h5ad = ddir / "data.h5ad"
                adata.write_h5ad(h5ad)
                splits = {}
                cache[name] = (adata, labels, info, h5ad, ddir, splits)
                print(f"== {name}: {info['n_cells']} cells x {info['n_genes']} genes"
                      f"{' (seurat_v3 HVG of ' + str(info['n_genes_file']) + ')' if info['hvg_seurat_v3'] else ''}, "
                      f"{info['n_labels']} labels ({label_key})", flush=True)
            if cache[name][0] is None:
                continue
            adata, labels, info, h5ad, ddir, splits = cache[name]
            if seed not in splits:
                splits[seed] = prepare_seed(adata, labels, seed, ddir)
            split_path, sinfo = splits[seed]
            gc = git_commit("src")
            row = {"mode": mode, "tool": tool, "dataset": name, "seed": seed, "batch_key": batch_key or None,
                   **info, **sinfo,
                   "date": _now(), "git_commit": gc["commit"], "git_dirty_src": gc["dirty"],
                   "threads": args.threads, "max_epochs_override": args.max_epochs_override,
                   "loadavg_start": _loadavg(), "error": None}
            task = {"mode": mode, "tool": tool, "seed": seed, "threads": args.threads,
                    "n_mc_samples": args.n_mc_samples, "max_epochs_override": args.max_epochs_override,
                    "h5ad": str(h5ad), "split": str(split_path), "batch_key": batch_key or None}
            t0 = time.perf_counter()
            label = (f"[{i + 1}/{len(todo)}] {mode:14s} {tool:7s} {name}"
                     f"{' (batch key ' + batch_key + ')' if batch_key else ''} seed {seed}")
            print(f"{label}: started {row['date']}, load {row['loadavg_start']}", flush=True)
            try:
                row.update(run_in_child(task))
                fmt = lambda v, d=1: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
                print(f"{label}: {row['epochs']} epochs, train {row['train_seconds']:.0f} s, held-out ELBO "
                      f"{fmt(row['heldout_elbo'])} log p(x) {fmt(row['heldout_log_px'])}, KMeans ARI "
                      f"{fmt(row['kmeans_ari'], 3)} Leiden ARI {fmt(row['leiden_ari'], 3)} bio "
                      f"{fmt(row.get('bio_conservation'), 3)} depth R² within "
                      f"{fmt(row.get('depth_r2_within_labels'), 3)}"
                      + (f"  [{'; '.join(row['checks'])}]" if row["checks"] else ""), flush=True)
            except Exception as e:  # noqa: BLE001 - record and go on
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"{label}: FAILED {row['error']}", flush=True)
            row["child_wall_seconds"] = time.perf_counter() - t0
            row["loadavg_end"] = _loadavg()
            print(f"{label}: done in {row['child_wall_seconds']:.0f} s, load {row['loadavg_end']}", flush=True)
            store.put(row)
            store.write()
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; wrote {md_path} and {json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
