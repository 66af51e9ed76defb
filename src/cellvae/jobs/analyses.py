"""Jobs behind the analysis commands of the CLI: ``cellvae de``, ``cellvae score``, ``cellvae perturb`` and
``cellvae generate``.

Each job reads a dataset, loads a saved model onto it, runs one analysis of :class:`cellvae.CountVAE` and writes
its result atomically (temporary name, then rename). The input file is never modified.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ..errors import CellvaeInputError
from ..data.read import read_data, resolve_data_path
from ..data.fileio import write_atomic, write_h5ad_atomic
from ..models.count_vae import CountVAE
from ..train.threads import torch_threads

__all__ = ["load_model_and_data", "de_job", "score_job", "perturb_job", "generate_job"]


def load_model_and_data(model_dir: str | os.PathLike, data: str | os.PathLike,
                        obs_keys: tuple[str | None, ...] = ()) -> tuple[CountVAE, ad.AnnData, Path]:
    """Read ``data`` (path, URL or name in ``$CELLVAE_DATA_DIR``), check that ``obs_keys`` exist and load the model
    in ``model_dir`` onto it (genes matched by name).

    Returns:
        (model, adata, resolved data path).

    Raises:
        CellvaeInputError: unreadable data, a missing obs key, a bad model directory, or missing genes.
    """
    path = resolve_data_path(data)
    adata = read_data(path)
    if not adata.obs_names.is_unique:
        adata.obs_names_make_unique()
    for key in obs_keys:
        if key is not None and key not in adata.obs.columns:
            raise CellvaeInputError(
                f"obs key {key!r} not found in {path.name}; available: {list(adata.obs.columns)[:20]}."
            )
    model = CountVAE.load(Path(model_dir).expanduser(), adata=adata)
    return model, adata, path


def _check_output(out: str | os.PathLike, data_path: Path, suffixes: tuple[str, ...]) -> Path:
    out = Path(out).expanduser()
    if out.suffix.lower() not in suffixes:
        raise CellvaeInputError(f"Output {out} must end with one of {suffixes}.")
    if out.exists() and out.resolve() == data_path.resolve():
        raise CellvaeInputError(f"Output {out} is the input file; choose another path (the input is never modified).")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def de_job(model_dir, data, groupby: str, out, group1: str | None = None, group2: str | None = None,
           mode: str = "vanilla", delta: float = 0.25, fdr_target: float = 0.05, n_samples: int = 5000,
           seed: int = 0, log=lambda msg: None) -> tuple[pd.DataFrame, Path]:
    """Differential expression of ``group1`` vs ``group2`` (the rest when None; every group against the rest
    when ``group1`` is None) in ``obs[groupby]``, written as CSV to ``out`` (genes as rows; one block per
    comparison, with ``group1``/``group2`` columns). See :meth:`cellvae.CountVAE.differential_expression`.

    Raises:
        CellvaeInputError: bad data, model, key, group or output path.
    """
    model, adata, path = load_model_and_data(model_dir, data, (groupby,))
    out = _check_output(out, path, (".csv",))
    log(f"loaded {model!r}; data {path.name}: {adata.n_obs} cells")
    with torch_threads(None):
        df = model.differential_expression(adata, groupby=groupby, group1=group1, group2=group2, mode=mode,
                                           delta=delta, fdr_target=fdr_target, n_samples=n_samples, seed=seed)
    write_atomic(out, lambda p: df.to_csv(p, index_label="gene"))
    return df, out


def score_job(model_dir, data, out, method: str = "latent_knn", quantile: float = 0.99,
              threshold: float | None = None, reference: str | os.PathLike | None = None, seed: int = 0,
              log=lambda msg: None) -> tuple[pd.DataFrame, Path]:
    """Anomaly scores of the cells of ``data`` against the model's training cells (or the cells of
    ``reference``), flagged above a threshold calibrated on held-out reference cells (``quantile``) unless
    ``threshold`` is given. Writes ``out``: a CSV (cell, ``cellvae_anomaly``, ``cellvae_is_anomaly``) or an
    ``.h5ad`` copy of the data with those ``obs`` columns. See :meth:`cellvae.CountVAE.annotate_anomalies`.

    Raises:
        CellvaeInputError: bad data, model or output path.
    """
    model, adata, path = load_model_and_data(model_dir, data)
    out = _check_output(out, path, (".csv", ".h5ad"))
    kwargs = {"method": method, "seed": seed}
    if reference is not None:
        ref = read_data(resolve_data_path(reference))
        train_idx, val_idx = model.split_positions(ref)
        if train_idx is not None and len(val_idx) > 0:
            kwargs["reference"], kwargs["calibration_adata"] = ref[train_idx].copy(), ref[val_idx].copy()
        else:
            log("the reference does not hold the model's training/validation cells: its cells serve as both "
                "neighbours and calibration, so the threshold may be low")
            kwargs["reference"], kwargs["calibration_adata"] = ref, ref
    elif model.train_indices is None:
        raise CellvaeInputError(
            f"{path.name} does not hold the model's training cells, so there are no reference cells to compare "
            "with: pass --reference with the (normal) data the model was trained on."
        )
    log(f"loaded {model!r}; scoring {adata.n_obs} cells with {method}")
    with torch_threads(None):
        res = model.annotate_anomalies(adata, quantile=quantile, threshold=threshold, copy=True, **kwargs)
    table = res.obs[["cellvae_anomaly", "cellvae_is_anomaly"]].copy()
    if out.suffix.lower() == ".csv":
        write_atomic(out, lambda p: table.to_csv(p, index_label="cell"))
    else:
        write_h5ad_atomic(out, res)
    log(f"{int(np.sum(table['cellvae_is_anomaly']))} of {len(table)} cells flagged; "
        f"threshold {res.uns['cellvae_anomaly']['threshold']:.4g}")
    return table, out


def perturb_job(model_dir, data, condition_key: str, control: str, perturbed: str, out,
                cell_type_key: str | None = None, cell_type: str | None = None, method: str = "latent_arithmetic",
                seed: int = 0, n_samples: int = 25, report: bool = True, real_data=None,
                log=lambda msg: None) -> tuple[ad.AnnData, Path]:
    """Predict the ``perturbed`` state of the ``control`` cells of ``data`` (optionally one ``cell_type``) with the
    model in ``model_dir``, which is attached to ``data`` (its training data: latent arithmetic learns the shift
    from the other cell types there). Writes the predicted cells to ``out`` (.h5ad) and, with ``report``, an HTML
    report next to it (``out`` with the suffix ``.html``; :mod:`cellvae.jobs.perturb_report`). See
    :meth:`cellvae.CountVAE.predict_perturbation`.

    ``X`` and ``layers['counts']`` of ``out`` are the prediction from the posterior mean of each cell's latent code
    (``n_samples=1``, as before); with ``n_samples = K > 1`` a second pass draws K posterior samples and adds their
    per-gene summaries (``var['cellvae_lfc_*']``, ``varm['cellvae_perturbed_samples']``,
    ``varm['cellvae_control_samples']``), which the report shows as intervals.

    Real perturbed cells for the report: the cells of ``real_data`` (a path or name) with
    ``obs[condition_key] == perturbed`` (all its cells when it has no such column), else those of ``data``; in
    both cases only ``cell_type`` when it is given and the column exists. Genes are matched by name.

    Raises:
        CellvaeInputError: bad data, model, keys, categories or output path; ``n_samples < 1``; real cells that
            lack some of the model's genes.
    """
    from .perturb_report import write_perturbation_report

    if int(n_samples) < 1:
        raise CellvaeInputError(f"--n-samples must be >= 1, got {n_samples}.")
    model, adata, path = load_model_and_data(model_dir, data, (condition_key, cell_type_key))
    out = _check_output(out, path, (".h5ad",))
    real, source = (_real_cells(adata, path, real_data, condition_key, perturbed, cell_type_key, cell_type,
                                list(model.spec.gene_names)) if report else (None, None))
    log(f"loaded {model!r}; predicting {perturbed!r} from {control!r} cells with {method}")
    kw = dict(cell_type_key=cell_type_key, cell_type=cell_type, method=method, seed=seed)
    with torch_threads(None):
        pred = model.predict_perturbation(adata, condition_key, control, perturbed, **kw)
        if n_samples > 1:
            log(f"drawing {n_samples} posterior samples for the per-gene uncertainty")
            post = model.predict_perturbation(adata, condition_key, control, perturbed, n_samples=n_samples, **kw)
            for col in ("cellvae_lfc_mean", "cellvae_lfc_sd", "cellvae_lfc_q05", "cellvae_lfc_q95",
                        "cellvae_lfc_cells_q05", "cellvae_lfc_cells_q95"):
                pred.var[col] = post.var[col].to_numpy()
            for key in ("cellvae_perturbed_samples", "cellvae_control_samples"):
                pred.varm[key] = post.varm[key]
            pu = post.uns["cellvae_perturbation"]
            pred.uns["cellvae_perturbation"].update(
                {"n_samples_uncertainty": int(n_samples), "pseudocount": pu["pseudocount"], "lfc": pu["lfc"]})
            pred.uns["cellvae_perturbation"]["n_samples"] = int(n_samples)
    write_h5ad_atomic(out, pred)
    if report:
        genes = list(pred.var_names)
        ctrl = adata[pred.obs_names, genes]
        settings = {"model": str(model_dir), "data": path.name, "condition_key": condition_key, "control": control,
                    "perturbed": perturbed, "cell_type_key": cell_type_key, "cell_type": cell_type,
                    "method": method, "n_samples": n_samples, "seed": seed}
        html_path = out.with_suffix(".html")
        write_perturbation_report(html_path, model, pred, ctrl, real, settings, real_source=source, seed=seed)
        log(f"wrote {html_path}")
    return pred, out


def _real_cells(adata: ad.AnnData, path: Path, real_data, condition_key: str, perturbed: str,
                cell_type_key: str | None, cell_type: str | None, genes: list[str]):
    """(real perturbed cells with the model's genes, or None; a description of where they come from)."""
    src_adata, name = adata, path.name
    if real_data is not None:
        rpath = resolve_data_path(real_data)
        src_adata, name = read_data(rpath), rpath.name
        if not src_adata.obs_names.is_unique:
            src_adata.obs_names_make_unique()
    sel = np.ones(src_adata.n_obs, dtype=bool)
    what = []
    if condition_key in src_adata.obs.columns:
        sel &= (src_adata.obs[condition_key].astype(str) == str(perturbed)).to_numpy()
        what.append(f"{condition_key} == {perturbed!r}")
    elif real_data is None:
        return None, None
    if cell_type is not None and cell_type_key in src_adata.obs.columns:
        sel &= (src_adata.obs[cell_type_key].astype(str) == str(cell_type)).to_numpy()
        what.append(f"{cell_type_key} == {cell_type!r}")
    if not sel.any():
        return None, None
    missing = [g for g in genes if g not in set(src_adata.var_names)]
    if missing:
        raise CellvaeInputError(
            f"The real perturbed cells of {name} lack {len(missing)} of the model's genes (e.g. {missing[:5]}): "
            "give a file with all the model's genes, or --no-report.")
    desc = f"{int(sel.sum())} cells of {name}" + (f" with {' and '.join(what)}" if what else "")
    return src_adata[sel][:, genes].copy(), desc


def generate_job(model_dir, data, n_cells: int, out, label: str | None = None, labels_key: str | None = None,
                 seed: int = 0, log=lambda msg: None) -> tuple[ad.AnnData, Path]:
    """Generate ``n_cells`` cells with the model in ``model_dir`` attached to its training ``data`` (library sizes
    and, with ``label``, the aggregated posterior of that label's cells come from it): from the prior, or
    conditioned on ``obs[labels_key] == label``. Writes an .h5ad of sampled counts. See
    :meth:`cellvae.CountVAE.sample`.

    Raises:
        CellvaeInputError: bad data, model, key, label or output path.
    """
    if label is not None and labels_key is None:
        raise CellvaeInputError("--label needs --labels-key (the obs column holding the labels).")
    model, adata, path = load_model_and_data(model_dir, data, (labels_key,))
    out = _check_output(out, path, (".h5ad",))
    log(f"loaded {model!r}; generating {n_cells} cells" + (f" of {labels_key}={label!r}" if label else ""))
    with torch_threads(None):
        gen = model.sample(n_cells, seed=seed, labels=label, labels_key=labels_key)
    write_h5ad_atomic(out, gen)
    return gen, out
