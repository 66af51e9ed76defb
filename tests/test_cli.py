"""The main job on the command line: cellvae fit writes model, annotated h5ad, figures, metrics, report."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cellvae import CountVAE
from cellvae.cli import main
from cellvae.data import minibatch_slices
from cellvae.train import TrainingPlan, lr_at


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
                                  "--batch-key", "donor", "--max-epochs", "3", "--n-top-genes", "100", "--quiet",
                                  "--lr", "2e-3", "--lr-schedule", "cosine", "--dispersion-lr-multiplier", "3"])
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
    markers = pd.read_csv(out / "markers.csv", index_col="gene")
    assert set(markers["group1"].astype(str)) == set(src.obs["cell_type"].astype(str))
    assert "Marker genes" in html
    m = CountVAE.load(out / "model", adata=src)
    # --lr 2e-3 --lr-schedule cosine: the rate of each epoch's last step, falling from 2e-3 towards 2e-5
    plan = TrainingPlan(lr=2e-3, lr_schedule="cosine")
    steps = len(minibatch_slices(len(m.train_indices), 128))  # per epoch, cellvae fit's batch size 128
    assert m.history["plan"]["lr"] == 2e-3
    assert m.history["plan"]["decoder_bias_init"] == res.uns["cellvae"]["settings"]["decoder_bias_init"] == "frequency"
    assert res.uns["cellvae"]["settings"]["lr_schedule"] == "cosine"
    assert m.history["plan"]["dispersion_lr_multiplier"] == res.uns["cellvae"]["settings"]["dispersion_lr_multiplier"] == 3
    assert m.history["lr"] == pytest.approx([lr_at(steps * e - 1, 3 * steps, plan) for e in (1, 2, 3)], rel=1e-12)
    np.testing.assert_allclose(m.get_latent_representation(), res.obsm["X_cellvae"], rtol=1e-4, atol=1e-5)
    assert not list(out.glob(".*"))  # no temporary files left


def test_fit_refuses_nonempty_out_and_bad_values(tmp_path, small_h5ad, kang_small):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(tmp_path / "o2"), "--quiet",
                                  "--decoder-bias-init", "mean"])
    assert r.exit_code == 2 and "'frequency', 'default'" in r.output
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(tmp_path / "o2"), "--quiet",
                                  "--dispersion-lr-multiplier", "0"])
    assert r.exit_code == 2 and "--dispersion-lr-multiplier" in r.output and "x>0" in r.output
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


def test_fit_resume_after_a_crash(tmp_path, small_h5ad, monkeypatch):
    """A job that dies in epoch 3 leaves out/checkpoints (epoch 2); a rerun without --resume is refused and names
    --resume; with --resume it continues from epoch 2, writes every output and removes the checkpoints."""
    import cellvae.train.loop as train_mod

    out = tmp_path / "out"
    args = ["fit", str(small_h5ad), "--out", str(out), "--max-epochs", "4", "--checkpoint-every", "2",
            "--n-hidden", "32", "--quiet"]
    orig = train_mod.evaluate_elbo
    calls = {"n": 0}

    def crash_in_epoch_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return orig(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate_elbo", crash_in_epoch_3)
    r = CliRunner().invoke(main, args)
    assert isinstance(r.exception, RuntimeError) and "simulated crash" in str(r.exception)
    monkeypatch.setattr(train_mod, "evaluate_elbo", orig)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint.pt"]

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--resume to continue" in r.output
    r = CliRunner().invoke(main, [*args[:-1], "--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.output and "resumed at epoch 2" in r.output
    hist = json.loads((out / "model" / "history.json").read_text())
    assert hist["epoch"] == [1, 2, 3, 4] and hist["resumed_from_epoch"] == 2
    assert (out / "report.html").exists() and (out / "cellvae.h5ad").exists()
    assert not (out / "checkpoints").exists()


def test_fit_training_error_exits_3_and_saves_best_weights(tmp_path, small_h5ad, monkeypatch):
    import cellvae.models.count_vae as model_mod
    from cellvae import CellvaeTrainingError

    def diverge(module, *a, **k):
        raise CellvaeTrainingError("Training stopped in epoch 2 (step 9): 20 consecutive minibatches gave non-finite "
                                   "(NaN or inf) loss ...", {"epoch": [1], "best_epoch": 1})

    monkeypatch.setattr(model_mod, "train_module", diverge)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(out), "--n-hidden", "16", "--quiet"])
    assert r.exit_code == 3, r.output
    assert "error: Training stopped in epoch 2" in r.output and "was saved to" in r.output
    assert (out / "model" / "model.pt").exists() and CountVAE.load(out / "model").history["epoch"] == [1]
