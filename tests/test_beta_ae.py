"""beta-VAE (KL weight warm-up to beta, stored in the config) and the deterministic Autoencoder baseline."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from cellvae import Autoencoder, CellvaeInputError, CountVAE
from cellvae.train import kl_weight_at


def _train(m, epochs=4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.train(max_epochs=epochs, batch_size=64, progress_bar=False, n_threads=1, seed=0)
    return m


def test_beta_weight_saved_and_loaded(zeisel_small, tmp_path):
    m = _train(CountVAE(zeisel_small, n_hidden=32, n_latent=4, beta=4.0), epochs=4)
    assert m.beta == 4.0
    kl = m.history["kl_weight"]
    assert kl[-1] == pytest.approx(4.0) and kl[0] < 4.0 and max(kl) == pytest.approx(4.0)
    assert m.module.beta == 4.0  # the loop warms the KL weight up to the module's beta
    m.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["module_kwargs"]["beta"] == 4.0
    m2 = CountVAE.load(tmp_path / "m", adata=zeisel_small)
    assert m2.beta == 4.0 and m2.module.beta == 4.0
    np.testing.assert_allclose(m2.get_latent_representation(), m.get_latent_representation(), atol=1e-5)
    # a config written before beta existed loads as beta = 1
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["module_kwargs"]["beta"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert CountVAE.load(tmp_path / "m").beta == 1.0
    assert kl_weight_at(5, 10, 3.0) == 1.5 and kl_weight_at(50, 10, 3.0) == 3.0


def test_beta_default_and_errors(zeisel_small):
    m = _train(CountVAE(zeisel_small, n_hidden=32, n_latent=4), epochs=2)
    assert m.beta == 1.0 and max(m.history["kl_weight"]) <= 1.0
    with pytest.raises(CellvaeInputError, match="beta"):
        CountVAE(zeisel_small, beta=-1)


def test_autoencoder_trains(zeisel_small):
    ae = Autoencoder(zeisel_small, n_hidden=32, n_latent=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ae.train(max_epochs=5, batch_size=64, progress_bar=False, n_threads=1, seed=0)
    z = ae.get_latent_representation()
    assert z.shape == (zeisel_small.n_obs, 6) and np.isfinite(z).all()
    tr = ae.history["train_elbo"]
    assert tr[-1] > tr[0]  # squared error goes down
    assert all(v == 0 for v in ae.history["validation_kl_local"])
    rec = ae.get_reconstruction()
    assert rec.shape == zeisel_small.shape
    z2 = Autoencoder(zeisel_small, n_hidden=32, n_latent=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z2.train(max_epochs=5, batch_size=64, progress_bar=False, n_threads=1, seed=0)
    np.testing.assert_array_equal(z2.get_latent_representation(), z)
