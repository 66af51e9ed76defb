"""CountVAE.from_scvi: models saved by scvi-tools 1.5.1 (tests/data/scvi_fixture, made by
tests/data/make_scvi_fixture.py) give scvi-tools' latent and ELBO in cellvae, without scvi-tools installed.

The expected values were recorded from scvi-tools in eval mode: the latent means, and the ELBO per cell at
``z = qz_m + sqrt(qz_v) * eps`` with recorded standard-normal draws ``eps`` (and the recorded log library size,
sampled from q(l | x) for the latent-library model), so the comparison has no Monte Carlo noise. Tolerances: latent
1e-4 (absolute, latent units), ELBO 1e-3 relative per cell (observed: 6e-8 and 7e-7).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from cellvae import CellvaeInputError, CountVAE
from cellvae.models.scvi_import import read_scvi_file

FIXTURE = Path(__file__).resolve().parent / "data" / "scvi_fixture"
MODELS = [("model", ""), ("model_latent_library", "_ll"), ("model_covariates", "_cov")]


@pytest.fixture(scope="module")
def data():
    return ad.read_h5ad(FIXTURE / "data.h5ad")


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE / "expected.npz"))


def _dense_batch(m, n):
    x, cat, cont = next(iter(m.prepared_data().iterate(torch.arange(n), n)))
    return (x.to_dense() if x.layout != torch.strided else x), cat, cont


def _elbo_at(m, x, cat, cont, eps, library):
    """ELBO per cell (nats) at z = qz_m + sqrt(qz_v) eps and the given log library, by the module's public parts."""
    with torch.no_grad():
        inf = m.module.inference(x, cat, cont)
        inf["z"] = inf["qz_m"] + inf["qz_v"].sqrt() * torch.as_tensor(eps)
        inf["library"] = torch.as_tensor(library)
        gen = m.module.generative(inf["z"], inf["library"], cat, cont)
        return m.module.loss(x, inf, gen, cat=cat).elbo.numpy(), gen, inf


@pytest.mark.parametrize("name,suffix", MODELS)
def test_latent_and_elbo_match_scvi_tools(data, expected, name, suffix):
    m = CountVAE.from_scvi(FIXTURE / name, data)
    assert m.is_trained and m.history["imported_from"]["version"] == "1.5.1"
    latent = m.get_latent_representation()
    assert latent.shape == (200, 4)
    np.testing.assert_allclose(latent, expected["latent" + suffix], rtol=0, atol=1e-4)
    x, cat, cont = _dense_batch(m, data.n_obs)
    elbo, _, inf = _elbo_at(m, x, cat, cont, expected["eps" + suffix], expected["library" + suffix])
    np.testing.assert_allclose(inf["qz_v"].numpy(), expected["qz_v" + suffix], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(elbo, expected["elbo" + suffix], rtol=1e-3)
    # the likelihood at the posterior mean (and the library's mean for a latent library)
    lib = inf["ql_m"] if "ql_m" in inf else inf["library"]
    with torch.no_grad():
        px = m.module.generative(inf["qz_m"], lib, cat, cont)["px"]
        log_px = px.log_prob(x).sum(-1).numpy()
    np.testing.assert_allclose(log_px, expected["log_px_at_mean" + suffix], rtol=1e-3)
    assert "scvi" not in sys.modules  # cellvae alone


def test_settings_covariates_and_save_roundtrip(data, tmp_path):
    m = CountVAE.from_scvi(FIXTURE / "model_covariates", data)
    s = m.settings
    assert (s.gene_likelihood, s.dispersion, s.n_layers, s.n_hidden, s.n_latent) == ("nb", "gene-batch", 2, 16, 4)
    assert s.encode_covariates and m.spec.batch_key == "donor" and m.spec.batch_categories == ["101", "107"]
    assert m.spec.categorical_covariate_keys == ["condition"] and m.spec.continuous_covariate_keys == ["log_total"]
    assert m.module.px_r.shape == (2, 100)  # scvi-tools stores (n_genes, n_batch)
    m.save(tmp_path / "m")
    m2 = CountVAE.load(tmp_path / "m", adata=data)
    np.testing.assert_array_equal(m2.get_latent_representation(), m.get_latent_representation())
    de = m2.differential_expression(groupby="cell_type", group1="B cells", n_samples=100, seed=0)
    assert np.isfinite(de["lfc_mean"]).all()
    with pytest.raises(CellvaeInputError, match="genes"):
        CountVAE.from_scvi(FIXTURE / "model", data[:, :50].copy())


def test_fixture_is_small():
    total = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert total < 1 << 20, total
    meta = json.loads((FIXTURE / "expected.json").read_text())
    assert meta["scvi_tools"] == "1.5.1"


def _rewrite(tmp_path, edit) -> Path:
    """A copy of the fixture's model.pt with ``edit(contents)`` applied (history dropped: its placeholders)."""
    contents, placeholders = read_scvi_file(FIXTURE / "model" / "model.pt")
    assert "pandas.DataFrame" in placeholders  # the training history is not read
    contents["attr_dict"].pop("history_", None)
    edit(contents)
    d = tmp_path / "edited"
    d.mkdir(exist_ok=True)
    torch.save(contents, d / "model.pt")
    return d


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["attr_dict"]["init_params_"]["non_kwargs"].update(gene_likelihood="normal"), "gene_likelihood='normal'"),
    (lambda c: c["attr_dict"]["init_params_"]["non_kwargs"].update(dispersion="gene-label"), "dispersion='gene-label'"),
    (lambda c: c["attr_dict"]["init_params_"]["non_kwargs"].update(latent_distribution="ln"), "latent_distribution"),
    (lambda c: c["attr_dict"]["init_params_"]["kwargs"]["kwargs"].update(batch_representation="embedding"),
     "batch_representation"),
    (lambda c: c["attr_dict"]["init_params_"]["kwargs"]["kwargs"].update(log_variational=False), "log_variational"),
    (lambda c: c["attr_dict"]["init_params_"]["kwargs"]["kwargs"].update(some_new_option=1), "some_new_option"),
    (lambda c: c["attr_dict"]["registry_"].update(model_name="SCANVI"), "SCANVI"),
    (lambda c: c["attr_dict"]["registry_"]["setup_args"].update(size_factor_key="sf"), "size_factor_key"),
    (lambda c: c["model_state_dict"].update({"decoder.extra.weight": torch.zeros(2)}), "decoder.extra.weight"),
    (lambda c: c["model_state_dict"].pop("px_r"), "px_r"),
    (lambda c: c.pop("attr_dict"), "attr_dict"),
])
def test_unsupported_parts_are_named(tmp_path, data, edit, message):
    with pytest.raises(CellvaeInputError, match=message.replace("(", r"\(")):
        CountVAE.from_scvi(_rewrite(tmp_path, edit), data)


class _Payload:
    """An object whose unpickling would call os.makedirs (a stand-in for code in a hostile file)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_file_code_is_never_executed(tmp_path, data):
    target = tmp_path / "created_by_the_file"
    d = tmp_path / "hostile"
    d.mkdir()
    torch.save({"model_state_dict": {}, "var_names": np.array(["a"]), "attr_dict": {"x": _Payload(str(target))}},
               d / "model.pt")
    with pytest.raises(CellvaeInputError):
        CountVAE.from_scvi(d, data)
    assert not target.exists()
    with pytest.raises(CellvaeInputError, match="does not exist"):
        CountVAE.from_scvi(tmp_path / "nowhere", data)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.pt").write_bytes(b"not a zip file")
    with pytest.raises(CellvaeInputError):
        CountVAE.from_scvi(tmp_path / "junk", data)
