"""The main job behind ``cellvae fit``: read data, fit a CountVAE, annotate, plot and report.

Outputs in ``out_dir``:

- ``model/``: the trained model (:meth:`cellvae.CountVAE.load`);
- ``cellvae.h5ad``: the input cells and genes with ``obsm['X_cellvae']`` (latent mean, (n_cells, n_latent)),
  ``obsm['X_umap']``, ``obs['cellvae_leiden']``, ``layers['cellvae_normalized']`` (normalized expression, counts
  per 10,000 per cell, of the modelled genes; zero for genes not modelled), ``var['cellvae_modelled']`` and
  ``uns['cellvae']`` (settings and metrics);
- ``figures/*.png``, ``report.html`` (figures embedded), ``metrics.json``.

While the job runs, ``checkpoints/checkpoint.pt`` holds the last training checkpoint (every ``checkpoint_every``
epochs and at the end of training); ``resume=True`` (``cellvae fit --resume``) continues an interrupted job from it
and ends with the same model as an uninterrupted job. The directory is removed once every output is written.

The input file is never modified; every output file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .backed import open_backed
from .data import (
    CellvaeInputError,
    counts_source,
    get_counts,
    read_data,
    resolve_data_path,
    select_highly_variable_genes,
)
from .fileio import write_atomic, write_text_atomic
from .metrics import (
    batch_classifier_accuracy,
    batch_silhouette,
    clustering_agreement,
    kmeans_agreement,
    silhouette_labels,
)
from .model import CountVAE
from .plot import plot_embedding, plot_training_curves, save_figure
from .report import render_report
from .distributed import barrier, with_process_group, world
from .train import CellvaeTrainingError, torch_threads

__all__ = ["fit_job", "prepare_out_dir", "NORMALIZED_LIBRARY_SIZE", "CHECKPOINT_DIR"]

N_DE_SAMPLES = 2000  # posterior draws per one-vs-rest comparison for the report's marker genes
N_MARKERS = 10
NORMALIZED_LIBRARY_SIZE = 1e4
BACKED_EMBED_MAX_CELLS = 200_000  # out of core, above this many cells no UMAP / Leiden (kNN graph of all cells)
METRIC_MAX_CELLS = 50_000  # out of core, clustering and batch metrics on a seeded subsample of this many cells
CHECKPOINT_DIR = "checkpoints"


def prepare_out_dir(out_dir: str | os.PathLike, inputs: list[Path], overwrite: bool, resume: bool = False) -> Path:
    """Check and create the output directory.

    Args:
        out_dir: the output directory.
        inputs: input paths, which must not lie in it.
        overwrite: replace the contents of a non-empty directory (its old checkpoints are removed).
        resume: continue the job in a non-empty directory from its ``checkpoints/`` (when there are any).

    Raises:
        CellvaeInputError: ``out_dir`` is an input path or contains one, it is a file, or it exists and is not
            empty while neither ``overwrite`` nor ``resume`` is given.
    """
    out = Path(out_dir).expanduser().resolve()
    for p in inputs:
        p = p.resolve()
        if p == out:
            raise CellvaeInputError(f"--out {str(out)!r} is the input itself; choose another --out.")
        if out in p.parents:
            raise CellvaeInputError(f"The input {str(p)!r} lies in the output directory {str(out)!r}, where it "
                                    "could be overwritten; choose another --out.")
    if out.exists() and not out.is_dir():
        raise CellvaeInputError(f"--out {str(out)!r} exists and is not a directory; choose another --out.")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        hint = ""
        if (out / CHECKPOINT_DIR).is_dir():
            hint = " It holds the checkpoints of an interrupted job: pass --resume to continue that job."
        raise CellvaeInputError(f"Output directory {str(out)!r} exists and is not empty; pass --overwrite to "
                                f"replace its contents or choose another --out.{hint}")
    if overwrite and not resume and (out / CHECKPOINT_DIR).exists():
        shutil.rmtree(out / CHECKPOINT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _uns_safe(obj):
    """Make a nested structure writable to .h5ad ``uns`` (no None, plain types)."""
    if isinstance(obj, dict):
        return {str(k): _uns_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        vals = [_uns_safe(v) for v in obj if v is not None]
        return vals if all(isinstance(v, (int, float, bool, np.number)) for v in vals) else [str(v) for v in vals]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    return obj


@with_process_group
def fit_job(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    gene_likelihood: str = "zinb",
    dispersion: str = "gene",
    n_latent: int = 10,
    n_hidden: int = 128,
    n_layers: int = 1,
    max_epochs: int | None = None,
    batch_size: int = 128,
    n_top_genes: int | None = None,
    latent_library: bool = False,
    adversarial_batch_weight: float = 0.0,
    early_stopping: bool = True,
    lr: float = 1e-3,
    lr_schedule: str = "constant",
    decoder_bias_init: str = "frequency",
    dispersion_init: str | float = "random",
    dispersion_lr_multiplier: float = 30.0,
    seed: int = 0,
    overwrite: bool = False,
    progress_bar: bool = True,
    log=print,
    resume: bool = False,
    checkpoint_every: int = 10,
    accelerator: str = "auto",
    backed: bool = False,
) -> dict:
    """Run the main job end to end; return the metrics dict (also written to ``metrics.json``).

    Args mirror ``cellvae fit`` (see ``cellvae fit --help``). ``data`` is a path, a name in
    ``$CELLVAE_DATA_DIR`` or a URL. ``log`` receives progress lines. ``resume``: continue an interrupted job in
    ``out_dir`` from ``out_dir/checkpoints`` (same data and options); ``checkpoint_every``: epochs between
    training checkpoints. ``lr`` / ``lr_schedule``: peak learning rate and its schedule; ``decoder_bias_init``:
    the decoder's initial bias; ``dispersion_init`` / ``dispersion_lr_multiplier``: the initial log theta and its
    relative learning rate (all as ``CountVAE.train``).
    ``accelerator``: ``auto``/``cpu``/``cuda`` for training. ``backed``: train out of core
    (the .h5ad's matrix is read from disk in row chunks, :mod:`cellvae.backed`): no ``cellvae_normalized`` layer is
    written, clustering metrics use at most 50,000 cells, and above 200,000 cells the UMAP and Leiden clustering are
    left out; ``n_top_genes`` is refused (select genes first).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes train one model together (:mod:`cellvae.distributed`);
    rank 0 prepares ``out_dir`` and writes every output, the other ranks return an empty dict after training.

    Raises:
        CellvaeInputError: unreadable data, bad values, missing keys or layers, a bad output directory, a
            checkpoint of other data or settings; raised before any training.
        CellvaeTrainingError: training diverged (repeated non-finite losses); the best weights so far are saved
            to ``out_dir/model`` and the checkpoint is kept.
    """
    t_start = time.perf_counter()
    import scanpy as sc

    rank, n_ranks = world()
    if rank != 0:
        log = (lambda m: None)  # noqa: E731 - rank 0 reports
    if backed and n_top_genes:  # before the output directory is touched
        raise CellvaeInputError("--n-top-genes needs the data in memory: select the genes first (e.g. with scanpy on "
                                "a subsample) and write them to a new .h5ad, or drop --backed.")
    path = resolve_data_path(data)
    if rank == 0:
        prepare_out_dir(out_dir, [path], overwrite, resume=resume)
    barrier()
    out = Path(out_dir).expanduser().resolve()  # the directory prepare_out_dir made (e.g. '~/res')
    if n_ranks > 1:
        log(f"distributed training on {n_ranks} processes")
    adata = open_backed(path) if backed else read_data(path)
    log(f"{'opened (backed)' if backed else 'read'} {path.name}: {adata.n_obs} cells x {adata.n_vars} genes")
    counts_source(adata, layer)  # missing layer -> clear error now
    for key, what in ((batch_key, "--batch-key"), (labels_key, "--labels-key")):
        if key is not None and key not in adata.obs.columns:
            raise CellvaeInputError(f"{what} {key!r} is not an obs column; available: {list(adata.obs.columns)}.")
    if backed and not (adata.var_names.is_unique and adata.obs_names.is_unique):
        raise CellvaeInputError("The file has duplicated var_names or obs_names, which cannot be fixed in a backed "
                                "file: make them unique (var_names_make_unique / obs_names_make_unique) and write a "
                                "new .h5ad, or drop --backed.")
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    if not adata.obs_names.is_unique:
        adata.obs_names_make_unique()

    modelled = np.ones(adata.n_vars, dtype=bool)
    if n_top_genes:
        modelled = select_highly_variable_genes(adata, n_top_genes, layer=layer, batch_key=batch_key)
        log(f"selected {int(modelled.sum())} highly variable genes (seurat_v3)")
    adata_model = adata[:, modelled].copy() if not modelled.all() else adata

    model = CountVAE(
        adata_model, layer=layer, batch_key=batch_key, labels_key=labels_key, gene_likelihood=gene_likelihood,
        dispersion=dispersion, n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers,
        use_observed_lib_size=not latent_library, adversarial_batch_weight=adversarial_batch_weight,
        out_of_core=backed,
    )
    log(f"training {model!r}")
    t0 = time.perf_counter()
    ck_dir = out / CHECKPOINT_DIR
    if resume:
        log(f"resuming from {ck_dir / 'checkpoint.pt'}" if (ck_dir / "checkpoint.pt").exists()
            else f"--resume: no checkpoint in {ck_dir}; training from the beginning")
    try:
        model.train(max_epochs=max_epochs, batch_size=batch_size, early_stopping=early_stopping, seed=seed,
                    lr=lr, lr_schedule=lr_schedule, decoder_bias_init=decoder_bias_init,
                    dispersion_init=dispersion_init, dispersion_lr_multiplier=dispersion_lr_multiplier,
                    progress_bar=progress_bar, checkpoint_dir=ck_dir,
                    checkpoint_every=checkpoint_every, resume=resume, accelerator=accelerator)
    except CellvaeTrainingError as e:
        if rank != 0:
            raise
        model.save(out / "model", overwrite=True)
        raise CellvaeTrainingError(f"{e} The model with these weights was saved to {str(out / 'model')!r}.",
                                   e.history) from e
    train_seconds = time.perf_counter() - t0
    if rank != 0:
        return {}
    if hist_resumed := model.history.get("resumed_from_epoch"):
        log(f"resumed at epoch {hist_resumed}")
    with torch_threads(None):
        latent = model.get_latent_representation()
        norm = None if backed else model.get_normalized_expression(library_size=NORMALIZED_LIBRARY_SIZE,
                                                                   return_numpy=True)
    hist = model.history
    log(f"trained {len(hist['epoch'])} epochs in {train_seconds:.1f} s "
        f"({hist['train_cells_per_second']:.0f} cells/s); best epoch {hist['best_epoch']}")

    # ---- annotate
    if backed:  # obs, var and the latent space; the counts stay in the input file
        res = ad.AnnData(obs=adata.obs.copy(), var=adata.var.copy())
    else:
        res = adata.copy()
    res.obsm["X_cellvae"] = latent
    if norm is None:
        pass
    elif modelled.all() and len(model.spec.gene_names) == adata.n_vars:
        res.layers["cellvae_normalized"] = norm
    else:
        # Sparse layer: the modelled genes' columns filled, the other columns empty (implicit zeros).
        cols = adata.var_names.astype(str).get_indexer(model.spec.gene_names)
        coo = sp.coo_matrix(norm)
        full = sp.csr_matrix((coo.data, (coo.row, cols[coo.col])), shape=(adata.n_obs, adata.n_vars))
        res.layers["cellvae_normalized"] = full
    res.var["cellvae_modelled"] = np.isin(res.var_names.astype(str), model.spec.gene_names)
    embed = not (backed and res.n_obs > BACKED_EMBED_MAX_CELLS)
    if embed:
        sc.pp.neighbors(res, use_rep="X_cellvae", random_state=seed)
        sc.tl.umap(res, random_state=seed)
        sc.tl.leiden(res, key_added="cellvae_leiden", flavor="igraph", n_iterations=2, directed=False,
                     random_state=seed)
        log(f"{res.obs['cellvae_leiden'].nunique()} Leiden clusters")
    else:
        log(f"{res.n_obs} cells: UMAP and Leiden left out (out of core above {BACKED_EMBED_MAX_CELLS} cells)")
    # Clustering and batch metrics on at most METRIC_MAX_CELLS cells (seeded) out of core.
    sub = np.arange(res.n_obs)
    if backed and res.n_obs > METRIC_MAX_CELLS:
        sub = np.sort(np.random.default_rng(0).choice(res.n_obs, METRIC_MAX_CELLS, replace=False))

    # ---- metrics
    val = hist.get("validation_elbo") or []
    best = hist.get("best_epoch", len(val))
    metrics: dict = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_genes_modelled": len(model.spec.gene_names),
        "n_epochs": len(hist["epoch"]),
        "best_epoch": int(best),
        "stopped_early": bool(hist.get("stopped_early", False)),
        "validation_elbo": float(val[best - 1]) if val else None,
        "train_elbo": float(hist["train_elbo"][best - 1]),
        "train_seconds": round(train_seconds, 2),
        "train_cells_per_second": round(float(hist["train_cells_per_second"]), 1),
        "n_leiden_clusters": int(res.obs["cellvae_leiden"].nunique()) if embed else None,
    }
    if len(sub) < res.n_obs:
        metrics["n_cells_metrics"] = int(len(sub))
    z_sub = res.obsm["X_cellvae"][sub]
    if labels_key:
        labels = res.obs[labels_key].astype(str).to_numpy()
        if embed:
            lei = clustering_agreement(labels, res.obs["cellvae_leiden"].to_numpy())
            metrics.update(leiden_ari=lei["ari"], leiden_nmi=lei["nmi"])
        km = kmeans_agreement(z_sub, labels[sub], seed=0)
        metrics.update(kmeans_ari=km["ari"], kmeans_nmi=km["nmi"], silhouette_labels=silhouette_labels(z_sub, labels[sub]))
    if batch_key and model.spec.n_batch >= 2:
        batches = res.obs[batch_key].astype(str).to_numpy()[sub]
        labels = res.obs[labels_key].astype(str).to_numpy()[sub] if labels_key else None
        try:
            metrics["batch_classifier_accuracy"] = batch_classifier_accuracy(z_sub, batches)
            metrics["batch_classifier_chance"] = 1.0 / model.spec.n_batch
        except ValueError as e:  # a batch smaller than the folds
            log(f"batch classifier accuracy not computed: {e}")
        metrics["batch_asw"] = batch_silhouette(z_sub, batches, labels)

    # ---- marker genes (Bayes-factor DE, one label vs the rest)
    markers: dict[str, list[str]] = {}
    if labels_key and gene_likelihood != "normal":
        t_de = time.perf_counter()
        with torch_threads(None):
            de = model.differential_expression(groupby=labels_key, n_samples=N_DE_SAMPLES, seed=seed)
        write_atomic(out / "markers.csv", lambda p: de.to_csv(p, index_label="gene"))
        for g, block in de.groupby("group1", sort=True):
            up = block[block["lfc_mean"] > 0]
            markers[str(g)] = [str(x) for x in up.index[:N_MARKERS]]
        log(f"marker genes for {len(markers)} labels in {time.perf_counter() - t_de:.1f} s (markers.csv)")

    # ---- figures
    fig_dir = out / "figures"
    figures = [(save_figure(plot_training_curves(hist), fig_dir / "training_curves.png"),
                "Training and validation ELBO per epoch; KL warm-up.")]
    colors = [("cellvae_leiden", "Leiden clusters on the cellvae latent space")]
    if labels_key:
        colors.append((labels_key, f"UMAP of the latent space colored by labels ({labels_key})"))
    if batch_key:
        colors.append((batch_key, f"UMAP of the latent space colored by batch ({batch_key})"))
    if not embed:
        colors = []
    for key, caption in colors:
        p = save_figure(plot_embedding(res, key), fig_dir / f"umap_{key}.png")
        figures.append((p, caption))

    # ---- write
    settings = {
        "data": str(path), "layer": layer, "batch_key": batch_key, "labels_key": labels_key,
        "gene_likelihood": gene_likelihood, "dispersion": dispersion, "n_latent": n_latent,
        "n_hidden": n_hidden, "n_layers": n_layers, "max_epochs": hist["plan"]["max_epochs"],
        "batch_size": batch_size, "kl_warmup_epochs": hist["plan"].get("n_epochs_kl_warmup")
        or max(1, min(400, hist["plan"]["max_epochs"] // 2)),
        "n_top_genes": n_top_genes, "library_size": "latent" if latent_library else "observed",
        "adversarial_batch_weight": adversarial_batch_weight,
        "early_stopping": early_stopping, "seed": seed, "n_processes": n_ranks,
        "accelerator": accelerator, "backed": backed, "lr": lr, "lr_schedule": lr_schedule,
        "decoder_bias_init": decoder_bias_init, "dispersion_init": dispersion_init,
        "dispersion_lr_multiplier": dispersion_lr_multiplier,
    }
    res.uns["cellvae"] = _uns_safe({"settings": settings, "metrics": metrics,
                                    "normalized_library_size": NORMALIZED_LIBRARY_SIZE})
    model.save(out / "model", overwrite=True)
    write_atomic(out / "cellvae.h5ad", lambda p: res.write_h5ad(p, compression="gzip"))
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 2)
    write_text_atomic(out / "metrics.json", json.dumps({"settings": settings, "metrics": metrics}, indent=2))

    data_summary = {
        "file": path.name, "cells": adata.n_obs, "genes": adata.n_vars,
        "genes modelled": len(model.spec.gene_names),
        "median counts per cell": float(np.median(np.asarray(
            (model._tensors(None).csr if backed else get_counts(adata, layer)).sum(1)).ravel())),
        "batches": f"{batch_key}: {', '.join(model.spec.batch_categories)}" if batch_key else "none",
        "labels": f"{labels_key}: {res.obs[labels_key].nunique()} categories" if labels_key else "none",
    }
    training = {
        "epochs run": metrics["n_epochs"], "best epoch (weights kept)": metrics["best_epoch"],
        "stopped early": metrics["stopped_early"], "training time (s)": metrics["train_seconds"],
        "throughput (cells/s)": metrics["train_cells_per_second"],
        "validation ELBO (nats/cell)": metrics["validation_elbo"],
    }
    shown = {k: v for k, v in metrics.items() if k not in training and k not in ("n_cells", "n_genes")}
    notes = [
        "Latent representation: posterior mean of q(z|x), stored in obsm['X_cellvae'].",
        f"layers['cellvae_normalized']: decoded normalized expression scaled to {NORMALIZED_LIBRARY_SIZE:g} "
        "counts per cell (genes not modelled are zero).",
        "ARI/NMI: agreement of clusters with the labels (KMeans with k = number of labels, seed 0; Leiden at "
        "resolution 1).",
    ]
    if "batch_asw" in metrics:
        notes.append("Batch mixing: batch_classifier_accuracy is the 5-fold balanced accuracy of a logistic "
                     "regression predicting the batch from the latent space (lower = better mixed; chance = "
                     "batch_classifier_chance); batch_asw is scIB's batch silhouette (1 = fully mixed within "
                     "each label).")
    write_text_atomic(out / "report.html",
                  render_report(path.name, data_summary, settings, training, shown, figures, notes,
                                markers=markers))
    shutil.rmtree(ck_dir, ignore_errors=True)  # every output is written: the checkpoint is no longer needed
    log(f"wrote {out / 'report.html'}")
    return metrics


def demo_data_path() -> Path:
    """The demo dataset: ``kang2018_ifnb_pbmc_muscat.h5ad`` in ``$CELLVAE_DATA_DIR``, else scanpy's pbmc3k
    (10x Genomics 3k PBMCs, downloaded by ``scanpy.datasets.pbmc3k()`` into ``$CELLVAE_DATA_DIR`` or the cache)."""
    data_dir = os.environ.get("CELLVAE_DATA_DIR")
    if data_dir and (Path(data_dir) / "kang2018_ifnb_pbmc_muscat.h5ad").exists():
        return Path(data_dir) / "kang2018_ifnb_pbmc_muscat.h5ad"
    import scanpy as sc

    cache = Path(data_dir or Path.home() / ".cache" / "cellvae")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / "pbmc3k_raw.h5ad"
    if not target.exists():
        sc.settings.datasetdir = cache
        a = sc.datasets.pbmc3k()
        tmp = cache / ".pbmc3k_raw.h5ad.tmp"
        a.write_h5ad(tmp)
        os.replace(tmp, target)
    return target
