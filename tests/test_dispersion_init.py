"""Dispersion initialisation (``CountVAE.train(dispersion_init=...)``, ``cellvae fit --dispersion-init``): scVI's
N(0, 1) draw of log theta per gene (default) or one constant log theta for every gene, and its refusals."""

from __future__ import annotations

import click
import numpy as np
import pytest

from cellvae import CellvaeInputError, CountVAE
from cellvae.cli import _Parsed
from cellvae.settings import parse_dispersion_init

TRAIN = dict(batch_size=64, seed=2, progress_bar=False, n_threads=1, early_stopping=False, max_epochs=1, lr=1e-12)


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_constant_log_theta_for_every_gene(pbmc_small, likelihood):
    """With a learning rate too small to move it, the trained log theta is the initial constant."""
    m = CountVAE(pbmc_small, n_hidden=32, n_latent=5, gene_likelihood=likelihood).train(dispersion_init=1.5, **TRAIN)
    np.testing.assert_allclose(m.module.px_r.detach().numpy(), 1.5, atol=1e-6)
    assert m.history["plan"]["dispersion_init"] == 1.5


def test_gene_batch_dispersion_is_set_for_every_batch(pbmc_small):
    pbmc_small.obs["batch"] = np.where(np.arange(pbmc_small.n_obs) % 2, "a", "b")
    m = CountVAE(pbmc_small, n_hidden=32, n_latent=5, batch_key="batch", dispersion="gene-batch")
    m.train(dispersion_init=-0.5, **TRAIN)
    assert m.module.px_r.shape == (2, len(m.spec.gene_names))  # genes without counts are left out
    np.testing.assert_allclose(m.module.px_r.detach().numpy(), -0.5, atol=1e-6)


def test_random_is_the_scvi_draw(pbmc_small):
    m = CountVAE(pbmc_small, n_hidden=32, n_latent=5).train(**TRAIN)
    r = m.module.px_r.detach().numpy()
    assert abs(r.mean()) < 0.1 and 0.9 < r.std() < 1.1  # 2000 draws of N(0, 1)
    assert m.history["plan"]["dispersion_init"] == "random"


@pytest.mark.parametrize("bad", ["high", float("nan"), float("inf"), True, None])
def test_bad_values_are_refused_before_training(pbmc_small, bad):
    m = CountVAE(pbmc_small, n_hidden=32, n_latent=5)
    with pytest.raises(CellvaeInputError, match="dispersion_init"):
        m.train(dispersion_init=bad, **TRAIN)
    assert not m.is_trained


@pytest.mark.parametrize("kw", [{"gene_likelihood": "poisson"}, {"gene_likelihood": "normal"},
                                {"dispersion": "gene-cell"}])
def test_a_number_needs_a_per_gene_dispersion(pbmc_small, kw):
    m = CountVAE(pbmc_small, n_hidden=32, n_latent=5, **kw)
    with pytest.raises(CellvaeInputError, match="dispersion_init=1.0 needs"):
        m.train(dispersion_init=1.0, **TRAIN)


def test_cli_option_type():
    t = _Parsed(parse_dispersion_init, "random|NUMBER")  # the type cellvae fit's --dispersion-init gets
    assert t.convert("random", None, None) == "random"
    assert t.convert("1.5", None, None) == 1.5
    assert t.convert("-2", None, None) == -2.0
    for bad in ("high", "nan", "inf"):
        with pytest.raises(click.BadParameter, match="must be 'random' or a finite log theta"):
            t.convert(bad, None, None)
