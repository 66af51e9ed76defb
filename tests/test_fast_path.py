"""The fast training path equals the reference likelihoods: same loss to 1e-5 relative on a fixed batch and the same
gradients (issue 6: every optional speed-up has an equal-results test)."""

from __future__ import annotations

import pytest
import torch

from cellvae.vae.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial
from cellvae.vae.losses import count_log_prob_sum
from cellvae.vae.module import VAEModule


def _counts(seed=0, n=64, g=300):
    gen = torch.Generator().manual_seed(seed)
    rate = torch.rand(n, g, generator=gen) ** 3 * 8
    x = torch.poisson(rate, generator=gen)
    x[0, :5] = torch.tensor([33.0, 40.0, 150.0, 1000.0, 5e4])  # above the table (32) and far above
    return x


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["dense", "sparse_csr"])  # sparse: the zero/non-zero split (_NBSparse)
@pytest.mark.parametrize("lik", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("per_batch", [False, True])
def test_count_log_prob_sum_equals_distributions(lik, per_batch, layout):
    if lik == "poisson" and per_batch:
        pytest.skip("Poisson has no dispersion")
    x = _counts()
    x_in = x.to_sparse_csr() if layout == "sparse_csr" else x
    n, g = x.shape
    gen = torch.Generator().manual_seed(1)
    log_mu = (torch.randn(n, g, generator=gen) * 2).requires_grad_()
    rows = torch.arange(n) % 3 if per_batch else None
    log_theta = (torch.randn(3, g, generator=gen) * 2 if per_batch else torch.randn(g, generator=gen) * 2)
    log_theta[..., 0] = 12.0  # theta ~ 1.6e5: far in the Poisson-like range
    log_theta.requires_grad_()
    zi = (torch.randn(n, g, generator=gen) * 2).requires_grad_()
    lt = log_theta[rows] if per_batch else log_theta
    if lik == "zinb":
        fast = count_log_prob_sum(x_in, log_mu, log_theta, zi, theta_rows=rows)
        ref = ZeroInflatedNegativeBinomial(log_mu.exp(), lt.exp(), zi).log_prob(x).sum(-1)
        inputs = [log_mu, log_theta, zi]
    elif lik == "nb":
        fast = count_log_prob_sum(x_in, log_mu, log_theta, theta_rows=rows)
        ref = NegativeBinomial(log_mu.exp(), lt.exp()).log_prob(x).sum(-1)
        inputs = [log_mu, log_theta]
    else:
        fast = count_log_prob_sum(x_in, log_mu)
        ref = Poisson(log_mu.exp()).log_prob(x).sum(-1)
        inputs = [log_mu]
    assert fast.shape == (n,)
    assert _rel(fast, ref) < 1e-5
    w = torch.rand(n, generator=gen)  # a non-uniform upstream gradient
    g_fast = torch.autograd.grad((fast * w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(g_fast, g_ref):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("lik,dispersion", [("zinb", "gene"), ("nb", "gene-batch"), ("poisson", "gene")])
def test_module_fast_path_same_loss_and_gradients(kang_small, lik, dispersion):
    x = torch.as_tensor(kang_small.X.toarray() if hasattr(kang_small.X, "toarray") else kang_small.X,
                        dtype=torch.float32)[:128]
    cat = (torch.arange(len(x)) % 2).view(-1, 1)
    results = []
    for fast in (True, False):
        torch.manual_seed(0)
        m = VAEModule(x.shape[1], n_batch=2, gene_likelihood=lik, dispersion=dispersion, use_fast_likelihood=fast)
        assert m.fast_likelihood == fast
        torch.manual_seed(1)
        out = m(x, cat, None, kl_weight=0.7)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (o_fast, g_fast), (o_ref, g_ref) = results
    assert abs(o_fast.loss.item() - o_ref.loss.item()) <= 1e-5 * abs(o_ref.loss.item())
    torch.testing.assert_close(o_fast.reconstruction_loss, o_ref.reconstruction_loss, rtol=1e-5, atol=1e-3)
    # Same gradients: the whole gradient vector to 1e-5 relative, each parameter to 1e-4 of its scale (gradients
    # that are zero in exact arithmetic, such as a bias before batch norm, are float noise in both paths).
    keys = sorted(g_fast)
    flat_fast = torch.cat([g_fast[k].flatten() for k in keys])
    flat_ref = torch.cat([g_ref[k].flatten() for k in keys])
    assert (flat_fast - flat_ref).norm() <= 1e-5 * flat_ref.norm()
    floor = 1e-6 * flat_ref.abs().max()
    for k in keys:
        assert (g_fast[k] - g_ref[k]).abs().max() <= 1e-4 * g_ref[k].abs().max() + floor, k
    # The reference also differentiates the unused zero-inflation head of NB/Poisson (zero gradients).
    for k in set(g_ref) - set(g_fast):
        assert k.startswith("decoder.dropout_decoder") and float(g_ref[k].abs().max()) == 0.0


def test_gene_cell_dispersion_and_normal_use_the_reference_path():
    assert not VAEModule(20, dispersion="gene-cell").fast_likelihood
    assert not VAEModule(20, gene_likelihood="normal").fast_likelihood
    assert VAEModule(20).fast_likelihood


def test_fused_adam_same_weights_as_multi_tensor_adam(kang_small):
    from cellvae.train import TrainingPlan, make_optimizer

    x = torch.as_tensor(kang_small.X.toarray(), dtype=torch.float32)[:128]
    cat = torch.zeros(len(x), 1, dtype=torch.int64)
    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        m = VAEModule(x.shape[1])
        opt = make_optimizer(list(m.parameters()), TrainingPlan(fused_optimizer=fused))
        assert bool(opt.defaults.get("fused")) == fused
        for _ in range(5):
            torch.manual_seed(1)
            out = m(x, cat, None, kl_weight=0.5)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)
