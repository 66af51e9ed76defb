"""Conditional VAEs as plain torch modules: ``CVAE`` (Gaussian), ``CVAE_NB`` and ``CVAE_ZINB`` (counts).

These are the low-level "seed" API for users who bring their own tensors and training loop::

    model = cellvae.CVAE_ZINB(input_dim=2000, latent_dim=10, condition_dim=3, hidden_dims=[256, 128])
    params = model(x, c)              # dict of distribution parameters
    loss = model.loss(x, c)           # negative ELBO, mean over cells (nats per cell)
    loss.backward()

``x`` is (n_cells, input_dim): counts for ``CVAE_NB`` / ``CVAE_ZINB`` (the encoder sees ``log1p(x)`` and the
decoder's softmax scale is multiplied by the observed library size, as in scVI, Lopez et al. 2018), or
continuous values such as log1p-normalized expression for ``CVAE``. ``c`` is (n_cells, condition_dim), e.g. a
one-hot batch or condition, concatenated to the input of the encoder and the decoder (Sohn et al. 2015,
"Learning structured output representation using deep conditional generative models").

The AnnData-level model with covariate bookkeeping, training loop and analyses is :class:`cellvae.CountVAE`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .distributions import NegativeBinomial, Normal, ZeroInflatedNegativeBinomial

__all__ = ["CVAE", "CVAE_NB", "CVAE_ZINB"]


def _mlp(dims: Sequence[int], dropout_rate: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b, momentum=0.01, eps=1e-3), nn.ReLU()]
        if dropout_rate > 0:
            layers.append(nn.Dropout(dropout_rate))
    return nn.Sequential(*layers)


class CVAE(nn.Module):
    """Conditional VAE with a Gaussian likelihood (learned per-feature variance) on continuous data.

    Args:
        input_dim: features per cell (genes).
        latent_dim: latent dimension (n_latent).
        condition_dim: width of the condition vector ``c`` (0 for an unconditional VAE).
        hidden_dims: hidden layer widths of the encoder; the decoder uses them reversed.
        dropout_rate: dropout in the encoder.
        beta: weight of the KL term (beta-VAE, Higgins et al. 2017); 1 gives the ELBO.

    ``forward(x, c)`` returns a dict with ``z_mean``, ``z_logvar``, ``z`` (n_cells, latent_dim) and the
    likelihood parameters (for ``CVAE``: ``mean``, ``logvar``, each (n_cells, input_dim)).
    ``loss(x, c)`` returns the negative ELBO (beta-weighted), averaged over cells, in nats per cell.

    Raises:
        ValueError: ``c`` of the wrong width, or missing when ``condition_dim > 0``.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 10,
        condition_dim: int = 0,
        hidden_dims: Sequence[int] = (128,),
        dropout_rate: float = 0.1,
        beta: float = 1.0,
    ):
        super().__init__()
        hidden_dims = list(hidden_dims) or [128]
        self.input_dim, self.latent_dim, self.condition_dim = int(input_dim), int(latent_dim), int(condition_dim)
        self.beta = float(beta)
        self.encoder = _mlp([input_dim + condition_dim, *hidden_dims], dropout_rate)
        self.z_mean = nn.Linear(hidden_dims[-1], latent_dim)
        self.z_logvar = nn.Linear(hidden_dims[-1], latent_dim)
        dec = list(reversed(hidden_dims))
        self.decoder = _mlp([latent_dim + condition_dim, *dec], 0.0)
        self._init_heads(dec[-1], input_dim)

    # -- likelihood-specific parts --------------------------------------------------------------------
    def _init_heads(self, n_hidden: int, n_out: int) -> None:
        self.mean_head = nn.Linear(n_hidden, n_out)
        self.logvar = nn.Parameter(torch.zeros(n_out))

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _decode_params(self, h: torch.Tensor, x: torch.Tensor | None) -> dict:
        mean = self.mean_head(h)
        return {"mean": mean, "logvar": self.logvar.expand_as(mean)}

    def distribution(self, params: dict):
        """The likelihood p(x | z, c) as a :mod:`cellvae.distributions` object."""
        return Normal(params["mean"], torch.exp(0.5 * params["logvar"]))

    # -- shared ----------------------------------------------------------------------------------------
    def _cat(self, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.condition_dim == 0:
            return t
        if c is None:
            raise ValueError(f"This model needs a condition tensor c of shape (n_cells, {self.condition_dim}).")
        c = c.to(t.dtype)
        if c.dim() == 1:
            c = c.unsqueeze(-1)
        if c.shape[-1] != self.condition_dim:
            raise ValueError(f"c has {c.shape[-1]} columns, expected condition_dim={self.condition_dim}.")
        return torch.cat([t, c], dim=-1)

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x, c), each (n_cells, latent_dim)."""
        h = self.encoder(self._cat(self._encoder_input(x), c))
        return self.z_mean(h), self.z_logvar(h).clamp(-20, 20)

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None, x: torch.Tensor | None = None,
               library: torch.Tensor | None = None) -> dict:
        """Likelihood parameters for latent codes ``z`` (n_cells, latent_dim)."""
        h = self.decoder(self._cat(z, c))
        return self._decode_params(h, x if library is None else library)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> dict:
        z_mean, z_logvar = self.encode(x, c)
        # A reparameterized sample in training mode, the posterior mean in eval mode.
        z = z_mean + torch.exp(0.5 * z_logvar) * torch.randn_like(z_mean) if self.training else z_mean
        out = {"z_mean": z_mean, "z_logvar": z_logvar, "z": z}
        out.update(self.decode(z, c, x))
        return out

    def loss(self, x: torch.Tensor, c: torch.Tensor | None = None, beta: float | None = None) -> torch.Tensor:
        """Negative ELBO ``-E_q[log p(x|z,c)] + beta KL(q(z|x,c) || N(0, I))``, mean over cells (nats).

        Uses one reparameterized sample of z (Kingma & Welling 2014) regardless of train/eval mode.
        """
        z_mean, z_logvar = self.encode(x, c)
        z = z_mean + torch.exp(0.5 * z_logvar) * torch.randn_like(z_mean)
        params = self.decode(z, c, x)
        recon = -self.distribution(params).log_prob(x).sum(-1)
        kl = 0.5 * (torch.exp(z_logvar) + z_mean**2 - 1.0 - z_logvar).sum(-1)
        b = self.beta if beta is None else beta
        return (recon + b * kl).mean()


class CVAE_NB(CVAE):
    """Conditional VAE with a negative binomial likelihood on counts (scVI-style decoder, per-gene theta).

    ``forward`` returns ``z_mean``, ``z_logvar``, ``z``, ``mu`` (expected counts, (n_cells, input_dim)),
    ``theta`` (inverse dispersion, (input_dim,)) and ``scale`` (softmax proportions, rows sum to 1).
    ``decode(z, c, library=...)`` takes the library size (total counts, (n_cells, 1)) to produce ``mu``; without
    it ``mu`` equals ``scale`` times 1e4.
    """

    def _init_heads(self, n_hidden: int, n_out: int) -> None:
        self.scale_head = nn.Linear(n_hidden, n_out)
        self.log_theta = nn.Parameter(torch.randn(n_out))

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x)

    def _library(self, x_or_lib: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if x_or_lib is None:
            return torch.full((like.shape[0], 1), 1e4, dtype=like.dtype)
        if x_or_lib.shape[-1] == 1:
            return x_or_lib
        return x_or_lib.sum(-1, keepdim=True).clamp(min=1.0)

    def _decode_params(self, h: torch.Tensor, x: torch.Tensor | None) -> dict:
        scale = torch.softmax(self.scale_head(h), dim=-1)
        return {"scale": scale, "mu": scale * self._library(x, h), "theta": torch.exp(self.log_theta)}

    def distribution(self, params: dict):
        return NegativeBinomial(params["mu"], params["theta"])


class CVAE_ZINB(CVAE_NB):
    """Conditional VAE with a zero-inflated negative binomial likelihood on counts.

    As :class:`CVAE_NB`, plus ``zi_logits`` (n_cells, input_dim): logits of the structural-zero probability.
    """

    def _init_heads(self, n_hidden: int, n_out: int) -> None:
        super()._init_heads(n_hidden, n_out)
        self.zi_head = nn.Linear(n_hidden, n_out)

    def _decode_params(self, h: torch.Tensor, x: torch.Tensor | None) -> dict:
        out = super()._decode_params(h, x)
        out["zi_logits"] = self.zi_head(h)
        return out

    def distribution(self, params: dict):
        return ZeroInflatedNegativeBinomial(params["mu"], params["theta"], params["zi_logits"])
