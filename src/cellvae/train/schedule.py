"""One training loop: Adam on the negative ELBO, KL warm-up, early stopping on validation ELBO, best weights,
checkpoints and resume, and guards against non-finite losses and gradients.

The loop touches tensors only (minibatches come from :class:`cellvae.data.TensorData`), accumulates epoch
statistics on tensors, and reads them back once per epoch. On the CPU, a module that takes sparse counts
(``VAEModule.sparse_input``) gets the same minibatches as sparse CSR tensors when the data are sparse enough
(:meth:`cellvae.data.TensorData.iterate_sparse`): the encoder's first layer and the likelihood then cost in
proportion to the non-zero counts (issue 6; same results to float rounding, tests/test_sparse_path.py).

Checkpoints (``checkpoint_dir``): every ``checkpoint_every`` epochs and at the end, ``checkpoint.pt`` holds the
weights, the Adam state, the epoch and step (KL warm-up), the minibatch-order generator and torch's global RNG
(dropout, z samples), the early-stopping state (best weights, best epoch, epochs without improvement) and the
history. It is written to a temporary file in the same directory, flushed and fsynced, renamed over the old one
and the directory fsynced, so the name ``checkpoint.pt`` only ever holds a complete checkpoint; a leftover
temporary file (a crash while writing) is ignored and removed. It holds plain tensors and containers only
(``torch.load(weights_only=True)``). Resuming restores all of it at an epoch boundary, so an interrupted and
resumed run ends with the same weights as an uninterrupted one (on CPU, same seed and thread count). numpy's and
Python's global RNGs are not used by the loop (the cell split is drawn from its own seeded generator).
"""

from __future__ import annotations

import math


from ..errors import CellvaeInputError
from ..settings import LR_SCHEDULES, TrainingPlan

__all__ = ['LR_SCHEDULES', 'COSINE_FLOOR', 'lr_at']


COSINE_FLOOR = 0.01  # last learning rate of the cosine schedule, relative to the peak


def lr_at(step: int, total_steps: int, plan: TrainingPlan) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``, for ``plan.lr_schedule``.

    ``"constant"``: ``plan.lr``. ``"cosine"``: ``lr * (f + (1 - f) * (1 + cos(pi * step / total_steps)) / 2)`` with
    ``f = COSINE_FLOOR``, and ``f * lr`` from ``total_steps`` on (Loshchilov & Hutter 2017, eq. 5, one cycle).

    Raises:
        CellvaeInputError: an unknown ``plan.lr_schedule``.
    """
    if plan.lr_schedule not in LR_SCHEDULES:
        raise CellvaeInputError(f"Unknown lr_schedule {plan.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}.")
    if plan.lr_schedule == "constant" or total_steps <= 0:
        return plan.lr
    frac = min(1.0, max(0, step) / total_steps)
    return plan.lr * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * frac)))


