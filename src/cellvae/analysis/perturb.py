"""Predict the expression of perturbed cells from control cells with a trained :class:`cellvae.CountVAE`.

Two methods, both returning an AnnData of predicted perturbed cells (n_cells, n_genes) in counts units:

- ``method="latent_arithmetic"`` (scGen; Lotfollahi, Wolf & Theis 2019, "scGen predicts single-cell perturbation
  responses", Nat. Methods 16:715): the perturbation is a vector in latent space,
  ``delta = mean_z(perturbed) - mean_z(control)`` over cells of the model's training AnnData. Each control cell's
  posterior mean ``E[z | x]`` is shifted by ``delta`` and decoded. As scGen, the model is trained *without* the
  condition as a covariate (the latent space then holds the condition). When predicting one cell type
  (``cell_type``), ``delta`` uses only the *other* cell types, and is balanced across them: the mean latent code
  of each (cell type, condition) group is taken, and ``delta`` is the unweighted average over cell types of
  ``mean_z(type, perturbed) - mean_z(type, control)``, over the cell types that have training cells in both
  conditions. (scGen 2.1's ``predict`` balances by resampling every cell type, with replacement, to the size of
  the largest one, then draws equal numbers of control and perturbed cells; the unweighted mean of per-type means
  is the deterministic form of that balancing. Unlike scGen, which keeps the predicted type's control cells on the
  control side of ``delta``, only cell types with training cells of both conditions enter ``delta`` here, so that
  each term is a within-type difference.) Without ``cell_type_key`` the global means of all perturbed and all
  control training cells are used. If the model also has the condition as a covariate, latent arithmetic decodes
  with the cells' own (control) code.
- ``method="decoder_swap"`` (conditional decoding, as the counterfactual decoding of scVI's ``transform_batch``
  and of CPA, Lotfollahi et al. 2023, "Predicting cellular responses to complex perturbations in high-throughput
  screens", Mol. Syst. Biol. 19:e11517): the model must have the condition as a categorical covariate
  (``CountVAE(..., categorical_covariate_keys=[condition_key])`` or ``batch_key=condition_key``). Control cells
  are encoded with their own (control) code and decoded with the perturbed condition's code.

In both cases ``X`` of the result holds the decoded normalized expression ``rho`` (rows sum to 1 over the model's
genes) times each control cell's observed library size (its total counts over the model's genes): expected
counts, float. ``layers["counts"]`` holds integer counts sampled from the fitted likelihood ``p(x | z, l)``
(ZINB / NB / Poisson) at the same library size, so the predictions can be analysed like observed counts.

Uncertainty (``n_samples = K > 1``): each control cell's latent code is drawn K times from ``q(z | x)`` (each draw
shifted by ``delta``, or decoded with the perturbed code). Every draw is also decoded unperturbed (no shift, the
cell's own control code), so the predicted change of gene g is a paired posterior quantity per draw k:
``lfc_gk = log2(mean_cells rho_pert + c) - log2(mean_cells rho_ctrl + c)`` (pseudocount ``c`` of
:func:`cellvae.analysis.de.default_pseudocount`, 0.1 counts in a control cell of median size), as the paired
fold change of scVI's differential expression (Lopez et al. 2018; Boyeau et al. 2019). The spread of this
population change over draws is small when many cells are predicted (each draw averages over the cells); the
spread of the response between cells is given separately (quantiles over cells of each cell's own fold change).
``delta`` itself is a point estimate: neither spread says how well the shift was estimated from the training cell
types (the error that dominates in the leave-one-cell-type-out benchmark).
"""

from __future__ import annotations


import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..errors import CellvaeInputError
from .de import default_pseudocount
from .protocol import TrainedModel
from ..vae.module import evaluation


__all__ = ["predict_perturbation", "latent_delta", "condition_covariate", "METHODS", "MAX_SAMPLE_VALUES",
           "MAX_CELLS_FOR_SPREAD"]

METHODS = ("latent_arithmetic", "decoder_swap")
MAX_SAMPLE_VALUES = 200_000_000  # cells x samples x genes of return_samples=True (0.8 GB of float32)
MAX_CELLS_FOR_SPREAD = 20_000  # var cellvae_lfc_cells_q05/q95 from at most this many cells (seeded subset)


# ------------------------------------------------------------------------------------------------ helpers


def _levels(col: pd.Series) -> list[str]:
    if isinstance(col.dtype, pd.CategoricalDtype):
        return [str(c) for c in col.cat.categories if (col == c).any()]
    return sorted(pd.unique(col.dropna().astype(str)).tolist())


def _column(adata: ad.AnnData, key: str, what: str) -> np.ndarray:
    if key not in adata.obs.columns:
        raise CellvaeInputError(
            f"{what}: obs column {key!r} not found; available columns: {list(adata.obs.columns) or 'none'}."
        )
    col = adata.obs[key]
    return np.where(col.isna().to_numpy(), None, col.astype(str).to_numpy()).astype(object)


def _training_adata(model: TrainedModel) -> ad.AnnData:
    if getattr(model, "adata", None) is None:
        raise CellvaeInputError(
            "The model has no attached training AnnData (it was loaded without adata): latent arithmetic needs the "
            "training cells of both conditions. Load it with CountVAE.load(path, adata=training_adata)."
        )
    return model.adata


def condition_covariate(model: TrainedModel, condition_key: str) -> tuple[int, list[str]] | None:
    """Where ``condition_key`` sits among the model's categorical covariate codes.

    The model's ``cat`` tensor (n_cells, 1 + n_categorical_covariates) has the batch code in column 0 and the
    extra categorical covariates (``spec.categorical_covariate_keys``, in order) after it.

    Returns:
        ``(column, categories)`` when ``condition_key`` is the model's ``batch_key`` or one of its
        ``categorical_covariate_keys``; None otherwise.
    """
    spec = model.spec
    if spec.batch_key is not None and spec.batch_key == condition_key:
        return 0, list(spec.batch_categories)
    if condition_key in spec.categorical_covariate_keys:
        return 1 + list(spec.categorical_covariate_keys).index(condition_key), list(
            spec.categorical_categories[condition_key]
        )
    return None


def _latent_mean(model: TrainedModel, data, idx: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean over cells ``idx`` of the posterior means ``E[z | x]`` (n_latent,)."""
    tot = None
    for x, cat, cont in data.iterate(torch.as_tensor(idx, dtype=torch.int64), batch_size):
        s = model.module.inference(x, cat, cont)["qz_m"].sum(0)
        tot = s if tot is None else tot + s
    return (tot / len(idx)).numpy().astype(np.float64)


def latent_delta(
    model: TrainedModel,
    condition_key: str,
    control: str,
    perturbed: str,
    cell_type_key: str | None = None,
    exclude_cell_types=None,
    batch_size: int = 1024,
) -> tuple[np.ndarray, dict]:
    """scGen's perturbation vector ``delta`` in the latent space of ``model``, from its training AnnData.

    Args:
        model: a trained CountVAE with its training AnnData attached (``model.adata``).
        condition_key: obs column of the condition; ``control`` and ``perturbed`` are two of its categories.
        cell_type_key: obs column of cell types. Given: ``delta`` is the unweighted mean over cell types (that
            have cells in both conditions and are not excluded) of per-type differences of mean latent codes.
            None: the difference of the global means over all perturbed and all control cells.
        exclude_cell_types: cell types left out (the one being predicted), a string or a list.
        batch_size: cells per forward pass.

    Returns:
        ``(delta, info)``: float64 array (n_latent,) and a dict with the cell types used and cell counts.

    Raises:
        CellvaeInputError: no attached AnnData, missing obs columns, unknown categories, or no cell type with
            training cells in both conditions.
    """
    tr = _training_adata(model)
    cond = _column(tr, condition_key, "model.adata (training data)")
    levels = _levels(tr.obs[condition_key])
    for name, val in (("control", control), ("perturbed", perturbed)):
        if str(val) not in levels:
            raise CellvaeInputError(
                f"{name}={val!r} is not a category of obs[{condition_key!r}] in the model's training data: {levels}."
            )
    data = model.prepared_data(None)
    is_c, is_p = cond == str(control), cond == str(perturbed)
    info: dict = {"balance": None, "cell_types": None}
    with evaluation(model.module, None):
        if cell_type_key is None:
            if not is_p.any() or not is_c.any():
                raise CellvaeInputError("No training cells of the control or the perturbed condition.")
            delta = _latent_mean(model, data, np.flatnonzero(is_p), batch_size) - _latent_mean(
                model, data, np.flatnonzero(is_c), batch_size
            )
            info.update(balance="global means", n_control=int(is_c.sum()), n_perturbed=int(is_p.sum()))
            return delta, info
        ct = _column(tr, cell_type_key, "model.adata (training data)")
        excl = {str(exclude_cell_types)} if isinstance(exclude_cell_types, str) else {
            str(c) for c in (exclude_cell_types or [])}
        diffs, used = [], {}
        for t in _levels(tr.obs[cell_type_key]):
            if t in excl:
                continue
            ic, ip = np.flatnonzero(is_c & (ct == t)), np.flatnonzero(is_p & (ct == t))
            if len(ic) == 0 or len(ip) == 0:
                continue
            diffs.append(_latent_mean(model, data, ip, batch_size) - _latent_mean(model, data, ic, batch_size))
            used[t] = {"n_control": int(len(ic)), "n_perturbed": int(len(ip))}
    if not diffs:
        raise CellvaeInputError(
            f"No cell type of obs[{cell_type_key!r}] other than {sorted(excl)} has training cells of both "
            f"{control!r} and {perturbed!r} in the model's training data: the perturbation vector cannot be estimated."
        )
    info.update(balance="unweighted mean of per-cell-type mean differences", cell_types=used)
    return np.mean(diffs, axis=0), info


# --------------------------------------------------------------------------------------------- prediction
def predict_perturbation(
    model: TrainedModel,
    adata_ctrl: ad.AnnData,
    condition_key: str,
    control: str,
    perturbed: str,
    cell_type_key: str | None = None,
    cell_type: str | None = None,
    method: str = "latent_arithmetic",
    n_samples: int = 1,
    seed: int = 0,
    batch_size: int = 1024,
    return_samples: bool = False,
) -> ad.AnnData:
    """Predict how control cells would look under the perturbed condition.

    Args:
        model: a trained :class:`cellvae.CountVAE` with a count likelihood (zinb, nb, poisson, zip) whose training
            AnnData (``model.adata``) holds ``condition_key`` (and ``cell_type_key``) in obs.
        adata_ctrl: cells to perturb, raw counts as for the model (same ``layer``; genes matched by name). The
            cells used are those with ``obs[condition_key] == control`` (all cells when the column is absent) and,
            when ``cell_type`` is given and ``adata_ctrl`` has ``cell_type_key``, ``obs[cell_type_key] == cell_type``.
        condition_key: obs column of the condition (e.g. ``"condition"``).
        control, perturbed: its control and perturbed categories (e.g. ``"ctrl"``, ``"stim"``).
        cell_type_key: obs column of cell types in the training data (latent arithmetic: balance ``delta`` over
            cell types). None: ``delta`` from the global means.
        cell_type: the cell type being predicted; latent arithmetic leaves it out of ``delta`` (scGen's
            leave-one-cell-type-out setting). Needs ``cell_type_key``.
        method: ``"latent_arithmetic"`` (scGen) or ``"decoder_swap"`` (decode with the perturbed condition code;
            needs the condition as a categorical covariate of the model). See the module docstring.
        n_samples: 1 decodes the posterior mean of z (scGen); K > 1 averages ``X`` over K draws
            ``z ~ q(z | x)`` (each shifted by ``delta`` for latent arithmetic; ``layers["counts"]`` is sampled at
            the first draw) and adds the posterior samples of the population response (``varm``, ``var``; see
            Returns and the module docstring).
        seed: seeds the z draws and the sampled counts (torch's global generator is restored afterwards).
        batch_size: cells per forward pass.
        return_samples: with K > 1, also return every cell's K draws of expected counts in
            ``obsm["cellvae_samples"]`` (n_cells, K, n_genes); refused above :data:`MAX_SAMPLE_VALUES` values.

    Returns:
        AnnData (n_cells, n_genes) with the model's genes in model order (``var_names == model.spec.gene_names``):
        ``X`` float32 expected counts ``rho * library`` (library = each control cell's observed total counts over
        the model's genes); ``layers["counts"]`` float32 integer-valued counts sampled from the model's
        likelihood; ``obs`` copied from the selected control cells with ``obs[condition_key]`` set to
        ``perturbed`` and ``obs["cellvae_source_condition"]`` the original condition; ``obsm["X_cellvae"]`` the
        (shifted) latent codes (n_cells, n_latent); ``uns["cellvae_perturbation"]`` the settings (and ``delta``).
        With ``n_samples = K > 1`` also: ``varm["cellvae_perturbed_samples"]`` and
        ``varm["cellvae_control_samples"]`` (n_genes, K) float32, the mean over the predicted cells of the
        normalized expression ``rho`` (fraction of a cell's counts) of each draw, perturbed and decoded unperturbed
        from the same draw; ``var`` columns ``cellvae_lfc_mean``, ``cellvae_lfc_sd``, ``cellvae_lfc_q05``,
        ``cellvae_lfc_q95`` (log2 fold change perturbed / control of the population means, over the K draws,
        pseudocount in ``uns["cellvae_perturbation"]["pseudocount"]``) and ``cellvae_lfc_cells_q05``,
        ``cellvae_lfc_cells_q95`` (the 5 % / 95 % quantiles over cells of each cell's own log2 fold change,
        averaged over its draws: how differently cells respond; from at most :data:`MAX_CELLS_FOR_SPREAD` cells);
        with ``return_samples`` ``obsm["cellvae_samples"]``.

    Raises:
        CellvaeInputError: unknown method, a Gaussian (``"normal"``) likelihood, no attached training AnnData
            (latent arithmetic), missing obs columns, ``control``/``perturbed``/``cell_type`` not among the
            categories, no control cells to perturb, the condition not a covariate of the model (decoder swap),
            no training cells of both conditions in other cell types (latent arithmetic), ``n_samples < 1``,
            ``return_samples`` with ``n_samples < 2`` or above :data:`MAX_SAMPLE_VALUES` values.
    """
    if method not in METHODS:
        raise CellvaeInputError(f"method must be one of {METHODS}, got {method!r}.")
    if not model.module.likelihood.models_counts:
        raise CellvaeInputError(
            "Perturbation prediction needs a count likelihood (zinb, nb, poisson or zip); gene_likelihood='normal' "
            "has no normalized expression or count distribution to sample from."
        )
    if int(n_samples) < 1:
        raise CellvaeInputError(f"n_samples must be >= 1, got {n_samples}.")
    if return_samples and int(n_samples) < 2:
        raise CellvaeInputError(
            f"return_samples=True needs n_samples >= 2 posterior draws, got n_samples={n_samples}.")
    if str(control) == str(perturbed):
        raise CellvaeInputError(f"control and perturbed are the same category {control!r}.")
    if cell_type is not None and cell_type_key is None:
        raise CellvaeInputError("cell_type needs cell_type_key (the obs column of cell types).")
    model.check_trained()
    control, perturbed = str(control), str(perturbed)

    # Categories known to the model for this condition.
    cov = condition_covariate(model, condition_key)
    if method == "decoder_swap":
        if cov is None:
            raise CellvaeInputError(
                f"method='decoder_swap' needs the condition {condition_key!r} as a categorical covariate of the "
                f"model, which has batch_key={model.spec.batch_key!r} and categorical_covariate_keys="
                f"{list(model.spec.categorical_covariate_keys)}: train with "
                f"CountVAE(adata, categorical_covariate_keys=[{condition_key!r}], ...), or use "
                "method='latent_arithmetic'."
            )
        known = cov[1]
    else:
        tr = _training_adata(model)
        _column(tr, condition_key, "model.adata (training data)")
        known = _levels(tr.obs[condition_key])
    for name, val in (("control", control), ("perturbed", perturbed)):
        if val not in known:
            raise CellvaeInputError(
                f"{name}={val!r} is not a category of {condition_key!r} known to the model: {known}."
            )
    if cell_type is not None:
        if method == "latent_arithmetic":
            _column(_training_adata(model), cell_type_key, "model.adata (training data)")
        types: list[str] = []
        for a in (model.adata, adata_ctrl):
            if a is not None and cell_type_key in a.obs.columns:
                types += [t for t in _levels(a.obs[cell_type_key]) if t not in types]
        if types and str(cell_type) not in types:
            raise CellvaeInputError(f"cell_type={cell_type!r} is not a category of obs[{cell_type_key!r}]: {types}.")

    # Control cells to perturb.
    sel = np.ones(adata_ctrl.n_obs, dtype=bool)
    has_cond = condition_key in adata_ctrl.obs.columns
    if has_cond:
        sel &= _column(adata_ctrl, condition_key, "adata_ctrl") == control
    if cell_type is not None and cell_type_key in adata_ctrl.obs.columns:
        sel &= _column(adata_ctrl, cell_type_key, "adata_ctrl") == str(cell_type)
    if not sel.any():
        where = f"obs[{condition_key!r}] == {control!r}" + (
            f" and obs[{cell_type_key!r}] == {cell_type!r}" if cell_type is not None else "")
        raise CellvaeInputError(f"No control cells to perturb in adata_ctrl ({where}).")
    cells = adata_ctrl[sel].copy() if not sel.all() else adata_ctrl.copy()
    if not has_cond:
        cells.obs[condition_key] = control
    data = model.spec.prepare(cells)  # genes in model order; covariate codes; checks values
    n_genes = len(model.spec.gene_names)
    if return_samples and data.n_cells * int(n_samples) * n_genes > MAX_SAMPLE_VALUES:
        raise CellvaeInputError(
            f"return_samples=True with {data.n_cells} cells x {n_samples} samples x {n_genes} genes holds more than "
            f"{MAX_SAMPLE_VALUES:.0e} values: use n_samples <= {max(MAX_SAMPLE_VALUES // (data.n_cells * n_genes), 1)}"
            ", fewer cells, or return_samples=False (the per-gene summaries in varm/var need no per-cell samples)."
        )

    # Perturbation in latent space or in the decoder's condition code.
    delta_info: dict = {}
    delta = None
    if method == "latent_arithmetic":
        delta, delta_info = latent_delta(
            model, condition_key, control, perturbed, cell_type_key=cell_type_key,
            exclude_cell_types=cell_type, batch_size=batch_size,
        )
        delta_t = torch.as_tensor(delta, dtype=torch.float32)
    else:
        col, cats = cov
        pert_code = cats.index(perturbed)

    n_samples = int(n_samples)
    xs, counts, zs, per_cell, cell_lfc = [], [], [], [], []
    rho_pert = rho_ctrl = None  # (K, n_genes) sums over cells of rho per draw
    pseudocount = None
    keep_rows = None
    if n_samples > 1:
        with torch.no_grad():
            lib_all = torch.cat([x.sum(-1) for x, _, _ in data.iterate(torch.arange(data.n_cells), batch_size)])
        pseudocount = default_pseudocount(lib_all.numpy())
        keep_rows = np.ones(data.n_cells, dtype=bool)
        if data.n_cells > MAX_CELLS_FOR_SPREAD:  # the spread over cells from a seeded subset
            keep_rows[:] = False
            keep_rows[np.random.default_rng(seed).choice(data.n_cells, MAX_CELLS_FOR_SPREAD, replace=False)] = True
    start = 0
    with evaluation(model.module, seed):
        for x, cat, cont in data.iterate(torch.arange(data.n_cells), batch_size):
            inf = model.module.inference(x, cat, cont, n_samples=n_samples)
            z0 = inf["qz_m"] if n_samples == 1 else inf["z"]
            lib = torch.log(x.sum(-1, keepdim=True).clamp(min=1.0))  # observed library of the control cell
            gcat = cat
            if method == "latent_arithmetic":
                z = z0 + delta_t
            else:
                z = z0
                gcat = cat.clone()
                gcat[:, col] = pert_code
            if n_samples > 1:
                lib = lib.expand(n_samples, *lib.shape)
            gen = model.module.generative(z, lib, gcat, cont)
            mean = gen["rho"] * torch.exp(lib)
            sample = gen["px"].sample()
            if n_samples > 1:
                # the same draws decoded unperturbed (no random numbers used): paired control for the fold change
                rho0 = model.module.generative(z0, lib, cat, cont)["rho"]
                sp, sc = gen["rho"].sum(1).double(), rho0.sum(1).double()
                rho_pert = sp if rho_pert is None else rho_pert + sp
                rho_ctrl = sc if rho_ctrl is None else rho_ctrl + sc
                rows = torch.as_tensor(keep_rows[start:start + x.shape[0]])
                if bool(rows.any()):  # each cell's posterior mean log2 fold change (cells, genes)
                    lc = (torch.log2(gen["rho"][:, rows].double() + pseudocount)
                          - torch.log2(rho0[:, rows].double() + pseudocount)).mean(0)
                    cell_lfc.append(lc.to(torch.float32))
                if return_samples:
                    per_cell.append(mean.transpose(0, 1).to(torch.float32))  # (cells, K, genes)
                mean, sample, z = mean.mean(0), sample[0], z[0]
            xs.append(mean)
            counts.append(sample)
            zs.append(z)
            start += x.shape[0]
    X = torch.cat(xs).numpy().astype(np.float32)
    C = np.round(torch.cat(counts).numpy()).astype(np.float32)

    obs = cells.obs.copy()
    src = obs[condition_key].astype(str) if condition_key in obs.columns else control
    obs["cellvae_source_condition"] = src
    cond_cats = list(dict.fromkeys([*known, perturbed]))
    obs[condition_key] = pd.Categorical([perturbed] * len(obs), categories=cond_cats)
    var = pd.DataFrame(index=pd.Index(model.spec.gene_names, name=cells.var_names.name))
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.layers["counts"] = C
    out.obsm["X_cellvae"] = torch.cat(zs).numpy().astype(np.float32)
    if n_samples > 1:
        pert_s = (rho_pert / data.n_cells).numpy().T  # (n_genes, K)
        ctrl_s = (rho_ctrl / data.n_cells).numpy().T
        lfc = np.log2(pert_s + pseudocount) - np.log2(ctrl_s + pseudocount)
        out.varm["cellvae_perturbed_samples"] = pert_s.astype(np.float32)
        out.varm["cellvae_control_samples"] = ctrl_s.astype(np.float32)
        out.var["cellvae_lfc_mean"] = lfc.mean(1).astype(np.float32)
        out.var["cellvae_lfc_sd"] = lfc.std(1, ddof=1).astype(np.float32)
        out.var["cellvae_lfc_q05"] = np.quantile(lfc, 0.05, axis=1).astype(np.float32)
        out.var["cellvae_lfc_q95"] = np.quantile(lfc, 0.95, axis=1).astype(np.float32)
        lc = torch.cat(cell_lfc).numpy()
        out.var["cellvae_lfc_cells_q05"] = np.quantile(lc, 0.05, axis=0).astype(np.float32)
        out.var["cellvae_lfc_cells_q95"] = np.quantile(lc, 0.95, axis=0).astype(np.float32)
        if return_samples:
            out.obsm["cellvae_samples"] = torch.cat(per_cell).numpy()
    uns = {
        "method": method, "condition_key": condition_key, "control": control, "perturbed": perturbed,
        "cell_type_key": cell_type_key, "cell_type": None if cell_type is None else str(cell_type),
        "n_samples": n_samples, "seed": int(seed), "X": "rho * observed library size (expected counts)",
        "layers_counts": "sampled from the model likelihood",
    }
    if pseudocount is not None:
        uns["pseudocount"] = float(pseudocount)
        uns["lfc"] = "log2(mean rho perturbed + pseudocount) - log2(mean rho control + pseudocount) per draw"
    if delta is not None:
        uns["delta"] = delta.astype(np.float32)
        uns["delta_balance"] = delta_info.get("balance")
        if delta_info.get("cell_types"):
            uns["delta_cell_types"] = list(delta_info["cell_types"])
    out.uns["cellvae_perturbation"] = uns
    return out
