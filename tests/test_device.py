"""GPU readiness (issue 22), checked on the CPU: the accelerator's synchronisation-free step (finiteness on the
device, the fused Adam's found_inf) trains exactly as the CPU step, bad steps included; DeviceData yields the
minibatches of TensorData."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellvae import CellvaeTrainingError, CountVAE
from cellvae.train import loop
from cellvae.train.device import DeviceData
from test_training_guards import SMALL, TRAIN, _poison_loss


def _fit(adata, monkeypatch, sync_free: bool, bad_steps=None, from_step=None, epochs=3):
    monkeypatch.setattr(loop, "_FORCE_SYNC_FREE", sync_free)
    m = CountVAE(adata, **SMALL)
    orig_build = m._build_module

    def build(*a, **k):
        mod = orig_build(*a, **k)
        m.module = mod
        if bad_steps or from_step:
            _poison_loss(m, bad_steps=bad_steps, from_step=from_step)
        return mod

    monkeypatch.setattr(m, "_build_module", build)
    m.train(max_epochs=epochs, **TRAIN)
    return m


@pytest.mark.parametrize("bad_steps", [None, {3, 4, 12}])
def test_sync_free_step_equals_cpu_step(zeisel_small, monkeypatch, bad_steps):
    a = _fit(zeisel_small, monkeypatch, False, bad_steps)
    b = _fit(zeisel_small, monkeypatch, True, bad_steps)
    for (k, v), w in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        if v.is_floating_point():
            torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(v, w), k
    assert a.history["skipped_steps"] == b.history["skipped_steps"]
    assert a.history["n_skipped_steps"] == b.history["n_skipped_steps"]
    np.testing.assert_allclose(a.history["train_elbo"], b.history["train_elbo"], rtol=1e-6)


def test_sync_free_repeated_bad_steps_stop_training(zeisel_small, monkeypatch):
    with pytest.raises(CellvaeTrainingError, match="consecutive"):
        _fit(zeisel_small, monkeypatch, True, from_step=2, epochs=30)


def test_device_data_minibatches_equal_tensor_data(zeisel_small):
    m = CountVAE(zeisel_small, **SMALL)
    data = m.prepared_data()
    dev = DeviceData(data, torch.device("cpu"))
    idx = torch.arange(0, data.n_cells, 2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for (x1, c1, u1), (x2, c2, u2) in zip(data.iterate(idx, 32, shuffle=True, generator=g1),
                                          dev.iterate(idx, 32, shuffle=True, generator=g2)):
        assert torch.equal(x1, x2) and torch.equal(c1, c2) and u1 is None and u2 is None
    assert DeviceData.maybe(data, torch.device("cpu")) is None  # the CPU keeps its own path
