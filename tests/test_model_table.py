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


# ------------------------------------------------------------------------------------------------- LDVAE
def test_linear_count_vae_loadings_are_the_decoder_jacobian(kang_small, tmp_path):
    from cellvae import CellvaeInputError, LinearCountVAE

    m = LinearCountVAE(kang_small, n_latent=3, batch_key="donor")
    assert m.settings.gene_likelihood == "nb" and m.settings.decoder == "linear"
    assert m.module.fused_loss is None  # NB: the reference path (no hidden layer for the fused loss)
    m.train(max_epochs=3, batch_size=64, progress_bar=False, seed=0)
    load = m.get_loadings()
    assert load.shape == (kang_small.n_vars, 3) and list(load.columns) == ["Z_0", "Z_1", "Z_2"]
    assert list(load.index) == list(kang_small.var_names) and np.isfinite(load.to_numpy()).all()
    # d logits / d z in eval mode (batch norm with running statistics) is the loading matrix, for any cell
    m.module.eval()
    cat = torch.zeros(1, 1, dtype=torch.long)
    z = torch.randn(1, 3)
    jac = torch.autograd.functional.jacobian(lambda zz: m.module.decoder.forward_logits(zz, cat)[0][0], z)[:, 0, :]
    np.testing.assert_allclose(jac.numpy(), load.to_numpy(), rtol=1e-5, atol=1e-6)
    # saved and loaded (by CountVAE.load too) with the same loadings
    m.save(tmp_path / "ld")
    m2 = CountVAE.load(tmp_path / "ld", adata=kang_small)
    assert type(m2).__name__ == "LinearCountVAE"
    np.testing.assert_allclose(m2.get_loadings().to_numpy(), load.to_numpy())
    with pytest.raises(CellvaeInputError, match="linear decoder"):
        CountVAE(kang_small, n_latent=3).train(max_epochs=1, progress_bar=False).get_loadings()
    with pytest.raises(CellvaeInputError, match="per-cell dispersion"):
        LinearCountVAE(kang_small, dispersion="gene-cell")
    with pytest.raises(CellvaeInputError, match="nonlinear"):
        LinearCountVAE(kang_small, decoder="nonlinear")


def _assert_fused_loss_equals_reference(fast, slow):
    """``slow`` (``use_fast_likelihood=False``) gets ``fast``'s weights; the fused training loss of ``fast`` equals
    the reference path's reconstruction loss on the first 32 cells, in eval mode."""
    slow.module.load_state_dict(fast.module.state_dict())
    assert fast.module.fused_loss is not None and slow.module.fused_loss is None
    x, cat, cont = next(iter(fast.prepared_data().iterate(torch.arange(32), 32)))
    for mod in (fast.module, slow.module):
        mod.eval()
    torch.manual_seed(1)
    a = fast.module(x, cat, cont).reconstruction_loss
    torch.manual_seed(1)
    b = slow.module(x.to_dense() if x.layout != torch.strided else x, cat, cont).reconstruction_loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_linear_decoder_poisson_fused_loss_equals_reference(kang_small):
    torch.manual_seed(0)
    fast = CountVAE(kang_small, gene_likelihood="poisson", decoder="linear", n_latent=3)
    slow = CountVAE(kang_small, gene_likelihood="poisson", decoder="linear", n_latent=3, use_fast_likelihood=False)
    _assert_fused_loss_equals_reference(fast, slow)


def test_fit_linear_decoder_reports_top_genes(tmp_path, small_h5ad):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(out), "--max-epochs", "2", "--quiet",
                                  "--decoder", "linear", "--n-latent", "3", "--gene-likelihood", "nb"])
    assert r.exit_code == 0, r.output
    import pandas as pd

    load = pd.read_csv(out / "loadings.csv", index_col="gene")
    assert load.shape == (150, 3)
    html = (out / "report.html").read_text()
    assert "Gene loadings per latent dimension" in html
    top = load["Z_1"].sort_values(ascending=False).index[0]
    assert top in html


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_latent_skip_heads_read_hidden_and_z_and_the_fused_loss_equals_reference(kang_small, likelihood, tmp_path):
    """``latent_skip`` (totalVI's RNA decoder): the output heads read [hidden, z]; the fused training likelihood
    gives the reference path's reconstruction loss; the setting is saved with the model."""
    torch.manual_seed(0)
    fast = CountVAE(kang_small, gene_likelihood=likelihood, n_latent=3, n_hidden=16, latent_skip=True)
    slow = CountVAE(kang_small, gene_likelihood=likelihood, n_latent=3, n_hidden=16, latent_skip=True,
                    use_fast_likelihood=False)
    dec = fast.module.decoder
    assert dec.scale_decoder.in_features == 16 + 3 and dec.dropout_decoder.in_features == 16 + 3
    _assert_fused_loss_equals_reference(fast, slow)
    # the heads' input is the hidden layer, then z itself
    z = torch.zeros(2, 3)
    z[1, 0] = 1.0
    with torch.no_grad():
        h = dec.hidden(z)
    assert h.shape == (2, 19)
    torch.testing.assert_close(h[:, 16:], z)
    if likelihood == "nb":
        return
    fast.train(max_epochs=1, progress_bar=False)
    fast.save(tmp_path / "skip")
    again = CountVAE.load(tmp_path / "skip", adata=kang_small)
    assert again.module.decoder.latent_skip and again.settings.latent_skip is True
    np.testing.assert_allclose(again.get_latent_representation(), fast.get_latent_representation(),
                               rtol=1e-5, atol=1e-6)


def test_latent_skip_is_refused_with_the_linear_decoder(kang_small):
    from cellvae import CellvaeInputError

    with pytest.raises(CellvaeInputError, match="latent_skip"):
        CountVAE(kang_small, decoder="linear", latent_skip=True)


def test_dropout_rate_decoder_drops_decoder_units_in_training_only(kang_small, tmp_path):
    """``dropout_rate_decoder`` (TOTALVI's 0.2): the decoder's hidden layer varies between forward passes in training
    mode and not in evaluation mode; 0 (the default) adds no dropout; it is saved with the model and 1 is refused."""
    from cellvae import CellvaeInputError

    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    for rate, differs in ((0.0, False), (0.5, True)):
        m = CountVAE(kang_small, gene_likelihood="nb", n_latent=3, n_hidden=16, dropout_rate_decoder=rate)
        dec = m.module.decoder
        dec.train()
        with torch.no_grad():
            a, b = dec.hidden(z), dec.hidden(z)
        assert bool((a != b).any()) is differs
        if differs:  # inverted dropout: dropped units are 0, kept ones scaled by 1 / (1 - rate)
            assert 0.3 < float((a == 0).float().mean()) < 0.8
        dec.eval()
        with torch.no_grad():
            torch.testing.assert_close(dec.hidden(z), dec.hidden(z), rtol=0, atol=0)
    m.train(max_epochs=1, progress_bar=False)
    m.save(tmp_path / "drop")
    assert CountVAE.load(tmp_path / "drop", adata=kang_small).settings.dropout_rate_decoder == 0.5
    with pytest.raises(CellvaeInputError, match=r"dropout_rate_decoder must be in \[0, 1\)"):
        CountVAE(kang_small, dropout_rate_decoder=1.0)
