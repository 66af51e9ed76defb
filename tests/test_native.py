"""The optional native (C) kernels equal the PyTorch code (issue 6: every optional speed-up has an equal-results
test): the fused log-softmax + NB / ZINB likelihood against the distribution classes, with gradients, for dense and
CSR counts, per-gene and per-batch dispersion and extreme parameters; the CSR encoder layer against its PyTorch
fallback; a whole training run with the kernels on and off; and the build / fallback logic of
:mod:`cellvae.native`."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import assert_same_training

from cellvae.native import build as native
from cellvae.native import ops
from cellvae.vae.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from cellvae.vae.losses import linear_softmax_count_log_prob_sum, softmax_count_log_prob_sum
from cellvae.vae.nn import sparse_linear

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture
def no_native(monkeypatch):
    """The PyTorch code paths only, for this test."""
    monkeypatch.setitem(native._state, "lib", None)
    monkeypatch.setitem(native._state, "reason", "disabled for the test")


@pytest.fixture(autouse=True)
def _require_native(request):
    if "no_native" not in request.fixturenames and not native.available():
        if HAS_CC:
            pytest.fail(f"a C compiler is present but the native kernels did not build: {native.reason_unavailable()}")
        pytest.skip("no C compiler: the native kernels are not built")


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _case(zinb, per_batch, seed=0, n=64, n_genes=300):
    """Counts, logits, library, log theta ((per_batch, n_genes) with rows, or (n_genes,) when 0) and zi logits."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, n_genes, generator=gen) ** 3 * 6, generator=gen)
    x[0, :4] = torch.tensor([33.0, 150.0, 5e4, 1.0])  # above the product form (32) and far above
    logits = (torch.randn(n, n_genes, generator=gen) * 2).requires_grad_()
    lib = (torch.rand(n, 1, generator=gen) * 3 + 5).requires_grad_()
    lt = torch.randn(max(per_batch, 1), n_genes, generator=gen) * 2
    lt[:, :3] = torch.tensor([-9.0, 14.0, 0.0])  # theta 1e-4 and 1.2e6 (near-Poisson)
    lt = (lt if per_batch else lt[0]).requires_grad_()
    rows = torch.randint(0, per_batch, (n,), generator=gen) if per_batch else None
    zi = (torch.randn(n, n_genes, generator=gen) * 3).requires_grad_() if zinb else None
    return x, logits, lib, lt, rows, zi


@pytest.mark.parametrize("layout", ["csr", "dense"])
@pytest.mark.parametrize("per_batch", [0, 3, 20])  # 20 theta rows: no count table (TABLE_MAX_ROWS = 16)
@pytest.mark.parametrize("zinb", [True, False])
def test_fused_likelihood_equals_distribution_classes(zinb, per_batch, layout):
    x, logits, lib, lt, rows, zi = _case(zinb, per_batch)
    inputs = [logits, lib, lt] + ([zi] if zinb else [])
    w = torch.randn(len(x), generator=torch.Generator().manual_seed(1))  # unequal per-cell gradients
    xin = x.to_sparse_csr() if layout == "csr" else x
    got = softmax_count_log_prob_sum(xin, logits, lib, lt, zi, rows)
    assert got.grad_fn is not None and "Native" in type(got.grad_fn).__name__  # the kernel ran
    g_got = torch.autograd.grad((got * w).sum(), inputs)
    mu = (lib + torch.log_softmax(logits, -1)).exp()
    theta = (lt[rows] if per_batch else lt).exp()
    dist = ZeroInflatedNegativeBinomial(mu, theta, zi) if zinb else NegativeBinomial(mu, theta)
    want = dist.log_prob(x).sum(-1)
    g_want = torch.autograd.grad((want * w).sum(), inputs)
    assert _rel(got.detach(), want.detach()) < 1e-5
    for a, b in zip(g_got, g_want):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


@pytest.mark.parametrize("layout", ["csr", "dense"])
@pytest.mark.parametrize("per_batch", [0, 3])
@pytest.mark.parametrize("zinb", [True, False])
def test_deep_counts_per_theta_terms_equal_the_per_count_path(zinb, per_batch, layout):
    """Deep data (most counts above the product form, some above the log-factorial table): a minibatch whose large
    counts outnumber the theta entries takes lgamma / digamma of theta once per gene; each cell alone does not. Both
    give the same per-cell log-likelihood and gradients, and match the distribution classes."""
    x, logits, lib, lt, rows, zi = _case(zinb, per_batch)
    gen = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(x.shape, generator=gen) * 400.0 + 1.0, generator=gen)
    x[0, :3] = torch.tensor([4096.0, 4097.0, 5e4])  # the last table entry, the first past it, far past it
    x[1, :2] = 0.0
    inputs = [logits, lib, lt] + ([zi] if zinb else [])
    xin = x.to_sparse_csr() if layout == "csr" else x
    got = softmax_count_log_prob_sum(xin, logits, lib, lt, zi, rows)
    assert "Native" in type(got.grad_fn).__name__
    g_got = torch.autograd.grad(got.sum(), inputs)
    for i in (0, 1, 5):  # one cell per call: fewer large counts than theta entries, the per-count path
        xi = x[i:i + 1].to_sparse_csr() if layout == "csr" else x[i:i + 1]
        one = softmax_count_log_prob_sum(xi, logits[i:i + 1], lib[i:i + 1], lt, zi[i:i + 1] if zinb else None,
                                         rows[i:i + 1] if per_batch else None)
        assert torch.allclose(one.detach(), got.detach()[i:i + 1], rtol=1e-6, atol=0.0)
        g_one = torch.autograd.grad(one.sum(), [logits, lib] + ([zi] if zinb else []))
        for a, b in zip(g_one, [g_got[0], g_got[1]] + ([g_got[3]] if zinb else [])):
            assert torch.allclose(a[i:i + 1], b[i:i + 1], rtol=1e-6, atol=1e-7)
    mu = (lib + torch.log_softmax(logits, -1)).exp()
    theta = (lt[rows] if per_batch else lt).exp()
    dist = ZeroInflatedNegativeBinomial(mu, theta, zi) if zinb else NegativeBinomial(mu, theta)
    want = dist.log_prob(x).sum(-1)
    g_want = torch.autograd.grad(want.sum(), inputs)
    assert _rel(got.detach(), want.detach()) < 1e-5
    for a, b in zip(g_got, g_want):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


@pytest.mark.parametrize("layout", ["csr", "dense"])
@pytest.mark.parametrize("per_batch", [0, 3])
@pytest.mark.parametrize("zinb", [True, False])
def test_output_layers_folded_into_the_kernel_equal_autograd(zinb, per_batch, layout):
    """linear_softmax_count_log_prob_sum (the decoder's output layers inside the kernel's autograd function) gives
    the values and gradients of nn.functional.linear followed by the fused likelihood, with unequal per-cell
    gradients; without the native kernels it is that code."""
    x, _, lib, lt, rows, _ = _case(zinb, per_batch)
    gen = torch.Generator().manual_seed(2)
    n_hidden = 16
    h = torch.relu(torch.randn(len(x), n_hidden, generator=gen)).requires_grad_()
    w = (torch.randn(x.shape[1], n_hidden, generator=gen) * 0.5).requires_grad_()
    b = torch.randn(x.shape[1], generator=gen).requires_grad_()
    zw = (torch.randn(x.shape[1], n_hidden, generator=gen) * 0.5).requires_grad_() if zinb else None
    zb = torch.randn(x.shape[1], generator=gen).requires_grad_() if zinb else None
    inputs = [t for t in (h, w, b, zw, zb, lib, lt) if t is not None]
    weights = torch.randn(len(x), generator=gen)
    xin = x.to_sparse_csr() if layout == "csr" else x
    got = linear_softmax_count_log_prob_sum(xin, h, w, b, lib, lt, zw, zb, rows)
    assert "LinearSoftmaxNBNative" in type(got.grad_fn).__name__
    g_got = torch.autograd.grad((got * weights).sum(), inputs)
    zi = torch.nn.functional.linear(h, zw, zb) if zinb else None
    want = softmax_count_log_prob_sum(xin, torch.nn.functional.linear(h, w, b), lib, lt, zi, rows)
    g_want = torch.autograd.grad((want * weights).sum(), inputs)
    assert _rel(got.detach(), want.detach()) < 1e-6
    for a, c in zip(g_got, g_want):
        assert a.shape == c.shape and _rel(a, c) < 1e-5
    with torch.no_grad():
        assert torch.equal(linear_softmax_count_log_prob_sum(xin, h, w, b, lib, lt, zw, zb, rows), got.detach())


def test_output_layers_folded_fallback(no_native):
    x, _, lib, lt, rows, zi = _case(True, 3)
    h = torch.randn(len(x), 8).requires_grad_()
    w, zw = torch.randn(x.shape[1], 8), torch.randn(x.shape[1], 8)
    got = linear_softmax_count_log_prob_sum(x.to_sparse_csr(), h, w, None, lib, lt, zw, None, rows)
    assert "Native" not in type(got.grad_fn).__name__
    want = softmax_count_log_prob_sum(x, h @ w.t(), lib, lt, h @ zw.t(), rows)
    assert _rel(got.detach(), want.detach()) < 1e-6


def test_fused_likelihood_without_gradients_and_nonfinite_logits():
    x, logits, lib, lt, rows, zi = _case(True, 0)
    with torch.no_grad():
        ll = softmax_count_log_prob_sum(x.to_sparse_csr(), logits, lib, lt, zi)
        bad = logits.clone()
        bad[3, 7] = float("nan")
        ll_bad = softmax_count_log_prob_sum(x.to_sparse_csr(), bad, lib, lt, zi)
    assert ll.requires_grad is False and torch.isfinite(ll).all()
    assert torch.isnan(ll_bad[3]) and torch.isfinite(ll_bad[torch.arange(len(x)) != 3]).all()


def test_fused_likelihood_fallback_is_the_same(no_native):
    """Without the kernels, the same function gives the same values (the PyTorch code)."""
    x, logits, lib, lt, rows, zi = _case(True, 3)
    got = softmax_count_log_prob_sum(x.to_sparse_csr(), logits, lib, lt, zi, rows)
    assert "Native" not in type(got.grad_fn).__name__
    theta = lt[rows].exp()
    want = ZeroInflatedNegativeBinomial((lib + torch.log_softmax(logits, -1)).exp(), theta, zi).log_prob(x).sum(-1)
    assert _rel(got.detach(), want.detach()) < 1e-5


def _linear_case():
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(50, 300, generator=gen) ** 6 * 4, generator=gen).to_sparse_csr()
    w = torch.randn(300, 20, generator=gen).t().requires_grad_()  # (n_out, n_in) view of (n_in, n_out), as the Encoder
    b = torch.randn(20, generator=gen).requires_grad_()
    g = torch.randn(50, 20, generator=gen)
    y = sparse_linear(x, w, b)
    dw, db = torch.autograd.grad((y * g).sum(), [w, b])
    return y.detach(), dw, db


def test_sparse_linear_native_equals_fallback(monkeypatch):
    got = _linear_case()
    monkeypatch.setitem(native._state, "lib", None)
    want = _linear_case()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[1].stride() == (1, 20)  # the weight's column-major layout: no transposing copy


def test_training_with_and_without_native_kernels_same_weights(train_pbmc_small, monkeypatch):
    with_native = train_pbmc_small()
    monkeypatch.setitem(native._state, "lib", None)
    assert_same_training(with_native, train_pbmc_small())


def test_disabled_by_environment(monkeypatch, no_native):
    monkeypatch.delitem(native._state, "lib")
    monkeypatch.setenv("CELLVAE_NATIVE", "0")
    assert native.library() is None and not native.available()
    assert "CELLVAE_NATIVE" in native.reason_unavailable()


def test_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, no_native, caplog):
    """A source that does not compile gives None and a reason, never an exception; with a compiler present that is a
    WARNING naming the slowdown; nothing is left in the cache but finished libraries."""
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.delitem(native._state, "lib")
    monkeypatch.setattr(native, "_SOURCE", bad)
    monkeypatch.setenv("CELLVAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CELLVAE_NATIVE", raising=False)
    with caplog.at_level("INFO", logger="cellvae"):
        assert native.library() is None
    assert "failed" in native.reason_unavailable()
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warned and "times as long" in warned[0].getMessage()
    cache = tmp_path / "cache" / "native"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_missing_compiler_is_info_only(monkeypatch, tmp_path, no_native, caplog):
    monkeypatch.delitem(native._state, "lib")
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.delenv("CELLVAE_NATIVE", raising=False)
    with caplog.at_level("INFO", logger="cellvae"):
        assert native.library() is None
    assert "compiler" in native.reason_unavailable()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_build_into_cache_dir(monkeypatch, tmp_path):
    """The library is compiled into $CELLVAE_CACHE_DIR/native under its build key and the hash of its own bytes,
    and reused from there."""
    monkeypatch.setenv("CELLVAE_CACHE_DIR", str(tmp_path))
    lib = native._build()
    files = list((tmp_path / "native").glob("fastpath-*.so"))
    assert len(files) == 1 and hasattr(lib, "cv_nb_loglik")
    mtime = files[0].stat().st_mtime_ns
    native._build()
    assert files[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert list((tmp_path / "native").iterdir()) == files  # no temporary leftovers


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip"])
def test_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, damage):
    """A truncated, emptied or altered library in the cache is never loaded (loading a truncated one killed every
    later run with SIGBUS): its bytes no longer match the hash in its name, so it is deleted and built again. Each
    run is a fresh process, as in use (a library mapped by this process must not be rewritten under it)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CELLVAE_CACHE_DIR": str(tmp_path)}
    run = [sys.executable, "-c", "from cellvae.native import build, ops; import torch; "
           "assert build.library() is not None, build.reason_unavailable(); "
           "print(ops.all_finite([torch.ones(3)]))"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and first.stdout.strip() == "True", first.stderr
    (f,) = (tmp_path / "native").glob("fastpath-*.so")
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 3])
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        f.write_bytes(data[:4096] + bytes([data[4096] ^ 1]) + data[4097:])
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == "True", again.stderr
    (g,) = (tmp_path / "native").glob("fastpath-*.so")
    assert g.read_bytes() == data  # rebuilt (gcc is deterministic: the same bytes under the same name)


def test_cache_writable_by_others_is_not_used(monkeypatch, tmp_path, caplog):
    shared = tmp_path / "shared"
    (shared / "native").mkdir(parents=True)
    (shared / "native").chmod(0o777)
    monkeypatch.setenv("CELLVAE_CACHE_DIR", str(shared))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "private-tmp"))
    (tmp_path / "private-tmp").mkdir()
    with caplog.at_level("WARNING", logger="cellvae"):
        native._build()
    assert any("writable by other users" in r.getMessage() for r in caplog.records)
    assert not list((shared / "native").glob("*.so"))
    assert list((tmp_path / "private-tmp").glob("cellvae-native-*/fastpath-*.so"))


@pytest.mark.parametrize("log_theta", [6.0, 18.0, 25.0, 35.0])
def test_large_theta_and_large_counts_match_float64(log_theta):
    """Near-Poisson genes (theta up to 1.6e15) with counts above the product form: the native kernel and the
    PyTorch fast path both match the float64 distribution class (whose lgamma difference is the Stirling form)."""
    n_genes = 6
    x = torch.tensor([[40.0, 1000.0, 3.0, 0.0, 33.0, 5e4]])
    logits = torch.zeros(1, n_genes, requires_grad=True)
    lib = x.sum().log().view(1, 1)
    lt = torch.full((n_genes,), log_theta, requires_grad=True)
    mu = (lib + torch.log_softmax(logits, -1)).double().exp()
    ref = NegativeBinomial(mu, lt.double().exp()).log_prob(x.double()).sum()
    (g_ref,) = torch.autograd.grad(NegativeBinomial((lib + torch.log_softmax(logits, -1)).double().exp(),
                                                    lt.double().exp()).log_prob(x.double()).sum(), [lt])
    for use in (True, False):
        saved = native._state.get("lib")
        if not use:
            native._state["lib"] = None
        try:
            got = softmax_count_log_prob_sum(x.to_sparse_csr(), logits, lib, lt)
            (g,) = torch.autograd.grad(got.sum(), [lt])
        finally:
            native._state["lib"] = saved
        assert abs(got.item() - ref.item()) < 1e-4 * abs(ref.item()) + 1e-2, (use, got.item(), ref.item())
        assert (g.double() - g_ref).abs().max() < 1e-3 * g_ref.abs().max() + 1e-2, (use, g, g_ref)


def test_bad_inputs_raise_instead_of_reaching_the_kernel():
    """Inputs the kernel would trust (shapes, theta rows, non-negative counts) are checked first: the PyTorch code
    runs and raises, nothing reads or writes out of bounds."""
    x, logits, lib, lt, rows, zi = _case(True, 3)
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        softmax_count_log_prob_sum(x[:, :10].contiguous().to_sparse_csr(), logits, lib, lt, zi, rows)
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        softmax_count_log_prob_sum(x[:, :10].contiguous(), logits, lib, lt, zi, rows)
    with pytest.raises((RuntimeError, IndexError)):
        softmax_count_log_prob_sum(x, logits, lib, lt, zi, rows + 5000)
    bad = x.clone()
    bad[0, 5] = -3.0
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        softmax_count_log_prob_sum(bad.to_sparse_csr(), logits, lib, lt, zi, rows)
    w = torch.randn(20, 300).t()  # column-major (20 outputs, 300 inputs)
    with pytest.raises(RuntimeError):
        sparse_linear(torch.ones(4, 310).to_sparse_csr(), w, None)


def _post(p: float, seed: int = 0):
    """FCLayers' ``BatchNorm1d -> ReLU [-> Dropout]`` with non-trivial affine weights, in training mode."""
    torch.manual_seed(seed)
    post = torch.nn.Sequential(torch.nn.BatchNorm1d(96, momentum=0.01, eps=1e-3), torch.nn.ReLU(),
                               *([torch.nn.Dropout(p)] if p else []))
    with torch.no_grad():
        post[0].weight.uniform_(0.5, 1.5)
        post[0].bias.uniform_(-0.5, 0.5)
        post[0].running_mean.uniform_(-1, 1)
        post[0].running_var.uniform_(0.5, 2)
    return post.train()


def _fused_equals_modules(fused_fn, found, ref, x: torch.Tensor, p: float):
    """Run ``fused_fn(x, *found)`` and the modules ``ref`` (norm -> ReLU, no dropout) times the fused path's keep
    flags, rescaled, on copies of x with the same seed; assert equal outputs and input gradients (1e-5) and return
    the keep flags (x's shape)."""
    from cellvae.vae.nn import dropout_keep

    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    y1 = fused_fn(x1, *found)
    torch.manual_seed(5)
    seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist() if p else [0, 0]
    keep = dropout_keep(x.numel(), p, seeds).view(x.shape)
    y2 = torch.where(keep, ref(x2) / (1 - p), 0.0)
    g = torch.randn(x.shape)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    return keep


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("use_native", [True, False])
def test_bn_relu_dropout_equals_the_modules(p, use_native, monkeypatch):
    """The fused batch norm + ReLU + dropout of FCLayers (native or its torch fallback) gives the outputs, input and
    parameter gradients, running statistics and batch count of the three torch modules, for the same dropout mask
    (the modules' output times the fused path's keep flags, rescaled)."""
    from cellvae.vae.nn import _fusable_post, bn_relu_dropout

    if not use_native:
        monkeypatch.setitem(native._state, "lib", None)
    fused, ref = _post(p), _post(0.0)
    x = torch.randn(70, 96) * 3 + 1
    x[:, 0] = -5.0  # a channel that ReLU zeroes after normalisation only where below its mean (all equal: 0)
    found = _fusable_post(fused, x)
    assert found is not None and found[0] is fused[0] and found[1] == p
    keep = _fused_equals_modules(bn_relu_dropout, found, ref, x, p)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(fused[0], name).grad, getattr(ref[0], name).grad, rtol=1e-5, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused[0], name), getattr(ref[0], name), rtol=1e-6, atol=1e-6)
    if p:
        assert abs(keep.float().mean().item() - (1 - p)) < 4 * ((p * (1 - p) / x.numel()) ** 0.5)
    xn = x.clone()
    xn[5, 7] = float("nan")  # NaN propagates through the column's statistics and ReLU keeps it, as the modules
    found_n = _fusable_post(_post(p), xn)
    torch.manual_seed(5)
    yn = bn_relu_dropout(xn, *found_n)
    with torch.no_grad():
        assert torch.equal(torch.isnan(yn), torch.isnan(torch.where(keep, _post(0.0)(xn) / (1 - p), 0.0)))


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("use_native", [True, False])
def test_ln_relu_dropout_equals_the_modules(p, use_native, monkeypatch):
    """The fused layer norm + ReLU + dropout of FCLayers with ``use_layer_norm`` (native or its torch fallback) gives
    the outputs and input gradients of the three torch modules for the same dropout mask, a constant row (zero
    variance) and a row ReLU zeroes almost entirely included."""
    from cellvae.vae.nn import _fusable_post, ln_relu_dropout

    if not use_native:
        monkeypatch.setitem(native._state, "lib", None)
    ln = torch.nn.LayerNorm(96, elementwise_affine=False)
    fused = torch.nn.Sequential(ln, torch.nn.ReLU(), *([torch.nn.Dropout(p)] if p else [])).train()
    ref = torch.nn.Sequential(torch.nn.LayerNorm(96, elementwise_affine=False), torch.nn.ReLU())
    torch.manual_seed(0)
    x = torch.randn(70, 96) * 3 + 1
    x[3] = 2.0
    x[4, 1:] = -1.0
    x1 = x.clone().requires_grad_()
    found = _fusable_post(fused, x1)
    assert found is not None and found[0] is ln and found[1] == p
    keep = _fused_equals_modules(ln_relu_dropout, found, ref, x, p)
    xn = x.clone()
    xn[5, 7] = float("nan")  # a NaN stays NaN (ReLU keeps it, as torch.relu) where the mask keeps it
    torch.manual_seed(5)
    yn = ln_relu_dropout(xn, *found)
    with torch.no_grad():
        assert torch.equal(torch.isnan(yn), torch.isnan(torch.where(keep, ref(xn) / (1 - p), 0.0)))
    # not fused: an affine layer norm, a norm over another width, no columns, evaluation mode
    assert _fusable_post(torch.nn.Sequential(torch.nn.LayerNorm(96), torch.nn.ReLU()).train(), x1) is None
    assert _fusable_post(torch.nn.Sequential(torch.nn.LayerNorm(95, elementwise_affine=False),
                                             torch.nn.ReLU()).train(), x1) is None
    assert _fusable_post(torch.nn.Sequential(torch.nn.LayerNorm(0, elementwise_affine=False),
                                             torch.nn.ReLU()).train(), torch.ones(3, 0)) is None
    assert _fusable_post(fused.eval(), x1) is None


def test_layer_norm_training_with_and_without_native_kernels_same_elbo(train_pbmc_small, monkeypatch):
    """scArches' layer-norm settings (layer norm, no batch norm, dropout 0.2, 2 layers) train to the same ELBO
    history with the fused native layer norm as with its torch fallback (the same dropout masks)."""
    kw = dict(use_layer_norm="both", use_batch_norm="none", dropout_rate=0.2, n_layers=2)
    with_native = train_pbmc_small(**kw)
    monkeypatch.setitem(native._state, "lib", None)
    assert_same_training(with_native, train_pbmc_small(**kw))


def test_dropout_keep_flags_native_equal_torch_and_are_fair():
    """The keep flags of the C kernel equal the torch fallback's bit for bit; over many seeds the kept fraction of
    every element and the correlation between elements are those of independent Bernoulli(1 - p) draws."""
    from cellvae.vae.nn import _drop_threshold, dropout_keep

    assert native.library() is not None
    torch.manual_seed(0)
    masks = []
    for p in (0.1, 0.5, 0.0, 0.999):
        seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
        k = ops.dropout_keep(5000, _drop_threshold(p), seeds)
        assert torch.equal(k, dropout_keep(5000, p, seeds)), p
    for _ in range(400):
        masks.append(dropout_keep(64 * 32, 0.1, torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()))
    m = torch.stack(masks).double()  # (draws, elements)
    rate = m.mean(0)
    sd = (0.09 / 400) ** 0.5
    assert abs(rate.mean().item() - 0.9) < 4 * sd / (64 * 32) ** 0.5
    assert ((rate - 0.9).abs() < 5 * sd).all()
    c = torch.corrcoef(m[:, :200].T) - torch.eye(200, dtype=torch.float64)
    assert c.abs().max().item() < 0.25  # 19,900 pairs of 400 draws: |r| of independent pairs stays below ~0.22


def test_fclayers_fuse_in_training_only_and_refuse_one_cell():
    """FCLayers takes the fused path in training (same output as its modules with dropout 0) and its modules in
    eval mode; a one-cell training batch raises torch's batch-norm error, as without fusion."""
    from cellvae.vae.nn import FCLayers

    torch.manual_seed(0)
    layers = FCLayers(20, 16, n_hidden=16, dropout_rate=0.0)
    x = torch.randn(8, 20)
    fused = layers(x)
    by_modules = layers.post[0](layers.linears[0](x))
    torch.testing.assert_close(fused, by_modules, rtol=1e-5, atol=1e-5)
    layers.eval()
    torch.testing.assert_close(layers(x), layers.post[0](layers.linears[0](x)))
    layers.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layers(x[:1])


@pytest.mark.parametrize("use_native", [True, False])
def test_grads_finite(use_native, monkeypatch):
    from cellvae.train.optim import grads_finite

    if not use_native:
        monkeypatch.setitem(native._state, "lib", None)
    params = [torch.zeros(300, 7, requires_grad=True), torch.zeros(5, requires_grad=True),
              torch.zeros(3, requires_grad=True)]
    params[0].grad = torch.randn(300, 7)
    params[1].grad = torch.randn(5)  # params[2] has no gradient: skipped
    assert grads_finite(params)
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[0].grad[123, 4] = bad
        assert not grads_finite(params)
    params[0].grad[123, 4] = 1e30  # finite, even though its square is not
    assert grads_finite(params) == use_native
    assert grads_finite([torch.zeros(2, requires_grad=True)])


@pytest.mark.parametrize("n_out", [128, 64, 100, 7])
def test_sparse_linear_blocks_and_tail_equal_dense(n_out):
    """The register-blocked CSR kernels (64 outputs at a time, then the rest) and the CSC weight gradient equal
    dense products, with empty rows and empty columns in the minibatch."""
    gen = torch.Generator().manual_seed(1)
    dense = torch.poisson(torch.rand(33, 250, generator=gen) ** 4 * 3, generator=gen)
    dense[5] = 0.0
    dense[:, 17] = 0.0
    x = dense.to_sparse_csr()
    w = torch.randn(n_out, 250, generator=gen, requires_grad=True)
    b = torch.randn(n_out, generator=gen, requires_grad=True)
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    g = torch.randn(33, n_out, generator=gen)
    y = sparse_linear(x, w, b)
    y2 = torch.nn.functional.linear(dense, w2, b2)
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-5)
    assert (w.grad[:, 17] == 0).all()
