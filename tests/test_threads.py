"""Threads (issue 22): the native kernels give bit-identical results for any thread count; training with the same
seed, data and thread count is bit-identical; another thread count agrees within 1e-5 after one epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellvae import CountVAE
from cellvae.native import build as native
from cellvae.native import ops

pytestmark = pytest.mark.skipif(not native.available(), reason="no native library (no C compiler)")


@pytest.fixture()
def threads():
    old = torch.get_num_threads()
    yield lambda n: torch.set_num_threads(n)
    torch.set_num_threads(old)


def _csr(n, g, density, seed):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.poisson(torch.rand(n, g, generator=gen) * 3) * (torch.rand(n, g, generator=gen) < density)
    sp = dense.to_sparse_csr()
    return dense, sp.crow_indices().to(torch.int64), sp.col_indices().to(torch.int64), sp.values().float()


@pytest.mark.parametrize("zinb", [False, True])
def test_nb_kernel_bit_identical_across_thread_counts(threads, zinb):
    n, g = 300, 700  # large enough that the kernel splits the cells
    dense, crow, col, val = _csr(n, g, 0.2, 0)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(n, g, generator=gen)
    lib = torch.randn(n, generator=gen) + 7
    lt = torch.randn(2, g, generator=gen)
    rows = torch.randint(0, 2, (n,), generator=gen)
    zi = torch.randn(n, g, generator=gen) if zinb else None
    outs = []
    for t in (1, 2, 3, 8):
        threads(t)
        outs.append(ops.nb_loglik(logits, lib, lt, zi, rows, crow, col, val, None, grad=True))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert (a is None and b is None) or torch.equal(a, b)


def test_sparse_linear_kernels_bit_identical_across_thread_counts(threads):
    n, g, h = 500, 900, 130  # two blocks of 64 outputs and a tail
    _, crow, col, val = _csr(n, g, 0.1, 2)
    wt = torch.randn(g, h, generator=torch.Generator().manual_seed(3))
    b = torch.randn(h)
    gr = torch.randn(n, h)
    fw, wg = [], []
    for t in (1, 2, 5):
        threads(t)
        fw.append(ops.csr_linear(crow, col, val, wt, b))
        wg.append(ops.csr_linear_wgrad(crow, col, val, gr, g))
    for i in (1, 2):
        assert torch.equal(fw[0], fw[i]) and torch.equal(wg[0], wg[i])


def _fit(adata, n_threads):
    m = CountVAE(adata, n_hidden=32, n_latent=5)
    m.train(max_epochs=1, batch_size=64, seed=3, progress_bar=False, n_threads=n_threads)
    return m


def test_training_reproducible_for_a_thread_count(pbmc_small):
    a, b = _fit(pbmc_small, 2), _fit(pbmc_small, 2)
    for (k, v), w in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(v, w), k
    assert np.array_equal(a.get_latent_representation(), b.get_latent_representation())


def test_training_with_another_thread_count_agrees(pbmc_small):
    a, b = _fit(pbmc_small, 1), _fit(pbmc_small, 2)
    for (k, v), w in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        if v.is_floating_point():
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-5, msg=k)
    np.testing.assert_allclose(a.get_latent_representation(), b.get_latent_representation(), rtol=1e-5, atol=1e-5)


class _FakeClock:
    """A clock whose steps take the seconds given per thread count."""

    def __init__(self, seconds_per_count):
        self.t, self.per = 0.0, seconds_per_count

    def __call__(self):
        return self.t

    def run_step(self, trial):
        n = trial.before_step()
        self.t += self.per(n)
        trial.after_step()
        return n


def test_thread_trial_keeps_the_faster_count_and_restarts(threads):
    from cellvae.train.threads import ThreadTrial

    threads(1)
    speed = {1: 0.010, 2: 0.006}
    clock = _FakeClock(lambda n: speed[n])
    trial = ThreadTrial([2, 1], rounds=3, every_seconds=1.0, first_seconds=1.0, clock=clock)
    used = [clock.run_step(trial) for _ in range(8)]  # warm-up 1, 2, then 2 1 1 2 2 1 ... (3 timed each)
    assert sorted(used[:2]) == [1, 2] and used.count(1) == 4 and used.count(2) == 4
    assert not trial.active and trial.chosen == 2 and torch.get_num_threads() == 2
    assert trial.trials == [{1: 0.010, 2: 0.006}]
    speed[2] = 0.030  # load arrives: 2 threads now slower
    while clock.t - 0.064 < 1.0:  # steps at the chosen count until the next trial is due
        assert clock.run_step(trial) == 2
    for _ in range(8):
        clock.run_step(trial)
    assert trial.chosen == 1 and torch.get_num_threads() == 1 and len(trial.trials) == 2


def test_thread_trial_prefers_fewer_threads_within_the_margin(threads):
    from cellvae.train.threads import ThreadTrial

    clock = _FakeClock(lambda n: 0.010 if n == 1 else 0.0098)  # 2 % faster: not worth a second core
    trial = ThreadTrial([1, 2], clock=clock)
    for _ in range(8):
        clock.run_step(trial)
    assert trial.chosen == 1
    with pytest.raises(ValueError):
        ThreadTrial([0, 2])
    assert ThreadTrial([4]).active is False  # one count: nothing to time


def test_default_training_times_thread_counts(pbmc_small, threads, monkeypatch):
    import cellvae.train.threads as th

    threads(2)  # the caller's count: the cap of the trial (read before training sets the idle-core count)
    monkeypatch.setattr(th, "default_n_threads", lambda: 1)  # one core idle
    monkeypatch.setattr(th, "_available_cpus", lambda: 2)
    m = CountVAE(pbmc_small, n_hidden=32, n_latent=5)
    m.train(max_epochs=3, batch_size=32, seed=3, progress_bar=False)
    h = m.history
    assert len(h["thread_trials"]) >= 1 and set(h["thread_trials"][0]) == {"1", "2"}
    assert h["n_threads"] in (1, 2) and torch.get_num_threads() == 2  # the caller's count is restored
    fixed = CountVAE(pbmc_small, n_hidden=32, n_latent=5)
    fixed.train(max_epochs=1, batch_size=32, seed=3, progress_bar=False, n_threads=1)
    assert "thread_trials" not in fixed.history and fixed.history["n_threads"] == 1
