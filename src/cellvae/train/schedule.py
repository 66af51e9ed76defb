"""Learning-rate schedules of the training loop: constant (scvi-tools' default) or cosine annealing, as a function of
the step alone, so that a resumed run follows the uninterrupted one.
"""

from __future__ import annotations

import math


from ..errors import CellvaeInputError
from ..settings import DISPERSION_LR_DECAYS, LR_SCHEDULES, TrainingPlan

__all__ = ['LR_SCHEDULES', 'COSINE_FLOOR', 'lr_at', 'dispersion_lr_multiplier_at']


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


def dispersion_lr_multiplier_at(step: int, warmup_steps: int, plan: TrainingPlan) -> float:
    """Learning-rate multiplier of log theta at optimizer step ``step`` (0-based), for ``plan.dispersion_lr_decay``.

    ``"none"``: ``plan.dispersion_lr_multiplier``. ``"warmup"``: ``1 + (m - 1) * (1 - step / warmup_steps)`` with
    ``m = plan.dispersion_lr_multiplier``, and 1 from ``warmup_steps`` on (the KL warm-up's steps; ``m`` when there
    is no warm-up). A function of the step alone, so a resumed run follows the uninterrupted one.

    Raises:
        CellvaeInputError: an unknown ``plan.dispersion_lr_decay``.
    """
    if plan.dispersion_lr_decay not in DISPERSION_LR_DECAYS:
        raise CellvaeInputError(f"Unknown dispersion_lr_decay {plan.dispersion_lr_decay!r}: use one of "
                                f"{', '.join(DISPERSION_LR_DECAYS)}.")
    m = float(plan.dispersion_lr_multiplier)
    if plan.dispersion_lr_decay == "none" or warmup_steps <= 0:
        return m
    frac = min(1.0, max(0, step) / warmup_steps)
    return 1.0 + (m - 1.0) * (1.0 - frac)
