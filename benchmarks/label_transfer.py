#!/usr/bin/env python
"""Label transfer and reference mapping: cellvae ``LabelTransferVAE`` + ``map_query`` vs scvi-tools ``SCANVI`` +
``load_query_data`` vs a plain kNN baseline, on the same splits (issue 24).

Splits (each one a reference and a query; the query's labels are hidden from every tool):

- leave-one-batch-out on ``cellline_mixology_tian2019_5batches`` (labels from genotypes; 5 batches, 2
  technologies), ``pbmc_10x_3chemistries`` (``cell_type_marker``; "unassigned" cells are unlabelled in the reference
  and not scored) and ``pbmc_10x_3tech_savercat_2000cells``: each batch in turn is the query;
- ``kang2018_ifnb_pbmc_muscat``: donor 107 (its ctrl and stim samples) is the query, donor 101 the reference (batch
  key ``sample_id``).

In every split one cell type is left out of the reference (the cell types with >= 20 cells in both the reference and
the query, sorted by name, taken in turn by split index): the query's cells of that type must be called unknown.
Genes: 2000 seurat_v3 highly variable genes of the reference (with its batch key) when the data have more than 2000,
genes without counts in the reference removed; the query gets the same genes.

Tools (the settings of scvi-tools' scArches tutorial, "Reference mapping with scvi-tools", for both models:
``use_layer_norm="both", use_batch_norm="none", encode_covariates=True, dropout_rate=0.2, n_layers=2``):

- scvi-tools 1.5.1, as its tutorial: ``SCVI(ref).train()`` (its defaults), ``SCANVI.from_scvi_model(...,
  unlabeled_category="Unknown").train(max_epochs=20, n_samples_per_label=100)``, ``SCANVI.load_query_data(query,
  model).train(max_epochs=100, plan_kwargs={"weight_decay": 0.0})``; prediction ``predict(soft=True)``; the unknown
  score is ``1 - max probability``;
- cellvae: ``CountVAE(ref).train()``, ``LabelTransferVAE.from_count_vae(...).train()``, ``map_query(query)``, each at
  its defaults; ``predict_table()`` (calibrated confidence, ``unknown_score``);
- kNN baseline: log1p of counts per 10,000, PCA (50 components) fitted on the reference, the query projected;
  ``KNeighborsClassifier(15)`` (probabilities = neighbour votes); unknown score = mean distance to the 15 nearest
  reference cells.

Measured on the query: balanced accuracy and macro F1 over cells whose true type the reference knows (the left-out
type and unlabelled cells excluded); ECE (15 bins) of the predicted probabilities on those cells; AUROC of the unknown
score for left-out-type cells vs the others; iLISI (reference vs query, scaled to [0, 1] as scIB, cellvae's
:func:`cellvae.metrics.integration.ilisi` for both tools) on the joint latent of the mapped model; wall seconds of
reference training (scVI + scANVI) and of query mapping. One torch / BLAS thread per tool (the machine has 2 cores and
is shared); the tool order alternates between runs; the 1-minute load average is recorded before each run.

Every run is a fresh child process (spawn). Rows are merged into ``--json`` after each run (``--resume`` skips rows
already there); the Markdown is rebuilt from the JSON.

    nohup nice -n 5 .venv-bench/bin/python benchmarks/label_transfer.py --resume > /tmp/lt.log 2>&1 &
    .venv-bench/bin/python benchmarks/label_transfer.py --report-only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO_ROOT, atomic_write_text, cap_loaded_threads, default_data_dir, git_commit, limit_threads,
    machine_description, mean_sd, newest_commit, paired_t_ci,
)

RESULTS = REPO_ROOT / "benchmarks" / "results"
ARCHES = {"use_layer_norm": "both", "use_batch_norm": "none", "encode_covariates": True, "dropout_rate": 0.2,
          "n_layers": 2}
TOOLS = ("cellvae", "scvi", "knn")
UNKNOWN = "Unknown"
PAIR_MINUTES = 5  # a wall-time pair counts when its later run started this soon after the earlier one ended
# dataset -> (label key, batch key, query batch groups (None: leave-one-batch-out), labels not scored)
DATASETS = {
    "cellline_mixology_tian2019_5batches": ("cell_type", "batch", None, ()),
    "pbmc_10x_3chemistries": ("cell_type_marker", "batch", None, ("unassigned",)),
    "pbmc_10x_3tech_savercat_2000cells": ("cell_type", "batch", None, ()),
    "kang2018_ifnb_pbmc_muscat": ("cell_type", "sample_id", [["ctrl107", "stim107"]], ()),
}
MIN_TYPE_CELLS = 20


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def splits(data_dir: str) -> list[dict]:
    """Every split: dataset, query batches, left-out type (deterministic)."""
    import anndata as ad

    out = []
    for name, (lk, bk, groups, unscored) in DATASETS.items():
        a = ad.read_h5ad(Path(data_dir) / f"{name}.h5ad", backed="r")
        obs = a.obs[[lk, bk]].astype(str)
        batches = sorted(obs[bk].unique())
        for i, q in enumerate(groups or [[b] for b in batches]):
            inq = obs[bk].isin(q).to_numpy()
            types = sorted(t for t in obs[lk].unique() if t not in unscored
                           and (obs[lk][inq] == t).sum() >= MIN_TYPE_CELLS
                           and (obs[lk][~inq] == t).sum() >= MIN_TYPE_CELLS)
            left = types[len(out) % len(types)] if len(types) > 2 else None
            out.append({"split": f"{name}:{'+'.join(q)}", "dataset": name, "query_batches": q, "left_out": left,
                        "n_query": int(inq.sum()), "n_reference": int((~inq).sum() - (obs[lk][~inq] == left).sum())})
        a.file.close()
    return out


def prepare(data_dir: str, split: dict):
    """(reference AnnData, query AnnData with hidden labels, true query labels, label key, batch key, unscored)."""
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp

    name = split["dataset"]
    lk, bk, _, unscored = DATASETS[name]
    a = ad.read_h5ad(Path(data_dir) / f"{name}.h5ad")
    a = ad.AnnData(sp.csr_matrix(a.X, dtype=np.float32), obs=a.obs[[lk, bk]].astype(str).copy(),
                   var=a.var[[]].copy())
    inq = a.obs[bk].isin(split["query_batches"]).to_numpy()
    ref = a[~inq & (a.obs[lk] != str(split["left_out"])).to_numpy()].copy()
    query = a[inq].copy()
    ref.obs.loc[ref.obs[lk].isin(unscored), lk] = UNKNOWN
    keep = np.asarray(ref.X.sum(0)).ravel() > 0
    ref, query = ref[:, keep].copy(), query[:, keep].copy()
    if ref.n_vars > 2000:
        h = ref.copy()
        sc.pp.highly_variable_genes(h, flavor="seurat_v3", n_top_genes=2000,
                                    batch_key=bk if ref.obs[bk].nunique() > 1 else None)
        genes = h.var_names[h.var["highly_variable"].to_numpy()]
        ref, query = ref[:, genes].copy(), query[:, genes].copy()
    truth = query.obs[lk].to_numpy().copy()
    query.obs[lk] = UNKNOWN
    return ref, query, truth, lk, bk, unscored


def _scores(truth, probs, labels, unknown_score, left_out, unscored, z_ref, z_query) -> dict:
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    from cellvae.metrics.calibration import expected_calibration_error
    from cellvae.metrics.integration import ilisi

    labels = list(labels)
    pred = np.asarray(labels, dtype=object)[probs.argmax(1)]
    known = np.isin(truth, labels) & ~np.isin(truth, list(unscored))
    out = {"n_scored": int(known.sum())}
    present = sorted(set(truth[known]))
    out["balanced_accuracy"] = float(balanced_accuracy_score(truth[known], pred[known]))
    out["macro_f1"] = float(f1_score(truth[known], pred[known], labels=present, average="macro"))
    out["accuracy"] = float((truth[known] == pred[known]).mean())
    codes = np.asarray([labels.index(t) for t in truth[known]])
    out["ece"] = expected_calibration_error(probs[known], codes)
    pos = truth == str(left_out)
    if left_out is not None and pos.any():
        sel = pos | known
        out["unknown_auroc"] = float(roc_auc_score(pos[sel], np.asarray(unknown_score)[sel]))
    if z_ref is not None:
        z = np.concatenate([z_ref, z_query])
        grp = np.r_[np.zeros(len(z_ref), int), np.ones(len(z_query), int)]
        out["ilisi"] = ilisi(z, grp, sample_size=5000, seed=0)
    return out


def train_cellvae(ref, query, lk, bk, seed, label_kwargs=None, map_kwargs=None):
    """cellvae's reference training and query mapping, each at its defaults (module docstring): ``(CountVAE,
    LabelTransferVAE, mapped model, reference seconds, query seconds)``. ``label_kwargs``, ``map_kwargs``: extra
    settings of the label phase and of ``map_query`` (default studies only)."""
    import cellvae

    t0 = time.perf_counter()
    m = cellvae.CountVAE(ref, batch_key=bk, **ARCHES).train(seed=seed, progress_bar=False, n_threads=1)
    lt = cellvae.LabelTransferVAE.from_count_vae(m, labels_key=lk, unlabeled_category=UNKNOWN)
    lt.train(seed=seed, progress_bar=False, n_threads=1, **(label_kwargs or {}))
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    mapped = lt.map_query(query, batch_key=bk, seed=seed, progress_bar=False, n_threads=1, **(map_kwargs or {}))
    return m, lt, mapped, t_ref, time.perf_counter() - t0


def _best(values) -> float | None:
    """The highest finite value of a per-epoch history (the query's validation ELBO), or None."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.max()) if len(v) else None


def run_cellvae(ref, query, lk, bk, seed, label_kwargs=None, map_kwargs=None):
    import cellvae

    m, lt, mapped, t_ref, t_query = train_cellvae(ref, query, lk, bk, seed, label_kwargs, map_kwargs)
    table = mapped.predict_table()
    probs = mapped.predict(soft=True).to_numpy()
    extra = {"temperature": lt.temperature, "reference_epochs": len(m.history["epoch"]),
             "label_epochs": len(lt.history["epoch"]), "query_epochs": len(mapped.history["epoch"]),
             "query_best_validation_elbo": _best(mapped.history["validation_elbo"]),
             "flagged_unknown": table["unknown"].to_numpy(), "uncertainty": 1.0 - probs.max(1),
             "version": cellvae.__version__}
    return (lt.labels, probs, table["unknown_score"].to_numpy(), mapped.get_latent_representation(ref),
            mapped.get_latent_representation(), t_ref, t_query, extra)


def run_scvi(ref, query, lk, bk, seed):
    import logging

    import scvi

    scvi.settings.seed = seed
    scvi.settings.verbosity = logging.WARNING
    for lg in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric"):
        logging.getLogger(lg).setLevel(logging.ERROR)
    kw = dict(accelerator="cpu", enable_progress_bar=False)
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(ref, batch_key=bk, labels_key=lk)
    vae = scvi.model.SCVI(ref, **ARCHES)
    vae.train(**kw)
    scan = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN, labels_key=lk)
    scan.train(max_epochs=20, n_samples_per_label=100, **kw)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = scvi.model.SCANVI.load_query_data(query, scan)
    q.train(max_epochs=100, plan_kwargs={"weight_decay": 0.0}, **kw)
    t_query = time.perf_counter() - t0
    soft = q.predict(soft=True)
    labels = [c for c in soft.columns if c != UNKNOWN]
    probs = soft[labels].to_numpy()
    probs = probs / probs.sum(1, keepdims=True)
    extra = {"reference_epochs": int(vae.history["elbo_train"].shape[0]), "version": scvi.__version__}
    return (labels, probs, 1.0 - probs.max(1), q.get_latent_representation(ref), q.get_latent_representation(),
            t_ref, t_query, extra)


def run_knn(ref, query, lk, bk, seed):
    import numpy as np
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    t0 = time.perf_counter()

    def norm(a):
        b = a.copy()
        sc.pp.normalize_total(b, target_sum=1e4)
        sc.pp.log1p(b)
        return b.X.toarray() if hasattr(b.X, "toarray") else np.asarray(b.X)

    keep = ref.obs[lk].to_numpy() != UNKNOWN
    xr = norm(ref)
    pca = PCA(n_components=min(50, xr.shape[1] - 1), random_state=seed).fit(xr)
    zr = pca.transform(xr)
    clf = KNeighborsClassifier(15).fit(zr[keep], ref.obs[lk].to_numpy()[keep])
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    zq = pca.transform(norm(query))
    probs = clf.predict_proba(zq)
    dist, _ = clf.kneighbors(zq)
    t_query = time.perf_counter() - t0
    return list(clf.classes_), probs, dist.mean(1), zr, zq, t_ref, t_query, {}


RUNNERS = {"cellvae": run_cellvae, "scvi": run_scvi, "knn": run_knn}


def _child(task: dict) -> dict:
    limit_threads(1)
    cap_loaded_threads(1)
    import warnings

    import numpy as np

    warnings.filterwarnings("ignore")
    os.nice(max(0, 5 - os.nice(0)))
    ref, query, truth, lk, bk, unscored = prepare(task["data_dir"], task["split"])
    kw = {}
    if task["tool"] == "cellvae":
        kw = {k: task[t] for k, t in (("label_kwargs", "cellvae_label_kwargs"), ("map_kwargs", "cellvae_map_kwargs"))
              if task.get(t)}
    labels, probs, unk, z_ref, z_query, t_ref, t_query, extra = RUNNERS[task["tool"]](ref, query, lk, bk,
                                                                                       task["seed"], **kw)
    row = _scores(truth, probs, labels, unk, task["split"]["left_out"], unscored, z_ref, z_query)
    left = truth == str(task["split"]["left_out"])
    known = np.isin(truth, list(labels))
    if "flagged_unknown" in extra:
        flagged = extra.pop("flagged_unknown")
        row["flagged_unknown_rate_left_out"] = float(flagged[left].mean()) if left.any() else None
        row["flagged_unknown_rate_known"] = float(flagged[known].mean())
    if "uncertainty" in extra:
        from sklearn.metrics import roc_auc_score

        u = extra.pop("uncertainty")
        sel = left | known
        if left.any():
            row["unknown_auroc_uncertainty_only"] = float(roc_auc_score(left[sel], u[sel]))
    row.update(extra, reference_seconds=round(t_ref, 2), query_seconds=round(t_query, 2),
               total_seconds=round(t_ref + t_query, 2), n_reference=int(ref.n_obs), n_query=int(query.n_obs),
               n_genes=int(ref.n_vars))
    return row


def _key(r: dict) -> tuple:
    return (r["tool"], r["split"], r["seed"])


def _load(path: Path) -> list[dict]:
    if path.exists():
        return json.loads(path.read_text()).get("rows", [])
    return []


def _save(path: Path, rows: list[dict], meta: dict) -> None:
    merged = {_key(r): r for r in _load(path)}
    for r in rows:
        merged[_key(r)] = r
    if path.exists():  # keep the invocations another process recorded in the file since this one started
        on_disk = json.loads(path.read_text()).get("meta", {}).get("invocations", [])
        meta = {**meta, "invocations": [*on_disk, *(i for i in meta.get("invocations", []) if i not in on_disk)]}
    payload = {"meta": meta, "rows": sorted(merged.values(), key=lambda r: (r["split"], r["seed"], r["tool"]))}
    atomic_write_text(path, json.dumps(payload, indent=2))
    atomic_write_text(path.with_suffix(".md"), report(payload))


def _per_split_verdicts(rows: list[dict], splits_: list[str], key: str, better: int) -> str:
    """For each split, the seeds where both cellvae and scANVI have ``key``; their differences (cellvae − scANVI)
    with a 95 % t-interval: the counts of splits whose interval lies wholly on the better side, wholly on the worse
    side, or contains 0 (ties included), and the worse ones by name."""
    worse, good, neither = [], 0, 0
    for s in splits_:
        vals = {t: {r["seed"]: r.get(key) for r in rows if r["tool"] == t and r["split"] == s
                    and r.get(key) is not None} for t in ("cellvae", "scvi")}
        m, hw, n = paired_t_ci([vals["cellvae"][k] - vals["scvi"][k] for k in sorted(vals["cellvae"])
                                if k in vals["scvi"]])
        if n < 2 or hw is None:
            neither += 1
            continue
        lo, hi = m - hw, m + hw
        if (lo > 0) if better > 0 else (hi < 0):
            good += 1
        elif (hi < 0) if better > 0 else (lo > 0):
            worse.append(f"{s} {m:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        else:
            neither += 1
    return (f"95 % CI over seeds wholly better on {good}, containing 0 on {neither}, wholly worse on {len(worse)}"
            + (f" ({'; '.join(worse)})" if worse else ""))


def report(payload: dict) -> str:
    import numpy as np

    rows = [r for r in payload["rows"] if not r.get("error")]
    meta = payload["meta"]
    commits = sorted({r.get("commit", "?") for r in rows})
    dates = sorted({r.get("date", "?")[:10] for r in rows})
    loads = [r.get("loadavg_start") for r in rows if r.get("loadavg_start") is not None]
    lines = ["# Label transfer and reference mapping: cellvae vs scvi-tools SCANVI vs kNN (issue 24)", "",
             f"commit {newest_commit(rows)}, {dates[-1]} (the newest row; all rows: commits {', '.join(commits)}, "
             f"dates {', '.join(dates)}); machine: {meta.get('machine')}", "",
             *([f"- invocations recorded (rows older than the first of them were made by unrecorded ones): "
                + "; ".join(f"{i['started'][:16]} at {i['commit']}, nice {i.get('niceness', '?')}: `{i['command']}`"
                            for i in meta["invocations"])]
               if meta.get("invocations") else [f"- command: `{meta.get('command')}`"]),
             f"- 1-minute load average at the start of runs: {min(loads) if loads else '?'} to "
             f"{max(loads) if loads else '?'} (2-core shared machine; one thread per tool; tool order alternates)",
             f"- tools: {', '.join(sorted({r['tool'] + ' ' + str(r.get('version', '')) for r in rows}))}",
             "- protocol: the docstring of `benchmarks/label_transfer.py`; mean over seeds per split.", ""]
    splits_ = sorted({r["split"] for r in rows})
    metrics = [("balanced_accuracy", "bal. acc."), ("macro_f1", "macro F1"), ("ece", "ECE"),
               ("unknown_auroc", "unknown AUROC"), ("ilisi", "iLISI"), ("total_seconds", "wall s")]
    head = "| split | left out | seeds | " + " | ".join(f"{lab} {t}" for _, lab in metrics
                                                      for t in ("cellvae", "scANVI", "kNN")) + " |"
    lines += ["## Per split (mean over seeds)", "", head, "|" + "---|" * (3 + 3 * len(metrics))]

    def timed(r):  # wall times of a starved run (niced >= 10 beside other benchmarks) measure the queue, not the tool
        return not r.get("timing_invalid") and int(r.get("niceness", 0)) < 10

    def val(tool, split, key):
        return mean_sd([r.get(key) for r in rows if r["tool"] == tool and r["split"] == split
                        and (key != "total_seconds" or timed(r))])[0]

    for s in splits_:
        left = next(r.get("left_out") for r in rows if r["split"] == s)
        seeds = len({r["seed"] for r in rows if r["split"] == s and r["tool"] == "cellvae"})
        cells = []
        for key, _ in metrics:
            for t in ("cellvae", "scvi", "knn"):
                v = val(t, s, key)
                cells.append("-" if v is None else (f"{v:.1f}" if key == "total_seconds" else f"{v:.3f}"))
        lines.append(f"| {s} | {left} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", "## Criteria (cellvae vs scANVI; per split the mean over seeds)", ""]
    both = [s for s in splits_ if val("cellvae", s, "balanced_accuracy") is not None
            and val("scvi", s, "balanced_accuracy") is not None]
    for key, lab, better in (("balanced_accuracy", "balanced accuracy", 1), ("ece", "ECE", -1),
                             ("macro_f1", "macro F1", 1), ("ilisi", "iLISI", 1)):
        diffs = [val("cellvae", s, key) - val("scvi", s, key) for s in both]
        ok = sum(1 for d in diffs if d * better >= 0)
        m, hw, n = paired_t_ci(diffs)
        lines.append(f"- {lab}: cellvae {'≥' if better > 0 else '≤'} scANVI on {ok} of {n} splits; mean paired "
                     f"difference (cellvae − scANVI) {m:+.4f}" + (f" ± {hw:.4f} (95 % CI over splits)" if hw else "")
                     if n else f"- {lab}: no paired splits yet")
        if key in ("balanced_accuracy", "ece") and n:
            lines.append(f"  - per split, paired by seed: {_per_split_verdicts(rows, both, key, better)}")
    au = [val("cellvae", s, "unknown_auroc") for s in splits_ if val("cellvae", s, "unknown_auroc") is not None]
    au_s = [val("scvi", s, "unknown_auroc") for s in splits_ if val("scvi", s, "unknown_auroc") is not None]
    au_k = [val("knn", s, "unknown_auroc") for s in splits_ if val("knn", s, "unknown_auroc") is not None]
    lines.append(f"- unknown-type AUROC, mean over splits: cellvae {np.mean(au):.3f} ({len(au)} splits), scANVI "
                 f"(1 − max prob.) {np.mean(au_s) if au_s else float('nan'):.3f}, kNN distance "
                 f"{np.mean(au_k) if au_k else float('nan'):.3f}" if au else "- unknown AUROC: none yet")
    # wall-time ratio per split over the seeds where both tools' rows are timed (paired by seed: the two runs of a
    # seed alternate in one invocation, so a loaded machine slows both), then the split's mean ratio
    def adjacent(a, b):  # the later run of a pair started within PAIR_MINUTES of the end of the earlier one
        from datetime import datetime
        first, second = sorted((a, b), key=lambda r: r["date"])
        gap = (datetime.fromisoformat(second["date"]) - datetime.fromisoformat(first["date"])).total_seconds()
        return gap - float(first.get("child_wall_seconds") or 0.0) <= PAIR_MINUTES * 60

    ratios = []
    for s in both:
        per_seed = []
        for seed in sorted({r["seed"] for r in rows if r["split"] == s}):
            pair = {t: next((r for r in rows if r["tool"] == t and r["split"] == s and r["seed"] == seed
                             and timed(r) and r.get("total_seconds")), None) for t in ("scvi", "cellvae")}
            if all(pair.values()) and adjacent(pair["scvi"], pair["cellvae"]):
                per_seed.append(pair["scvi"]["total_seconds"] / pair["cellvae"]["total_seconds"])
        if per_seed:
            ratios.append(float(np.mean(per_seed)))
    untimed = sorted({f"{r['tool']} {r['split']} seed {r['seed']}" for r in rows if not timed(r)})
    if untimed:
        why = "; ".join(sorted({str(r.get("timing_invalid") or "niceness >= 10") for r in rows if not timed(r)}))
        lines.append(f"- wall times left out ({len(untimed)} runs whose timing is not valid: {why}); their quality "
                     "numbers count")
    if ratios:
        gm = float(np.exp(np.mean(np.log(ratios))))
        lines.append(f"- wall time (reference training + query mapping), scANVI / cellvae, paired by seed (both "
                     f"runs timed, the later one started within {PAIR_MINUTES} minutes of the end of the earlier "
                     f"one, i.e. alternating in one invocation): geometric mean {gm:.2f}x over {len(ratios)} "
                     f"splits (range {min(ratios):.2f}–{max(ratios):.2f})")
    flag_l = [r.get("flagged_unknown_rate_left_out") for r in rows if r["tool"] == "cellvae"]
    flag_k = [r.get("flagged_unknown_rate_known") for r in rows if r["tool"] == "cellvae"]
    if flag_k:
        lines.append(f"- cellvae `unknown` flag: {mean_sd(flag_l)[0]:.3f} of left-out-type cells and "
                     f"{mean_sd(flag_k)[0]:.3f} of known-type query cells flagged (mean over runs)")
    unc = [r.get("unknown_auroc_uncertainty_only") for r in rows if r["tool"] == "cellvae"]
    if any(u is not None for u in unc):
        lines.append(f"- cellvae unknown AUROC from 1 − confidence alone (as scANVI's): {mean_sd(unc)[0]:.3f}")
    errs = [r for r in payload["rows"] if r.get("error")]
    if errs:
        lines += ["", "## Failed runs", ""] + [f"- {r['tool']} {r['split']} seed {r['seed']}: "
                                               f"{r['error'].splitlines()[-1][:200]}" for r in errs]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--json", default=str(RESULTS / "label_transfer.json"))
    p.add_argument("--resume", action="store_true", help="skip runs whose row is already in --json")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--cellvae-label-train-kwargs", type=json.loads, default=None,
                   help="JSON dict of extra LabelTransferVAE.train() settings (default studies; use with --json)")
    p.add_argument("--cellvae-map-kwargs", type=json.loads, default=None,
                   help="JSON dict of extra map_query() settings (default studies; use with --json)")
    args = p.parse_args(argv)
    path = Path(args.json)
    meta = {"machine": machine_description(), "command": "python benchmarks/label_transfer.py " +
            " ".join(sys.argv[1:] if argv is None else argv)}
    old_meta = json.loads(path.read_text())["meta"] if path.exists() else {}
    if args.report_only and not path.exists():
        print(f"{path} does not exist: no rows to report.", file=sys.stderr)
        return 1
    if args.report_only:
        _save(path, [], old_meta or meta)
        print(path.with_suffix(".md").read_text())
        return 0
    commit = git_commit("src")
    meta["invocations"] = [*old_meta.get("invocations", []),
                           {"started": _now(), "commit": commit["commit"] + (" (src dirty)" if commit["dirty"] else ""),
                            "command": meta["command"], "niceness": os.nice(0)}]
    todo = [s for s in splits(args.data_dir) if s["dataset"] in args.datasets]
    done = {_key(r) for r in _load(path) if not r.get("error")} if args.resume else set()
    ctx = mp.get_context("spawn")
    i = 0
    for seed in args.seeds:
        for s in todo:
            order = list(args.tools) if i % 2 == 0 else list(reversed(args.tools))
            i += 1
            for tool in order:
                if (tool, s["split"], seed) in done:
                    continue
                row = {"tool": tool, "split": s["split"], "dataset": s["dataset"], "seed": seed,
                       "left_out": s["left_out"], "date": _now(), "loadavg_start": _loadavg(), "niceness": os.nice(0),
                       **{k: v for k, v in git_commit("src").items()}}
                if tool == "cellvae" and args.cellvae_label_train_kwargs:
                    row["cellvae_label_train_kwargs"] = args.cellvae_label_train_kwargs
                if tool == "cellvae" and args.cellvae_map_kwargs:
                    row["cellvae_map_kwargs"] = args.cellvae_map_kwargs
                print(f"{tool} {s['split']} seed {seed}: start {row['date']} load {row['loadavg_start']}", flush=True)
                t0 = time.perf_counter()
                try:
                    with ctx.Pool(1) as pool:
                        row.update(pool.apply(_child, ({"data_dir": args.data_dir, "split": s, "tool": tool,
                                                        "seed": seed,
                                                        "cellvae_label_kwargs": args.cellvae_label_train_kwargs,
                                                        "cellvae_map_kwargs": args.cellvae_map_kwargs},)))
                except Exception:  # noqa: BLE001 - recorded in the row
                    row["error"] = traceback.format_exc()
                row["child_wall_seconds"] = round(time.perf_counter() - t0, 1)
                row["loadavg_end"] = _loadavg()
                print(f"  -> {json.dumps({k: row.get(k) for k in ('balanced_accuracy', 'ece', 'unknown_auroc', 'ilisi', 'total_seconds', 'error')})[:400]}",
                      flush=True)
                _save(path, [row], meta)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
