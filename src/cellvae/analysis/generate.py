"""Generate cells from a trained :class:`cellvae.CountVAE`: prior samples, label-conditional samples and
posterior-predictive samples.

The generative model (Lopez et al. 2018, Nat. Methods 15:1053) is ``z ~ N(0, I)``, ``rho = softmax(f(z, s))``,
``x_g ~ ZINB / NB / Poisson(l * rho_g, theta_g, pi_g)`` with library size ``l`` and covariates ``s``.

- :func:`sample` draws new cells: ``z`` from the prior ``N(0, I)``, or, with ``labels``, from the *aggregated
  posterior* of the training cells of that label (the mixture ``(1/n) sum_i q(z | x_i)`` over those cells; see
  ``label_sampling``); the library size is resampled from the observed library sizes of the training cells (or
  fixed, or drawn from the model's log-normal library prior when no training data are attached); covariates are
  fixed per call (default: the most frequent category of the training cells).
- :func:`posterior_predictive_sample` draws ``x* ~ p(x | z, l)`` with ``z ~ q(z | x)`` for observed cells (the
  posterior predictive check of scvi-tools' ``posterior_predictive_sample``).
- :func:`decode_latent` decodes given latent codes into normalized expression (used by :mod:`cellvae.latent`).

All randomness comes from ``seed`` (torch's global generator is forked and restored; numpy uses its own
``default_rng(seed)``), so results are reproducible on CPU.
"""

from __future__ import annotations

from typing import Mapping

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..errors import CellvaeInputError
from .protocol import TrainedModel
from ..vae.module import evaluation


__all__ = ["sample", "posterior_predictive_sample", "decode_latent", "resolve_covariates", "LABEL_SAMPLING"]

LABEL_SAMPLING = ("posterior", "gaussian")
MAX_GENERATED_VALUES = 200_000_000  # cells x genes of one call (0.8 GB per float32 layer)


# ------------------------------------------------------------------------------------------------ helpers
def _train_positions(model: TrainedModel) -> np.ndarray:
    """Positions in ``model.adata`` of the training cells (all cells with counts when unknown)."""
    if model.train_indices is not None:
        return np.asarray(model.train_indices)
    return np.flatnonzero(model.prepared_data().row_sums(absolute=True) > 0)


def _obs_str(adata: ad.AnnData, key: str) -> np.ndarray:
    col = adata.obs[key]
    return np.where(col.isna().to_numpy(), None, col.astype(str).to_numpy()).astype(object)


def resolve_covariates(model: TrainedModel, covariates: Mapping | None = None) -> tuple[dict, dict]:
    """Covariate values for generated cells.

    Args:
        model: a CountVAE.
        covariates: ``{obs_key: category}`` for the batch key and the categorical covariate keys, and
            ``{obs_key: number}`` for continuous covariate keys. Keys left out take the most frequent category
            among the training cells of ``model.adata`` (the first category of the model when no AnnData is
            attached) or, for continuous covariates, the training mean (an error without attached data).

    Returns:
        ``(codes, values)``: ``codes`` maps ``"cat"`` to the list of integer codes (batch first, as the model's
        ``cat`` tensor) and ``"cont"`` to the list of continuous values; ``values`` maps each obs key to the
        category (str) or number used.

    Raises:
        CellvaeInputError: a key that is not a covariate of the model, an unknown category, a non-numeric
            continuous value, or a continuous covariate without a value and without attached data.
    """
    spec = model.spec
    covariates = dict(covariates or {})
    cat_keys = ([spec.batch_key] if spec.batch_key else []) + list(spec.categorical_covariate_keys)
    cats_of = {k: (list(spec.batch_categories) if k == spec.batch_key else list(spec.categorical_categories[k]))
               for k in cat_keys}
    known = cat_keys + list(spec.continuous_covariate_keys)
    unknown = [k for k in covariates if k not in known]
    if unknown:
        raise CellvaeInputError(
            f"covariates {unknown} are not covariates of the model (batch_key={spec.batch_key!r}, "
            f"categorical_covariate_keys={list(spec.categorical_covariate_keys)}, continuous_covariate_keys="
            f"{list(spec.continuous_covariate_keys)})."
        )
    tr = model.adata
    pos = _train_positions(model) if tr is not None else None
    codes: list[int] = [] if spec.batch_key else [0]
    values: dict = {}
    for k in cat_keys:
        cats = cats_of[k]
        if k in covariates:
            v = str(covariates[k])
            if v not in cats:
                raise CellvaeInputError(f"Category {covariates[k]!r} of covariate {k!r} is not known to the model; "
                                        f"its categories are {cats}.")
        elif tr is not None and k in tr.obs.columns:
            col = pd.Series(_obs_str(tr, k)[pos])
            counts = col[col.isin(cats)].value_counts()
            v = str(counts.index[0]) if len(counts) else cats[0]
        else:
            v = cats[0]
        codes.append(cats.index(v))
        values[k] = v
    cont = []
    for k in spec.continuous_covariate_keys:
        if k in covariates:
            try:
                v = float(covariates[k])
            except (TypeError, ValueError):
                raise CellvaeInputError(f"Continuous covariate {k!r} needs a number, got {covariates[k]!r}.") from None
        elif tr is not None and k in tr.obs.columns:
            v = float(np.nanmean(tr.obs[k].to_numpy(dtype=float)[pos]))
        else:
            raise CellvaeInputError(f"Give a value for the continuous covariate {k!r}: covariates={{{k!r}: ...}} "
                                    "(no training AnnData is attached to take its mean from).")
        cont.append(v)
        values[k] = v
    return {"cat": codes, "cont": cont}, values


def _cov_tensors(codes: dict, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    cat = torch.as_tensor(codes["cat"], dtype=torch.int64).view(1, -1).repeat(n, 1)
    cont = (torch.as_tensor(codes["cont"], dtype=torch.float32).view(1, -1).repeat(n, 1)
            if codes["cont"] else None)
    return cat, cont


def _observed_library(model: TrainedModel, positions: np.ndarray) -> np.ndarray:
    """Total counts over the model's genes of the cells at ``positions`` of ``model.adata``."""
    return model.prepared_data(None).row_sums()[np.asarray(positions, dtype=np.int64)]


def _label_positions(model: TrainedModel, labels, labels_key: str | None) -> tuple[np.ndarray, str]:
    key = labels_key or model.labels_key
    if model.adata is None:
        raise CellvaeInputError("Sampling by label needs the training AnnData attached to the model "
                                "(CountVAE.load(path, adata=training_adata)).")
    if key is None:
        raise CellvaeInputError("Sampling by label needs labels_key (here or CountVAE(..., labels_key=...)).")
    if key not in model.adata.obs.columns:
        raise CellvaeInputError(f"labels_key {key!r} not found in obs columns {list(model.adata.obs.columns)}.")
    pos = _train_positions(model)
    lab = _obs_str(model.adata, key)[pos]
    sel = pos[lab == str(labels)]
    if len(sel) == 0:
        levels = sorted({str(v) for v in lab if v is not None})
        raise CellvaeInputError(f"Label {labels!r} has no training cells in obs[{key!r}]; labels: {levels}.")
    return sel, key


def _check_count_model(model: TrainedModel) -> None:
    model.check_trained()


@torch.no_grad()
def decode_latent(model: TrainedModel, z, covariates: Mapping | None = None, library_size: float = 1e4,
                  cat: torch.Tensor | None = None, cont: torch.Tensor | None = None) -> np.ndarray:
    """Decode latent codes into normalized expression.

    Args:
        model: a trained CountVAE.
        z: (n, n_latent) latent codes.
        covariates: covariates to decode with, as in :func:`resolve_covariates` (ignored when ``cat`` is given).
        library_size: the decoder's ``rho`` (rows sum to 1) is multiplied by it: 1e4 gives counts per 10,000
            (default), 1.0 proportions. Ignored for ``gene_likelihood="normal"`` (the Gaussian mean in log1p
            units is returned).
        cat, cont: per-cell covariate tensors (n, 1 + n_cat_covariates) int64 and (n, n_cont), instead of
            ``covariates``.

    Returns:
        float32 array (n, n_genes), genes in model order.
    """
    z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    if z.dim() != 2 or z.shape[1] != model.module.n_latent:
        raise CellvaeInputError(f"z must have shape (n, {model.module.n_latent}), got {tuple(z.shape)}.")
    if cat is None:
        codes, _ = resolve_covariates(model, covariates)
        cat, cont = _cov_tensors(codes, z.shape[0])
    was = model.module.training
    model.module.eval()
    try:
        lib = torch.zeros(z.shape[0], 1)
        rho = model.module.generative(z, lib, cat, cont)["rho"]
    finally:
        model.module.train(was)
    if not model.module.likelihood.models_counts:
        return rho.numpy().astype(np.float32)
    return (rho * float(library_size)).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------- sampling
def sample(
    model: TrainedModel,
    n_cells: int,
    covariates: Mapping | None = None,
    library_size: float | None = None,
    seed: int = 0,
    labels=None,
    labels_key: str | None = None,
    label_sampling: str = "posterior",
    batch_size: int = 1024,
) -> ad.AnnData:
    """Generate ``n_cells`` new cells from the model.

    Args:
        model: a trained :class:`cellvae.CountVAE`.
        n_cells: number of cells to generate (>= 1).
        covariates: ``{obs_key: category}`` for the batch and categorical covariates (continuous: a number);
            defaults: the most frequent category of the training cells (the model's first category without
            attached data). See :func:`resolve_covariates`.
        library_size: total counts per generated cell. None: resampled (with replacement) from the observed
            library sizes (total counts over the model's genes) of the training cells of the chosen batch (and
            label); without attached data, drawn from the model's log-normal library prior when it has one
            (``use_observed_lib_size=False``), else an error.
        seed: seeds z, the library sizes and the counts.
        labels: a category of ``labels_key``: sample z from the aggregated posterior of that label's training
            cells instead of the prior N(0, I).
        labels_key: obs column of the labels (default ``model.labels_key``).
        label_sampling: how z is drawn for ``labels``: ``"posterior"`` (default) picks training cells of the label
            uniformly with replacement and draws ``z ~ q(z | x_i)``, an exact sample of the aggregated posterior
            ``(1/n) sum_i q(z | x_i)`` of those cells; ``"gaussian"`` draws from one Gaussian moment-matched to
            that mixture: mean = mean of the posterior means, covariance = covariance of the posterior means +
            mean posterior variance (diagonal).
        batch_size: cells per forward pass when encoding label cells.

    Returns:
        AnnData (n_cells, n_genes), genes in model order. Count likelihoods: ``X`` and ``layers["counts"]``
        float32 integer-valued counts sampled from ``p(x | z, l)``; ``layers["mean"]`` the decoded mean
        ``l * rho`` (expected counts before zero-inflation); ``layers["normalized"]`` ``rho`` (rows sum to 1).
        ``"normal"`` likelihood: ``X`` a sample in log1p-normalized units and ``layers["mean"]`` its mean.
        ``obs``: ``library_size`` (counts), one column per covariate, ``label`` (with ``labels``);
        ``obsm["X_cellvae"]`` the latent codes (n_cells, n_latent); ``uns["cellvae_sample"]`` the settings.

    Raises:
        CellvaeInputError: ``n_cells < 1``, unknown covariate keys or categories, an unknown label or missing
            ``labels_key``, a bad ``label_sampling`` or ``library_size``, or no way to choose library sizes.
    """
    n = int(n_cells)
    if n < 1:
        raise CellvaeInputError(f"n_cells must be >= 1, got {n_cells}.")
    n_genes = len(model.spec.gene_names)
    if n * n_genes > MAX_GENERATED_VALUES:
        raise CellvaeInputError(
            f"n_cells={n} cells of {n_genes} genes would hold {n * n_genes:.3g} values per layer (three layers, "
            f"float32), beyond {MAX_GENERATED_VALUES:.0e}: generate at most {MAX_GENERATED_VALUES // n_genes} cells "
            "per call and concatenate the results."
        )
    if label_sampling not in LABEL_SAMPLING:
        raise CellvaeInputError(f"label_sampling must be one of {LABEL_SAMPLING}, got {label_sampling!r}.")
    if library_size is not None and not (np.isfinite(library_size) and library_size > 0):
        raise CellvaeInputError(f"library_size must be a positive number, got {library_size!r}.")
    _check_count_model(model)
    codes, values = resolve_covariates(model, covariates)
    cat, cont = _cov_tensors(codes, n)
    rng = np.random.default_rng(seed)
    spec = model.spec
    module = model.module

    label_pos, lkey = (None, None)
    if labels is not None:
        label_pos, lkey = _label_positions(model, labels, labels_key)

    # Library sizes (counts).
    normal = not model.module.likelihood.models_counts
    if normal:
        lib = np.ones(n)
        lib_source = "not used (normal likelihood)"
    elif library_size is not None:
        lib = np.full(n, float(library_size))
        lib_source = "given"
    elif model.adata is not None:
        pos = label_pos if label_pos is not None else _train_positions(model)
        if spec.batch_key is not None and spec.batch_key in model.adata.obs.columns:
            same = _obs_str(model.adata, spec.batch_key)[pos] == values[spec.batch_key]
            if same.any():
                pos = pos[same]
        tot = _observed_library(model, pos)
        tot = tot[tot > 0]
        lib = rng.choice(tot, size=n, replace=True)
        lib_source = "resampled observed library sizes of training cells"
    elif hasattr(module, "library_log_means"):
        b = codes["cat"][0]
        m, v = float(module.library_log_means[b]), float(module.library_log_vars[b])
        lib = np.exp(rng.normal(m, np.sqrt(v), size=n))
        lib_source = "log-normal library prior"
    else:
        raise CellvaeInputError("No training AnnData attached to resample library sizes from: pass library_size=... "
                                "or load the model with its training AnnData.")

    with evaluation(module, seed):
        if labels is None:
            z = torch.randn(n, module.n_latent)
            z_source = "prior N(0, I)"
        else:
            data = model.prepared_data(None)
            if label_sampling == "posterior":
                pick = rng.choice(label_pos, size=n, replace=True)
                zs = []
                for x, c, u in data.iterate(torch.as_tensor(pick, dtype=torch.int64), batch_size):
                    inf = module.inference(x, c, u)
                    zs.append(inf["qz_m"] + inf["qz_v"].sqrt() * torch.randn_like(inf["qz_m"]))
                z = torch.cat(zs)
                z_source = f"aggregated posterior of label {labels!r} (cells resampled, z ~ q(z|x))"
            else:
                ms, vs = [], []
                for x, c, u in data.iterate(torch.as_tensor(label_pos, dtype=torch.int64), batch_size):
                    inf = module.inference(x, c, u)
                    ms.append(inf["qz_m"])
                    vs.append(inf["qz_v"])
                m = torch.cat(ms).double().numpy()
                v = torch.cat(vs).double().numpy()
                mean = m.mean(0)
                cov = (np.cov(m, rowvar=False) if len(m) > 1 else np.zeros((m.shape[1], m.shape[1])))
                cov = np.atleast_2d(cov) + np.diag(v.mean(0))
                z = torch.as_tensor(rng.multivariate_normal(mean, cov, size=n, method="eigh"), dtype=torch.float32)
                z_source = f"Gaussian moment-matched to the aggregated posterior of label {labels!r}"
        log_lib = torch.as_tensor(np.log(lib), dtype=torch.float32).view(-1, 1)
        outs = {"counts": [], "mean": [], "rho": []}
        for a in range(0, n, batch_size):
            sl = slice(a, a + batch_size)
            gen = module.generative(z[sl], log_lib[sl], cat[sl], cont[sl] if cont is not None else None)
            outs["counts"].append(gen["px"].sample())
            outs["rho"].append(gen["rho"])
            outs["mean"].append(gen["rho"] if normal else gen["rho"] * torch.exp(log_lib[sl]))
    X = torch.cat(outs["counts"]).numpy().astype(np.float32)
    obs = pd.DataFrame(index=pd.Index([f"generated_{i}" for i in range(n)]))
    obs["library_size"] = lib.astype(np.float32)
    for k, v in values.items():
        obs[k] = pd.Categorical([v] * n) if isinstance(v, str) else v
    if labels is not None:
        obs["label"] = pd.Categorical([str(labels)] * n)
    var = pd.DataFrame(index=pd.Index(spec.gene_names))
    if not normal:
        X = np.round(X)
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.layers["mean"] = torch.cat(outs["mean"]).numpy().astype(np.float32)
    if not normal:
        out.layers["counts"] = X.copy()
        out.layers["normalized"] = torch.cat(outs["rho"]).numpy().astype(np.float32)
    out.obsm["X_cellvae"] = z.numpy().astype(np.float32)
    out.uns["cellvae_sample"] = {
        "z": z_source, "library": lib_source, "seed": int(seed),
        "covariates": {k: (v if isinstance(v, str) else float(v)) for k, v in values.items()},
        "labels": None if labels is None else str(labels), "labels_key": lkey,
        "label_sampling": label_sampling if labels is not None else None,
    }
    return out


def posterior_predictive_sample(
    model: TrainedModel,
    adata: ad.AnnData | None = None,
    indices=None,
    n_samples: int = 1,
    seed: int = 0,
    batch_size: int = 1024,
) -> np.ndarray:
    """Posterior predictive samples ``x* ~ p(x | z, l)``, ``z ~ q(z | x)`` (and ``l ~ q(l | x)`` for a latent
    library; otherwise the observed library size), as scvi-tools' ``posterior_predictive_sample``.

    Args:
        model: a trained CountVAE.
        adata: cells (default: the training AnnData); genes matched by name.
        indices: positions or boolean mask of the cells in ``adata`` (None: all).
        n_samples: draws per cell; each draw uses a fresh z.
        seed: seeds z and the counts.
        batch_size: cells per forward pass.

    Returns:
        float32 array of integer-valued counts (n_cells, n_genes) for ``n_samples == 1``, else
        (n_samples, n_cells, n_genes); genes in model order. For ``gene_likelihood="normal"``, samples in
        log1p-normalized units.

    Raises:
        CellvaeInputError: ``n_samples < 1``, bad ``indices``, or the causes of
            :meth:`CountVAE.get_latent_representation`.
    """
    k = int(n_samples)
    if k < 1:
        raise CellvaeInputError(f"n_samples must be >= 1, got {n_samples}.")
    data, idx = model.prepared_cells(adata, indices)
    out = []
    with evaluation(model.module, seed):
        for x, cat, cont in data.iterate(idx, batch_size):
            inf = model.module.inference(x, cat, cont, n_samples=k)
            gen = model.module.generative(inf["z"], inf["library"], cat, cont)
            s = gen["px"].sample()
            out.append(s if k > 1 else s.view(x.shape[0], -1))
    arr = torch.cat(out, dim=-2).numpy()
    if model.module.likelihood.models_counts:
        arr = np.round(arr)
    return arr.astype(np.float32)
