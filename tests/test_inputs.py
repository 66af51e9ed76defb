"""The bad-input catalogue of docs/inputs.md: one test per row (numbers match the table).

Each bad input is answered before training, by an error (or, where documented, a warning) that names the
problem and the fix; inputs that are merely in another form are accepted and converted.
"""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner

from cellvae import CellvaeInputError, CountVAE, read_data
from cellvae.cli import main
from cellvae.data import TensorData, check_values

pytestmark = pytest.mark.filterwarnings("ignore::anndata.ImplicitModificationWarning")


def _with_x(adata: ad.AnnData, X) -> ad.AnnData:
    a = adata.copy()
    a.X = X
    return a


def _dense(adata: ad.AnnData) -> np.ndarray:
    return adata.X.toarray()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, kang):
    """A small model trained on Kang with donor as batch, saved once for the inference rows."""
    from conftest import _subset

    a = _subset(kang, 250, 150, seed=1)
    m = CountVAE(a, batch_key="donor", n_hidden=16, n_latent=4)
    m.train(max_epochs=1, batch_size=64, progress_bar=False, n_threads=1)
    d = m.save(tmp_path_factory.mktemp("model") / "m")
    return a, m, d


# ------------------------------------------------------------------------------------------- values


def test_01_negative_values(kang_small):
    X = _dense(kang_small)
    X[3, 4] = -2
    with pytest.raises(CellvaeInputError,
                       match=r"negative values \(min -2\).*raw-count layer.*gene_likelihood='normal'"):
        CountVAE(_with_x(kang_small, X))


def test_02_non_integer_counts(kang_small):
    X = _dense(kang_small) * 0.5
    with pytest.raises(CellvaeInputError, match=r"non-integer values \(e.g. .*0.5.*not normalized or log-transformed"):
        CountVAE(_with_x(kang_small, X))
    CountVAE(_with_x(kang_small, X), gene_likelihood="normal")  # the named fix works


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_03_04_nan_inf_in_x(kang_small, bad):
    X = _dense(kang_small)
    X[0, 0] = bad
    with pytest.raises(CellvaeInputError, match="1 NaN or infinite values; remove or fix"):
        CountVAE(_with_x(kang_small, X))


def test_05_non_numeric_matrix(kang_small):
    with pytest.raises(CellvaeInputError, match=r"dtype <U\d+, not integer or floating.*astype\('float32'\)"):
        CountVAE(_with_x(kang_small, _dense(kang_small).astype(str)))


def test_06_empty_matrix(kang_small):
    for empty in (kang_small[:0].copy(), kang_small[:, :0].copy()):
        with pytest.raises(CellvaeInputError, match=r"data are empty \(\d+ cells x \d+ genes\).*Check the file"):
            CountVAE(empty)


def test_07_all_zero_cells_and_genes_dropped_with_warning(kang_small):
    X = _dense(kang_small)
    X[:2] = 0
    X[:, 5] = 0
    with pytest.warns(UserWarning) as rec:
        m = CountVAE(_with_x(kang_small, X))
    msgs = " ".join(str(r.message) for r in rec)
    assert "1 genes with zero counts in every cell are left out" in msgs
    assert "2 cells with zero counts are left out of training" in msgs
    assert len(m.spec.gene_names) == kang_small.n_vars - 1


def test_08_nothing_left_after_dropping_zeros(kang_small):
    with pytest.raises(CellvaeInputError, match="Every gene has zero counts in every cell: nothing to model"):
        CountVAE(_with_x(kang_small, sp.csr_matrix(kang_small.shape, dtype=np.float32)))


# -------------------------------------------------------------------------------------------- names


def test_09_duplicate_gene_names(kang_small):
    a = kang_small.copy()
    a.var_names = [a.var_names[0]] * 2 + list(a.var_names[2:])
    with pytest.raises(CellvaeInputError, match=r"var_names are not unique \(1 duplicated.*var_names_make_unique"):
        CountVAE(a)


def test_10_duplicate_cell_names_warn(kang_small):
    a = kang_small.copy()
    a.obs_names = [a.obs_names[0]] * 2 + list(a.obs_names[2:])
    with pytest.warns(UserWarning, match=r"obs_names are not unique.*obs_names_make_unique"):
        CountVAE(a)


def test_11_missing_layer(kang_small):
    with pytest.raises(CellvaeInputError,
                       match=r"Layer 'counts' not found; available layers: none. Omit layer \(--layer\) to use X"):
        CountVAE(kang_small, layer="counts")


def test_12_missing_obs_keys(kang_small):
    with pytest.raises(CellvaeInputError, match=r"obs key 'run' not found \(batch_key must be an obs column\); "
                                                r"available obs columns: "
                                                r"\['cell_type', .*Pass one of them"):
        CountVAE(kang_small, batch_key="run")
    with pytest.raises(CellvaeInputError, match=r"'x' not found \(categorical covariate must"):
        CountVAE(kang_small, categorical_covariate_keys=["x"])
    with pytest.raises(CellvaeInputError, match=r"'y' not found \(continuous covariate must"):
        CountVAE(kang_small, continuous_covariate_keys=["y"])


def test_13_missing_labels_key(kang_small):
    with pytest.raises(CellvaeInputError, match="labels_key 'nope' not found in obs columns"):
        CountVAE(kang_small, labels_key="nope")


# --------------------------------------------------------------------------------------- covariates


def test_14_batch_key_with_one_category_is_accepted(kang_small):
    """As scvi-tools: accepted without a warning; the model is the one without a batch covariate."""
    a = kang_small.copy()
    a.obs["one"] = "run1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = CountVAE(a, batch_key="one")
    assert m.spec.batch_categories == ["run1"] and m.module.n_batch == 1


def test_15_unseen_batch_category_at_inference(trained):
    a, m, _ = trained
    b = a.copy()
    b.obs["donor"] = b.obs["donor"].astype(str)
    b.obs.iloc[:3, b.obs.columns.get_loc("donor")] = "999"
    b.obs.iloc[3, b.obs.columns.get_loc("donor")] = "555"
    with pytest.raises(CellvaeInputError, match=r"unseen at training time: \['555', '999'\] \(4 cells\); the model "
                                                r"knows \['101', '107'\]"):
        m.get_latent_representation(b)


def test_16_categorical_covariate_with_nan(kang_small):
    a = kang_small.copy()
    a.obs["condition"] = a.obs["condition"].astype(object)
    a.obs.iloc[5, a.obs.columns.get_loc("condition")] = np.nan
    with pytest.raises(CellvaeInputError, match=r"obs\['condition'\] \(categorical covariate\) has 1 missing values.*"
                                                r"fillna\('unknown'\)"):
        CountVAE(a, categorical_covariate_keys=["condition"])
    with pytest.raises(CellvaeInputError, match=r"\(batch_key\) has 1 missing values"):
        CountVAE(a, batch_key="condition")


@pytest.mark.parametrize("bad", [np.inf, np.nan, "high"])
def test_17_continuous_covariate_nan_inf_text(kang_small, bad):
    a = kang_small.copy()
    a.obs["size"] = np.log1p(np.asarray(a.X.sum(1)).ravel()).astype(object)
    a.obs.iloc[7, a.obs.columns.get_loc("size")] = bad
    with pytest.raises(CellvaeInputError, match=r"obs\['size'\] \(continuous covariate\) has 1 NaN, infinite or "
                                                r"non-numeric values \(e.g. cell .*fix or drop those cells"):
        CountVAE(a, continuous_covariate_keys=["size"])  # answered at construction, before training


# ----------------------------------------------------------------------------------- matrix formats


def test_18_sparse_formats_accepted(kang_small):
    ref = CountVAE(kang_small).prepared_data().X
    for X in (sp.csc_matrix(kang_small.X), sp.csr_array(kang_small.X)):
        torch.testing.assert_close(CountVAE(_with_x(kang_small, X)).prepared_data().X, ref)
    # AnnData itself refuses COO ("Only CSR and CSC matrices are supported"); cellvae's data layer takes it.
    coo = sp.coo_matrix(kang_small.X)
    check_values(coo, count_likelihood=True)
    torch.testing.assert_close(TensorData(coo, torch.zeros(coo.shape[0], 1, dtype=torch.int64)).X, ref)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.float16, np.float64])
def test_19_20_dense_integer_and_half_accepted(kang_small, dtype):
    X = _dense(kang_small).astype(dtype)
    m = CountVAE(_with_x(kang_small, X))
    x = m.prepared_data().X
    assert x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), _dense(kang_small))
    m.train(max_epochs=1, batch_size=64, progress_bar=False, n_threads=1)


def test_21_backed_anndata_accepted(tmp_path, kang_small):
    p = tmp_path / "k.h5ad"
    kang_small.write_h5ad(p)
    backed = ad.read_h5ad(p, backed="r")
    assert backed.isbacked
    m = CountVAE(backed, batch_key="donor")
    torch.testing.assert_close(m.prepared_data().X, CountVAE(kang_small, batch_key="donor").prepared_data().X)
    m.train(max_epochs=1, batch_size=64, progress_bar=False, n_threads=1)
    assert m.get_latent_representation().shape == (kang_small.n_obs, 10)
    backed.file.close()


# ---------------------------------------------------------------------------------------------- files


def test_22_truncated_h5ad(tmp_path, kang_small):
    p = tmp_path / "k.h5ad"
    kang_small.write_h5ad(p)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CellvaeInputError, match=r"Could not read .* as \.h5ad: .*truncated.*download or export"):
        read_data(p)


def test_23_not_hdf5(tmp_path):
    p = tmp_path / "k.h5ad"
    p.write_text("cell,gene\nc1,3\n")
    with pytest.raises(CellvaeInputError, match=r"Could not read .* as \.h5ad: .*not in that format"):
        read_data(p)


def test_24_csv_header_mismatch(tmp_path):
    longer = tmp_path / "longer.csv"
    longer.write_text("cell,g1,g2,g3\nc1,1,2,3\nc2,1,2,3,4\n")
    with pytest.raises(CellvaeInputError, match=r"as a table: .*Expected 4 fields in line 3, saw 5.*more values "
                                                r"than the header"):
        read_data(longer)
    shorter = tmp_path / "shorter.csv"
    shorter.write_text("cell,g1,g2,g3\nc1,1,2,3\nc2,1,2\n")
    with pytest.raises(CellvaeInputError, match=r"1 empty or missing values in 1 rows \(first: cell 'c2', line 3\)"
                                                r".*one value per gene in the header \(3 genes\)"):
        read_data(shorter)


def test_25_csv_with_text_column(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("cell,g1,cell_type\nc1,1,T\nc2,4,B\n")
    with pytest.raises(CellvaeInputError, match=r"columns \['cell_type'\] are not numeric.*adata.obs"):
        read_data(p)


def test_26_csv_without_header_warns(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("c0\t1\t2\nc1\t3\t0\nc2\t0\t5\n")
    with pytest.warns(UserWarning, match="every column name is a number.*add a header row"):
        a = read_data(p)
    assert a.shape == (2, 2)


def test_37_38_missing_file_and_unknown_format(tmp_path, monkeypatch):
    monkeypatch.delenv("CELLVAE_DATA_DIR", raising=False)
    with pytest.raises(CellvaeInputError, match=r"'nope.h5ad' not found as a path \(set \$CELLVAE_DATA_DIR"):
        read_data("nope.h5ad")
    p = tmp_path / "x.xlsx"
    p.write_text("x")
    with pytest.raises(CellvaeInputError, match=r"Unknown data format for 'x.xlsx': use .h5ad"):
        read_data(p)


# ------------------------------------------------------------------------------------- model files


def test_27_newer_format_version(tmp_path, trained):
    _, _, d = trained
    cfg = json.loads((d / "config.json").read_text())
    cfg["format_version"] = 7
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.pt").write_bytes((d / "model.pt").read_bytes())
    with pytest.raises(CellvaeInputError, match=r"format version 7 is newer than this cellvae supports \(1\); "
                                                r"upgrade cellvae"):
        CountVAE.load(bad)


def test_28_weights_do_not_match_config(tmp_path, trained):
    _, _, d = trained
    cfg = json.loads((d / "config.json").read_text())
    cfg["module_kwargs"]["n_hidden"] = 32
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.pt").write_bytes((d / "model.pt").read_bytes())
    with pytest.raises(CellvaeInputError, match=r"do not match its config \(z_encoder\..* has shape \[16, 150\] in the "
                                                r"file but \[32, 150\] by the config; \d+ more differences\)\. The "
                                                r"files of the directory come from different models"):
        CountVAE.load(bad)


def test_29_not_a_model_directory(tmp_path):
    with pytest.raises(CellvaeInputError, match=r"is not a cellvae model directory \(needs config.json and "
                                                r"model.pt\); pass the directory written by CountVAE.save"):
        CountVAE.load(tmp_path)


def test_30_gene_order_differs_reordered(trained):
    a, m, d = trained
    perm = np.random.default_rng(1).permutation(a.n_vars)
    loaded = CountVAE.load(d, adata=a)
    np.testing.assert_allclose(loaded.get_latent_representation(a[:, perm].copy()),
                               loaded.get_latent_representation(), rtol=1e-5, atol=1e-6)


def test_31_genes_missing_at_inference(trained):
    a, m, d = trained
    with pytest.raises(CellvaeInputError, match=r"12 of the model's 150 genes are missing from the data \(e.g. "
                                                r"\['.+', '.+', '.+', '.+', '.+'\]\)\. Use data with the same genes"):
        m.get_latent_representation(a[:, 12:].copy())


# --------------------------------------------------------------------------------- output directory


@pytest.fixture()
def small_h5ad(tmp_path, kang_small):
    p = tmp_path / "in" / "k.h5ad"
    p.parent.mkdir()
    kang_small.write_h5ad(p)
    return p


def test_32_output_directory_exists(tmp_path, small_h5ad):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(out), "--quiet"])
    assert r.exit_code == 2
    assert "exists and is not empty; pass --overwrite to replace the outputs of an earlier job or choose another --out" in r.output


def test_33_input_path_equal_to_or_inside_output(tmp_path, small_h5ad):
    from cellvae.jobs.fit import fit_job

    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(small_h5ad), "--quiet"])
    assert r.exit_code == 2 and "Invalid value for '--out'" in r.output and "is a file" in r.output  # click
    with pytest.raises(CellvaeInputError, match="is the input itself; choose another --out"):
        fit_job(small_h5ad, small_h5ad, log=lambda m: None)
    r = CliRunner().invoke(main, ["fit", str(small_h5ad), "--out", str(small_h5ad.parent), "--overwrite", "--quiet"])
    assert r.exit_code == 2 and "lies in the output directory" in r.output
    assert small_h5ad.exists()


# ----------------------------------------------------------------------------------------- settings


def test_34_too_few_cells(kang_small):
    with pytest.raises(CellvaeInputError, match="Only 2 cells with counts: at least 3 are needed to train"):
        CountVAE(kang_small[:2].copy()).train(max_epochs=1, progress_bar=False)
    with pytest.raises(CellvaeInputError, match=r"fewer than one minibatch of batch_size=128: pass a smaller "
                                                r"batch_size"):
        CountVAE(kang_small[:100].copy()).train(max_epochs=1, progress_bar=False)


def test_35_unknown_likelihood_or_dispersion(kang_small):
    with pytest.raises(CellvaeInputError, match=r"gene_likelihood must be one of zinb, nb, poisson, "
                                                r"normal, zip; got 'negbin'"):
        CountVAE(kang_small, gene_likelihood="negbin")
    with pytest.raises(CellvaeInputError, match="dispersion must be one of"):
        CountVAE(kang_small, dispersion="cell")


def test_36_train_size_out_of_range(kang_small):
    with pytest.raises(CellvaeInputError, match=r"train_size must be in \(0, 1\], got 1.5"):
        CountVAE(kang_small).train(max_epochs=1, train_size=1.5, progress_bar=False)


def test_39_resume_with_other_data(tmp_path, kang_small):
    CountVAE(kang_small, n_hidden=16).train(max_epochs=1, batch_size=64, progress_bar=False, checkpoint_dir=tmp_path)
    with pytest.raises(CellvaeInputError, match=r"written for another model or data \(data_spec differs\)"):
        CountVAE(kang_small, n_hidden=16, batch_key="donor").train(
            max_epochs=1, batch_size=64, progress_bar=False, checkpoint_dir=tmp_path, resume=True)


def test_40_batch_category_with_fewer_than_3_cells_warns(kang_small):
    a = kang_small.copy()
    a.obs["run"] = ["r1"] * (a.n_obs - 2) + ["r2"] * 2
    with pytest.warns(UserWarning,
                      match=r"obs\['run'\] \(batch_key\) has categories with fewer than 3 cells: \['r2'\]"):
        m = CountVAE(a, batch_key="run")
    assert m.spec.batch_categories == ["r1", "r2"]
