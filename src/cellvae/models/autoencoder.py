"""The deterministic autoencoder baseline on an AnnData: :class:`Autoencoder` (squared error on log1p-normalized
expression, no KL term; the module is :class:`cellvae.vae.autoencoder.AEModule`, which describes the method). It
trains with the loop and defaults of :class:`cellvae.CountVAE` and saves and loads like every model.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import torch

from ..data.checks import check_values, get_counts, is_count_matrix
from ..data.spec import DataSpec
from ..data.tensors import split_indices
from ..errors import CellvaeInputError
from ..settings import ModelSettings, TrainSettings, build, with_signature
from ..train.loop import train_module
from ..vae.autoencoder import AEModule
from .base import AnnDataModel

__all__ = ['Autoencoder']


class Autoencoder(AnnDataModel):
    """Deterministic autoencoder baseline on an AnnData (MSE on log1p counts per 10k).

    Args:
        adata: AnnData (n_cells, n_genes) with raw counts in ``X`` or ``layers[layer]`` (normalized to 10,000
            per cell and log1p-transformed here); data that are not counts are used as given. Not modified.
        layer: layer holding the data (None: ``X``).
        n_hidden, n_latent, n_layers, dropout_rate: network sizes (:class:`cellvae.settings.ModelSettings`'
            defaults 128, 10, 1, 0.1, as CountVAE).

    Saved and loaded like every model (:meth:`save`, :meth:`load`; ``docs/model_format.md``).

    Raises:
        CellvaeInputError: empty data, NaN/inf values, a missing layer, a size out of range.
    """

    @with_signature(ModelSettings, keep=2)
    def __init__(self, adata: ad.AnnData, layer: str | None = None, **sizes):
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise CellvaeInputError(f"The data are empty ({adata.n_obs} cells x {adata.n_vars} genes).")
        self.settings = _sizes(sizes)
        X = get_counts(adata, layer)
        check_values(X, False, where=f"layers[{layer!r}]" if layer else "X")
        self.spec = DataSpec.from_adata(
            adata, gene_names=adata.var_names, layer=layer, gene_likelihood="normal",
            normal_transform="log1p_cp10k" if is_count_matrix(X) else "none",
        )
        self.adata = adata
        self.module = self._build_module()
        self._data = None
        self.history: dict = {}
        self.is_trained = False
        self.train_indices = self.validation_indices = None
        self._saved_split = None

    @property
    def module_kwargs(self) -> dict:
        """The network sizes (``n_hidden``, ``n_latent``, ``n_layers``, ``dropout_rate``)."""
        return {k: getattr(self.settings, k) for k in AE_SIZES}

    def _build_module(self) -> AEModule:
        return AEModule(len(self.spec.gene_names), **self.module_kwargs)

    @with_signature(TrainSettings, keep=1)
    def train(self, settings: TrainSettings | None = None, **train_settings) -> "Autoencoder":
        """Fit with Adam on the squared error (the loop and defaults of :meth:`cellvae.CountVAE.train`, without a
        KL warm-up). ``history["validation_elbo"]`` is minus the validation squared error per cell.

        Args:
            settings, **train_settings: a :class:`cellvae.settings.TrainSettings` and keyword overrides of it.

        Returns:
            self, trained.

        Raises:
            CellvaeInputError: fewer training cells than one minibatch, a setting out of range.
        """
        s = build(TrainSettings, settings, {"n_epochs_kl_warmup": 0, **train_settings}, "training settings")
        n = self.adata.n_obs
        torch.manual_seed(s.seed)
        self.module = self._build_module()
        tr, va = split_indices(n, s.train_size, s.seed)
        if len(tr) < s.batch_size:
            raise CellvaeInputError(f"Only {len(tr)} training cells, fewer than one minibatch of "
                                    f"batch_size={s.batch_size}: pass a smaller batch_size.")
        self.history = train_module(self.module, self.prepared_data(), tr, va, s)
        self.train_indices, self.validation_indices = tr, va
        self.is_trained = True
        return self

    def _config(self) -> dict:
        return {"data_spec": self.spec.to_dict(), "module_kwargs": self.module_kwargs}

    @classmethod
    def _from_config(cls, cfg: dict, state: dict, directory: Path, adata: ad.AnnData | None = None):
        self = cls.__new__(cls)
        self.spec = DataSpec.from_dict(cfg["data_spec"])
        self.settings = _sizes(cfg["module_kwargs"])
        self.module = self._build_module()
        return self

    def _after_load(self, directory: Path, cfg: dict, adata: ad.AnnData | None = None) -> None:
        self._attach(directory, cfg, adata)

    @classmethod
    def load(cls, dir_path, adata: ad.AnnData | None = None) -> "Autoencoder":
        """Load an autoencoder saved by :meth:`save`, attaching ``adata`` (genes matched by name) if given.

        Raises:
            CellvaeInputError: as :meth:`cellvae.CountVAE.load`.
        """
        return super().load(dir_path, adata=adata)

    @torch.no_grad()
    def get_latent_representation(self, adata: ad.AnnData | None = None, batch_size: int = 1024) -> np.ndarray:
        """Latent codes, float32 array (n_cells, n_latent); genes of ``adata`` matched by name."""
        data = self.prepared_data(adata)
        self.module.eval()
        out = [self.module.encode(x) for x, _, _ in data.iterate(torch.arange(data.n_cells), batch_size)]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def get_reconstruction(self, adata: ad.AnnData | None = None, batch_size: int = 1024) -> np.ndarray:
        """Reconstructed log1p-normalized expression, float32 (n_cells, n_genes)."""
        data = self.prepared_data(adata)
        self.module.eval()
        out = [self.module.decode(self.module.encode(x))
               for x, _, _ in data.iterate(torch.arange(data.n_cells), batch_size)]
        return torch.cat(out).numpy()

    def __repr__(self) -> str:
        k = self.module_kwargs
        return (f"Autoencoder({len(self.spec.gene_names)} genes, n_latent={k['n_latent']}, n_hidden={k['n_hidden']}, "
                f"n_layers={k['n_layers']}, trained={self.is_trained})")


AE_SIZES = ("n_hidden", "n_latent", "n_layers", "dropout_rate")


def _sizes(values: dict) -> ModelSettings:
    """The network sizes of an autoencoder, checked by :class:`cellvae.settings.ModelSettings`.

    Raises:
        CellvaeInputError: an unknown keyword or a size out of range.
    """
    unknown = sorted(set(values) - set(AE_SIZES))
    if unknown:
        raise CellvaeInputError(f"Unknown Autoencoder settings {unknown}; known: {list(AE_SIZES)}.")
    return build(ModelSettings, None, values, "Autoencoder settings")
