"""Two-process data-parallel training (torchrun, gloo on CPU) matches single-process training in quality, on
real data (Zeisel et al. 2015 cortex, 1464 cells x 1095 genes: ELBO and Leiden; the cell-line mixture of Tian et al.
2019, 992 cells, 1,000 genes, 5 batches: ELBO, KMeans and Leiden), through the user's path: ``cellvae fit --nproc 2``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cellvae.train.distributed import per_rank_batch_size, resolve_device, shard_indices, world

EPOCHS = "100"


SEEDS = ("0", "1", "2")


def _fit(data, out, extra=(), seed="0"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "cellvae.cli", "fit", str(data), "--out", str(out), "--labels-key", "cell_type",
           "--max-epochs", EPOCHS, "--no-early-stopping", "--quiet", "--seed", seed, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), res


def _cluster_aris(out) -> dict[str, float]:
    """ARI of KMeans and of Leiden clusters (as many as labels) of the run's latent representation against the cell
    types."""
    import anndata as ad

    from cellvae.metrics import kmeans_agreement, leiden_agreement

    res = ad.read_h5ad(out / "cellvae.h5ad")
    z, labels = res.obsm["X_cellvae"], res.obs["cell_type"].astype(str).to_numpy()
    return {"kmeans": kmeans_agreement(z, labels, seed=0)["ari"], "leiden": leiden_agreement(z, labels, seed=0)["ari"]}


def _pair(data, tmp_path, seed, extra=()) -> None:
    """One run with 1 process and one with 2 (``tmp_path/one{seed}``, ``two{seed}``): both report their process
    count, train the same epochs, and their validation ELBO agree within 1 %."""
    one, _ = _fit(data, tmp_path / f"one{seed}", list(extra), seed=seed)
    two, res = _fit(data, tmp_path / f"two{seed}", [*extra, "--nproc", "2"], seed=seed)
    assert "launching 2 processes" in res.stderr
    assert two["settings"]["n_processes"] == 2 and one["settings"]["n_processes"] == 1
    m1, m2 = one["metrics"], two["metrics"]
    print(f"seed {seed}: validation ELBO {m1['validation_elbo']:.1f} (1 process), {m2['validation_elbo']:.1f} (2)")
    assert m2["n_epochs"] == m1["n_epochs"]
    assert abs(m2["validation_elbo"] - m1["validation_elbo"]) <= 0.01 * abs(m1["validation_elbo"]), seed


def _check_rank0_outputs(two_dir, data, n_cells: int) -> None:
    """Rank 0 alone wrote the outputs of a 2-process run, the checkpoint is gone, and the model loads."""
    import anndata as ad

    from cellvae import CountVAE

    assert (two_dir / "report.html").exists() and (two_dir / "cellvae.h5ad").exists()
    assert not (two_dir / "checkpoints").exists()
    m = CountVAE.load(two_dir / "model", ad.read_h5ad(data))
    assert m.get_latent_representation().shape == (n_cells, 10)


def test_two_processes_match_one(tmp_path, data_dir):
    """Issue 6's bar: ARI within 0.03 and held-out (validation) ELBO within 1 %, over three seeds (each seed: one
    run with 1 process, one with 2): the ELBO per seed, the ARI as the mean over the seeds (one run's ARI moves by a
    few hundredths with the seed alone).

    The ARI is that of Leiden clusters (resolution chosen to give as many clusters as cell types, 3 here), not of
    KMeans: on this data KMeans ARI is bimodal whatever the number of processes, about 0.92 or about 0.28 (one run
    in several: seed 6 of the single-process code before the fused dropout, seeds 0 / 1 / 2 with it, in 1 or 2
    processes) because some latents keep the neurons' capture-chip axis (and their CA1 subclasses), along which
    KMeans with k = 3 splits them (see ``test_latent_space_separates_cell_types_on_real_data``); the 15-NN label
    accuracy of those latents is 0.97 and their Leiden ARI 0.95. KMeans is compared on the cell-line mixture in
    ``test_two_processes_match_one_kmeans``. Measured (this commit, Intel Xeon):
    Leiden ARI 0.953 / 0.971 / 0.953 with 1 process, 0.965 / 0.961 / 0.964 with 2 (means 0.959 / 0.963); KMeans
    ARI 0.29 / 0.91 / 0.91 and 0.92 / 0.27 / 0.27; validation ELBO -1381.0 / -1343.6 / -1284.5 and
    -1380.8 / -1343.2 / -1283.9 nats per cell."""
    data = data_dir / "zeisel2015_cortex_subset_1464cells.h5ad"
    if not data.exists():
        pytest.skip("Zeisel data not found")
    aris = {1: [], 2: []}
    for seed in SEEDS:
        _pair(data, tmp_path, seed)
        aris[1].append(_cluster_aris(tmp_path / f"one{seed}")["leiden"])
        aris[2].append(_cluster_aris(tmp_path / f"two{seed}")["leiden"])
    print("Leiden ARI by number of processes:", aris)
    assert abs(np.mean(aris[2]) - np.mean(aris[1])) <= 0.03, aris
    _check_rank0_outputs(tmp_path / f"two{SEEDS[-1]}", data, 1464)


def test_two_processes_match_one_kmeans(tmp_path, data_dir):
    """Issue 6's bar for KMeans as well as Leiden: one seed, one run with 1 process and one with 2, validation ELBO
    within 1 % and the ARI of KMeans (k = 5 cell lines) and of Leiden (resolution bisected to 5 clusters) within
    0.03 (and above 0.9).

    Data: the cell-line mixture of Tian et al. 2019 (992 cells, 5 batches on 2 technologies, labels from genotypes),
    its 1,000 batch-aware highly variable genes, ``--batch-key batch``. (On Zeisel, ``test_two_processes_match_one``,
    KMeans ARI is bimodal whatever the number of processes, so 2 processes against 1 would compare coin flips. Here
    the 100-epoch single-process ``CountVAE`` gives KMeans and Leiden ARI 1.0 at seeds 0-5; both process counts gave
    1.0 / 1.0 at seeds 0-2 except one 2-process KMeans 0.998.)"""
    src = data_dir / "cellline_mixology_tian2019_5batches.h5ad"
    if not src.exists():
        pytest.skip("cell-line mixture data not found")
    import anndata as ad

    from cellvae.data.preprocess import select_highly_variable_genes

    cells = ad.read_h5ad(src)
    data = tmp_path / "cellline_hvg.h5ad"
    cells[:, select_highly_variable_genes(cells, 1000, batch_key="batch")].copy().write_h5ad(data)
    aris = {1: [], 2: []}
    for seed in SEEDS[:1]:
        _pair(data, tmp_path, seed, ["--batch-key", "batch"])
        aris[1].append(_cluster_aris(tmp_path / f"one{seed}"))
        aris[2].append(_cluster_aris(tmp_path / f"two{seed}"))
    print("KMeans and Leiden ARI by number of processes:", aris)
    for method in ("kmeans", "leiden"):
        one_mean = np.mean([r[method] for r in aris[1]])
        two_mean = np.mean([r[method] for r in aris[2]])
        assert abs(two_mean - one_mean) <= 0.03, (method, aris)
        assert min(one_mean, two_mean) > 0.9, (method, aris)
    _check_rank0_outputs(tmp_path / f"two{SEEDS[0]}", data, 992)


def test_single_process_helpers_are_no_ops():
    assert world() == (0, 1)
    idx = torch.arange(10)
    assert torch.equal(shard_indices(idx, seed=0), idx)
    assert per_rank_batch_size(128) == 128
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="accelerator"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"


def test_shards_are_disjoint_and_change_with_the_seed(monkeypatch):
    """Each rank gets len // n_ranks cells, disjoint across ranks; a new seed (the training loop passes seed +
    epoch) gives another split, so the cells left out of one epoch are trained on in others."""
    import cellvae.distributed as D

    idx = torch.arange(11) * 3
    left_out = []
    for seed in range(6):
        parts = []
        for rank in range(2):
            monkeypatch.setattr(D, "world", lambda rank=rank: (rank, 2))
            parts.append(D.shard_indices(idx, seed))
        both = torch.cat(parts)
        assert [len(p) for p in parts] == [5, 5] and len(both.unique()) == 10
        left_out.append(int(np.setdiff1d(idx.numpy(), both.numpy())[0]))
    assert len(set(left_out)) > 1


def _loss_flag_worker(rank, port, out):
    import torch.distributed as dist

    from cellvae.train.distributed import allreduce_grads

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank + 1))
        loss = torch.tensor(float("inf") if rank == 1 else 2.0)  # only rank 1 sees a non-finite loss
        mean = allreduce_grads([p], loss)
        out[rank] = (bool(torch.isfinite(mean)), p.grad.tolist())
    finally:
        dist.destroy_process_group()


def test_allreduce_shares_a_non_finite_loss_between_ranks():
    """A non-finite loss on one rank is non-finite on all after the gradient all-reduce, so every rank skips the
    same step (the training guard) and the replicas never drift apart; gradients are averaged."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_loss_flag_worker, args=(port, out), nprocs=2, join=True)
    assert out[0] == (False, [1.5, 1.5, 1.5]) and out[1] == (False, [1.5, 1.5, 1.5])
