"""Per-cell anomaly (novelty) scores from a trained :class:`cellvae.CountVAE`: higher = more anomalous.

Methods (``method=``):

- ``"latent_knn"`` (default): mean Euclidean distance from the cell's posterior mean ``E_q[z | x]`` to its
  ``n_neighbors`` nearest reference cells in the latent space (units of the standard-normal prior of ``z``). A
  cell unlike every reference cell is encoded far from them. This is the k-nearest-neighbour novelty score used
  for query-to-reference mapping of single cells (e.g. the kNN-based uncertainty of scArches, Lotfollahi et al.
  2022, Nat. Biotechnol. 40:121), computed on the VAE's latent space.
- ``"gene_surprise"``: how badly the model explains the cell's worst-explained genes. Per gene, the negative
  log-likelihood ``-log p(x_g | z = E_q[z | x], l)`` (nats; ``l`` the observed library size, or the mean of its
  posterior when it is latent) is z-scored against the same quantity over the reference cells (per-gene mean and
  standard deviation), and the score is the mean of the ``n_top_genes`` largest z-scores (unitless). A new cell
  type is often encoded next to a known one, but its own marker genes, which no reference cell expresses, stay
  unexplained; a likelihood summed over all genes dilutes them (Nalisnick et al. 2019), the top genes do not.
- ``"latent_knn_gene"``: the sum of the ``"latent_knn"`` and ``"gene_surprise"`` scores, each z-scored against
  its distribution over the reference cells (reference kNN distances exclude the cell itself); unitless.
- ``"elbo"``: the negative evidence lower bound ``-ELBO(x) = -E_q[log p(x | z, l)] + KL(q(z | x) || p(z))``
  (+ the library KL when the library is latent), in nats per cell, averaged over ``n_samples`` draws of ``z``
  (Kingma & Welling 2014; scVI: Lopez et al. 2018, Nat. Methods 15:1053).
- ``"marginal_ll"``: ``-log p(x)``, the importance-sampled (IWAE, Burda et al. 2016) marginal log-likelihood
  with ``n_samples`` samples, from the model's ``get_marginal_ll`` (nats per cell).

Likelihood-based scores grow with the number of counts of a cell and are lower for cells with simple profiles
(the known failure of likelihoods for out-of-distribution detection: Nalisnick et al. 2019, "Do deep generative
models know what they don't know?", ICLR). ``normalize_library`` therefore defaults to ``"regress"``: the score
minus its prediction from a quadratic in log library size fitted on reference cells (raw ``-ELBO`` ranks
small-library cells as normal whatever their type). Measured on leave-one-cell-type-out benchmarks
(``benchmarks/anomaly_loo.py``, ``benchmarks/results/anomaly_loo.md``; mean AUROC over the left-out types of
each of the 9 labelled datasets in ``../shared/data``): ``latent_knn`` (the default, chosen on Zeisel, 10x PBMC
4k and Kang) averages 0.837 over the datasets (Zeisel 0.883, PBMC 4k 0.798, Kang 0.736, three-technology PBMCs
0.986, kidney 0.788, bladder 0.807, worm neurons 0.755, CBMC 0.803, mESC 0.982); ``latent_knn_gene`` 0.857
(0.936, 0.761, 0.813, 0.949, 0.859, 0.825, 0.783, 0.822, 0.968): better on 5 of the 7 datasets not used to
design it, worse on the three-technology PBMCs and mESC (both >= 0.94 either way); ``gene_surprise`` alone 0.828;
the whole-cell likelihoods 0.61-0.81 (``elbo`` + ``regress`` 0.811; rerun of 2026-12-06 at the current
defaults). Left-out types that are close relatives of a trained type (e.g. CD4 vs CD8 T cells, kidney or worm
neuron subtypes) remain hard to tell apart.

Reference cells (``reference=``) are cells known to be normal: by default the model's own training cells
(``model.adata[model.train_indices]``, or every cell of ``model.adata`` when the split is unknown). When the
scored AnnData is the reference AnnData itself, a cell is never its own neighbour.

Thresholds: :func:`calibrate_threshold` takes the empirical ``quantile`` of the scores of held-out normal cells
(by default the model's validation cells), so that about ``1 - quantile`` of normal cells are flagged;
:func:`annotate_anomalies` writes the scores and flags into ``obs``.
"""

from __future__ import annotations

import inspect

import anndata as ad
import numpy as np
import torch

from ..errors import CellvaeInputError
from .protocol import TrainedModel
from ..data.tensors import CellData
from ..vae.module import evaluation


__all__ = ["anomaly_score", "calibrate_threshold", "annotate_anomalies", "gene_nll_reference_stats", "gene_surprise",
           "METHODS", "LIBRARY_NORMALIZATIONS"]

METHODS = ("latent_knn", "gene_surprise", "latent_knn_gene", "elbo", "marginal_ll")
LIBRARY_NORMALIZATIONS = ("none", "per_count", "regress")
_DEFAULT_N_SAMPLES = {"elbo": 5, "marginal_ll": 100}
_MAX_ELEMENTS = 1 << 22  # samples x cells x genes per decoder pass
_MAX_REFERENCE = 50_000  # latent_knn: reference cells beyond this are subsampled (seeded)
_MAX_REGRESS_REFERENCE = 2_000  # normalize_library="regress": reference cells used for the fit
_MAX_GENE_REFERENCE = 2_000  # gene_surprise: reference cells for the per-gene statistics


# ------------------------------------------------------------------------------------------------ helpers


def _library(data: CellData) -> np.ndarray:
    """(n_cells,) total counts over the model's genes."""
    return data.row_sums()


def _neg_elbo(module, data: CellData, n_samples: int, batch_size: int, seed: int | None) -> np.ndarray:
    """(n_cells,) ``-ELBO`` in nats, the reconstruction term averaged over ``n_samples`` draws of z (and l)."""
    out = []
    per_pass = max(1, _MAX_ELEMENTS // max(1, n_samples * data.n_genes))
    with evaluation(module, seed):
        for x, cat, cont in data.iterate(torch.arange(data.n_cells), min(batch_size, per_pass)):
            inf = module.inference(x, cat, cont, n_samples=n_samples)
            gen = module.generative(inf["z"], inf["library"], cat, cont)
            parts = module.loss(x, inf, gen, kl_weight=1.0, cat=cat)
            recon = parts.reconstruction_loss
            if recon.dim() == 2:  # (n_samples, n_cells)
                recon = recon.mean(0)
            out.append((recon + parts.kl_local).double())
    return torch.cat(out).numpy()


def _latent_mean(module, data: CellData, batch_size: int) -> np.ndarray:
    out = []
    with evaluation(module, 0):
        for x, cat, cont in data.iterate(torch.arange(data.n_cells), batch_size):
            out.append(module.inference(x, cat, cont)["qz_m"])
    return torch.cat(out).numpy().astype(np.float64)


def _gene_nll_batches(module, data: CellData, batch_size: int):
    """Yield (n_batch, n_genes) float64 ``-log p(x_g | z = E_q[z|x], l)`` in nats, minibatch by minibatch."""
    with evaluation(module, 0):
        for x, cat, cont in data.iterate(torch.arange(data.n_cells), batch_size):
            inf = module.inference(x, cat, cont)
            library = inf["ql_m"] if "ql_m" in inf else inf["library"]
            px = module.generative(inf["qz_m"], library, cat, cont)["px"]
            yield -px.log_prob(x).double()


def gene_nll_reference_stats(module, data: CellData, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-gene mean and standard deviation (floored at 0.01 nats) of the per-gene negative log-likelihood
    ``-log p(x_g | z = E_q[z|x], l)`` over ``data``'s cells: two (n_genes,) float64 tensors (nats), the reference
    of :func:`gene_surprise`.

    Args:
        module: a trained :class:`cellvae.vae.module.VAEModule`; data: prepared cells (:class:`CellData`).
    """
    s1 = s2 = 0.0
    for nll in _gene_nll_batches(module, data, batch_size):
        s1 = s1 + nll.sum(0)
        s2 = s2 + (nll * nll).sum(0)
    mean = s1 / data.n_cells
    sd = (s2 / data.n_cells - mean * mean).clamp(min=0.0).sqrt().clamp(min=0.01)
    return mean, sd


def gene_surprise(module, data: CellData, stats, n_top: int = 20, batch_size: int = 256) -> np.ndarray:
    """(n_cells,) float32 mean of the ``n_top`` largest per-gene NLL z-scores against ``stats``
    (:func:`gene_nll_reference_stats` of reference cells): the ``"gene_surprise"`` score of the module docstring.
    Unitless; higher = the cell's worst-explained genes are worse explained than in reference cells."""
    mean, sd = stats
    k = min(int(n_top), data.n_genes)
    out = [torch.topk((nll - mean) / sd, k, dim=1).values.mean(1)
           for nll in _gene_nll_batches(module, data, batch_size)]
    return torch.cat(out).numpy()


def _subset_in_memory(adata: ad.AnnData, idx: np.ndarray) -> ad.AnnData:
    """The cells ``idx`` (in increasing order) as an in-memory AnnData. A backed AnnData can neither be copied
    without a filename nor turned to memory without closing its file: its rows of ``X`` are read instead."""
    sub = adata[np.sort(idx)]
    if not adata.isbacked:
        return sub.copy()
    return ad.AnnData(X=sub.X, obs=sub.obs.copy(), var=sub.var.copy(),
                      layers={k: sub.layers[k] for k in sub.layers.keys()})


def _default_reference(model: TrainedModel) -> tuple[ad.AnnData, np.ndarray]:
    if model.adata is None:
        raise CellvaeInputError(
            "No reference cells: the model has no AnnData attached. Pass reference=... (normal cells), or load the "
            "model with adata=... ."
        )
    idx = model.train_indices if model.train_indices is not None else np.arange(model.adata.n_obs)
    return model.adata, np.asarray(idx, dtype=np.int64)


def _library_trend(log_lib: np.ndarray, score: np.ndarray):
    """Least-squares quadratic of ``score`` in ``log_lib``, continued linearly (with the slope at the edge)
    outside the fitted range, so that cells smaller or larger than every reference cell are not extrapolated
    along a parabola."""
    lo, hi = float(log_lib.min()), float(log_lib.max())
    if hi - lo < 1e-8:
        c = float(np.mean(score))
        return lambda t: np.full_like(np.asarray(t, dtype=np.float64), c)
    b0, b1, b2 = np.linalg.lstsq(np.stack([np.ones_like(log_lib), log_lib, log_lib ** 2], 1), score, rcond=None)[0]

    def f(t):
        t = np.asarray(t, dtype=np.float64)
        tc = np.clip(t, lo, hi)
        return b0 + b1 * tc + b2 * tc ** 2 + (b1 + 2 * b2 * tc) * (t - tc)

    return f


def _raw_scores(model, adata_, data, method, n_samples, batch_size, seed) -> np.ndarray:
    if method == "elbo":
        return _neg_elbo(model.module, data, n_samples, batch_size, seed)
    if not hasattr(model, "get_marginal_ll"):
        raise CellvaeInputError(f"method='marginal_ll' needs a model with get_marginal_ll; {type(model).__name__} "
                                "has none. Use method='elbo'.")
    fn = model.get_marginal_ll
    kw = {"n_samples": n_samples, "return_mean": False}
    params = inspect.signature(fn).parameters
    if "seed" in params:
        kw["seed"] = seed
    if "batch_size" in params:
        kw["batch_size"] = max(1, min(batch_size, 128))
    return -np.asarray(fn(adata_, **kw), dtype=np.float64)


# ------------------------------------------------------------------------------------------------- public
def anomaly_score(
    model: TrainedModel,
    adata: ad.AnnData | None = None,
    method: str = "latent_knn",
    n_samples: int | None = None,
    normalize_library: str = "regress",
    reference: ad.AnnData | None = None,
    n_neighbors: int = 10,
    n_top_genes: int = 20,
    batch_size: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """Anomaly score of each cell: higher = less like the reference (training) cells.

    Args:
        model: a trained :class:`cellvae.CountVAE`.
        adata: cells to score (default: the model's AnnData); genes are matched to the model by name.
        method: ``"latent_knn"`` (default), ``"gene_surprise"``, ``"latent_knn_gene"``, ``"elbo"`` or
            ``"marginal_ll"`` (see the module docstring).
        n_samples: draws of ``z`` per cell: averaged for ``"elbo"`` (default 5), importance samples for
            ``"marginal_ll"`` (default 100); unused by the other methods.
        normalize_library: for the likelihood methods only: ``"regress"`` (default; the score minus a quadratic
            in ``log`` library size fitted by least squares on the reference cells' scores, continued linearly
            outside their range; nats per cell relative to a reference cell of the same size),
            ``"per_count"`` (score divided by the cell's total counts: nats per count) or ``"none"`` (nats per
            cell).
        reference: normal cells, for the neighbours of ``"latent_knn"``, the per-gene statistics of
            ``"gene_surprise"`` and the fit of ``"regress"`` (default: the model's training cells). At most 50,000
            (latent_knn) or 2,000 (gene_surprise, regress) are used, a seeded random subset. When it is the scored
            AnnData itself (the same object), cells are not their own neighbours.
        n_neighbors: ``k`` of ``"latent_knn"``.
        n_top_genes: number of worst-explained genes averaged by ``"gene_surprise"``.
        batch_size: cells per forward pass.
        seed: seed of the ``z`` draws and of reference subsampling (results are reproducible).

    Returns:
        float64 array (n_cells,): for ``"latent_knn"`` a distance in latent units; for ``"gene_surprise"`` a
        mean per-gene z-score; for ``"latent_knn_gene"`` a sum of two z-scores; for the likelihood methods
        nats per cell (``"none"``, ``"regress"``) or nats per count (``"per_count"``).

    Raises:
        CellvaeInputError (a ``ValueError``): unknown ``method`` or ``normalize_library``, ``n_samples`` or
            ``n_neighbors`` or ``n_top_genes`` < 1, fewer reference cells than ``n_neighbors`` (or than 3 for ``"regress"``), no
            reference (a model without AnnData and no ``reference``), a model without ``get_marginal_ll`` for
            ``"marginal_ll"``, and the data errors of ``CountVAE.get_latent_representation`` (missing genes,
            unknown batch categories, bad values).
    """
    if method not in METHODS:
        raise CellvaeInputError(f"method must be one of {METHODS}, got {method!r}.")
    if normalize_library not in LIBRARY_NORMALIZATIONS:
        raise CellvaeInputError(
            f"normalize_library must be one of {LIBRARY_NORMALIZATIONS}, got {normalize_library!r}.")
    if int(n_neighbors) < 1:
        raise CellvaeInputError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    if int(n_top_genes) < 1:
        raise CellvaeInputError(f"n_top_genes must be at least 1, got {n_top_genes}.")
    n_samples = _DEFAULT_N_SAMPLES.get(method, 1) if n_samples is None else int(n_samples)
    if n_samples < 1:
        raise CellvaeInputError(f"n_samples must be at least 1, got {n_samples}.")
    model.check_trained()
    adata_ = adata if adata is not None else model.adata
    if adata_ is None:
        raise CellvaeInputError("No AnnData attached to this model: pass adata=... .")
    data = model.prepared_data(adata)

    if method in ("gene_surprise", "latent_knn_gene"):
        return _gene_methods(model, adata_, data, method, reference, n_neighbors, n_top_genes, batch_size, seed)
    need_ref = method == "latent_knn" or normalize_library == "regress"
    if need_ref:
        if reference is None:
            ref_adata, ref_idx = _default_reference(model)
        else:
            ref_adata, ref_idx = reference, np.arange(reference.n_obs)
        same = ref_adata is adata_
        cap = _MAX_REFERENCE if method == "latent_knn" else _MAX_REGRESS_REFERENCE
        if len(ref_idx) > cap:
            ref_idx = np.sort(np.random.default_rng(seed).choice(ref_idx, cap, replace=False))

    if method == "latent_knn":
        from sklearn.neighbors import NearestNeighbors

        k = int(n_neighbors)
        if len(ref_idx) < k + (1 if same else 0):
            raise CellvaeInputError(f"{len(ref_idx)} reference cells: latent_knn needs more than n_neighbors={k}.")
        zq = _latent_mean(model.module, data, batch_size)
        zr = zq[ref_idx] if same else _latent_mean(model.module, model.prepared_data(ref_adata), batch_size)[ref_idx]
        nn = NearestNeighbors(n_neighbors=k + (1 if same else 0)).fit(zr)
        dist, ind = nn.kneighbors(zq)
        if not same:
            return dist.mean(1)
        # drop each reference cell from its own neighbours (the query cell itself, not a duplicate profile)
        keep = ref_idx[ind] != np.arange(data.n_cells)[:, None]
        keep[keep.sum(1) > k, -1] = False  # cells that are not reference cells: their k nearest
        return np.where(keep, dist, 0.0).sum(1) / k

    score = _raw_scores(model, adata, data, method, n_samples, batch_size, seed)
    lib = _library(data)
    if normalize_library == "none":
        return score
    if normalize_library == "per_count":
        return score / np.maximum(lib, 1.0)
    if len(ref_idx) < 3:
        raise CellvaeInputError(f"{len(ref_idx)} reference cells: normalize_library='regress' needs at least 3.")
    if same:
        ref_score, ref_lib = score[ref_idx], lib[ref_idx]
    else:
        sub = _subset_in_memory(ref_adata, ref_idx)
        sub_data = model.prepared_data(sub)
        ref_score, ref_lib = _raw_scores(model, sub, sub_data, method, n_samples, batch_size, seed), _library(sub_data)
    return score - _library_trend(np.log(np.maximum(ref_lib, 1.0)), ref_score)(np.log(np.maximum(lib, 1.0)))


def _gene_methods(model, adata_, data, method, reference, n_neighbors, n_top_genes, batch_size, seed) -> np.ndarray:
    """``"gene_surprise"`` and ``"latent_knn_gene"`` (see the module docstring)."""
    if reference is None:
        ref_adata, ref_idx = _default_reference(model)
    else:
        ref_adata, ref_idx = reference, np.arange(reference.n_obs)
    if len(ref_idx) < 3:
        raise CellvaeInputError(f"{len(ref_idx)} reference cells: method={method!r} needs at least 3.")
    sub_idx = ref_idx
    if len(sub_idx) > _MAX_GENE_REFERENCE:
        sub_idx = np.sort(np.random.default_rng(seed).choice(sub_idx, _MAX_GENE_REFERENCE, replace=False))
    ref_data = model.prepared_data(_subset_in_memory(ref_adata, sub_idx))
    stats = gene_nll_reference_stats(model.module, ref_data, batch_size)
    gene = gene_surprise(model.module, data, stats, n_top_genes, batch_size)
    if method == "gene_surprise":
        return gene
    ref_gene = gene_surprise(model.module, ref_data, stats, n_top_genes, batch_size)
    knn_kw = dict(method="latent_knn", reference=reference, n_neighbors=n_neighbors, batch_size=batch_size, seed=seed)
    knn = anomaly_score(model, adata_, **knn_kw)
    # the reference cells' own kNN scores (scoring the reference AnnData itself excludes each cell from its
    # neighbours), at the cells of the gene statistics
    ref_knn = anomaly_score(model, ref_adata, **knn_kw)[sub_idx]

    def z(v, ref):
        return (v - ref.mean()) / max(float(ref.std()), 1e-12)

    return z(knn, ref_knn) + z(gene, ref_gene)


def calibrate_threshold(
    model: TrainedModel,
    reference_adata: ad.AnnData | None = None,
    quantile: float = 0.99,
    **score_kwargs,
) -> float:
    """Anomaly threshold: the empirical ``quantile`` of the scores of held-out normal cells.

    About ``1 - quantile`` of cells like the held-out ones score above it (a false-positive rate of
    ``1 - quantile``, up to sampling error of the quantile). Use cells that were not used to train the model:
    training cells score lower (closer to themselves, better fitted) and would give too low a threshold.

    Args:
        model: a trained :class:`cellvae.CountVAE`.
        reference_adata: held-out normal cells (default: the model's validation cells,
            ``model.adata[model.validation_indices]``).
        quantile: in (0, 1).
        **score_kwargs: passed to :func:`anomaly_score` (method, n_samples, normalize_library, reference, ...);
            use the same ones when scoring.

    Returns:
        The threshold, in the units of the score.

    Raises:
        CellvaeInputError: ``quantile`` outside (0, 1); no ``reference_adata`` and no known validation cells;
            and the errors of :func:`anomaly_score`.
    """
    if not 0.0 < float(quantile) < 1.0:
        raise CellvaeInputError(f"quantile must be in (0, 1), got {quantile}.")
    if reference_adata is None:
        if model.adata is None or model.validation_indices is None or len(model.validation_indices) == 0:
            raise CellvaeInputError(
                "No held-out reference cells: pass reference_adata=... (normal cells not used in training); the "
                "model's validation cells are unknown (train with train_size < 1, or load with the training AnnData)."
            )
        reference_adata = model.adata[np.asarray(model.validation_indices)]
    scores = anomaly_score(model, reference_adata, **score_kwargs)
    return float(np.quantile(scores, float(quantile)))


def annotate_anomalies(
    model: TrainedModel,
    adata: ad.AnnData | None = None,
    threshold: float | None = None,
    quantile: float = 0.99,
    calibration_adata: ad.AnnData | None = None,
    key_added: str = "cellvae_anomaly",
    copy: bool = False,
    **score_kwargs,
) -> ad.AnnData | None:
    """Score cells and flag anomalies, writing ``obs`` columns (scverse convention: in place unless ``copy``).

    Writes ``obs[key_added]`` (float score, :func:`anomaly_score`), ``obs[key_added.replace('anomaly',
    'is_anomaly')]``, i.e. ``obs['cellvae_is_anomaly']`` by default (bool, score > threshold), and
    ``uns[key_added]`` (dict: ``threshold``, ``method``, ``quantile`` when the threshold was calibrated, and the
    other score settings given).

    Args:
        model: a trained :class:`cellvae.CountVAE`.
        adata: cells to annotate (default: the model's AnnData).
        threshold: flag cells above this score; None: :func:`calibrate_threshold` with ``quantile`` on
            ``calibration_adata``.
        quantile: quantile of the calibration scores used when ``threshold`` is None.
        calibration_adata: held-out normal cells for the threshold (default: the model's validation cells).
        key_added: obs/uns key of the score.
        copy: False (default): modify ``adata`` in place and return None; True: return an annotated copy and
            leave ``adata`` unchanged.
        **score_kwargs: passed to :func:`anomaly_score` and :func:`calibrate_threshold`.

    Returns:
        None, or the annotated copy when ``copy=True``.

    Raises:
        CellvaeInputError: no AnnData, and the errors of :func:`anomaly_score` and :func:`calibrate_threshold`.
    """
    adata_ = adata if adata is not None else model.adata
    if adata_ is None:
        raise CellvaeInputError("No AnnData attached to this model: pass adata=... .")
    scores = anomaly_score(model, adata_, **score_kwargs)
    used_quantile = None
    if threshold is None:
        threshold = calibrate_threshold(model, calibration_adata, quantile=quantile, **score_kwargs)
        used_quantile = float(quantile)
    target = adata_.copy() if copy else adata_
    flag_key = key_added.replace("anomaly", "is_anomaly") if "anomaly" in key_added else f"{key_added}_is_anomaly"
    target.obs[key_added] = scores
    target.obs[flag_key] = scores > float(threshold)
    info = {"threshold": float(threshold), "method": score_kwargs.get("method", "latent_knn")}
    if used_quantile is not None:
        info["quantile"] = used_quantile
    for k, v in score_kwargs.items():  # h5ad-writable summary of the settings
        if k != "method" and v is not None:
            info[k] = v if isinstance(v, (int, float, str, bool)) else type(v).__name__
    target.uns[key_added] = info
    return target if copy else None
