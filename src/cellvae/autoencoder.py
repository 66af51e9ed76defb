"""A deterministic autoencoder baseline for :class:`cellvae.CountVAE`.

Same building blocks as the VAE (:class:`cellvae.nn.FCLayers`: linear -> batch norm -> ReLU -> dropout), but a
deterministic encoder ``z = W_z h(x)`` and decoder ``x_hat = W_x g(z)`` trained to minimise the squared error on
log1p-normalized expression (``log1p(counts / total * 1e4)``, scanpy's ``normalize_total`` + ``log1p``), with
no KL term and no likelihood: the classical autoencoder (Hinton & Salakhutdinov 2006, Science 313:504) as used
as a baseline for single-cell VAEs (e.g. Eraslan et al. 2019 use a count autoencoder; Lopez et al. 2018 compare
scVI with deterministic embeddings).

Training reuses :func:`cellvae.train.train_module` (Adam, minibatches, early stopping on the validation loss,
best weights): :class:`AEModule` follows the module interface of :class:`cellvae.module.VAEModule`
(``forward(x, cat, cont, kl_weight)`` returning a :class:`cellvae.module.LossOutput` with ``kl_local`` = 0, so
its ``elbo`` is minus the squared error).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import torch
from torch import nn

from .data import CellvaeInputError, DataSpec, TensorData, check_values, get_counts, is_count_matrix, split_indices
from .module import LossOutput
from .nn import FCLayers
from .train import TrainingPlan, default_max_epochs, train_module

__all__ = ["Autoencoder", "AEModule"]


class AEModule(nn.Module):
    """Deterministic autoencoder on (already) log1p-normalized expression.

    Args:
        n_input: genes.
        n_hidden, n_latent, n_layers, dropout_rate: as :class:`cellvae.module.VAEModule` (128, 10, 1, 0.1).

    ``forward(x, cat, cont, kl_weight)`` returns a :class:`LossOutput` with ``reconstruction_loss`` (n_cells,)
    the squared error summed over genes (log1p units squared, per cell), ``kl_local`` zeros, and ``loss`` the
    mean of the reconstruction loss over cells. ``kl_weight`` is ignored.
    """

    def __init__(self, n_input: int, n_hidden: int = 128, n_latent: int = 10, n_layers: int = 1,
                 dropout_rate: float = 0.1):
        super().__init__()
        self.n_latent = n_latent
        self.encoder = FCLayers(n_input, n_hidden, (), 0, n_layers, n_hidden, dropout_rate)
        self.z_layer = nn.Linear(n_hidden, n_latent)
        self.decoder = FCLayers(n_latent, n_hidden, (), 0, n_layers, n_hidden, 0.0)
        self.out_layer = nn.Linear(n_hidden, n_input)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n_cells, n_genes) log1p-normalized -> (n_cells, n_latent)."""
        return self.z_layer(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(n_cells, n_latent) -> (n_cells, n_genes) reconstruction in log1p units."""
        return self.out_layer(self.decoder(z))

    def forward(self, x: torch.Tensor, cat=None, cont=None, kl_weight: float = 1.0) -> LossOutput:
        recon = ((self.decode(self.encode(x)) - x) ** 2).sum(-1)
        return LossOutput(loss=recon.mean(), reconstruction_loss=recon, kl_local=torch.zeros_like(recon))


class Autoencoder:
    """Deterministic autoencoder baseline on an AnnData (MSE on log1p counts per 10k).

    Args:
        adata: AnnData (n_cells, n_genes) with raw counts in ``X`` or ``layers[layer]`` (normalized to 10,000
            per cell and log1p-transformed here); data that are not counts are used as given. Not modified.
        layer: layer holding the data (None: ``X``).
        n_hidden, n_latent, n_layers, dropout_rate: network sizes (128, 10, 1, 0.1, as CountVAE).

    Save/load is not provided.

    Raises:
        CellvaeInputError: empty data, NaN/inf values, a missing layer.
    """

    def __init__(self, adata: ad.AnnData, layer: str | None = None, n_hidden: int = 128, n_latent: int = 10,
                 n_layers: int = 1, dropout_rate: float = 0.1):
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise CellvaeInputError(f"The data are empty ({adata.n_obs} cells x {adata.n_vars} genes).")
        X = get_counts(adata, layer)
        check_values(X, False, where=f"layers[{layer!r}]" if layer else "X")
        self.spec = DataSpec.from_adata(
            adata, gene_names=adata.var_names, layer=layer, gene_likelihood="normal",
            normal_transform="log1p_cp10k" if is_count_matrix(X) else "none",
        )
        self.adata = adata
        self.module_kwargs = dict(n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate)
        self.module = AEModule(len(self.spec.gene_names), **self.module_kwargs)
        self._data: TensorData | None = None
        self.history: dict = {}
        self.is_trained = False
        self.train_indices = self.validation_indices = None

    def _tensors(self, adata: ad.AnnData | None) -> TensorData:
        if adata is None or adata is self.adata:
            if self._data is None:
                self._data = self.spec.prepare(self.adata)
            return self._data
        return self.spec.prepare(adata)

    def train(self, max_epochs: int | None = None, batch_size: int = 128, train_size: float = 0.9,
              early_stopping: bool = True, early_stopping_patience: int = 45, lr: float = 1e-3,
              weight_decay: float = 1e-6, eps: float = 0.01, seed: int = 0, progress_bar: bool = True,
              n_threads: int | None = None) -> "Autoencoder":
        """Fit with Adam on the squared error (same loop and defaults as :meth:`cellvae.CountVAE.train`, no KL
        warm-up). ``history["validation_elbo"]`` is minus the validation squared error per cell.

        Returns:
            self, trained.
        """
        n = self.adata.n_obs
        torch.manual_seed(seed)
        self.module = AEModule(len(self.spec.gene_names), **self.module_kwargs)
        tr, va = split_indices(n, train_size, seed)
        if len(tr) < max(2, int(batch_size)):
            raise CellvaeInputError(f"Only {len(tr)} training cells, fewer than one minibatch of "
                                    f"batch_size={batch_size}: pass a smaller batch_size.")
        plan = TrainingPlan(
            max_epochs=int(max_epochs or default_max_epochs(n)), batch_size=int(batch_size), lr=lr,
            weight_decay=weight_decay, eps=eps, n_epochs_kl_warmup=0, early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience, seed=seed, progress_bar=progress_bar,
            n_threads=n_threads,
        )
        self.history = train_module(self.module, self._tensors(None), tr, va, plan)
        self.train_indices, self.validation_indices = tr, va
        self.is_trained = True
        return self

    @torch.no_grad()
    def get_latent_representation(self, adata: ad.AnnData | None = None, batch_size: int = 1024) -> np.ndarray:
        """Latent codes, float32 array (n_cells, n_latent); genes of ``adata`` matched by name."""
        data = self._tensors(adata)
        self.module.eval()
        out = [self.module.encode(x) for x, _, _ in data.iterate(torch.arange(data.n_cells), batch_size)]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def get_reconstruction(self, adata: ad.AnnData | None = None, batch_size: int = 1024) -> np.ndarray:
        """Reconstructed log1p-normalized expression, float32 (n_cells, n_genes)."""
        data = self._tensors(adata)
        self.module.eval()
        out = [self.module.decode(self.module.encode(x))
               for x, _, _ in data.iterate(torch.arange(data.n_cells), batch_size)]
        return torch.cat(out).numpy()

    def __repr__(self) -> str:
        k = self.module_kwargs
        return (f"Autoencoder({len(self.spec.gene_names)} genes, n_latent={k['n_latent']}, n_hidden={k['n_hidden']}, "
                f"n_layers={k['n_layers']}, trained={self.is_trained})")
