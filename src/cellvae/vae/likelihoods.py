"""One object per gene likelihood: what it is, whether it models counts, whether it has an inverse dispersion
theta, and which fused training loss computes it. Modules and models ask the object instead of comparing names.

The names are the vocabulary of :data:`cellvae.settings.GENE_LIKELIHOODS` (``gene_likelihood=`` of
:class:`cellvae.CountVAE`, ``--gene-likelihood`` of ``cellvae fit``):

- ``"zinb"``: zero-inflated negative binomial, ``ZINB(mu, theta, pi)``;
- ``"nb"``: negative binomial ``NB(mu, theta)``;
- ``"poisson"``: ``Poisson(mu)``;
- ``"zip"``: zero-inflated Poisson, ``ZIP(mu, pi)`` (no fused training loss: the distribution classes compute it);
- ``"normal"``: ``N(mu, sigma^2)`` on log1p-normalized expression (not counts).

For counts, ``mu = l * rho`` with ``rho = softmax(decoder)`` (Lopez et al. 2018, Nat. Methods 15:1053, Methods).
Adding a likelihood means one class here, its distribution in :mod:`cellvae.vae.distributions` (tested against
``scipy.stats``) and its name in :mod:`cellvae.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CellvaeInputError
from ..settings import GENE_LIKELIHOODS
from .distributions import NegativeBinomial, Normal, Poisson, ZeroInflatedNegativeBinomial, ZeroInflatedPoisson

__all__ = ["GeneLikelihood", "LIKELIHOODS", "get_likelihood", "FUSED_NB", "FUSED_POISSON"]

FUSED_NB = "linear_softmax_nb"  # cellvae.vae.losses.linear_softmax_count_log_prob_sum (native kernel where it runs)
FUSED_POISSON = "log_softmax_poisson"  # cellvae.vae.losses.count_log_prob_sum of the log-softmax


@dataclass(frozen=True)
class GeneLikelihood:
    """A gene likelihood of the scVI decoder.

    Attributes:
        name: its name in :data:`cellvae.settings.GENE_LIKELIHOODS`.
        models_counts: it is a distribution of non-negative integer counts (the decoder ends in a softmax over
            genes and the mean is ``library * rho``); False for ``"normal"`` (log1p-normalized data, observed
            library).
        has_theta: it has an inverse dispersion theta (NB, ZINB; and the Normal's variance, stored the same way).
        zero_inflated: it has zero-inflation logits (a decoder head).
        has_fused_loss: a fused training loss of :mod:`cellvae.vae.losses` computes it (:meth:`fused_loss`); False
            for a likelihood that only the distribution classes compute (``"zip"``).
    """

    name: str
    models_counts: bool
    has_theta: bool
    zero_inflated: bool
    has_fused_loss: bool = True

    def has_gene_theta(self, dispersion: str) -> bool:
        """Whether theta is the module parameter ``px_r`` (log theta per gene, or per gene and batch) of an NB /
        ZINB likelihood: the parameter that ``dispersion_init`` sets and ``dispersion_lr_multiplier`` speeds up."""
        return self.models_counts and self.has_theta and dispersion in ("gene", "gene-batch")

    def fused_loss(self, dispersion: str) -> str | None:
        """The fused training loss of this likelihood with this dispersion: :data:`FUSED_NB` (log-softmax + NB /
        ZINB log-likelihood with all derivatives in one pass, the decoder's output layers folded in),
        :data:`FUSED_POISSON`, or None when the distribution classes compute the loss (Normal; ZIP; a decoder head
        per cell, ``"gene-cell"``)."""
        if not self.models_counts or not self.has_fused_loss or dispersion == "gene-cell":
            return None
        return FUSED_NB if self.has_theta else FUSED_POISSON

    def distribution(self, rho: torch.Tensor, library: torch.Tensor | None, log_theta: torch.Tensor | None,
                     zi_logits: torch.Tensor | None):
        """``p(x | z, l)`` for decoder output ``rho`` (n, n_genes): for counts, mean ``exp(library) * rho`` (library
        the log library size, (n, 1)); for ``"normal"``, mean ``rho`` and variance ``exp(log_theta)``.

        Returns:
            a distribution of :mod:`cellvae.vae.distributions` with parameters of shape (n, n_genes).
        """
        if not self.models_counts:
            return Normal(rho, torch.exp(0.5 * log_theta))
        mu = torch.exp(library) * rho
        if not self.has_theta:
            return ZeroInflatedPoisson(mu, zi_logits) if self.zero_inflated else Poisson(mu)
        theta = torch.exp(log_theta)
        if self.zero_inflated:
            return ZeroInflatedNegativeBinomial(mu, theta, zi_logits)
        return NegativeBinomial(mu, theta)


LIKELIHOODS = {
    "zinb": GeneLikelihood("zinb", models_counts=True, has_theta=True, zero_inflated=True),
    "nb": GeneLikelihood("nb", models_counts=True, has_theta=True, zero_inflated=False),
    "poisson": GeneLikelihood("poisson", models_counts=True, has_theta=False, zero_inflated=False),
    "normal": GeneLikelihood("normal", models_counts=False, has_theta=True, zero_inflated=False),
    "zip": GeneLikelihood("zip", models_counts=True, has_theta=False, zero_inflated=True, has_fused_loss=False),
}
assert tuple(LIKELIHOODS) == GENE_LIKELIHOODS  # the vocabulary of cellvae.settings, in its order


def get_likelihood(name: str | GeneLikelihood) -> GeneLikelihood:
    """The :class:`GeneLikelihood` called ``name`` (an object is returned as it is).

    Raises:
        CellvaeInputError: an unknown name.
    """
    if isinstance(name, GeneLikelihood):
        return name
    try:
        return LIKELIHOODS[name]
    except (KeyError, TypeError):
        raise CellvaeInputError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}, got {name!r}.") from None
