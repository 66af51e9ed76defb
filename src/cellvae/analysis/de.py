"""Bayesian differential expression with a trained count model (:class:`cellvae.CountVAE`).

Two tests on the decoder's normalized expression ``rho_n = softmax(f(z_n, s_n))`` (the scVI "scale", one value
per gene that sums to 1 over genes; Lopez et al. 2018, Nat. Methods 15:1053), following the conventions of
scvi-tools' ``differential_expression``:

- ``mode="vanilla"`` (Lopez et al. 2018, Methods "Differential expression"): hypotheses
  ``M1: rho_1g > rho_2g`` vs ``M2: rho_1g <= rho_2g``, where ``rho_1`` and ``rho_2`` are the normalized expression
  of a random cell of group 1 and of group 2 under the variational posterior ``z ~ q(z | x)``;
  ``proba_de = P(M1 | x)`` estimated over random pairs of draws and ``bayes_factor = log(p / (1 - p))``.
  Genes up in group 1 get large positive Bayes factors, genes down in group 1 large negative ones.
- ``mode="change"`` (Boyeau et al. 2019, "Deep generative models for detecting differential expression in
  single cells", bioRxiv 794289): the effect size is the log2 fold change
  ``r_g = log2(rho_1g + c) - log2(rho_2g + c)`` (pseudocount ``c``: by default 0.1 counts in a cell of median
  size, see :func:`default_pseudocount`) and ``proba_de = P(|r_g| >= delta | x)``,
  ``bayes_factor = log(p / (1 - p))``. Genes are called DE while the posterior expected false discovery
  proportion of the called set, ``sum_{called} (1 - proba_de) / n_called``, stays at most ``fdr_target``
  (Boyeau et al. 2019, posterior expected FDR; scvi-tools ``_fdr_de_prediction``). The same call is reported in
  ``vanilla`` mode, on ``P(rho_1g > rho_2g)``.

Sampling (as scvi-tools' ``scale_sampler`` + ``pairs_sampler`` with ``n_samples_overall``): ``n_samples``
draws per group, each a cell picked uniformly at random (with replacement) from the group, one ``z`` drawn from
its ``q(z | x)`` and decoded; draw ``i`` of group 1 is paired with draw ``i`` of group 2. Draws are made and
reduced ``batch_size`` pairs at a time, so memory is ``O(batch_size x n_genes)`` plus per-gene accumulators and a
bounded buffer of log fold changes for the median: nothing of size cells x samples x genes is ever held.
Randomness is seeded (``seed``), so results are reproducible.
"""

from __future__ import annotations

from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..errors import CellvaeInputError
from .protocol import TrainedModel
from ..data.tensors import CellData
from ..vae.module import evaluation


__all__ = [
    "differential_expression",
    "one_vs_rest",
    "fdr_de_prediction",
    "default_pseudocount",
    "MODES",
]

MODES = ("vanilla", "change")
_EPS = 1e-8  # added to probabilities inside the log Bayes factor (scvi-tools' eps): |bayes_factor| <= ~18.4
_MEDIAN_MAX_ELEMENTS = 1 << 24  # log fold changes kept for the median: rows * n_genes (64 MB float32)
_REST = "rest"
_PSEUDOCOUNT_COUNTS = 0.1  # default change-mode pseudocount: 0.1 counts in a cell of median library size
_LFC_PSEUDOCOUNT_FACTOR = 1e-3  # lfc_* columns: 1e-3 x the test pseudocount (scvi-tools 1.x convention)
_TINY = 1e-30  # rho is clamped here so that log2 stays finite with a zero pseudocount


# ------------------------------------------------------------------------------------------------ helpers


def _check_count_model(model: TrainedModel) -> None:
    if not model.module.likelihood.models_counts:
        raise CellvaeInputError(
            "Differential expression needs a count likelihood (zinb, nb, poisson, zip): with gene_likelihood='normal' "
            "the decoder output is not a normalized expression that sums to 1."
        )
    model.check_trained()


def _as_positions(sel, n_obs: int, name: str) -> np.ndarray:
    """Integer positions from a boolean mask or integer indices; errors name the argument."""
    arr = np.asarray(sel)
    if arr.dtype == bool:
        if arr.shape != (n_obs,):
            raise CellvaeInputError(f"{name}: a boolean mask needs length {n_obs} (cells), got shape {arr.shape}.")
        return np.flatnonzero(arr)
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise CellvaeInputError(f"{name} must be a boolean mask or integer positions, got dtype {arr.dtype}.")
    if arr.size and (arr.min() < -n_obs or arr.max() >= n_obs):
        raise CellvaeInputError(f"{name} has positions outside [0, {n_obs}).")
    return np.unique(np.where(arr < 0, arr + n_obs, arr)).astype(np.int64)


def _group_column(adata: ad.AnnData, groupby: str | None) -> pd.Series:
    if groupby is None:
        raise CellvaeInputError("Pass groupby (an obs column naming the groups) or idx1 (a selection of cells).")
    if groupby not in adata.obs.columns:
        raise CellvaeInputError(
            f"groupby {groupby!r} is not an obs column; available columns: {list(adata.obs.columns) or 'none'}."
        )
    return adata.obs[groupby]


def _group_levels(col: pd.Series) -> list[str]:
    """Group names of an obs column as strings, in category order (or sorted), missing values excluded."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return [str(c) for c in col.cat.categories]
    return sorted(pd.unique(col.dropna().astype(str)).tolist())


def _group_mask(col: pd.Series, group, groupby: str) -> np.ndarray:
    levels = _group_levels(col)
    g = str(group)
    if g not in levels:
        shown = levels[:20] + (["..."] if len(levels) > 20 else [])
        raise CellvaeInputError(f"Group {group!r} is not a value of obs[{groupby!r}]; its groups are {shown}.")
    mask = (col.astype(str) == g).to_numpy() & col.notna().to_numpy()
    if not mask.any():
        raise CellvaeInputError(f"Group {group!r} of obs[{groupby!r}] has no cells in this AnnData.")
    return mask


def fdr_de_prediction(proba_de: np.ndarray | pd.Series, fdr_target: float = 0.05) -> np.ndarray:
    """Call genes DE while the posterior expected FDR stays at most ``fdr_target`` (Boyeau et al. 2019).

    Genes sorted by decreasing ``proba_de``; the top ``k`` are called, with ``k`` the largest number such that
    ``sum_{i <= k} (1 - p_(i)) / k <= fdr_target`` (the running mean is non-decreasing, so this is also the
    number of positions where it holds, as in scvi-tools).

    Args:
        proba_de: (n_genes,) posterior probabilities of differential expression.
        fdr_target: target posterior expected false discovery rate, in (0, 1).

    Returns:
        (n_genes,) bool array in the input order.

    Raises:
        CellvaeInputError: ``proba_de`` not one-dimensional, or ``fdr_target`` outside (0, 1).
    """
    p = np.asarray(proba_de, dtype=np.float64)
    if p.ndim != 1:
        raise CellvaeInputError(f"proba_de must be one-dimensional, got shape {p.shape}.")
    if not 0.0 < float(fdr_target) < 1.0:
        raise CellvaeInputError(f"fdr_target must be in (0, 1), got {fdr_target}.")
    order = np.argsort(-p, kind="stable")
    running = np.cumsum(1.0 - p[order]) / np.arange(1, len(p) + 1)
    k = int((running <= fdr_target).sum())
    out = np.zeros(len(p), dtype=bool)
    out[order[:k]] = True
    return out


def default_pseudocount(library_sizes: np.ndarray, counts: float = _PSEUDOCOUNT_COUNTS) -> float:
    """Default pseudocount of the ``change`` test: the normalized expression of ``counts`` (0.1) counts in a cell
    of median library size, ``counts / median(library_sizes)``.

    Fold changes of genes expressed well below 0.1 expected counts per cell in both groups are shrunk towards 0
    (their ratios are noise), as intended by the pseudocount of Boyeau et al. 2019. scvi-tools instead estimates
    it as the 0.9 quantile of the largest sampled expression of genes with mean raw count below 0.01 in a group;
    on gene sets filtered for expression (e.g. Kang et al. 2018, 1,267 genes) only a handful of genes qualify,
    and that estimate (0.032 for stimulated vs control cells, above the expression of most genes) hid the whole
    interferon response in ``change`` mode.

    Args:
        library_sizes: total counts of the compared cells.
        counts: counts in a median cell that the pseudocount stands for.

    Returns:
        The pseudocount, in units of normalized expression (fraction of a cell's counts).
    """
    lib = np.asarray(library_sizes, dtype=np.float64)
    med = float(np.median(lib[lib > 0])) if (lib > 0).any() else 1.0
    return float(counts) / med


# ----------------------------------------------------------------------------------------------- sampling
def _decode_rho(module, data: CellData, cells: np.ndarray, batch_codes: np.ndarray | None) -> torch.Tensor:
    """(len(cells), n_genes) normalized expression of one ``z ~ q(z | x)`` per listed cell (repeats allowed),
    decoded in each cell's own batch or in ``batch_codes`` (one per cell)."""
    x, cat, cont = data.batch(torch.as_tensor(cells, dtype=torch.int64))
    inf = module.inference(x, cat, cont)
    if batch_codes is not None:
        cat = cat.clone()
        cat[:, 0] = torch.as_tensor(batch_codes, dtype=cat.dtype)
    lib = torch.zeros(x.shape[0], 1)  # rho does not depend on the library size
    return module.generative(inf["z"], lib, cat, cont)["rho"]


def _pair_chunks(module, data, cells1, cells2, n_samples, batch_size, seed, batch_codes):
    """Yield (rho1, rho2) chunks of paired draws; identical sequence for identical arguments (seeded)."""
    rng = np.random.default_rng(seed)
    with evaluation(module, seed):
        done = 0
        while done < n_samples:
            m = min(batch_size, n_samples - done)
            # both draws of pair i are decoded in the same batch; batches cycle over the pairs
            b = None if batch_codes is None else batch_codes[np.arange(done, done + m) % len(batch_codes)]
            d1 = rng.choice(cells1, size=m, replace=True)
            d2 = rng.choice(cells2, size=m, replace=True)
            yield _decode_rho(module, data, d1, b).double(), _decode_rho(module, data, d2, b).double()
            done += m


def _raw_stats(data: CellData, cells1: np.ndarray, cells2: np.ndarray, chunk: int = 4096) -> dict:
    """Per-gene raw-count summaries of two groups (scvi-tools' ``scrna_raw_counts_properties``); counts are
    normalized by the cells' library sizes (``data.row_sums()``: the totals of the rows, or of the RNA block of a
    joint RNA + protein model)."""
    library = data.row_sums()

    def stats(cells):
        g = data.n_genes
        s, nz, sn = np.zeros(g), np.zeros(g), np.zeros(g)
        libs = []
        for a in range(0, len(cells), chunk):
            idx = cells[a:a + chunk]
            x = data.rows(idx).toarray().astype(np.float64)
            tot = np.asarray(library, dtype=np.float64)[idx].reshape(-1, 1)
            libs.append(tot.ravel())
            s += x.sum(0)
            nz += (x != 0).sum(0)
            sn += (x * (1e4 / np.maximum(tot, 1.0))).sum(0)
        n = max(len(cells), 1)
        return s / n, nz / n, sn / n, np.concatenate(libs) if libs else np.zeros(0)

    m1, z1, n1, l1 = stats(cells1)
    m2, z2, n2, l2 = stats(cells2)
    return {"raw_mean1": m1, "raw_mean2": m2, "non_zeros_proportion1": z1, "non_zeros_proportion2": z2,
            "raw_normalized_mean1": n1, "raw_normalized_mean2": n2, "_library": np.r_[l1, l2]}


def _bayes_factors(module, data, cells1, cells2, mode, delta, n_samples, batch_size, seed, batch_codes,
                   pseudocount, raw) -> dict:
    g = data.n_genes
    if pseudocount is None:
        pseudocount = default_pseudocount(raw["_library"])
    c = float(pseudocount)
    c_lfc = _LFC_PSEUDOCOUNT_FACTOR * c
    n_keep = max(1, min(n_samples, _MEDIAN_MAX_ELEMENTS // max(g, 1)))
    keep = torch.empty(n_keep, g, dtype=torch.float32)
    n_kept = 0
    z = lambda: torch.zeros(g, dtype=torch.float64)  # noqa: E731
    n_gt, s1, s2, n_up, n_down, s_lfc, ss_lfc = z(), z(), z(), z(), z(), z(), z()
    lfc_min = torch.full((g,), np.inf, dtype=torch.float64)
    lfc_max = torch.full((g,), -np.inf, dtype=torch.float64)
    n = 0
    for r1, r2 in _pair_chunks(module, data, cells1, cells2, n_samples, batch_size, seed, batch_codes):
        n += r1.shape[0]
        n_gt += (r1 > r2).sum(0)
        s1 += r1.sum(0)
        s2 += r2.sum(0)
        r1, r2 = r1.clamp(min=_TINY), r2.clamp(min=_TINY)
        if mode == "change":
            lfc_test = torch.log2(r1 + c) - torch.log2(r2 + c)
            n_up += (lfc_test >= delta).sum(0)
            n_down += (lfc_test <= -delta).sum(0)
        lfc = torch.log2(r1 + c_lfc) - torch.log2(r2 + c_lfc)
        s_lfc += lfc.sum(0)
        ss_lfc += (lfc * lfc).sum(0)
        lfc_min = torch.minimum(lfc_min, lfc.min(0).values)
        lfc_max = torch.maximum(lfc_max, lfc.max(0).values)
        take = min(n_keep - n_kept, lfc.shape[0])
        if take > 0:  # draws are i.i.d., so the first rows are a uniform subset
            keep[n_kept:n_kept + take] = lfc[:take].float()
            n_kept += take
    mean = s_lfc / n
    std = torch.sqrt(torch.clamp(ss_lfc / n - mean * mean, min=0.0))
    if mode == "vanilla":
        p = (n_gt / n).numpy()
    else:
        p = ((n_up + n_down) / n).numpy()
    return {
        "proba_de": p,
        "proba_not_de": 1.0 - p,
        "bayes_factor": np.log(p + _EPS) - np.log(1.0 - p + _EPS),
        "scale1": (s1 / n).numpy(),
        "scale2": (s2 / n).numpy(),
        "pseudocounts": np.full(g, c),
        "delta": np.full(g, float(delta)),
        "lfc_mean": mean.numpy(),
        "lfc_median": np.median(keep[:n_kept].numpy(), axis=0).astype(np.float64),
        "lfc_std": std.numpy(),
        "lfc_min": lfc_min.numpy(),
        "lfc_max": lfc_max.numpy(),
    }


# ------------------------------------------------------------------------------------------------- public
def differential_expression(
    model: TrainedModel,
    adata: ad.AnnData | None = None,
    groupby: str | None = None,
    group1: str | Sequence[str] | None = None,
    group2: str | None = None,
    idx1: np.ndarray | Sequence[int] | Sequence[bool] | None = None,
    idx2: np.ndarray | Sequence[int] | Sequence[bool] | None = None,
    mode: str = "vanilla",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    n_samples: int = 5000,
    batch_size: int = 512,
    batch_correction: bool = False,
    pseudocount: float | None = None,
    all_stats: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Bayesian differential expression between two groups of cells, as scvi-tools' ``differential_expression``.

    Normalized expression (the decoder's ``rho``, fraction of a cell's counts per gene) is sampled from the
    variational posterior for ``n_samples`` random cells of each group (one ``z ~ q(z | x)`` per draw, cells
    drawn with replacement), draws are paired, and per gene:

    - ``mode="vanilla"`` (Lopez et al. 2018): ``proba_de = P(rho1 > rho2)``, the probability that the gene is
      higher in group 1; ``bayes_factor = log(proba_de / (1 - proba_de))`` (natural log, scvi-tools' eps 1e-8
      inside the logs). Markers of group 1 have large positive values; genes lower in group 1 large negative.
    - ``mode="change"`` (Boyeau et al. 2019): ``proba_de = P(|lfc| >= delta)`` with
      ``lfc = log2(rho1 + c) - log2(rho2 + c)``; ``bayes_factor = log(proba_de / (1 - proba_de))`` (up- and
      down-regulated genes alike; use the sign of ``lfc_mean`` for the direction).

    Args:
        model: a trained :class:`cellvae.CountVAE` with a count likelihood.
        adata: cells to compare (default: the model's AnnData); genes are matched to the model by name.
        groupby: obs column holding the groups (values compared as strings).
        group1: the group of interest; a list runs one comparison per entry; None (with ``idx1`` None) runs
            every group of ``groupby`` against ``group2`` or the rest (see :func:`one_vs_rest`).
        group2: the reference group; None: all cells not in ``group1`` ("rest", one-vs-rest).
        idx1, idx2: instead of ``groupby``, cell selections (boolean masks or integer positions in ``adata``);
            ``idx2`` None: the rest. Comparison labels are then ``"idx1"`` and ``"idx2"`` / ``"rest"``.
        mode: ``"vanilla"`` or ``"change"``.
        delta: log2 fold-change threshold of ``mode="change"`` (0.25, scvi-tools' default); also reported.
        fdr_target: target posterior expected FDR of the ``is_de_fdr_<fdr_target>`` column.
        n_samples: draws per group, i.e. pairs (5000, scvi-tools' ``n_samples_overall``).
        batch_size: pairs decoded and reduced at a time (working memory: a few ``batch_size x n_genes`` float64
            arrays, plus per-gene accumulators and at most 2**24 float32 log fold changes for the median).
        batch_correction: False (scvi-tools' default): each draw is decoded in the cell's own batch. True: both
            draws of a pair are decoded in the same batch category, cycling over the model's batches (equal
            shares), so that pairs compare the groups within a batch (needs a model with ``batch_key``).
        pseudocount: ``c`` added to ``rho`` before ``log2`` in the ``change`` test, which shrinks the fold
            changes of barely expressed genes towards 0 (Boyeau et al. 2019). None: 0.1 counts in a cell of
            median library size among the compared cells (:func:`default_pseudocount`). The ``lfc_*`` columns use
            ``1e-3 * c``, a nearly unshrunk log2 fold change, as scvi-tools 1.x does.
        all_stats: add the raw-count summaries.
        seed: seed of the draws (results are reproducible for a given seed).

    Returns:
        DataFrame with one row per gene of the model (index: gene names), sorted by ``bayes_factor``
        descending (ties broken by ``lfc_mean``, descending in ``vanilla``, by absolute value in ``change``),
        columns:

        - ``proba_de``, ``proba_not_de`` (= 1 - proba_de), ``bayes_factor`` (natural log);
        - ``scale1``, ``scale2``: mean sampled normalized expression per group (fraction of counts);
        - ``pseudocounts`` (``c`` of the change test), ``delta``;
        - ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max``: the posterior distribution of
            the log2 fold change ``log2(rho1 + c') - log2(rho2 + c')``, ``c' = 1e-3 c``, over the pairs (the median
            from at most ``2**24 / n_genes`` pairs);
        - ``is_de_fdr_<fdr_target>``: DE call at posterior expected FDR ``fdr_target`` (:func:`fdr_de_prediction`;
            in ``vanilla`` mode this calls genes higher in group 1);
        - with ``all_stats``: ``raw_mean1``, ``raw_mean2`` (mean counts per cell), ``non_zeros_proportion1``,
            ``non_zeros_proportion2``, ``raw_normalized_mean1``, ``raw_normalized_mean2`` (mean counts per 10,000
            of the cell's counts over the model's genes);
        - ``comparison`` (``"<group1> vs <group2>"``), ``group1``, ``group2``.

        Several comparisons (a list or None as ``group1``) are concatenated, each sorted.

    Raises:
        CellvaeInputError (a ``ValueError``): unknown ``mode``; ``delta <= 0`` in change mode; ``fdr_target``
            outside (0, 1); ``n_samples`` or ``batch_size`` < 1; no ``groupby``/``idx1``; a ``groupby`` that is not
            an obs column; a group that is not a value of the column or that has no cells; an empty rest or
            selection; the same cells in both groups; ``batch_correction`` without batches; a model with
            ``gene_likelihood="normal"``; and the data errors of ``CountVAE.get_latent_representation``.
    """
    if mode not in MODES:
        raise CellvaeInputError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode == "change" and not float(delta) > 0:
        raise CellvaeInputError(f"delta must be positive in mode='change', got {delta}.")
    if not 0.0 < float(fdr_target) < 1.0:
        raise CellvaeInputError(f"fdr_target must be in (0, 1), got {fdr_target}.")
    if int(n_samples) < 1 or int(batch_size) < 1:
        raise CellvaeInputError(f"n_samples and batch_size must be at least 1, got {n_samples} and {batch_size}.")
    if pseudocount is not None and not float(pseudocount) >= 0:
        raise CellvaeInputError(f"pseudocount must be non-negative or None, got {pseudocount}.")
    _check_count_model(model)
    adata_ = adata if adata is not None else model.adata
    if adata_ is None:
        raise CellvaeInputError("No AnnData attached to this model: pass adata=... .")
    kw = dict(mode=mode, delta=delta, fdr_target=fdr_target, n_samples=n_samples, batch_size=batch_size,
              batch_correction=batch_correction, pseudocount=pseudocount, all_stats=all_stats, seed=seed)

    if idx1 is None:
        col = _group_column(adata_, groupby)
        if group1 is None:
            return one_vs_rest(model, adata, groupby=groupby, group2=group2, **kw)
        if not isinstance(group1, str) and isinstance(group1, Sequence):
            return pd.concat([differential_expression(model, adata, groupby, g, group2, **kw) for g in group1])
        mask1 = _group_mask(col, group1, groupby)
        if group2 is None:
            mask2 = ~mask1
            if not mask2.any():
                raise CellvaeInputError(f"Group {group1!r} holds every cell: there is no rest to compare with.")
        else:
            if str(group2) == str(group1):
                raise CellvaeInputError(f"group1 and group2 are the same group {group1!r}.")
            mask2 = _group_mask(col, group2, groupby)
        cells1, cells2 = np.flatnonzero(mask1), np.flatnonzero(mask2)
        g1, g2 = str(group1), _REST if group2 is None else str(group2)
    else:
        cells1 = _as_positions(idx1, adata_.n_obs, "idx1")
        if len(cells1) == 0:
            raise CellvaeInputError("idx1 selects no cells.")
        if idx2 is None:
            cells2 = np.setdiff1d(np.arange(adata_.n_obs), cells1)
            if len(cells2) == 0:
                raise CellvaeInputError("idx1 selects every cell: there is no rest to compare with.")
        else:
            cells2 = _as_positions(idx2, adata_.n_obs, "idx2")
            if len(cells2) == 0:
                raise CellvaeInputError("idx2 selects no cells.")
            if np.array_equal(cells1, cells2):
                raise CellvaeInputError("idx1 and idx2 select the same cells.")
        g1, g2 = "idx1", _REST if idx2 is None else "idx2"

    batch_codes = None
    if batch_correction:
        if model.spec.batch_key is None or model.spec.n_batch < 2:
            raise CellvaeInputError("batch_correction=True needs a model trained with a batch_key of 2+ batches.")
        batch_codes = np.arange(model.spec.n_batch)

    data = model.prepared_data(adata)
    raw = _raw_stats(data, cells1, cells2)
    res = _bayes_factors(model.module, data, cells1, cells2, mode, float(delta), int(n_samples), int(batch_size),
                         seed, batch_codes, pseudocount, raw)
    if all_stats:
        res.update({k: v for k, v in raw.items() if not k.startswith("_")})
    df = pd.DataFrame(res, index=pd.Index(model.spec.gene_names, name=None))
    tie = df["lfc_mean"] if mode == "vanilla" else df["lfc_mean"].abs()
    order = np.lexsort((-tie.to_numpy(), -df["bayes_factor"].to_numpy()))
    df = df.iloc[order]
    df[f"is_de_fdr_{fdr_target}"] = fdr_de_prediction(df["proba_de"].to_numpy(), fdr_target)
    df["comparison"] = f"{g1} vs {g2}"
    df["group1"] = g1
    df["group2"] = g2
    return df


def one_vs_rest(
    model: TrainedModel,
    adata: ad.AnnData | None = None,
    groupby: str | None = None,
    groups: Sequence[str] | None = None,
    group2: str | None = None,
    **kwargs,
) -> pd.DataFrame:
    """Differential expression of every group of ``groupby`` against the rest (or against ``group2``).

    Runs :func:`differential_expression` once per group (in category order, or sorted values) and
    concatenates the frames; the ``comparison``, ``group1`` and ``group2`` columns tell them apart, the index
    repeats the gene names. Groups without cells are skipped; when ``group2`` is given, it is not compared
    with itself.

    Args:
        model, adata: as in :func:`differential_expression`.
        groupby: obs column of the groups.
        groups: the groups to test (default: all).
        group2: reference group (None: the rest of the cells).
        **kwargs: passed to :func:`differential_expression` (mode, delta, fdr_target, n_samples, ...).

    Returns:
        DataFrame (n_groups x n_genes rows), each comparison sorted by ``bayes_factor`` descending.

    Raises:
        CellvaeInputError: a ``groupby`` that is not an obs column, fewer than two groups with cells, an
            unknown group, and the errors of :func:`differential_expression`.
    """
    adata_ = adata if adata is not None else model.adata
    if adata_ is None:
        raise CellvaeInputError("No AnnData attached to this model: pass adata=... .")
    col = _group_column(adata_, groupby)
    present = set(col.dropna().astype(str))
    levels = [g for g in _group_levels(col) if g in present]
    if len(levels) < 2:
        raise CellvaeInputError(f"obs[{groupby!r}] has {len(levels)} group(s) with cells: DE needs at least 2.")
    todo = levels if groups is None else [str(g) for g in groups]
    if group2 is not None:
        todo = [g for g in todo if g != str(group2)]
    frames = [differential_expression(model, adata, groupby=groupby, group1=g, group2=group2, **kwargs)
              for g in todo]
    return pd.concat(frames)
