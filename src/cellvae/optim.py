"""The training loop's guard before each optimizer step: :func:`grads_finite` tells whether every gradient is
finite, in one native read of the gradients (``cv_all_finite`` in ``csrc/fastpath.c``, see :mod:`cellvae.native`),
else from their total norm."""

from __future__ import annotations

import ctypes

import torch

from . import native

__all__ = ["grads_finite"]


def _addresses(tensors: list[torch.Tensor]):
    k = len(tensors)
    return (ctypes.c_int64 * k)(*[t.data_ptr() for t in tensors]), (ctypes.c_int64 * k)(*[t.numel() for t in tensors])


def grads_finite(params: list[torch.Tensor]) -> bool:
    """Whether every element of the parameters' gradients is finite (parameters without a gradient are skipped).

    One pass over the gradients in the native library for dense contiguous float32 CPU gradients (the sum of
    ``g * 0``, which is 0 exactly when no element is inf or NaN); otherwise the total 2-norm (one fused pass), which
    also counts gradients above ~1e19 (whose squares overflow) as not finite. Synchronises with the device.

    Args:
        params: parameters of any shapes; their ``.grad`` (same shape, or None) is read.

    Returns:
        True when no gradient element is inf or NaN (also when no parameter has a gradient).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    dense_f32 = all(g.layout == torch.strided and g.dtype == torch.float32 for g in grads)
    lib = native.library() if dense_f32 and native.usable(*grads) else None
    if lib is not None:
        ptrs, sizes = _addresses(grads)
        return bool(lib.cv_all_finite(len(grads), ptrs, sizes))
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    else:  # pragma: no cover
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return bool(torch.isfinite(norm))
