"""Learning-rate schedules of the training loop: constant (scvi-tools' default), cosine annealing (a function of the
step) or reduction on a plateau of the validation ELBO (a function of the recorded validation history), so that a
resumed run follows the uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..errors import CellvaeInputError
from ..settings import LR_SCHEDULES, TrainingPlan, parse_dispersion_lr_decay

__all__ = ['LR_SCHEDULES', 'COSINE_FLOOR', 'lr_at', 'plateau_reductions', 'dispersion_decay_steps',
           'dispersion_lr_multiplier_at']


COSINE_FLOOR = 0.01  # last learning rate of the cosine schedule, relative to the peak


def lr_at(step: int, total_steps: int, plan: TrainingPlan, reductions: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``, for ``plan.lr_schedule``.

    ``"constant"``: ``plan.lr``. ``"cosine"``: ``lr * (f + (1 - f) * (1 + cos(pi * step / total_steps)) / 2)`` with
    ``f = COSINE_FLOOR``, and ``f * lr`` from ``total_steps`` on (Loshchilov & Hutter 2017, eq. 5, one cycle).
    ``"plateau"``: ``max(plan.lr_min, lr * plan.lr_factor ** reductions)``, ``reductions`` from
    :func:`plateau_reductions` (the other schedules ignore it).

    Raises:
        CellvaeInputError: an unknown ``plan.lr_schedule``.
    """
    if plan.lr_schedule not in LR_SCHEDULES:
        raise CellvaeInputError(f"Unknown lr_schedule {plan.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}.")
    if plan.lr_schedule == "plateau":
        return max(plan.lr_min, plan.lr * plan.lr_factor ** max(0, int(reductions)))
    if plan.lr_schedule == "constant" or total_steps <= 0:
        return plan.lr
    frac = min(1.0, max(0, step) / total_steps)
    return plan.lr * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def plateau_reductions(validation_elbo: Sequence[float], patience: int) -> int:
    """How many times the ``"plateau"`` schedule has cut the learning rate after the epochs of ``validation_elbo``.

    The rule of PyTorch's ``ReduceLROnPlateau`` as scvi-tools' ``reduce_lr_on_plateau`` sets it (TOTALVI's default:
    threshold 0, absolute, no cooldown), on the validation ELBO: an epoch whose ELBO is not above the best so far is
    bad; after more than ``patience`` bad epochs in a row the rate is cut and the count of bad epochs restarts (the
    best is kept). A non-finite ELBO is a bad epoch. Replayed from the recorded history, so a resumed run cuts where
    the uninterrupted one does.

    Args:
        validation_elbo: the validation ELBO of each epoch so far (nats per cell), oldest first.
        patience: bad epochs tolerated before a cut (``plan.lr_patience``).

    Returns:
        The number of cuts (0 or more).
    """
    best, bad, cuts = -math.inf, 0, 0
    for v in validation_elbo:
        if math.isfinite(v) and v > best:
            best, bad = v, 0
        else:
            bad += 1
        if bad > patience:
            cuts, bad = cuts + 1, 0
    return cuts


def dispersion_decay_steps(plan: TrainingPlan, warmup_steps: int) -> int:
    """Optimizer steps over which log theta's learning-rate multiplier falls to 1 (``plan.dispersion_lr_decay``):
    0 for ``"none"``, the KL warm-up's ``warmup_steps`` for ``"warmup"``, N for a number N."""
    decay = parse_dispersion_lr_decay(plan.dispersion_lr_decay)
    if decay == "none":
        return 0
    return int(warmup_steps) if decay == "warmup" else int(decay)


def dispersion_lr_multiplier_at(step: int, decay_steps: int, plan: TrainingPlan) -> float:
    """Learning-rate multiplier of log theta at optimizer step ``step`` (0-based).

    ``m = plan.dispersion_lr_multiplier`` while ``decay_steps`` is 0 (``dispersion_lr_decay="none"``, or a run
    without warm-up under ``"warmup"``); otherwise ``1 + (m - 1) * (1 - step / decay_steps)``, and 1 from
    ``decay_steps`` on (:func:`dispersion_decay_steps`). A function of the step alone, so a resumed run follows the
    uninterrupted one.
    """
    m = float(plan.dispersion_lr_multiplier)
    if decay_steps <= 0:
        return m
    frac = min(1.0, max(0, step) / decay_steps)
    return 1.0 + (m - 1.0) * (1.0 - frac)
