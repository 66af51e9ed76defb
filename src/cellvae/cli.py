"""Command line: ``cellvae fit DATA --out DIR``, ``cellvae demo``, and on a saved model ``cellvae evaluate``,
``cellvae de`` (differential expression), ``cellvae score`` (anomaly scores), ``cellvae perturb`` and ``cellvae generate``;
``cellvae map`` maps a query onto a saved reference model (and transfers its labels)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import click

from ._version import __version__
from .errors import CellvaeInputError, CellvaeOutputError
from .settings import DataSettings, FitJobSettings, ModelSettings, TrainSettings, cli_fields

__all__ = ["main"]


def _run(fn, **kwargs):
    from .errors import CellvaeTrainingError

    try:
        return fn(**kwargs)
    except (CellvaeInputError, FileExistsError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except CellvaeOutputError as e:
        click.echo(f"error: {e}", err=True)
        # HDF5 keeps a file whose writes failed half-open, and its own clean-up at interpreter exit can crash
        # (SIGSEGV, seen with a full disk): every output is atomic and the temporary files are gone, so end here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except CellvaeTrainingError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(3)


class _Parsed(click.ParamType):
    """A click type from a settings field's ``parse`` function (e.g. ``random`` or a number)."""

    def __init__(self, parse, metavar: str):
        self.parse, self.name = parse, metavar

    def convert(self, value, param, ctx):
        try:
            return self.parse(value)
        except CellvaeInputError as e:
            self.fail(str(e), param, ctx)


def _option(f: dataclasses.Field):
    """The click option of a settings field (:func:`cellvae.settings.cli_fields`): its flag, help, default and type
    from the field's metadata and annotation; bounds become click ranges, so a bad value is refused before the job
    starts (exit status 2)."""
    meta = f.metadata
    flag, kw = meta["cli"], {"help": meta.get("help") or None, "show_default": True, "default": f.default}
    if f.type == "bool":
        secondary = meta.get("secondary")
        decl = f"{flag}/{secondary}" if secondary else flag
        if not secondary:
            kw.update(is_flag=True, show_default=False)
        return click.option(decl, f.name, **kw)
    if "choices" in meta:
        kw["type"] = click.Choice(meta["choices"])
    elif "parse" in meta:
        kw["type"] = _Parsed(meta["parse"], meta.get("metavar", "VALUE"))
    elif f.type.startswith(("int", "float")):
        integer = f.type.startswith("int")
        if "min" in meta or "max" in meta:
            rng = click.IntRange if integer else click.FloatRange
            kw["type"] = rng(min=meta.get("min"), max=meta.get("max"), min_open=meta.get("min_open", False))
        else:
            kw["type"] = int if integer else float
    if f.default is None:
        kw["show_default"] = False
    return click.option(flag, f.name, **kw)


def _fit_options(f):
    """``cellvae fit``'s options, generated from the fields of :mod:`cellvae.settings` that carry a flag."""
    options = [_option(fld) for cls in (DataSettings, ModelSettings, TrainSettings, FitJobSettings)
               for fld in cli_fields(cls)]
    options += [
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Train with this many processes on this machine (torch.distributed data parallel, "
                          "launched with torchrun; gloo on CPU, nccl on GPUs). For several machines run torchrun "
                          "yourself (see README)."),
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
def fit(data, out_dir, quiet, nproc, **kwargs):
    """Fit a count VAE to DATA (.h5ad, 10x .h5 or directory, .csv/.tsv, URL) and write the model, an
    annotated .h5ad, figures, metrics and an HTML report to --out."""
    import os

    from .jobs.fit import fit_job

    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(_launch_torchrun(nproc))
    t0 = time.perf_counter()
    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    # Only the options given on the command line: the others keep the defaults of the model that the data select
    # (e.g. the joint RNA + protein model's gene likelihood "nb" rather than CountVAE's "zinb").
    ctx = click.get_current_context()
    kwargs = {k: v for k, v in kwargs.items() if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    metrics = _run(fit_job, data=data, out_dir=out_dir, progress_bar=not quiet, log=log, **kwargs)
    if metrics:  # empty on the ranks > 0 of a multi-process run: rank 0 reports
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
    from .jobs.fit import demo_data_path, fit_job

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
    from .jobs.evaluate import evaluate_job, markdown_table

    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    result, json_path, md_path = _run(
        evaluate_job, model_dir=model_dir, data=data, labels_key=labels_key, batch_key=batch_key,
        n_samples=n_samples, cells=cells, out_dir=out_dir, seed=seed, log=log,
    )
    click.echo(markdown_table(result))
    for note in result["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"wrote {json_path} and {md_path}")


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("data")
@click.option("--groupby", required=True, help="obs column with the groups to compare (e.g. cell_type).")
@click.option("--group1", default=None, help="Group of interest (default: every group against the rest).")
@click.option("--group2", default=None, help="Reference group (default: all other cells).")
@click.option("--mode", type=click.Choice(["vanilla", "change"]), default="vanilla", show_default=True,
              help="vanilla: P(rho1 > rho2) (Lopez et al. 2018); change: P(|log2 FC| >= delta) (Boyeau et al. 2019).")
@click.option("--delta", type=float, default=0.25, show_default=True, help="LFC threshold of the change mode.")
@click.option("--fdr-target", type=float, default=0.05, show_default=True)
@click.option("--n-samples", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Posterior draws (pairs) per comparison.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="CSV file to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True)
def de(model_dir, data, groupby, group1, group2, mode, delta, fdr_target, n_samples, out, seed, quiet):
    """Bayes-factor differential expression with the model in MODEL_DIR on DATA; writes a CSV (genes x
    statistics, sorted by Bayes factor within each comparison) and prints the top genes."""
    from .jobs.analyses import de_job

    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    df, path = _run(de_job, model_dir=model_dir, data=data, groupby=groupby, out=out, group1=group1,
                    group2=group2, mode=mode, delta=delta, fdr_target=fdr_target, n_samples=n_samples, seed=seed,
                    log=log)
    for (g1, g2), block in df.groupby(["group1", "group2"], sort=False):
        top = ", ".join(block.index[:10])
        click.echo(f"{g1} vs {g2}: {top}")
    click.echo(f"wrote {path}")


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("data")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Output: .csv (cell, score, flag) or .h5ad (a copy of DATA with obs columns).")
@click.option("--method", type=click.Choice(["latent_knn", "gene_surprise", "latent_knn_gene", "elbo", "marginal_ll"]),
              default="latent_knn", show_default=True,
              help="Score: latent distance to the nearest reference cells; the worst-explained genes' "
                   "likelihood z-scores; the sum of both (z-scored); or the negative ELBO / marginal "
                   "log-likelihood with the library-size trend removed.")
@click.option("--reference", default=None,
              help="Normal cells the model was trained on (default: DATA, when it holds the training cells).")
@click.option("--quantile", type=float, default=0.99, show_default=True,
              help="Threshold = this quantile of held-out reference cells' scores.")
@click.option("--threshold", type=float, default=None, help="Fixed threshold instead of a calibrated one.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True)
def score(model_dir, data, out, method, reference, quantile, threshold, seed, quiet):
    """Anomaly scores of the cells of DATA under the model in MODEL_DIR (obs cellvae_anomaly and
    cellvae_is_anomaly)."""
    from .jobs.analyses import score_job

    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    table, path = _run(score_job, model_dir=model_dir, data=data, out=out, method=method, quantile=quantile,
                       threshold=threshold, reference=reference, seed=seed, log=log)
    click.echo(f"{int(table['cellvae_is_anomaly'].sum())} of {len(table)} cells flagged as anomalous; wrote {path}")


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("data")
@click.option("--condition-key", required=True, help="obs column of the condition (e.g. condition).")
@click.option("--control", required=True, help="Control category (e.g. ctrl).")
@click.option("--perturbed", required=True, help="Perturbed category to predict (e.g. stim).")
@click.option("--cell-type-key", default=None, help="obs column of cell types (balanced shift; --cell-type).")
@click.option("--cell-type", default=None, help="Predict only this cell type's control cells.")
@click.option("--method", type=click.Choice(["latent_arithmetic", "decoder_swap"]), default="latent_arithmetic",
              show_default=True, help="latent_arithmetic: scGen latent shift; decoder_swap: decode with the "
                                      "perturbed condition (needs a model with the condition as a covariate).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help=".h5ad of predicted cells.")
@click.option("--n-samples", type=click.IntRange(min=1), default=25, show_default=True,
              help="Posterior draws for the per-gene uncertainty (var cellvae_lfc_*; 1: none).")
@click.option("--real-data", default=None,
              help="File of real perturbed cells for the report (default: the perturbed cells in DATA).")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write an HTML report next to --out (same name, .html).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True)
def perturb(model_dir, data, condition_key, control, perturbed, cell_type_key, cell_type, method, out, n_samples,
            real_data, report, seed, quiet):
    """Predict perturbed expression of the control cells in DATA (the model's training data) with the model in
    MODEL_DIR; writes an .h5ad (X: expected counts, layers['counts']: sampled counts, var cellvae_lfc_*: posterior
    log2 fold changes) and an HTML report next to it."""
    from .jobs.analyses import perturb_job

    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    pred, path = _run(perturb_job, model_dir=model_dir, data=data, condition_key=condition_key, control=control,
                      perturbed=perturbed, out=out, cell_type_key=cell_type_key, cell_type=cell_type,
                      method=method, seed=seed, n_samples=n_samples, report=report, real_data=real_data, log=log)
    click.echo(f"predicted {pred.n_obs} cells x {pred.n_vars} genes; wrote {path}"
               + (f" and {path.with_suffix('.html')}" if report else ""))


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("data")
@click.option("--n-cells", type=click.IntRange(min=1), required=True, help="Number of cells to generate.")
@click.option("--labels-key", default=None, help="obs column of labels (with --label).")
@click.option("--label", default=None, help="Generate cells of this label (aggregated posterior of its cells).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help=".h5ad of generated cells.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True)
def generate(model_dir, data, n_cells, labels_key, label, out, seed, quiet):
    """Generate cells from the model in MODEL_DIR (attached to its training DATA): from the prior, or of one label.
    Writes an .h5ad with sampled counts in X and layers['counts'] and the decoded mean in layers['mean']."""
    from .jobs.analyses import generate_job

    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    gen, path = _run(generate_job, model_dir=model_dir, data=data, n_cells=n_cells, out=out, label=label,
                     labels_key=labels_key, seed=seed, log=log)
    click.echo(f"generated {gen.n_obs} cells x {gen.n_vars} genes; wrote {path}")


@main.command("fit-images")
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--images-key", default="images", show_default=True, help="npz key of the (n, H, W, C) images.")
@click.option("--labels-key", default=None,
              help="npz key of per-image labels (figures, linear probe); default: 'labels' when present.")
@click.option("--split-key", default="split", show_default=True,
              help="npz key of a train/test split; without it 20% of the images (seeded) are held out.")
@click.option("--n-latent", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--beta", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="KL weight after warm-up (beta-VAE; 1 = ELBO).")
@click.option("--likelihood", type=click.Choice(["gaussian", "continuous_bernoulli"]), default="gaussian",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace the contents of an existing --out directory.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fit_images(data, out_dir, quiet, **kwargs):
    """Fit a convolutional VAE to the single-cell images in DATA (.npz with images (n, H, W, C) uint8, optional
    labels/label_names and split) and write the model, latent codes, figures, metrics and an HTML report to
    --out."""
    from .jobs.fit_images import fit_images_job

    t0 = time.perf_counter()
    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    metrics = _run(fit_images_job, data=data, out_dir=out_dir, progress_bar=not quiet, log=log, **kwargs)
    for k in ("n_images", "n_epochs", "test_elbo", "test_mse_per_pixel", "probe_balanced_accuracy"):
        if metrics.get(k) is not None:
            v = metrics[k]
            click.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    click.echo(f"wall time: {time.perf_counter() - t0:.1f} s")
    click.echo(f"report: {(Path(out_dir) / 'report.html').resolve()}")


@main.command("map")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("data")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--batch-key", default=None, help="obs column of the query's batches (default: the reference's batch "
              "key if the query has it, else the query is one new batch).")
@click.option("--max-epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of query training (default: min(30, the usual heuristic)).")
@click.option("--max-missing-genes", type=click.FloatRange(0.0, 1.0), default=0.2, show_default=True,
              help="Largest fraction of the reference's genes the query may lack (they are zero-filled).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ignore-query-labels", is_flag=True, help="Predict every query cell even where the query has the "
              "reference's labels column (default: its known labels are used and kept), and report the agreement.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier job in --out.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def map_(model_dir, data, out_dir, batch_key, max_epochs, max_missing_genes, seed, ignore_query_labels, overwrite,
         quiet):
    """Map the query DATA onto the reference model in MODEL_DIR (scArches surgery: the reference stays frozen) and,
    for a model from `cellvae fit --labels-key K --semi-supervised`, transfer its labels with a calibrated
    confidence and an unknown flag. Writes the mapped model, an annotated .h5ad, figures and report.html to --out."""
    from .jobs.map import map_job

    t0 = time.perf_counter()
    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[cellvae] {m}", err=True))
    metrics = _run(map_job, model_dir=model_dir, data=data, out_dir=out_dir, batch_key=batch_key,
                   max_epochs=max_epochs, max_missing_genes=max_missing_genes, seed=seed,
                   ignore_query_labels=ignore_query_labels, overwrite=overwrite, progress_bar=not quiet, log=log)
    for k in ("n_query_cells", "n_genes_missing", "query_epochs", "n_unknown", "mean_label_confidence",
              "ilisi_reference_query", "query_label_accuracy", "query_label_balanced_accuracy"):
        if metrics.get(k) is not None:
            v = metrics[k]
            click.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    click.echo(f"wall time: {time.perf_counter() - t0:.1f} s")
    click.echo(f"report: {(Path(out_dir) / 'report.html').resolve()}")


def _launch_torchrun(nproc: int) -> int:
    """Run this same ``cellvae fit`` command (without ``--nproc``) in ``nproc`` local processes under torchrun;
    return its exit code."""
    import subprocess

    args = sys.argv[1:]
    cleaned, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cellvae.cli", *cleaned]
    click.echo(f"[cellvae] launching {nproc} processes: {' '.join(cmd)}", err=True)
    return subprocess.call(cmd)


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
