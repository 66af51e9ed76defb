"""Seed API: CVAE, CVAE_NB, CVAE_ZINB torch modules; the scVI module's loss parts and KL warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellvae
from cellvae.vae.distributions import log_zinb_positive
from cellvae.vae.module import VAEModule
from cellvae.train import TrainingPlan, kl_weight_at


@pytest.mark.parametrize("cls", [cellvae.CVAE, cellvae.CVAE_NB, cellvae.CVAE_ZINB])
def test_cvae_modules_train_on_real_counts(cls, kang_small):
    torch.manual_seed(0)
    X = torch.from_numpy(kang_small.X.toarray())
    if cls is cellvae.CVAE:
        X = torch.log1p(X / X.sum(1, keepdim=True) * 1e4)
    cond = torch.nn.functional.one_hot(
        torch.from_numpy(kang_small.obs["condition"].cat.codes.to_numpy().astype(np.int64)), 2
    ).float()
    model = cls(input_dim=X.shape[1], latent_dim=5, condition_dim=2, hidden_dims=[64, 32])
    params = model(X[:8], cond[:8])
    assert params["z"].shape == (8, 5)
    if cls is cellvae.CVAE:
        assert params["mean"].shape == (8, X.shape[1])
    else:
        assert params["mu"].shape == (8, X.shape[1]) and params["theta"].shape == (X.shape[1],)
        torch.testing.assert_close(params["mu"].sum(1), X[:8].sum(1), rtol=1e-4, atol=1e-3)
    if cls is cellvae.CVAE_ZINB:
        assert params["zi_logits"].shape == (8, X.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(X, cond).item()
    for _ in range(30):
        loss = model.loss(X, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert np.isfinite(first) and loss.item() < first  # negative ELBO decreases
    model.eval()
    z = model(X, cond)["z"]
    torch.testing.assert_close(z, model.encode(X, cond)[0])  # eval mode: posterior mean


def test_cvae_condition_errors():
    m = cellvae.CVAE_NB(input_dim=4, latent_dim=2, condition_dim=3, hidden_dims=[8])
    x = torch.ones(5, 4)
    with pytest.raises(ValueError, match="condition tensor"):
        m(x)
    with pytest.raises(ValueError, match="expected condition_dim=3"):
        m(x, torch.ones(5, 2))
    unconditional = cellvae.CVAE(input_dim=4, latent_dim=2)
    assert unconditional(x)["z"].shape == (5, 2)


def test_module_loss_matches_hand_computation():
    torch.manual_seed(0)
    mod = VAEModule(n_input=6, n_latent=3, n_hidden=8)
    x = torch.poisson(torch.full((4, 6), 3.0))
    cat = torch.zeros(4, 1, dtype=torch.int64)
    mod.eval()
    inf = mod.inference(x, cat)
    gen = mod.generative(inf["z"], inf["library"], cat)
    out = mod.loss(x, inf, gen, kl_weight=0.5)
    px = gen["px"]
    recon = -log_zinb_positive(x, px.mu, px.theta, px.zi_logits).sum(-1)
    m, v = inf["qz_m"], inf["qz_v"]
    kl = (0.5 * (v + m**2 - 1 - torch.log(v))).sum(-1)
    torch.testing.assert_close(out.reconstruction_loss, recon)
    torch.testing.assert_close(out.kl_local, kl)
    torch.testing.assert_close(out.loss, (recon + 0.5 * kl).mean())
    torch.testing.assert_close(px.mu.sum(-1), x.sum(-1), rtol=1e-5, atol=1e-4)  # rho * library
    # several samples at once decode to a leading sample axis
    inf3 = mod.inference(x, cat, n_samples=3)
    gen3 = mod.generative(inf3["z"], inf3["library"], cat)
    assert inf3["z"].shape == (3, 4, 3) and gen3["px"].mu.shape == (3, 4, 6)


def test_kl_warmup_reaches_full_weight_within_run():
    assert kl_weight_at(0, 100) == 0.0 and kl_weight_at(50, 100) == 0.5 and kl_weight_at(500, 100) == 1.0
    assert kl_weight_at(3, 0) == 1.0
    for epochs in (1, 3, 10, 100, 400, 5000):
        warm = TrainingPlan(max_epochs=epochs).warmup_epochs
        assert warm == max(1, min(400, epochs // 2))  # full KL weight by the middle of the run
