"""cellvae's joint RNA + protein model (RNAProteinVAE) against scvi-tools' TOTALVI on CITE-seq data (issue 25).

Run with the benchmark environment (scvi-tools 1.5.1)::

    nice -n 5 .venv-bench/bin/python benchmarks/rna_protein.py              # CBMC and pbmc10k, seeds 0-2, both modes
    .venv-bench/bin/python benchmarks/rna_protein.py --render                # rewrite the .md from the .json only

For each dataset and seed, one seeded permutation puts 90 % of the cells in training and 10 % aside (held out:
never seen in training; each tool splits its training cells again for its own early stopping). Both tools train
on the same training cells, in fresh processes, alternating which goes first:

- ``defaults``: each tool at its own defaults (cellvae: ``RNAProteinVAE(adata).train()``; scvi-tools:
  ``TOTALVI(adata).train()``: up to 400 epochs with early stopping, their own batch sizes and learning rates);
- ``equal-epochs``: the same, but both run exactly ``--equal-epochs`` epochs without early stopping (timing).

Measured on the held-out cells, with one estimator applied to both tools' modules (so the numbers compare):

- ELBO (one sample of z and of the protein background ``log beta``, KL terms analytic), joint and per modality:
  RNA ``E[log p(x|z)] - KL_z``, protein ``E[log p(y|z,beta)] - KL_z - KL_beta``;
- IWAE log p (``--n-mc`` samples of ``(z, log beta)`` from each tool's q), joint, RNA ``log p(x)`` and protein
  ``log p(y)`` (the proposal is the joint encoder for all three). scvi-tools' regularisers that are not part of
  its likelihood (the log-normal penalty on per-batch protein efficiency and the 1e-3 Bernoulli penalty on the
  mixing) are left out; its per-batch efficiency is part of its protein means and kept.

On all cells: KMeans and Leiden ARI/NMI of the latent means against the labels (:func:`cellvae.metrics.evaluate_latent`),
and the protein denoising: AUROC of the foreground probability ``1 - pi`` of each marker between the cell types
that express it and those that do not (:data:`MARKERS`; e.g. CD19 in B cells against T cells, CD3 in T cells against
B cells, every human marker against the spiked-in mouse cells of CBMC), beside the same AUROC of the raw ADT counts
and of their per-cell CLR, as a reference without a model (:func:`reference_aurocs`, computed from the data when the
report is written). Speed: training wall time, epochs and
training cells per second; NaN-skipped steps (cellvae's ``history['n_skipped_steps']``; scvi-tools has no such
guard: the count of non-finite training losses is reported instead).

Results go to ``benchmarks/results/rna_protein.json`` (rows, merged by dataset/mode/seed/tool) and ``.md``, with the
git commit, date and 1-minute load average of each invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO_ROOT, atomic_write_text, cap_loaded_threads, default_data_dir, git_commit, import_tool,  # noqa: E402
                     limit_threads, loadavg, machine_description, mean_sd, package_version, paired_t_ci)

DATASETS = {  # name -> (file, label key)
    "cbmc": ("cbmc_citeseq_stoeckius2017_8617cells.h5ad", "cell_type"),
    "pbmc10k": ("pbmc10k_citeseq_10x_6434cells.h5ad", "cell_type"),
}
# protein -> (cell types that express it, cell types that do not); cells of other types are left out of its AUROC
_T, _MONO = ["CD4 T", "CD8 T"], ["CD14+ Mono", "CD16+ Mono"]
MARKERS = {
    "cbmc": {
        "CD3": (_T, ["B", "NK", *_MONO, "Mouse"]),
        "CD4": (["CD4 T"], ["CD8 T", "B", "NK", "Mouse"]),
        "CD8": (["CD8 T"], ["CD4 T", "B", *_MONO, "Mouse"]),
        "CD19": (["B"], [*_T, "NK", *_MONO, "Mouse"]),
        "CD14": (["CD14+ Mono"], [*_T, "B", "NK", "Mouse"]),
        "CD16": (["NK", "CD16+ Mono"], [*_T, "B", "Mouse"]),
        "CD56": (["NK"], [*_T, "B", *_MONO, "Mouse"]),
        "CD11c": ([*_MONO, "DC"], [*_T, "B", "Mouse"]),
        "CD34": (["CD34+"], [*_T, "B", "NK", *_MONO, "Mouse"]),
    },
    "pbmc10k": {
        "CD3": (["CD4+ T-cells", "CD8+ T-cells"], ["B-cells", "Monocytes", "NK cells"]),
        "CD4": (["CD4+ T-cells"], ["CD8+ T-cells", "B-cells", "NK cells"]),
        "CD8a": (["CD8+ T-cells"], ["CD4+ T-cells", "B-cells", "Monocytes"]),
        "CD14": (["Monocytes"], ["CD4+ T-cells", "CD8+ T-cells", "B-cells", "NK cells"]),
        "CD19": (["B-cells"], ["CD4+ T-cells", "CD8+ T-cells", "NK cells", "Monocytes"]),
        "CD56": (["NK cells"], ["CD4+ T-cells", "B-cells", "Monocytes"]),
        "CD16": (["NK cells"], ["CD4+ T-cells", "CD8+ T-cells", "B-cells"]),
    },
}
TOOLS = ("cellvae", "scvi")
TOOL_LABEL = {"cellvae": "cellvae RNAProteinVAE", "scvi": "scvi-tools TOTALVI"}
MODES = ("equal-epochs", "defaults")
TRAIN_FRACTION = 0.9
PROTEIN_KEY = "protein_expression"
EVAL_BATCH = 512
MIN_NICE = 5
RESULTS = REPO_ROOT / "benchmarks" / "results"
# (key, header, digits, direction: +1 higher is better, -1 lower is better)
METRICS = [
    ("log_px_rna", "held-out log p(x) RNA (nats/cell)", 2, +1),
    ("log_px_protein", "held-out log p(y) protein (nats/cell)", 2, +1),
    ("log_px_joint", "held-out log p(x, y) joint (nats/cell)", 2, +1),
    ("elbo_rna", "held-out ELBO RNA (nats/cell)", 2, +1),
    ("elbo_protein", "held-out ELBO protein (nats/cell)", 2, +1),
    ("elbo_joint", "held-out ELBO joint (nats/cell)", 2, +1),
    ("kmeans_ari", "KMeans ARI", 3, +1),
    ("kmeans_nmi", "KMeans NMI", 3, +1),
    ("leiden_ari", "Leiden ARI", 3, +1),
    ("leiden_nmi", "Leiden NMI", 3, +1),
    ("marker_auroc_mean", "marker foreground AUROC (mean over markers)", 3, +1),
    ("train_seconds", "training wall time (s)", 1, -1),
    ("cells_per_second", "training cells/s", 0, +1),
    ("epochs", "epochs", 0, 0),
    ("n_skipped_steps", "NaN-skipped steps (scvi-tools: non-finite losses)", 0, -1),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="cbmc,pbmc10k")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--equal-epochs", type=int, default=100)
    p.add_argument("--max-epochs-override", type=int, default=None, help="(experiments) cap epochs in defaults mode")
    p.add_argument("--n-mc", type=int, default=200, help="importance samples of the held-out log p")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--out", default=str(RESULTS / "rna_protein"), help="results path without suffix")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    p.add_argument("--cellvae-kwargs", default="{}", help="(experiments) JSON of RNAProteinVAE keywords")
    p.add_argument("--cellvae-train-kwargs", default="{}", help="(experiments) JSON of train() keywords")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ evaluation
def split(n: int, seed: int):
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(math.ceil(TRAIN_FRACTION * n))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def marker_aurocs(fg, labels, dataset: str) -> dict:
    """AUROC of each marker's foreground probability, positive types against negative types."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    out = {}
    for prot, (pos, neg) in MARKERS[dataset].items():
        if prot not in fg.columns:
            continue
        lab = np.asarray(labels).astype(str)
        sel = np.isin(lab, pos) | np.isin(lab, neg)
        y = np.isin(lab[sel], pos).astype(int)
        if 0 < y.sum() < len(y):
            out[prot] = float(roc_auc_score(y, fg[prot].to_numpy()[sel]))
    return out


def _scvi_terms(module, tensors) -> dict:
    """Per-cell log densities of one sample of (z, log beta) from scvi-tools' TOTALVI module."""
    import numpy as np
    import torch
    from torch.distributions import Normal, kl_divergence

    inf, gen = module.forward(tensors, compute_loss=False)
    x, y = tensors["X"], tensors["proteins"]
    mask = None
    if module.protein_batch_mask is not None:
        b = tensors[getattr(module, "panel_key", "batch")].view(-1)
        mask = torch.zeros_like(y)
        for code in torch.unique(b):
            mask[b == code] = torch.as_tensor(module.protein_batch_mask[str(int(code))].astype(np.float32))
    px_, py_ = gen["px_"], gen["py_"]
    rg, rp = module.get_reconstruction_loss(x, y, px_, py_, mask, gen["per_batch_efficiency"])
    qz, z = inf["qz"], inf["z"]
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = qz.log_prob(z).sum(-1)
    kl_z = kl_divergence(qz, Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.scale))).sum(-1)
    qb, pb, lb = Normal(py_["back_alpha"], py_["back_beta"]), inf["back_mean_prior"], gen["log_pro_back_mean"]
    m = mask if mask is not None else torch.ones_like(lb)
    log_pb, log_qb = (pb.log_prob(lb) * m).sum(-1), (qb.log_prob(lb) * m).sum(-1)
    kl_b = (kl_divergence(qb, pb) * m).sum(-1)
    return {"elbo_joint": -rg - rp - kl_z - kl_b, "elbo_rna": -rg - kl_z, "elbo_protein": -rp - kl_z - kl_b,
            "w_joint": -rg - rp + log_pz + log_pb - log_qz - log_qb, "w_rna": -rg + log_pz - log_qz,
            "w_protein": -rp + log_pz + log_pb - log_qz - log_qb}


def scvi_heldout(model, held, n_mc: int, seed: int) -> dict:
    """Held-out ELBO and IWAE log p (joint, RNA, protein) of a TOTALVI model, by :func:`_scvi_terms`."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    module = model.module
    module.eval()
    held = model._validate_anndata(held)  # registers the held-out cells with the model's AnnDataManager
    dl = model._make_data_loader(adata=held, batch_size=EVAL_BATCH, shuffle=False)
    sums = {k: [] for k in ("elbo_joint", "elbo_rna", "elbo_protein", "log_px_joint", "log_px_rna",
                            "log_px_protein")}
    with torch.no_grad():
        for tensors in dl:
            t = _scvi_terms(module, tensors)
            for k in ("elbo_joint", "elbo_rna", "elbo_protein"):
                sums[k].append(t[k].double())
            acc = {k: None for k in ("joint", "rna", "protein")}
            for _ in range(n_mc):
                t = _scvi_terms(module, tensors)
                for k in acc:
                    w = t["w_" + k].double()
                    acc[k] = w if acc[k] is None else torch.logaddexp(acc[k], w)
            for k in acc:
                sums["log_px_" + k].append(acc[k] - math.log(n_mc))
    return {k: float(torch.cat(v).mean()) for k, v in sums.items()}


def latent_metrics(z, labels) -> dict:
    """KMeans and Leiden ARI/NMI of ``z`` against ``labels`` (:func:`cellvae.metrics.evaluate_latent`; needs
    pynndescent < 0.7 with scanpy <= 1.12, see pyproject.toml)."""
    from cellvae.metrics import evaluate_latent

    ev = evaluate_latent(z, labels, seed=0, scib=False)
    return {k: ev.get(k) for k in ("kmeans_ari", "kmeans_nmi", "leiden_ari", "leiden_nmi", "leiden_n_clusters")}


# ------------------------------------------------------------------------------------------------ child
def _child(task: dict) -> dict:
    import warnings

    try:
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

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # charge torch._dynamo's import to neither tool
    file, label_key = DATASETS[task["dataset"]]
    full = ad.read_h5ad(Path(task["data_dir"]) / file)
    full = ad.AnnData(X=full.X, obs=full.obs[[label_key]].copy(), var=full.var[[]].copy(),
                      obsm={PROTEIN_KEY: full.obsm[PROTEIN_KEY]})
    tr, ho = split(full.n_obs, task["seed"])
    train, held = full[tr].copy(), full[ho].copy()
    labels = full.obs[label_key].astype(str).to_numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = _run_scvi if task["tool"] == "scvi" else _run_cellvae
        res = fn(mod, task, train, held, full)
        z, fg = res.pop("z"), res.pop("fg")
        t1 = time.perf_counter()
        res.update(latent_metrics(z, labels))
        res["latent_eval_seconds"] = time.perf_counter() - t1
    au = marker_aurocs(fg, labels, task["dataset"])
    res["marker_auroc"] = au
    res["marker_auroc_mean"] = float(np.mean(list(au.values()))) if au else None
    res["tool_version"] = version
    res["n_train"], res["n_heldout"] = int(len(tr)), int(len(ho))
    res["warnings"] = list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
                                         for w in caught))[:8]
    return res


def _run_scvi(scvi, task, train, held, full) -> dict:
    import numpy as np
    import torch

    seed = task["seed"]
    scvi.settings.seed = seed
    torch.set_num_threads(task["threads"])
    scvi.model.TOTALVI.setup_anndata(train, protein_expression_obsm_key=PROTEIN_KEY)
    model = scvi.model.TOTALVI(train)
    kw = {}
    if task["mode"] == "equal-epochs":
        kw.update(max_epochs=task["equal_epochs"], early_stopping=False)
    elif task.get("max_epochs_override"):
        kw["max_epochs"] = task["max_epochs_override"]
    t0 = time.perf_counter()
    model.train(accelerator="cpu", enable_progress_bar=False, **kw)
    secs = time.perf_counter() - t0
    hist = model.history or {}
    key = next((k for k in ("train_loss_epoch", "train_loss", "elbo_train") if k in hist), None)  # 1.5.1: train_loss
    loss = np.array([float(v) for v in hist[key].to_numpy().ravel()]) if key else np.zeros(0)  # object dtype
    epochs = len(loss) if len(loss) else None
    n_int = int(len(model.train_indices))
    t1 = time.perf_counter()
    ev = scvi_heldout(model, held, task["n_mc"], seed)
    z = model.get_latent_representation(full)
    fg = model.get_protein_foreground_probability(full)
    return {**ev, "heldout_eval_seconds": time.perf_counter() - t1, "train_seconds": secs, "epochs": epochs,
            "internal_n_train": n_int, "cells_per_second": n_int * (epochs or 0) / secs,
            "n_skipped_steps": int((~np.isfinite(loss)).sum()), "skipped_steps_kind": "non-finite epoch losses",
            "train_kwargs": kw, "z": z, "fg": fg}


def _run_cellvae(cellvae, task, train, held, full) -> dict:
    import torch

    seed = task["seed"]
    torch.set_num_threads(task["threads"])
    model = cellvae.RNAProteinVAE(train, **json.loads(task.get("cellvae_kwargs") or "{}"))
    kw = {"seed": seed, "progress_bar": False, "n_threads": task["threads"],
          **json.loads(task.get("cellvae_train_kwargs") or "{}")}
    if task["mode"] == "equal-epochs":
        kw.update(max_epochs=task["equal_epochs"], early_stopping=False)
    elif task.get("max_epochs_override"):
        kw["max_epochs"] = task["max_epochs_override"]
    t0 = time.perf_counter()
    model.train(**kw)
    secs = time.perf_counter() - t0
    h = model.history
    t1 = time.perf_counter()
    elbo = model.get_elbo(held, modality="all", seed=seed)
    lp = model.get_marginal_ll(held, n_samples=task["n_mc"], modality="all", seed=seed)
    z = model.get_latent_representation(full)
    fg = model.get_protein_foreground_probability(full)
    return {**{f"elbo_{k}": v for k, v in elbo.items()}, **{f"log_px_{k}": v for k, v in lp.items()},
            "heldout_eval_seconds": time.perf_counter() - t1, "train_seconds": secs, "epochs": len(h["epoch"]),
            "best_epoch": h.get("best_epoch"), "stopped_early": h.get("stopped_early"),
            "internal_n_train": int(len(model.train_indices)), "cells_per_second": float(h["train_cells_per_second"]),
            "n_skipped_steps": int(h["n_skipped_steps"]), "skipped_steps_kind": "NaN-skipped steps",
            "train_kwargs": kw, "cellvae_kwargs": task.get("cellvae_kwargs"), "settings": dict(model.module_kwargs),
            "protein_info": model.protein_info, "z": z, "fg": fg}


def run_in_child(task: dict) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_child, task).result()


# ------------------------------------------------------------------------------------------------ report
def _key(r: dict) -> tuple:
    return (r["dataset"], r["mode"], r["seed"], r["tool"])


def _fmt(v, d):
    return "-" if v is None else f"{v:.{d}f}"


_REFERENCE_CACHE: dict = {}


def reference_aurocs(dataset: str, data_dir: str | None = None) -> dict:
    """The marker AUROCs of the protein counts themselves, without a model, as a reference for the foreground
    probability: ``{"raw ADT counts": {protein: auroc}, "CLR of ADT counts": {...}}`` (CLR per cell:
    ``log1p(y) - mean over proteins of log1p(y)``). Empty when the dataset's file is not in ``data_dir``."""
    import numpy as np
    import pandas as pd

    if dataset in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[dataset]
    path = Path(data_dir or default_data_dir()) / DATASETS[dataset][0]
    if not path.exists():
        return {}
    import anndata as ad

    a = ad.read_h5ad(path)
    prot = a.obsm["protein_expression"]
    y = np.log1p(np.asarray(prot, dtype=np.float64))
    clr = pd.DataFrame(y - y.mean(axis=1, keepdims=True), columns=prot.columns)
    labels = a.obs[DATASETS[dataset][1]].to_numpy()
    raw = pd.DataFrame(np.asarray(prot, dtype=np.float64), columns=prot.columns)
    out = {"raw ADT counts (no model)": marker_aurocs(raw, labels, dataset),
           "CLR of ADT counts (no model)": marker_aurocs(clr, labels, dataset)}
    _REFERENCE_CACHE[dataset] = out
    return out


def render(rows: list[dict], meta: dict) -> str:
    import numpy as np

    seeds = sorted({r["seed"] for r in rows})
    out = [f"# cellvae RNAProteinVAE vs scvi-tools TOTALVI (issue 25), seeds {', '.join(map(str, seeds))}", "",
           "Written by `benchmarks/rna_protein.py` (see its docstring for the protocol). Held-out numbers are on the "
           "10 % of cells neither tool trained on; one estimator evaluates both tools' modules. Differences are "
           "cellvae minus TOTALVI, paired by seed, with a t-based 95 % interval.", ""]
    out.append("## Runs")
    for inv in meta.get("invocations", []):
        out.append(f"- {inv['date'][:16]} UTC, commit {inv['git_commit']}"
                   f"{' (+uncommitted src)' if inv.get('git_dirty_src') else ''}, load average {inv['loadavg_start']} "
                   f"at start / {inv.get('loadavg_end', '?')} at end; {inv['machine']}; scvi-tools "
                   f"{inv.get('scvi_version')}, torch {inv.get('torch_version')}; args `{inv['args']}`")
    out.append("")
    for mode in MODES:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        out += [f"## Mode: {mode}", ""]
        if mode == "equal-epochs":
            e = sorted({r.get("train_kwargs", {}).get("max_epochs") for r in mrows} - {None})
            out += [f"Both tools run exactly {e} epochs (no early stopping), each with its other defaults.", ""]
        else:
            out += ["Each tool at its own defaults (early stopping on its own validation cells).", ""]
        for ds in DATASETS:
            drows = [r for r in mrows if r["dataset"] == ds]
            if not drows:
                continue
            out += [f"### {ds}", "", "| metric | cellvae | TOTALVI | cellvae - TOTALVI [95% CI] | seeds |",
                    "|---|---|---|---|---|"]
            for key, head, d, direction in METRICS:
                by = {t: {r["seed"]: r.get(key) for r in drows if r["tool"] == t} for t in TOOLS}
                ms = {t: mean_sd(list(by[t].values())) for t in TOOLS}
                seeds = sorted(set(by["cellvae"]) & set(by["scvi"]))
                diffs = [by["cellvae"][s] - by["scvi"][s] for s in seeds
                         if by["cellvae"][s] is not None and by["scvi"][s] is not None]
                m, h, n = paired_t_ci(diffs)
                cell = lambda t: "-" if ms[t][0] is None else f"{_fmt(ms[t][0], d)} ± {_fmt(ms[t][1], d)}"  # noqa
                dtxt = "-" if m is None else f"{m:+.{d}f}" + ("" if h is None else f" [{m - h:+.{d}f}, {m + h:+.{d}f}]")
                out.append(f"| {head} | {cell('cellvae')} | {cell('scvi')} | {dtxt} | {n} |")
            ratio = []
            for s in sorted({r["seed"] for r in drows}):
                a = [r for r in drows if r["seed"] == s and r["tool"] == "cellvae"]
                b = [r for r in drows if r["seed"] == s and r["tool"] == "scvi"]
                if a and b and a[0].get("train_seconds") and b[0].get("train_seconds"):
                    ratio.append((b[0]["train_seconds"] / a[0]["train_seconds"],
                                  a[0]["cells_per_second"] / max(b[0]["cells_per_second"], 1e-9)))
            if ratio:
                out.append(f"| speed-up (TOTALVI time / cellvae time; cells/s ratio) | "
                           f"{np.mean([r[0] for r in ratio]):.2f}x | | cells/s {np.mean([r[1] for r in ratio]):.2f}x | "
                           f"{len(ratio)} |")
            out.append("")
            markers = list(MARKERS[ds])
            out += ["Marker foreground AUROC (mean over seeds), and the same AUROC of the protein counts themselves:",
                    "",
                    "| tool | " + " | ".join(markers) + " | mean |", "|---|" + "---|" * (len(markers) + 1)]
            for t in TOOLS:
                vals = [np.mean([r["marker_auroc"].get(mk) for r in drows if r["tool"] == t
                                 and r.get("marker_auroc", {}).get(mk) is not None] or [np.nan]) for mk in markers]
                vals.append(np.nanmean(vals) if not np.all(np.isnan(vals)) else np.nan)
                out.append(f"| {TOOL_LABEL[t]} | " + " | ".join("-" if np.isnan(v) else f"{v:.3f}" for v in vals)
                           + " |")
            for name, au in reference_aurocs(ds).items():  # the same AUROC of the counts themselves
                vals = [au.get(mk, np.nan) for mk in markers]
                vals.append(np.nanmean(vals))
                out.append(f"| {name} | " + " | ".join("-" if np.isnan(v) else f"{v:.3f}" for v in vals) + " |")
            out.append("")
    out += ["## Markers", "", "Positive types against negative types (other types are left out of each AUROC):", ""]
    for ds, mk in MARKERS.items():
        out.append(f"- {ds}: " + "; ".join(f"{p}: {'/'.join(pos)} vs {'/'.join(neg)}" for p, (pos, neg) in mk.items()))
    out.append("")
    return "\n".join(out)


def _merged(jpath: Path, data: dict, mine: dict, inv: dict) -> dict:
    """The results file as it is now on disk (another invocation may have written rows since this one read it)
    with this invocation's rows and record put in (rows keyed by dataset/mode/seed/tool, records by date)."""
    disk = json.loads(jpath.read_text()) if jpath.exists() else {"rows": [], "meta": {"invocations": []}}
    rows = {_key(r): r for r in disk["rows"]}
    rows.update(mine)
    invs = [i for i in disk["meta"]["invocations"] if i.get("date") != inv["date"]] + [inv]
    return {**disk, "rows": sorted(rows.values(), key=lambda r: (r["mode"], r["dataset"], r["seed"], r["tool"])),
            "meta": {**disk.get("meta", {}), "invocations": sorted(invs, key=lambda i: i.get("date", ""))}}


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_threads(args.threads)
    out = Path(args.out)
    jpath, mpath = out.with_suffix(".json"), out.with_suffix(".md")
    data = json.loads(jpath.read_text()) if jpath.exists() else {"rows": [], "meta": {"invocations": []}}
    if args.render:
        atomic_write_text(mpath, render(data["rows"], data["meta"]))
        return 0
    gc = git_commit("src")
    inv = {"date": datetime.now(timezone.utc).isoformat(), "git_commit": gc["commit"], "git_dirty_src": gc["dirty"],
           "loadavg_start": loadavg(), "machine": machine_description(), "args": " ".join(argv or sys.argv[1:]),
           "scvi_version": package_version("scvi-tools"), "torch_version": package_version("torch")}
    data["meta"]["invocations"].append(inv)
    rows = {_key(r): r for r in data["rows"]}
    mine: dict = {}  # this invocation's rows
    tools = args.tools.split(",")
    for mode in args.modes.split(","):
        for ds in args.datasets.split(","):
            for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
                order = tools if i % 2 == 0 else tools[::-1]
                for tool in order:
                    task = {"tool": tool, "dataset": ds, "seed": seed, "mode": mode, "threads": args.threads,
                            "equal_epochs": args.equal_epochs, "max_epochs_override": args.max_epochs_override,
                            "n_mc": args.n_mc, "data_dir": args.data_dir, "cellvae_kwargs": args.cellvae_kwargs,
                            "cellvae_train_kwargs": args.cellvae_train_kwargs}
                    t0 = time.perf_counter()
                    load0 = loadavg()
                    print(f"[{datetime.now():%H:%M:%S}] {mode} {ds} seed {seed} {tool} ...", flush=True)
                    res = run_in_child(task)
                    row = {"dataset": ds, "mode": mode, "seed": seed, "tool": tool, **res,
                           "git_commit": gc["commit"], "date": inv["date"], "loadavg_1min_start": load0,
                           "loadavg_1min": loadavg()}
                    rows[_key(row)] = mine[_key(row)] = row
                    print(f"    {time.perf_counter() - t0:.0f} s: log p rna {_fmt(res.get('log_px_rna'), 2)} protein "
                          f"{_fmt(res.get('log_px_protein'), 2)}; ARI {_fmt(res.get('kmeans_ari'), 3)}; AUROC "
                          f"{_fmt(res.get('marker_auroc_mean'), 3)}; {res['epochs']} epochs {res['train_seconds']:.0f} s",
                          flush=True)
                    inv["loadavg_end"] = loadavg()
                    data = _merged(jpath, data, mine, inv)
                    atomic_write_text(jpath, json.dumps(data, indent=1, default=float))
                    atomic_write_text(mpath, render(data["rows"], data["meta"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
