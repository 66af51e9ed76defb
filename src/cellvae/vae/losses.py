"""The fused training likelihood of the scVI decoder: per-cell log-likelihood of counts from the log mean (or from the
decoder's logits, with the log-softmax folded in), equal to the distribution classes of
:mod:`cellvae.vae.distributions` to float rounding but cheaper:

- :func:`count_log_prob_sum`: Poisson, NB or ZINB from ``log mu``; the ``lgamma`` terms of integer counts come from a
  per-gene table, NB / ZINB have a hand-written backward, and sparse CSR counts are read at their non-zeros only;
- :func:`softmax_count_log_prob_sum`: the same from the decoder's logits; on the CPU in float32 one native pass
  (:mod:`cellvae.native.ops`) computes the log-softmax, every entry's likelihood and all derivatives;
- :func:`linear_softmax_count_log_prob_sum`: the same with the decoder's output layers folded in, so that the
  backward pass applies the per-cell gradient on the (cells x hidden) side of the weight products.

Parameterisations follow scVI (Lopez et al. 2018, Nat. Methods 15:1053, Methods): ``mu = l * softmax(f(z))``, theta
per gene (or per gene and batch), zero-inflation logits per entry. Sparse CSR counts must be canonical
(:mod:`cellvae.data.sparse`); anything else is refused on every path.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ..native import ops
from ..data.sparse import check_csr_tensor, csr_parts, csr_rows
from .distributions import lgamma_ratio

__all__ = ['count_log_prob_sum', 'linear_softmax_count_log_prob_sum', 'softmax_count_log_prob_sum']


# --------------------------------------------------------------------------------- fast training likelihood
_TABLE_MAX = 32  # counts up to this use the per-gene lookup table; larger ones are computed directly


def _lgamma_table(log_theta: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``theta`` (R, G) (R = 1 for per-gene ``log_theta`` (G,)) and the (R, k_max + 1, G) table of
    ``lgamma(k + theta) - lgamma(theta) - lgamma(k + 1) = sum_{j<k} log(theta + j) - lgamma(k + 1)``."""
    theta = log_theta.exp()
    if theta.dim() == 1:
        theta = theta.unsqueeze(0)  # (R=1, G)
    j = torch.arange(k_max, dtype=theta.dtype, device=theta.device)
    logs = torch.log(theta.unsqueeze(1) + j.view(1, -1, 1))  # (R, k_max, G)
    k = torch.arange(k_max + 1, dtype=theta.dtype, device=theta.device)
    table = torch.cat([torch.zeros_like(logs[:, :1]), logs.cumsum(1)], 1) - torch.lgamma(k + 1.0).view(1, -1, 1)
    return theta, table


def _count_table(x: torch.Tensor, log_theta: torch.Tensor, rows: torch.Tensor | None, k_max: int) -> torch.Tensor:
    """``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`` per element, from a table over integer counts.

    For an integer count k, ``lgamma(k + theta) - lgamma(theta) = sum_{j<k} log(theta + j)``: with theta per gene
    (or per row of ``log_theta`` picked by ``rows``), a (R, k_max + 1, n_genes) table costs ``k_max`` logs per
    gene instead of two ``lgamma`` per matrix element (and two ``digamma`` in the backward pass). Counts above
    ``k_max`` (rare) are computed with ``lgamma`` directly. Differentiable with respect to ``log_theta``.
    """
    theta, table = _lgamma_table(log_theta, k_max)
    xi = x.clamp(max=k_max).long()
    if rows is None:
        out = table[0].gather(0, xi)
    else:
        n_genes = x.shape[-1]
        flat = (rows.view(-1, 1) * (k_max + 1) + xi) * n_genes + torch.arange(n_genes, device=x.device)
        out = table.reshape(-1).take(flat)
    big = x > k_max
    if bool(big.any()):
        r, c = big.nonzero(as_tuple=True)
        xb = x[r, c]
        tb = theta[0 if rows is None else rows[r], c]
        out = out.index_put((r, c), lgamma_ratio(xb, tb) - torch.lgamma(xb + 1.0))
    return out


class _NBZeroTerms(torch.autograd.Function):
    """Sum over genes of the NB / ZINB log-likelihood without its count-table part, with a hand-written backward.

    With ``d = log mu - log theta``: ``log NB(0) = A = -theta softplus(d)``, and for any count
    ``log NB(x) = A + x (d - softplus(d)) + [lgamma(x+theta) - lgamma(theta) - lgamma(x+1)]``; the bracket comes from
    :func:`_count_table`. ZINB: zeros get ``logaddexp(zi, A)``, every entry ``- softplus(zi)``. Derivatives, with
    ``q = sigmoid(d)`` and ``w = sigmoid(A - zi)``: ``dA/dlog mu = -theta q``, ``dA/dlog theta = A + theta q``,
    ``d[x (d - softplus d)]/dlog mu = x (1 - q)`` (minus that for log theta); zeros scale the A-derivatives by w
    and give ``dzi = 1 - w``; every entry ``dzi -= sigmoid(zi)``. One saved pass per quantity instead of autograd's
    generic ``logaddexp``/``where`` backward.
    """

    @staticmethod
    def forward(ctx, x, log_mu, log_theta, zi_logits):
        # Masks as float arithmetic (torch.where and boolean tensors are several times slower on CPU).
        theta = log_theta.exp()
        d = log_mu - log_theta
        sp = F.softplus(d)
        A = -theta * sp
        ll = A + x * (d - sp)
        if zi_logits is None:
            ctx.save_for_backward(x, d, A, theta, None, None, None)
        else:
            zf = 1.0 - x.clamp(max=1.0)  # 1 for zero counts (x are non-negative integers)
            w = torch.sigmoid(A - zi_logits)
            zero_ll = A + F.softplus(zi_logits - A)  # logaddexp(zi, A)
            ll = torch.lerp(ll, zero_ll, zf) - F.softplus(zi_logits)
            ctx.save_for_backward(x, d, A, theta, zf, w, zi_logits)
        ctx.theta_shape = log_theta.shape
        return ll.sum(-1)

    @staticmethod
    def backward(ctx, grad):
        x, d, A, theta, zf, w, zi_logits = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        q = torch.sigmoid(d)
        tq = theta * q
        xq = x * (1.0 - q)  # zero where x is zero
        if w is None:
            dmu = xq - tq
            dth = A + tq - xq
            dzi = None
        else:
            scale = 1.0 + zf * (w - 1.0)  # w for zero counts, 1 otherwise
            dmu = xq - scale * tq
            dth = scale * (A + tq) - xq
            dzi = (zf * (1.0 - w) - torch.sigmoid(zi_logits)) * g
        dmu = dmu * g
        dth = dth * g
        while dth.dim() > len(ctx.theta_shape):
            dth = dth.sum(0)
        return None, dmu, dth, dzi


def count_log_prob_sum(
    x: torch.Tensor,
    log_mu: torch.Tensor,
    log_theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None,
    theta_rows: torch.Tensor | None = None,
    table_max: int = _TABLE_MAX,
) -> torch.Tensor:
    """Per-cell log-likelihood of counts (nats, summed over genes) for Poisson, NB or ZINB, computed from the log
    mean: the training path of :class:`cellvae.module.VAEModule`.

    Equal to ``Poisson(mu)`` / ``NegativeBinomial(mu, theta)`` / ``ZeroInflatedNegativeBinomial(mu, theta, zi)``
    ``.log_prob(x).sum(-1)`` (tested to 1e-5 relative, gradients included) but cheaper for training:

    - it takes ``log mu`` (library + log-softmax of the decoder), so no ``log`` of the mean is taken;
    - the ``lgamma`` terms of integer counts come from a per-gene table (:func:`_count_table`): ``k_max`` logs per
      gene instead of ``lgamma`` and ``digamma`` on every matrix element (they were half of a training step);
    - NB / ZINB have a hand-written backward (:class:`_NBZeroTerms`);
    - with ``x`` a sparse CSR tensor (2-d), only the non-zero counts are read: every entry is scored as a zero count
      from the parameters alone and the non-zero entries add their difference (:class:`_NBSparse`), so the count
      terms cost in proportion to the non-zeros.

    Args:
        x: (n_cells, n_genes) non-negative integer counts (float), dense or sparse CSR (without stored zeros).
        log_mu: (n_cells, n_genes) log of the NB / Poisson mean.
        log_theta: log inverse dispersion: (n_genes,) per gene, or (R, n_genes) with ``theta_rows`` (n_cells,)
            picking each cell's row (per batch); None for Poisson.
        zi_logits: (n_cells, n_genes) zero-inflation logits for ZINB, else None.
        table_max: largest count read from the table.

    Returns:
        (n_cells,) log-likelihood per cell, nats.
    """
    if x.layout == torch.sparse_csr:
        check_csr_tensor(x, "counts")
        return _count_log_prob_sum_sparse(x, log_mu, log_theta, zi_logits, theta_rows, table_max)
    if log_theta is None:  # Poisson
        return (x * log_mu - log_mu.exp() - _lgamma1_table(x, table_max)).sum(-1)
    table = _count_table(x, log_theta, theta_rows, table_max).sum(-1)
    lt = log_theta if theta_rows is None else log_theta[theta_rows]
    return _NBZeroTerms.apply(x, log_mu, lt, zi_logits) + table


def _lgamma1_table(x: torch.Tensor, k_max: int) -> torch.Tensor:
    """``lgamma(x + 1)`` per element from a table for counts up to ``k_max`` (direct above)."""
    k = torch.arange(k_max + 1, dtype=x.dtype, device=x.device)
    out = torch.lgamma(k + 1.0).take(x.clamp(max=k_max).long())
    big = x > k_max
    if bool(big.any()):
        out = torch.where(big, torch.lgamma(x + 1.0), out)
    return out


class _NBSparse(torch.autograd.Function):
    """Per-cell NB / ZINB log-likelihood from dense parameters and the non-zero counts only.

    With ``d = log mu - log theta`` and ``A = log NB(0) = -theta softplus(d)``, every entry is first scored as a zero
    count (dense, without reading the counts): NB ``A``; ZINB ``Z = logaddexp(zi, A) - softplus(zi) = A + u -
    softplus(zi)`` with ``u = softplus(zi - A)``. Each non-zero entry then adds its difference to that,
    ``x (d - softplus(d)) + T`` (NB), minus ``u`` for ZINB, where ``T = lgamma(x + theta) - lgamma(theta) -
    lgamma(x + 1)`` is given (``table``, from :func:`_table_at`). Derivatives with ``q = sigmoid(d)`` and
    ``w = sigmoid(A - zi)``: zeros ``dlog mu = -w theta q``, ``dlog theta = w (A + theta q)``,
    ``dzi = 1 - w - sigmoid(zi)`` (NB: w = 1); non-zero entries add ``x (1 - q) - (1 - w) theta q``,
    ``(1 - w)(A + theta q) - x (1 - q)`` and ``-(1 - w)``. The per-entry quantities of the non-zero entries are
    recomputed from the gathered ``d`` and ``zi`` (a few thousand values) rather than gathered from dense tensors.

    Args of ``apply``: ``log_mu`` (n, G); ``log_theta`` (G,) or (n, G); ``zi_logits`` (n, G) or None; ``rows``,
    ``flat`` (nnz,) int64 row and ``row * G + gene`` of each non-zero count; ``theta_at`` (nnz,) int64 index of its
    theta in ``log_theta.reshape(-1)``; ``xv`` (nnz,) the counts; ``table`` (nnz,) their ``T``.
    Returns (n,) nats.
    """

    @staticmethod
    def forward(ctx, log_mu, log_theta, zi_logits, rows, flat, theta_at, xv, table):
        theta = log_theta.exp()
        d = log_mu - log_theta
        A = F.softplus(d).mul_(-theta)
        d_nz = d.view(-1).take(flat)
        th_nz = theta.reshape(-1).take(theta_at)
        sp_nz = F.softplus(d_nz)
        a_nz = sp_nz * -th_nz
        corr = xv * (d_nz - sp_nz) + table
        if zi_logits is None:
            dense, zi_nz, t = A, None, None
        else:
            zi_nz = zi_logits.reshape(-1).take(flat)
            t = zi_logits - A
            dense = F.softplus(t).add_(A).sub_(F.softplus(zi_logits))
            corr = corr - F.softplus(zi_nz - a_nz)
        ctx.save_for_backward(d, A, theta, zi_logits, t, rows, flat, xv, d_nz, th_nz, a_nz, zi_nz)
        ctx.theta_shape = log_theta.shape
        return dense.sum(-1).index_add_(0, rows, corr)

    @staticmethod
    def backward(ctx, grad):
        d, A, theta, zi, t, rows, flat, xv, d_nz, th_nz, a_nz, zi_nz = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        gr = grad.take(rows)
        ntq = torch.sigmoid(d).mul_(-theta)  # -theta q
        apt = A - ntq  # A + theta q
        ntq_nz = torch.sigmoid(d_nz).mul_(-th_nz)
        gx = gr * xv * torch.sigmoid(-d_nz)  # g x (1 - q) at the non-zero entries
        if zi is None:
            dmu, dth, dzi = ntq.mul_(g), apt.mul_(g), None
            dmu_nz, dth_nz = gx, -gx
        else:
            gv = gr * torch.sigmoid(zi_nz - a_nz)  # (1 - w) g at the non-zero entries
            dmu_nz = torch.addcmul(gx, gv, ntq_nz)
            dth_nz = torch.addcmul(-gx, gv, a_nz - ntq_nz)
            vg = torch.sigmoid(t).mul_(g)  # (1 - w) g
            wg = g - vg
            dmu, dth = ntq.mul_(wg), apt.mul_(wg)
            dzi = torch.addcmul(vg, torch.sigmoid(zi), g, value=-1.0)
            dzi.view(-1).index_add_(0, flat, -gv)
        dmu.view(-1).index_add_(0, flat, dmu_nz)
        dth.view(-1).index_add_(0, flat, dth_nz)
        while dth.dim() > len(ctx.theta_shape):
            dth = dth.sum(0)
        return dmu, dth, dzi, None, None, None, None, gr


def _table_at(xv: torch.Tensor, genes: torch.Tensor, log_theta: torch.Tensor, rows: torch.Tensor | None,
              k_max: int) -> torch.Tensor:
    """``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`` at the given entries (counts ``xv``, genes ``genes``,
    theta row ``rows`` or None for per-gene theta), from the table of :func:`_lgamma_table` (direct above
    ``k_max``); (nnz,)."""
    theta, table = _lgamma_table(log_theta, k_max)
    n_genes = theta.shape[-1]
    idx = xv.clamp(max=k_max).long() * n_genes + genes
    if rows is not None:
        idx = idx + rows * ((k_max + 1) * n_genes)
    out = table.reshape(-1).take(idx)
    big = (xv > k_max).nonzero().squeeze(1)
    if len(big):
        xb = xv[big]
        tb = theta[0 if rows is None else rows[big], genes[big]]
        out = out.index_put((big,), lgamma_ratio(xb, tb) - torch.lgamma(xb + 1.0))
    return out


def _count_log_prob_sum_sparse(x, log_mu, log_theta, zi_logits, theta_rows, table_max):
    """:func:`count_log_prob_sum` for a sparse CSR ``x`` whose stored values are the non-zero counts."""
    rows, genes, xv = csr_rows(x), x.col_indices().long(), x.values()
    flat = rows * log_mu.shape[-1] + genes
    if log_theta is None:
        lg = _lgamma1_table(xv, table_max)
        return (-log_mu.exp().sum(-1)).index_add(0, rows, xv * log_mu.reshape(-1).take(flat) - lg)
    trows = None if theta_rows is None else theta_rows.take(rows)
    table = _table_at(xv, genes, log_theta, trows, table_max)
    if theta_rows is None:
        return _NBSparse.apply(log_mu, log_theta, zi_logits, rows, flat, genes, xv, table)
    return _NBSparse.apply(log_mu, log_theta[theta_rows], zi_logits, rows, flat, flat, xv, table)


# ------------------------------------------------------------------ fused log-softmax + likelihood (native)
def _nb_kernel(logits, log_library, log_theta, zi_logits, theta_rows, crow, col, xv, xdense, grad):
    """Run the native kernel (:func:`cellvae.native.ops.nb_loglik`): ``(ll (n,), (ga, gth, gzi, glib) or None,
    shapes for the backward pass)``."""
    ll, ga, gth, gzi, glib = ops.nb_loglik(logits, log_library, log_theta, zi_logits, theta_rows, crow, col, xv,
                                           xdense, grad)
    n_rows = log_theta.reshape(-1, logits.shape[1]).shape[0]
    return ll, ((ga, gth, gzi, glib) if grad else None), (log_library.shape, log_theta.shape, n_rows)


def _log_theta_grad(gth, grad, rows, n_rows, theta_shape):
    """Gradient of log theta from the kernel's per-entry derivatives ``gth`` (n, G) and the per-cell gradient
    ``grad`` (n,): summed over cells, into each cell's theta row (``rows``) when theta has several."""
    if rows is None:
        return (grad @ gth).reshape(theta_shape)
    return gth.new_zeros(n_rows, gth.shape[1]).index_add_(0, rows, gth * grad.unsqueeze(-1)).reshape(theta_shape)


class _SoftmaxNBNative(torch.autograd.Function):
    """Per-cell NB / ZINB log-likelihood from the decoder logits, computed by the native kernel
    ``cv_nb_loglik`` (``csrc/fastpath.c``), which also returns every derivative in the same pass when a gradient
    is needed; ``backward`` only scales them by the incoming per-cell gradient.

    Args of ``apply``: ``logits`` (n, G); ``log_library`` (n, 1) or (n,); ``log_theta`` (G,) or (R, G);
    ``zi_logits`` (n, G) or None; ``theta_rows`` (n,) int64 or None; ``crow``, ``col``, ``xv``: CSR counts
    (int64, int64, float32) or None; ``xdense`` (n, G) counts or None; ``grad``: whether to compute the
    derivatives (decided by the caller: grad mode is off inside ``forward``). The inputs are checked by
    :func:`_native_inputs` (shapes, theta rows, non-negative counts): the kernel trusts them. Returns (n,) nats.
    """

    @staticmethod
    def forward(ctx, logits, log_library, log_theta, zi_logits, theta_rows, crow, col, xv, xdense, grad):
        ll, derivatives, ctx.shapes = _nb_kernel(logits, log_library, log_theta, zi_logits, theta_rows, crow, col,
                                                 xv, xdense, grad)
        if grad:
            ctx.save_for_backward(*derivatives, theta_rows)
        return ll

    @staticmethod
    def backward(ctx, grad):
        ga, gth, gzi, glib, rows = ctx.saved_tensors
        lib_shape, theta_shape, n_rows = ctx.shapes
        g = grad.unsqueeze(-1)
        d_logits = ga * g if ctx.needs_input_grad[0] else None
        d_lib = (glib * grad).reshape(lib_shape) if ctx.needs_input_grad[1] else None
        d_lt = _log_theta_grad(gth, grad, rows, n_rows, theta_shape) if ctx.needs_input_grad[2] else None
        d_zi = gzi * g if ctx.needs_input_grad[3] and gzi is not None else None
        return d_logits, d_lib, d_lt, d_zi, None, None, None, None, None, None


class _LinearSoftmaxNBNative(torch.autograd.Function):
    """:class:`_SoftmaxNBNative` with the decoder's output layers folded in: ``logits = h W^T + b`` and
    ``zi_logits = h Wz^T + bz``, which the caller computed (without autograd) and passes with ``h`` and the weights.

    The kernel's derivatives ``ga = d ll_i / d logits_i.`` and ``gzi`` are per cell; the incoming gradient ``g``
    (n,) scales whole rows, so it is applied to the (n, n_hidden) side of each product instead of to the
    (n, n_genes) derivatives: ``dW = ga^T (g * h)``, ``db = ga^T g``, ``dh = g * (ga W + gzi Wz)``. This is the
    same arithmetic as autograd through ``torch.nn.functional.linear`` and :class:`_SoftmaxNBNative` up to float
    rounding, without two (n, n_genes) products, their tensors and two column sums over (n, n_genes).

    Args of ``apply``: ``logits``, ``zi_logits`` (n, G) (zi None for NB) computed from ``h`` (n, H), ``weight``
    (G, H), ``bias`` (G,) or None, ``zi_weight``, ``zi_bias`` (or None); then as :class:`_SoftmaxNBNative`.
    Returns (n,) nats.
    """

    @staticmethod
    def forward(ctx, logits, zi_logits, h, weight, bias, zi_weight, zi_bias, log_library, log_theta, theta_rows,
                crow, col, xv, xdense, grad):
        ll, derivatives, ctx.shapes = _nb_kernel(logits, log_library, log_theta, zi_logits, theta_rows, crow, col,
                                                 xv, xdense, grad)
        if grad:
            ctx.save_for_backward(*derivatives, theta_rows, h, weight, zi_weight)
        return ll

    @staticmethod
    def backward(ctx, grad):
        ga, gth, gzi, glib, rows, h, weight, zi_weight = ctx.saved_tensors
        lib_shape, theta_shape, n_rows = ctx.shapes
        need = ctx.needs_input_grad
        g = grad.unsqueeze(-1)
        dh = dw = db = dzw = dzb = d_lib = d_lt = None
        if need[2]:
            dh = ga @ weight
            if gzi is not None:
                dh.addmm_(gzi, zi_weight)
            dh.mul_(g)
        if need[3] or need[5]:
            hs = h * g
            dw = ga.t() @ hs if need[3] else None
            dzw = gzi.t() @ hs if need[5] and gzi is not None else None
        if need[4]:  # (False for a None bias)
            db = ga.t() @ grad
        if need[6] and gzi is not None:
            dzb = gzi.t() @ grad
        if need[7]:
            d_lib = (glib * grad).reshape(lib_shape)
        if need[8]:
            d_lt = _log_theta_grad(gth, grad, rows, n_rows, theta_shape)
        return None, None, dh, dw, db, dzw, dzb, d_lib, d_lt, None, None, None, None, None, None


def linear_softmax_count_log_prob_sum(
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    log_library: torch.Tensor,
    log_theta: torch.Tensor | None = None,
    zi_weight: torch.Tensor | None = None,
    zi_bias: torch.Tensor | None = None,
    theta_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`softmax_count_log_prob_sum` of ``logits = h weight^T + bias`` and, for ZINB,
    ``zi_logits = h zi_weight^T + zi_bias`` (the scVI decoder's last layers, ``DecoderSCVI.scale_decoder`` and
    ``dropout_decoder``): the same values and gradients (tested to 1e-5 relative). Where the native kernel runs,
    the backward pass scales the per-cell gradient on the (n_cells, n_hidden) side of the weight products instead
    of on the (n_cells, n_genes) derivatives (see :class:`_LinearSoftmaxNBNative`); otherwise it is
    ``softmax_count_log_prob_sum(x, torch.nn.functional.linear(h, weight, bias), ...)``.

    Args:
        x: (n_cells, n_genes) non-negative integer counts (float), dense or sparse CSR.
        h: (n_cells, n_hidden) last hidden layer of the decoder.
        weight, bias: (n_genes, n_hidden) and (n_genes,) (or None) of the logits layer.
        log_library: (n_cells, 1) or (n_cells,) log library size.
        log_theta, theta_rows: as :func:`softmax_count_log_prob_sum`.
        zi_weight, zi_bias: (n_genes, n_hidden), (n_genes,) of the zero-inflation layer (ZINB), else None (NB).

    Returns:
        (n_cells,) log-likelihood per cell, nats.

    Raises:
        ValueError, IndexError: as :func:`softmax_count_log_prob_sum`.
    """
    got = None
    if h.dim() == 2 and ops.applies(h, weight, bias, zi_weight, zi_bias):  # else the kernel cannot run
        with torch.no_grad():
            logits = F.linear(h, weight, bias)
            zi_logits = F.linear(h, zi_weight, zi_bias) if zi_weight is not None else None
        got = _native_inputs(x, logits, log_library, log_theta, zi_logits, theta_rows)
    if got is None:
        logits = F.linear(h, weight, bias)
        zi_logits = F.linear(h, zi_weight, zi_bias) if zi_weight is not None else None
        return softmax_count_log_prob_sum(x, logits, log_library, log_theta, zi_logits, theta_rows)
    inputs = (h, weight, bias, zi_weight, zi_bias, log_library, log_theta)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return _LinearSoftmaxNBNative.apply(logits, zi_logits, *inputs, *got, grad)


def _native_inputs(x, logits, log_library, log_theta, zi_logits, theta_rows):
    """``(theta_rows, crow, col, xv, xdense)`` for :class:`_SoftmaxNBNative`, or None where the kernel does not
    apply or the inputs are not what it trusts them to be (then the PyTorch code runs, and raises its own errors):
    float32 CPU tensors, matching shapes, theta rows in range.

    Raises:
        ValueError: counts whose shape differs from the logits', or (where the kernel applies) negative counts.
    """
    if tuple(x.shape) != tuple(logits.shape):
        raise ValueError(f"counts of shape {tuple(x.shape)} for decoder logits of shape {tuple(logits.shape)}: "
                         "they must match (cells x genes).")
    if log_theta is None or logits.dim() != 2:
        return None
    n, n_genes = logits.shape
    if (log_theta.shape[-1] != n_genes or log_theta.dim() > 2 or log_library.numel() != n
            or (zi_logits is not None and zi_logits.shape != logits.shape)
            or (theta_rows is None and log_theta.numel() != n_genes)
            or (theta_rows is not None and (log_theta.dim() != 2 or theta_rows.shape != (n,)))):
        return None  # the PyTorch code broadcasts or raises
    if any(t is not None and t.dtype != torch.float32 for t in (x, logits, log_library, log_theta, zi_logits)):
        return None
    sparse = x.layout == torch.sparse_csr
    parts = (*csr_parts(x), None) if sparse else (None, None, None, x)
    if theta_rows is not None:
        theta_rows = theta_rows.long().contiguous()
        if n and (int(theta_rows.min()) < 0 or int(theta_rows.max()) >= log_theta.shape[0]):
            return None
    values = parts[2] if sparse else x
    if values.numel() and bool(values.min() < 0):
        raise ValueError("negative counts: the NB / ZINB likelihood needs non-negative integer counts.")
    if not ops.applies(logits, log_library, log_theta, zi_logits, theta_rows, *parts):
        return None
    return (theta_rows, *parts)


def softmax_count_log_prob_sum(
    x: torch.Tensor,
    logits: torch.Tensor,
    log_library: torch.Tensor,
    log_theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None,
    theta_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-cell log-likelihood of counts (nats, summed over genes) under the scVI decoder: Poisson, NB or ZINB
    with ``log mu = log_library + log_softmax(logits)`` (Lopez et al. 2018, Methods).

    Equal to :func:`count_log_prob_sum` of ``log_library + torch.log_softmax(logits, -1)`` (tested to 1e-5
    relative, gradients included). For NB / ZINB on the CPU in float32 it runs the native kernel of
    :mod:`cellvae.native` when that is available: one pass over the (n_cells, n_genes) parameters computes the
    log-softmax, the likelihood of every entry and all derivatives, instead of a dozen PyTorch operators and their
    autograd backward; the lgamma terms are evaluated at the non-zero counts only. Otherwise (GPU, float64,
    Poisson, no compiler) it calls :func:`count_log_prob_sum`.

    Args:
        x: (n_cells, n_genes) non-negative integer counts (float), dense or sparse CSR (without stored zeros).
        logits: (n_cells, n_genes) decoder output before the softmax over genes.
        log_library: (n_cells, 1) or (n_cells,) log library size.
        log_theta: log inverse dispersion, (n_genes,) or (R, n_genes) with ``theta_rows`` (n_cells,) int64 picking
            each cell's row; None for Poisson.
        zi_logits: (n_cells, n_genes) zero-inflation logits for ZINB, else None.

    Returns:
        (n_cells,) log-likelihood per cell, nats.

    Raises:
        ValueError: ``x`` and ``logits`` differ in shape; negative counts (checked where the native kernel runs).
        IndexError: ``theta_rows`` out of range of ``log_theta``'s rows.
    """
    got = _native_inputs(x, logits, log_library, log_theta, zi_logits, theta_rows)
    if got is not None:
        inputs = (logits, log_library, log_theta, zi_logits)
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        return _SoftmaxNBNative.apply(*inputs, *got, grad)
    return count_log_prob_sum(x, log_library + torch.log_softmax(logits, dim=-1), log_theta, zi_logits,
                              theta_rows)
