"""Reference mapping by architecture surgery (scArches; Lotfollahi et al. 2022, Nat. Biotechnol. 40:121): place a
query dataset in the latent space of a trained reference model without retraining the reference.

:func:`map_query` (``CountVAE.map_query``, ``LabelTransferVAE.map_query``):

1. matches the query's genes to the reference's by name; missing genes are filled with zeros and named in a
   warning; more than ``max_missing_genes`` of them missing is refused;
2. adds the query's new batch categories (and new categories of every categorical covariate) to the model: new
   embedding rows (:func:`cellvae.vae.surgery.extend_module`);
3. freezes everything learned on the reference (:func:`cellvae.vae.surgery.freeze_for_query`) and trains the new
   rows, the decoder's batch normalisation and (for a latent library) the library encoder on the query cells, with
   weight decay 0 so that frozen weights stay exactly as they were;
4. returns a new model of the same class attached to the query, which saves and loads like any model and records
   the reference it came from (``model.reference``).
"""

from __future__ import annotations

import dataclasses
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.checks import get_counts
from ..data.spec import DataSpec
from ..data.tensors import split_indices
from ..errors import CellvaeInputError
from ..settings import TrainSettings, build, default_max_epochs
from ..train.loop import train_module
from ..vae.surgery import extend_module, freeze_for_query

__all__ = ["map_query", "align_genes", "QUERY_BATCH_KEY", "MAX_QUERY_EPOCHS", "QUERY_LR"]

QUERY_BATCH_KEY = "cellvae_query_batch"  # the batch column added to a query given without a batch key
MAX_QUERY_EPOCHS = 30  # query training: at most this many epochs by default (only a few weights move)
QUERY_LR = 1e-2  # query training's learning rate by default (torch Adam's and the reference's: 1e-3)


def align_genes(query: ad.AnnData, genes: list[str], layer: str | None, max_missing: float) -> ad.AnnData:
    """The query's counts of ``genes`` in that order (zeros for genes it lacks), as a new AnnData with its obs.

    Raises:
        CellvaeInputError: more than ``max_missing`` (a fraction) of the genes missing, or duplicated gene names.
    """
    names = pd.Index(query.var_names.astype(str))
    if not names.is_unique:
        raise CellvaeInputError("The query's var_names are not unique: call query.var_names_make_unique() first.")
    idx = names.get_indexer(genes)
    missing = [g for g, i in zip(genes, idx) if i < 0]
    if len(missing) > max_missing * len(genes):
        raise CellvaeInputError(
            f"{len(missing)} of the reference's {len(genes)} genes ({len(missing) / len(genes):.0%}) are missing from "
            f"the query (e.g. {missing[:5]}), more than the {max_missing:.0%} allowed (max_missing_genes): the query "
            "cannot be placed reliably. Check that both use the same gene identifiers (symbols or Ensembl ids)."
        )
    if missing:
        warnings.warn(f"{len(missing)} of the reference's {len(genes)} genes are missing from the query and are "
                      f"filled with zeros (e.g. {missing[:5]}).", UserWarning, stacklevel=3)
    X = sp.csr_matrix(get_counts(query, layer), dtype=np.float32)
    have = idx >= 0
    cols = sp.csr_matrix((np.ones(have.sum(), np.float32), (idx[have], np.flatnonzero(have))),
                         shape=(query.n_vars, len(genes)))
    out = ad.AnnData(X=sp.csr_matrix(X @ cols), obs=query.obs.copy(), var=pd.DataFrame(index=list(genes)))
    if layer is not None:
        out.layers[layer] = out.X
    return out


def _extended_spec(spec: DataSpec, query: ad.AnnData, batch_key: str | None) -> tuple[DataSpec, ad.AnnData]:
    """The spec with the query's new categories appended (and the query with a batch column when it had none)."""
    query = query.copy() if batch_key is None or batch_key not in query.obs else query
    if batch_key is None:
        batch_key = spec.batch_key if spec.batch_key and spec.batch_key in query.obs else QUERY_BATCH_KEY
        if batch_key == QUERY_BATCH_KEY:
            query.obs[QUERY_BATCH_KEY] = "query"
    elif batch_key not in query.obs:
        raise CellvaeInputError(f"batch_key {batch_key!r} is not an obs column of the query; available: "
                                f"{list(query.obs.columns)}.")

    def grown(old: list[str], key: str, role: str) -> list[str]:
        col = query.obs[key]
        if col.isna().any():
            raise CellvaeInputError(f"The query's obs[{key!r}] ({role}) has missing values; fill or drop them.")
        new = [c for c in sorted(pd.unique(col.astype(str))) if c not in old]
        return list(old) + new

    for k in spec.categorical_covariate_keys + spec.continuous_covariate_keys:
        if k not in query.obs:
            raise CellvaeInputError(f"The reference model uses the covariate obs[{k!r}], which the query lacks; add it "
                                    "to query.obs (categorical covariates may take new values).")
    new = dataclasses.replace(
        spec, batch_key=batch_key, batch_categories=grown(spec.batch_categories, batch_key, "batch"),
        categorical_categories={k: grown(spec.categorical_categories[k], k, "categorical covariate")
                                for k in spec.categorical_covariate_keys},
    )
    return new, query


def map_query(model, query: ad.AnnData, batch_key: str | None = None, max_epochs: int | None = None,
              max_missing_genes: float = 0.2, seed: int = 0, progress_bar: bool = True, **train_settings):
    """Map ``query`` onto the trained reference ``model`` (module docstring); returns the mapped model.

    Args:
        model: a trained :class:`cellvae.CountVAE` or :class:`cellvae.LabelTransferVAE` (the reference).
        query: AnnData (n_query_cells, genes) of raw counts (the layer the reference used, else ``X``).
        batch_key: obs column of the query's batches (None: the reference's batch key if the query has it, else the
            whole query is one new batch). Categories the reference knows keep their rows; new ones get new rows.
        max_epochs: epochs of query training (None: ``min(30, default_max_epochs(n_query))``,
            :data:`MAX_QUERY_EPOCHS`).
        max_missing_genes: the largest fraction of the reference's genes the query may lack.
        seed, progress_bar, **train_settings: as :meth:`cellvae.CountVAE.train` (weight decay is always 0 and the KL
            weight is 1 from the start: the encoder is the reference's; ``lr`` defaults to :data:`QUERY_LR`, 1e-2:
            only the query's new embedding rows move, and at scvi-tools' 1e-3 for 100 epochs the query's validation
            ELBO ends lower than at 1e-2 for 30, at equal label-transfer quality,
            ``benchmarks/results/label_transfer_query_lr.md``; with 30 epochs and the default patience of 45, early
            stopping does not stop query training, but the best validation epoch's weights are kept). A query with
            fewer training cells than the default ``batch_size`` is trained in one minibatch per epoch.

    Returns:
        A model of the same class, attached to the query (aligned to the reference's genes), trained; its
        ``reference`` attribute records the reference's batch categories and cells.

    Raises:
        CellvaeInputError: an untrained reference, too many missing genes, missing covariate columns, missing values
            in the batch or covariate columns, or bad settings.

    Warns:
        UserWarning: the reference was built without ``encode_covariates`` (its frozen encoder gives the query's
            latent representation unchanged by query training; scArches, Lotfollahi et al. 2022, feeds the
            covariates to the encoder: :data:`cellvae.settings.ARCHES_SETTINGS`).
    """
    if not model.is_trained:
        raise CellvaeInputError("map_query needs a trained reference model: call .train() (or load one) first.")
    if not getattr(model.module, "encode_covariates", True):
        warnings.warn("The reference model does not feed its covariates to the encoder (encode_covariates=False), so "
                      "query training cannot move the query's latent representation: it is the frozen reference "
                      "encoder's output, with the query's batch effect in it. For a reference meant for mapping, "
                      "build it with cellvae.settings.ARCHES_SETTINGS (CountVAE(adata, **ARCHES_SETTINGS); cellvae "
                      "fit --architecture arches, the default with --semi-supervised).", UserWarning, stacklevel=3)
    spec = model.spec
    aligned = align_genes(query, spec.gene_names, spec.layer, max_missing_genes)
    new_spec, aligned = _extended_spec(spec, aligned, batch_key)
    n_old = (spec.n_batch, *spec.n_cats_per_cov)
    mapped = model.query_copy(new_spec, aligned)
    extend_module(model.module, mapped.module, n_old)
    freeze_for_query(mapped.module, n_old)
    n = aligned.n_obs
    epochs = max_epochs if max_epochs is not None else min(MAX_QUERY_EPOCHS, default_max_epochs(n))
    s = build(TrainSettings, None, {"max_epochs": epochs, "seed": seed, "progress_bar": progress_bar, "lr": QUERY_LR,
                                    **train_settings, "weight_decay": 0.0, "n_epochs_kl_warmup": 0})
    data = mapped.prepared_data()
    cells = np.flatnonzero(data.row_sums(absolute=True) > 0)
    tr, va = split_indices(len(cells), s.train_size, s.seed)
    tr, va = cells[tr], cells[va]
    if len(tr) < s.batch_size:
        if "batch_size" in train_settings or len(tr) < 2:
            raise CellvaeInputError(f"Only {len(tr)} query training cells, fewer than one minibatch of "
                                    f"batch_size={s.batch_size}: pass a smaller batch_size (at least 2 cells).")
        s = build(TrainSettings, s, {"batch_size": int(len(tr))})  # a small query: one minibatch per epoch
    mapped.history = train_module(mapped.module, data, tr, va, s)
    mapped.module.frozen_norms = []
    for p in mapped.module.parameters():
        p.requires_grad_(True)
    mapped.train_indices, mapped.validation_indices = tr, va
    mapped.is_trained = True
    mapped.reference = {"batch_categories": list(spec.batch_categories),
                        "categorical_categories": {k: list(v) for k, v in spec.categorical_categories.items()},
                        "n_genes": len(spec.gene_names), "query_cells": int(n),
                        "query_genes_missing": int(len(spec.gene_names) - pd.Index(query.var_names.astype(str))
                                                   .isin(spec.gene_names).sum()),
                        "from": dict(getattr(model, "reference", None) or {}) or None}
    return mapped
