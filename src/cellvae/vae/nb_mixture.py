"""The protein likelihood of totalVI: a two-component negative binomial mixture of background and foreground
(Gayoso et al. 2021, Nat. Methods 18:272, Methods "totalVI generative model").

For protein t in cell n, with background mean ``beta_nt``, foreground scaling ``alpha_nt >= 1``, background
probability ``pi_nt`` and inverse dispersion ``phi_t``::

    y_nt ~ pi_nt NB(beta_nt, phi_t) + (1 - pi_nt) NB(alpha_nt beta_nt, phi_t)

Everything here works from the **log** means, ``log mu = log beta`` and ``log beta + log alpha``, so that no mean is
ever exponentiated in the likelihood: with counts up to 1e5 (antibody-derived tags reach 10^4-10^5, docs/inputs.md)
and log means anywhere in the float range, the log-probability and its gradients stay finite. The NB terms are
written with ``d = log mu - log phi``::

    log NB(y; mu, phi) = [lgamma(y + phi) - lgamma(phi) - lgamma(y + 1)] - phi softplus(d) - y softplus(-d)

(``phi log(phi / (phi + mu)) = -phi softplus(d)`` and ``y log(mu / (phi + mu)) = -y softplus(-d)``), and the bracket
by :func:`cellvae.vae.distributions.lgamma_ratio` (a Stirling difference for large ``phi``). The mixture is
``logaddexp(log pi + log NB_1, log(1 - pi) + log NB_2)`` with ``log pi = -softplus(-logit)`` and
``log(1 - pi) = -softplus(logit)``. Protein panels are small (tens of antibodies), so the log-probability is computed
in float64 and returned in the parameters' dtype: a count of 1e5 has ``lgamma(y + 1) ~ 1e6`` nats, whose float32
rounding (0.06 nats) would be as large as the differences between models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..native import ops
from .distributions import lgamma_ratio

__all__ = ["log_nb_log_mu", "log_nb_mixture", "protein_elbo_terms", "protein_elbo_terms_native",
           "NegativeBinomialMixture", "MU_MAX"]

MU_MAX = 1e8  # means are capped here only when they are exponentiated (``mean``, ``sample``), never in log_prob


def log_nb_log_mu(y: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Element-wise log NB(y; mu, theta) in nats from ``log mu`` and ``log theta`` (module docstring form).

    Args:
        y: counts, non-negative integers (float), any shape broadcastable with the parameters.
        log_mu: log of the NB mean.
        log_theta: log inverse dispersion.

    Returns:
        Tensor of the broadcast shape, in the promoted dtype of the inputs (nats).
    """
    d = log_mu - log_theta
    theta = log_theta.exp()
    return lgamma_ratio(y, theta) - torch.lgamma(y + 1.0) - theta * F.softplus(d) - y * F.softplus(-d)


def log_nb_mixture(y: torch.Tensor, log_mu1: torch.Tensor, log_mu2: torch.Tensor, log_theta: torch.Tensor,
                   mixture_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise log of ``pi NB(y; mu1, theta) + (1 - pi) NB(y; mu2, theta)``, ``pi = sigmoid(mixture_logits)``,
    in nats, computed in float64 (module docstring) and returned in the dtype of ``log_mu1``.

    The mixture part (``logaddexp`` of the two weighted NB terms) is one autograd node with its gradient in closed
    form (:class:`_MixtureLogSumExp`): with ``r1 = P(component 1 | y)``, ``s_k = sigmoid(log mu_k - log theta)``,
    ``d/d log mu_k = r_k (y - (theta + y) s_k)`` and ``d/d logits = r1 - pi``; the shared ``lgamma`` terms keep
    autograd's gradient. Equal to the plain autograd form within float64 rounding (tests/test_rna_protein.py).

    Args:
        y: (..., n_proteins) counts.
        log_mu1, log_mu2: log means of component 1 (totalVI: background) and 2 (foreground), broadcastable with y.
        log_theta: log inverse dispersion shared by both components, e.g. (n_proteins,).
        mixture_logits: logits of the probability of component 1.

    Returns:
        Tensor of the broadcast shape (nats).
    """
    out_dtype = log_mu1.dtype if log_mu1.dtype in (torch.float32, torch.float64) else torch.float32
    y, m1, m2, lt, w = (t.double() for t in (y, log_mu1, log_mu2, log_theta, mixture_logits))
    lgam = lgamma_ratio(y, lt.exp()) - torch.lgamma(y + 1.0)  # shared by both components
    return (lgam + _MixtureLogSumExp.apply(y, m1, m2, lt, w)).to(out_dtype)


def _mixture_forward(y, m1, m2, lt, w) -> tuple[torch.Tensor, tuple]:
    """``logaddexp(log pi + NB_1, log(1 - pi) + NB_2)`` without the shared lgamma terms, and the tensors
    :func:`_mixture_backward` needs (``NB_k = -theta softplus(d_k) - y softplus(-d_k)``, ``d_k = log mu_k - log
    theta``)."""
    theta = lt.exp()
    d1, d2 = m1 - lt, m2 - lt
    sp1, sp2 = F.softplus(d1), F.softplus(d2)
    a = -theta * sp1 - y * (sp1 - d1) - F.softplus(-w)  # softplus(-d) = softplus(d) - d
    b = -theta * sp2 - y * (sp2 - d2) - F.softplus(w)
    return torch.logaddexp(a, b), (y, d1, d2, sp1, sp2, theta, w, torch.sigmoid(a - b))


def _mixture_backward(g, y, d1, d2, sp1, sp2, theta, w, r1) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`_mixture_forward`'s output weighted by ``g``, with respect to ``(log mu1, log mu2,
    log theta, logits)`` (closed form of :func:`log_nb_mixture`'s docstring; not reduced over broadcasting)."""
    r2 = 1.0 - r1
    e1 = y - (theta + y) * torch.sigmoid(d1)  # d NB_k / d log mu_k
    e2 = y - (theta + y) * torch.sigmoid(d2)
    g_lt = -g * (r1 * (theta * sp1 + e1) + r2 * (theta * sp2 + e2))
    return g * r1 * e1, g * r2 * e2, g_lt, g * (r1 - torch.sigmoid(w))


class _MixtureLogSumExp(torch.autograd.Function):
    """:func:`_mixture_forward` as one autograd node whose backward is :func:`_mixture_backward` (first
    derivatives only), reduced to the shapes of the inputs."""

    @staticmethod
    def forward(ctx, y, m1, m2, lt, w):
        out, saved = _mixture_forward(y, m1, m2, lt, w)
        ctx.save_for_backward(*saved)
        ctx.shapes = (m1.shape, m2.shape, lt.shape, w.shape)
        return out

    @staticmethod
    def backward(ctx, g):
        grads = _mixture_backward(g, *ctx.saved_tensors)
        return None, *(gr.sum_to_size(shape) for gr, shape in zip(grads, ctx.shapes))


def protein_elbo_terms(y: torch.Tensor, heads: torch.Tensor, eps: torch.Tensor, log_theta: torch.Tensor,
                       prior_mean: torch.Tensor, prior_log_scale: torch.Tensor, mask: torch.Tensor,
                       scale_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """totalVI's protein part of the ELBO for one sample of ``log beta``, from the decoder's four heads, as one
    autograd node with a closed-form backward (training's fast path; equal within float tolerance to composing
    :class:`NegativeBinomialMixture` and the Gaussian KL with autograd, tests/test_rna_protein.py).

    With ``heads = [a, s, f, w]`` (each (n_cells, n_proteins)): ``q(log beta) = N(a, sd^2)``, ``sd = softplus(s) +
    scale_eps``, ``log beta = a + sd eps``; ``log alpha = log1p(softplus(f))``; ``logit pi = w``; the prior
    ``p(log beta) = N(prior_mean, exp(prior_log_scale)^2)``. Per cell, over the proteins with ``mask`` 1:

    - ``log p(y | z, beta) = sum_t log_nb_mixture(y_t; log beta_t, log beta_t + log alpha_t, log theta_t, w_t)``
      (the mixture in float64, :func:`log_nb_mixture`);
    - ``KL(q(log beta) || p(log beta)) = sum_t [log(p_sd / sd) + (sd^2 + (a - prior_mean)^2) / (2 p_sd^2) - 1/2]``.

    Gradients: the mixture's as :func:`log_nb_mixture`, chained through ``log beta`` and ``log alpha`` to the heads
    (``d sd / d s = sigmoid(s)``, ``d log alpha / d f = sigmoid(f) / (1 + softplus(f))``), and the Gaussian KL's.
    The shared ``lgamma`` terms of the mixture depend on ``log theta`` only and keep autograd's gradient.

    Args:
        y: (n_cells, n_proteins) counts.
        heads: (n_cells, 4 n_proteins) the heads' outputs ``[a, s, f, w]``.
        eps: (n_cells, n_proteins) standard normal draws of the reparametrisation.
        log_theta: (n_proteins,) or (n_cells, n_proteins) log inverse dispersion.
        prior_mean, prior_log_scale: (n_cells, n_proteins) the prior of ``log beta`` of each cell's batch.
        mask: (n_cells, n_proteins) 1 for the proteins measured in the cell's batch, else 0.
        scale_eps: floor added to ``softplus(s)``.

    Returns:
        ``(log p(y | z, beta), KL)``, each (n_cells,) in nats, in the dtype of ``heads``.
    """
    y64, lt = y.double(), log_theta.double()
    lgam = lgamma_ratio(y64, lt.exp()) - torch.lgamma(y64 + 1.0)  # shared by both components
    mix, kl = _ProteinHeads.apply(y64, heads, eps, lt, prior_mean, prior_log_scale, mask, float(scale_eps))
    return ((lgam * mask).sum(-1) + mix).to(heads.dtype), kl


class _ProteinHeads(torch.autograd.Function):
    """:func:`protein_elbo_terms` without the shared lgamma terms: ``(sum_t m_t mixture_t, sum_t m_t KL_t)``."""

    @staticmethod
    def forward(ctx, y, heads, eps, lt, pb_m, pb_ls, mask, scale_eps):
        P = y.shape[-1]
        qb_m, qb_s, fg_s, w = heads.split(P, -1)
        sd = F.softplus(qb_s) + scale_eps
        sp_f = F.softplus(fg_s)
        m1 = (qb_m + sd * eps).double()
        mix, saved = _mixture_forward(y, m1, m1 + torch.log1p(sp_f).double(), lt, w.double())
        mix = (mix * mask).sum(-1)
        pb_v = torch.exp(2.0 * pb_ls)
        diff = qb_m - pb_m
        ssq = sd * sd + diff * diff
        kl = ((pb_ls - torch.log(sd) + 0.5 * ssq / pb_v - 0.5) * mask).sum(-1)
        ctx.save_for_backward(*saved, eps, sd, qb_s, fg_s, sp_f, diff, pb_v, ssq, mask)
        ctx.lt_shape = lt.shape
        return mix, kl

    @staticmethod
    def backward(ctx, g_mix, g_kl):
        *saved, eps, sd, qb_s, fg_s, sp_f, diff, pb_v, ssq, mask = ctx.saved_tensors
        gm = g_mix.double().unsqueeze(-1) * mask
        gk = g_kl.unsqueeze(-1) * mask
        g_m1, g_m2, g_lt, g_w = _mixture_backward(gm, *saved)
        g_w = g_w.to(sd.dtype)
        g_beta = (g_m1 + g_m2).to(sd.dtype)  # d / d log beta (both components' means move with it)
        g_alpha = g_m2.to(sd.dtype)
        g_a = g_beta + gk * diff / pb_v
        g_sd = g_beta * eps + gk * (sd / pb_v - 1.0 / sd)
        g_heads = torch.cat([g_a, g_sd * torch.sigmoid(qb_s), g_alpha * torch.sigmoid(fg_s) / (1.0 + sp_f), g_w], -1)
        return (None, g_heads, None, g_lt.sum_to_size(ctx.lt_shape), -gk * diff / pb_v, gk * (1.0 - ssq / pb_v),
                None, None)


def protein_elbo_terms_native(y: torch.Tensor, heads: torch.Tensor, eps: torch.Tensor, log_theta: torch.Tensor,
                              batch: torch.Tensor, prior_mean: torch.Tensor, prior_log_scale: torch.Tensor,
                              mask: torch.Tensor, scale_eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`protein_elbo_terms` through the C kernel :func:`cellvae.native.ops.protein_mixture` (forward and
    backward each one call instead of about fifty small operators; the same values within float32 rounding,
    tests/test_rna_protein.py), or None when the kernel does not apply (no compiler, not float32 CPU tensors).

    Args:
        y: (n_cells, n_proteins) counts; heads: (n_cells, 4 n_proteins); eps: (n_cells, n_proteins) draws.
        log_theta: (n_proteins,) or (n_batch, n_proteins) log inverse dispersion (per batch: row of the cell's
            batch).
        batch: (n_cells,) int64 batch codes.
        prior_mean, prior_log_scale, mask: (n_batch, n_proteins) the prior of ``log beta`` and the protein mask of
            each batch (gathered for each cell inside the kernel; the gradients reach the tables).
        scale_eps: floor added to ``softplus(s)``.

    Returns:
        ``(log p(y | z, beta), KL)``, each (n_cells,) float32 nats, or None.

    Raises:
        CellvaeInputError: a batch code out of range, or a negative, non-finite or non-integer count.
    """
    batch = batch.contiguous()
    if not ops.applies(y, heads, eps, log_theta, batch, prior_mean, prior_log_scale, mask):
        return None
    return _ProteinHeadsNative.apply(heads, log_theta, prior_mean, prior_log_scale, y, eps, batch, mask,
                                     float(scale_eps))


class _ProteinHeadsNative(torch.autograd.Function):
    """:func:`protein_elbo_terms_native` as one autograd node: the kernel's forward (with its element-wise
    derivatives when a gradient is needed) and its backward call."""

    @staticmethod
    def forward(ctx, heads, log_theta, prior_mean, prior_log_scale, y, eps, batch, mask, scale_eps):
        need = any(ctx.needs_input_grad[:4])
        ll, kl, deriv = ops.protein_mixture(y, heads, eps, log_theta, batch, prior_mean, prior_log_scale, mask,
                                            scale_eps, derivatives=need)
        if need:
            ctx.save_for_backward(batch, deriv)
            ctx.shapes = (log_theta.shape, prior_mean.shape[0])
        return ll, kl

    @staticmethod
    def backward(ctx, g_ll, g_kl):
        batch, deriv = ctx.saved_tensors
        n = deriv.shape[0]
        g_ll = deriv.new_zeros(n) if g_ll is None else g_ll.float().contiguous()
        g_kl = deriv.new_zeros(n) if g_kl is None else g_kl.float().contiguous()
        lt_shape, nb = ctx.shapes
        n_rows = lt_shape[0] if len(lt_shape) == 2 else 1
        gh, glt, gpm, gpls = ops.protein_mixture_backward(batch, deriv, g_ll, g_kl, n_rows, nb)
        return gh, glt.reshape(lt_shape), gpm, gpls, None, None, None, None, None


class NegativeBinomialMixture:
    """``pi NB(mu1, theta) + (1 - pi) NB(mu2, theta)`` on counts: totalVI's protein likelihood with component 1 the
    background (mean ``beta``) and component 2 the foreground (mean ``alpha beta``), ``pi`` the probability of
    background (Gayoso et al. 2021, Methods).

    Args:
        log_mu1: log background mean, (..., n_proteins).
        log_mu2: log foreground mean, broadcastable with ``log_mu1``.
        log_theta: log inverse dispersion, broadcastable (per protein: (n_proteins,)).
        mixture_logits: logits of ``pi`` (background), broadcastable.

    Attributes (tensors of the broadcast shape): ``mu1``, ``mu2`` (means, capped at :data:`MU_MAX`),
    ``theta``, ``background_probability`` (``pi``), ``foreground_probability`` (``1 - pi``), ``mean``,
    ``variance``.
    """

    def __init__(self, log_mu1: torch.Tensor, log_mu2: torch.Tensor, log_theta: torch.Tensor,
                 mixture_logits: torch.Tensor):
        self.log_mu1, self.log_mu2, self.log_theta, self.mixture_logits = log_mu1, log_mu2, log_theta, mixture_logits

    @property
    def mu1(self) -> torch.Tensor:
        return self.log_mu1.exp().clamp(max=MU_MAX)

    @property
    def mu2(self) -> torch.Tensor:
        return self.log_mu2.exp().clamp(max=MU_MAX)

    @property
    def theta(self) -> torch.Tensor:
        return self.log_theta.exp()

    @property
    def background_probability(self) -> torch.Tensor:
        return torch.sigmoid(self.mixture_logits)

    @property
    def foreground_probability(self) -> torch.Tensor:
        return torch.sigmoid(-self.mixture_logits)

    @property
    def mean(self) -> torch.Tensor:
        pi = self.background_probability
        return pi * self.mu1 + (1.0 - pi) * self.mu2

    @property
    def variance(self) -> torch.Tensor:
        """``E[Var | component] + Var[E | component]``: ``sum_k w_k (mu_k + mu_k^2 / theta) + pi (1 - pi)
        (mu1 - mu2)^2``."""
        pi, m1, m2, th = self.background_probability, self.mu1, self.mu2, self.theta
        return pi * (m1 + m1 * m1 / th) + (1 - pi) * (m2 + m2 * m2 / th) + pi * (1 - pi) * (m1 - m2) ** 2

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Element-wise log pmf (nats), see :func:`log_nb_mixture`."""
        return log_nb_mixture(y, self.log_mu1, self.log_mu2, self.log_theta, self.mixture_logits)

    def posterior_foreground_probability(self, y: torch.Tensor) -> torch.Tensor:
        """``P(foreground | y)``: the responsibility of component 2 for the observed counts ``y`` (unlike
        :attr:`foreground_probability`, the prior weight ``1 - pi``, it uses the count itself)."""
        y, m1, m2, lt, w = (t.double() for t in (y, self.log_mu1, self.log_mu2, self.log_theta, self.mixture_logits))
        a = log_nb_log_mu(y, m1, lt) - F.softplus(-w)
        b = log_nb_log_mu(y, m2, lt) - F.softplus(w)
        return torch.sigmoid(b - a).to(self.log_mu1.dtype)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Counts: the component from ``Bernoulli(pi)``, then the Gamma-Poisson NB draw of its mean (float,
        integer-valued; means capped at :data:`MU_MAX`)."""
        shape = torch.Size(sample_shape) + torch.broadcast_shapes(
            self.log_mu1.shape, self.log_mu2.shape, self.log_theta.shape, self.mixture_logits.shape)
        with torch.no_grad():
            background = torch.rand(shape, device=self.log_mu1.device) < self.background_probability.expand(shape)
            mu = torch.where(background, self.mu1.expand(shape), self.mu2.expand(shape)).clamp(min=1e-30)
            theta = self.theta.expand(shape)
            rate = torch.distributions.Gamma(theta, theta / mu).sample()
            return torch.poisson(rate.clamp(max=MU_MAX))
