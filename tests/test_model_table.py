"""The small gaps of the model table (issue 26): ``cellvae fit --beta``, the zero-inflated Poisson likelihood in a
model, and the linearly decoded VAE (LDVAE)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellvae import CountVAE
from cellvae.cli import main
from cellvae.vae.distributions import ZeroInflatedPoisson


@pytest.fixture()
def small_h5ad(tmp_path, kang_small):
    p = tmp_path / "in" / "kang_small.h5ad"
    p.parent.mkdir()
    kang_small.write_h5ad(p)
    return p


def test_fit_beta_and_zip_on_the_command_line(tmp_path, small_h5ad):
    assert "--beta" in CliRunner().invoke(main, ["fit", "--help"]).output
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(out), "--max-epochs", "4", "--quiet",
                                  "--beta", "0.5", "--gene-likelihood", "zip", "--n-latent", "4"])
    assert r.exit_code == 0, r.output
    m = CountVAE.load(out / "model", adata=ad.read_h5ad(small_h5ad))
    assert m.beta == 0.5 and m.settings.gene_likelihood == "zip"
    assert m.history["kl_weight"][-1] == pytest.approx(0.5)  # warm-up (2 epochs) reached beta, not 1
    assert max(m.history["kl_weight"]) == pytest.approx(0.5)
    assert json.loads((out / "metrics.json").read_text())["settings"]["beta"] == 0.5
    assert np.isfinite(m.get_elbo())
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(tmp_path / "o2"), "--beta", "-1"])
    assert r.exit_code == 2 and "--beta" in r.output


def test_zip_count_vae_trains_and_uses_the_distribution_classes(kang_small):
    m = CountVAE(kang_small, gene_likelihood="zip", n_latent=4, n_hidden=32)
    assert m.module.fused_loss is None and not m.module.sparse_input
    m.train(max_epochs=3, batch_size=64, progress_bar=False, seed=0)
    h = m.history["validation_elbo"]
    assert np.all(np.isfinite(h))
    data = m.prepared_data()
    x, cat, cont = next(iter(data.iterate(torch.arange(8), 8)))
    m.module.eval()
    with torch.no_grad():
        inf = m.module.inference(x, cat, cont)
        px = m.module.generative(inf["qz_m"], inf["library"], cat, cont)["px"]
    assert isinstance(px, ZeroInflatedPoisson)
    sample = m.posterior_predictive_sample(indices=np.arange(10))
    assert sample.shape == (10, kang_small.n_vars) and (sample >= 0).all()
    de = m.differential_expression(groupby="condition", n_samples=200, seed=0)
    assert np.isfinite(de["lfc_mean"]).all()
