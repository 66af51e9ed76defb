"""The main job behind ``cellvae fit``: read data, fit a CountVAE, annotate, plot and report.

Outputs in ``out_dir``:

- ``model/``: the trained model (:meth:`cellvae.CountVAE.load`);
- ``cellvae.h5ad``: the input cells and genes with ``obsm['X_cellvae']`` (latent mean, (n_cells, n_latent)),
  ``obsm['X_umap']``, ``obs['cellvae_leiden']``, ``layers['cellvae_normalized']`` (normalized expression, counts
  per 10,000 per cell, of the modelled genes; zero for genes not modelled), ``var['cellvae_modelled']`` and
  ``uns['cellvae']`` (settings and metrics);
- ``figures/*.png``, ``report.html`` (figures embedded), ``metrics.json``;
- with ``--decoder linear`` (LDVAE): ``loadings.csv``, the gene loadings (n_genes, n_latent), whose top genes per
  latent dimension the report lists;
- with surface-protein counts (``--protein-key``, or a ``.h5mu`` file's ``prot`` modality) the model is the joint
  :class:`cellvae.RNAProteinVAE`: ``cellvae.h5ad`` also holds ``obsm['cellvae_protein_denoised']`` (the denoised
  protein, foreground intensity in counts) and ``obsm['cellvae_protein_foreground_probability']``, ``markers.csv``
  lists genes and proteins, and the report adds the protein panels of :mod:`cellvae.jobs.protein_panels`.

While the job runs, ``checkpoints/checkpoint.pt`` holds the last training checkpoint (every ``checkpoint_every``
epochs and at the end of training); ``resume=True`` (``cellvae fit --resume``) continues an interrupted job from it
and ends with the same model as an uninterrupted job. The directory is removed once every output is written.

The input file is never modified; every output file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ..data.backed import open_backed
from ..data.checks import counts_source
from ..data.fileio import plain, safe_name, write_atomic, write_h5ad_atomic, write_text_atomic
from ..data.preprocess import select_highly_variable_genes
from ..data.read import read_data, resolve_data_path
from ..errors import CellvaeInputError, CellvaeTrainingError
from ..metrics.clustering import clustering_agreement, kmeans_agreement, silhouette_labels
from ..metrics.integration import batch_classifier_accuracy, batch_silhouette
from ..models.count_vae import CountVAE
from ..models.label_transfer import LabelTransferVAE
from ..models.rna_protein import RNAProteinVAE
from ..data.protein import PROTEIN_KEY
from ..plot import plot_embedding, plot_training_curves, save_figure
from ..settings import (ARCHES_SETTINGS, DataSettings, FitJobSettings, ModelSettings, RNAProteinSettings, TrainSettings,
                        as_dict, build)
from ..train.distributed import barrier, with_process_group, world
from ..train.threads import torch_threads
from .outdir import OutputDir
from .protein_panels import annotate_proteins, protein_figures, protein_section
from .report import html_table, render_report

__all__ = ["fit_job", "FIT_OUTPUTS", "NORMALIZED_LIBRARY_SIZE", "CHECKPOINT_DIR"]

N_DE_SAMPLES = 2000  # posterior draws per one-vs-rest comparison for the report's marker genes
N_MARKERS = 10
NORMALIZED_LIBRARY_SIZE = 1e4
BACKED_EMBED_MAX_CELLS = 200_000  # out of core, above this many cells no UMAP / Leiden (kNN graph of all cells)
METRIC_MAX_CELLS = 50_000  # out of core, clustering and batch metrics on a seeded subsample of this many cells
CHECKPOINT_DIR = "checkpoints"
N_TOP_LOADINGS = 10  # genes per latent dimension and sign in the report of a linearly decoded model
FIT_OUTPUTS = ("model", "cellvae.h5ad", "figures", "report.html", "metrics.json", "markers.csv", "loadings.csv",
               CHECKPOINT_DIR)


_SETTINGS = (DataSettings, ModelSettings, TrainSettings, FitJobSettings)


def _route(overrides: dict) -> list[dict]:
    """Split keyword settings among :data:`_SETTINGS` by field name.

    Raises:
        CellvaeInputError: a keyword that is no setting.
    """
    overrides = dict(overrides)
    if "latent_library" in overrides:  # the keyword of cellvae <= 0.1
        overrides["use_observed_lib_size"] = not overrides.pop("latent_library")
    parts = []
    for cls in _SETTINGS:
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append({k: overrides.pop(k) for k in list(overrides) if k in names})
    if overrides:
        raise CellvaeInputError(f"Unknown settings of the fit job: {sorted(overrides)}.")
    return parts


@with_process_group
def fit_job(data: str | os.PathLike, out_dir: str | os.PathLike, keys: DataSettings | None = None,
            model: ModelSettings | None = None, training: TrainSettings | None = None,
            job: FitJobSettings | None = None, log=print, **overrides) -> dict:
    """Run the main job end to end; return the metrics dict (also written to ``metrics.json``).

    Stages: :func:`_read` (data and output directory), :func:`_fit` (the model), :func:`_annotate` (latent,
    normalized expression, UMAP, Leiden), :func:`_metrics`, :func:`_markers` (Bayes-factor DE per label),
    :func:`_figures`, :func:`_write` (model, ``cellvae.h5ad``, ``metrics.json``, ``report.html``).

    Args:
        data: a path, a name in ``$CELLVAE_DATA_DIR`` or a URL.
        out_dir: the output directory (module docstring).
        keys, model, training, job: the :mod:`cellvae.settings` of the data, the model, its training and the job
            (None: defaults), updated by ``**overrides``: any of their fields by name (``cellvae fit``'s options).
            With protein counts (``keys.protein_key``, or a .h5mu) the joint model takes
            :class:`cellvae.settings.RNAProteinSettings`' defaults (e.g. ``gene_likelihood="nb"``) for every model
            field that neither ``model`` nor ``**overrides`` sets.
            ``job.resume`` continues an interrupted job in ``out_dir`` from ``out_dir/checkpoints`` (same data and
            options). ``job.backed`` trains out of core (:mod:`cellvae.data.backed`): no ``cellvae_normalized``
            layer is written, clustering metrics use at most 50,000 cells, and above 200,000 cells the UMAP and
            Leiden clustering are left out; ``n_top_genes`` is refused (select genes first).
        log: receives progress lines.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes train one model together (:mod:`cellvae.train.distributed`);
    rank 0 prepares ``out_dir`` and writes every output, the other ranks return an empty dict after training.

    Raises:
        CellvaeInputError: unreadable data, bad values, missing keys or layers, a bad output directory, a
            checkpoint of other data or settings, a setting out of range; raised before any training.
        CellvaeTrainingError: training diverged (repeated non-finite losses); the best weights so far are saved
            to ``out_dir/model`` and the checkpoint is kept.
    """
    t_start = time.perf_counter()
    parts = _route(overrides)
    keys, model_s, training, job = (build(cls, given, part, cls.__name__) for cls, given, part in
                                    zip(_SETTINGS, (keys, model, training, job), parts))
    # The model settings chosen by the caller (the rest are the defaults of the model class the data select).
    model_given = set(parts[1]) | ({f.name for f in dataclasses.fields(model_s)} if model is not None else set())
    if job.architecture == "arches" or (job.architecture == "auto" and job.semi_supervised):
        model_s = dataclasses.replace(model_s, **ARCHES_SETTINGS)  # a reference for cellvae map (scArches)
        model_given |= set(ARCHES_SETTINGS)
    rank, n_ranks = world()
    if rank != 0:
        log = (lambda m: None)  # noqa: E731 - rank 0 reports
    if job.semi_supervised and not keys.labels_key:
        raise CellvaeInputError("--semi-supervised needs --labels-key (the obs column of the labels to learn; cells "
                                "without a label hold --unlabeled-category).")
    if job.backed and job.n_top_genes:  # before the output directory is touched
        raise CellvaeInputError("--n-top-genes needs the data in memory: select the genes first (e.g. with scanpy on "
                                "a subsample) and write them to a new .h5ad, or drop --backed.")
    path = resolve_data_path(data)
    out = Path(out_dir).expanduser().resolve()
    outdir = (OutputDir(out, [path], FIT_OUTPUTS, job.overwrite, job.resume, CHECKPOINT_DIR) if rank == 0
              else contextlib.nullcontext(out))
    with outdir:
        barrier()  # the other ranks wait for rank 0 to prepare the directory
        return _run_job(path, out, keys, model_s, training, job, log, t_start, model_given)


def _run_job(path: Path, out: Path, keys, model_s, training, job, log, t_start: float,
             model_given: set[str] = frozenset()) -> dict:
    """The stages of :func:`fit_job` in a prepared, locked output directory."""
    rank, n_ranks = world()
    adata = _read(path, keys, job, log)
    keys = _protein_keys(path, adata, keys, job, log)
    modelled = np.ones(adata.n_vars, dtype=bool)
    if job.n_top_genes:
        modelled = select_highly_variable_genes(adata, job.n_top_genes, layer=keys.layer, batch_key=keys.batch_key)
        log(f"selected {int(modelled.sum())} highly variable genes (seurat_v3)")
    adata_model = adata[:, modelled].copy() if not modelled.all() else adata
    vae, train_seconds = _fit(adata_model, keys, model_s, training, job, out, log, model_given)
    if rank != 0:
        return {}
    res, embed, sub = _annotate(adata, vae, modelled, job, training.seed, log)
    metrics = _metrics(adata, res, vae, keys, embed, sub, train_seconds)
    markers = _markers(vae, keys, training.seed, out, log)
    sections = _loadings(vae, out, log)
    figures = _figures(res, _count_history(vae), keys, embed, out / "figures")
    if keys.protein_key:
        with torch_threads(None):
            parts = vae.get_elbo(indices=vae.validation_indices, modality="all", seed=training.seed)
        metrics.update(n_proteins=len(vae.protein_names), validation_elbo_rna=parts["rna"],
                       validation_elbo_protein=parts["protein"])
        group = keys.labels_key or ("cellvae_leiden" if embed else None)
        figures += protein_figures(res, keys.protein_key, group, embed, out / "figures")
        sections = [*sections, protein_section(vae, res, metrics)]
    hist_plan = _count_history(vae)["plan"]
    model_used = vae.settings  # model_s, or the joint model's RNAProteinSettings
    settings = {"data": str(path), **as_dict(keys), **as_dict(model_used), **hist_plan, **as_dict(job),
                "library_size": "observed" if model_used.use_observed_lib_size else "latent",
                "kl_warmup_epochs": TrainSettings(**hist_plan).warmup_epochs, "n_processes": n_ranks}
    _write(out, path, adata, res, vae, keys, settings, metrics, markers, figures, t_start, sections)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # every output is written: the checkpoint is not needed
    log(f"wrote {out / 'report.html'}")
    return metrics


def _read(path: Path, keys: DataSettings, job: FitJobSettings, log) -> ad.AnnData:
    """Read the data (backed with ``job.backed``), check the obs keys and make names unique.

    Raises:
        CellvaeInputError: as :func:`fit_job`.
    """
    if world()[1] > 1:
        log(f"distributed training on {world()[1]} processes")
    adata = open_backed(path) if job.backed else read_data(path)
    log(f"{'opened (backed)' if job.backed else 'read'} {path.name}: {adata.n_obs} cells x {adata.n_vars} genes")
    counts_source(adata, keys.layer)  # missing layer -> clear error now
    for key, what in ((keys.batch_key, "--batch-key"), (keys.labels_key, "--labels-key")):
        if key is not None and key not in adata.obs.columns:
            raise CellvaeInputError(f"{what} {key!r} is not an obs column; available: {list(adata.obs.columns)}.")
    if job.backed and not (adata.var_names.is_unique and adata.obs_names.is_unique):
        raise CellvaeInputError("The file has duplicated var_names or obs_names, which cannot be fixed in a backed "
                                "file: make them unique (var_names_make_unique / obs_names_make_unique) and write a "
                                "new .h5ad, or drop --backed.")
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    if not adata.obs_names.is_unique:
        adata.obs_names_make_unique()
    return adata


def _protein_keys(path: Path, adata: ad.AnnData, keys: DataSettings, job: FitJobSettings, log) -> DataSettings:
    """``keys`` with the protein key of a joint RNA + protein model: ``--protein-key``, or for a ``.h5mu`` file with
    a ``prot`` modality ``protein_expression``; unchanged for RNA only.

    Raises:
        CellvaeInputError: a protein key absent from ``obsm``, or with ``--backed`` / ``--semi-supervised`` (not
            available for the joint model).
    """
    key = keys.protein_key
    if key is None and path.suffix.lower() == ".h5mu" and PROTEIN_KEY in adata.obsm:
        key = PROTEIN_KEY
    if key is None:
        return keys
    if key not in adata.obsm:
        raise CellvaeInputError(f"--protein-key {key!r} is not in obsm of {path.name} (keys: "
                                f"{list(adata.obsm.keys()) or 'none'}); pass the key of the protein (ADT) counts.")
    if job.backed or job.semi_supervised:
        raise CellvaeInputError("The joint RNA + protein model (--protein-key, .h5mu) trains in memory and without "
                                "--semi-supervised: drop --backed / --semi-supervised.")
    log(f"{adata.obsm[key].shape[1]} proteins in obsm[{key!r}]: fitting the joint RNA + protein model")
    return dataclasses.replace(keys, protein_key=key)


def _fit(adata_model: ad.AnnData, keys: DataSettings, model_s: ModelSettings, training: TrainSettings,
         job: FitJobSettings, out: Path, log, model_given: set[str] = frozenset()) -> tuple[CountVAE, float]:
    """Build and train the CountVAE (with ``keys.protein_key``: the :class:`cellvae.RNAProteinVAE`, whose settings
    are :class:`cellvae.settings.RNAProteinSettings`' defaults and the fields of ``model_s`` named in
    ``model_given``) with checkpoints in ``out/checkpoints``. Returns (model, training seconds).

    Raises:
        CellvaeTrainingError: after saving the best weights so far to ``out/model`` (rank 0).
    """
    common = dict(layer=keys.layer, batch_key=keys.batch_key, labels_key=keys.labels_key,
                  categorical_covariate_keys=keys.categorical_covariate_keys,
                  continuous_covariate_keys=keys.continuous_covariate_keys)
    if keys.protein_key:
        vae = RNAProteinVAE(adata_model, protein_key=keys.protein_key, **common,
                            settings=build(RNAProteinSettings, None,
                                           {k: v for k, v in as_dict(model_s).items() if k in model_given}))
    else:
        vae = CountVAE(adata_model, **common, out_of_core=job.backed, settings=model_s)
    log(f"training {vae!r}")
    t0 = time.perf_counter()
    ck_dir = out / CHECKPOINT_DIR
    if job.resume:
        log(f"resuming from {ck_dir / 'checkpoint.pt'}" if (ck_dir / "checkpoint.pt").exists()
            else f"--resume: no checkpoint in {ck_dir}; training from the beginning")
    try:
        vae.train(training, checkpoint_dir=ck_dir, resume=job.resume)
    except CellvaeTrainingError as e:
        if world()[0] != 0:
            raise
        vae.save(out / "model", overwrite=True)
        raise CellvaeTrainingError(f"{e} The model with these weights was saved to {str(out / 'model')!r}.",
                                   e.history) from e
    hist = vae.history
    if hist.get("resumed_from_epoch"):
        log(f"resumed at epoch {hist['resumed_from_epoch']}")
    log(f"trained {len(hist['epoch'])} epochs in {time.perf_counter() - t0:.1f} s "
        f"({hist['train_cells_per_second']:.0f} cells/s); best epoch {hist['best_epoch']}")
    if job.semi_supervised:
        vae = LabelTransferVAE.from_count_vae(vae, keys.labels_key, job.unlabeled_category)
        vae.train(seed=training.seed, batch_size=training.batch_size, train_size=training.train_size,
                  progress_bar=training.progress_bar, n_threads=training.n_threads,
                  accelerator=training.accelerator)
        cal = vae.calibration
        log(f"label transfer: {len(vae.labels)} labels, {len(vae.history['epoch'])} epochs; held-out accuracy "
            f"{cal['accuracy']:.3f}, ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f} at temperature "
            f"{cal['temperature']:.2f}")
    return vae, time.perf_counter() - t0


def _count_history(vae: CountVAE) -> dict:
    """The training history of the count VAE (for a label-transfer model: of the CountVAE it started from)."""
    return getattr(vae, "pretrain_history", None) or vae.history


def _annotate(adata: ad.AnnData, vae: CountVAE, modelled: np.ndarray, job: FitJobSettings, seed: int,
              log) -> tuple[ad.AnnData, bool, np.ndarray]:
    """The output AnnData: the input cells and genes (obs and var only out of core) with the latent mean, the
    normalized expression (modelled genes; zero elsewhere), UMAP and Leiden clusters. Returns (AnnData, whether
    UMAP/Leiden ran, the cells the metrics use)."""
    import scanpy as sc

    with torch_threads(None):
        latent = vae.get_latent_representation()
        norm = None if job.backed else vae.get_normalized_expression(library_size=NORMALIZED_LIBRARY_SIZE,
                                                                     return_numpy=True)
        if isinstance(norm, tuple):  # the joint model: (RNA, protein)
            norm = norm[0]
    res = ad.AnnData(obs=adata.obs.copy(), var=adata.var.copy()) if job.backed else adata.copy()
    res.obsm["X_cellvae"] = latent
    if norm is None:
        pass
    elif modelled.all() and len(vae.spec.gene_names) == adata.n_vars:
        res.layers["cellvae_normalized"] = norm
    else:  # a sparse layer: the modelled genes' columns filled, the other columns empty (implicit zeros)
        cols = adata.var_names.astype(str).get_indexer(vae.spec.gene_names)
        coo = sp.coo_matrix(norm)
        res.layers["cellvae_normalized"] = sp.csr_matrix((coo.data, (coo.row, cols[coo.col])),
                                                         shape=(adata.n_obs, adata.n_vars))
    res.var["cellvae_modelled"] = np.isin(res.var_names.astype(str), vae.spec.gene_names)
    if isinstance(vae, RNAProteinVAE):
        with torch_threads(None):
            annotate_proteins(res, vae)
    if isinstance(vae, LabelTransferVAE):
        with torch_threads(None):
            table = vae.predict_table()
        res.obs["cellvae_predicted_label"] = table["predicted_label"].to_numpy()
        res.obs["cellvae_label_confidence"] = table["label_confidence"].to_numpy()
    embed = not (job.backed and res.n_obs > BACKED_EMBED_MAX_CELLS)
    if embed:
        sc.pp.neighbors(res, use_rep="X_cellvae", random_state=seed)
        sc.tl.umap(res, random_state=seed)
        sc.tl.leiden(res, key_added="cellvae_leiden", flavor="igraph", n_iterations=2, directed=False,
                     random_state=seed)
        log(f"{res.obs['cellvae_leiden'].nunique()} Leiden clusters")
    else:
        log(f"{res.n_obs} cells: UMAP and Leiden left out (out of core above {BACKED_EMBED_MAX_CELLS} cells)")
    sub = np.arange(res.n_obs)  # clustering and batch metrics on at most METRIC_MAX_CELLS cells (seeded) out of core
    if job.backed and res.n_obs > METRIC_MAX_CELLS:
        sub = np.sort(np.random.default_rng(0).choice(res.n_obs, METRIC_MAX_CELLS, replace=False))
    return res, embed, sub


def _metrics(adata: ad.AnnData, res: ad.AnnData, vae: CountVAE, keys: DataSettings, embed: bool, sub: np.ndarray,
             train_seconds: float) -> dict:
    """Training summary, clustering agreement with the labels and batch mixing, as a dict."""
    hist = _count_history(vae)
    val = hist.get("validation_elbo") or []
    best = hist.get("best_epoch", len(val))
    metrics: dict = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_genes_modelled": len(vae.spec.gene_names),
        "n_epochs": len(hist["epoch"]),
        "best_epoch": int(best),
        "stopped_early": bool(hist.get("stopped_early", False)),
        "validation_elbo": float(val[best - 1]) if val else None,
        "train_elbo": float(hist["train_elbo"][best - 1]),
        "train_seconds": round(train_seconds, 2),
        "train_cells_per_second": round(float(hist["train_cells_per_second"]), 1),
        "n_leiden_clusters": int(res.obs["cellvae_leiden"].nunique()) if embed else None,
    }
    if isinstance(vae, LabelTransferVAE):
        cal = vae.calibration
        metrics.update(label_heldout_accuracy=cal["accuracy"], label_ece_before=cal["ece_before"],
                       label_ece_after=cal["ece_after"], label_temperature=cal["temperature"],
                       label_epochs=len(vae.history["epoch"]))
    if len(sub) < res.n_obs:
        metrics["n_cells_metrics"] = int(len(sub))
    z_sub = res.obsm["X_cellvae"][sub]
    labels = res.obs[keys.labels_key].astype(str).to_numpy() if keys.labels_key else None
    if labels is not None:
        if embed:
            lei = clustering_agreement(labels, res.obs["cellvae_leiden"].to_numpy())
            metrics.update(leiden_ari=lei["ari"], leiden_nmi=lei["nmi"])
        km = kmeans_agreement(z_sub, labels[sub], seed=0)
        metrics.update(kmeans_ari=km["ari"], kmeans_nmi=km["nmi"],
                       silhouette_labels=silhouette_labels(z_sub, labels[sub]))
    if keys.batch_key and vae.spec.n_batch >= 2:
        batches = res.obs[keys.batch_key].astype(str).to_numpy()[sub]
        try:
            metrics["batch_classifier_accuracy"] = batch_classifier_accuracy(z_sub, batches)
            metrics["batch_classifier_chance"] = 1.0 / vae.spec.n_batch
        except ValueError:  # a batch smaller than the folds
            pass
        metrics["batch_asw"] = batch_silhouette(z_sub, batches, labels[sub] if labels is not None else None)
    return metrics


def _markers(vae: CountVAE, keys: DataSettings, seed: int, out: Path, log) -> dict[str, list[str]]:
    """With a labels key and a count likelihood: Bayes-factor DE of each label against the rest, written to
    ``markers.csv``; returns the top up-regulated genes per label."""
    markers: dict[str, list[str]] = {}
    if not keys.labels_key or not vae.module.likelihood.models_counts:
        return markers
    t_de = time.perf_counter()
    with torch_threads(None):
        de = vae.differential_expression(groupby=keys.labels_key, n_samples=N_DE_SAMPLES, seed=seed)
    write_atomic(out / "markers.csv", lambda p: de.to_csv(p, index_label="gene"))
    for g, block in de.groupby("group1", sort=True):
        up = block[block["lfc_mean"] > 0]
        markers[str(g)] = [str(x) for x in up.index[:N_MARKERS]]
    log(f"marker genes for {len(markers)} labels in {time.perf_counter() - t_de:.1f} s (markers.csv)")
    return markers


def _loadings(vae: CountVAE, out: Path, log) -> list[tuple[str, str]]:
    """With a linear decoder (LDVAE): the gene loadings written to ``loadings.csv`` and a report section with the
    top genes of each latent dimension (both signs); else nothing."""
    if not getattr(vae.module, "linear_decoder", False):
        return []
    from ..analysis.loadings import top_loadings

    load = vae.get_loadings()
    write_atomic(out / "loadings.csv", lambda p: load.to_csv(p, index_label="gene"))
    top = top_loadings(load, N_TOP_LOADINGS)
    rows = []
    for dim in load.columns:
        pos = top[(top["dimension"] == dim) & (top["sign"] == "+")]["gene"].tolist()
        neg = top[(top["dimension"] == dim) & (top["sign"] == "-")]["gene"].tolist()
        rows.append([dim, ", ".join(pos), ", ".join(neg)])
    log(f"gene loadings of {load.shape[1]} latent dimensions (loadings.csv)")
    intro = ("<p class=muted>Linear decoder (LDVAE, Svensson et al. 2020): each latent dimension moves the log "
             "expression of every gene by its loading (loadings.csv, the batch norm's scale folded in). Genes with "
             f"the {N_TOP_LOADINGS} largest positive and negative loadings per dimension.</p>")
    return [("Gene loadings per latent dimension", intro + html_table(
        ["dimension", f"top {N_TOP_LOADINGS} genes (+)", f"top {N_TOP_LOADINGS} genes (-)"], rows))]


def _figures(res: ad.AnnData, hist: dict, keys: DataSettings, embed: bool, fig_dir: Path) -> list:
    """Training curves and UMAPs (by Leiden cluster, labels and batch) as (path, caption) pairs."""
    figures = [(save_figure(plot_training_curves(hist), fig_dir / "training_curves.png"),
                "Training and validation ELBO per epoch; KL warm-up.")]
    colors = [("cellvae_leiden", "Leiden clusters on the cellvae latent space")]
    if keys.labels_key:
        colors.append((keys.labels_key, f"UMAP of the latent space colored by labels ({keys.labels_key})"))
    if keys.batch_key:
        colors.append((keys.batch_key, f"UMAP of the latent space colored by batch ({keys.batch_key})"))
    for key, caption in (colors if embed else []):
        figures.append((save_figure(plot_embedding(res, key), fig_dir / f"umap_{safe_name(key)}.png"), caption))
    return figures


def _write(out: Path, path: Path, adata: ad.AnnData, res: ad.AnnData, vae: CountVAE, keys: DataSettings,
           settings: dict, metrics: dict, markers: dict, figures: list, t_start: float,
           sections: list[tuple[str, str]] | None = None) -> None:
    """Write the model, ``cellvae.h5ad`` (with ``uns['cellvae']``), ``metrics.json`` and ``report.html``."""
    res.uns["cellvae"] = plain({"settings": settings, "metrics": metrics,
                                "normalized_library_size": NORMALIZED_LIBRARY_SIZE}, for_h5ad=True)
    vae.save(out / "model", overwrite=True)
    write_h5ad_atomic(out / "cellvae.h5ad", res)
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 2)
    write_text_atomic(out / "metrics.json", json.dumps(plain({"settings": settings, "metrics": metrics}), indent=2))
    data_summary = {
        "file": path.name, "cells": adata.n_obs, "genes": adata.n_vars,
        "genes modelled": len(vae.spec.gene_names),
        "median counts per cell": float(np.median(vae.prepared_data().row_sums())),
        "batches": f"{keys.batch_key}: {', '.join(vae.spec.batch_categories)}" if keys.batch_key else "none",
        "labels": f"{keys.labels_key}: {res.obs[keys.labels_key].nunique()} categories" if keys.labels_key else "none",
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
    if keys.protein_key:
        data_summary["proteins"] = f"{len(vae.protein_names)} in obsm[{keys.protein_key!r}]"
        notes.append("Proteins: obsm['cellvae_protein_denoised'] holds the denoised protein (foreground intensity "
                     "(1 - pi) alpha beta, counts) and obsm['cellvae_protein_foreground_probability'] the foreground "
                     "probability 1 - pi of each protein and cell (totalVI, Gayoso et al. 2021); markers.csv lists "
                     "genes and proteins (<name>_protein).")
    if "batch_asw" in metrics:
        notes.append("Batch mixing: batch_classifier_accuracy is the 5-fold balanced accuracy of a logistic "
                     "regression predicting the batch from the latent space (lower = better mixed; chance = "
                     "batch_classifier_chance); batch_asw is scIB's batch silhouette (1 = fully mixed within "
                     "each label).")
    write_text_atomic(out / "report.html", render_report(path.name, data_summary, settings, training, shown, figures,
                                                         notes, markers=markers, sections=sections))


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
