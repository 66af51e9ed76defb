"""The joint RNA + protein model (totalVI class): the NB mixture against scipy, the module's masks and numerics, and
(below) the model on the small CITE-seq sets: shapes, masks for missing proteins, save/load, MuData input, the
refusals and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from cellvae.vae.nb_mixture import NegativeBinomialMixture, log_nb_log_mu, log_nb_mixture
from cellvae.vae.totalvi import RNAProteinModule


def _scipy_mixture(y, mu1, mu2, theta, pi):
    """log(pi NB(y; mu1, theta) + (1 - pi) NB(y; mu2, theta)) with scipy's nbinom (n = theta, p = theta / (theta +
    mu))."""
    a = np.log(pi) + stats.nbinom.logpmf(y, theta, theta / (theta + mu1))
    b = np.log1p(-pi) + stats.nbinom.logpmf(y, theta, theta / (theta + mu2))
    return logsumexp(np.stack([a, b]), axis=0)


# ------------------------------------------------------------------------------------------------ NB mixture
@pytest.mark.parametrize("mu1,mu2,theta,pi", [
    (1.0, 50.0, 2.0, 0.3), (20.0, 2000.0, 0.5, 0.9), (1e4, 1e5, 100.0, 0.01), (0.01, 1e5, 1e6, 0.5),
    (3.0, 3.0, 1e-2, 0.5), (50.0, 5e4, 1e8, 0.999)])
def test_nb_mixture_matches_scipy(mu1, mu2, theta, pi):
    y = np.array([0, 1, 2, 7, 100, 3000, 20000, 1e5])
    ref = _scipy_mixture(y, mu1, mu2, theta, pi)
    args = [torch.tensor(np.log(v), dtype=torch.float32) for v in (mu1, mu2, theta)]
    got = log_nb_mixture(torch.tensor(y, dtype=torch.float32), *args,
                         torch.tensor(math.log(pi / (1 - pi)), dtype=torch.float32))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-3)
    d = NegativeBinomialMixture(*args, torch.tensor(math.log(pi / (1 - pi))))
    np.testing.assert_allclose(float(d.mean), pi * mu1 + (1 - pi) * mu2, rtol=1e-4)
    np.testing.assert_allclose(float(d.foreground_probability), 1 - pi, rtol=1e-5)


def test_nb_log_mu_matches_scipy_and_hand_values():
    y = torch.tensor([0.0, 3.0, 1e5], dtype=torch.float64)
    mu, theta = 40.0, 3.5
    got = log_nb_log_mu(y, torch.tensor(math.log(mu), dtype=torch.float64), torch.tensor(math.log(theta),
                                                                                          dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), stats.nbinom.logpmf(y.numpy(), theta, theta / (theta + mu)), rtol=1e-10)
    # NB(0) = (theta / (theta + mu))^theta by hand
    assert abs(float(got[0]) - theta * math.log(theta / (theta + mu))) < 1e-10


def test_nb_mixture_sample_moments_and_posterior_probability():
    torch.manual_seed(0)
    lm1, lm2 = torch.tensor([math.log(5.0)]), torch.tensor([math.log(500.0)])
    d = NegativeBinomialMixture(lm1, lm2, torch.tensor([math.log(10.0)]), torch.tensor([math.log(0.3 / 0.7)]))
    s = d.sample((40000,))
    assert s.shape == (40000, 1) and bool((s == s.round()).all())
    np.testing.assert_allclose(float(s.mean()), float(d.mean), rtol=0.03)
    np.testing.assert_allclose(float(s.var()), float(d.variance), rtol=0.06)
    post = d.posterior_foreground_probability(torch.tensor([0.0, 4.0, 600.0]))
    assert float(post[0]) < 0.01 and float(post[2]) > 0.99  # counts decide the component


def test_nb_mixture_gradients_finite_at_extremes():
    y = torch.tensor([0.0, 1.0, 1e5, 1e5])
    lm1 = torch.tensor([-30.0, 40.0, -5.0, 12.0], requires_grad=True)
    lm2 = (lm1 + torch.tensor([0.0, 30.0, 60.0, 0.5])).detach().requires_grad_(True)
    lt = torch.tensor([-8.0, 20.0, 0.0, 60.0], requires_grad=True)
    w = torch.tensor([50.0, -50.0, 0.0, 3.0], requires_grad=True)
    ll = log_nb_mixture(y, lm1, lm2, lt, w)
    assert bool(torch.isfinite(ll).all())
    ll.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (lm1, lm2, lt, w))


# ---------------------------------------------------------------------------------------------------- module
def _minibatch(n=24, genes=30, proteins=5, seed=0, protein_level=200.0):
    g = torch.Generator().manual_seed(seed)
    rna = torch.poisson(torch.rand(n, genes, generator=g) * 4, generator=g)
    prot = torch.poisson(torch.rand(n, proteins, generator=g) * protein_level, generator=g)
    cat = torch.tensor([[i % 2] for i in range(n)])
    return torch.cat([rna, prot], 1), cat


def test_module_masked_protein_leaves_the_loss_unchanged():
    torch.manual_seed(0)
    mask = np.ones((2, 5), np.float32)
    mask[1, 3] = 0  # protein 3 is not measured in batch 1
    m = RNAProteinModule(30, 5, n_batch=2, protein_batch_mask=mask).eval()
    x, cat = _minibatch()
    x2 = x.clone()
    x2[cat[:, 0] == 1, 30 + 3] = 12345.0  # whatever the counts of a missing protein, nothing changes
    outs = []
    for xx in (x, x2):
        torch.manual_seed(1)
        outs.append(m(xx, cat))
    for k in ("loss", "reconstruction_loss_protein", "kl_background", "kl_z"):
        torch.testing.assert_close(getattr(outs[0], k), getattr(outs[1], k))
    x3 = x.clone()
    x3[cat[:, 0] == 0, 30 + 3] = 12345.0  # measured in batch 0: the loss changes
    torch.manual_seed(1)
    assert not torch.allclose(m(x3, cat).reconstruction_loss_protein, outs[0].reconstruction_loss_protein)


def test_module_loss_parts_and_importance_weights():
    torch.manual_seed(0)
    m = RNAProteinModule(30, 5, n_batch=2)
    x, cat = _minibatch()
    out = m(x, cat, kl_weight=0.5)
    n = x.shape[0]
    for k in ("reconstruction_loss_rna", "reconstruction_loss_protein", "kl_z", "kl_background"):
        assert getattr(out, k).shape == (n,)
    torch.testing.assert_close(out.elbo, -(out.reconstruction_loss_rna + out.reconstruction_loss_protein
                                           + out.kl_z + out.kl_background))
    torch.testing.assert_close(out.loss, (out.reconstruction_loss + 0.5 * out.kl_local).mean())
    assert bool((out.kl_background >= 0).all()) and bool((out.kl_z >= 0).all())
    m.eval()
    with torch.no_grad():
        w = m.log_importance_weights(x, cat, None, 64)
        elbo = torch.stack([m(x, cat).elbo for _ in range(64)]).mean(0)
    assert set(w) == {"joint", "rna", "protein"} and w["joint"].shape == (64, n)
    iwae = torch.logsumexp(w["joint"], 0) - math.log(64)
    assert float((iwae - elbo).mean()) > 0  # the IWAE bound is above the ELBO on average
    # K = 1 weights are single-sample ELBO estimates: equal to the ELBO in expectation
    np.testing.assert_allclose(float(w["joint"].mean()), float(elbo.mean()), rtol=0.02)


def test_module_numerically_safe_for_1e5_protein_counts():
    torch.manual_seed(0)
    m = RNAProteinModule(30, 5, n_batch=2)
    x, cat = _minibatch(protein_level=1e5)
    x[:, 30] = 0.0
    x[0, 31] = 1e5
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(12):
        out = m(x, cat)
        opt.zero_grad()
        out.loss.backward()
        assert bool(torch.isfinite(out.loss))
        assert all(bool(torch.isfinite(p.grad).all()) for p in m.parameters() if p.grad is not None)
        opt.step()


def test_module_refuses_unsupported_settings():
    from cellvae.errors import CellvaeInputError

    with pytest.raises(CellvaeInputError, match="count gene likelihood"):
        RNAProteinModule(10, 3, gene_likelihood="normal")
    with pytest.raises(CellvaeInputError, match="observed RNA library"):
        RNAProteinModule(10, 3, use_observed_lib_size=False)
    with pytest.raises(CellvaeInputError, match="shape"):
        RNAProteinModule(10, 3, n_batch=2, protein_batch_mask=np.ones((1, 3)))
