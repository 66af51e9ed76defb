"""Model files are data: JSON config with a format version and migrations, weights loaded with weights_only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellvae import CellvaeInputError, CountVAE
from cellvae.models.base import migrate_config
from cellvae.models.count_vae import FORMAT_VERSION


def _migrate(cfg: dict) -> dict:
    return migrate_config(cfg, FORMAT_VERSION, CountVAE.MIGRATIONS)

DATA = Path(__file__).resolve().parent / "data"


def _expected_adata() -> tuple[ad.AnnData, np.ndarray]:
    exp = json.loads((DATA / "model_v0_expected.json").read_text())
    a = ad.AnnData(sp.csr_matrix(np.asarray(exp["counts"], dtype=np.float32)),
                   obs=pd.DataFrame({"donor": exp["donor"]}, index=exp["obs_names"]),
                   var=pd.DataFrame(index=exp["var_names"]))
    return a, np.asarray(exp["latent_mean"], dtype=np.float32)


def test_fixture_is_format_0():
    cfg = json.loads((DATA / "model_v0" / "config.json").read_text())
    assert "format_version" not in cfg and "gene_names" in cfg and "gene_names" not in cfg["data_spec"]
    assert not (DATA / "model_v0" / "history.json").exists()


def test_load_format_0_model_through_migration(tmp_path):
    a, latent = _expected_adata()
    model = CountVAE.load(DATA / "model_v0", adata=a[:, ::-1].copy())  # genes in another order: matched by name
    assert model.is_trained and model.spec.normal_transform == "none" and model.spec.batch_categories == ["101", "107"]
    np.testing.assert_allclose(model.get_latent_representation(), latent, rtol=1e-5, atol=1e-6)
    # Saving writes the current format; it loads again to the same model.
    d = model.save(tmp_path / "m1")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["format_version"] == FORMAT_VERSION and cfg["data_spec"]["gene_names"] == list(a.var_names)
    again = CountVAE.load(d, adata=a)
    np.testing.assert_allclose(again.get_latent_representation(), latent, rtol=1e-5, atol=1e-6)


def test_migrate_steps_and_refusals():
    v0 = {"gene_names": ["a", "b"], "data_spec": {"gene_likelihood": "nb"}, "module_kwargs": {}}
    v1 = _migrate(v0)
    assert v1["format_version"] == 1 and v1["data_spec"]["gene_names"] == ["a", "b"] and "gene_names" not in v1
    assert v1["data_spec"]["normal_transform"] == "none" and v1["is_trained"] is True
    assert v0 == {"gene_names": ["a", "b"], "data_spec": {"gene_likelihood": "nb"}, "module_kwargs": {}}  # no mutation
    assert _migrate(v1) == v1  # current version: unchanged
    with pytest.raises(CellvaeInputError, match=r"format version 2 is newer than this cellvae supports \(1\); upgrade"):
        _migrate({"format_version": 2})
    with pytest.raises(CellvaeInputError, match="not a version number"):
        _migrate({"format_version": "one"})


class _Payload:
    """Unpickling this would create a file: the load must refuse it without running it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_weights_with_pickled_code_are_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(DATA / "model_v0", d)
    marker = tmp_path / "code_ran"
    state = torch.load(d / "model.pt", weights_only=True)
    state["extra"] = _Payload(str(marker))
    torch.save(state, d / "model.pt")
    with pytest.raises(CellvaeInputError, match="pickled objects other than tensors, which cellvae never loads"):
        CountVAE.load(d)
    assert not marker.exists()


def test_damaged_config_and_weights(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(DATA / "model_v0", d)
    (d / "config.json").write_text('{"gene_names": ["a"')  # cut short
    with pytest.raises(CellvaeInputError, match="not valid JSON"):
        CountVAE.load(d)
    shutil.copy(DATA / "model_v0" / "config.json", d / "config.json")
    raw = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CellvaeInputError, match="model.pt' is damaged: not a readable zip archive"):
        CountVAE.load(d)
