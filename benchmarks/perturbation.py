"""Perturbation prediction on Kang et al. 2018 IFN-beta PBMCs: cellvae beside scGen, CPA and simple baselines.

Design (issue 27). Each cell type T is held out in turn: every method sees all control cells and the stimulated
cells of the other types, and predicts T's stimulated cells from T's control cells; the prediction is scored
against T's real stimulated cells. 3 training seeds. All methods run in the same invocation, in an order that
rotates with (seed, type); every prediction is a set of cells (one per control cell of T) scored by the same code.

Datasets (``../shared/data``):

- ``kang2018_ifnb_pbmc_muscat.h5ad``: 1,556 cells x 1,267 genes, 5 annotated cell types, 2 donors.
- ``kang2018_ifnb_pbmc_harmony2k.h5ad``: 2,000 cells x 9,015 genes, no labels. 2,000 seurat_v3 HVGs (on all
  cells, once). The "types" are Leiden clusters of the control cells (resolution 0.3, igraph, seed 0) on a PCA of
  the control cells that leaves out the 200 genes most changed by stimulation (Wilcoxon stim vs ctrl over all
  cells); stimulated cells get the majority cluster of their 15 nearest control cells in that PCA. Clusters with
  fewer than 30 control or 30 stimulated cells are dropped (with their cells).

Methods:

- ``no change``: T's control cells;
- ``mean shift`` (the additive baseline of Ahlmann-Eltze et al. 2025): each control cell of T plus the unweighted
  mean over the training types of (mean stim - mean ctrl), in log1p(counts per 10,000);
- ``ridge``: a linear map from a type's control profile to its stimulated one, fitted on pseudobulk pairs of the
  training types (type x donor where there are donors): ``stim = ctrl + b + W (ctrl - mean ctrl)``
  (scikit-learn ``Ridge`` on the deltas, alpha by leave-one-type-out cross-validation over the training types);
  T's predicted delta is added to each of T's control cells. Strong shrinkage gives the mean shift back;
- ``cellvae LA`` / ``cellvae DS``: :func:`cellvae.analysis.perturb.predict_perturbation`, latent arithmetic on a
  CountVAE without the condition covariate, and the decoder swap on one with ``categorical_covariate_keys=
  ['condition']``; both with ``batch_key='donor'`` where there are donors and cellvae's default training (max
  epochs ``min(400, 20000 / n_cells * 400)``, early stopping), 1 thread. Scored on ``layers['counts']`` (counts
  drawn from the likelihood; primary) and on ``X`` (expected counts; ``(expected)`` rows);
- ``scGen`` and ``CPA``: ``perturbation_peers.py`` in their own virtual environments (see that file for the
  versions and settings). CPA is scored on counts drawn from its NB (primary) and on its NB means
  (``(expected)``), as cellvae.

Metrics, in log1p(counts per 10,000) (scGen outputs that scale directly; counts and expected counts are
normalized first), on T's predicted vs real stimulated cells:

- ``R² all`` / ``R² DEG``: squared Pearson r over genes of the mean expression (scGen, Lotfollahi et al. 2019),
  all genes / the top-100 DEGs (scanpy Wilcoxon, T's real stim vs ctrl cells, ranked by score: up in stim);
- ``Δr all`` / ``Δr DEG``: Pearson r of the predicted against the real change from control
  (``mean(pred) - mean(ctrl_T)`` vs ``mean(stim_T) - mean(ctrl_T)``);
- ``DEG overlap``: the fraction of the real top-100 up-regulated genes (largest increase of mean log1p CP10k,
  stim_T vs ctrl_T) among the predicted top-100 (largest predicted increase). (The JSON also holds
  ``deg_overlap_wilcoxon``: the Wilcoxon test run on the predicted cells against T's control cells. It is not
  reported in the tables: a shift added to every cell, or a denoised decoder output, separates perfectly from the
  noisy control cells for any gene with a consistent small change, so the test's top genes are then
  lowly expressed genes with small shifts - an artefact of the test, not of the predicted response);
- ``rank``: the normalized rank of T's real change among all types' real changes, by Euclidean distance (all
  genes) to the predicted change: 0 = T's own response is the closest, 1 = the farthest (PerturBench's rank
  metric; a method that predicts the average response of the other types ranks badly);
- ``energy``: the energy distance (Székely & Rizzo 2013) between the predicted and the real stimulated cells on
  the top-100 DEGs, ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Euclidean); a prediction with the right mean but the
  wrong spread (e.g. every cell at the mean) scores worse than one with the right distribution.

Results: ``benchmarks/results/perturbation.{md,json}``; per-(dataset, seed, type, method) records are kept in
``benchmarks/data/perturbation/records.jsonl`` so an interrupted run resumes (``--resume``).

    .venv/bin/python benchmarks/perturbation.py [--seeds 0,1,2] [--datasets muscat,harmony] [--resume]
    .venv/bin/python benchmarks/perturbation.py --report-only    # Markdown/JSON from the stored records
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    atomic_write_text, git_commit, loadavg, machine_description, mean_sd, package_version, paired_t_ci,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CELLVAE_DATA_DIR") or ROOT.parent / "shared" / "data")
WORK = ROOT / "benchmarks" / "data" / "perturbation"
OUT = ROOT / "benchmarks" / "results" / "perturbation"
COND, CTRL, STIM, CT = "condition", "ctrl", "stim", "cell_type"
N_DE = 100
PEER_PY = {"scgen": ROOT / ".venv-scgen" / "bin" / "python", "cpa": ROOT / ".venv-cpa" / "bin" / "python"}
HARMONY_RESOLUTION, HARMONY_MIN_CELLS, HARMONY_N_RESPONSE_GENES = 0.3, 30, 200

METHODS = ("no change", "mean shift", "ridge", "cellvae LA", "cellvae DS", "scGen", "CPA")
TRAINED = ("cellvae LA", "cellvae DS", "scGen", "CPA")
VARIANTS = {"cellvae LA": ("sampled", "expected"), "cellvae DS": ("sampled", "expected"),
            "CPA": ("sampled", "expected")}
METRICS = ("r2_all", "r2_deg", "delta_r_all", "delta_r_deg", "deg_overlap", "rank", "energy")
METRIC_LABEL = {"r2_all": "R² all", "r2_deg": "R² DEG", "delta_r_all": "Δr all", "delta_r_deg": "Δr DEG",
                "deg_overlap": "DEG overlap", "rank": "rank ↓", "energy": "energy ↓"}
LOWER_IS_BETTER = {"rank", "energy"}


# ------------------------------------------------------------------------------------------------ data
def lognorm(X) -> np.ndarray:
    """log1p(counts per 10,000) of a (n_cells, n_genes) count matrix (dense or sparse), float64."""
    import scipy.sparse as sp

    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    tot = X.sum(1, keepdims=True)
    tot[tot == 0] = 1.0
    return np.log1p(X / tot * 1e4)


def load_muscat() -> tuple:
    import anndata as ad

    a = ad.read_h5ad(DATA / "kang2018_ifnb_pbmc_muscat.h5ad")
    a.obs[CT] = a.obs[CT].astype(str)
    info = {"file": "kang2018_ifnb_pbmc_muscat.h5ad", "n_cells": int(a.n_obs), "n_genes": int(a.n_vars),
            "types": "study annotation (obs cell_type)", "batch_key": "donor"}
    return a, info


def load_harmony() -> tuple:
    """The harmony2k subset with Leiden clusters of the control cells as types (see the module docstring)."""
    import anndata as ad
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    a = ad.read_h5ad(DATA / "kang2018_ifnb_pbmc_harmony2k.h5ad")
    hv = sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=2000, inplace=False)
    a = a[:, np.asarray(hv["highly_variable"], bool)].copy()
    b = ad.AnnData(lognorm(a.X).astype(np.float32), obs=a.obs[[COND]].copy())
    b.var_names = a.var_names
    b.obs[COND] = b.obs[COND].astype(str).astype("category")
    sc.tl.rank_genes_groups(b, COND, groups=[STIM], reference=CTRL, method="wilcoxon", n_genes=b.n_vars)
    rg = b.uns["rank_genes_groups"]
    names = np.asarray(rg["names"][STIM]).astype(str)
    score = np.abs(np.asarray(rg["scores"][STIM], dtype=float))
    response = set(names[np.argsort(-score, kind="stable")[:HARMONY_N_RESPONSE_GENES]])
    keep = ~np.isin(np.asarray(a.var_names), list(response))
    ctrl = (a.obs[COND].astype(str) == CTRL).to_numpy()
    X = b.X[:, keep].astype(np.float64)
    mu, sd = X[ctrl].mean(0), X[ctrl].std(0) + 1e-8
    Z = np.clip((X - mu) / sd, -10, 10)
    P = PCA(30, random_state=0, svd_solver="arpack").fit(Z[ctrl]).transform(Z)
    c = ad.AnnData(obsm={"X_pca": P[ctrl]})
    c.obs_names = a.obs_names[ctrl]
    sc.pp.neighbors(c, use_rep="X_pca", random_state=0)
    sc.tl.leiden(c, resolution=HARMONY_RESOLUTION, random_state=0, key_added="leiden", flavor="igraph",
                 n_iterations=2, directed=False)
    lab_c = c.obs["leiden"].astype(str).to_numpy()
    lab_s = KNeighborsClassifier(15).fit(P[ctrl], lab_c).predict(P[~ctrl])
    lab = np.empty(a.n_obs, dtype=object)
    lab[ctrl], lab[~ctrl] = lab_c, lab_s
    # name each cluster by its top-2 markers among control cells
    cc = b[ctrl].copy()
    cc.obs["cl"] = lab_c
    cc.obs["cl"] = cc.obs["cl"].astype("category")
    sc.tl.rank_genes_groups(cc, "cl", method="wilcoxon", n_genes=2)
    sizes, names_map = {}, {}
    for k in cc.obs["cl"].cat.categories:
        mk = [str(g) for g in cc.uns["rank_genes_groups"]["names"][k][:2]]
        names_map[k] = f"L{k} ({'/'.join(mk)})"
        sizes[names_map[k]] = {"ctrl": int((lab_c == k).sum()), "stim": int((lab_s == k).sum())}
    lab = np.array([names_map[x] for x in lab], dtype=object)
    kept = [k for k, v in sizes.items() if v["ctrl"] >= HARMONY_MIN_CELLS and v["stim"] >= HARMONY_MIN_CELLS]
    a.obs[CT] = lab
    a = a[np.isin(lab, kept)].copy()
    info = {"file": "kang2018_ifnb_pbmc_harmony2k.h5ad", "n_cells_file": 2000, "n_genes_file": 9015,
            "n_cells": int(a.n_obs), "n_genes": int(a.n_vars), "batch_key": None,
            "types": (f"Leiden clusters (resolution {HARMONY_RESOLUTION}) of the control cells on a PCA without the "
                      f"{HARMONY_N_RESPONSE_GENES} genes most changed by stimulation; stimulated cells labelled by "
                      f"their 15 nearest control cells; clusters with < {HARMONY_MIN_CELLS} cells of either "
                      "condition dropped"),
            "cluster_sizes": sizes, "kept": kept}
    return a, info


def top_de(ctrl_ln: np.ndarray, other_ln: np.ndarray, genes, n: int = N_DE) -> np.ndarray:
    """Indices of the top-n genes of scanpy's Wilcoxon test ``other`` vs ``ctrl`` (log1p CP10k), by score (up)."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    X = np.vstack([ctrl_ln, other_ln]).astype(np.float32)
    grp = np.r_[np.repeat("ctrl", len(ctrl_ln)), np.repeat("other", len(other_ln))]
    b = ad.AnnData(X, obs=pd.DataFrame({"g": pd.Categorical(grp)}, index=[f"c{i}" for i in range(len(X))]))
    b.var_names = [str(g) for g in genes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(b, "g", groups=["other"], reference="ctrl", method="wilcoxon", n_genes=n)
    names = [str(g) for g in b.uns["rank_genes_groups"]["names"]["other"][:n]]
    return pd.Index(b.var_names).get_indexer(names)


# ------------------------------------------------------------------------------------------------ metrics
def energy_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (Euclidean; V-statistics) between two cell sets."""
    from scipy.spatial.distance import cdist

    return float(2 * cdist(X, Y).mean() - cdist(X, X).mean() - cdist(Y, Y).mean())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def score(pred: np.ndarray, split: dict) -> dict:
    """All metrics of predicted cells ``pred`` (n_ctrl_T, n_genes; log1p CP10k) against the split's real cells."""
    ctrl, stim, de = split["ctrl_ln"], split["stim_ln"], split["de_idx"]
    pm, tm, cm = pred.mean(0), stim.mean(0), ctrl.mean(0)
    pd_, td = pm - cm, tm - cm
    dists = {u: float(np.linalg.norm(pd_ - d)) for u, d in split["all_deltas"].items()}
    own = dists[split["type"]]
    others = [d for u, d in dists.items() if u != split["type"]]
    pred_up = np.argsort(-pd_, kind="stable")[:N_DE]
    pred_wx = top_de(ctrl, pred, split["genes"])
    return {
        "r2_all": pearson(pm, tm) ** 2, "r2_deg": pearson(pm[de], tm[de]) ** 2,
        "delta_r_all": pearson(pd_, td), "delta_r_deg": pearson(pd_[de], td[de]),
        "deg_overlap": len(set(pred_up.tolist()) & set(split["up_idx"].tolist())) / N_DE,
        "deg_overlap_wilcoxon": len(set(pred_wx.tolist()) & set(de.tolist())) / len(de),
        "rank": float(np.mean([d < own for d in others])) if others else None,
        "energy": energy_distance(pred[:, de], stim[:, de]),
    }


# ------------------------------------------------------------------------------------------------ baselines
def type_means(adata, types: np.ndarray, cond: np.ndarray, ln: np.ndarray, donor: np.ndarray | None) -> dict:
    out = {}
    for t in np.unique(types):
        for c in (CTRL, STIM):
            m = (types == t) & (cond == c)
            if m.any():
                out[(t, c)] = ln[m].mean(0)
    return out


def ridge_delta(split: dict) -> tuple[np.ndarray, dict]:
    """Predicted delta of the held-out type from its control profile: ridge on pseudobulk pairs of training types."""
    from sklearn.linear_model import Ridge

    Xp, Dp, groups = split["pairs_ctrl"], split["pairs_delta"], split["pairs_type"]
    alphas = [10.0 ** k for k in range(-2, 6)]
    uniq = sorted(set(groups))
    cv = {}
    for a in alphas:
        err = []
        for g in uniq:
            tr, te = groups != g, groups == g
            if len(set(groups[tr])) < 2:
                continue
            m = Ridge(alpha=a).fit(Xp[tr], Dp[tr])
            err.append(float(((m.predict(Xp[te]) - Dp[te]) ** 2).mean()))
        cv[a] = float(np.mean(err)) if err else np.inf
    best = min(alphas, key=lambda a: (cv[a], -a))
    m = Ridge(alpha=best).fit(Xp, Dp)
    return m.predict(split["ctrl_ln"].mean(0, keepdims=True))[0], {"alpha": best, "n_pairs": int(len(Xp)),
                                                                    "cv_mse": {str(k): v for k, v in cv.items()}}


# ------------------------------------------------------------------------------------------------ splits
def make_splits(adata, info: dict) -> dict:
    """Per held-out type: the training AnnData, T's control and stimulated cells (log1p CP10k), DEGs, deltas."""
    types = adata.obs[CT].astype(str).to_numpy()
    cond = adata.obs[COND].astype(str).to_numpy()
    donor = adata.obs["donor"].astype(str).to_numpy() if info.get("batch_key") else None
    ln = lognorm(adata.X)
    tm = type_means(adata, types, cond, ln, donor)
    uniq = sorted(np.unique(types))
    all_deltas = {u: tm[(u, STIM)] - tm[(u, CTRL)] for u in uniq if (u, STIM) in tm and (u, CTRL) in tm}
    genes = np.asarray(adata.var_names).astype(str)
    splits = {}
    for t in uniq:
        held = (types == t) & (cond == STIM)
        ctrl_t = (types == t) & (cond == CTRL)
        train_types = [u for u in uniq if u != t and u in all_deltas]
        # pseudobulk pairs for the ridge baseline: (type, donor) where there are donors, else types
        px, pdl, pg = [], [], []
        for u in train_types:
            for d in (np.unique(donor) if donor is not None else [None]):
                mu = (types == u) & ((donor == d) if d is not None else True)
                mc, ms = mu & (cond == CTRL), mu & (cond == STIM)
                if mc.sum() >= 10 and ms.sum() >= 10:
                    px.append(ln[mc].mean(0))
                    pdl.append(ln[ms].mean(0) - ln[mc].mean(0))
                    pg.append(u)
        sp = {"type": t, "genes": genes, "train_mask": ~held, "ctrl_mask": ctrl_t,
              "ctrl_ln": ln[ctrl_t], "stim_ln": ln[held], "all_deltas": all_deltas,
              "shift": np.mean([all_deltas[u] for u in train_types], axis=0),
              "pairs_ctrl": np.asarray(px), "pairs_delta": np.asarray(pdl), "pairs_type": np.asarray(pg),
              "n_ctrl": int(ctrl_t.sum()), "n_stim": int(held.sum())}
        sp["de_idx"] = top_de(sp["ctrl_ln"], sp["stim_ln"], genes)
        sp["up_idx"] = np.argsort(-(sp["stim_ln"].mean(0) - sp["ctrl_ln"].mean(0)), kind="stable")[:N_DE]
        sp["top_de"] = [str(genes[i]) for i in sp["de_idx"][:10]]
        splits[t] = sp
    return splits


# ------------------------------------------------------------------------------------------------ methods
def run_cellvae(adata, split: dict, method: str, seed: int, batch_key: str | None) -> tuple[dict, dict]:
    """Train a CountVAE (cellvae defaults) on the split's training cells and predict T's stimulated cells."""
    import pandas as pd

    from cellvae import CountVAE
    from cellvae.analysis.perturb import predict_perturbation

    train = adata[split["train_mask"]].copy()
    kw = {"batch_key": batch_key} if batch_key else {}
    if method == "decoder_swap":
        kw["categorical_covariate_keys"] = [COND]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CountVAE(train, **kw)
        m.train(progress_bar=False, n_threads=1, seed=seed)
    train_s = time.perf_counter() - t0
    pred = predict_perturbation(m, adata[split["ctrl_mask"]].copy(), COND, CTRL, STIM, cell_type_key=CT,
                                cell_type=split["type"], method=method, seed=seed)
    info = {"train_s": round(train_s, 1), "epochs_run": len(m.history["epoch"]),
            "best_epoch": m.history.get("best_epoch"), "validation_elbo": float(m.history["validation_elbo"][-1]),
            "model_kwargs": kw}
    # The model leaves out genes with no count in any training cell (predict_perturbation returns the model's
    # genes): they are predicted as 0 counts, so the prediction has every gene of the split, in its order.
    pos = pd.Index(adata.var_names).get_indexer(pred.var_names)
    info["genes_not_modelled"] = int(adata.n_vars - len(pos))

    def full(x):
        out = np.zeros((x.shape[0], adata.n_vars), dtype=np.float32)
        out[:, pos] = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        return out

    return {"sampled": lognorm(full(pred.layers["counts"])), "expected": lognorm(full(pred.X))}, info


def run_peer(tool: str, adata, split: dict, seed: int, dataset: str, args) -> tuple[dict, dict]:
    """Write the split for a peer, run it in its own venv (subprocess) and read its predicted cells."""
    py = PEER_PY[tool]
    if not py.exists():
        raise RuntimeError(f"{tool}: no virtual environment at {py.parent.parent} (see perturbation_peers.py)")
    d = WORK / dataset / f"seed{seed}" / split["type"].replace("/", "_").replace(" ", "_")
    d.mkdir(parents=True, exist_ok=True)
    inp = d / "split.npz"
    if not inp.exists():
        tr = adata[split["train_mask"]]
        X = tr.X.toarray() if hasattr(tr.X, "toarray") else np.asarray(tr.X)
        tmp = d / "split.tmp.npz"
        np.savez_compressed(tmp, counts=X.astype(np.float32),  # str arrays (not object): loaded without pickle
                            condition=np.asarray(tr.obs[COND].astype(str).to_numpy(), dtype=str),
                            cell_type=np.asarray(tr.obs[CT].astype(str).to_numpy(), dtype=str),
                            obs_names=np.asarray(tr.obs_names).astype(str),
                            var_names=np.asarray(tr.var_names).astype(str), held_out=split["type"],
                            control=CTRL, perturbed=STIM)
        os.replace(tmp, inp)
    out = d / f"{tool}.npz"
    cmd = [str(py), str(ROOT / "benchmarks" / "perturbation_peers.py"), tool, str(inp), str(out),
           "--seed", str(seed)]
    if tool == "cpa":
        cmd += ["--cpa-max-epochs", str(args.cpa_max_epochs)]
    if tool == "scgen" and args.scgen_max_epochs:
        cmd += ["--scgen-max-epochs", str(args.scgen_max_epochs)]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.peer_timeout)
    (d / f"{tool}.log").write_text(p.stdout + "\n----- stderr -----\n" + p.stderr)
    if p.returncode != 0:
        tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{tool} exited with {p.returncode}: " + " | ".join(tail))
    z = np.load(out)
    info = json.loads(Path(str(out) + ".json").read_text())
    ctrl_names = np.asarray(adata.obs_names[split["ctrl_mask"]]).astype(str)
    if list(z["cells"].astype(str)) != list(ctrl_names):
        raise RuntimeError(f"{tool}: predicted cells are not the control cells of {split['type']} in order")
    X = z["X"].astype(np.float64)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    if "X_sampled" in z.files:  # CPA: counts drawn from its NB (primary) and its NB means
        return {"sampled": lognorm(z["X_sampled"]), "expected": lognorm(X)}, info
    return {"main": lognorm(X) if info["kind"] == "counts" else X}, info


# ------------------------------------------------------------------------------------------------ records
def _key(r: dict) -> tuple:
    return (r["dataset"], r["seed"], r["type"], r["method"], r["variant"])


def load_records(path: Path) -> list[dict]:
    """The records of ``path``, the last one per (dataset, seed, type, method, variant) (a rerun replaces an error)."""
    if not path.exists():
        return []
    last: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            last.pop(_key(r), None)
            last[_key(r)] = r
    return list(last.values())


def append_record(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run_dataset(name: str, args, records: list[dict], rec_path: Path) -> dict:
    adata, info = load_muscat() if name == "muscat" else load_harmony()
    splits = make_splits(adata, info)
    info["splits"] = {t: {"n_ctrl": s["n_ctrl"], "n_stim": s["n_stim"], "top_de": s["top_de"]}
                      for t, s in splits.items()}
    done = {_key(r) for r in records if r["metrics"] is not None}  # errors (e.g. a peer not installed) are retried
    types = [t for t in splits if not args.types or t in args.types]
    for seed in args.seeds:
        for i, t in enumerate(types):
            sp = splits[t]
            order = list(METHODS)
            k = (seed * len(types) + i) % len(TRAINED)
            trained = list(TRAINED[k:] + TRAINED[:k])  # rotate the trained methods' order
            order = [m for m in order if m not in TRAINED] + [m for m in trained if m in args.methods]
            for meth in order:
                variants = VARIANTS.get(meth, ("main",))
                if all((name, seed, t, meth, v) in done for v in variants):
                    continue
                t0 = time.perf_counter()
                extra: dict = {}
                try:
                    if meth == "no change":
                        preds = {"main": sp["ctrl_ln"]}
                    elif meth == "mean shift":
                        preds = {"main": sp["ctrl_ln"] + sp["shift"]}
                    elif meth == "ridge":
                        delta, extra = ridge_delta(sp)
                        preds = {"main": sp["ctrl_ln"] + delta}
                    elif meth.startswith("cellvae"):
                        preds, extra = run_cellvae(adata, sp, "latent_arithmetic" if meth == "cellvae LA"
                                                   else "decoder_swap", seed, info.get("batch_key"))
                    else:
                        preds, extra = run_peer(meth.lower(), adata, sp, seed, name, args)
                    err = None
                except Exception as e:  # a peer that cannot run is recorded with its error, not hidden
                    preds, err = {v: None for v in variants}, f"{type(e).__name__}: {e}"
                for v, pred in preds.items():
                    rec = {"dataset": name, "seed": seed, "type": t, "method": meth, "variant": v,
                           "commit": args.commit["commit"], "dirty_src": args.commit.get("dirty"),
                           "metrics": score(pred, sp) if pred is not None else None, "error": err,
                           "info": extra, "seconds": round(time.perf_counter() - t0, 1), "load1": loadavg(),
                           "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                    append_record(rec_path, rec)
                    records[:] = [r for r in records if _key(r) != _key(rec)] + [rec]
                    done.add(_key(rec))
                    m = rec["metrics"]
                    print(f"[{name} s{seed}] {t} | {meth} ({v}): " + (
                        " ".join(f"{kk} {vv:.3f}" for kk, vv in m.items() if vv is not None) if m else err)
                        + f" ({rec['seconds']} s, load {rec['load1']})", flush=True)
    return info


def repeat_check(args) -> dict:
    """Train cellvae LA twice on the same split with the same seed and compare the predictions bit for bit."""
    adata, info = load_muscat()
    splits = make_splits(adata, info)
    t = sorted(splits)[0]
    a, _ = run_cellvae(adata, splits[t], "latent_arithmetic", 0, "donor")
    b, _ = run_cellvae(adata, splits[t], "latent_arithmetic", 0, "donor")
    same = {v: bool(np.array_equal(a[v], b[v])) for v in a}
    return {"dataset": "muscat", "type": t, "seed": 0, "method": "cellvae LA", "identical": same,
            "max_abs_diff": {v: float(np.abs(a[v] - b[v]).max()) for v in a},
            "scores_first": score(a["sampled"], splits[t]), "scores_second": score(b["sampled"], splits[t])}


# ------------------------------------------------------------------------------------------------ report
def _rows(records, dataset, method, variant, metric, seeds=None):
    out = {}
    for r in records:
        if r["dataset"] == dataset and r["method"] == method and r["variant"] == variant and r["metrics"] \
                and (seeds is None or r["seed"] in seeds):
            out[(r["seed"], r["type"])] = r["metrics"][metric]
    return out


def _label(method: str, variant: str) -> str:
    return method + ("" if variant in ("main", "sampled") else f" ({variant})")


def summarize(records: list[dict]) -> dict:
    """Mean ± sd over (type, seed) of every metric, per dataset and method/variant; and per-type means."""
    summ: dict = {}
    for ds in sorted({r["dataset"] for r in records}):
        summ[ds] = {"overall": {}, "per_type": {}, "errors": {}}
        for meth in METHODS:
            for v in VARIANTS.get(meth, ("main",)):
                rs = [r for r in records if r["dataset"] == ds and r["method"] == meth and r["variant"] == v]
                if not rs:
                    continue
                ok = [r for r in rs if r["metrics"]]
                errs = sorted({r["error"] for r in rs if r["error"]})
                if errs:
                    summ[ds]["errors"][_label(meth, v)] = errs
                if not ok:
                    continue
                lab = _label(meth, v)
                summ[ds]["overall"][lab] = {m: mean_sd([r["metrics"][m] for r in ok]) for m in METRICS}
                summ[ds]["overall"][lab]["n"] = len(ok)
                for t in sorted({r["type"] for r in ok}):
                    summ[ds]["per_type"].setdefault(t, {})[lab] = {
                        m: mean_sd([r["metrics"][m] for r in ok if r["type"] == t]) for m in METRICS}
    return summ


def paired(records, dataset, a, b, metric) -> tuple:
    """Paired differences a - b over (seed, type) of a metric: (mean, 95 % CI half-width, n)."""
    ra = _rows(records, dataset, *a, metric)
    rb = _rows(records, dataset, *b, metric)
    keys = sorted(set(ra) & set(rb))
    return paired_t_ci([ra[k] - rb[k] for k in keys if ra[k] is not None and rb[k] is not None])


def _f(v, d=3):
    return "-" if v is None else f"{v:.{d}f}"


def _count_commits(records) -> dict:
    out: dict = {}
    for r in records:
        c = str(r.get("commit", "?")) + (" (src modified)" if r.get("dirty_src") else "")
        out[c] = out.get(c, 0) + 1
    return out


def write_report(records: list[dict], meta: dict) -> None:
    summ = summarize(records)
    summ = {ds: summ[ds] for ds in [*meta["datasets"], *summ] if ds in summ}
    L = ["# Perturbation prediction: Kang et al. 2018 IFN-beta PBMCs, each cell type held out in turn", "",
         f"commit {meta['git']['commit']}{' (uncommitted changes in src/ or benchmarks/)' if meta['git'].get('dirty') else ''}; "
         f"run {meta['started']} to {meta['finished']}; 1-minute load average {meta['load_start']} at the start, "
         f"{meta['load_end']} at the end (a shared 2-core machine: other benchmarks ran at the same time; times "
         f"are not comparable, quality is); {meta['machine']}.", "",
         "Commands (records of later invocations resume the same records file): "
         + "; ".join(f"`{c}`" for c in meta.get("commands", [meta["command"]])) + ". Records by commit: "
         + ", ".join(f"`{c}` {n}" for c, n in sorted(_count_commits(records).items())) + ".", "",
         "Versions: " + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
         "Design: every method sees all control cells and the stimulated cells of the other types and predicts the "
         "held-out type's stimulated cells from its control cells (one predicted cell per control cell); seeds "
         f"{', '.join(map(str, meta['seeds']))} (they change the training of cellvae, scGen and CPA; the baselines "
         "are deterministic). Metrics in log1p(counts per 10,000): *R²* = squared Pearson r of mean expression "
         "over genes (scGen's score); *Δr* = Pearson r of the predicted vs real change from control; *DEG* = the "
         "top-100 genes of scanpy's Wilcoxon test, stim vs ctrl of the held-out type, up in stim; *DEG overlap* = "
         "share of the real top-100 up-regulated genes (largest increase of mean expression) among the predicted top-100 "
         "(largest predicted increase); *rank* ↓ = normalized rank of "
         "the held-out type's real change among all types' real changes by distance to the predicted change (0 = "
         "its own response is the closest); *energy* ↓ = energy distance between predicted and real stimulated "
         "cells on the top-100 DEGs. Mean ± sd over held-out types x seeds. cellvae and CPA rows score counts "
         "sampled from each model's likelihood (cellvae `layers['counts']`; CPA: a draw from the NB of its "
         "prediction); *(expected)* rows score the expected counts without sampling noise (cellvae `X`, CPA's "
         "`CPA_pred`); scGen's prediction is its decoder output in log1p space (it has no likelihood to sample). Methods and settings: module docstrings of `benchmarks/perturbation.py` and "
         "`benchmarks/perturbation_peers.py`.", ""]
    for ds, s in summ.items():
        dinfo = meta["datasets"].get(ds, {})
        L += [f"## {dinfo.get('file', ds)}", "",
              f"{dinfo.get('n_cells')} cells x {dinfo.get('n_genes')} genes; types: {dinfo.get('types')}.", ""]
        if ds == "harmony" and dinfo.get("cluster_sizes"):
            L += ["Clusters (control / stimulated cells): " + "; ".join(
                f"{k}: {v['ctrl']} / {v['stim']}{'' if k in dinfo.get('kept', []) else ' (dropped)'}"
                for k, v in dinfo["cluster_sizes"].items()) + ".", ""]
        L += ["| method | " + " | ".join(METRIC_LABEL[m] for m in METRICS) + " | n |",
              "|---|" + "---|" * (len(METRICS) + 1)]
        best = {}
        for m in METRICS:
            vals = {lab: v[m][0] for lab, v in s["overall"].items() if v[m][0] is not None and lab != "no change"}
            if vals:
                best[m] = (min if m in LOWER_IS_BETTER else max)(vals, key=vals.get)
        for lab, v in s["overall"].items():
            cells = []
            for m in METRICS:
                mu, sd = v[m]
                txt = "-" if mu is None else f"{mu:.3f} ± {sd:.3f}"
                cells.append(f"**{txt}**" if best.get(m) == lab else txt)
            L.append(f"| {lab} | " + " | ".join(cells) + f" | {v['n']} |")
        for lab, errs in s["errors"].items():
            L += ["", f"**{lab} did not run**: " + "; ".join(f"`{e}`" for e in errs)]
        L += ["", "Bold: the best mean among the predictors (no change excluded).", ""]
        # paired differences of the best cellvae method against mean shift and scGen
        cv = [lab for lab in s["overall"] if lab in ("cellvae LA", "cellvae DS")]
        if cv:
            pick = max(cv, key=lambda lab: s["overall"][lab]["delta_r_deg"][0])
            cvk = (pick, "sampled")
            L += [f"Paired differences over (type, seed), best cellvae method by Δr DEG = **{pick}**, minus each "
                  "peer (mean and 95 % t interval; for rank and energy a negative difference favours cellvae):", "",
                  "| vs | " + " | ".join(METRIC_LABEL[m] for m in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
            for other in ("mean shift", "ridge", "scGen", "CPA"):
                if other not in s["overall"]:
                    continue
                cells = []
                for m in METRICS:
                    mu, hw, n = paired(records, ds, cvk, (other, "sampled" if other in VARIANTS else "main"), m)
                    cells.append("-" if mu is None else f"{mu:+.3f} ± {_f(hw)}")
                L.append(f"| {other} | " + " | ".join(cells) + " |")
            L.append("")
        # per type table (mean over seeds) of the key metrics
        L += ["Per held-out type (mean over seeds): Δr DEG / DEG overlap / energy", "",
              "| type | " + " | ".join(s["overall"]) + " |", "|---|" + "---|" * len(s["overall"])]
        for t, row in s["per_type"].items():
            sp = dinfo.get("splits", {}).get(t, {})
            cells = []
            for lab in s["overall"]:
                v = row.get(lab)
                cells.append("-" if v is None else
                             f"{_f(v['delta_r_deg'][0], 2)} / {_f(v['deg_overlap'][0], 2)} / {_f(v['energy'][0], 2)}")
            L.append(f"| {t} (ctrl {sp.get('n_ctrl')}, stim {sp.get('n_stim')}) | " + " | ".join(cells) + " |")
        L.append("")
        # training
        tr = {}
        for r in records:
            if r["dataset"] == ds and r["method"] in TRAINED and r["metrics"] and r["variant"] in ("main", "sampled"):
                tr.setdefault(r["method"], []).append(r["info"])
        if tr:
            L += ["Training (mean over runs): " + "; ".join(
                f"{m}: {np.mean([i.get('epochs_run') or 0 for i in v]):.0f} epochs, "
                f"{np.mean([i.get('train_s') or 0 for i in v]):.0f} s" for m, v in tr.items()) + ".", ""]
    if meta.get("repeat_check"):
        rc = meta["repeat_check"]
        L += ["## Reproducibility", "",
              f"cellvae LA trained twice with seed {rc['seed']} on the muscat split without {rc['type']}'s "
              f"stimulated cells, 1 thread: predictions identical bit for bit: {rc['identical']} (max abs "
              f"difference {rc['max_abs_diff']}).", ""]
    L += meta.get("notes", [])
    atomic_write_text(OUT.with_suffix(".md"), "\n".join(L) + "\n")
    atomic_write_text(OUT.with_suffix(".json"), json.dumps(
        {"meta": meta, "summary": summ, "records": records}, indent=1, default=str))


def versions() -> dict:
    v = {"cellvae": package_version("cellvae"), "torch": package_version("torch"),
         "scanpy": package_version("scanpy"), "anndata": package_version("anndata"),
         "scikit-learn": package_version("scikit-learn"), "python": sys.version.split()[0]}
    for tool, py in PEER_PY.items():
        if py.exists():
            dists = ("scgen", "scvi-tools", "torch") if tool == "scgen" else ("cpa-tools", "scvi-tools", "torch")
            code = "import importlib.metadata as m, platform, json; print(json.dumps([platform.python_version()] + " \
                   f"[m.version(d) for d in {list(dists)!r}]))"
            try:
                out = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                                                timeout=120).stdout)
                v[f".venv-{tool}"] = f"Python {out[0]}, " + ", ".join(f"{d} {x}" for d, x in zip(dists, out[1:]))
            except Exception as e:  # pragma: no cover
                v[f".venv-{tool}"] = f"not readable ({type(e).__name__})"
        else:
            v[f".venv-{tool}"] = "absent"
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--datasets", default="muscat,harmony")
    p.add_argument("--methods", default=",".join(TRAINED), help="trained methods to run (baselines always run)")
    p.add_argument("--types", default=None, help="comma-separated held-out types (smoke tests); default: all")
    p.add_argument("--resume", action="store_true", help="keep the records of an earlier run and skip them")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-repeat-check", action="store_true")
    p.add_argument("--cpa-max-epochs", type=int, default=2000)
    p.add_argument("--scgen-max-epochs", type=int, default=None)
    p.add_argument("--peer-timeout", type=int, default=3600)
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",")
    args.types = args.types.split(",") if args.types else None
    args.commit = git_commit("src")
    rec_path = WORK / "records.jsonl"
    meta_path = WORK / "meta.json"
    if args.report_only:
        write_report(load_records(rec_path), json.loads(meta_path.read_text()))
        print(OUT.with_suffix(".md").read_text())
        return
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if not args.resume and rec_path.exists():
        rec_path.rename(rec_path.with_suffix(f".{int(time.time())}.bak"))
    records = load_records(rec_path)
    old = json.loads(meta_path.read_text()) if (args.resume and meta_path.exists()) else {}
    meta = {"git": args.commit, "started": old.get("started") or datetime.now(timezone.utc).isoformat(
        timespec="minutes"), "load_start": old.get("load_start") or loadavg(), "machine": machine_description(),
        "command": "benchmarks/perturbation.py " + " ".join(sys.argv[1:]), "seeds": args.seeds,
        "commands": old.get("commands", []) + ["benchmarks/perturbation.py " + " ".join(sys.argv[1:])],
        "versions": versions(), "datasets": old.get("datasets", {}), "notes": old.get("notes", []),
        "repeat_check": old.get("repeat_check"), "cpa_max_epochs": args.cpa_max_epochs,
        "src_modified_at_start": subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"],
                                                capture_output=True, text=True).stdout.split("\n")}
    for ds in args.datasets.split(","):
        meta["datasets"][ds] = run_dataset(ds, args, records, rec_path)
        meta["finished"], meta["load_end"] = datetime.now(timezone.utc).isoformat(timespec="minutes"), loadavg()
        atomic_write_text(meta_path, json.dumps(meta, indent=1, default=str))
        write_report(records, meta)
    if not args.no_repeat_check and not meta.get("repeat_check"):
        meta["repeat_check"] = repeat_check(args)
    meta["finished"], meta["load_end"] = datetime.now(timezone.utc).isoformat(timespec="minutes"), loadavg()
    atomic_write_text(meta_path, json.dumps(meta, indent=1, default=str))
    write_report(records, meta)
    print(OUT.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
