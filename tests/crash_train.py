"""Training run for the crash tests (tests/test_checkpoint.py), meant to be killed with SIGKILL.

Usage: python tests/crash_train.py CHECKPOINT_DIR --pause epoch:E|checkpoint:N [--resume]

Trains CountVAE on the same real-data subset as :func:`crash_setup` with one torch thread. ``--pause epoch:E``
prints ``PAUSED ...`` and sleeps in the middle of the E-th epoch run by this process (after 2 of its
minibatches); ``--pause checkpoint:N`` does so during the N-th checkpoint write of this process, after the
temporary file is written and fsynced and before it is renamed (via ``cellvae.train.checkpoint._CHECKPOINT_HOOK``). The test
kills the process there. Without a kill the run finishes and prints ``DONE``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anndata as ad  # noqa: E402

import cellvae.train.checkpoint as train_mod  # noqa: E402
from cellvae import CountVAE  # noqa: E402
from cellvae.data import TensorData  # noqa: E402

MAX_EPOCHS = 8
CHECKPOINT_EVERY = 3
TRAIN_KW = dict(max_epochs=MAX_EPOCHS, batch_size=64, n_epochs_kl_warmup=4, seed=5, progress_bar=False,
                n_threads=1, checkpoint_every=CHECKPOINT_EVERY)
MODEL_KW = dict(n_hidden=32, n_latent=5)


def crash_setup(data_dir: Path) -> ad.AnnData:
    """300 cells x 200 genes of Zeisel et al. 2015 (the conftest subset)."""
    from conftest import _subset

    return _subset(ad.read_h5ad(Path(data_dir) / "zeisel2015_cortex_subset_1464cells.h5ad"), 300, 200)


def _pause(what: str) -> None:
    print(f"PAUSED {what}", flush=True)
    time.sleep(300)  # killed here by the test


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint_dir")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--pause", default=None)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    if args.pause:
        kind, n = args.pause.split(":")
        n = int(n)
        if kind == "epoch":
            orig = TensorData.iterate
            seen = {"epochs": 0}

            def iterate(self, indices, batch_size, shuffle=False, generator=None):
                if not shuffle:  # validation passes
                    yield from orig(self, indices, batch_size, shuffle, generator)
                    return
                seen["epochs"] += 1
                for i, b in enumerate(orig(self, indices, batch_size, shuffle, generator)):
                    if seen["epochs"] == n and i == 2:
                        _pause(f"in epoch {n} of this process, after 2 minibatches")
                    yield b

            TensorData.iterate = iterate
        else:
            calls = {"n": 0}

            def hook(tmp: Path) -> None:
                calls["n"] += 1
                if calls["n"] == n:
                    _pause(f"checkpoint write {n}: temporary file {tmp.name} written, not renamed")

            train_mod._CHECKPOINT_HOOK = hook

    model = CountVAE(crash_setup(Path(args.data_dir)), **MODEL_KW)
    model.train(checkpoint_dir=args.checkpoint_dir, resume=args.resume, **TRAIN_KW)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
