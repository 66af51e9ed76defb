"""Shared fixtures: small subsets of real datasets from ../shared/data (or $CELLVAE_DATA_DIR)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

DATA_DIR = Path(os.environ.get("CELLVAE_DATA_DIR") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")

torch.set_num_threads(1)  # deterministic and quick on small tensors; avoids oversubscription on shared machines
warnings.filterwarnings("ignore", message=".*ImplicitModificationWarning.*")


def _read(name: str) -> ad.AnnData:
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"dataset {name} not found in {DATA_DIR}")
    return ad.read_h5ad(path)


def _subset(adata: ad.AnnData, n_cells: int, n_genes: int, seed: int = 0) -> ad.AnnData:
    """Random cells, then the most frequently detected genes (so every gene has counts)."""
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    sub = adata[cells]
    detected = np.asarray((sub.X > 0).sum(0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:n_genes])
    return sub[:, genes].copy()


@pytest.fixture(scope="session")
def zeisel() -> ad.AnnData:
    """Full Zeisel et al. 2015 subset: 1464 cells x 1095 genes, 3 cell types."""
    return _read("zeisel2015_cortex_subset_1464cells.h5ad")


@pytest.fixture()
def zeisel_small(zeisel) -> ad.AnnData:
    """300 cells x 200 genes of Zeisel (fresh copy per test)."""
    return _subset(zeisel, 300, 200)


@pytest.fixture(scope="session")
def kang() -> ad.AnnData:
    """Kang et al. 2018 IFN-beta PBMCs (muscat subset): 1556 cells x 1267 genes, donors, conditions, types."""
    return _read("kang2018_ifnb_pbmc_muscat.h5ad")


@pytest.fixture()
def kang_small(kang) -> ad.AnnData:
    """250 cells x 150 genes of Kang (fresh copy per test)."""
    return _subset(kang, 250, 150, seed=1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def savercat() -> ad.AnnData:
    """PBMCs from three 10x chemistries (SAVER-CAT subset): 2000 cells x 10000 genes, ``batch``, ``cell_type``."""
    return _read("pbmc_10x_3tech_savercat_2000cells.h5ad")


@pytest.fixture()
def savercat_small(savercat) -> ad.AnnData:
    """600 cells x 300 genes of the three-chemistry PBMCs (fresh copy per test)."""
    return _subset(savercat, 600, 300, seed=2)


@pytest.fixture(scope="session")
def pbmc4k() -> ad.AnnData:
    """10x PBMC 4k, 4271 cells x 2000 genes, raw counts (about 10 % non-zero)."""
    return _read("pbmc4k_10x_top2000genes.h5ad")


@pytest.fixture()
def pbmc_small(pbmc4k) -> ad.AnnData:
    """300 random cells x all 2000 genes of pbmc4k (sparse: about 10 % non-zero; fresh copy per test)."""
    rng = np.random.default_rng(3)
    return pbmc4k[np.sort(rng.choice(pbmc4k.n_obs, size=300, replace=False))].copy()


@pytest.fixture()
def train_pbmc_small(pbmc_small):
    """``run(**module_kwargs) -> (module, history)``: 3 seeded epochs of a VAEModule on ``pbmc_small`` (250
    training, 50 validation cells, batch 64, one thread), for tests that compare two ways of training."""
    from cellvae.data import DataSpec
    from cellvae.vae.module import VAEModule
    from cellvae.train import TrainingPlan, train_module

    data = DataSpec(list(pbmc_small.var_names)).prepare(pbmc_small)

    def run(**module_kwargs):
        torch.manual_seed(0)
        m = VAEModule(data.n_genes, **module_kwargs)
        plan = TrainingPlan(max_epochs=3, batch_size=64, progress_bar=False, n_threads=1, early_stopping=False)
        return m, train_module(m, data, np.arange(250), np.arange(250, 300), plan)

    run.data = data
    return run


def assert_same_training(a, b, same_arithmetic: bool = False) -> None:
    """Two ``(module, history)`` results of multi-epoch training agree.

    Different code paths (native kernels against PyTorch, sparse against dense minibatches) round differently, and
    BLAS picks other kernels on other CPUs, so after several epochs only the ELBO histories and the final
    validation ELBO are compared, at 1e-4 relative. Weights are compared (1e-5) only with ``same_arithmetic``:
    the same path, thread count and CPU.
    """
    for key in ("train_elbo", "validation_elbo"):
        np.testing.assert_allclose(a[1][key], b[1][key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(a[1]["validation_elbo"][-1], b[1]["validation_elbo"][-1], rtol=1e-4)
    if same_arithmetic:
        sa, sb = a[0].state_dict(), b[0].state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture()
def optimizer_lrs(monkeypatch) -> list:
    """Records, at every optimizer step of ``cellvae.train``, the learning rate of each Adam parameter group (a list
    per step: the other weights' rate first, then the dispersion group's when there is one)."""
    import cellvae.train.loop as train_mod

    seen: list = []
    orig = train_mod.make_optimizer

    def spy(params, plan, *args):
        opt = orig(params, plan, *args)
        step = opt.step

        def recording_step(*a, **k):
            seen.append([g["lr"] for g in opt.param_groups])
            return step(*a, **k)

        opt.step = recording_step
        return opt

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    return seen
