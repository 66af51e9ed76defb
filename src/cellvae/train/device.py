"""Training on an accelerator without per-step host traffic (issue 22, GPU readiness).

- :class:`DeviceData`: the prepared cells of an in-memory dataset copied to the device once (dense counts,
  covariates), when they fit in :data:`DEVICE_DATA_MAX_FRACTION` of the device's free memory; each pass moves one
  index vector (the minibatch order, drawn on the CPU with the run's generator, so the minibatches are those of a
  CPU run) and minibatches are rows selected on the device. Data that do not fit (or out-of-core data) are copied
  minibatch by minibatch as before.
- :func:`skip_nonfinite_step`: the optimizer step of the training loop without a host synchronisation: whether the
  loss and every gradient are finite is computed on the device (``torch._amp_foreach_non_finite_check_and_unscale_``,
  the check of ``torch.amp.GradScaler``) and handed to the fused Adam as ``found_inf``, which then leaves the weights
  and its state unchanged; batch-norm statistics of a skipped step are restored with ``torch.where``. The loop reads
  the counts of skipped steps once per epoch.

On the CPU the loop keeps its per-step checks (a synchronisation costs nothing there); ``tests/test_device.py``
checks on the CPU that the device-side step gives the same weights as the CPU one, with and without a non-finite
step.
"""

from __future__ import annotations

import torch

from ..data.tensors import TensorData, minibatch_slices, pass_order

__all__ = ["DeviceData", "DEVICE_DATA_MAX_FRACTION", "skip_nonfinite_step"]

DEVICE_DATA_MAX_FRACTION = 0.5  # the data go to the device when they take at most this share of its free memory


class DeviceData:
    """Prepared cells (n_cells, n_genes) float32 counts, (n_cells, 1 + n_cat) int64 codes and (n_cells, n_cont)
    continuous covariates held on ``device``; :meth:`iterate` yields the minibatches of
    :meth:`cellvae.data.TensorData.iterate` (same cells, same order) as device tensors."""

    def __init__(self, data: TensorData, device: torch.device):
        data.densify()
        self.device = device
        self.X = data.X.to(device)
        self.cat = data.cat.to(device)
        self.cont = data.cont.to(device) if data.cont is not None else None

    @classmethod
    def maybe(cls, data, device: torch.device, free_bytes: int | None = None) -> "DeviceData | None":
        """A DeviceData of ``data`` on ``device``, or None: a CPU device, data that are not an in-memory
        :class:`TensorData`, counts too large to hold dense, or more than :data:`DEVICE_DATA_MAX_FRACTION` of the
        free device memory (``free_bytes``; None: ``torch.cuda.mem_get_info``)."""
        if device.type == "cpu" or not isinstance(data, TensorData):
            return None
        data.densify()
        if data.X is None:
            return None
        need = data.X.numel() * 4 + data.cat.numel() * 8 + (data.cont.numel() * 4 if data.cont is not None else 0)
        if free_bytes is None:
            try:
                free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
            except (RuntimeError, AssertionError):
                return None
        return cls(data, device) if need <= DEVICE_DATA_MAX_FRACTION * free_bytes else None

    def iterate(self, indices: torch.Tensor, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None):
        """Yield ``(x, cat, cont)`` device minibatches over ``indices`` (CPU int64), as ``TensorData.iterate``."""
        order = pass_order(indices, shuffle, generator).to(self.device, non_blocking=True)
        for a, b in minibatch_slices(len(order), batch_size):
            idx = order[a:b]
            yield (self.X.index_select(0, idx), self.cat.index_select(0, idx),
                   self.cont.index_select(0, idx) if self.cont is not None else None)


def skip_nonfinite_step(optimizer: torch.optim.Optimizer, params: list, loss: torch.Tensor, buffers: list,
                        backup: list) -> torch.Tensor:
    """One optimizer step that is skipped, on the device, when ``loss`` or a gradient of ``params`` is not finite.

    Needs a fused optimizer (``torch.optim.Adam(fused=True)``: it takes ``found_inf``). ``buffers`` are restored from
    ``backup`` (their values before the forward pass) on a skipped step.

    Returns:
        A 0-dim float tensor on the device: 1.0 when the step was skipped, else 0.0 (no synchronisation).
    """
    found = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=found.device))
    flag = found.reshape(())
    optimizer.found_inf = flag
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    if backup:
        skip = flag.bool()
        with torch.no_grad():
            for dst, src in zip(buffers, backup):
                dst.copy_(torch.where(skip, src, dst))
    return flag
