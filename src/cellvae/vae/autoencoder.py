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

import torch
from torch import nn

from .module import LossOutput
from .nn import FCLayers

__all__ = ['AEModule']


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


