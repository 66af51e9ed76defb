"""Learning rate of log theta (``TrainingPlan.dispersion_lr_multiplier``, ``CountVAE.train(dispersion_lr_multiplier=
...)``, ``cellvae fit --dispersion-lr-multiplier``): its own Adam parameter group, the rates Adam uses, resume
(also from a checkpoint with one parameter group), and refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import cellvae.train.checkpoint as ck_mod
import cellvae.train.loop as train_mod
from cellvae import CellvaeInputError, CountVAE
from cellvae.train import TrainingPlan, load_checkpoint, lr_at, make_optimizer, save_checkpoint
from cellvae.train.schedule import dispersion_decay_steps, dispersion_lr_multiplier_at

SMALL = dict(n_hidden=32, n_latent=5)
TRAIN = dict(batch_size=64, seed=1, progress_bar=False, n_threads=1)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def _steps(opt, params, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt.step()


@pytest.mark.parametrize("fused", [True, False])
def test_multiplier_one_is_the_single_group_update(fused):
    """Adam is element-wise: the dispersion group with multiplier 1 gives bit-identical weights to one group."""
    plan = TrainingPlan(fused_optimizer=fused, dispersion_lr_multiplier=1.0)
    a, b = _params(), _params()
    one, two = make_optimizer(a, plan), make_optimizer(b, plan, [b[1]])
    assert len(one.param_groups) == 1 and len(two.param_groups) == 2
    _steps(one, a)
    _steps(two, b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_dispersion_group_moves_multiplier_times_as_far(fused):
    """Adam's first step is lr * g / (|g| + eps): linear in lr, so the dispersion weights move 30 times as far and the
    others as without the group."""
    a, b = _params(), _params()
    start = [p.detach().clone() for p in a]
    _steps(make_optimizer(a, TrainingPlan(fused_optimizer=fused)), a, n=1)  # no dispersion group: one lr
    opt = make_optimizer(b, TrainingPlan(fused_optimizer=fused, dispersion_lr_multiplier=30.0), [b[1]])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 3e-2])
    assert [g["lr_multiplier"] for g in opt.param_groups] == [1.0, 30.0]
    _steps(opt, b, n=1)
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)
    torch.testing.assert_close(b[1] - start[1], 30 * (a[1] - start[1]), rtol=2e-3, atol=0)  # float32 rounding


def test_no_dispersion_parameter_one_group():
    p = _params()
    assert len(make_optimizer(p, TrainingPlan(dispersion_lr_multiplier=10.0), []).param_groups) == 1


@pytest.mark.parametrize("kw, expected", [({}, 1), ({"gene_likelihood": "poisson"}, 0),
                                          ({"gene_likelihood": "normal"}, 0),
                                          ({"dispersion": "gene-cell"}, 0), ({"gene_likelihood": "nb"}, 1)])
def test_module_names_its_dispersion_parameter(pbmc_small, kw, expected):
    m = CountVAE(pbmc_small, **SMALL, **kw)
    disp = m.module.dispersion_parameters()
    assert len(disp) == expected
    if expected:
        assert disp[0] is m.module.px_r


def test_schedule_scales_both_groups(zeisel_small, optimizer_lrs):
    """Under the cosine schedule, every step's dispersion rate is the multiplier times the other weights' rate."""
    seen = optimizer_lrs
    m = CountVAE(zeisel_small, **SMALL).train(max_epochs=3, lr=2e-3, lr_schedule="cosine",
                                             dispersion_lr_multiplier=10.0, dispersion_lr_decay="none", **TRAIN)
    plan = TrainingPlan(lr=2e-3, lr_schedule="cosine")
    assert len(seen) == 15
    assert [s[0] for s in seen] == pytest.approx([lr_at(i, 15, plan) for i in range(15)], rel=1e-12)
    assert [s[1] for s in seen] == pytest.approx([10 * lr_at(i, 15, plan) for i in range(15)], rel=1e-12)
    assert m.history["lr"] == pytest.approx([s[0] for s in seen[4::5]], rel=1e-12)  # the other weights' rate
    assert m.history["plan"]["dispersion_lr_multiplier"] == 10.0


def test_larger_multiplier_moves_log_theta_further(zeisel_small, monkeypatch):
    """From the same start (same seed), log theta travels further with 30 times the rate."""
    starts = []
    orig = train_mod.make_optimizer

    def spy(params, plan, dispersion=()):
        starts.append([p.detach().clone() for p in dispersion])
        return orig(params, plan, dispersion)

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    moved = {}
    for mult in (1.0, 30.0):
        m = CountVAE(zeisel_small, **SMALL).train(max_epochs=3, dispersion_lr_multiplier=mult, **TRAIN)
        moved[mult] = float((m.module.px_r.detach() - starts[-1][0]).abs().mean())
    torch.testing.assert_close(starts[0][0], starts[1][0], rtol=0, atol=0)
    assert moved[30.0] > 5 * moved[1.0]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "fast", None, True])
def test_bad_multiplier_is_refused_before_training(zeisel_small, bad):
    m = CountVAE(zeisel_small, **SMALL)
    with pytest.raises(CellvaeInputError, match="dispersion_lr_multiplier must be a positive number"):
        m.train(max_epochs=1, dispersion_lr_multiplier=bad, **TRAIN)
    assert not m.is_trained


def _state(m):
    return {k: v.clone() for k, v in m.module.state_dict().items()}


def _crash_then_resume(tmp_path, zeisel_small, monkeypatch, first_kw, second_kw, first_optimizer=None,
                       edit_checkpoint=None):
    """Train 4 epochs with ``first_kw`` until a simulated crash after the epoch-2 checkpoint (with
    ``first_optimizer`` in place of ``make_optimizer`` if given; ``edit_checkpoint(state)`` then rewrites the
    checkpoint), then resume with ``second_kw`` in a fresh model."""
    calls = []

    def crash_at_second_checkpoint(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")

    kw = dict(TRAIN, n_epochs_kl_warmup=2, checkpoint_every=2, max_epochs=4, checkpoint_dir=tmp_path)
    monkeypatch.setattr(ck_mod, "_CHECKPOINT_HOOK", crash_at_second_checkpoint)
    orig = train_mod.make_optimizer
    if first_optimizer is not None:
        monkeypatch.setattr(train_mod, "make_optimizer", first_optimizer)
    with pytest.raises(KeyboardInterrupt):
        CountVAE(zeisel_small, **SMALL).train(**kw, **first_kw)
    monkeypatch.setattr(ck_mod, "_CHECKPOINT_HOOK", None)
    monkeypatch.setattr(train_mod, "make_optimizer", orig)
    assert load_checkpoint(tmp_path)["epoch"] == 2
    if edit_checkpoint is not None:
        state = load_checkpoint(tmp_path)
        edit_checkpoint(state)
        save_checkpoint(state, tmp_path)
    return CountVAE(zeisel_small, **SMALL).train(resume=True, **kw, **second_kw)


def test_resume_with_multiplier_equals_uninterrupted(tmp_path, zeisel_small, monkeypatch):
    straight = CountVAE(zeisel_small, **SMALL).train(max_epochs=4, n_epochs_kl_warmup=2, dispersion_lr_multiplier=10.0,
                                                    **TRAIN)
    resumed = _crash_then_resume(tmp_path, zeisel_small, monkeypatch, {"dispersion_lr_multiplier": 10.0},
                                 {"dispersion_lr_multiplier": 10.0})
    a, b = _state(straight), _state(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed.history["validation_elbo"] == straight.history["validation_elbo"]


def test_resume_from_a_one_group_checkpoint(tmp_path, zeisel_small, monkeypatch):
    """A checkpoint of a cellvae without the dispersion group (one Adam group over all weights) resumes with its
    moments attached to the right weights: with multiplier 1 it ends with the weights of an uninterrupted run."""
    orig = train_mod.make_optimizer

    made = []

    def one_group(params, plan, *args):  # the optimizer before the dispersion group
        made.append(orig(params, plan))
        return made[-1]

    one = {"dispersion_lr_multiplier": 1.0}
    straight = CountVAE(zeisel_small, **SMALL).train(max_epochs=4, n_epochs_kl_warmup=2, **one, **TRAIN)
    resumed = _crash_then_resume(tmp_path, zeisel_small, monkeypatch, one, one, first_optimizer=one_group)
    assert [len(o.param_groups) for o in made] == [1]  # the checkpoint resumed from had one group
    a, b = _state(straight), _state(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ck = load_checkpoint(tmp_path)
    assert [g["lr_multiplier"] for g in ck["optimizer"]["param_groups"]] == [1.0, 1.0]


def test_resume_with_another_multiplier_warns(tmp_path, zeisel_small, monkeypatch):
    with pytest.warns(UserWarning, match="dispersion_lr_multiplier: 1.0 -> 10.0"):
        r = _crash_then_resume(tmp_path, zeisel_small, monkeypatch,
                               {"dispersion_lr_multiplier": 1.0, "dispersion_lr_decay": "none"},
                               {"dispersion_lr_multiplier": 10.0, "dispersion_lr_decay": "none"})
    assert r.history["plan"]["dispersion_lr_multiplier"] == 10.0
    groups = load_checkpoint(tmp_path)["optimizer"]["param_groups"]
    assert [g["lr_multiplier"] for g in groups] == [1.0, 10.0]
    assert np.isclose(groups[1]["lr"], 10 * groups[0]["lr"])


def _as_older_cellvae(state):
    """A checkpoint as a cellvae without ``dispersion_lr_decay`` wrote it (30x throughout)."""
    del state["plan"]["dispersion_lr_decay"]


def test_resume_of_a_checkpoint_without_the_decay_setting_warns(tmp_path, zeisel_small, monkeypatch):
    """A checkpoint written before ``dispersion_lr_decay`` existed was trained with ``"none"``: resuming it under
    the new default says so instead of changing the schedule silently."""
    with pytest.warns(UserWarning, match=r"dispersion_lr_decay: none \(the behaviour of the older cellvae.*-> 1000"):
        _crash_then_resume(tmp_path, zeisel_small, monkeypatch, {"dispersion_lr_decay": "none"}, {},
                           edit_checkpoint=_as_older_cellvae)


def test_resume_of_a_checkpoint_without_the_decay_setting_keeps_quiet_on_its_behaviour(tmp_path, zeisel_small,
                                                                                        monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        r = _crash_then_resume(tmp_path, zeisel_small, monkeypatch, {"dispersion_lr_decay": "none"},
                               {"dispersion_lr_decay": "none"}, edit_checkpoint=_as_older_cellvae)
    assert r.history["plan"]["dispersion_lr_decay"] == "none"


def test_default_is_30_falling_to_1_over_1000_steps(zeisel_small):
    m = CountVAE(zeisel_small, **SMALL).train(max_epochs=1, **TRAIN)
    assert m.history["plan"]["dispersion_lr_multiplier"] == 30.0
    assert m.history["plan"]["dispersion_lr_decay"] == 1000


def test_warmup_decay_falls_to_one_over_the_warmup(zeisel_small, optimizer_lrs):
    """``dispersion_lr_decay="warmup"``: the multiplier of step i is 1 + (m - 1)(1 - i / warmup_steps), then 1; the
    other weights keep ``lr``."""
    seen = optimizer_lrs
    m = CountVAE(zeisel_small, **SMALL).train(max_epochs=3, n_epochs_kl_warmup=2, dispersion_lr_multiplier=10.0,
                                             dispersion_lr_decay="warmup", **TRAIN)
    assert len(seen) == 15  # 5 steps per epoch: a warm-up of 10 steps
    assert [s[0] for s in seen] == pytest.approx([1e-3] * 15, rel=1e-12)
    expected = [1e-3 * (1 + 9 * (1 - i / 10)) if i < 10 else 1e-3 for i in range(15)]
    assert [s[1] for s in seen] == pytest.approx(expected, rel=1e-12)
    assert m.history["plan"]["dispersion_lr_decay"] == "warmup"


def test_decay_over_steps(zeisel_small, optimizer_lrs):
    """``dispersion_lr_decay=N``: the same fall over the first N optimizer steps, whatever the warm-up."""
    seen = optimizer_lrs
    CountVAE(zeisel_small, **SMALL).train(max_epochs=3, n_epochs_kl_warmup=3, dispersion_lr_multiplier=10.0,
                                         dispersion_lr_decay=5, **TRAIN)
    expected = [1e-3 * (1 + 9 * (1 - i / 5)) if i < 5 else 1e-3 for i in range(15)]
    assert [s[1] for s in seen] == pytest.approx(expected, rel=1e-12)


def test_decay_steps_and_multiplier():
    m30 = dict(dispersion_lr_multiplier=30.0)
    assert dispersion_decay_steps(TrainingPlan(**m30), 100) == 1000  # default
    assert dispersion_decay_steps(TrainingPlan(**m30, dispersion_lr_decay="none"), 100) == 0
    assert dispersion_decay_steps(TrainingPlan(**m30, dispersion_lr_decay="warmup"), 100) == 100
    assert dispersion_decay_steps(TrainingPlan(**m30, dispersion_lr_decay="warmup"), 0) == 0  # no warm-up
    assert dispersion_decay_steps(TrainingPlan(**m30, dispersion_lr_decay="20"), 100) == 20  # CLI string
    plan = TrainingPlan(**m30, dispersion_lr_decay="warmup")
    assert [dispersion_lr_multiplier_at(s, 0, plan) for s in (0, 5, 100)] == [30.0, 30.0, 30.0]
    assert dispersion_lr_multiplier_at(50, 100, plan) == pytest.approx(15.5)
    assert dispersion_lr_multiplier_at(500, 100, plan) == 1.0


def test_resume_with_decay_equals_uninterrupted(tmp_path, zeisel_small, monkeypatch):
    kw = {"dispersion_lr_multiplier": 10.0, "dispersion_lr_decay": "warmup"}
    straight = CountVAE(zeisel_small, **SMALL).train(max_epochs=4, n_epochs_kl_warmup=2, **kw, **TRAIN)
    resumed = _crash_then_resume(tmp_path, zeisel_small, monkeypatch, kw, kw)
    a, b = _state(straight), _state(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("bad", ["cosine", "", None, 0, -3, 2.5, True, "1.5"])
def test_bad_decay_is_refused_before_training(zeisel_small, bad):
    m = CountVAE(zeisel_small, **SMALL)
    with pytest.raises(CellvaeInputError, match="dispersion_lr_decay"):
        m.train(max_epochs=1, dispersion_lr_decay=bad, **TRAIN)
    assert not m.is_trained
