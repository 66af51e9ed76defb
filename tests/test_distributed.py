"""Two-process data-parallel training (torchrun, gloo on CPU) matches single-process training in quality, on
real data (Zeisel et al. 2015 cortex, 1464 cells x 1095 genes), through the user's path: ``cellvae fit --nproc 2``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cellvae.distributed import per_rank_batch_size, resolve_device, shard_indices, world

EPOCHS = "100"


SEEDS = ("0", "1", "2")


def _fit(data, out, extra=(), seed="0"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "cellvae.cli", "fit", str(data), "--out", str(out), "--labels-key", "cell_type",
           "--max-epochs", EPOCHS, "--quiet", "--seed", seed, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), res


def test_two_processes_match_one(tmp_path, data_dir):
    """Issue 6's bar: ARI within 0.03 and held-out (validation) ELBO within 1 %. The KMeans ARI of one run moves by
    about +-0.03 with the seed alone, so the ARI is compared as the mean over three seeds (each seed: one run with
    1 process, one with 2); the ELBO per seed. Measured (this commit, Intel Xeon): ARI 0.949 / 0.889 / 0.912 with 1
    process, 0.912 / 0.881 / 0.941 with 2 (means 0.917 / 0.911); validation ELBO -1381.6 / -1343.0 / -1284.9 and
    -1381.1 / -1343.0 / -1283.2 nats per cell."""
    data = data_dir / "zeisel2015_cortex_subset_1464cells.h5ad"
    if not data.exists():
        pytest.skip("Zeisel data not found")
    aris = {1: [], 2: []}
    for seed in SEEDS:
        one, _ = _fit(data, tmp_path / f"one{seed}", seed=seed)
        two, res = _fit(data, tmp_path / f"two{seed}", ["--nproc", "2"], seed=seed)
        assert "launching 2 processes" in res.stderr
        assert two["settings"]["n_processes"] == 2 and one["settings"]["n_processes"] == 1
        m1, m2 = one["metrics"], two["metrics"]
        assert m2["n_epochs"] == m1["n_epochs"]
        assert abs(m2["validation_elbo"] - m1["validation_elbo"]) <= 0.01 * abs(m1["validation_elbo"]), seed
        aris[1].append(m1["kmeans_ari"])
        aris[2].append(m2["kmeans_ari"])
    assert abs(np.mean(aris[2]) - np.mean(aris[1])) <= 0.03, aris
    # Rank 0 alone wrote the outputs; the model loads.
    from cellvae import CountVAE

    two_dir = tmp_path / f"two{SEEDS[-1]}"
    assert (two_dir / "report.html").exists() and (two_dir / "cellvae.h5ad").exists()
    assert not (two_dir / "checkpoints").exists()
    import anndata as ad

    m = CountVAE.load(two_dir / "model", ad.read_h5ad(data))
    assert m.get_latent_representation().shape == (1464, 10)


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

    from cellvae.distributed import allreduce_grads

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
