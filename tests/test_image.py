"""ImageVAE (convolutional VAE for single-cell images) and ``cellvae fit-images``, on a small real subset of the
Jurkat cell-cycle images (../shared/data/images or $CELLVAE_DATA_DIR/images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellvae import CellvaeInputError, ImageVAE
from cellvae.cli import main
from cellvae.data.images import ImageData, to_float_images
from cellvae.vae.conv import ImageVAEModule

IMAGES_FILE = "images/jurkat_cellcycle_40px.npz"
SMALL = dict(n_latent=6, channels=(8, 16, 32))  # quick on one thread


@pytest.fixture(scope="module")
def jurkat(data_dir):
    """292 images: 50 of each label (all 15 Anaphase and 27 Telophase), in file order, with labels and split."""
    path = data_dir / IMAGES_FILE
    if not path.exists():
        pytest.skip(f"dataset {IMAGES_FILE} not found in {data_dir}")
    with np.load(path) as d:
        labels = d["labels"]
        # not default_rng(0): the file's split was drawn with it, so its permutation starts with test images
        rng = np.random.default_rng(12345)
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:50]
                                      for k in range(len(d["label_names"]))]))
        return {k: (d[k][idx] if d[k].shape[:1] == labels.shape else d[k]) for k in d.files}


@pytest.fixture(scope="module")
def trained(jurkat):
    vae = ImageVAE(3, 40, **SMALL)
    x = jurkat["images"]
    before = vae.get_elbo(x[:100], seed=0).mean()
    hist = vae.train(x, labels=jurkat["labels"], max_epochs=3, batch_size=64, seed=0, progress_bar=False,
                     n_threads=1)
    return vae, hist, before


def test_shapes_and_ranges(trained, jurkat):
    vae, hist, _ = trained
    x = jurkat["images"][:20]
    z = vae.get_latent_representation(x)
    assert z.shape == (20, 6) and z.dtype == np.float32 and np.isfinite(z).all()
    m, v = vae.get_latent_representation(x, give_variance=True)
    np.testing.assert_array_equal(m, z)
    assert v.shape == (20, 6) and (v > 0).all()
    dec = vae.decode(z)
    assert dec.shape == (20, 40, 40, 3) and dec.dtype == np.float32
    assert dec.min() >= 0.0 and dec.max() <= 1.0
    np.testing.assert_allclose(vae.reconstruct(x), dec, atol=1e-6)
    assert vae.decode(z[0]).shape == (1, 40, 40, 3)  # one code
    s1, s2 = vae.sample(5, seed=3), vae.sample(5, seed=3)
    assert s1.shape == (5, 40, 40, 3)
    np.testing.assert_array_equal(s1, s2)
    a1 = vae.sample(4, seed=3, images=x)  # from the aggregate posterior of these images
    assert a1.shape == (4, 40, 40, 3) and 0.0 <= a1.min() and a1.max() <= 1.0
    np.testing.assert_array_equal(a1, vae.sample(4, seed=3, images=x))
    with pytest.raises(CellvaeInputError, match="at least 2"):
        vae.sample(2, images=x[:1])
    path, codes = vae.interpolate(z[0], z[1], n_steps=4, return_latent=True)
    assert path.shape == (4, 40, 40, 3) and codes.shape == (4, 6)
    np.testing.assert_allclose(path[0], dec[0], atol=1e-5)
    np.testing.assert_allclose(path[-1], dec[1], atol=1e-5)
    assert vae.get_latent_representation(x[:0]).shape == (0, 6)
    assert len(hist["epoch"]) == 3 and hist["n_train"] + hist["n_validation"] == 292


def test_uint8_and_float_inputs_agree(trained, jurkat):
    vae, _, _ = trained
    x = jurkat["images"][:16]
    z8 = vae.get_latent_representation(x)
    np.testing.assert_allclose(vae.get_latent_representation(x.astype(np.float32) / 255), z8, atol=1e-6)
    np.testing.assert_allclose(vae.get_latent_representation(x / 255.0), z8, atol=1e-6)  # float64
    np.testing.assert_allclose(vae.get_latent_representation(torch.from_numpy(x)), z8, atol=1e-6)
    np.testing.assert_allclose(vae.get_elbo(x, seed=1), vae.get_elbo(x / 255.0, seed=1), rtol=1e-5)


def test_training_improves_elbo(trained, jurkat):
    vae, hist, before = trained
    after = vae.get_elbo(jurkat["images"][:100], seed=0).mean()
    assert after > before + 100  # nats per image
    assert hist["train_elbo"][-1] > hist["train_elbo"][0]
    assert np.isfinite(hist["validation_elbo"]).all()


def test_training_is_reproducible(jurkat):
    x = jurkat["images"][:120]
    zs = []
    for _ in range(2):
        vae = ImageVAE(3, 40, **SMALL)
        vae.train(x, max_epochs=1, batch_size=32, seed=5, progress_bar=False, n_threads=1)
        zs.append(vae.get_latent_representation(x[:10]))
    np.testing.assert_array_equal(zs[0], zs[1])


def test_save_load_round_trip(trained, jurkat, tmp_path):
    vae, _, _ = trained
    x = jurkat["images"][:32]
    d = vae.save(tmp_path / "m")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "history.json", "model.pt"]
    state = torch.load(d / "model.pt", weights_only=True)  # plain tensors only
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    new = ImageVAE.load(d)
    assert new.is_trained and new.module_kwargs == vae.module_kwargs
    np.testing.assert_array_equal(new.get_latent_representation(x), vae.get_latent_representation(x))
    np.testing.assert_array_equal(new.get_elbo(x, seed=2), vae.get_elbo(x, seed=2))
    assert new.history["epoch"] == vae.history["epoch"]
    with pytest.raises(FileExistsError):
        vae.save(d)
    vae.save(d, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    with pytest.raises(CellvaeInputError, match="not an ImageVAE model directory"):
        ImageVAE.load(tmp_path / "nothing")
    cfg = json.loads((d / "config.json").read_text())
    cfg["module_kwargs"]["n_latent"] = 7
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CellvaeInputError, match="do not match"):
        ImageVAE.load(d)


def test_bad_inputs(trained, jurkat):
    vae, _, _ = trained
    x = jurkat["images"][:4]
    f = x.astype(np.float32) / 255
    with pytest.raises(CellvaeInputError, match="4 dimensions"):
        vae.get_latent_representation(x[0])
    with pytest.raises(CellvaeInputError, match="channels-first"):
        vae.get_latent_representation(f.transpose(0, 3, 1, 2))
    with pytest.raises(CellvaeInputError, match="built for"):
        vae.get_latent_representation(x[..., :2])
    with pytest.raises(CellvaeInputError, match="built for"):
        vae.get_latent_representation(x[:, :32, :32])
    bad = f.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(CellvaeInputError, match="NaN"):
        vae.get_latent_representation(bad)
    with pytest.raises(CellvaeInputError, match=r"\[0, 1\]"):
        vae.get_latent_representation(f * 255)
    with pytest.raises(CellvaeInputError, match="uint16"):
        vae.get_latent_representation(x.astype(np.uint16))
    with pytest.raises(CellvaeInputError, match="numeric"):
        vae.get_latent_representation(x.astype(bool))
    with pytest.raises(CellvaeInputError, match="n_latent=6"):
        vae.decode(np.zeros((2, 5)))
    with pytest.raises(CellvaeInputError, match="NaN"):
        vae.decode(np.full((1, 6), np.nan))
    with pytest.raises(CellvaeInputError, match="n_steps"):
        vae.interpolate(np.zeros(6), np.ones(6), n_steps=1)
    with pytest.raises(CellvaeInputError, match="divisible"):
        ImageVAE(3, 36)
    with pytest.raises(CellvaeInputError, match="likelihood"):
        ImageVAE(3, 40, likelihood="poisson")
    with pytest.raises(CellvaeInputError, match="labels"):
        ImageVAE(3, 40, **SMALL).train(x, labels=[0, 1], max_epochs=1, batch_size=2, progress_bar=False)
    with pytest.raises(CellvaeInputError, match="minibatch"):
        ImageVAE(3, 40, **SMALL).train(x, max_epochs=1, batch_size=128, progress_bar=False)
    assert to_float_images(x).max() <= 1.0


def test_anomaly_arithmetic_and_group_means(trained, jurkat):
    vae, _, _ = trained
    x, lab = jurkat["images"], jurkat["labels"]
    s = vae.get_anomaly_score(x[:10], n_samples=2, seed=0)
    assert s.shape == (10,) and np.isfinite(s).all()
    np.testing.assert_allclose(s, -vae.get_elbo(x[:10], n_samples=2, seed=0))
    parts = vae.get_elbo(x[:10], return_parts=True)
    np.testing.assert_allclose(parts["elbo"], -(parts["reconstruction_loss"] + parts["kl_local"]))
    assert (parts["kl_local"] >= 0).all()
    means = vae.group_latent_means(x, lab)
    assert sorted(means) == sorted(np.unique(lab).tolist()) and means[0].shape == (6,)
    res = vae.latent_arithmetic([x[lab == 3], x[lab == 5]], [0.5, 0.5])
    np.testing.assert_allclose(res["z"], 0.5 * (means[3] + means[5]), atol=1e-5)
    assert res["image"].shape == (40, 40, 3) and res["codes"].shape == (2, 6)
    res2 = vae.latent_arithmetic([means[3], means[5]], [0.5, 0.5])
    np.testing.assert_allclose(res2["image"], res["image"], atol=1e-5)
    with pytest.raises(CellvaeInputError, match="weights"):
        vae.latent_arithmetic([means[3]], [1.0, 2.0])


def test_module_and_data_object():
    torch.manual_seed(0)
    mod = ImageVAEModule(2, (16, 24), n_latent=3, channels=(4, 8), likelihood="continuous_bernoulli")
    data = ImageData(torch.rand(5, 2, 16, 24))
    batches = list(data.iterate(torch.arange(5), 2))
    assert [b[0].shape[0] for b in batches] == [2, 3]  # no batch of one image
    x, cat, cont = batches[0]
    assert cat.shape == (2, 1) and cat.dtype == torch.int64 and cont is None
    out = mod(x, cat, cont, kl_weight=0.5)
    assert out.reconstruction_loss.shape == (2,) and out.kl_local.shape == (2,)
    torch.testing.assert_close(out.loss, (out.reconstruction_loss + 0.5 * out.kl_local).mean())
    mean = mod.mean(mod.decoder_output(torch.zeros(2, 3)))
    assert mean.shape == (2, 2, 16, 24) and float(mean.detach().min()) >= 0 and float(mean.detach().max()) <= 1


def _write_subset(path, jurkat, n=150):
    keep = np.sort(np.random.default_rng(1).permutation(len(jurkat["labels"]))[:n])
    arrays = {k: (v[keep] if v.shape[:1] == jurkat["labels"].shape else v) for k, v in jurkat.items()}
    np.savez_compressed(path, **arrays)
    return path


def test_cli_fit_images_writes_everything(tmp_path, jurkat):
    src = _write_subset(tmp_path / "sub.npz", jurkat)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["fit-images", str(src), "--out", str(out), "--n-latent", "4", "--max-epochs", "2",
                                  "--batch-size", "32", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and "probe_balanced_accuracy" in r.output
    vae = ImageVAE.load(out / "model")
    assert vae.n_latent == 4
    with np.load(out / "latent.npz") as lat:
        assert lat["latent_mean"].shape == (150, 4) and lat["elbo"].shape == (150,)
        assert set(lat["split"].tolist()) == {"train", "test"}
        with np.load(src) as d:
            np.testing.assert_allclose(vae.get_latent_representation(d["images"]), lat["latent_mean"], atol=1e-6)
    names = {"training_curves", "reconstructions", "latent_grid", "interpolation", "latent_pca", "samples"}
    assert {p.stem for p in (out / "figures").glob("*.png")} == names
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(names) and "probe_balanced_accuracy" in html
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["n_images"] == 150 and metrics["settings"]["n_latent"] == 4
    # an existing output directory needs --overwrite
    r = CliRunner().invoke(main, ["fit-images", str(src), "--out", str(out), "--max-epochs", "1", "--quiet"])
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_cli_fit_images_errors(tmp_path, jurkat):
    r = CliRunner().invoke(main, ["fit-images", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output
    np.savez(tmp_path / "noimg.npz", pixels=jurkat["images"][:5])
    r = CliRunner().invoke(main, ["fit-images", str(tmp_path / "noimg.npz"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "'images'" in r.output
    r = CliRunner().invoke(main, ["fit-images", str(tmp_path / "noimg.npz"), "--images-key", "pixels",
                                  "--labels-key", "phase", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "'phase'" in r.output


def test_cli_fit_images_without_labels_or_split(tmp_path, jurkat):
    np.savez_compressed(tmp_path / "plain.npz", images=jurkat["images"][:60])
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["fit-images", str(tmp_path / "plain.npz"), "--out", str(out), "--n-latent", "3",
                                  "--max-epochs", "1", "--batch-size", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["n_test"] == 12 and "probe_balanced_accuracy" not in metrics["metrics"]
    assert "80/20" in metrics["settings"]["split"]
    assert len(list((out / "figures").glob("*.png"))) == 6
    with np.load(out / "latent.npz") as lat:
        assert "labels" not in lat.files and lat["latent_mean"].shape == (60, 3)


def test_training_failure_says_images_and_keeps_weights(jurkat, monkeypatch):
    """Non-finite losses stop training with an image-specific hint, and the model keeps its last finite weights
    as a trained model (as CountVAE does)."""
    from cellvae import CellvaeTrainingError

    vae = ImageVAE(3, 40, **SMALL)
    orig_build = vae._build_module

    def build():  # the training loss is NaN from the 3rd step on (20 bad steps in a row stop training)
        mod = orig_build()
        fwd, n = mod.forward, {"steps": 0}

        def forward(*a, **k):
            out = fwd(*a, **k)
            if mod.training:
                n["steps"] += 1
                if n["steps"] >= 3:
                    out.loss = out.loss * float("nan")
            return out

        mod.forward = forward
        return mod

    monkeypatch.setattr(vae, "_build_module", build)
    with pytest.raises(CellvaeTrainingError, match="pixel values") as e:
        vae.train(jurkat["images"][:64], max_epochs=12, batch_size=16, seed=0, progress_bar=False, n_threads=1)
    assert "counts per cell" not in str(e.value)
    assert vae.is_trained and "plan" in vae.history
    assert all(torch.isfinite(p).all() for p in vae.module.parameters())
