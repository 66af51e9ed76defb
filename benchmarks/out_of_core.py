"""Out-of-core training benchmark: a CountVAE trained on a backed .h5ad (``anndata.read_h5ad(path, backed="r")``,
minibatches read from disk by :class:`cellvae.backed.BackedData`) versus the same file read into memory.

    python benchmarks/make_large.py --n-cells 1000000 --out /tmp/large_1M.h5ad
    python benchmarks/make_large.py --n-cells 100000 --out /tmp/large_100k.h5ad
    python benchmarks/out_of_core.py --large /tmp/large_1M.h5ad --medium /tmp/large_100k.h5ad

- ``--large`` (1M cells): one epoch out of core (default CountVAE: ZINB, 10 latent dims, 128 hidden; batch 128;
  1 thread; 1% of the cells held out for the validation ELBO), then ``get_latent_representation`` streamed over all
  cells, and KMeans ARI/NMI of the latent space against ``obs['cell_type']`` on 20,000 random cells. Reported:
  peak RSS (``ru_maxrss``) after each step, the streamed checks' time (``CountVAE(...)``), training cells/s and wall
  time, latent time.
- ``--medium`` (100k cells): in memory (``read_h5ad`` of the whole file) and backed, each trained for
  ``--medium-epochs`` epochs without validation, alternated ``--repeats`` times; cells/s of each and the ratio
  backed / in memory (medians).

Every measurement runs in its own fresh process (so that ``ru_maxrss`` is the peak of that measurement alone). The
machine may be shared with other jobs: timings are approximate. Results: ``benchmarks/results/out_of_core.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, limit_threads, machine_description, package_version, write_json_and_md  # noqa: E402

GiB = 2**30


def _rss() -> dict:
    import resource

    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss_now_gib": now / GiB, "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB}


def phase(args) -> dict:
    """One measurement in this process: read (backed or in memory), init, train, optionally embed."""
    limit_threads(args.threads)
    import anndata as ad
    import numpy as np
    import torch

    from cellvae import CountVAE

    torch.set_num_threads(args.threads)
    out: dict = {"mode": args.phase, "path": str(args.path), "file_gib": Path(args.path).stat().st_size / GiB}
    out["after_imports"] = _rss()
    t = time.perf_counter()
    adata = ad.read_h5ad(args.path, backed="r") if args.phase == "backed" else ad.read_h5ad(args.path)
    out["read_s"] = time.perf_counter() - t
    out["n_cells"], out["n_genes"] = int(adata.n_obs), int(adata.n_vars)
    t = time.perf_counter()
    model = CountVAE(adata, batch_key=args.batch_key or None, out_of_core=args.phase == "backed")
    out["init_s"] = time.perf_counter() - t  # backed: the streamed value checks and totals over the file
    out["after_init"] = _rss()
    t = time.perf_counter()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, train_size=args.train_size,
                early_stopping=False, n_threads=args.threads, progress_bar=False, seed=0)
    out["train_wall_s"] = time.perf_counter() - t
    h = model.history
    out["epochs"] = len(h["epoch"])
    out["train_cells"] = int(len(model.train_indices))
    out["cells_per_s"] = float(h["train_cells_per_second"])
    out["epoch_s"] = [float(s) for s in h["seconds"]]
    out["train_elbo"] = [float(v) for v in h["train_elbo"]]
    out["validation_elbo"] = [float(v) for v in h["validation_elbo"]]
    out["after_train"] = _rss()
    if args.latent:
        t = time.perf_counter()
        z = model.get_latent_representation()
        out["latent_s"] = time.perf_counter() - t
        out["latent_shape"] = list(z.shape)
        out["after_latent"] = _rss()
        if "cell_type" in adata.obs.columns:
            from _common import cluster_scores

            rng = np.random.default_rng(0)
            sub = np.sort(rng.choice(len(z), size=min(20_000, len(z)), replace=False))
            labels = adata.obs["cell_type"].astype(str).to_numpy()[sub]
            ari, nmi = cluster_scores(z[sub], labels, len(np.unique(labels)))
            out["latent_kmeans_ari"], out["latent_kmeans_nmi"] = ari, nmi
            out["latent_kmeans_cells"] = int(len(sub))
    return out


def run_phase(mode: str, path: Path, args, epochs: int, train_size: float, latent: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", mode, "--path", str(path),
           "--epochs", str(epochs), "--train-size", str(train_size), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--batch-key", args.batch_key] + (["--latent"] if latent else [])
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} on {path} failed:\n{res.stderr[-4000:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["process_wall_s"] = time.perf_counter() - t
    print(f"  {mode}: {out['cells_per_s']:,.0f} cells/s, peak RSS {out['after_train']['rss_peak_gib']:.2f} GiB"
          + (f", latent {out['latent_s']:.0f} s" if latent else ""), flush=True)
    return out


def _median(vals):
    import statistics

    return statistics.median(vals) if vals else None


def report(payload: dict) -> str:
    lines = ["# Out-of-core training (backed .h5ad)", "",
             "Generated by `benchmarks/out_of_core.py` (see its docstring). Data: `benchmarks/make_large.py` cells "
             "sampled from a CountVAE (NB) fitted on pbmc4k (2,000 genes; z from the aggregated posterior, library "
             "sizes of the real cells, 2 batches with a simulated batch effect). Default CountVAE (ZINB, n_latent 10, "
             "n_hidden 128), `batch_key='batch'`, batch size 128, 1 torch thread, seed 0. Each measurement runs in a "
             "fresh process; peak RSS is `ru_maxrss` of that process (it includes ~0.4 GiB of imported libraries). "
             "The machine (2 CPUs) was shared with other jobs while this ran: timings are approximate.", "",
             f"Machine: {payload['machine']}; torch {payload['torch']}; anndata {payload['anndata']}; "
             f"h5py {payload['h5py']}.", ""]
    gen = [(payload[k]) for k in ("large_file", "medium_file") if payload.get(k)]
    if gen:
        lines += ["## Generating the files (`make_large.py`)", "",
                  "| cells | stored values per cell | file | generation time | cells/s | peak RSS |",
                  "|---|---|---|---|---|---|"]
        for g in gen:
            rss = f"{g['peak_rss_bytes'] / GiB:.2f} GiB" if "peak_rss_bytes" in g else "-"
            lines.append(f"| {g['n_cells']:,} | {g['nnz_per_cell']:.0f} | {g['file_bytes'] / GiB:.2f} GiB | "
                         f"{g['generation_seconds']:.0f} s | {g['n_cells'] / g['generation_seconds']:,.0f} | {rss} |")
        lines += ["", "Generation time excludes fitting the source model (80 epochs on pbmc4k, ~90 s, cached with "
                  "`--model-dir`); peak RSS is that of the whole generating process.", ""]
    big = payload.get("large")
    if big:
        n = big["n_cells"]
        lines += [f"## {n:,} cells out of core", "",
                  f"File: {big['file_gib']:.2f} GiB ({big['n_genes']:,} genes, CSR, uncompressed).", "",
                  "| step | time | peak RSS so far | RSS now |", "|---|---|---|---|",
                  f"| open backed (`read_h5ad(backed='r')`) | {big['read_s']:.1f} s | "
                  f"{big['after_imports']['rss_peak_gib']:.2f} GiB (after imports) | |",
                  "| `CountVAE(adata, out_of_core=True)`: streamed value checks, gene/cell totals | "
                  f"{big['init_s']:.1f} s | "
                  f"{big['after_init']['rss_peak_gib']:.2f} GiB | {big['after_init']['rss_now_gib']:.2f} GiB |",
                  f"| `train(max_epochs=1)`: {big['train_cells']:,} training cells + validation ELBO on "
                  f"{n - big['train_cells']:,} | {big['train_wall_s']:.0f} s ({big['cells_per_s']:,.0f} training "
                  f"cells/s) | {big['after_train']['rss_peak_gib']:.2f} GiB | "
                  f"{big['after_train']['rss_now_gib']:.2f} GiB |"]
        if "latent_s" in big:
            lines.append(f"| `get_latent_representation()` over all {n:,} cells | {big['latent_s']:.0f} s "
                         f"({n / big['latent_s']:,.0f} cells/s) | {big['after_latent']['rss_peak_gib']:.2f} GiB | "
                         f"{big['after_latent']['rss_now_gib']:.2f} GiB |")
        lines.append("")
        if big.get("validation_elbo"):
            lines.append(f"Train ELBO of the epoch {big['train_elbo'][-1]:.1f}, validation ELBO "
                         f"{big['validation_elbo'][-1]:.1f} nats per cell.")
        if "latent_kmeans_ari" in big:
            lines.append(f"Latent space after one epoch, {big['latent_kmeans_cells']:,} random cells: KMeans ARI "
                         f"{big['latent_kmeans_ari']:.3f}, NMI {big['latent_kmeans_nmi']:.3f} against "
                         f"`obs['cell_type']` (8 source cell types).")
        lines.append("")
    med = payload.get("medium") or []
    if med:
        n = med[0]["n_cells"]
        lines += [f"## {n:,} cells: in memory vs backed", "",
                  "| run | mode | read | CountVAE(...) | train cells/s | epoch time | peak RSS |",
                  "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(med):
            lines.append(f"| {i // 2 + 1} | {r['mode']} | {r['read_s']:.1f} s | {r['init_s']:.1f} s | "
                         f"{r['cells_per_s']:,.0f} | {sum(r['epoch_s']) / len(r['epoch_s']):.1f} s | "
                         f"{r['after_train']['rss_peak_gib']:.2f} GiB |")
        s = payload["summary"]
        lines += ["", f"Median cells/s: in memory {s['memory_cells_per_s']:,.0f}, "
                  f"backed {s['backed_cells_per_s']:,.0f}; "
                  f"**ratio backed / in memory {s['ratio']:.2f}** (goal >= 0.7).", ""]
    if payload.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    lines += ["Commands:", "", "```"] + payload["commands"] + ["```", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large", type=Path, help="the 1M-cell file (make_large.py)")
    p.add_argument("--medium", type=Path, help="the 100k-cell file (make_large.py --n-cells 100000)")
    p.add_argument("--medium-epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="in-memory / backed pairs on --medium")
    p.add_argument("--large-train-size", type=float, default=0.99)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-key", default="batch", help="obs column of the batch ('' for none)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "out_of_core")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render the report from this results JSON (and the files' make_large.py sidecars); "
                        "its optional 'notes' list becomes a Notes section")
    # one measurement (internal)
    p.add_argument("--phase", choices=("backed", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--train-size", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--latent", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        print("RESULT " + json.dumps(phase(args)), flush=True)
        return
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        for key, run in (("large_file", payload.get("large")), ("medium_file", (payload.get("medium") or [None])[0])):
            side = Path(f"{run['path']}.json") if run else None
            if side is not None and side.exists():
                payload[key] = json.loads(side.read_text())
        write_json_and_md(args.out, payload, report(payload))
        return
    if not args.large and not args.medium:
        p.error("give --large and/or --medium")
    payload = {"machine": machine_description(), "torch": package_version("torch"),
               "anndata": package_version("anndata"), "h5py": package_version("h5py"),
               "batch_size": args.batch_size, "threads": args.threads, "commands": []}
    cli = argv if argv is not None else sys.argv[1:]
    payload["commands"].append("python benchmarks/out_of_core.py " + " ".join(cli))
    for key, path in (("large_file", args.large), ("medium_file", args.medium)):
        side = Path(f"{path}.json") if path else None
        if side is not None and side.exists():  # written by make_large.py
            payload[key] = json.loads(side.read_text())
    if args.large:
        payload["large"] = run_phase("backed", args.large, args, 1, args.large_train_size, latent=True)
    if args.medium:
        payload["medium"] = []
        for _ in range(args.repeats):
            for mode in ("memory", "backed"):
                payload["medium"].append(run_phase(mode, args.medium, args, args.medium_epochs, 1.0, latent=False))
        mem = _median([r["cells_per_s"] for r in payload["medium"] if r["mode"] == "memory"])
        bk = _median([r["cells_per_s"] for r in payload["medium"] if r["mode"] == "backed"])
        payload["summary"] = {"memory_cells_per_s": mem, "backed_cells_per_s": bk, "ratio": bk / mem}
    write_json_and_md(args.out, payload, report(payload))


if __name__ == "__main__":
    main()
