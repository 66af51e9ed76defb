#!/usr/bin/env python
"""Training throughput on a GPU: cellvae ``CountVAE`` vs scvi-tools ``SCVI`` on a generated 100,000-cell set, at
batch 128 and 1024 (issue 22, GPU readiness).

When no CUDA device is present it prints so and exits 0 (nothing is measured). With one:

1. the data: ``benchmarks/make_large.py --n-cells 100000`` (written to ``--data`` if absent; 2,000 genes sampled
   from a CountVAE fitted on pbmc4k), read into memory;
2. per batch size, ``--rounds`` alternating rounds (cellvae, scvi-tools; then scvi-tools, cellvae): each tool trains
   ``--epochs`` epochs on all cells (ZINB, 128 hidden, 10 latent, no early stopping, no validation split in scvi-tools
   ``train_size=1.0``; cellvae ``train_size=1.0``), ``accelerator="cuda"``; the wall time of ``train()`` and cells/s
   (cells x epochs / seconds) are recorded with the GPU name and the load average;
3. the medians and the ratio (cellvae / scvi-tools) go to ``benchmarks/results/gpu_throughput.md`` and ``.json``
   with the commit and date.

    .venv-bench/bin/python benchmarks/gpu_throughput.py [--epochs 5] [--rounds 3] [--batch-sizes 128 1024]

cellvae on CUDA copies the in-memory data to the device once and keeps the finiteness check of each step on the
device (``cellvae.train.device``), so a step needs no host-to-device copy and no synchronisation.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, atomic_write_text, git_commit, import_tool, machine_description  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"


def _cellvae(adata, batch_size: int, epochs: int) -> float:
    import cellvae

    m = cellvae.CountVAE(adata)
    t0 = time.perf_counter()
    m.train(max_epochs=epochs, batch_size=batch_size, train_size=1.0, early_stopping=False, progress_bar=False,
            accelerator="cuda")
    return time.perf_counter() - t0


def _scvi(adata, batch_size: int, epochs: int) -> float:
    scvi, _ = import_tool("scvi")
    a = adata.copy()
    scvi.model.SCVI.setup_anndata(a)
    m = scvi.model.SCVI(a)
    t0 = time.perf_counter()
    m.train(max_epochs=epochs, batch_size=batch_size, train_size=1.0, accelerator="cuda", devices=1,
            enable_progress_bar=False)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/cellvae_gpu_100k.h5ad")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--out", default=str(RESULTS / "gpu_throughput"))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("No CUDA device is present: nothing measured (run this on a machine with a GPU).")
        return 0
    import anndata as ad

    if not Path(args.data).exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_large.py"), "--n-cells", "100000",
                        "--out", args.data], check=True)
    adata = ad.read_h5ad(args.data)
    gpu = torch.cuda.get_device_name(0)
    rows = []
    for bs in args.batch_sizes:
        for r in range(args.rounds):
            order = [("cellvae", _cellvae), ("scvi", _scvi)]
            if r % 2:
                order.reverse()
            for tool, fn in order:
                load = os.getloadavg()[0]
                sec = fn(adata, bs, args.epochs)
                rows.append({"tool": tool, "batch_size": bs, "round": r, "seconds": sec,
                             "cells_per_second": adata.n_obs * args.epochs / sec, "load_start": load})
                print(rows[-1], flush=True)
    lines = ["# GPU training throughput: cellvae vs scvi-tools (issue 22)", "",
             f"- commit {git_commit('src')['commit']}, {_dt.date.today()}, {gpu}; {machine_description()}",
             f"- {adata.n_obs} cells x {adata.n_vars} genes ({args.data}), {args.epochs} epochs per run, "
             f"{args.rounds} alternating rounds; medians", "",
             "| batch size | cellvae cells/s | scvi-tools cells/s | ratio |", "|---|---|---|---|"]
    for bs in args.batch_sizes:
        c = statistics.median(r["cells_per_second"] for r in rows if r["tool"] == "cellvae" and r["batch_size"] == bs)
        s = statistics.median(r["cells_per_second"] for r in rows if r["tool"] == "scvi" and r["batch_size"] == bs)
        lines.append(f"| {bs} | {c:,.0f} | {s:,.0f} | {c / s:.2f}x |")
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps({"gpu": gpu, "rows": rows}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
