"""Likelihoods for single-cell data as small distribution classes.

Each class holds its parameters as tensors of one broadcast shape, usually (n_cells, n_genes), and offers
``log_prob(x)`` (nats, element-wise, same shape as ``x``), ``mean``, ``variance`` and ``sample()``.
All log-probabilities are computed in log space with the stable forms below, so that they stay finite for
inverse dispersion theta in [1e-4, 1e8] (and beyond: theta = inf is the Poisson limit), mean mu in [0, 1e7] and
counts up to 1e6, in float64 and float32. float16 and bfloat16 parameters are computed in float32 and give a float32
log-probability: their range (float16: 65504) and precision (bfloat16: 8 bits) cannot hold the lgamma terms of
counts, and a log-probability of -1e5 nats is not representable in float16 (autocast does the same for ``lgamma``).

Parameterisations follow scVI (Lopez et al. 2018, Nat. Methods 15:1053, Methods "Model"):

- Negative binomial NB(mu, theta): mean ``mu``, inverse dispersion ``theta``, variance ``mu + mu**2 / theta``.
- Zero-inflated NB ZINB(mu, theta, zi_logits): with probability ``sigmoid(zi_logits)`` a structural zero,
  otherwise NB(mu, theta).
- Poisson(mu).
- Zero-inflated Poisson ZIP(mu, zi_logits): with probability ``sigmoid(zi_logits)`` a structural zero, otherwise
  Poisson(mu) (Lambert 1992, Technometrics 34:1; scvi-tools' ``ZeroInflatedPoisson`` parameterisation).
- Normal(loc, scale): for log1p-normalized expression (not counts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ['lgamma_ratio', 'log_nb_positive', 'log_zinb_positive', 'log_zip_positive', 'Normal', 'Poisson',
           'NegativeBinomial', 'ZeroInflatedNegativeBinomial', 'ZeroInflatedPoisson']



_STIRLING_MIN = 1e2  # above this theta, lgamma(x + theta) - lgamma(theta) uses the Stirling difference form
_THETA_MAX = 1e30  # theta is capped here (theta = inf: the Poisson limit); the NB differs from it by < x^2 / theta
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _tiny(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).tiny if t.is_floating_point() else torch.finfo(torch.float32).tiny


def _positive(mu: torch.Tensor) -> torch.Tensor:
    """``mu`` with zeros (and negatives) replaced by the smallest normal number, so ``log(mu)`` stays finite;
    positive values, subnormal ones included, are kept exactly (a clamp would move subnormals up)."""
    return torch.where(mu > 0, mu, torch.full_like(mu, _tiny(mu)))


def _upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float16 / bfloat16 tensors as float32 (log-probabilities are computed and returned in float32 for them)."""
    return tuple(t.float() if t.dtype in _LOW_PRECISION else t for t in tensors)


def lgamma_ratio(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + theta) - lgamma(theta)`` without cancellation for large ``theta``.

    For ``theta > 100`` the difference of the Stirling series is used:
    ``(theta - 1/2) log1p(x / theta) + x log(x + theta) - x + 1/(12 (x + theta)) - 1/(12 theta)``,
    whose truncation error is below ``1/(360 theta^3)`` (< 3e-9 nats). The direct form would lose all
    significant digits in float32 once ``lgamma(theta)`` exceeds ~1e7 (theta ~ 1e6).

    Args:
        x: counts, any shape broadcastable with ``theta``; non-negative.
        theta: inverse dispersion, positive.

    Returns:
        Tensor of the broadcast shape (nats).
    """
    x, theta = _upcast(x, theta)
    big = theta > _STIRLING_MIN
    if not bool(big.any()):  # common case in training: skip the Stirling branch entirely
        return torch.lgamma(x + theta) - torch.lgamma(theta)
    theta_big = torch.where(big, theta, torch.full_like(theta, 2 * _STIRLING_MIN))
    xt = x + theta_big
    stirling = (
        (theta_big - 0.5) * torch.log1p(x / theta_big)
        + x * torch.log(xt)
        - x
        + (1.0 / 12.0) * (1.0 / xt - 1.0 / theta_big)
    )
    theta_small = torch.where(big, torch.ones_like(theta), theta)
    direct = torch.lgamma(x + theta_small) - torch.lgamma(theta_small)
    return torch.where(big, stirling, direct)


def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Element-wise log NB(x; mu, theta) in nats.

    ``log p = lgamma(x+theta) - lgamma(theta) - lgamma(x+1) - theta log1p(mu/theta) + x (log mu - log(theta+mu))``.

    For ``theta > 100`` the Stirling difference (see :func:`lgamma_ratio`) is combined with the last term so that
    the two ``x log(theta)``-sized parts cancel analytically:
    ``(theta - 1/2) log1p(x/theta) - theta log1p(mu/theta) + x log((x+theta)/(theta+mu)) + x log mu - x
    - lgamma(x+1) + (1/(x+theta) - 1/theta) / 12``. Its float32 rounding error then scales with the Poisson-sized
    terms (``x log mu``, ``lgamma(x+1)``) instead of ``x log theta``, and ``theta`` up to ``1e30`` (the cap; inf
    gives the Poisson limit) stays finite.

    ``mu = 0`` is replaced by the dtype's smallest normal number so that it gives a finite value
    (``log p(0) = 0`` and a very negative value for ``x > 0``). float16 / bfloat16 inputs are computed in float32.
    """
    x, mu, theta = _upcast(x, mu, theta)
    mu = _positive(mu)
    theta = theta.clamp(max=_THETA_MAX)
    big = theta > _STIRLING_MIN
    if not bool(big.any()):  # common case in training: direct form only
        return (
            torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1.0)
            - theta * torch.log1p(mu / theta)
            + x * (torch.log(mu) - torch.log(theta + mu))
        )
    th_s = torch.where(big, torch.ones_like(theta), theta)
    direct = (
        torch.lgamma(x + th_s)
        - torch.lgamma(th_s)
        - th_s * torch.log1p(mu / th_s)
        + x * (torch.log(mu) - torch.log(th_s + mu))
    )
    th_b = torch.where(big, theta, torch.full_like(theta, 2 * _STIRLING_MIN))
    xt = x + th_b
    stirling = (
        (th_b - 0.5) * torch.log1p(x / th_b)
        - th_b * torch.log1p(mu / th_b)
        + x * torch.log(xt / (th_b + mu))
        + x * torch.log(mu)
        - x
        + (1.0 / 12.0) * (1.0 / xt - 1.0 / th_b)
    )
    return torch.where(big, stirling, direct) - torch.lgamma(x + 1.0)


def log_zinb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor
) -> torch.Tensor:
    """Element-wise log ZINB(x; mu, theta, zi_logits) in nats.

    With ``pi = sigmoid(zi_logits)``: ``p(0) = pi + (1 - pi) NB(0)`` and ``p(x>0) = (1 - pi) NB(x)``, computed as
    ``logaddexp(zi_logits, log NB(0)) - softplus(zi_logits)`` and ``log NB(x) - softplus(zi_logits)``.
    """
    x, zi_logits = _upcast(x, zi_logits)
    log_nb = log_nb_positive(x, mu, theta)
    zero = torch.logaddexp(zi_logits, log_nb)
    return torch.where(x == 0, zero, log_nb) - F.softplus(zi_logits)


def log_zip_positive(x: torch.Tensor, mu: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise log ZIP(x; mu, zi_logits) in nats.

    With ``pi = sigmoid(zi_logits)``: ``p(0) = pi + (1 - pi) exp(-mu)`` and ``p(x>0) = (1 - pi) Poisson(x; mu)``,
    computed as ``logaddexp(zi_logits, -mu) - softplus(zi_logits)`` and ``log Poisson(x; mu) - softplus(zi_logits)``
    (the ZINB form of :func:`log_zinb_positive` with the Poisson in place of the NB). ``mu = 0`` gives
    ``log p(0) = 0`` and a very negative value for ``x > 0``; float16 / bfloat16 inputs are computed in float32.
    """
    x, mu, zi_logits = _upcast(x, mu, zi_logits)
    log_po = x * torch.log(_positive(mu)) - mu - torch.lgamma(x + 1.0)
    zero = torch.logaddexp(zi_logits, log_po)
    return torch.where(x == 0, zero, log_po) - F.softplus(zi_logits)


class _Distribution:
    """Common helpers: broadcast shape and a tensor-only interface."""

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() and self.mean.dim() and x.shape[-1] != self.mean.shape[-1]:
            raise ValueError(
                f"{type(self).__name__}.log_prob got x with last dimension {x.shape[-1]}, "
                f"but the parameters have {self.mean.shape[-1]} (genes)."
            )


class Normal(_Distribution):
    """Gaussian N(loc, scale**2), used on log1p-normalized expression.

    Args:
        loc: mean, shape (..., n_genes), in the units of the data (log1p of normalized counts).
        scale: standard deviation, positive, broadcastable with ``loc``.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        self.loc = loc
        self.scale = scale

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return (self.scale**2).expand_as(self.loc)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise log density (nats)."""
        self._check(x)
        x, loc, scale = _upcast(x, self.loc, self.scale)
        z = (x - loc) / scale
        return -0.5 * z * z - torch.log(scale) - 0.5 * math.log(2 * math.pi)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.loc.shape
        with torch.no_grad():
            return self.loc + self.scale * torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)


class Poisson(_Distribution):
    """Poisson(mu) on counts.

    Args:
        mu: rate (expected counts), shape (..., n_genes), non-negative.
    """

    def __init__(self, mu: torch.Tensor):
        self.mu = mu

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise log pmf ``x log mu - mu - lgamma(x+1)`` (nats)."""
        self._check(x)
        x, mu = _upcast(x, self.mu)
        mu = _positive(mu)
        return x * torch.log(mu) - mu - torch.lgamma(x + 1.0)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.mu.shape
        with torch.no_grad():
            return torch.poisson(self.mu.expand(shape).clamp(max=1e8))


class NegativeBinomial(_Distribution):
    """Negative binomial NB(mu, theta) on counts (mean / inverse-dispersion form, scVI's ``px_r = theta``).

    Args:
        mu: mean (expected counts), shape (..., n_genes), non-negative.
        theta: inverse dispersion, positive, broadcastable with ``mu`` (per gene: shape (n_genes,)).
    """

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor):
        self.mu = mu
        self.theta = theta

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu**2 / self.theta

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise log pmf (nats), see :func:`log_nb_positive`."""
        self._check(x)
        return log_nb_positive(x, self.mu, self.theta)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Gamma-Poisson sample: ``rate ~ Gamma(theta, theta/mu)``, ``x ~ Poisson(rate)``."""
        shape = torch.Size(sample_shape) + self.mu.shape
        with torch.no_grad():
            mu = self.mu.expand(shape).clamp(min=_tiny(self.mu))
            theta = self.theta.expand(shape)
            rate = torch.distributions.Gamma(theta, theta / mu).sample()
            return torch.poisson(rate.clamp(max=1e8))


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """Zero-inflated negative binomial ZINB(mu, theta, zi_logits) on counts.

    Args:
        mu: NB mean, shape (..., n_genes).
        theta: NB inverse dispersion, broadcastable with ``mu``.
        zi_logits: logits of the structural-zero probability ``pi``, broadcastable with ``mu``.
    """

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor):
        super().__init__(mu, theta)
        self.zi_logits = zi_logits

    @property
    def zi_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        return (1.0 - self.zi_probs) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        pi = self.zi_probs
        return (1.0 - pi) * self.mu * (self.mu + self.theta + pi * self.theta * self.mu) / self.theta

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise log pmf (nats), see :func:`log_zinb_positive`."""
        self._check(x)
        return log_zinb_positive(x, self.mu, self.theta, self.zi_logits)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        nb = super().sample(sample_shape)
        with torch.no_grad():
            keep = torch.rand_like(nb) >= self.zi_probs.expand(nb.shape)
            return nb * keep




class ZeroInflatedPoisson(_Distribution):
    """Zero-inflated Poisson ZIP(mu, zi_logits) on counts: a structural zero with probability
    ``pi = sigmoid(zi_logits)``, otherwise a draw of :class:`Poisson` ``(mu)`` (Lambert 1992, Technometrics 34:1).

    It wraps a :class:`Poisson` (``self.poisson``, the count component) rather than inheriting from it: a ZIP is
    not a Poisson (its mean and variance differ), it has one.

    Args:
        mu: Poisson rate of the count component (expected counts when not a structural zero), shape
            (..., n_genes), non-negative.
        zi_logits: logits of the structural-zero probability ``pi``, broadcastable with ``mu``.

    Mean ``(1 - pi) mu``; variance ``(1 - pi) mu (1 + pi mu)``.
    """

    def __init__(self, mu: torch.Tensor, zi_logits: torch.Tensor):
        self.mu = mu
        self.zi_logits = zi_logits

    @property
    def poisson(self) -> Poisson:
        """The count component ``Poisson(mu)``."""
        return Poisson(self.mu)

    @property
    def zi_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        return (1.0 - self.zi_probs) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        pi = self.zi_probs
        return (1.0 - pi) * self.mu * (1.0 + pi * self.mu)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise log pmf (nats), see :func:`log_zip_positive`."""
        self._check(x)
        return log_zip_positive(x, self.mu, self.zi_logits)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """A Poisson draw, set to zero with probability ``pi``."""
        counts = self.poisson.sample(sample_shape)
        with torch.no_grad():
            keep = torch.rand_like(counts) >= self.zi_probs.expand(counts.shape)
            return counts * keep
