"""Perturbation prediction (:mod:`cellvae.perturb`) on Kang et al. 2018 IFN-beta PBMCs, scGen's benchmark design.

Leave-one-cell-type-out on ``kang2018_ifnb_pbmc_muscat.h5ad`` (1556 cells x 1267 genes, 5 cell types, ctrl/stim,
2 donors): for each cell type T, the stimulated cells of T are removed from training; two CountVAEs (defaults,
``batch_key='donor'``, ``--epochs`` epochs, seed 0, 1 thread) are trained on the rest:

- ``latent_arithmetic``: the model without the condition as a covariate (as scGen); ``delta`` = unweighted mean
  over the other 4 cell types of (mean latent of stim - mean latent of ctrl);
- ``decoder_swap``: the model with ``categorical_covariate_keys=['condition']``; T's control cells are encoded and
  decoded with the ``stim`` code.

T's control cells are then predicted as stimulated and compared with T's real stimulated cells. Score (as scGen,
Lotfollahi et al. 2019, Nat. Methods 16:715, Fig. 2): R^2 = squared Pearson r, over genes, between the predicted and
the observed mean expression, where expression is log1p of counts per 10,000 (scanpy ``normalize_total`` +
``log1p``) averaged over cells; over all genes and over the top-100 genes of scanpy
``rank_genes_groups(method='wilcoxon')`` stim vs ctrl on T's real cells (ranked by score, i.e. up in stim, as
scGen). Predictions are scored on ``layers['counts']`` (counts sampled from the model's likelihood, normalized like
real counts), and also on ``X`` (expected counts, no sampling noise). Baselines computed in the same run:

- ``no change``: predicted = T's real control cells;
- ``mean shift``: T's control mean plus the unweighted mean over the other cell types of (stim mean - ctrl mean),
  in log1p-normalized space.

Unlabelled ``kang2018_ifnb_pbmc_harmony2k.h5ad`` (2000 cells x 9015 genes): a random half (seed 0) of the stim
cells is held out; models are trained on all ctrl cells + the other stim half (2000 seurat_v3 HVGs selected on those
training cells, no batch key); all ctrl cells are predicted as stim and compared with the held-out stim half
(latent arithmetic: ``delta`` = global mean difference). Here ``mean shift`` equals the training stim half's mean,
a near-oracle (same cell population), so it is an upper bound of what a predictor can reach, not a baseline to beat.

Results: ``benchmarks/results/perturbation.{md,json}``.

    .venv/bin/python benchmarks/perturbation.py [--epochs 150] [--datasets muscat,harmony] [--encode-covariates]
    .venv/bin/python benchmarks/perturbation.py --report-only benchmarks/results/perturbation.json   # Markdown only
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

import cellvae  # noqa: E402
from cellvae import CountVAE  # noqa: E402
from cellvae.analysis.perturb import predict_perturbation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CELLVAE_DATA_DIR") or ROOT.parent / "shared" / "data")
COND, CTRL, STIM, CT = "condition", "ctrl", "stim", "cell_type"
N_DE = 100
BASELINES = ("no change", "mean shift")


# ------------------------------------------------------------------------------------------------ scoring
def lognorm_mean(X) -> np.ndarray:
    """Mean over cells of log1p(counts per 10,000), (n_genes,) float64."""
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    tot = X.sum(1, keepdims=True)
    tot[tot == 0] = 1.0
    return np.log1p(X / tot * 1e4).mean(0)


def r2(pred: np.ndarray, obs: np.ndarray) -> float:
    """Squared Pearson correlation (scGen's R^2 of a linear fit of observed on predicted means)."""
    return float(np.corrcoef(pred, obs)[0, 1] ** 2)


def top_de(ctrl: ad.AnnData, stim: ad.AnnData, n: int = N_DE) -> list[str]:
    """Top-n genes of scanpy's Wilcoxon test stim vs ctrl on log1p(counts per 10k), ranked by score (up in stim)."""
    import scanpy as sc

    a = ad.concat([ctrl, stim], index_unique="-")
    b = ad.AnnData(a.X.copy(), obs=a.obs[[COND]].copy())
    b.var_names = ctrl.var_names
    b.obs[COND] = b.obs[COND].astype(str).astype("category")
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.tl.rank_genes_groups(b, COND, groups=[STIM], reference=CTRL, method="wilcoxon", n_genes=n)
    return [str(g) for g in b.uns["rank_genes_groups"]["names"][STIM][:n]]


def scores(pred_mean: np.ndarray, obs_mean: np.ndarray, de_idx: np.ndarray) -> dict:
    return {"r2_all": r2(pred_mean, obs_mean), "r2_top100_de": r2(pred_mean[de_idx], obs_mean[de_idx])}


# ------------------------------------------------------------------------------------------------ models
def fit(adata: ad.AnnData, epochs: int, seed: int, **kw) -> tuple[CountVAE, dict]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CountVAE(adata, **kw)
        m.train(max_epochs=epochs, progress_bar=False, n_threads=1, seed=seed)
    return m, {"train_s": round(time.perf_counter() - t0, 1), "epochs_run": len(m.history["epoch"]),
               "validation_elbo": float(m.history["validation_elbo"][-1])}


def predict_scores(model, ctrl, method, obs_mean, de_idx, seed, **kw) -> dict:
    pred = predict_perturbation(model, ctrl, COND, CTRL, STIM, method=method, seed=seed, **kw)
    out = {"sampled": scores(lognorm_mean(pred.layers["counts"]), obs_mean, de_idx),
           "expected": scores(lognorm_mean(pred.X), obs_mean, de_idx)}
    return out


# ------------------------------------------------------------------------------------------------ datasets
def run_muscat(args) -> dict:
    adata = ad.read_h5ad(DATA / "kang2018_ifnb_pbmc_muscat.h5ad")
    ct = adata.obs[CT].astype(str).to_numpy()
    cond = adata.obs[COND].astype(str).to_numpy()
    types = sorted(np.unique(ct))
    means = {(t, c): lognorm_mean(adata[(ct == t) & (cond == c)].X) for t in types for c in (CTRL, STIM)}
    genes = adata.var_names
    res = {"dataset": "kang2018_ifnb_pbmc_muscat", "n_cells": adata.n_obs, "n_genes": adata.n_vars,
           "cell_types": {}}
    for t in types:
        t0 = time.perf_counter()
        held = (ct == t) & (cond == STIM)
        train = adata[~held].copy()
        ctrl_t, stim_t = adata[(ct == t) & (cond == CTRL)], adata[held]
        de = top_de(ctrl_t, stim_t)
        de_idx = genes.get_indexer(de)
        obs_mean = means[(t, STIM)]
        shift = np.mean([means[(u, STIM)] - means[(u, CTRL)] for u in types if u != t], axis=0)
        row: dict = {"n_ctrl": int(ctrl_t.n_obs), "n_stim": int(stim_t.n_obs), "top_de": de[:10], "methods": {}}
        row["methods"]["no change"] = {"sampled": scores(means[(t, CTRL)], obs_mean, de_idx)}
        row["methods"]["mean shift"] = {"sampled": scores(means[(t, CTRL)] + shift, obs_mean, de_idx)}
        m_la, info_la = fit(train, args.epochs, args.seed, batch_key="donor")
        row["methods"]["latent_arithmetic"] = predict_scores(
            m_la, ctrl_t, "latent_arithmetic", obs_mean, de_idx, args.seed, cell_type_key=CT, cell_type=t)
        row["methods"]["latent_arithmetic"]["train"] = info_la
        m_ds, info_ds = fit(train, args.epochs, args.seed, batch_key="donor", categorical_covariate_keys=[COND],
                            encode_covariates=args.encode_covariates)
        row["methods"]["decoder_swap"] = predict_scores(
            m_ds, ctrl_t, "decoder_swap", obs_mean, de_idx, args.seed, cell_type_key=CT, cell_type=t)
        row["methods"]["decoder_swap"]["train"] = info_ds
        row["seconds"] = round(time.perf_counter() - t0, 1)
        res["cell_types"][t] = row
        print(f"[muscat] {t}: " + ", ".join(
            f"{k} {v['sampled']['r2_all']:.3f}/{v['sampled']['r2_top100_de']:.3f}" for k, v in row["methods"].items())
            + f"  ({row['seconds']} s)", flush=True)
    res["average"] = _average(res["cell_types"])
    return res


def run_harmony(args) -> dict:
    import scanpy as sc

    adata = ad.read_h5ad(DATA / "kang2018_ifnb_pbmc_harmony2k.h5ad")
    cond = adata.obs[COND].astype(str).to_numpy()
    rng = np.random.default_rng(args.seed)
    stim = np.flatnonzero(cond == STIM)
    held = np.sort(rng.choice(stim, size=len(stim) // 2, replace=False))
    is_held = np.zeros(adata.n_obs, bool)
    is_held[held] = True
    train = adata[~is_held].copy()
    hv = sc.pp.highly_variable_genes(train, flavor="seurat_v3", n_top_genes=2000, inplace=False)
    keep = np.asarray(hv["highly_variable"], bool)
    adata = adata[:, keep].copy()
    train = adata[~is_held].copy()
    ctrl, stim_h = adata[cond == CTRL], adata[is_held]
    stim_tr = adata[(cond == STIM) & ~is_held]
    de = top_de(ctrl, stim_h)
    de_idx = adata.var_names.get_indexer(de)
    obs_mean, ctrl_mean = lognorm_mean(stim_h.X), lognorm_mean(ctrl.X)
    res = {"dataset": "kang2018_ifnb_pbmc_harmony2k", "n_cells": adata.n_obs, "n_genes_hvg": int(keep.sum()),
           "n_ctrl": int(ctrl.n_obs), "n_stim_train": int(stim_tr.n_obs), "n_stim_heldout": int(stim_h.n_obs),
           "top_de": de[:10], "methods": {}}
    res["methods"]["no change"] = {"sampled": scores(ctrl_mean, obs_mean, de_idx)}
    res["methods"]["mean shift"] = {
        "sampled": scores(ctrl_mean + (lognorm_mean(stim_tr.X) - ctrl_mean), obs_mean, de_idx)}
    m_la, info_la = fit(train, args.epochs, args.seed)
    res["methods"]["latent_arithmetic"] = predict_scores(m_la, ctrl, "latent_arithmetic", obs_mean, de_idx, args.seed)
    res["methods"]["latent_arithmetic"]["train"] = info_la
    m_ds, info_ds = fit(train, args.epochs, args.seed, categorical_covariate_keys=[COND],
                        encode_covariates=args.encode_covariates)
    res["methods"]["decoder_swap"] = predict_scores(m_ds, ctrl, "decoder_swap", obs_mean, de_idx, args.seed)
    res["methods"]["decoder_swap"]["train"] = info_ds
    print("[harmony] " + ", ".join(
        f"{k} {v['sampled']['r2_all']:.3f}/{v['sampled']['r2_top100_de']:.3f}" for k, v in res["methods"].items()),
        flush=True)
    return res


def _average(rows: dict) -> dict:
    out: dict = {}
    first = next(iter(rows.values()))
    for meth, v in first["methods"].items():
        out[meth] = {}
        for kind in ("sampled", "expected"):
            if kind not in v:
                continue
            out[meth][kind] = {s: float(np.mean([r["methods"][meth][kind][s] for r in rows.values()]))
                               for s in ("r2_all", "r2_top100_de")}
    return out


# ------------------------------------------------------------------------------------------------ tools
def check_tool(name: str) -> str:
    """Whether ``pip download --no-deps NAME`` succeeds (availability only; nothing is installed)."""
    with tempfile.TemporaryDirectory() as d:
        try:
            p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", name, "-d", d],
                               capture_output=True, text=True, timeout=120)
        except Exception as e:  # pragma: no cover - network
            return f"not checked ({type(e).__name__})"
        files = os.listdir(d)
        if p.returncode == 0 and files:
            return f"available on PyPI ({files[0]}), not installed"
        return "not downloadable: " + (p.stderr.strip().splitlines() or ["?"])[-1][:120]


# ------------------------------------------------------------------------------------------------ report
def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}"


def _rows(methods: dict, best_model: str | None = None):
    for meth in ("no change", "mean shift", "latent_arithmetic", "decoder_swap"):
        v = methods[meth]
        s, e = v["sampled"], v.get("expected", {})
        yield meth, s["r2_all"], s["r2_top100_de"], e.get("r2_all"), e.get("r2_top100_de")


def _n_beats(rows: dict, meth: str, baseline: str = "mean shift") -> int:
    key = "r2_top100_de"
    return sum(r["methods"][meth]["sampled"][key] > r["methods"][baseline]["sampled"][key] for r in rows.values())


def write_report(res: dict, args, out: Path) -> None:
    lines = ["# Perturbation prediction: Kang et al. 2018 IFN-beta PBMCs", "",
             f"`benchmarks/perturbation.py --epochs {args.epochs}`"
             + (" --encode-covariates" if args.encode_covariates else "")
             + f"; cellvae {cellvae.__version__}, torch {torch.__version__}, 1 thread, seed {args.seed}; "
             f"{platform.machine()}, Python {platform.python_version()}; total {res['total_s']:.0f} s.", "",
             "R^2 = squared Pearson r over genes between predicted and observed mean log1p(counts per 10k) of the "
             "held-out stimulated cells (scGen, Lotfollahi et al. 2019, Fig. 2). *top-100 DE*: the 100 genes "
             "ranked highest by scanpy `rank_genes_groups(method='wilcoxon')` stim vs ctrl on the real cells "
             "(up in stim). *sampled*: the prediction's `layers['counts']` (counts drawn from the model's likelihood, "
             "normalized like real counts; the primary score). *expected*: the prediction's `X` (expected counts "
             "rho x library size, no sampling noise). Baselines: *no change* = the real control cells; *mean shift* "
             "= control mean + average (over the other cell types) stim-minus-ctrl difference of means in "
             "log1p-normalized space.", "",
             "Tools: " + "; ".join(f"`{k}` {v}" for k, v in res.get("tools", {}).items())
             + ". Neither was run here (not installed in `.venv`); no scGen numbers are reported.", ""]
    if "muscat" in res:
        m = res["muscat"]
        lines += ["## kang2018_ifnb_pbmc_muscat: leave one cell type's stimulated cells out", "",
                  f"{m['n_cells']} cells x {m['n_genes']} genes; per held-out type T, CountVAE (zinb, "
                  f"`batch_key='donor'`, {args.epochs} max epochs, early stopping) trained on all cells except T's "
                  "stimulated cells; T's control cells predicted. *latent_arithmetic*: model without the condition "
                  "covariate, delta = unweighted mean over the 4 other cell types of their stim-minus-ctrl mean "
                  "latent codes. *decoder_swap*: model with `categorical_covariate_keys=['condition']`"
                  + (", `encode_covariates=True`" if args.encode_covariates else "") + ".", "",
                  "| held-out cell type | method | R^2 all genes | R^2 top-100 DE | R^2 all (expected) | "
                  "R^2 top-100 DE (expected) |", "|---|---|---|---|---|---|"]
        for t, row in m["cell_types"].items():
            for meth, a, b, c, d in _rows(row["methods"]):
                lines.append(f"| {t} (ctrl {row['n_ctrl']}, stim {row['n_stim']}) | {meth} | {_fmt(a)} | "
                             f"{_fmt(b)} | {_fmt(c)} | {_fmt(d)} |")
        for meth, a, b, c, d in _rows(m["average"]):
            lines.append(f"| **average** | {meth} | **{_fmt(a)}** | **{_fmt(b)}** | {_fmt(c)} | {_fmt(d)} |")
        avg = m["average"]
        best = max(("latent_arithmetic", "decoder_swap"), key=lambda k: avg[k]["sampled"]["r2_top100_de"])
        base = max(avg[b]["sampled"]["r2_top100_de"] for b in BASELINES)
        lines += ["", f"Best cellvae method on average top-100-DE R^2 (sampled): **{best}** "
                  f"({avg[best]['sampled']['r2_top100_de']:.3f}) vs best baseline {base:.3f}: goal "
                  f"{'met' if avg[best]['sampled']['r2_top100_de'] > base else 'NOT met'}. Held-out cell types "
                  "where each method beats the mean-shift baseline on top-100-DE R^2 (sampled): " + ", ".join(
                      f"{k} {_n_beats(m['cell_types'], k)}/{len(m['cell_types'])}"
                      for k in ("latent_arithmetic", "decoder_swap")) + ".", "",
                  "The *expected* columns score lower on all genes than the *sampled* ones: the mean of "
                  "log1p(normalized counts) over cells is below log1p of the expected value (Jensen's inequality), "
                  "most for lowly expressed genes, so decoding expected values overestimates them; sampling counts "
                  "from the likelihood reproduces that gap, which is why the sampled counts are the primary score.",
                  "",
                  "Training: " + "; ".join(
                      f"{t}: LA {r['methods']['latent_arithmetic']['train']['epochs_run']} ep "
                      f"{r['methods']['latent_arithmetic']['train']['train_s']} s, DS "
                      f"{r['methods']['decoder_swap']['train']['epochs_run']} ep "
                      f"{r['methods']['decoder_swap']['train']['train_s']} s" for t, r in m["cell_types"].items()), ""]
    if "harmony" in res:
        h = res["harmony"]
        lines += ["## kang2018_ifnb_pbmc_harmony2k: random half of the stimulated cells held out (no cell types)", "",
                  f"{h['n_cells']} cells, {h['n_genes_hvg']} seurat_v3 HVGs chosen on the training cells; trained on "
                  f"{h['n_ctrl']} ctrl + {h['n_stim_train']} stim cells (no batch key), the {h['n_ctrl']} ctrl cells "
                  f"predicted and compared with the {h['n_stim_heldout']} held-out stim cells. latent_arithmetic: "
                  "delta = global mean difference. *mean shift* here equals the mean of the training stim half (the "
                  "same cell population as the held-out half): a near-oracle upper bound, not a baseline to beat.",
                  "", "| method | R^2 all genes | R^2 top-100 DE | R^2 all (expected) | R^2 top-100 DE (expected) |",
                  "|---|---|---|---|---|"]
        for meth, a, b, c, d in _rows(h["methods"]):
            lines.append(f"| {meth} | {_fmt(a)} | {_fmt(b)} | {_fmt(c)} | {_fmt(d)} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", default="muscat,harmony")
    p.add_argument("--encode-covariates", action="store_true",
                   help="decoder_swap model: inject the covariates (condition, donor) into the encoder too")
    p.add_argument("--no-tool-check", action="store_true", help="skip the pip availability check of scgen/pertpy")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "perturbation"))
    p.add_argument("--report-only", metavar="JSON", help="re-write the Markdown report from a results JSON")
    args = p.parse_args()
    if args.report_only:
        res = json.loads(Path(args.report_only).read_text())
        saved = argparse.Namespace(**{**vars(args), **res["args"]})
        write_report(res, saved, Path(args.out))
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    res: dict = {"args": vars(args)}
    if not args.no_tool_check:
        res["tools"] = {name: check_tool(name) for name in ("scgen", "pertpy")}
    ds = args.datasets.split(",")
    if "muscat" in ds:
        res["muscat"] = run_muscat(args)
    if "harmony" in ds:
        res["harmony"] = run_harmony(args)
    res["total_s"] = time.perf_counter() - t0
    write_report(res, args, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
