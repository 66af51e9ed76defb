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
                seed: int = 0, log=lambda msg: None) -> tuple[ad.AnnData, Path]:
    """Predict the ``perturbed`` state of the ``control`` cells of ``data`` (optionally one ``cell_type``) with the
    model in ``model_dir``, which is attached to ``data`` (its training data: latent arithmetic learns the shift
    from the other cell types there). Writes the predicted cells to ``out`` (.h5ad). See
    :meth:`cellvae.CountVAE.predict_perturbation`.

    Raises:
        CellvaeInputError: bad data, model, keys, categories or output path.
    """
    model, adata, path = load_model_and_data(model_dir, data, (condition_key, cell_type_key))
    out = _check_output(out, path, (".h5ad",))
    log(f"loaded {model!r}; predicting {perturbed!r} from {control!r} cells with {method}")
    with torch_threads(None):
        pred = model.predict_perturbation(adata, condition_key, control, perturbed, cell_type_key=cell_type_key,
                                          cell_type=cell_type, method=method, seed=seed)
    write_h5ad_atomic(out, pred)
    return pred, out


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
