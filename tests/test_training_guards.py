"""Numerical guards: non-finite losses or gradients never update the weights; repeated ones stop training clearly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellvae import CellvaeTrainingError, CountVAE
from cellvae.train import load_checkpoint

SMALL = dict(n_hidden=32, n_latent=5)
TRAIN = dict(batch_size=64, seed=1, progress_bar=False, n_threads=1)  # 270 training cells: 5 steps per epoch


def _poison_loss(model: CountVAE, bad_steps: set[int] | None = None, from_step: int | None = None) -> None:
    """Make the training loss NaN at the given (1-based) training steps, or at every step from ``from_step``."""
    module = model.module
    orig = module.forward
    count = {"n": 0}

    def forward(*args, **kwargs):
        out = orig(*args, **kwargs)
        if module.training:
            count["n"] += 1
            if (bad_steps and count["n"] in bad_steps) or (from_step is not None and count["n"] >= from_step):
                out.loss = out.loss * math.nan
        return out

    module.forward = forward


def test_nan_loss_steps_are_skipped_and_counted(zeisel_small, monkeypatch):
    m = CountVAE(zeisel_small, **SMALL)
    # train() rebuilds the module on the first fit; patch the rebuilt one.
    orig_build = m._build_module

    def build(*a, **k):
        mod = orig_build(*a, **k)
        m.module = mod
        _poison_loss(m, bad_steps={3, 4, 12})
        return mod

    monkeypatch.setattr(m, "_build_module", build)
    m.train(max_epochs=4, **TRAIN)
    h = m.history
    assert h["n_skipped_steps"] == 3 and h["skipped_steps"] == [2, 0, 1, 0]
    assert all(np.isfinite(h["train_elbo"])) and all(np.isfinite(h["validation_elbo"]))
    assert all(torch.isfinite(v).all() for v in m.module.state_dict().values() if v.is_floating_point())


def test_skipped_steps_leave_weights_and_batchnorm_untouched(zeisel_small, monkeypatch):
    """An epoch whose every step is bad leaves every weight and batch-norm statistic exactly as it was (no
    validation cells, so no best-weights restore hides it)."""
    # constant lr: a cosine schedule over 1 epoch and one over 2 epochs differ in epoch 1
    kw = dict(TRAIN, n_epochs_kl_warmup=0, train_size=1.0, lr_schedule="constant")
    ref = CountVAE(zeisel_small, **SMALL).train(max_epochs=1, **kw)
    m = CountVAE(zeisel_small, **SMALL)
    orig_build = m._build_module

    def build(*a, **k):
        mod = orig_build(*a, **k)
        m.module = mod
        _poison_loss(m, from_step=6)  # all of epoch 2
        return mod

    monkeypatch.setattr(m, "_build_module", build)
    m.train(max_epochs=2, **kw)
    assert m.history["skipped_steps"] == [0, 5] and math.isnan(m.history["train_elbo"][1])
    assert m.history["validation_elbo"] == [] and m.history["best_epoch"] == 2
    a, b = ref.module.state_dict(), m.module.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_nan_gradients_with_finite_loss_are_skipped(zeisel_small, monkeypatch):
    m = CountVAE(zeisel_small, **SMALL)
    orig_build = m._build_module
    calls = {"n": 0}

    def nan_grad(g):
        calls["n"] += 1
        return g * math.nan if calls["n"] in (2, 7) else g

    def build(*a, **k):
        mod = orig_build(*a, **k)
        mod.px_r.register_hook(nan_grad)
        return mod

    monkeypatch.setattr(m, "_build_module", build)
    m.train(max_epochs=2, **TRAIN)
    assert m.history["n_skipped_steps"] == 2 and m.history["skipped_steps"] == [1, 1]
    assert torch.isfinite(m.module.px_r).all()


def test_repeated_nan_stops_with_clear_error_and_keeps_best(tmp_path, zeisel_small, monkeypatch):
    m = CountVAE(zeisel_small, **SMALL)
    orig_build = m._build_module

    def build(*a, **k):
        mod = orig_build(*a, **k)
        m.module = mod
        _poison_loss(m, from_step=16)  # epochs 1-3 fine, then NaN for ever
        return mod

    monkeypatch.setattr(m, "_build_module", build)
    with pytest.raises(CellvaeTrainingError) as e:
        m.train(max_epochs=10, n_epochs_kl_warmup=1, max_bad_steps=3, checkpoint_dir=tmp_path, **TRAIN)
    msg = str(e.value)
    h = m.history
    best = h["best_epoch"]
    assert len(h["epoch"]) == 3 and best == 1 + int(np.argmax(h["validation_elbo"]))
    for part in ("epoch 4 (step 18)", "3 consecutive minibatches", "non-finite (NaN or inf) loss",
                 "learning rate too high", "raw counts", "library sizes", f"best epoch so far ({best})",
                 "checkpoint"):
        assert part in msg, part
    assert h["n_skipped_steps"] == 3 and m.is_trained
    best_val = h["validation_elbo"][best - 1]
    assert np.isfinite(m.get_latent_representation()).all()
    assert abs(m.get_elbo(indices=m.validation_indices) - best_val) < 0.05 * abs(best_val)  # best weights kept
    ck = load_checkpoint(tmp_path)
    assert ck["failed"] and ck["best"]["epoch"] == best and ck["best"]["state"] is not None


def test_learning_rate_far_too_high_on_real_data(zeisel_small):
    """No monkeypatching: lr = 100 makes the real loss non-finite; training stops with the likely causes named."""
    m = CountVAE(zeisel_small, **SMALL)
    with pytest.raises(CellvaeTrainingError, match=r"learning rate too high \(lr=100"):
        m.train(max_epochs=10, lr=100.0, **TRAIN)
    assert m.history["n_skipped_steps"] == 20
    assert all(torch.isfinite(v).all() for v in m.module.state_dict().values() if v.is_floating_point())


def test_guard_off_gives_the_same_result(zeisel_small):
    """check_finite only skips bad steps: on a healthy run it changes nothing."""
    from cellvae.train import TrainingPlan, train_module

    a = CountVAE(zeisel_small, **SMALL).train(max_epochs=2, decoder_bias_init="default", **TRAIN)
    b = CountVAE(zeisel_small, **SMALL)
    torch.manual_seed(TRAIN["seed"])
    b.module = b._build_module()
    data = b.prepared_data()
    plan = TrainingPlan(max_epochs=2, batch_size=64, seed=1, progress_bar=False, n_threads=1, check_finite=False,
                        lr=1e-3, lr_schedule="constant", dispersion_lr_multiplier=30.0)  # CountVAE.train's defaults
    train_module(b.module, data, a.train_indices, a.validation_indices, plan)
    for k, v in a.module.state_dict().items():
        torch.testing.assert_close(b.module.state_dict()[k], v, rtol=0, atol=0)
