"""Multi-process (torch.distributed, gloo) training speed-up over one process on one machine (issue 6).

Trains the default ``CountVAE`` (ZINB, n_latent 10, n_hidden 128, batch size 128 in all: ``ceil(128 / N)`` per
rank) for ``--epochs`` epochs on an .h5ad (default: the generated 100,000-cell set of ``make_large.py``), once in a
single process and once under ``torchrun --nproc_per_node N``, each process with ``--threads`` torch threads, and
prints the training cells/s (all ranks together) of both, their ratio and the validation ELBO.

    .venv/bin/python benchmarks/ddp_speedup.py --data /tmp/cellvae_large/large_100k.h5ad [--nproc 2] [--epochs 2]

Results: ``benchmarks/results/ddp_speedup.{md,json}``. On a 2-core machine two processes of one thread each use
both cores; expect little gain there, and less when the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, machine_description, package_version, write_json_and_md  # noqa: E402


def worker(args) -> None:
    """One rank (or the single process): train and, on rank 0, write the history to ``args.result``."""
    import anndata as ad
    import torch

    import cellvae
    from cellvae.train.distributed import init_from_env, is_main, shutdown

    torch.set_num_threads(args.threads)
    init_from_env("cpu")
    adata = ad.read_h5ad(args.data)
    model = cellvae.CountVAE(adata)
    model.train(max_epochs=args.epochs, early_stopping=False, seed=0, progress_bar=False, n_threads=args.threads,
                accelerator="cpu")
    h = model.history
    if is_main():
        Path(args.result).write_text(json.dumps({
            "cells_per_s": h["train_cells_per_second"], "epochs": len(h["epoch"]),
            "validation_elbo": h["validation_elbo"][-1], "seconds": sum(h["seconds"]),
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}))
    shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/cellvae_large/large_100k.h5ad")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "ddp_speedup.md"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.nproc):
            res = Path(tmp) / f"r{n}.json"
            cmd = [sys.executable, __file__, "--worker", "--data", args.data, "--epochs", str(args.epochs),
                   "--threads", str(args.threads), "--result", str(res)]
            if n > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       *cmd[1:]]
            print("running:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=env)
            runs[n] = json.loads(res.read_text())
            print(f"  {n} process(es): {runs[n]['cells_per_s']:,.0f} cells/s, validation ELBO "
                  f"{runs[n]['validation_elbo']:.1f}", flush=True)
    one, many = runs[1], runs[args.nproc]
    payload = {"meta": {"machine": machine_description(), "torch": package_version("torch"), "data": args.data,
                        "epochs": args.epochs, "threads_per_process": args.threads, "loadavg": os.getloadavg()},
               "runs": {str(k): v for k, v in runs.items()}, "speedup": many["cells_per_s"] / one["cells_per_s"]}
    md = "\n".join([
        "# Multi-process training speed-up (torch.distributed, gloo, one machine)", "",
        f"Machine: {payload['meta']['machine']}; torch {payload['meta']['torch']}; data `{args.data}`; "
        f"{args.epochs} epochs; {args.threads} torch thread(s) per process; load average at the end "
        f"{tuple(round(x, 2) for x in payload['meta']['loadavg'])} (shared machine: approximate).", "",
        "| processes | training cells/s (all ranks) | validation ELBO after the last epoch | epoch seconds |",
        "|---|---|---|---|",
        *[f"| {k} | {v['cells_per_s']:,.0f} | {v['validation_elbo']:.1f} | {v['seconds'] / v['epochs']:.1f} |"
          for k, v in sorted(runs.items())],
        "", f"Speed-up of {args.nproc} processes over 1: **{payload['speedup']:.2f}x**.", ""])
    write_json_and_md(Path(args.out), payload, md)


if __name__ == "__main__":
    main()
