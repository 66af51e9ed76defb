"""The checked boundary around the C kernels of ``fastpath.c``: the only module that passes pointers to them.

Every function here checks what a caller can get wrong before the kernel touches memory: devices (CPU), dtypes
(float32 values, int64 indices), contiguity, shapes that agree with each other, index ranges (theta rows), and for
sparse CSR input its whole structure (``crow`` starts at 0, never decreases and ends at the number of stored
values; each row's column indices strictly increasing in ``[0, n_cols)``; :func:`check_csr`, one C pass). A
violation raises :class:`cellvae.CellvaeInputError` (a ``ValueError``) naming the argument; nothing is read or
written out of bounds. Callers check :func:`applies` first to choose between the kernels and their PyTorch code.

The kernels (``fastpath.c``; :mod:`.build` compiles it):

- :func:`nb_loglik`: log-softmax + NB / ZINB log-likelihood of a minibatch and all its derivatives, one pass;
- :func:`csr_linear`, :func:`csr_linear_wgrad`: the sparse first encoder layer and its weight gradient;
- :func:`bn_relu_dropout`, :func:`bn_relu_dropout_backward`, :func:`dropout_keep`: batch norm + ReLU + dropout;
- :func:`ln_relu_dropout`, :func:`ln_relu_dropout_backward`: the same with layer norm;
- :func:`all_finite`: whether every gradient element is finite;
- :func:`protein_mixture`, :func:`protein_mixture_backward`: totalVI's protein likelihood and background KL of a
  minibatch, and their gradients;
- :func:`joint_split`: a CSR minibatch of genes and proteins taken apart, with the encoder's input.
"""

from __future__ import annotations

import ctypes

import torch

from ..errors import CellvaeInputError
from .build import library, usable

__all__ = ["applies", "check_csr", "nb_loglik", "csr_linear", "csr_linear_wgrad", "all_finite", "bn_relu_dropout",
           "bn_relu_dropout_backward", "ln_relu_dropout", "ln_relu_dropout_backward", "dropout_keep",
           "protein_mixture", "protein_mixture_backward", "joint_split", "CSR_PROBLEMS"]

CSR_PROBLEMS = {
    1: "crow_indices does not start at 0",
    2: "crow_indices decreases (row {where})",
    3: "crow_indices does not end at the number of stored values",
    4: "a column index is out of range [0, {n_cols}) (stored value {where})",
    5: "column indices are not strictly increasing within a row (unsorted or duplicated; stored value {where})",
}


def applies(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can run on these tensors: the library is built, and every tensor is on the CPU,
    contiguous and float32 (or int64 for indices). Does not check shapes: the functions below do."""
    return usable(*tensors)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _need(name: str, t: torch.Tensor | None, dtype: torch.dtype, shape: tuple | None = None,
          optional: bool = False) -> None:
    """Raise unless ``t`` is a contiguous CPU tensor of ``dtype`` (and ``shape``, where given; -1 is any size)."""
    if t is None:
        if optional:
            return
        raise CellvaeInputError(f"native kernel: {name} is required.")
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        what = f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}" if isinstance(t, torch.Tensor) else type(t)
        raise CellvaeInputError(f"native kernel: {name} must be a contiguous {dtype} CPU tensor, got {what}.")
    if shape is not None and (t.dim() != len(shape) or any(s != -1 and s != d for s, d in zip(shape, t.shape))):
        raise CellvaeInputError(f"native kernel: {name} has shape {tuple(t.shape)}, expected {shape} (-1: any).")


def check_csr(crow: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int, name: str = "x") -> None:
    """Check a CSR structure completely before a kernel reads it (see the module docstring).

    Args:
        crow: (n_rows + 1,) int64 row pointers; col: (nnz,) int64 column indices (contiguous, CPU).
        n_rows, n_cols: the matrix shape.
        name: the argument's name, for the message.

    Raises:
        CellvaeInputError: wrong dtypes or lengths, or an invalid structure (which, and where).
    """
    _need(f"{name}.crow_indices", crow, torch.int64, (n_rows + 1,))
    _need(f"{name}.col_indices", col, torch.int64, (-1,))
    where = ctypes.c_int64(-1)
    code = library().cv_csr_check(int(n_rows), int(n_cols), int(col.numel()), _ptr(crow), _ptr(col),
                                  ctypes.byref(where))
    if code:
        problem = CSR_PROBLEMS[code].format(where=where.value, n_cols=n_cols)
        raise CellvaeInputError(f"{name} is not a valid CSR matrix of shape ({n_rows}, {n_cols}): {problem}. Sort the "
                                "column indices and sum duplicates (scipy: m.sum_duplicates(); torch: "
                                "x.to_sparse_coo().coalesce().to_sparse_csr()).")


def n_threads() -> int:
    """Threads of the native kernels: torch's intra-op thread count (``torch.set_num_threads``; the training loop
    sets it from ``n_threads``). The kernels split cells (or genes) into that many ranges; results are bit-identical
    for any count (``fastpath.c``)."""
    return max(1, int(torch.get_num_threads()))


# ---------------------------------------------------------------------------------------- likelihood
def nb_loglik(logits: torch.Tensor, log_library: torch.Tensor, log_theta: torch.Tensor,
              zi_logits: torch.Tensor | None, theta_rows: torch.Tensor | None, crow: torch.Tensor | None,
              col: torch.Tensor | None, xv: torch.Tensor | None, xdense: torch.Tensor | None, grad: bool) -> tuple:
    """``cv_nb_loglik``: the NB (ZINB with ``zi_logits``) log-likelihood per cell of counts given as CSR parts
    (``crow``, ``col``, ``xv``) or dense (``xdense``), with ``log mu = log_library + log_softmax(logits)``.

    Args:
        logits: (n, G) float32; log_library: (n,) or (n, 1); log_theta: (R, G) or (G,) (R = 1), theta rows picked
            by ``theta_rows`` (n,) int64 in [0, R) when R > 1; zi_logits: (n, G) or None.
        grad: also return the per-entry derivatives.

    Returns:
        ``(ll (n,), ga (n, G), gth (n, G), gzi (n, G) or None, glib (n,))`` nats, the derivatives None without
        ``grad``.

    Raises:
        CellvaeInputError: shapes, dtypes, theta rows out of range, an invalid CSR structure, negative counts.
    """
    _need("logits", logits, torch.float32, (-1, -1))
    n, G = logits.shape
    if not isinstance(log_theta, torch.Tensor) or log_theta.dim() not in (1, 2) or log_theta.shape[-1] != G:
        raise CellvaeInputError(f"native kernel: log_theta must have shape ({G},) or (R, {G}), got "
                                f"{tuple(getattr(log_theta, 'shape', ()))}.")
    lt = log_theta.reshape(-1, G).contiguous()
    _need("log_theta", lt, torch.float32, (-1, G))
    R = lt.shape[0]
    loglib = log_library.reshape(-1)
    _need("log_library", loglib, torch.float32, (n,))
    _need("zi_logits", zi_logits, torch.float32, (n, G), optional=True)
    if theta_rows is not None:
        _need("theta_rows", theta_rows, torch.int64, (n,))
        if n and (int(theta_rows.min()) < 0 or int(theta_rows.max()) >= R):
            raise CellvaeInputError(f"native kernel: theta_rows must lie in [0, {R}), got "
                                    f"[{int(theta_rows.min())}, {int(theta_rows.max())}].")
    elif R != 1:
        raise CellvaeInputError(f"native kernel: log_theta has {R} rows: theta_rows must pick one per cell.")
    if xdense is not None:
        _need("counts", xdense, torch.float32, (n, G))
        values = xdense
    else:
        check_csr(crow, col, n, G, "counts")
        _need("counts.values", xv, torch.float32, (col.numel(),))
        values = xv
    if values.numel() and bool(values.min() < 0):
        raise CellvaeInputError("negative counts: the NB / ZINB likelihood needs non-negative integer counts.")
    theta = lt.exp().contiguous()
    lib = library()
    ll = logits.new_empty(n)
    ga = torch.empty_like(logits) if grad else None
    gth = torch.empty_like(logits) if grad else None
    gzi = torch.empty_like(logits) if grad and zi_logits is not None else None
    glib = logits.new_empty(n) if grad else None
    T = n_threads()
    work = logits.new_empty(lib.cv_nb_work_size(G, R, T))
    lib.cv_nb_loglik(n, G, R, _ptr(logits), _ptr(loglib), _ptr(theta), _ptr(lt), _ptr(theta_rows), _ptr(zi_logits),
                     _ptr(crow if xdense is None else None), _ptr(col if xdense is None else None),
                     _ptr(xv if xdense is None else None), _ptr(xdense), _ptr(ll), _ptr(ga), _ptr(gth), _ptr(gzi),
                     _ptr(glib), _ptr(work), T)
    return ll, ga, gth, gzi, glib


# ----------------------------------------------------------------------------------- sparse layer
def csr_linear(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, wt: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ wt + bias`` for CSR ``x`` (n, n_in) given as parts, ``wt`` (n_in, n_out) float32 row-major, ``bias``
    (n_out,) or None. Returns (n, n_out) float32.

    Raises:
        CellvaeInputError: dtypes, shapes or an invalid CSR structure.
    """
    _need("weight (transposed)", wt, torch.float32, (-1, -1))
    n_in, n_out = wt.shape
    n = crow.numel() - 1
    check_csr(crow, col, n, n_in)
    _need("x.values", val, torch.float32, (col.numel(),))
    _need("bias", bias, torch.float32, (n_out,), optional=True)
    out = wt.new_empty(n, n_out)
    library().cv_csr_linear(n, n_out, _ptr(crow), _ptr(col), _ptr(val), _ptr(wt), _ptr(bias), _ptr(out),
                            n_threads())
    return out


def csr_linear_wgrad(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, grad: torch.Tensor,
                     n_in: int) -> torch.Tensor:
    """``x^T @ grad`` (n_in, n_out) float32 for CSR ``x`` (n, n_in) given as parts and ``grad`` (n, n_out): the
    weight gradient of :func:`csr_linear`.

    Raises:
        CellvaeInputError: dtypes, shapes or an invalid CSR structure.
    """
    n = crow.numel() - 1
    _need("grad", grad, torch.float32, (n, -1))
    check_csr(crow, col, n, n_in)
    _need("x.values", val, torch.float32, (col.numel(),))
    dwt = grad.new_empty(n_in, grad.shape[1])
    library().cv_csr_linear_wgrad(n, n_in, grad.shape[1], _ptr(crow), _ptr(col), _ptr(val), _ptr(grad), _ptr(dwt),
                                  n_threads())
    return dwt


# ------------------------------------------------------------------------- batch norm, ReLU, dropout
def bn_relu_dropout(x: torch.Tensor, weight, bias, running_mean, running_var, eps: float, momentum: float,
                    threshold: int, scale: float, seeds) -> tuple:
    """Training-mode ``dropout(relu(batch_norm(x)))`` for x (n, C) float32, n >= 2; updates the running statistics
    in place. Returns ``(y, mean, invstd)``.

    Raises:
        CellvaeInputError: dtypes, shapes, fewer than 2 rows.
    """
    _need("x", x, torch.float32, (-1, -1))
    n, C = x.shape
    if n < 2:
        raise CellvaeInputError("native kernel: batch norm in training mode needs at least 2 rows.")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _need(name, t, torch.float32, (C,), optional=True)
    y = torch.empty_like(x)
    mean, invstd = x.new_empty(C), x.new_empty(C)
    work = torch.empty(2 * C, dtype=torch.float64)
    library().cv_bn_relu_dropout(n, C, _ptr(x), _ptr(weight), _ptr(bias), float(eps), float(momentum),
                                 _ptr(running_mean), _ptr(running_var), int(threshold), float(scale),
                                 int(seeds[0]) & 0xFFFFFFFF, int(seeds[1]) & 0xFFFFFFFF, _ptr(y), _ptr(mean),
                                 _ptr(invstd), _ptr(work))
    return y, mean, invstd


def _need_norm_backward(x, y, gy, mean, invstd, per_row: bool) -> tuple[int, int]:
    """Check the inputs of a fused norm + ReLU + dropout backward pass: x, y, gy (n, C) float32 and the statistics
    mean, invstd (n,) per row (layer norm) or (C,) per column (batch norm); returns ``(n, C)``."""
    _need("x", x, torch.float32, (-1, -1))
    n, C = x.shape
    for name, t in (("y", y), ("grad", gy)):
        _need(name, t, torch.float32, (n, C))
    for name, t in (("mean", mean), ("invstd", invstd)):
        _need(name, t, torch.float32, (n,) if per_row else (C,))
    return n, C


def bn_relu_dropout_backward(x: torch.Tensor, y: torch.Tensor, gy: torch.Tensor, weight, mean: torch.Tensor,
                             invstd: torch.Tensor, scale: float, need_weight: bool, need_bias: bool) -> tuple:
    """The backward pass of :func:`bn_relu_dropout`: ``(dx, dweight or None, dbias or None)``.

    Raises:
        CellvaeInputError: dtypes or shapes.
    """
    n, C = _need_norm_backward(x, y, gy, mean, invstd, per_row=False)
    _need("weight", weight, torch.float32, (C,), optional=True)
    dx = torch.empty_like(x)
    dw = x.new_empty(C) if weight is not None and need_weight else None
    db = x.new_empty(C) if need_bias else None
    work = torch.empty(2 * C, dtype=torch.float64)
    library().cv_bn_relu_dropout_backward(n, C, _ptr(x), _ptr(y), _ptr(gy), _ptr(weight), _ptr(mean), _ptr(invstd),
                                          float(scale), _ptr(dx), _ptr(dw), _ptr(db), _ptr(work))
    return dx, dw, db


def ln_relu_dropout(x: torch.Tensor, eps: float, threshold: int, scale: float, seeds) -> tuple:
    """Training-mode ``dropout(relu(layer_norm(x)))`` for x (n, C) float32, layer normalisation over each row without
    an affine transform (``torch.nn.LayerNorm(C, elementwise_affine=False)``), the dropout mask of
    :func:`bn_relu_dropout`. Returns ``(y (n, C), mean (n,), invstd (n,))``.

    Raises:
        CellvaeInputError: dtypes, shapes, no columns.
    """
    _need("x", x, torch.float32, (-1, -1))
    n, C = x.shape
    if C < 1:
        raise CellvaeInputError("native kernel: layer norm needs at least 1 column.")
    y = torch.empty_like(x)
    mean, invstd = x.new_empty(n), x.new_empty(n)
    library().cv_ln_relu_dropout(n, C, _ptr(x), float(eps), int(threshold), float(scale), int(seeds[0]) & 0xFFFFFFFF,
                                 int(seeds[1]) & 0xFFFFFFFF, _ptr(y), _ptr(mean), _ptr(invstd))
    return y, mean, invstd


def ln_relu_dropout_backward(x: torch.Tensor, y: torch.Tensor, gy: torch.Tensor, mean: torch.Tensor,
                             invstd: torch.Tensor, scale: float) -> torch.Tensor:
    """The backward pass of :func:`ln_relu_dropout`: dx (n, C).

    Raises:
        CellvaeInputError: dtypes or shapes.
    """
    n, C = _need_norm_backward(x, y, gy, mean, invstd, per_row=True)
    dx = torch.empty_like(x)
    library().cv_ln_relu_dropout_backward(n, C, _ptr(x), _ptr(y), _ptr(gy), _ptr(mean), _ptr(invstd), float(scale),
                                          _ptr(dx))
    return dx


def dropout_keep(n: int, threshold: int, seeds) -> torch.Tensor:
    """(n,) bool keep flags of the kernel's hashed dropout mask (see :func:`cellvae.vae.nn.dropout_keep`)."""
    if int(n) < 0:
        raise CellvaeInputError(f"native kernel: n must be >= 0, got {n}.")
    keep = torch.empty(int(n), dtype=torch.uint8)
    library().cv_dropout_keep(int(n), int(threshold), int(seeds[0]) & 0xFFFFFFFF, int(seeds[1]) & 0xFFFFFFFF,
                              _ptr(keep))
    return keep.bool()


# ----------------------------------------------------------------------------------------- gradients
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of these dense float32 CPU tensors is finite, in one pass.

    Raises:
        CellvaeInputError: a tensor that is not a contiguous float32 CPU tensor.
    """
    for i, t in enumerate(tensors):
        _need(f"tensor {i}", t, torch.float32)
    k = len(tensors)
    ptrs = (ctypes.c_int64 * k)(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * k)(*[t.numel() for t in tensors])
    return bool(library().cv_all_finite(k, ptrs, sizes))


# ------------------------------------------------------------------------------------------- proteins
def protein_mixture(y: torch.Tensor, heads: torch.Tensor, eps: torch.Tensor, log_theta: torch.Tensor,
                    batch: torch.Tensor, prior_mean: torch.Tensor, prior_log_scale: torch.Tensor, mask: torch.Tensor,
                    scale_eps: float, derivatives: bool = False) -> tuple:
    """``cv_protein_mixture``: totalVI's protein log-likelihood (the two-component NB mixture of Gayoso et al. 2021,
    Nat. Methods 18:272, Methods; in float64) and the KL of ``q(log beta)`` per cell
    (:func:`cellvae.vae.nb_mixture.protein_elbo_terms` for the algebra).

    Args:
        y: (n, P) float32 integer counts; heads: (n, 4P) float32 ``[a, s, f, w]``; eps: (n, P) float32 draws.
        log_theta: (P,) or (R, P) float32 (R > 1: row ``batch[i]`` for cell i).
        batch: (n,) int64 batch codes in [0, nb); prior_mean, prior_log_scale, mask: (nb, P) float32 tables.
        scale_eps: floor of the standard deviation of ``q(log beta)``.
        derivatives: also return the element-wise derivatives for :func:`protein_mixture_backward`.

    Returns:
        ``(ll (n,), kl (n,), derivatives (n, P, 8) or None)``, nats.

    Raises:
        CellvaeInputError: dtypes or shapes, a batch code out of range, a negative, non-finite or non-integer count.
        MemoryError: the kernel's small per-call tables could not be allocated.
    """
    _need("y", y, torch.float32, (-1, -1))
    n, P = y.shape
    _need("heads", heads, torch.float32, (n, 4 * P))
    _need("eps", eps, torch.float32, (n, P))
    lt = log_theta.reshape(-1, P) if isinstance(log_theta, torch.Tensor) and log_theta.dim() in (1, 2) else log_theta
    _need("log_theta", lt, torch.float32, (-1, P))
    _need("batch", batch, torch.int64, (n,))
    _need("prior_mean", prior_mean, torch.float32, (-1, P))
    nb, R = prior_mean.shape[0], lt.shape[0]
    _need("prior_log_scale", prior_log_scale, torch.float32, (nb, P))
    _need("mask", mask, torch.float32, (nb, P))
    if R not in (1, nb):
        raise CellvaeInputError(f"native kernel: log_theta has {R} rows: it needs 1 or one per batch ({nb}).")
    ll, kl = y.new_empty(n), y.new_empty(n)
    deriv = y.new_empty(n, P, 8) if derivatives else None
    where = ctypes.c_int64(-1)
    code = library().cv_protein_mixture(n, P, R, nb, _ptr(y), _ptr(heads), _ptr(eps), _ptr(lt), _ptr(batch),
                                        _ptr(prior_mean), _ptr(prior_log_scale), _ptr(mask), float(scale_eps),
                                        _ptr(ll), _ptr(kl), _ptr(deriv), ctypes.byref(where))
    if code == 1:
        raise CellvaeInputError(f"native kernel: the batch code of cell {where.value} is outside [0, {nb}).")
    if code == 2:
        i, t = divmod(where.value, P)
        raise CellvaeInputError(f"Protein counts must be non-negative integers: cell {i}, protein {t} has "
                                f"{float(y[i, t])!r}. Pass the raw antibody counts.")
    if code:
        raise MemoryError("native kernel: no memory for the protein tables.")
    return ll, kl, deriv


def protein_mixture_backward(batch: torch.Tensor, deriv: torch.Tensor, g_ll: torch.Tensor, g_kl: torch.Tensor,
                             n_theta_rows: int, n_batch: int) -> tuple:
    """``cv_protein_mixture_backward``: the gradients of :func:`protein_mixture`'s inputs from its derivatives and
    the upstream gradients ``g_ll``, ``g_kl`` (n,) float32.

    Returns:
        ``(g_heads (n, 4P), g_log_theta (n_theta_rows, P), g_prior_mean (n_batch, P), g_prior_log_scale (n_batch,
        P))``, float32.

    Raises:
        CellvaeInputError: dtypes or shapes, a batch code out of range.
        MemoryError: the gradient sums could not be allocated.
    """
    _need("derivatives", deriv, torch.float32, (-1, -1, 8))
    n, P = deriv.shape[:2]
    _need("batch", batch, torch.int64, (n,))
    _need("g_ll", g_ll, torch.float32, (n,))
    _need("g_kl", g_kl, torch.float32, (n,))
    R, nb = int(n_theta_rows), int(n_batch)
    if nb < 1 or R not in (1, nb):
        raise CellvaeInputError(f"native kernel: {R} log theta rows for {nb} batches (needs 1 or {nb}).")
    gh, glt = deriv.new_empty(n, 4 * P), deriv.new_empty(R, P)
    gpm, gpls = deriv.new_empty(nb, P), deriv.new_empty(nb, P)
    where = ctypes.c_int64(-1)
    code = library().cv_protein_mixture_backward(n, P, R, nb, _ptr(batch), _ptr(deriv), _ptr(g_ll), _ptr(g_kl),
                                                 _ptr(gh), _ptr(glt), _ptr(gpm), _ptr(gpls), ctypes.byref(where))
    if code == 1:
        raise CellvaeInputError(f"native kernel: the batch code of cell {where.value} is outside [0, {nb}).")
    if code:
        raise MemoryError("native kernel: no memory for the protein gradient sums.")
    return gh, glt, gpm, gpls


def joint_split(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n_genes: int, n_proteins: int,
                batch: torch.Tensor, mask: torch.Tensor, scale_mode: int) -> tuple:
    """``cv_joint_split``: a CSR minibatch (n, n_genes + n_proteins) of the joint RNA + protein model taken apart in
    one pass (see ``fastpath.c``, section 7).

    Args:
        crow, col, val: the CSR parts (int64, int64, float32) of x, genes first.
        batch: (n,) int64 batch codes; mask: (n_batch, n_proteins) float32 protein mask of each batch.
        scale_mode: 0 (``log1p`` encoder input), 1 (``log1p_cp10k``) or 2 (``log1p_mean``).

    Returns:
        ``(g_crow, g_col, g_val, y (n, n_proteins), lib (n, 1), enc (nnz,))``: the genes' CSR parts (counts), the
        dense protein counts, the RNA library sizes (counts summed over the genes, at least 1) and the encoder's
        input values on x's structure (log1p units; totalVI's protein scaling, Gayoso et al. 2021).

    Raises:
        CellvaeInputError: dtypes or shapes, an invalid CSR structure, a batch code out of range.
    """
    G, P = int(n_genes), int(n_proteins)
    n = crow.numel() - 1
    _need("x.crow_indices", crow, torch.int64, (n + 1,))
    _need("x.col_indices", col, torch.int64, (-1,))
    nnz = col.numel()
    _need("x.values", val, torch.float32, (nnz,))
    _need("batch", batch, torch.int64, (n,))
    _need("mask", mask, torch.float32, (-1, P))
    if scale_mode not in (0, 1, 2) or G < 0 or P < 1:
        raise CellvaeInputError(f"native kernel: scale_mode {scale_mode}, {G} genes, {P} proteins.")
    nb = mask.shape[0]
    g_crow, g_col, g_val = crow.new_empty(n + 1), col.new_empty(nnz), val.new_empty(nnz)
    y, lib, enc = val.new_empty(n, P), val.new_empty(n, 1), val.new_empty(nnz)
    nnz_g, where = ctypes.c_int64(0), ctypes.c_int64(-1)
    code = library().cv_joint_split(n, G, P, nnz, _ptr(crow), _ptr(col), _ptr(val), _ptr(batch), nb, _ptr(mask),
                                    int(scale_mode), _ptr(g_crow), _ptr(g_col), _ptr(g_val), _ptr(y), _ptr(lib),
                                    _ptr(enc), ctypes.byref(nnz_g), ctypes.byref(where))
    if code == 6:
        raise CellvaeInputError(f"native kernel: the batch code of cell {where.value} is outside [0, {nb}).")
    if code:
        problem = CSR_PROBLEMS[code].format(where=where.value, n_cols=G + P)
        raise CellvaeInputError(f"x is not a valid CSR matrix of shape ({n}, {G + P}): {problem}. Sort the column "
                                "indices and sum duplicates (scipy: m.sum_duplicates()).")
    k = nnz_g.value
    return g_crow, g_col[:k], g_val[:k], y, lib, enc
