"""The public model protocol that analyses read: nothing else of a model, and no private names.

:class:`cellvae.models.base.AnnDataModel` implements it (:class:`cellvae.CountVAE` and the models built on it).
An analysis is a function ``f(model, adata, ...)`` of a :class:`TrainedModel`; the model class adds a method that
calls it. A new model family gets every analysis by implementing this protocol.
"""

from __future__ import annotations

from typing import Protocol

import anndata as ad
import numpy as np
import torch

from ..data.spec import DataSpec
from ..data.tensors import CellData

__all__ = ["TrainedModel"]


class TrainedModel(Protocol):
    """What an analysis may use of a model.

    Attributes:
        module: the torch module (``inference(x, cat, cont, n_samples)``, ``generative(z, library, cat, cont)``,
            ``likelihood``, ``n_latent``; see :class:`cellvae.vae.module.VAEModule`).
        spec: the :class:`cellvae.data.DataSpec` (genes in model order, covariate categories).
        adata: the attached AnnData, or None.
        labels_key: obs column of known labels, or None.
        train_indices, validation_indices: positions in ``adata`` of the training and held-out cells, or None.
    """

    module: torch.nn.Module
    spec: DataSpec
    adata: ad.AnnData | None
    labels_key: str | None
    train_indices: np.ndarray | None
    validation_indices: np.ndarray | None

    def check_trained(self) -> None:
        """Warn when the model has not been trained."""

    def prepared_data(self, adata: ad.AnnData | None = None) -> CellData:
        """Prepared tensors of every cell of ``adata`` (None: the attached AnnData)."""

    def prepared_cells(self, adata: ad.AnnData | None = None, indices=None) -> tuple[CellData, torch.Tensor]:
        """Prepared tensors of ``adata`` and the int64 positions of the cells ``indices`` (None: all)."""

    def get_latent_representation(self, adata: ad.AnnData | None = None, give_mean: bool = True,
                                  batch_size: int = 1024) -> np.ndarray:
        """(n_cells, n_latent) latent means (or samples) of the cells of ``adata``."""
