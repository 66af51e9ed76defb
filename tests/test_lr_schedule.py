"""Learning-rate schedules: the cosine schedule's values, the plateau schedule against PyTorch's ReduceLROnPlateau,
the rates Adam really uses, and bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellvae import CellvaeInputError, CountVAE
from cellvae.train import COSINE_FLOOR, TrainingPlan, lr_at
from cellvae.train.schedule import plateau_reductions


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


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_plateau_cuts_where_torch_reduce_lr_on_plateau_does(patience):
    """The rates of lr_schedule='plateau' over 60 epochs of a noisy validation ELBO (with a NaN epoch) equal those
    of torch's ReduceLROnPlateau as scvi-tools configures it (threshold 0, absolute; mode max on the ELBO; eps 0,
    since torch stops cutting once a cut would change the rate by under its eps, 1e-8)."""
    rng = np.random.default_rng(patience)
    elbos = list(np.cumsum(rng.normal(0.2, 1.0, 60)) - 500.0)
    elbos[17] = float("nan")
    plan = TrainingPlan(lr=4e-3, lr_schedule="plateau", lr_factor=0.6, lr_patience=patience)
    ours = [lr_at(0, 0, plan, plateau_reductions(elbos[:e], patience)) for e in range(1, 61)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.6, patience=patience,
                                                       threshold=0.0, threshold_mode="abs", eps=0.0)
    theirs = []
    for v in elbos:
        sched.step(v)
        theirs.append(opt.param_groups[0]["lr"])
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert min(ours) < 4e-3  # the sequence has plateaus: at least one cut
    assert plateau_reductions([], patience) == 0
    floor = TrainingPlan(lr=4e-3, lr_schedule="plateau", lr_min=1e-3)
    assert lr_at(0, 0, floor, 10) == 1e-3 and lr_at(0, 0, floor, 0) == 4e-3


def test_plateau_schedule_in_training(zeisel_small, optimizer_lrs):
    """Each epoch's steps use lr * 0.6 ** (cuts after the validation ELBOs of the epochs before it); a run without
    validation cells is refused with what to do."""
    seen = optimizer_lrs
    m = CountVAE(zeisel_small, n_hidden=32, n_latent=5)
    m.train(max_epochs=6, batch_size=64, n_epochs_kl_warmup=3, seed=3, progress_bar=False, n_threads=1, lr=3e-2,
            lr_schedule="plateau", lr_patience=0)  # 270 training cells: 5 steps per epoch
    h = m.history
    want = [3e-2 * 0.6 ** plateau_reductions(h["validation_elbo"][:e], 0) for e in range(6)]
    assert h["lr"] == pytest.approx(want, rel=1e-12) and min(want) < 3e-2
    assert [g[0] for g in seen] == pytest.approx([r for r in want for _ in range(5)], rel=1e-12)
    assert h["plan"]["lr_schedule"] == "plateau" and h["plan"]["lr_patience"] == 0
    with pytest.raises(CellvaeInputError, match="no validation cells: use train_size < 1"):
        CountVAE(zeisel_small, n_hidden=32, n_latent=5).train(max_epochs=2, train_size=1.0, lr_schedule="plateau",
                                                             progress_bar=False)
    with pytest.raises(CellvaeInputError, match="lr_factor"):
        TrainingPlan(lr_schedule="plateau", lr_factor=1.5)
