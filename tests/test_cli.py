"""The main job on the command line: cellvae fit writes model, annotated h5ad, figures, metrics, report."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

from cellvae import CountVAE
from cellvae.cli import main


def _md5(p):
    return hashlib.md5(p.read_bytes()).hexdigest()


@pytest.fixture()
def small_h5ad(tmp_path, kang_small):
    p = tmp_path / "in" / "kang_small.h5ad"
    p.parent.mkdir()
    kang_small.write_h5ad(p)
    return p


def test_fit_writes_everything(tmp_path, small_h5ad):
    before = _md5(small_h5ad)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(out), "--labels-key", "cell_type",
                                  "--batch-key", "donor", "--max-epochs", "3", "--n-top-genes", "100", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "report:" in r.output
    assert _md5(small_h5ad) == before  # input untouched
    res = ad.read_h5ad(out / "cellvae.h5ad")
    src = ad.read_h5ad(small_h5ad)
    assert res.shape == src.shape and (res.X != src.X).nnz == 0
    assert res.obsm["X_cellvae"].shape == (src.n_obs, 10)
    assert res.obsm["X_umap"].shape == (src.n_obs, 2)
    assert res.obs["cellvae_leiden"].nunique() >= 2
    assert res.var["cellvae_modelled"].sum() == 100
    lay = res.layers["cellvae_normalized"]
    lay = lay.toarray() if hasattr(lay, "toarray") else lay
    np.testing.assert_allclose(lay.sum(1), 1e4, rtol=1e-3)  # all mass on the modelled genes
    assert (lay[:, ~res.var["cellvae_modelled"].to_numpy()] == 0).all()
    assert res.uns["cellvae"]["settings"]["batch_key"] == "donor"
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for k in ("validation_elbo", "kmeans_ari", "kmeans_nmi", "leiden_ari", "leiden_nmi", "train_cells_per_second"):
        assert np.isfinite(metrics[k]), k
    for f in ("training_curves.png", "umap_cellvae_leiden.png", "umap_cell_type.png", "umap_donor.png"):
        assert (out / "figures" / f).stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "validation ELBO" in html
    m = CountVAE.load(out / "model", adata=src)
    np.testing.assert_allclose(m.get_latent_representation(), res.obsm["X_cellvae"], rtol=1e-4, atol=1e-5)
    assert not list(out.glob(".*"))  # no temporary files left


def test_fit_refuses_nonempty_out_and_bad_values(tmp_path, small_h5ad, kang_small):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(small_h5ad.parent), "--quiet",
                                  "--overwrite"])
    assert r.exit_code == 2 and "lies in the output directory" in r.output
    a = kang_small.copy()
    a.X = a.X * 0.5
    p = tmp_path / "half.h5ad"
    a.write_h5ad(p)
    r = CliRunner().invoke(main, ["fit", str(p), "--out", str(tmp_path / "o2"), "--quiet"])
    assert r.exit_code == 2 and "non-integer" in r.output and "--gene-likelihood normal" in r.output
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(tmp_path / "o3"), "--batch-key", "nope"])
    assert r.exit_code == 2 and "--batch-key 'nope'" in r.output
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(tmp_path / "o4"), "--layer", "counts"])
    assert r.exit_code == 2 and "Layer 'counts' not found" in r.output
