"""Evaluation metrics: ELBO parts, IWAE marginal log-likelihood, clustering agreement, the evaluate command."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import _subset

from cellvae import CellvaeInputError, CountVAE
from cellvae.cli import main
from cellvae.metrics import (
    clustering_agreement,
    compute_elbo,
    compute_marginal_ll,
    leiden_n_clusters,
    scib_available,
    scib_benchmark,
)


@pytest.fixture(scope="module")
def trained(zeisel):
    """A small ZINB model trained briefly on 300 Zeisel cells x 200 genes (30 validation cells)."""
    m = CountVAE(_subset(zeisel, 300, 200), n_latent=5)
    m.train(max_epochs=20, batch_size=64, progress_bar=False, seed=0)
    return m


def test_elbo_parts_per_cell_match_the_training_loop_mean(trained):
    data, va = trained.prepared_data(), trained.validation_indices
    per_cell = compute_elbo(trained.module, data, va, seed=3)
    assert {k: v.shape for k, v in per_cell.items()} == {k: (len(va),) for k in per_cell}
    np.testing.assert_allclose(per_cell["elbo"], -(per_cell["reconstruction_loss"] + per_cell["kl_local"]))
    assert (per_cell["kl_local"] > 0).all() and (per_cell["elbo"] < 0).all()
    mean = compute_elbo(trained.module, data, va, return_mean=True, seed=3)  # train.evaluate_elbo, same draws
    for k, v in mean.items():
        assert math.isclose(v, float(per_cell[k].mean()), rel_tol=1e-5), k
    rec = trained.get_reconstruction_error(indices=va, seed=3)
    assert set(rec) == {"reconstruction_loss"} and math.isclose(rec["reconstruction_loss"], mean["reconstruction_loss"])


def test_iwae_is_above_the_elbo_and_grows_with_k(trained):
    va = trained.validation_indices
    elbo = trained.get_elbo(indices=va, seed=0)
    ll = {k: trained.get_marginal_ll(indices=va, n_samples=k, return_mean=True, seed=0) for k in (1, 10, 200)}
    assert abs(ll[1] - elbo) < 0.02 * abs(elbo)  # K = 1: an estimate of the ELBO itself
    assert elbo < ll[10] < ll[200] < 0, (elbo, ll)
    assert trained.module.training is False


def test_iwae_includes_the_latent_library_terms(zeisel):
    """With K = 1 and the same draws as the ELBO, log w - ELBO = log p(z) - log q(z|x) + KL_z + (the same for l):
    zero on average. Without the library terms it would be KL(q(l|x) || p(l)) on average."""
    m = CountVAE(_subset(zeisel, 300, 200), n_latent=5, use_observed_lib_size=False)
    m.train(max_epochs=10, batch_size=64, progress_bar=False, seed=0)
    mod, data = m.module, m.prepared_data()
    # one batch of all cells in both, so that both draw the same (z, l) per cell from the same seed
    elbo = compute_elbo(mod, data, batch_size=1024, seed=5)["elbo"]
    k1 = compute_marginal_ll(mod, data, n_samples=1, batch_size=1024, seed=5)
    with torch.no_grad():
        x, cat, cont = data.batch(torch.arange(data.n_cells))
        inf = mod.eval().inference(x, cat, cont)
        pm, pv = mod.library_log_means[cat[:, 0]], mod.library_log_vars[cat[:, 0]]
        qm, qv = inf["ql_m"][:, 0], inf["ql_v"][:, 0]
        kl_l = float((0.5 * (torch.log(pv / qv) + (qv + (qm - pm) ** 2) / pv - 1)).mean())
    assert kl_l > 2.0 and abs(float((k1 - elbo).mean())) < 0.1 * kl_l, (float((k1 - elbo).mean()), kl_l)
    assert m.get_marginal_ll(n_samples=50, return_mean=True, seed=1) > float(elbo.mean())


def test_iwae_converges_to_the_exact_marginal_likelihood(zeisel):
    """One latent dimension: log p(x) = log of the integral of p(x|z) N(z; 0, 1) dz, by quadrature."""
    m = CountVAE(_subset(zeisel, 300, 200), n_latent=1, gene_likelihood="nb")
    m.train(max_epochs=150, batch_size=64, early_stopping=False, progress_bar=False, seed=0)
    mod, data = m.module.eval(), m.prepared_data()
    idx = torch.as_tensor(m.validation_indices[:6])
    x, cat, cont = data.batch(idx)
    grid = torch.linspace(-8, 8, 6401)
    with torch.no_grad():
        lib = torch.log(x.sum(-1, keepdim=True))
        parts = []
        for z in grid.split(800):
            px = mod.generative(z.view(-1, 1, 1).expand(-1, len(idx), 1), lib.expand(len(z), -1, -1), cat, cont)["px"]
            parts.append(px.log_prob(x).sum(-1) - 0.5 * z.view(-1, 1) ** 2 - 0.5 * math.log(2 * math.pi))
        exact = (torch.logsumexp(torch.cat(parts), 0) + math.log(float(grid[1] - grid[0]))).numpy()
    # K = 1 is the ELBO, below log p(x) in expectation only: one draw per cell can land above it, so its gap is
    # averaged over 50 seeds; K = 3000 is within Monte Carlo error of the exact value.
    gap = {1: float(np.mean([(exact - compute_marginal_ll(mod, data, idx, n_samples=1, seed=s)).mean()
                             for s in range(50)])),
           3000: float((exact - compute_marginal_ll(mod, data, idx, n_samples=3000, seed=0)).mean())}
    assert gap[3000] < gap[1] and -0.5 < gap[3000] < 1.0, gap


def test_k1000_runs_in_chunks(trained, monkeypatch):
    import cellvae.train.evaluate as lik

    data = trained.prepared_data()
    idx = trained.validation_indices[:5]
    calls = []
    orig = lik._log_weights
    monkeypatch.setattr(lik, "_log_weights", lambda *a: calls.append(a[-1]) or orig(*a))
    small = compute_marginal_ll(trained.module, data, idx, n_samples=1000, seed=0, max_elements=5 * 200 * 64)
    assert calls == [64] * 15 + [40]
    big = compute_marginal_ll(trained.module, data, idx, n_samples=1000, seed=0)
    assert small.shape == (5,) and np.isfinite(small).all()
    assert np.abs(small - big).max() < 1.0  # two independent K = 1000 estimates agree


def test_get_methods_shapes_return_mean_and_bad_input(trained):
    n = trained.adata.n_obs
    assert isinstance(trained.get_elbo(), float)  # backwards compatible default
    assert trained.get_elbo(return_mean=False).shape == (n,)
    mask = np.zeros(n, dtype=bool)
    mask[:7] = True
    ll = trained.get_marginal_ll(indices=mask, n_samples=3, return_mean=False)
    assert ll.shape == (7,) and ll.dtype == np.float32
    assert isinstance(trained.get_marginal_ll(indices=[0, 1], n_samples=3, return_mean=True), float)
    assert trained.get_reconstruction_error(indices=[0, 1, 2], return_mean=False)["reconstruction_loss"].shape == (3,)
    assert len(trained.validation_indices) == 30 and len(trained.train_indices) == 270
    with pytest.raises(CellvaeInputError, match="indices must lie"):
        trained.get_elbo(indices=[n])
    with pytest.raises(CellvaeInputError, match="empty"):
        trained.get_marginal_ll(indices=[])
    with pytest.raises(CellvaeInputError, match="n_samples"):
        trained.get_marginal_ll(n_samples=0)


def test_split_is_saved_and_restored_by_obs_name(tmp_path, trained):
    d = trained.save(tmp_path / "m")
    loaded = CountVAE.load(d, adata=trained.adata)
    np.testing.assert_array_equal(loaded.validation_indices, trained.validation_indices)
    np.testing.assert_array_equal(loaded.train_indices, trained.train_indices)
    shuffled = trained.adata[np.random.default_rng(0).permutation(trained.adata.n_obs)].copy()
    moved = CountVAE.load(d, adata=shuffled)
    assert set(shuffled.obs_names[moved.validation_indices]) == set(trained.adata.obs_names[trained.validation_indices])
    assert CountVAE.load(d, adata=trained.adata[:100].copy()).validation_indices is None  # cells missing
    CountVAE.load(d).save(tmp_path / "again")  # the split survives a model loaded without data
    assert json.loads((tmp_path / "again" / "split.json").read_text()) == json.loads((d / "split.json").read_text())


def test_clustering_agreement_of_labels_with_themselves(zeisel):
    labels = zeisel.obs["cell_type"].to_numpy()
    assert clustering_agreement(labels, labels) == {"ari": 1.0, "nmi": 1.0}


def test_leiden_resolution_search_finds_the_number_of_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=10.0, size=(4, 5))
    truth = np.repeat(np.arange(4), 60)
    latent = centers[truth] + rng.normal(size=(240, 5))
    res = leiden_n_clusters(latent, 4)
    assert res["exact"] and res["n_clusters"] == 4 and res["n_iter"] <= 20
    assert clustering_agreement(truth, res["clusters"])["ari"] == 1.0
    far = leiden_n_clusters(latent, 500, max_iter=3)  # unreachable: the closest after 3 runs
    assert not far["exact"] and far["n_iter"] == 3 and far["n_clusters"] < 500


def test_scib_metrics_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "scib_metrics", None)
    assert not scib_available()
    with pytest.raises(ImportError, match=r'pip install "cellvae\[bench\]"'):
        scib_benchmark(np.zeros((4, 2)), ["a", "b", "a", "b"], ["x", "x", "y", "y"])


def test_scib_benchmark_on_real_labels(kang_small):
    pytest.importorskip("scib_metrics")
    from sklearn.decomposition import PCA

    latent = PCA(10, random_state=0).fit_transform(np.log1p(kang_small.X.toarray()))
    out = scib_benchmark(latent, kang_small.obs["cell_type"], kang_small.obs["donor"])
    for k in ("ilisi", "kbet", "graph_connectivity", "batch_asw", "batch_correction", "bio_conservation", "total"):
        assert 0.0 <= out[k] <= 1.0, (k, out)


@pytest.fixture()
def saved_model(tmp_path, kang_small):
    data = tmp_path / "kang_small.h5ad"
    kang_small.write_h5ad(data)
    m = CountVAE(kang_small, batch_key="donor")
    m.train(max_epochs=3, batch_size=64, progress_bar=False)
    return m.save(tmp_path / "model"), data


def test_evaluate_cli_writes_json_and_markdown(tmp_path, saved_model, monkeypatch):
    import cellvae.jobs.evaluate

    monkeypatch.setattr(cellvae.jobs.evaluate, "scib_available", lambda: False)  # the note, also where it is installed
    model_dir, data = saved_model
    r = CliRunner().invoke(main, ["evaluate", str(model_dir), str(data), "--labels-key", "cell_type",
                                  "--batch-key", "donor", "--n-samples", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "| marginal_ll |" in r.output and "cellvae[bench]" in r.output
    res = json.loads((tmp_path / "model_evaluation.json").read_text())
    assert res["likelihood_cells"] == "validation" and res["n_likelihood_cells"] == 25 and res["n_samples"] == 5
    m = res["metrics"]
    for k in ("elbo", "reconstruction_loss", "kl_local", "marginal_ll", "kmeans_ari", "kmeans_nmi", "leiden_ari",
              "leiden_nmi", "silhouette_labels"):
        assert np.isfinite(m[k]), k
    assert m["marginal_ll"] > m["elbo"] and m["leiden_n_clusters"] == m["n_labels"]
    md = (tmp_path / "model_evaluation.md").read_text()
    assert "| kmeans_ari |" in md and "bench extra" in md
    out = tmp_path / "ev"
    r = CliRunner().invoke(main, ["evaluate", str(model_dir), str(data), "--cells", "all", "--n-samples", "2",
                                  "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "evaluation.json").read_text())
    assert res["likelihood_cells"] == "all" and res["n_likelihood_cells"] == 250 and "kmeans_ari" not in res["metrics"]
    assert (out / "evaluation.md").exists() and not list(out.glob(".*")) and not list(tmp_path.glob(".*"))


def test_evaluate_cli_errors_clearly(tmp_path, saved_model, kang_small):
    model_dir, data = saved_model
    r = CliRunner().invoke(main, ["evaluate", str(model_dir), str(data), "--labels-key", "nope"])
    assert r.exit_code == 2 and "labels key (--labels-key) 'nope' is not an obs column" in r.output
    fewer = tmp_path / "fewer_genes.h5ad"
    kang_small[:, 10:].copy().write_h5ad(fewer)
    r = CliRunner().invoke(main, ["evaluate", str(model_dir), str(fewer)])
    assert r.exit_code == 2 and "missing from the data" in r.output
    part = tmp_path / "part.h5ad"
    kang_small[:100].copy().write_h5ad(part)
    r = CliRunner().invoke(main, ["evaluate", str(model_dir), str(part), "--cells", "validation"])
    assert r.exit_code == 2 and "validation cells are unknown" in r.output
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "no_model"), str(data)])
    assert r.exit_code == 2 and "not a cellvae model directory" in r.output
    assert not (tmp_path / "model_evaluation.json").exists()
