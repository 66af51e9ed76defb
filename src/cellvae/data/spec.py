""":class:`DataSpec`: how an AnnData becomes tensors for a model (the genes in model order, the matrix, the covariate
encodings), fixed at training and saved with the model, so that any later AnnData is prepared the same way (genes
matched by name, unseen categories refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from ..errors import CellvaeInputError
from .tensors import TensorData
from .checks import check_values, get_counts
from .obs import categories, continuous, encode
from .preprocess import log1p_cp10k

__all__ = ['DataSpec']


@dataclass
class DataSpec:
    """How an AnnData becomes tensors: the genes, the matrix, and the covariate encodings (fixed at training).

    Attributes:
        gene_names: modelled genes, in model order.
        layer: layer holding the data, or None for ``X``.
        gene_likelihood: determines checks and the ``normal`` transform.
        batch_key, categorical_covariate_keys, continuous_covariate_keys: obs columns.
        batch_categories: categories of ``batch_key`` (``["0"]`` without one).
        categorical_categories: categories per categorical covariate key.
        normal_transform: for ``normal``: ``"log1p_cp10k"`` (counts normalized to 10,000 per cell, then log1p)
            or ``"none"`` (data used as given).
        labels_key, label_categories, unlabeled_category: for a model that learns labels (label transfer): the obs
            column, its known labels in code order, and the value that marks a cell without a label. The code of
            each cell's label is appended as the last column of ``cat`` (``len(label_categories)`` for no label: the
            unlabeled category, a missing value, a label the model does not know, or no such column at all).
    """

    gene_names: list[str]
    layer: str | None = None
    gene_likelihood: str = "zinb"
    batch_key: str | None = None
    categorical_covariate_keys: list[str] = field(default_factory=list)
    continuous_covariate_keys: list[str] = field(default_factory=list)
    batch_categories: list[str] = field(default_factory=lambda: ["0"])
    categorical_categories: dict[str, list[str]] = field(default_factory=dict)
    normal_transform: str = "none"
    labels_key: str | None = None
    label_categories: list[str] | None = None
    unlabeled_category: str | None = None

    @classmethod
    def from_adata(
        cls,
        adata: ad.AnnData,
        gene_names: Sequence[str],
        layer: str | None = None,
        gene_likelihood: str = "zinb",
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        normal_transform: str = "none",
    ) -> "DataSpec":
        """Record genes and covariate categories from the training AnnData."""
        cat_keys = list(categorical_covariate_keys or [])
        cont_keys = list(continuous_covariate_keys or [])
        batch_categories = categories(adata, batch_key, "batch_key") if batch_key else ["0"]
        continuous(adata, cont_keys)  # NaN / inf / non-numeric: answered now, before training
        return cls(
            gene_names=[str(g) for g in gene_names],
            layer=layer,
            gene_likelihood=gene_likelihood,
            batch_key=batch_key,
            categorical_covariate_keys=cat_keys,
            continuous_covariate_keys=cont_keys,
            batch_categories=batch_categories,
            categorical_categories={k: categories(adata, k, "categorical covariate") for k in cat_keys},
            normal_transform=normal_transform,
        )

    @property
    def is_counts(self) -> bool:
        """Whether the model's data are counts (every gene likelihood but ``"normal"``): they must then be
        non-negative integers, and no log1p transform is applied."""
        return self.gene_likelihood != "normal"

    @property
    def n_batch(self) -> int:
        return len(self.batch_categories)

    @property
    def n_cats_per_cov(self) -> tuple[int, ...]:
        return tuple(len(self.categorical_categories[k]) for k in self.categorical_covariate_keys)

    def to_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(**d)

    # ----------------------------------------------------------------------------------------------
    def gene_indexer(self, adata: ad.AnnData) -> np.ndarray | None:
        """Column indices of the model's genes in ``adata`` (None when identical and in order).

        Raises:
            CellvaeInputError: genes of the model missing from ``adata``.
        """
        names = pd.Index(adata.var_names.astype(str))
        model = pd.Index(self.gene_names)
        if len(names) == len(model) and names.equals(model):
            return None
        if not names.is_unique:
            raise CellvaeInputError("adata.var_names are not unique; call adata.var_names_make_unique() first.")
        idx = names.get_indexer(model)
        if (idx < 0).any():
            missing = model[idx < 0]
            raise CellvaeInputError(
                f"{len(missing)} of the model's {len(model)} genes are missing from the data "
                f"(e.g. {list(missing[:5])}). Use data with the same genes (var_names) as the training data."
            )
        return idx

    def counts_matrix(self, adata: ad.AnnData):
        """The model's genes, in model order, from ``X`` or the layer (dense or CSR, not yet transformed)."""
        X = get_counts(adata, self.layer)
        idx = self.gene_indexer(adata)
        if idx is not None:
            X = X[:, idx]
        if sp.issparse(X):
            X = sp.csr_matrix(X)
        return X

    def prepare(self, adata: ad.AnnData, check: bool = True) -> "TensorData":
        """Encode ``adata`` once into :class:`TensorData`.

        Raises:
            CellvaeInputError: bad values, missing genes or obs keys, unknown categories, NaN/inf covariates.
        """
        X = self.counts_matrix(adata)
        if check:
            check_values(X, self.is_counts, where=f"layers[{self.layer!r}]" if self.layer else "X")
        if not self.is_counts and self.normal_transform == "log1p_cp10k":
            X = log1p_cp10k(X)
        cat, cont = self.covariate_tensors(adata)
        return TensorData(X, cat, cont)

    def label_codes(self, adata: ad.AnnData) -> np.ndarray:
        """(n_cells,) int64 code of each cell's label in ``label_categories``; ``len(label_categories)`` for a cell
        without a known label (see the class docstring)."""
        n_labels = len(self.label_categories or ())
        if self.labels_key is None or self.labels_key not in adata.obs.columns:
            return np.full(adata.n_obs, n_labels, np.int64)
        col = adata.obs[self.labels_key]
        values = col.astype(str).to_numpy()
        codes = pd.Index(self.label_categories).get_indexer(values)
        codes[(codes < 0) | col.isna().to_numpy() | (values == str(self.unlabeled_category))] = n_labels
        return codes.astype(np.int64)

    def covariate_tensors(self, adata: ad.AnnData) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Covariates of ``adata`` encoded as in :meth:`prepare`: ``cat`` (n_cells, 1 + n_cat) int64 codes,
        batch first, and ``cont`` (n_cells, n_cont) float32 or None.

        Raises:
            CellvaeInputError: missing obs keys, unknown categories, NaN/inf covariates.
        """
        n = adata.n_obs
        cols = [encode(adata, self.batch_key, self.batch_categories, "batch_key") if self.batch_key
                else np.zeros(n, np.int64)]
        cols += [encode(adata, k, self.categorical_categories[k], "categorical covariate")
                 for k in self.categorical_covariate_keys]
        if self.label_categories is not None:
            cols.append(self.label_codes(adata))
        cat = torch.from_numpy(np.stack(cols, axis=1))
        arr = continuous(adata, self.continuous_covariate_keys)
        cont = torch.from_numpy(arr) if arr is not None else None
        return cat, cont


