#!/usr/bin/env python
"""Imputation of hidden counts (issue 4): cellvae ``CountVAE`` vs scvi-tools ``SCVI``, scVI paper protocol.

Protocol (Lopez et al., *Nat. Methods* 15:1053, 2018, section "Imputation", uniform corruption):

- Per dataset and seed, 10 % (``--fraction``) of the **non-zero** entries of the raw count matrix are drawn
  uniformly at random without replacement (``numpy.random.default_rng(seed)``) and set to 0. Genes and cells left
  without any count by the corruption are removed (both tools would treat them differently otherwise: cellvae
  drops them, scvi-tools keeps them); hidden entries in them are not scored (their number is reported).
- Each model is trained on the corrupted matrix (all cells, no validation split: the hidden entries are the held-
  out part), same architecture for both (n_hidden 128, n_latent 10, n_layers 1, ZINB, gene-wise dispersion,
  observed library size), batch size 128, ``--epochs`` epochs, no early stopping, training seed = the seed.
- Imputed value of a hidden entry (cell n, gene g) = the mean of the model's NB count distribution,
  ``rho_ng * l_n``, where ``rho`` is the normalized expression (``model.get_normalized_expression(adata,
  library_size=1, n_samples=S)``, averaged over S = ``--n-samples`` draws of z from q(z | x); the same call on
  both tools) and ``l_n`` is the cell's library size as the model uses it: its observed total count **in the
  corrupted data** (both tools, ``use_observed_lib_size=True``). This equals ``get_normalized_expression(
  library_size="latent")`` in both tools ("latent" = the model's own library size, which for an observed library
  is the observed corrupted total): the child process checks the two agree on the hidden entries (same z draws).
- Error: |imputed - true hidden count| over the hidden entries; the median (the paper's metric) and the mean.
  Also reported: the ZINB mean ``(1 - pi_ng) rho_ng l_n`` (averaged over the same number of z draws), which
  neither public API returns for cellvae (scvi-tools' ``get_likelihood_parameters`` only gives the *separate*
  sample means of mu and pi); it is computed for both tools from the fitted module's own forward pass
  (``module.inference`` / ``module.generative`` in cellvae; ``module.forward`` in scvi-tools, as in its
  ``get_normalized_expression``), with the distribution's ``.mean``; and the NB mean at each API's default
  ``n_samples=1`` (cellvae decodes the posterior mean of z, scvi-tools one random draw of z).
- Variants: ``scvi`` (scvi-tools defaults: KL warm-up 400 epochs, so weight (epochs-1)/400 in the last epoch of a
  100-epoch run), ``cellvae`` (cellvae defaults: warm-up over ``min(400, epochs // 2)`` epochs), ``cellvae_kl400``
  (cellvae with ``n_epochs_kl_warmup=400``, scvi-tools' schedule; skipped when equal to cellvae's default).
- Baselines (no model, same hidden entries): ``gene mean x library``: ``l_n * sum_m x_mg / sum_m l_m`` on the
  corrupted counts (the gene's pooled share of counts, scaled to the cell's corrupted library: a rank-1 Poisson
  fit); ``zero``: impute 0 (the corrupted value itself; median L1 = median hidden count).

Every training + evaluation runs in a fresh child process (multiprocessing 'spawn'), one at a time, with
``--threads`` torch / BLAS / OpenMP threads (1 by default). Usage (repository root, ``.venv-bench``)::

    .venv-bench/bin/python benchmarks/imputation.py                                  # 3 datasets x 3 seeds
    .venv-bench/bin/python benchmarks/imputation.py --datasets zeisel2015_cortex_subset_1464cells \\
        --seeds 0 --epochs 2 --out /tmp/imp.md --json /tmp/imp.json                   # smoke test
    .venv-bench/bin/python benchmarks/imputation.py --resume                         # continue a run
    .venv-bench/bin/python benchmarks/imputation.py --render-only                    # Markdown from the JSON

Writes the Markdown report to ``--out`` and raw rows to ``--json`` (both rewritten after every dataset).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, for _common
from _common import (  # noqa: E402
    loadavg,
    REPO_ROOT,
    atomic_write_text,
    cap_loaded_threads,
    default_data_dir,
    fmt_mean_sd,
    import_tool,
    limit_threads,
    load_dataset,
    machine_description,
    mean_sd,
    package_version,
    parse_dataset_spec,
)
from vs_scvi import ARCH, BATCH_SIZE, SCVI_DEFAULT_KL_WARMUP  # noqa: E402  (the same settings as vs_scvi.py)

DEFAULT_DATASETS = ["pbmc4k_10x_top2000genes", "zeisel2015_cortex_subset_1464cells",
                    "cbmc_citeseq_rna_top2000genes"]
VARIANTS = ("scvi", "cellvae", "cellvae_kl400")
MODEL_LABEL = {
    "scvi": "scvi-tools SCVI (defaults)",
    "cellvae": "cellvae CountVAE (defaults)",
    "cellvae_kl400": "cellvae CountVAE, n_epochs_kl_warmup=400",
    "baseline_genemean": "baseline: gene mean × library",
    "baseline_zero": "baseline: zero",
}
BASELINES = ("baseline_genemean", "baseline_zero")
RESULTS = REPO_ROOT / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Imputation benchmark (scVI paper protocol): hide a fraction of the non-zero counts, train "
                    "cellvae CountVAE and scvi-tools SCVI on the corrupted matrix, report the median / mean "
                    "absolute error of the imputed NB mean rho*l on the hidden entries, with baselines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS,
                   help="dataset names (file stem in --data-dir); NAME:LABEL_KEY accepted (labels are unused)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="each seed sets the corruption and the training seed of every model")
    p.add_argument("--epochs", type=int, default=100, help="training epochs, the same for every model")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of the non-zero entries hidden")
    p.add_argument("--n-samples", type=int, default=25,
                   help="z draws from q(z|x) averaged for the imputed value (same for both tools)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="models to train (cellvae_kl400 is skipped when cellvae's default warm-up is already 400)")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="folder with the .h5ad files (env CELLVAE_DATA_DIR overrides the default)")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS / OpenMP threads (parent and children)")
    p.add_argument("--out", default=str(RESULTS / "imputation.md"), help="Markdown report")
    p.add_argument("--json", default=str(RESULTS / "imputation.json"), help="raw per-run rows")
    p.add_argument("--note", action="append", default=[],
                   help="a line added to the report's notes (repeatable), e.g. which cellvae source was used")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite --out from the rows and settings in --json, without running anything")
    p.add_argument("--resume", action="store_true",
                   help="keep successful rows already in --json and skip their (model, dataset, seed) runs")
    args = p.parse_args(argv)
    if not 0.0 < args.fraction < 1.0:
        p.error("--fraction must be in (0, 1)")
    if args.epochs < 1 or args.n_samples < 1:
        p.error("--epochs and --n-samples must be >= 1")
    return args


def cellvae_default_warmup(epochs: int) -> int:
    """cellvae's default n_epochs_kl_warmup (``cellvae.train.TrainingPlan.warmup_epochs``)."""
    return max(1, min(400, epochs // 2))


def active_variants(variants, epochs: int) -> list[str]:
    out = list(variants)
    if "cellvae_kl400" in out and "cellvae" in out and cellvae_default_warmup(epochs) == SCVI_DEFAULT_KL_WARMUP:
        out.remove("cellvae_kl400")  # identical to the default run
    return out


# ----------------------------------------------------------------------------- corruption and scoring
def corrupt(X, fraction: float, seed: int):
    """Hide ``round(fraction * nnz)`` non-zero entries of ``X`` chosen uniformly without replacement.

    Returns (corrupted CSR float32 matrix without explicit zeros, rows, cols, true values) of the hidden entries,
    sorted by (row, col).
    """
    import numpy as np
    import scipy.sparse as sp

    Xc = sp.csr_matrix(X, dtype=np.float32, copy=True)
    Xc.sum_duplicates()
    Xc.eliminate_zeros()
    nnz = Xc.nnz
    k = int(round(fraction * nnz))
    idx = np.sort(np.random.default_rng(seed).choice(nnz, size=k, replace=False))
    rows = np.repeat(np.arange(Xc.shape[0]), np.diff(Xc.indptr))[idx]
    cols = Xc.indices[idx].astype(np.int64)
    vals = Xc.data[idx].astype(np.float64)
    Xc.data[idx] = 0.0
    Xc.eliminate_zeros()
    return Xc, rows.astype(np.int64), cols, vals


def drop_empty(Xc, rows, cols, vals):
    """Remove genes and cells without counts in the corrupted matrix; re-index the hidden entries kept.

    Returns (matrix, rows, cols, vals, kept cell positions, kept gene positions, number of hidden entries dropped).
    """
    import numpy as np

    gene_ok = np.asarray(Xc.sum(0)).ravel() > 0
    cell_ok = np.asarray(Xc[:, gene_ok].sum(1)).ravel() > 0
    keep = gene_ok[cols] & cell_ok[rows]
    new_row = np.cumsum(cell_ok) - 1
    new_col = np.cumsum(gene_ok) - 1
    X2 = Xc[np.flatnonzero(cell_ok)][:, np.flatnonzero(gene_ok)].tocsr()
    return (X2, new_row[rows[keep]], new_col[cols[keep]], vals[keep], np.flatnonzero(cell_ok),
            np.flatnonzero(gene_ok), int((~keep).sum()))


def gene_mean_baseline(Xc, rows, cols):
    """``l_n * sum_m x_mg / sum_m l_m`` at the hidden entries (corrupted counts and library sizes)."""
    import numpy as np

    lib = np.asarray(Xc.sum(1), dtype=np.float64).ravel()
    share = np.asarray(Xc.sum(0), dtype=np.float64).ravel() / lib.sum()
    return lib[rows] * share[cols]


def l1_scores(imputed, true) -> dict:
    """Median and mean |imputed - true| and the mean signed error (imputed - true)."""
    import numpy as np

    imputed = np.asarray(imputed, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    d = imputed - true
    return {"median_l1": float(np.median(np.abs(d))), "mean_l1": float(np.mean(np.abs(d))),
            "mean_signed_error": float(d.mean())}


# ----------------------------------------------------------------------------- child process
def _child(task: dict) -> dict:
    """Train one model on the corrupted data and return its imputed values at the hidden entries."""
    import warnings

    cap_loaded_threads(task["threads"])
    tool = "scvi" if task["variant"] == "scvi" else "cellvae"
    mod, version = import_tool(tool)
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(task["h5ad"])
    hid = np.load(task["hidden"])
    rows, cols = hid["rows"], hid["cols"]
    lib = np.asarray(adata.X.sum(1), dtype=np.float64).ravel()  # corrupted library sizes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = _run_scvi if tool == "scvi" else _run_cellvae
        out = fn(mod, task, adata, rows, cols, lib)
    out["tool_version"] = version
    out["tool_path"] = str(Path(mod.__file__).resolve().parent)
    msgs = list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught))
    out["warnings"] = msgs[:8]
    return out


def _latent_check(nb, latent) -> float:
    """Largest |rho*l - latent| relative to the largest imputed value (0 up to float rounding)."""
    import numpy as np

    return float(np.max(np.abs(nb - latent)) / max(float(np.max(np.abs(nb))), 1e-12))


def _run_scvi(scvi, task, adata, rows, cols, lib) -> dict:
    import numpy as np
    import torch

    seed, S = task["seed"], task["n_samples"]
    scvi.settings.seed = seed
    torch.set_num_threads(task["threads"])
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, **ARCH)
    t0 = time.perf_counter()
    model.train(max_epochs=task["epochs"], train_size=1.0, batch_size=BATCH_SIZE, early_stopping=False,
                accelerator="cpu", enable_progress_bar=False)
    secs = time.perf_counter() - t0
    assert len(model.train_indices) == adata.n_obs, "scvi-tools did not train on all cells"
    hist = model.history or {}
    kl_last = float(hist["kl_weight"].iloc[-1, 0]) if "kl_weight" in hist else None
    elbo_last = float(hist["elbo_train"].iloc[-1, 0]) if "elbo_train" in hist else None

    t1 = time.perf_counter()
    nb, lat, nb1 = _api_means(model, adata, S, rows, cols, lib, seed, n1_seed=seed + 2000, return_mean=True)
    torch.manual_seed(seed + 1000)
    nb_int, zinb = _scvi_module_means(model, adata, S, rows, cols)
    return {
        "train_seconds": secs, "epochs": len(hist["elbo_train"]) if "elbo_train" in hist else task["epochs"],
        "kl_weight_final": kl_last, "kl_warmup_epochs": SCVI_DEFAULT_KL_WARMUP, "train_elbo_final": -elbo_last
        if elbo_last is not None else None,
        "imp_nb": nb, "imp_nb_api_n1": nb1, "imp_zinb": zinb,
        "latent_vs_rho_l_max_rel_diff": _latent_check(nb, lat[rows, cols].astype(np.float64)),
        "module_vs_api_nb_max_rel_diff": _latent_check(nb, nb_int),
        "eval_seconds": time.perf_counter() - t1,
    }


def _api_means(model, adata, S, rows, cols, lib, seed, n1_seed=None, **kw):
    """Through the tool's public ``get_normalized_expression`` (the same call in scvi-tools and cellvae), at the
    hidden entries: NB means ``rho * library`` averaged over S z draws, the same draws with the latent library
    (``library_size="latent"``, full n_cells x n_genes), and with a single draw. ``n1_seed`` reseeds torch before
    the single draw (None: it continues the stream)."""
    import numpy as np
    import torch

    kw = dict(return_numpy=True, batch_size=BATCH_SIZE, **kw)
    torch.manual_seed(seed + 1000)
    rho = model.get_normalized_expression(adata, library_size=1.0, n_samples=S, **kw)
    torch.manual_seed(seed + 1000)
    lat = model.get_normalized_expression(adata, library_size="latent", n_samples=S, **kw)
    if n1_seed is not None:
        torch.manual_seed(n1_seed)
    kw.pop("return_mean", None)
    rho1 = model.get_normalized_expression(adata, library_size=1.0, n_samples=1, **kw)
    return (rho[rows, cols].astype(np.float64) * lib[rows], lat,
            rho1[rows, cols].astype(np.float64) * lib[rows])


def _scvi_module_means(model, adata, S, rows, cols):
    """NB mean mu and ZINB mean (1-pi) mu, averaged over S z draws, through scvi-tools' module forward pass (the
    loop of ``RNASeqMixin.get_normalized_expression``), at the hidden entries."""
    import numpy as np
    import torch

    model.module.eval()
    dl = model._make_data_loader(adata=adata, batch_size=BATCH_SIZE)
    nb, zi = [], []
    with torch.inference_mode():
        for tensors in dl:
            _, gen = model.module.forward(tensors=tensors, inference_kwargs={"n_samples": S}, compute_loss=False)
            px = gen["px"]
            nb.append(px.mu.mean(0).numpy() if S > 1 else px.mu.numpy())
            zi.append(px.mean.mean(0).numpy() if S > 1 else px.mean.numpy())
    nb, zi = np.concatenate(nb), np.concatenate(zi)
    return nb[rows, cols].astype(np.float64), zi[rows, cols].astype(np.float64)


def _run_cellvae(cellvae, task, adata, rows, cols, lib) -> dict:
    import numpy as np
    import torch

    seed, S = task["seed"], task["n_samples"]
    torch.set_num_threads(task["threads"])
    model = cellvae.CountVAE(adata, **ARCH)
    kw = {"max_epochs": task["epochs"], "batch_size": BATCH_SIZE, "train_size": 1.0, "early_stopping": False,
          "seed": seed, "progress_bar": False, "n_threads": task["threads"]}
    if task["variant"] == "cellvae_kl400":
        kw["n_epochs_kl_warmup"] = SCVI_DEFAULT_KL_WARMUP
    t0 = time.perf_counter()
    model.train(**kw)
    secs = time.perf_counter() - t0
    assert len(model.train_indices) == adata.n_obs, "cellvae did not train on all cells"
    hist = model.history or {}
    warm = (hist.get("plan") or {}).get("n_epochs_kl_warmup")

    t1 = time.perf_counter()
    nb, lat, nb1 = _api_means(model, adata, S, rows, cols, lib, seed)
    torch.manual_seed(seed + 1000)
    nb_int, zinb = _cellvae_module_means(model, adata, S, rows, cols)
    return {
        "train_seconds": secs, "epochs": len(hist.get("epoch", [])) or task["epochs"],
        "kl_weight_final": hist["kl_weight"][-1] if hist.get("kl_weight") else None,
        "kl_warmup_epochs": warm if warm is not None else cellvae_default_warmup(task["epochs"]),
        "train_elbo_final": hist["train_elbo"][-1] if hist.get("train_elbo") else None,
        "imp_nb": nb, "imp_nb_api_n1": nb1, "imp_zinb": zinb,
        "latent_vs_rho_l_max_rel_diff": _latent_check(nb, lat[rows, cols].astype(np.float64)),
        "module_vs_api_nb_max_rel_diff": _latent_check(nb, nb_int),
        "eval_seconds": time.perf_counter() - t1,
    }


def _cellvae_module_means(model, adata, S, rows, cols):
    """NB mean mu and ZINB mean (1-pi) mu averaged over S z draws, through the fitted module (the loop of
    ``CountVAE.get_normalized_expression``; cellvae has no public method returning pi), at the hidden entries."""
    import numpy as np
    import torch

    data = model.spec.prepare(adata)
    model.module.eval()
    nb, zi = [], []
    with torch.no_grad():
        for x, cat, cont in data.iterate(torch.arange(data.n_cells), BATCH_SIZE):
            inf = model.module.inference(x, cat, cont, n_samples=S)
            px = model.module.generative(inf["z"], inf["library"], cat, cont)["px"]
            nb.append(px.mu.mean(0).numpy() if S > 1 else px.mu.numpy())
            zi.append(px.mean.mean(0).numpy() if S > 1 else px.mean.numpy())
    nb, zi = np.concatenate(nb), np.concatenate(zi)
    return nb[rows, cols].astype(np.float64), zi[rows, cols].astype(np.float64)


def run_in_child(task: dict) -> dict:
    """Run :func:`_child` in a fresh 'spawn' process and return its result (exceptions are re-raised here)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_child, task).result()


# ----------------------------------------------------------------------------- per seed
def prepare_seed(adata, seed: int, fraction: float, tmpdir: Path) -> tuple[dict, dict]:
    """Corrupt, drop empty genes/cells, save the corrupted AnnData and the hidden entries for the children.

    Returns (task paths, info), info holding the hidden entries (``rows``, ``cols``, ``vals``) for scoring."""
    import anndata as ad
    import numpy as np

    Xc, rows, cols, vals = corrupt(adata.X, fraction, seed)
    n_hidden_all = len(vals)
    nnz = Xc.nnz + n_hidden_all
    Xc, rows, cols, vals, cells, genes, n_drop = drop_empty(Xc, rows, cols, vals)
    sub = ad.AnnData(X=Xc, obs=adata.obs.iloc[cells][[]].copy(), var=adata.var.iloc[genes][[]].copy())
    h5ad = tmpdir / f"corrupted_seed{seed}.h5ad"
    hidden = tmpdir / f"hidden_seed{seed}.npz"
    sub.write_h5ad(h5ad)
    np.savez(hidden, rows=rows, cols=cols, vals=vals)
    info = {
        "nnz": int(nnz), "n_hidden": int(n_hidden_all), "n_hidden_scored": int(len(vals)),
        "n_hidden_dropped": n_drop, "n_cells_model": int(sub.n_obs), "n_genes_model": int(sub.n_vars),
        "n_genes_dropped_empty": int(adata.n_vars - sub.n_vars), "n_cells_dropped_empty": int(adata.n_obs - sub.n_obs),
        "hidden_true_median": float(np.median(vals)), "hidden_true_mean": float(np.mean(vals)),
        "hidden_frac_equal_1": float(np.mean(vals == 1)),
        "hidden_count_share": float(vals.sum() / (vals.sum() + Xc.sum())),
    }
    return {"h5ad": str(h5ad), "hidden": str(hidden)}, {**info, "rows": rows, "cols": cols, "vals": vals, "X": Xc}


def baseline_rows(sinfo: dict) -> list[dict]:
    import numpy as np

    rows, cols, vals = sinfo["rows"], sinfo["cols"], sinfo["vals"]
    gm = gene_mean_baseline(sinfo["X"], rows, cols)
    zero = np.zeros_like(vals)
    return [{"model": "baseline_genemean", "nb": l1_scores(gm, vals)},
            {"model": "baseline_zero", "nb": l1_scores(zero, vals)}]


# ----------------------------------------------------------------------------- report
def _paired_ratio(drows, model, key, sub="nb"):
    by = {}
    for r in drows:
        if r.get("error") is None:
            by.setdefault(r["seed"], {})[r["model"]] = r
    out = []
    for _s, d in sorted(by.items()):
        if model in d and "scvi" in d and d["scvi"].get(sub) and d[model].get(sub) and d["scvi"][sub][key]:
            out.append(d[model][sub][key] / d["scvi"][sub][key])
    return out


def _v(rows, sub, key):
    return [r[sub][key] if r.get(sub) else None for r in rows]


def render(rows: list[dict], meta: dict) -> str:
    eps = meta["epochs"]
    out = [f"commit {meta.get('git', '?')}, {meta['date']}, load {meta.get('loadavg_start', '?')} (the run that "
           "wrote the newest rows; earlier rows: see 'Earlier (resumed) run' below)", "",
           "# Imputation of hidden counts: cellvae vs scvi-tools (scVI paper protocol)", ""]
    out.append(f"Generated {meta['date']} by `benchmarks/imputation.py` ({meta['command']}).")
    out.append("")
    v = meta["versions"]
    out.append(f"- Machine: {meta['machine']}. Versions: torch {v.get('torch')}, scvi-tools {v.get('scvi-tools')} "
               f"(lightning {v.get('lightning')}), cellvae {v.get('cellvae')}, anndata {v.get('anndata')}. "
               f"{meta['threads']} torch / BLAS / OpenMP thread(s) in every process; CPU only. Total wall time "
               f"{meta.get('wall_seconds', 0) / 60:.0f} min (shared machine; times are indicative only)."
               + (f" Repository at the run: {meta['git']}." if meta.get("git") else "")
               + (f" Earlier (resumed) run: {meta['git_earlier_run']}." if meta.get("git_earlier_run") else ""))
    out.append(f"- Corruption (Lopez et al. 2018, \"Imputation\", uniform zeroing): per dataset and seed, "
               f"{meta['fraction']:.0%} of the non-zero entries of the raw count matrix, drawn uniformly without "
               "replacement with `numpy.random.default_rng(seed)`, are set to 0. Genes and cells left without "
               "counts are removed for every model; hidden entries in them are not scored. The seed also seeds the "
               "training of every model.")
    out.append(f"- Training: on the corrupted matrix, all cells, no validation split, {eps} epochs, batch size "
               f"{BATCH_SIZE}, no early stopping, same architecture (n_hidden 128, n_latent 10, n_layers 1, ZINB, "
               "gene-wise dispersion, observed library size): scvi-tools `SCVI(adata, n_hidden=128, n_latent=10, "
               "n_layers=1, gene_likelihood=\"zinb\", dispersion=\"gene\").train(max_epochs, train_size=1.0, "
               "batch_size=128, early_stopping=False)`, cellvae `CountVAE(adata, <same>).train(max_epochs, "
               "train_size=1.0, batch_size=128, early_stopping=False, seed=seed)`. KL warm-up: scvi-tools default "
               f"{SCVI_DEFAULT_KL_WARMUP} epochs (per epoch; KL weight {min(1.0, (eps - 1) / SCVI_DEFAULT_KL_WARMUP):.2f}"
               f" in the last epoch); cellvae default min(400, epochs // 2) = {cellvae_default_warmup(eps)} epochs "
               "(per step; full weight afterwards); `cellvae_kl400` = cellvae with `n_epochs_kl_warmup=400`, "
               "i.e. scvi-tools' schedule.")
    out.append(f"- Imputed value = the NB mean rho_ng × l_n: `get_normalized_expression(adata, library_size=1, "
               f"n_samples={meta['n_samples']})` (rho averaged over {meta['n_samples']} draws of z from q(z|x), the "
               "same call in both tools) times l_n = the cell's total count **in the corrupted data**, which is the "
               "library size both models use (observed library). This equals `library_size=\"latent\"` (\"the "
               "model's own library size\" in both APIs; checked per run on the hidden entries with the same z "
               "draws, max relative difference in the JSON as `latent_vs_rho_l_max_rel_diff`). Error = |imputed − "
               "true hidden count| over the scored hidden entries: **median L1** (the scVI paper's metric) and "
               "mean L1, lower is better.")
    out.append("- ZINB mean = (1 − pi_ng) rho_ng l_n averaged over the same number of z draws: no public method "
               "returns it in cellvae (scvi-tools' `get_likelihood_parameters` averages mu and pi separately), so "
               "it is computed for both tools from the fitted module's forward pass (the loop their "
               "`get_normalized_expression` runs), using the distribution's `.mean`. `n_samples=1` = each API's "
               "default call: cellvae decodes the posterior mean of z, scvi-tools one random draw of z.")
    out.append("- Baselines on the same hidden entries: *gene mean × library* = l_n × Σ_m x_mg / Σ_m l_m on the "
               "corrupted counts (the gene's pooled share of all counts scaled to the cell's corrupted library); "
               "*zero* = keep the corrupted 0 (its median L1 is the median hidden count).")
    out.append("- Mean ± sd (sample sd) over seeds. Ratios: per-seed ratio model / scvi-tools, mean ± sd; < 1 "
               "means a smaller error than scvi-tools. Mean signed error = mean of (imputed − true) over the "
               "hidden entries.")
    out.append("- Reading the numbers: the hidden entries are non-zero by construction and most of them are 1 (see "
               "each dataset's line), so the median L1 is coarse (any imputed value near 1 scores well) and the "
               "mean L1 is the more discriminating column. Every method under-imputes (negative mean signed "
               "error): the models' mean for a cell and gene is not conditioned on the entry being non-zero, the "
               "models were fit to the corrupted zeros, and the library size is the corrupted one (about 10 % of "
               "the counts are missing). The NB mean beats the ZINB mean on these entries for the same reason "
               "(the zero-inflation pulls the mean further down).")
    out.append("- Not comparable with the scVI paper's numbers: it used other data (e.g. CORTEX = 3,005 cells × "
               "558 genes, here a 1,464-cell × 1,095-gene subset), a latent library size, and trained "
               "\"until convergence\" with tuned hyper-parameters; here both tools use the same fixed settings.")
    out.append("")

    order = {d: i for i, d in enumerate(meta["datasets"])}
    datasets = sorted(dict.fromkeys(r["dataset"] for r in rows), key=lambda d: order.get(d, len(order)))
    models = [m for m in (*VARIANTS, *BASELINES) if any(r["model"] == m for r in rows)]
    summary = []
    for d in datasets:
        drows = [r for r in rows if r["dataset"] == d]
        ok = [r for r in drows if r.get("error") is None]
        r0 = drows[0]
        out.append(f"## {d}")
        out.append("")
        per_seed = {}
        for r in drows:
            per_seed.setdefault(r["seed"], r)
        seeds_txt = "; ".join(
            f"seed {s}: {r['n_hidden']} of {r['nnz']} non-zero entries hidden ({r['hidden_count_share']:.1%} of "
            f"all counts; median hidden count {r['hidden_true_median']:g}, mean {r['hidden_true_mean']:.2f}, "
            f"{r['hidden_frac_equal_1']:.0%} equal to 1), model input {r['n_cells_model']} × {r['n_genes_model']}"
            + (f" ({r['n_genes_dropped_empty']} genes / {r['n_cells_dropped_empty']} cells left without counts "
               f"removed, {r['n_hidden_dropped']} hidden entries in them not scored)"
               if r.get("n_genes_dropped_empty") or r.get("n_cells_dropped_empty") else "")
            for s, r in sorted(per_seed.items()))
        out.append(f"{r0['n_cells']} cells × {r0['n_genes']} genes"
                   + (f" (seurat_v3 HVG of {r0['n_genes_file']})" if r0.get("hvg_seurat_v3") else "")
                   + f". {seeds_txt}.")
        out.append("")
        out.append("| model | seeds | median L1 | mean L1 | median L1 / scvi | mean L1 / scvi | mean signed error "
                   "| median L1, ZINB mean | mean L1, ZINB mean | median L1, n_samples=1 | train s | KL weight, "
                   "last epoch |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        srow = {"dataset": d}
        for m in models:
            mr = sorted([r for r in ok if r["model"] == m], key=lambda r: r["seed"])
            if not mr:
                if any(r["model"] == m for r in drows):
                    out.append(f"| {MODEL_LABEL[m]} | failed |" + " - |" * 10)
                continue
            seeds = " ".join(str(r["seed"]) for r in mr)
            rat_med = _paired_ratio(drows, m, "median_l1") if m != "scvi" else []
            rat_mean = _paired_ratio(drows, m, "mean_l1") if m != "scvi" else []
            cells = [
                fmt_mean_sd(_v(mr, "nb", "median_l1"), 3),
                fmt_mean_sd(_v(mr, "nb", "mean_l1"), 3),
                (fmt_mean_sd(rat_med, 3) if rat_med else "-") if m != "scvi" else "1",
                (fmt_mean_sd(rat_mean, 3) if rat_mean else "-") if m != "scvi" else "1",
                fmt_mean_sd(_v(mr, "nb", "mean_signed_error"), 3),
                fmt_mean_sd(_v(mr, "zinb", "median_l1"), 3),
                fmt_mean_sd(_v(mr, "zinb", "mean_l1"), 3),
                fmt_mean_sd(_v(mr, "nb_api_n1", "median_l1"), 3),
                fmt_mean_sd([r.get("train_seconds") for r in mr], 0),
                fmt_mean_sd([r.get("kl_weight_final") for r in mr], 2),
            ]
            out.append(f"| {MODEL_LABEL[m]} | {seeds} | " + " | ".join(cells) + " |")
            srow[m] = (mean_sd(_v(mr, "nb", "median_l1"))[0], mean_sd(_v(mr, "nb", "mean_l1"))[0],
                       mean_sd(rat_med)[0], mean_sd(rat_mean)[0])
        summary.append(srow)
        for r in [r for r in drows if r.get("error") is not None]:
            out.append("")
            out.append(f"Failed: {r['model']} seed {r['seed']}: `{r['error']}`")
        checks = [r.get("latent_vs_rho_l_max_rel_diff") for r in ok if r.get("latent_vs_rho_l_max_rel_diff") is not None]
        if checks:
            out.append("")
            out.append(f"rho × corrupted library vs `library_size=\"latent\"` (same z draws): max relative "
                       f"difference {max(checks):.1e} over all runs.")
        paths = {}
        for r in ok:
            if r.get("tool_path"):
                paths.setdefault(r["model"], {})[r["tool_path"]] = None
        if paths:
            out.append("")
            out.append("Imported from: " + "; ".join(f"{m}: " + ", ".join(f"`{q}`" for q in ps)
                                                  for m, ps in paths.items()) + ".")
        warns = {}
        for r in ok:
            for w in r.get("warnings") or []:
                warns.setdefault(r["model"], {})[w] = None
        for m, ws in warns.items():
            out.append("")
            out.append(f"Warnings seen in the {m} child: " + "; ".join(f"`{w}`" for w in list(ws)[:3]) + ".")
        out.append("")

    if summary and "scvi" in models:
        out.append("## Summary (NB mean rho × l; mean over seeds)")
        out.append("")
        cols = [m for m in models if m != "scvi"]
        out.append("| dataset | scvi median L1 | " + " | ".join(f"{MODEL_LABEL[m]}: median L1 (ratio to scvi)"
                                                        for m in cols) + " |")
        out.append("|---|---|" + "---|" * len(cols))
        for s in summary:
            if "scvi" not in s:
                continue
            cells = []
            for m in cols:
                if m not in s:
                    cells.append("-")
                    continue
                med, _mean, rmed, _rmean = s[m]
                cells.append(f"{med:.3f} ({rmed:.3f}×)" if rmed is not None else f"{med:.3f}")
            out.append(f"| {s['dataset']} | {s['scvi'][0]:.3f} | " + " | ".join(cells) + " |")
        out.append("")
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


def write_outputs(rows, meta, md_path: Path, json_path: Path) -> None:
    atomic_write_text(json_path, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    atomic_write_text(md_path, render(rows, meta))


# ----------------------------------------------------------------------------- main
def _git_state() -> str:
    """``<commit>`` of the repository, with ``+ uncommitted changes in src/`` when ``git status`` shows some."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + (" + uncommitted changes in src/" if dirty else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_threads(args.threads)
    cap_loaded_threads(args.threads)
    import numpy as np

    md_path, json_path = Path(args.out), Path(args.json)
    if args.render_only:
        old = json.loads(json_path.read_text())
        atomic_write_text(md_path, render(old["rows"], old["meta"]))
        print(f"wrote {md_path} from {json_path}")
        return 0
    variants = active_variants(args.variants, args.epochs)
    rows: list[dict] = []
    old_meta: dict = {}
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        rows = [r for r in old.get("rows", []) if r.get("error") is None]
        old_meta = old.get("meta", {})
        for key in ("epochs", "fraction", "n_samples"):
            if key in old_meta and old_meta[key] != getattr(args, key):
                raise SystemExit(f"--resume: {json_path} was made with {key}={old_meta[key]}, not "
                                 f"{getattr(args, key)}")
        print(f"[resume] kept {len(rows)} rows from {json_path}", flush=True)
    done = {(r["model"], r["dataset"], r["seed"]) for r in rows}
    meta = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "`" + " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))) + "`",
        "machine": machine_description(),
        "versions": {p: package_version(p) for p in ("torch", "scvi-tools", "lightning", "cellvae", "anndata")},
        "threads": args.threads, "epochs": args.epochs, "seeds": args.seeds, "fraction": args.fraction,
        "n_samples": args.n_samples, "variants": variants,
        "datasets": list(dict.fromkeys(old_meta.get("datasets", []) + [parse_dataset_spec(s)[0] for s in args.datasets])),
        "loadavg_start": old_meta.get("loadavg_start", loadavg()),
        "wall_seconds": float(old_meta.get("wall_seconds", 0.0)),
        "notes": list(dict.fromkeys(old_meta.get("notes", []) + list(args.note))),
        "git": _git_state(),
    }
    if old_meta:
        meta["git_earlier_run"] = old_meta.get("git")
        meta["notes"] = list(dict.fromkeys(meta["notes"] + [
            f"Resumed run: rows from an earlier run started {old_meta.get('date', '?')} were kept."]))
    t_start = time.perf_counter()
    wall0 = meta["wall_seconds"]

    for spec in args.datasets:
        name, label_key = parse_dataset_spec(spec)
        todo = [(s, m) for s in args.seeds for m in (*variants, *BASELINES) if (m, name, s) not in done]
        if not todo:
            print(f"== {name}: all runs already in {json_path.name}, skipped", flush=True)
            continue
        try:
            adata, _labels, info = load_dataset(Path(args.data_dir), name, label_key)
        except Exception as e:  # noqa: BLE001
            print(f"[skip] dataset {name}: {type(e).__name__}: {e}", flush=True)
            continue
        tot = np.asarray(adata.X.sum(1)).ravel()
        if (tot == 0).any():
            adata = adata[tot > 0].copy()
        info["n_cells"] = int(adata.n_obs)
        print(f"== {name}: {adata.n_obs} cells x {adata.n_vars} genes", flush=True)
        with tempfile.TemporaryDirectory(prefix="imputation_") as tmp:
            for seed in args.seeds:
                if all((m, name, seed) in done for m in (*variants, *BASELINES)):
                    continue
                paths, sinfo = prepare_seed(adata, seed, args.fraction, Path(tmp))
                base = {"dataset": name, "seed": seed, **info,
                        **{k: v for k, v in sinfo.items() if k not in ("rows", "cols", "vals", "X")},
                        "epochs_requested": args.epochs, "n_samples": args.n_samples, "error": None}
                print(f"  seed {seed}: {sinfo['n_hidden']} of {sinfo['nnz']} non-zero entries hidden "
                      f"(median hidden count {sinfo['hidden_true_median']:g}); model input "
                      f"{sinfo['n_cells_model']} x {sinfo['n_genes_model']}", flush=True)
                for b in baseline_rows(sinfo):
                    if (b["model"], name, seed) not in done:
                        rows.append({**base, **b})
                        print(f"    {b['model']:18s}: median L1 {b['nb']['median_l1']:.3f}, mean L1 "
                              f"{b['nb']['mean_l1']:.3f}", flush=True)
                for m in variants:
                    if (m, name, seed) in done:
                        continue
                    row = {**base, "model": m}
                    task = {"variant": m, "seed": seed, "epochs": args.epochs, "threads": args.threads,
                            "n_samples": args.n_samples, **paths}
                    t0 = time.perf_counter()
                    try:
                        res = run_in_child(task)
                        vals = sinfo["vals"]
                        for key, sub in (("imp_nb", "nb"), ("imp_zinb", "zinb"), ("imp_nb_api_n1", "nb_api_n1")):
                            imp = res.pop(key)
                            row[sub] = None if imp is None else l1_scores(imp, vals)
                        row.update(res)
                        row["child_wall_seconds"] = time.perf_counter() - t0
                        print(f"    {m:18s}: median L1 {row['nb']['median_l1']:.3f}, mean L1 {row['nb']['mean_l1']:.3f}"
                              f" (ZINB mean: {row['zinb']['median_l1']:.3f} / {row['zinb']['mean_l1']:.3f}; "
                              f"n_samples=1: {row['nb_api_n1']['median_l1']:.3f}); train {row['train_seconds']:.0f} s,"
                              f" KL weight {row['kl_weight_final']:.2f}, latent check "
                              f"{row['latent_vs_rho_l_max_rel_diff']:.1e}", flush=True)
                    except Exception as e:  # noqa: BLE001 - record and go on
                        traceback.print_exc()
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                        print(f"    {m:18s}: FAILED {row['error']}", flush=True)
                    rows.append(row)
        meta["wall_seconds"] = wall0 + time.perf_counter() - t_start
        meta["loadavg_end"] = loadavg()
        write_outputs(rows, meta, md_path, json_path)  # after every dataset
    meta["wall_seconds"] = wall0 + time.perf_counter() - t_start
    meta["loadavg_end"] = loadavg()
    write_outputs(rows, meta, md_path, json_path)
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; wrote {md_path} and {json_path}\n", flush=True)
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
