"""The joint RNA + protein model (totalVI class): the NB mixture against scipy, the module's masks and numerics, and
(below) the model on the small CITE-seq sets: shapes, masks for missing proteins, save/load, MuData input, the
refusals and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from scipy.special import logsumexp

from cellvae.settings import RNAProteinSettings
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


def test_nb_mixture_closed_form_gradient_equals_autograd():
    """The mixture's one-node closed-form backward equals autograd through the plain formula (float64, with
    broadcasting of a per-protein log theta), and passes torch's gradcheck."""
    from cellvae.vae.distributions import lgamma_ratio

    def plain(y, m1, m2, lt, w):
        theta = lt.exp()
        nb1 = -theta * F.softplus(m1 - lt) - y * F.softplus(lt - m1)
        nb2 = -theta * F.softplus(m2 - lt) - y * F.softplus(lt - m2)
        return lgamma_ratio(y, theta) - torch.lgamma(y + 1.0) + torch.logaddexp(nb1 - F.softplus(-w),
                                                                                 nb2 - F.softplus(w))

    g = torch.Generator().manual_seed(0)
    y = torch.poisson(torch.rand(9, 4, generator=g, dtype=torch.float64) * 500, generator=g)
    y[0] = torch.tensor([0.0, 1.0, 1e5, 3e4], dtype=torch.float64)
    m1 = torch.randn(9, 4, generator=g, dtype=torch.float64) * 2 + 3
    params = [m1, m1 + torch.rand(9, 4, generator=g, dtype=torch.float64) * 4,
              torch.randn(4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64) * 4]
    grads = []
    for fn in (log_nb_mixture, plain):
        ps = [t.clone().requires_grad_(True) for t in params]
        out = fn(y, *ps)
        (out * torch.linspace(0.5, 2.0, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        grads.append([t.grad for t in ps])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    ps = [t.clone().requires_grad_(True) for t in params]
    assert torch.autograd.gradcheck(lambda *a: log_nb_mixture(y[1:], *[t[1:] if t.dim() == 2 else t for t in a]), ps)


def test_fused_protein_elbo_terms_equal_the_composed_form(monkeypatch):
    """Training's fused protein node (:func:`protein_elbo_terms`) and its C kernel (``protein_elbo_terms_native``)
    give protein_terms' log p(y | z, beta) and KL, and the same gradients for every parameter, within float
    tolerance: per-protein and per-batch dispersion, a masked protein, counts up to 1e5. The PyTorch node's backward
    passes torch's gradcheck in float64."""
    import cellvae.vae.totalvi as totalvi_module
    from cellvae.native import available
    from cellvae.vae.nb_mixture import protein_elbo_terms

    native = totalvi_module.protein_elbo_terms_native
    paths = ("composed", "fused", "native") if available() else ("composed", "fused")
    for dispersion in ("protein", "protein-batch"):
        torch.manual_seed(0)
        mask = np.ones((2, 5), np.float32)
        mask[1, 3] = 0
        m = RNAProteinModule(30, 5, n_batch=2, protein_batch_mask=mask,
                             settings=RNAProteinSettings(protein_dispersion=dispersion))
        with torch.no_grad():
            m.py_r.normal_(0.0, 1.0)
            m.background_prior_log_scale.normal_(0.0, 0.3)
        x, cat = _minibatch()
        y = x[:, 30:].clone()
        y[0] = torch.tensor([0.0, 1.0, 1e5, 3e4, 7.0])
        z = torch.randn(len(y), m.n_latent)
        outs, grads = [], []
        for path in paths:
            monkeypatch.setattr(totalvi_module, "protein_elbo_terms_native",
                                native if path == "native" else (lambda *a, **k: None))
            m.zero_grad()
            torch.manual_seed(3)
            ll, kl = m.protein_terms(y, z, cat)[:2] if path == "composed" else m._protein_loss_terms(y, z, cat, None)
            (torch.linspace(0.5, 2.0, len(y)) * (kl - ll)).sum().backward()
            outs.append((ll, kl))
            grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
        for other, other_grads in zip(outs[1:], grads[1:]):
            for a, b in zip(outs[0], other):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-3)
            assert other_grads.keys() == grads[0].keys() and "py_r" in grads[0]
            assert "background_prior_mean" in grads[0] and "background_prior_log_scale" in grads[0]
            for k in grads[0]:
                torch.testing.assert_close(other_grads[k], grads[0][k], rtol=1e-4, atol=1e-4, msg=k)

    g = torch.Generator().manual_seed(1)
    n, P = 6, 3
    y = torch.poisson(torch.rand(n, P, generator=g, dtype=torch.float64) * 300, generator=g)
    heads = torch.randn(n, 4 * P, generator=g, dtype=torch.float64).requires_grad_(True)
    lt = torch.randn(P, generator=g, dtype=torch.float64).requires_grad_(True)
    pm = (torch.randn(n, P, generator=g, dtype=torch.float64) + 3).requires_grad_(True)
    pls = (torch.randn(n, P, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    eps = torch.randn(n, P, generator=g, dtype=torch.float64)
    mask = torch.ones(n, P, dtype=torch.float64)
    mask[2, 1] = 0
    assert torch.autograd.gradcheck(lambda h, t, a, b: protein_elbo_terms(y, h, eps, t, a, b, mask, 1e-4),
                                    (heads, lt, pm, pls))


def test_native_protein_kernel_refuses_bad_input_before_touching_memory():
    """The C kernel of the protein terms checks batch codes, counts and shapes first and raises a clear error."""
    from cellvae.native import available, ops

    if not available():
        pytest.skip("native kernels not built on this machine")
    n, P, nb = 4, 3, 2
    args = dict(y=torch.ones(n, P), heads=torch.zeros(n, 4 * P), eps=torch.zeros(n, P), log_theta=torch.zeros(P),
                batch=torch.zeros(n, dtype=torch.int64), prior_mean=torch.zeros(nb, P),
                prior_log_scale=torch.zeros(nb, P), mask=torch.ones(nb, P), scale_eps=1e-4)
    ll, kl, deriv = ops.protein_mixture(**args)
    assert ll.shape == kl.shape == (n,) and deriv is None and torch.isfinite(ll).all()
    for key, bad, match in (("batch", torch.tensor([0, 1, 2, 0]), "batch code of cell 2"),
                            ("batch", torch.tensor([0, -1, 0, 0]), "batch code of cell 1"),
                            ("y", torch.tensor([[1.0, 2.0, -1.0]] * n), "non-negative integers: cell 0, protein 2"),
                            ("y", torch.tensor([[1.0, 2.5, 1.0]] * n), "non-negative integers: cell 0, protein 1"),
                            ("y", torch.full((n, P), float("nan")), "non-negative integers"),
                            ("heads", torch.zeros(n, 3 * P), "heads has shape"),
                            ("log_theta", torch.zeros(3, P), "log_theta has 3 rows"),
                            ("mask", torch.ones(nb, P, dtype=torch.float64), "mask must be a contiguous")):
        with pytest.raises(CellvaeInputError, match=match):
            ops.protein_mixture(**{**args, key: bad})
    deriv = ops.protein_mixture(**args, derivatives=True)[2]
    with pytest.raises(CellvaeInputError, match="batch code of cell 0"):
        ops.protein_mixture_backward(torch.full((n,), 5), deriv, torch.ones(n), torch.ones(n), 1, nb)

    # the minibatch split of the joint model: 2 cells, 3 genes + 2 proteins
    crow, col, val = torch.tensor([0, 3, 5]), torch.tensor([0, 2, 4, 1, 3]), torch.tensor([1.0, 2.0, 5.0, 3.0, 4.0])
    split = dict(crow=crow, col=col, val=val, n_genes=3, n_proteins=2, batch=torch.tensor([0, 1]),
                 mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]), scale_mode=0)
    g_crow, g_col, g_val, y, lib, enc = ops.joint_split(**split)
    assert g_crow.tolist() == [0, 2, 3] and g_col.tolist() == [0, 2, 1] and g_val.tolist() == [1.0, 2.0, 3.0]
    assert y.tolist() == [[0.0, 5.0], [4.0, 0.0]] and lib.view(-1).tolist() == [3.0, 3.0]
    torch.testing.assert_close(enc, torch.tensor([math.log1p(1.0), math.log1p(2.0), math.log1p(5.0 / 3.5),
                                                  math.log1p(3.0), math.log1p(4.0 / 5.0)]))
    for key, bad, match in (("col", torch.tensor([0, 2, 5, 1, 3]), "column index is out of range"),
                            ("col", torch.tensor([2, 0, 4, 1, 3]), "not strictly increasing"),
                            ("crow", torch.tensor([0, 3, 6]), "does not end at the number"),
                            ("batch", torch.tensor([0, 2]), "batch code of cell 1"),
                            ("val", torch.ones(5, dtype=torch.float64), "x.values must be")):
        with pytest.raises(CellvaeInputError, match=match):
            ops.joint_split(**{**split, key: bad})


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


@pytest.mark.parametrize("encoder_input", ["log1p", "log1p_cp10k", "log1p_mean"])
def test_module_sparse_minibatch_equals_dense(encoder_input, monkeypatch):
    """A CSR minibatch (the training loop's on sparse data) gives the dense one's loss, parts, gradients and
    latent within float tolerance, taken apart by the C kernel (``_native_split``) and by the PyTorch code: zero
    protein counts (not stored), an empty RNA row, a masked protein."""
    from cellvae.native import available

    torch.manual_seed(0)
    mask = np.ones((2, 5), np.float32)
    mask[1, 3] = 0
    m = RNAProteinModule(30, 5, n_batch=2, protein_batch_mask=mask, encoder_input=encoder_input)
    assert m.sparse_input
    x, cat = _minibatch()
    x[:, 30 + 1] = 0.0  # protein 1 never stored
    x[2, :30] = 0.0  # a cell without RNA counts
    x[3, 30:] = 0.0  # a cell without protein counts
    outs, grads = [], []
    native_split = type(m)._native_split
    for xx, split in ((x, True), (x.to_sparse_csr(), True), (x.to_sparse_csr(), False)):
        monkeypatch.setattr(type(m), "_native_split", native_split if split else (lambda self, *a: None))
        if split and xx.layout == torch.sparse_csr:
            assert (m._native_split(xx, cat) is not None) == available()
        m.zero_grad()
        torch.manual_seed(1)
        out = m(xx, cat)
        out.loss.backward()
        outs.append(out)
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    for other, other_grads in zip(outs[1:], grads[1:]):
        for k in ("loss", "reconstruction_loss_rna", "reconstruction_loss_protein", "kl_z", "kl_background"):
            torch.testing.assert_close(getattr(other, k), getattr(outs[0], k), rtol=1e-5, atol=1e-4)
        assert other_grads.keys() == grads[0].keys()
        for k in grads[0]:
            torch.testing.assert_close(other_grads[k], grads[0][k], rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    m.eval()
    with torch.no_grad():
        a, b = m.inference(x, cat), m.inference(x.to_sparse_csr(), cat)
    torch.testing.assert_close(a["qz_m"], b["qz_m"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["library"], b["library"])


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


# ----------------------------------------------------------------------------------------------------- model
import anndata as ad  # noqa: E402
import pandas as pd  # noqa: E402

import cellvae  # noqa: E402
from cellvae.data.protein import isotype_controls, mudata_to_anndata  # noqa: E402
from cellvae.errors import CellvaeInputError  # noqa: E402

from conftest import DATA_DIR, _read, _subset  # noqa: E402

FAST = dict(n_hidden=32, n_latent=6)  # small networks: these tests check behaviour, not fit quality
TRAIN = dict(max_epochs=3, batch_size=64, progress_bar=False, seed=0)


@pytest.fixture(scope="module")
def citeseq() -> ad.AnnData:
    """400 PBMCs of two 10x runs, 250 genes, 14 ADTs (obsm['protein_expression'])."""
    return _subset(_read("pbmc_citeseq_10x_400cells.h5ad"), 400, 250)


@pytest.fixture(scope="module")
def trained(citeseq):
    return cellvae.RNAProteinVAE(citeseq.copy(), batch_key="batch", **FAST).train(**TRAIN)


def _mudata(a: ad.AnnData, shuffle_prot: bool = False):
    import mudata

    prot = ad.AnnData(X=a.obsm["protein_expression"].to_numpy(np.float32),
                      obs=pd.DataFrame(index=a.obs_names.copy()),
                      var=pd.DataFrame(index=a.obsm["protein_expression"].columns.astype(str)))
    if shuffle_prot:
        prot = prot[np.random.default_rng(0).permutation(prot.n_obs)].copy()
    rna = ad.AnnData(X=a.X.copy(), obs=a.obs.copy(), var=a.var.copy())
    return mudata.MuData({"rna": rna, "prot": prot})


def test_model_shapes_and_outputs(trained, citeseq):
    m = trained
    n, g, p = citeseq.n_obs, citeseq.n_vars, citeseq.obsm["protein_expression"].shape[1]
    assert m.history["n_skipped_steps"] == 0
    assert m.get_latent_representation().shape == (n, 6)
    rna, prot = m.get_normalized_expression(library_size=1e4)
    assert rna.shape == (n, g) and prot.shape == (n, p) and list(prot.columns) == m.protein_names
    np.testing.assert_allclose(rna.sum(1), 1e4, rtol=1e-4)
    assert (prot.to_numpy() >= 0).all()
    r2, p2 = m.get_normalized_expression(gene_list=list(citeseq.var_names[:3]), protein_list=m.protein_names[:2],
                                         n_samples=3, return_numpy=True)
    assert r2.shape == (n, 3) and p2.shape == (n, 2)
    _, with_bg = m.get_normalized_expression(include_protein_background=True, return_numpy=True)
    assert (with_bg >= prot.to_numpy() - 1e-4).all()
    fg = m.get_protein_foreground_probability()
    assert fg.shape == (n, p) and ((fg >= 0) & (fg <= 1)).all().all()
    elbo = m.get_elbo(indices=m.validation_indices, modality="all", seed=0)
    assert set(elbo) == {"joint", "rna", "protein"} and all(np.isfinite(v) for v in elbo.values())
    assert elbo["joint"] < min(elbo["rna"], elbo["protein"])  # a joint log-probability is below each marginal
    ll = m.get_marginal_ll(indices=m.validation_indices, n_samples=20, modality="all", seed=0, return_mean=False)
    assert ll["protein"].shape == (len(m.validation_indices),)
    assert ll["joint"].mean() > elbo["joint"] - 1.0
    pp = m.posterior_predictive_sample(indices=np.arange(10), n_samples=2)
    assert pp["rna"].shape == (2, 10, g) and pp["protein"].shape == (2, 10, p)
    s = m.sample(7, covariates={"batch": "pbmc_5k_protein_v3"})
    assert s.shape == (7, g) and s.obsm["protein_expression"].shape == (7, p)
    assert (s.obs["batch"] == "pbmc_5k_protein_v3").all()


def test_differential_expression_genes_and_proteins(trained):
    de = trained.differential_expression(groupby="batch", group1="pbmc_10k_protein_v3", n_samples=200)
    prot = [p + "_protein" for p in trained.protein_names]
    assert set(prot) <= set(de.index) and len(de) == len(trained.spec.gene_names) + len(prot)
    for col in ("proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "lfc_mean", "lfc_median",
                "lfc_std", "raw_mean1", "raw_mean2", "non_zeros_proportion1", "raw_normalized_mean1",
                "is_de_fdr_0.05", "comparison", "group1", "group2"):
        assert col in de.columns
    assert de.loc[prot, "raw_normalized_mean1"].isna().all()
    genes = de.index[~de.index.isin(prot)]
    assert de.loc[genes, "raw_normalized_mean1"].notna().all()
    assert (de.loc[prot, "scale1"] >= 0.1).all()  # foreground intensity + protein_prior_count


def test_missing_protein_panels_are_masked(citeseq):
    a = citeseq.copy()
    df = a.obsm["protein_expression"].copy()
    in5k = (a.obs["batch"] == "pbmc_5k_protein_v3").to_numpy()
    df.loc[in5k, df.columns[2]] = 0.0  # a protein the 5k panel lacks (all zero)
    df.loc[in5k, df.columns[5]] = np.nan  # and one stored as missing
    a.obsm["protein_expression"] = df
    with pytest.warns(UserWarning, match="treated as not measured"):
        m = cellvae.RNAProteinVAE(a, batch_key="batch", **FAST)
    mask = m.protein_batch_mask
    assert not mask.loc["pbmc_5k_protein_v3", df.columns[2]] and not mask.loc["pbmc_5k_protein_v3", df.columns[5]]
    assert mask.loc["pbmc_10k_protein_v3"].all() and mask.to_numpy().sum() == mask.size - 2
    assert m.protein_info["masked"] == {"pbmc_5k_protein_v3": [df.columns[2], df.columns[5]]}
    m.train(**TRAIN)
    assert m.history["n_skipped_steps"] == 0 and np.isfinite(m.history["validation_elbo"]).all()
    assert np.isfinite(m.get_protein_foreground_probability().to_numpy()).all()  # masked proteins are imputed
    # zeros that are real: kept as measured
    m2 = cellvae.RNAProteinVAE(a, batch_key="batch", override_missing_proteins=True, **FAST)
    assert m2.protein_batch_mask.to_numpy().sum() == mask.size - 1  # the NaN one stays missing
    # NaN for part of a batch only: refused
    df.loc[df.index[0], df.columns[0]] = np.nan
    a.obsm["protein_expression"] = df
    with pytest.raises(CellvaeInputError, match="missing only for a whole batch"):
        cellvae.RNAProteinVAE(a, batch_key="batch")


def test_save_load_roundtrip(trained, citeseq, tmp_path):
    trained.save(tmp_path / "m")
    loaded = cellvae.CountVAE.load(tmp_path / "m", adata=citeseq)
    assert type(loaded) is cellvae.RNAProteinVAE and loaded.protein_names == trained.protein_names
    np.testing.assert_allclose(loaded.get_latent_representation(), trained.get_latent_representation(), atol=1e-6)
    np.testing.assert_allclose(loaded.get_protein_foreground_probability().to_numpy(),
                               trained.get_protein_foreground_probability().to_numpy(), atol=1e-6)
    pd.testing.assert_frame_equal(loaded.protein_batch_mask, trained.protein_batch_mask)
    assert loaded.validation_indices is not None and loaded.protein_info == trained.protein_info
    # a panel without one of the model's proteins is refused
    b = citeseq.copy()
    b.obsm["protein_expression"] = b.obsm["protein_expression"].iloc[:, 1:]
    with pytest.raises(CellvaeInputError, match="proteins are missing"):
        cellvae.RNAProteinVAE.load(tmp_path / "m", adata=b)


def test_mudata_input_equals_anndata(citeseq, tmp_path):
    a = citeseq.copy()
    ref = cellvae.RNAProteinVAE(a, batch_key="batch", **FAST).train(max_epochs=1, batch_size=64, progress_bar=False)
    md = _mudata(a, shuffle_prot=True)  # the protein modality in another cell order: joined by name
    m = cellvae.RNAProteinVAE(md, batch_key="batch", **FAST).train(max_epochs=1, batch_size=64, progress_bar=False)
    assert m.protein_names == ref.protein_names
    np.testing.assert_allclose(m.get_latent_representation(), ref.get_latent_representation(), atol=1e-5)
    np.testing.assert_allclose(m.get_latent_representation(md), ref.get_latent_representation(), atol=1e-5)
    m.save(tmp_path / "m")
    loaded = cellvae.RNAProteinVAE.load(tmp_path / "m", adata=md)
    np.testing.assert_allclose(loaded.get_latent_representation(), ref.get_latent_representation(), atol=1e-5)


def test_refusals(citeseq):
    a = citeseq.copy()
    with pytest.raises(CellvaeInputError, match="is not in adata.obsm"):
        cellvae.RNAProteinVAE(a, protein_key="adt")
    for bad, msg in ((-1.0, "negative values"), (2.5, "non-integer")):
        b = citeseq.copy()
        df = b.obsm["protein_expression"].copy()
        df.iloc[3, 1] = bad
        b.obsm["protein_expression"] = df
        with pytest.raises(CellvaeInputError, match=msg):
            cellvae.RNAProteinVAE(b)
    md = _mudata(a)
    md.mod["prot"] = md.mod["prot"][10:].copy()  # 10 cells without proteins
    md.update()
    with pytest.raises(CellvaeInputError, match="Mismatched cells between modalities"):
        cellvae.RNAProteinVAE(md)
    with pytest.raises(CellvaeInputError, match="no 'prot' modality"):
        import mudata

        cellvae.RNAProteinVAE(mudata.MuData({"rna": a}))
    with pytest.raises(CellvaeInputError, match="count gene likelihood"):
        cellvae.RNAProteinVAE(a, gene_likelihood="normal")
    with pytest.raises(CellvaeInputError, match="not proteins of the data"):
        cellvae.RNAProteinVAE(a, isotype_controls=["IgG9"])


def test_isotype_controls_and_large_counts():
    assert isotype_controls(["CD3", "IgG2a", "IgG1", "IgG2b", "CD45RA", "Mouse_IgG1_isotype", "TIGIT", "IgM",
                             "IgG1_control_TotalSeqB"]) == ["IgG2a", "IgG1", "IgG2b", "Mouse_IgG1_isotype",
                                                             "IgG1_control_TotalSeqB"]
    a = _subset(_read("pbmc_eccite_mimitou2019_500cells.h5ad"), 300, 200)
    df = a.obsm["protein_expression"].copy()
    df.iloc[:, 0] = np.round(df.iloc[:, 0] * 40 + 1e4)  # proteins of 1e4-1e5 counts (docs/inputs.md)
    df.iloc[0, 1] = 1e5
    df["Mouse_IgG1_isotype"] = np.random.default_rng(0).poisson(5.0, a.n_obs).astype(float)
    a.obsm["protein_expression"] = df
    m = cellvae.RNAProteinVAE(a, **FAST)
    assert m.protein_info["background_prior"] == "isotype"
    assert {"IgG1", "IgG2a", "Mouse_IgG1_isotype"} <= set(m.protein_info["isotype_controls"])
    m.train(**TRAIN)
    assert m.history["n_skipped_steps"] == 0 and np.isfinite(m.history["train_elbo"]).all()
    assert np.isfinite(m.get_marginal_ll(n_samples=5)).all()


def test_cli_fit_protein_key_and_h5mu(citeseq, tmp_path):
    """``cellvae fit DATA --protein-key ...`` and a .h5mu file: the joint model, the denoised protein in obsm, the
    report's protein panels; a missing key is refused before training."""
    import json

    from click.testing import CliRunner

    from cellvae.cli import main

    small = citeseq[:200].copy()
    small.obs["cell_type"] = np.where(np.arange(small.n_obs) % 2 == 0, "a", "b")
    h5ad = tmp_path / "cite.h5ad"
    small.write_h5ad(h5ad)
    args = ["--max-epochs", "2", "--batch-size", "64", "--n-hidden", "32", "--quiet"]
    r = CliRunner().invoke(main, ["fit", str(h5ad), "--out", str(tmp_path / "o"), "--protein-key",
                                  "protein_expression", "--labels-key", "cell_type", *args])
    assert r.exit_code == 0, r.output
    out = tmp_path / "o"
    res = ad.read_h5ad(out / "cellvae.h5ad")
    assert res.obsm["cellvae_protein_denoised"].shape == (200, 14)
    assert res.obsm["cellvae_protein_foreground_probability"].shape == (200, 14)
    for f in ("protein_umap.png", "protein_raw_vs_denoised.png", "protein_foreground_probability.png"):
        assert (out / "figures" / f).stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "<h2>Proteins</h2>" in html and "foreground probability" in html
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["n_proteins"] == 14 and np.isfinite(metrics["validation_elbo_protein"])
    assert type(cellvae.CountVAE.load(out / "model")) is cellvae.RNAProteinVAE
    # the joint model's own default gene likelihood (nb, as TOTALVI), not CountVAE's zinb; a given one is kept
    assert cellvae.CountVAE.load(out / "model").settings.gene_likelihood == "nb"
    assert json.loads((out / "metrics.json").read_text())["settings"]["gene_likelihood"] == "nb"
    r = CliRunner().invoke(main, ["fit", str(h5ad), "--out", str(tmp_path / "o4"), "--protein-key",
                                  "protein_expression", "--gene-likelihood", "zinb", *args])
    assert r.exit_code == 0, r.output
    assert cellvae.CountVAE.load(tmp_path / "o4" / "model").settings.gene_likelihood == "zinb"
    assert any(str(g).endswith("_protein") for g in pd.read_csv(out / "markers.csv")["gene"])
    r = CliRunner().invoke(main, ["fit", str(h5ad), "--out", str(tmp_path / "o3"), "--protein-key", "adt", *args])
    assert r.exit_code == 2 and "--protein-key 'adt' is not in obsm" in r.output
    # a .h5mu file is read as its RNA with the prot modality in obsm, and selects the joint model by itself (here
    # refused with --semi-supervised before any training: not available for the joint model)
    mu = tmp_path / "cite.h5mu"
    _mudata(small).write_h5mu(mu)
    got = cellvae.read_data(mu)
    np.testing.assert_array_equal(got.obsm["protein_expression"].to_numpy(),
                                  small.obsm["protein_expression"].to_numpy())
    r = CliRunner().invoke(main, ["fit", str(mu), "--out", str(tmp_path / "o2"), "--semi-supervised",
                                  "--labels-key", "cell_type", *args])
    assert r.exit_code == 2 and "joint RNA + protein model" in r.output


def test_default_kl_warmup_is_capped_at_50_epochs(citeseq, monkeypatch):
    """RNAProteinVAE's default warm-up is half of max_epochs, at most KL_WARMUP_CAP (50); CountVAE keeps its 400;
    an explicit n_epochs_kl_warmup is kept."""
    import cellvae.models.count_vae as cv

    seen = []

    def capture(module, data, tr, va, settings, **kw):
        seen.append(settings)
        raise RuntimeError("captured")

    monkeypatch.setattr(cv, "train_module", capture)
    cases = [(cellvae.RNAProteinVAE, {"max_epochs": 400}, 50), (cellvae.RNAProteinVAE, {"max_epochs": 60}, 30),
             (cellvae.RNAProteinVAE, {"max_epochs": 400, "n_epochs_kl_warmup": 120}, 120),
             (cellvae.CountVAE, {"max_epochs": 400}, 200)]
    for cls, kw, want in cases:
        with pytest.raises(RuntimeError, match="captured"):
            cls(citeseq.copy(), **FAST).train(progress_bar=False, **kw)
        assert seen[-1].warmup_epochs == want, (cls.__name__, kw)
    assert cellvae.RNAProteinVAE.KL_WARMUP_CAP == 50 and cellvae.CountVAE.KL_WARMUP_CAP is None
