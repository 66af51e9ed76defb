"""Learning-rate schedules: the cosine schedule's values, the rates Adam really uses, and bad settings."""

from __future__ import annotations

import numpy as np
import pytest

from cellvae import CellvaeInputError, CountVAE
from cellvae.train import COSINE_FLOOR, TrainingPlan, lr_at


def test_lr_at_values():
    const = TrainingPlan(lr=1e-3)
    assert [lr_at(s, 100, const) for s in (0, 50, 100, 500)] == [1e-3] * 4
    cos = TrainingPlan(lr=2e-3, lr_schedule="cosine")
    assert lr_at(0, 100, cos) == pytest.approx(2e-3)
    assert lr_at(50, 100, cos) == pytest.approx(2e-3 * (COSINE_FLOOR + (1 - COSINE_FLOOR) / 2))
    assert lr_at(100, 100, cos) == pytest.approx(2e-3 * COSINE_FLOOR)
    assert lr_at(10_000, 100, cos) == pytest.approx(2e-3 * COSINE_FLOOR)  # past the end: the floor
    assert np.all(np.diff([lr_at(s, 100, cos) for s in range(101)]) < 0)
    assert lr_at(3, 0, cos) == 2e-3  # no steps: the peak
    with pytest.raises(CellvaeInputError, match="lr_schedule must be one of constant, cosine, plateau; got 'linear'"):
        lr_at(0, 10, TrainingPlan(lr_schedule="linear"))  # refused when the settings are made


def test_adam_gets_the_scheduled_rate_every_step(zeisel_small, optimizer_lrs):
    """The rate of each optimizer step is lr_at(step) of the run's max_epochs x steps per epoch (5 x 5 steps)."""
    seen = optimizer_lrs
    m = CountVAE(zeisel_small, n_hidden=32, n_latent=5)
    m.train(max_epochs=5, batch_size=64, seed=1, progress_bar=False, n_threads=1, lr=2e-3,
            lr_schedule="cosine")  # 270 training cells: 5 steps per epoch
    plan = TrainingPlan(lr=2e-3, lr_schedule="cosine")
    assert [g[0] for g in seen] == pytest.approx([lr_at(s, 25, plan) for s in range(25)], rel=1e-12)
    assert m.history["lr"] == pytest.approx([g[0] for g in seen[4::5]], rel=1e-12)
    assert m.history["plan"]["lr_schedule"] == "cosine" and m.history["plan"]["lr"] == 2e-3
    seen.clear()
    m = CountVAE(zeisel_small, n_hidden=32, n_latent=5).train(max_epochs=2, batch_size=64, seed=1,
                                                             progress_bar=False, n_threads=1)
    assert [g[0] for g in seen] == [1e-3] * 10 and m.history["lr"] == [1e-3] * 2  # the default: scvi-tools' 1e-3
    # log theta: 30 x (dispersion_lr_multiplier), falling linearly to 1 x over 1000 steps (dispersion_lr_decay)
    assert [g[1] for g in seen] == pytest.approx([1e-3 * (1 + 29 * (1 - s / 1000)) for s in range(10)], rel=1e-12)


def test_unknown_schedule_is_refused_before_training(zeisel_small):
    with pytest.raises(CellvaeInputError, match="lr_schedule.*constant, cosine, plateau"):
        CountVAE(zeisel_small, n_hidden=32, n_latent=5).train(max_epochs=2, lr_schedule="step", progress_bar=False)
