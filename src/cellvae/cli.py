"""Command line: ``cellvae fit DATA --out DIR``, ``cellvae evaluate MODEL_DIR DATA`` and ``cellvae demo``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from . import __version__
from .data import CellvaeInputError
from .module import DISPERSIONS, GENE_LIKELIHOODS

__all__ = ["main"]


def _run(fn, **kwargs):
    from .train import CellvaeTrainingError

    try:
        return fn(**kwargs)
    except (CellvaeInputError, FileExistsError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except CellvaeTrainingError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(3)


def _fit_options(f):
    options = [
        click.option("--layer", default=None, help="Layer with raw counts (default: X)."),
        click.option("--batch-key", default=None, help="obs column of the batch covariate."),
        click.option("--labels-key", default=None, help="obs column of known cell types (metrics, figures)."),
        click.option("--gene-likelihood", type=click.Choice(GENE_LIKELIHOODS), default="zinb", show_default=True),
        click.option("--dispersion", type=click.Choice(DISPERSIONS), default="gene", show_default=True),
        click.option("--n-latent", type=int, default=10, show_default=True),
        click.option("--n-hidden", type=int, default=128, show_default=True),
        click.option("--n-layers", type=int, default=1, show_default=True),
        click.option("--max-epochs", type=int, default=None,
                     help="Default: min(400, 20000/n_cells*400), with early stopping."),
        click.option("--batch-size", type=int, default=128, show_default=True),
        click.option("--n-top-genes", type=int, default=None,
                     help="Model only this many highly variable genes (seurat_v3 on counts)."),
        click.option("--latent-library/--observed-library", default=False, show_default=True,
                     help="Latent log-normal library size instead of the observed total counts."),
        click.option("--early-stopping/--no-early-stopping", default=True, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--overwrite", is_flag=True, help="Replace the contents of an existing --out directory."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    return _add(options, f)


def _fit_only_options(f):
    options = [
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted job in --out from its last checkpoint (same data and options; "
                          "the result equals an uninterrupted run)."),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Epochs between training checkpoints in --out/checkpoints (a crash loses at most this "
                          "many)."),
    ]
    return _add(options, f)


def _add(options, f):
    for opt in reversed(options):
        f = opt(f)
    return f


@click.group()
@click.version_option(__version__, prog_name="cellvae")
def main():
    """cellvae: variational autoencoders for single-cell data."""


@main.command()
@click.argument("data")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@_fit_options
@_fit_only_options
def fit(data, out_dir, quiet, **kwargs):
    """Fit a count VAE to DATA (.h5ad, 10x .h5 or directory, .csv/.tsv, URL) and write the model, an
    annotated .h5ad, figures, metrics and an HTML report to --out."""
    from .job import fit_job

    t0 = time.perf_counter()
    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    metrics = _run(fit_job, data=data, out_dir=out_dir, progress_bar=not quiet, log=log, **kwargs)
    _summary(metrics, out_dir, time.perf_counter() - t0)


@main.command()
@click.option("--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--max-epochs", type=int, default=None)
@click.option("--overwrite/--no-overwrite", default=True, show_default=True)
@click.option("--quiet", is_flag=True)
def demo(out_dir, max_epochs, overwrite, quiet):
    """Run the main job on the default dataset: Kang et al. 2018 IFN-beta PBMCs
    (kang2018_ifnb_pbmc_muscat.h5ad from $CELLVAE_DATA_DIR; labels cell_type, batch key donor). Without that
    file, scanpy's pbmc3k dataset (10x Genomics, 2,700 PBMCs) is downloaded and used instead."""
    from .job import demo_data_path, fit_job

    t0 = time.perf_counter()
    path = demo_data_path()
    kang = path.name.startswith("kang2018")
    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    metrics = _run(
        fit_job, data=str(path), out_dir=out_dir, labels_key="cell_type" if kang else None,
        batch_key="donor" if kang else None, max_epochs=max_epochs, overwrite=overwrite,
        n_top_genes=None if kang else 2000, progress_bar=not quiet, log=log,
    )
    _summary(metrics, out_dir, time.perf_counter() - t0)


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("data")
@click.option("--labels-key", default=None, help="obs column of known cell types: KMeans/Leiden ARI and NMI, ASW.")
@click.option("--batch-key", default=None,
              help="obs column of batches: scib-metrics batch mixing (needs --labels-key and the bench extra).")
@click.option("--n-samples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Importance samples per cell for the marginal log-likelihood (scvi-tools uses 1000).")
@click.option("--cells", type=click.Choice(["auto", "validation", "all"]), default="auto", show_default=True,
              help="Cells for the likelihood metrics; auto: the model's held-out validation cells when DATA "
                   "holds them, else all.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Directory for evaluation.json and evaluation.md (default: MODEL_DIR_evaluation.json/.md "
                   "next to MODEL_DIR).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress lines.")
def evaluate(model_dir, data, labels_key, batch_key, n_samples, cells, out_dir, seed, quiet):
    """Evaluate the model in MODEL_DIR on DATA: ELBO, reconstruction error, marginal log-likelihood (nats per
    cell), clustering agreement with --labels-key and batch mixing with --batch-key. Prints a Markdown table and
    writes JSON and Markdown files."""
    from .evaluate import evaluate_job, markdown_table

    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    result, json_path, md_path = _run(
        evaluate_job, model_dir=model_dir, data=data, labels_key=labels_key, batch_key=batch_key,
        n_samples=n_samples, cells=cells, out_dir=out_dir, seed=seed, log=log,
    )
    click.echo(markdown_table(result))
    for note in result["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"wrote {json_path} and {md_path}")


def _summary(metrics: dict, out_dir: str, seconds: float) -> None:
    out = Path(out_dir)
    keys = ("n_cells", "n_genes_modelled", "n_epochs", "validation_elbo", "train_cells_per_second",
            "n_leiden_clusters", "kmeans_ari", "kmeans_nmi", "leiden_ari", "leiden_nmi")
    for k in keys:
        if metrics.get(k) is not None:
            v = metrics[k]
            click.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    click.echo(f"wall time: {seconds:.1f} s")
    click.echo(f"report: {(out / 'report.html').resolve()}")


if __name__ == "__main__":  # pragma: no cover
    main()
