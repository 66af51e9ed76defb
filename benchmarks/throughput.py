#!/usr/bin/env python
"""Training speed as a user meets it: cellvae ``CountVAE`` vs scvi-tools ``SCVI`` on every labelled dataset, at 1
thread each, 2 threads each and each tool's default threads, and the time to scvi-tools' default-trained quality
(issue 22).

Data and split: the datasets of ``vs_scvi.py`` (``DATASETS``; > 5000 genes reduced to 2000 seurat_v3 HVGs by
``_common.load_dataset``), seed 0's split of ``vs_scvi.make_split`` (90 % training cells, 10 % held out; genes
without counts in the training cells dropped).

``--mode speed`` (default). Equal settings for both tools: ZINB, gene dispersion, 128 hidden units, 10 latent
dimensions, 1 layer, batch 128, ``E = clamp(round(100000 / n_train), 5, 50)`` epochs, KL warm-up over all E epochs,
no early stopping, each tool's internal 90/10 split (cellvae evaluates its validation cells every epoch, scvi-tools
by default does not). Thread settings (``--threads``): ``1`` (both 1), ``2`` (both 2), ``default`` (cellvae
``n_threads=None``: the idle cores, ``cellvae.train.threads.default_n_threads``; scvi-tools torch's default). Per
dataset and setting, ``--rounds`` (3) pairs alternate the order of the tools; each training runs in a fresh child
process (``.venv-bench``, both tools importable) and reports the wall seconds of ``train()``, cells/s (training cells
x epochs / seconds) and the held-out ELBO (nats per cell, one z sample). The 1-minute load average is read before
and after each pair; pairs with load > ``--quiet-load`` (1.0) at either end are marked and left out of the medians
(when a dataset has no quiet pair, the median of all pairs is shown in brackets).

The load average counts the benchmark's own threads, so a 2-thread or default-thread run puts it near 2 by itself
and such pairs are never quiet by that rule. Each run therefore also records the CPU time that *other* processes
used during it: the busy CPU time of the whole machine (``/proc/stat``: all states but idle and iowait) minus the
CPU time of the run's child process and of this process, divided by the run's wall time (``other_cpus``, in CPUs:
0 on an idle machine, 2 when other work fills both CPUs). The report gives, beside the load rule's medians, the
medians over pairs whose runs all had ``other_cpus`` <= ``--quiet-other`` (0.1 CPUs): quiet by other work.

``--mode ttq``: time to scvi-tools' default-trained held-out ELBO. scvi-tools trains at its defaults (epoch heuristic
``min(400, round(20000 / n * 400))``, 400-epoch KL warm-up, no early stopping) and its held-out ELBO is the target;
in the same run cellvae trains at its defaults with ``max_epochs`` = 12.5 %, 25 %, 50 % and 100 % of its own
default epochs (each a full run from scratch with that budget; the KL warm-up is half of it), in that order, until
its held-out ELBO reaches the target. Time to quality = the wall seconds of that run (an upper bound of the time at
which cellvae first reaches the target). Reported separately: the per-step speed-up (cells/s ratio) and the epoch
ratio. Threads: each tool's default.

    .venv-bench/bin/python benchmarks/throughput.py [--threads 1 2 default] [--rounds 3] [--datasets ...]
    .venv-bench/bin/python benchmarks/throughput.py --mode ttq [--datasets ...]
    .venv-bench/bin/python benchmarks/throughput.py --report-only

Results: ``benchmarks/results/throughput.{md,json}`` (rows merged by key; the Markdown is rebuilt from all rows).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO_ROOT, atomic_write_text, default_data_dir, git_commit, load_dataset, machine_description, newest_commit)

RESULTS = REPO_ROOT / "benchmarks" / "results"
ARCH = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "gene_likelihood": "zinb", "dispersion": "gene"}
BATCH = 128
TTQ_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _busy_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (``cellvae.train.threads.cpu_times``: all states but idle
    and iowait), or None where there is no ``/proc/stat``."""
    from cellvae.train.threads import cpu_times

    t = cpu_times()
    return None if t is None else t[0] - t[1]


def speed_epochs(n_train: int) -> int:
    return int(min(50, max(5, round(100_000 / n_train))))


def _prepare(data_dir: str, name: str, label_key: str):
    """(train AnnData, held-out AnnData) of seed 0's split (as vs_scvi.py)."""
    import numpy as np
    import vs_scvi

    adata, _, _ = load_dataset(Path(data_dir), name, label_key)
    X = adata.X.tocsr() if hasattr(adata.X, "tocsr") else adata.X
    tr, ho, _ = vs_scvi.make_split(adata.n_obs, 0)
    genes = np.asarray((X[tr] > 0).sum(0)).ravel() > 0
    held = adata[ho][:, genes].copy()
    held = held[np.asarray(held.X.sum(1)).ravel() > 0].copy()
    return adata[tr][:, genes].copy(), held


def _child(task: dict) -> dict:
    threads = task["threads"]
    if threads != "default":
        for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[v] = str(threads)
    import warnings

    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    if threads != "default":
        torch.set_num_threads(int(threads))
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # the one-off torch._dynamo import, charged to neither
    train, held = _prepare(task["data_dir"], task["dataset"], task["label_key"])
    n = train.n_obs
    out = {"n_train": n, "n_genes": int(train.n_vars)}
    if task["tool"] == "scvi":
        import logging

        import scvi

        scvi.settings.seed = 0
        scvi.settings.verbosity = logging.WARNING
        for lg in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric"):
            logging.getLogger(lg).setLevel(logging.ERROR)
        scvi.model.SCVI.setup_anndata(train)
        m = scvi.model.SCVI(train, **ARCH)
        kw = {} if task["epochs"] is None else {"max_epochs": task["epochs"],
                                                 "plan_kwargs": {"n_epochs_kl_warmup": task["epochs"]}}
        t0 = time.perf_counter()
        m.train(accelerator="cpu", enable_progress_bar=False, batch_size=BATCH, **kw)
        sec = time.perf_counter() - t0
        epochs = len(m.history["elbo_train"])
        torch.manual_seed(0)
        elbo = float(torch.as_tensor(m.get_elbo(held, batch_size=BATCH, return_mean=False)).double().mean())
        out.update(version=scvi.__version__, threads_used=torch.get_num_threads(), n_internal=len(m.train_indices))
    else:
        import cellvae

        m = cellvae.CountVAE(train, **ARCH)
        kw = {"seed": 0, "progress_bar": False, "batch_size": BATCH,
              "n_threads": None if threads == "default" else int(threads)}
        if task["epochs"] is not None:
            kw.update(max_epochs=task["epochs"])
            if task["mode"] == "speed":
                kw.update(n_epochs_kl_warmup=task["epochs"], early_stopping=False)
        t0 = time.perf_counter()
        m.train(**kw)
        sec = time.perf_counter() - t0
        epochs = len(m.history["epoch"])
        elbo = float(np.mean(m.get_elbo(held, return_mean=False, seed=0)))
        out.update(version=cellvae.__version__, threads_used=m.history.get("n_threads"),
                   n_internal=len(m.train_indices), default_max_epochs=cellvae.settings.default_max_epochs(n))
    n_int = out["n_internal"]
    out["child_cpu_seconds"] = time.process_time()  # the whole child process so far: imports, data, training
    out.update(seconds=sec, epochs=epochs, cells_per_second=n_int * epochs / sec, heldout_elbo=elbo)
    return out


def _run(task: dict) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_child, (task,))


def _key(r: dict) -> tuple:
    return (r["mode"], r["dataset"], str(r.get("threads")), r.get("round"), r["tool"], r.get("budget"))


def _save(path: Path, rows: list[dict], meta: dict) -> None:
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = {_key(r): r for r in old}
    merged.update({_key(r): r for r in rows})
    payload = {"meta": meta, "rows": list(merged.values())}
    atomic_write_text(path, json.dumps(payload, indent=2))
    atomic_write_text(path.with_suffix(".md"), report(payload, meta.get("quiet_load", 1.0)))


def report(payload: dict, quiet_load: float) -> str:
    rows = payload["rows"]
    commits = sorted({r.get("commit", "?") for r in rows})
    dates = sorted({r.get("date", "?")[:10] for r in rows})
    lines = ["# Training speed: cellvae vs scvi-tools (issue 22)", "",
             f"commit {newest_commit(rows)}, {dates[-1]} (the newest row; all rows: commits {', '.join(commits)}, "
             f"dates {', '.join(dates)}); {payload['meta'].get('machine')}", "",
             "- protocol: the docstring of `benchmarks/throughput.py`; a pair is quiet when the 1-minute load average "
             f"is <= {quiet_load} before and after it; medians over quiet pairs (brackets: no quiet pair, median of "
             "all pairs); a pair is quiet by other work when both runs had other processes' CPU use "
             f"(`other_cpus`) <= {payload['meta'].get('quiet_other', 0.1)} CPUs (pairs recorded before this measure "
             "have none: -)", ""]
    sp = [r for r in rows if r["mode"] == "speed" and not r.get("error")]
    if sp:
        lines += ["## Cells per second at equal settings", "",
                  "| dataset | threads | epochs | cellvae cells/s | scvi-tools cells/s | ratio | quiet pairs | "
                  "held-out ELBO cellvae | scvi-tools | diff % | loads (start→end) | other CPUs (max of pair) | "
                  "quiet by other work | ratio, quiet by other work |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        quiet_other = payload["meta"].get("quiet_other", 0.1)
        ratios: dict[str, list[float]] = {}
        ratios_other: dict[str, list[float]] = {}
        every: dict[str, list[float]] = {}  # the table's ratio of every dataset, quiet pairs or not
        commits_of: dict[str, set] = {}
        for ds in sorted({r["dataset"] for r in sp}):
            for th in ("1", "2", "default"):
                pairs = {}
                for r in sp:
                    if r["dataset"] == ds and str(r["threads"]) == th:
                        pairs.setdefault(r["round"], {})[r["tool"]] = r
                pairs = [p for p in pairs.values() if "cellvae" in p and "scvi" in p]
                if not pairs:
                    continue
                quiet = [p for p in pairs if max(p["cellvae"]["load_start"], p["cellvae"]["load_end"],
                                                 p["scvi"]["load_start"], p["scvi"]["load_end"]) <= quiet_load]
                use = quiet or pairs
                c = statistics.median(p["cellvae"]["cells_per_second"] for p in use)
                s = statistics.median(p["scvi"]["cells_per_second"] for p in use)
                ec = statistics.median(p["cellvae"]["heldout_elbo"] for p in use)
                es = statistics.median(p["scvi"]["heldout_elbo"] for p in use)
                ratio = c / s
                every.setdefault(th, []).append(ratio)
                commits_of.setdefault(th, set()).update(p[t].get("commit", "?") for p in pairs for t in p)
                if quiet:
                    ratios.setdefault(th, []).append(ratio)
                loads = "; ".join(f"{min(p['cellvae']['load_start'], p['scvi']['load_start']):.2f}→"
                                  f"{max(p['cellvae']['load_end'], p['scvi']['load_end']):.2f}" for p in pairs)
                fmt = (lambda v: f"{v}") if quiet else (lambda v: f"[{v}]")
                others = [max(p["cellvae"].get("other_cpus", math.inf), p["scvi"].get("other_cpus", math.inf))
                          for p in pairs]
                quiet_o = [p for p, o in zip(pairs, others) if o <= quiet_other]
                if quiet_o:
                    ratio_o = (statistics.median(p["cellvae"]["cells_per_second"] for p in quiet_o)
                               / statistics.median(p["scvi"]["cells_per_second"] for p in quiet_o))
                    ratios_other.setdefault(th, []).append(ratio_o)
                other_txt = "; ".join("-" if math.isinf(o) else f"{o:.2f}" for o in others)
                lines.append(f"| {ds} | {th} (used: cellvae {pairs[0]['cellvae'].get('threads_used')}, scvi "
                             f"{pairs[0]['scvi'].get('threads_used')}) | {pairs[0]['cellvae']['epochs']} | "
                             f"{fmt(f'{c:,.0f}')} | {fmt(f'{s:,.0f}')} | {fmt(f'{ratio:.2f}x')} | "
                             f"{len(quiet)}/{len(pairs)} | {ec:.1f} | {es:.1f} | {100 * (ec - es) / abs(es):+.2f} | "
                             f"{loads} | {other_txt} | {len(quiet_o)}/{len(pairs)} | "
                             f"{f'{ratio_o:.2f}x' if quiet_o else '-'} |")
        lines.append("")
        for th, rs in ratios.items():
            lines.append(f"- threads {th}: ratio over datasets with quiet pairs: min {min(rs):.2f}x, median "
                         f"{statistics.median(rs):.2f}x, geometric mean "
                         f"{math.exp(sum(math.log(x) for x in rs) / len(rs)):.2f}x ({len(rs)} datasets)")
        for th, rs in ratios_other.items():
            lines.append(f"- threads {th}: ratio over datasets with pairs quiet by other work (other CPUs <= "
                         f"{quiet_other}): min {min(rs):.2f}x, median {statistics.median(rs):.2f}x, geometric mean "
                         f"{math.exp(sum(math.log(x) for x in rs) / len(rs)):.2f}x ({len(rs)} datasets)")
        for th, rs in every.items():
            lines.append(f"- threads {th}: ratio over all datasets (the table's medians, quiet pairs or not): min "
                         f"{min(rs):.2f}x, median {statistics.median(rs):.2f}x, geometric mean "
                         f"{math.exp(sum(math.log(x) for x in rs) / len(rs)):.2f}x ({len(rs)} datasets; rows of "
                         f"commit(s) {', '.join(sorted(commits_of[th]))})")
        lines.append("")
    tq = [r for r in rows if r["mode"] == "ttq" and not r.get("error")]
    if tq:
        lines += ["## Time to scvi-tools' default-trained held-out ELBO (each tool's default threads)", "",
                  "| dataset | scvi-tools: epochs, s, held-out ELBO | cellvae: budget epochs (run), s, held-out ELBO | "
                  "time ratio | per-step (cells/s) ratio | epoch ratio | loads | commit, date |",
                  "|---|---|---|---|---|---|---|---|"]
        for ds in sorted({r["dataset"] for r in tq}):
            s = next((r for r in tq if r["dataset"] == ds and r["tool"] == "scvi"), None)
            cs = sorted((r for r in tq if r["dataset"] == ds and r["tool"] == "cellvae"), key=lambda r: r["budget"])
            if s is None or not cs:
                continue
            hit = next((r for r in cs if r["heldout_elbo"] >= s["heldout_elbo"]), None)
            if hit is None:
                lines.append(f"| {ds} | {s['epochs']}, {s['seconds']:.0f}, {s['heldout_elbo']:.1f} | not reached "
                             f"(best {max(r['heldout_elbo'] for r in cs):.1f}) | - | - | - | | {s.get('commit', '?')}, "
                             f"{s.get('date', '?')[:10]} |")
                continue
            lines.append(f"| {ds} | {s['epochs']}, {s['seconds']:.0f}, {s['heldout_elbo']:.1f} | {hit['budget']} "
                         f"({hit['epochs']}), {hit['seconds']:.1f}, {hit['heldout_elbo']:.1f} | "
                         f"{s['seconds'] / hit['seconds']:.2f}x | "
                         f"{hit['cells_per_second'] / s['cells_per_second']:.2f}x | "
                         f"{s['epochs'] / hit['epochs']:.2f}x | {s['load_start']:.2f}, {hit['load_start']:.2f} | "
                         f"{hit.get('commit', '?')}, {hit.get('date', '?')[:10]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import vs_scvi

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("speed", "ttq"), default="speed")
    p.add_argument("--datasets", nargs="+", default=list(vs_scvi.DATASETS))
    p.add_argument("--threads", nargs="+", default=["1", "2", "default"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quiet-load", type=float, default=1.0)
    p.add_argument("--quiet-other", type=float, default=0.1)
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--json", default=str(RESULTS / "throughput.json"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    path = Path(args.json)
    meta = {"machine": machine_description(), "quiet_load": args.quiet_load, "quiet_other": args.quiet_other}
    if args.report_only:
        _save(path, [], json.loads(path.read_text())["meta"] if path.exists() else meta)
        print(path.with_suffix(".md").read_text())
        return 0
    base = {"mode": args.mode, "data_dir": args.data_dir, **git_commit("src")}

    def run(task: dict) -> dict:
        row = {**task, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "load_start": _loadavg()}
        busy0, own0, wall0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        try:
            row.update(_run(task))
        except Exception as e:  # noqa: BLE001 - recorded
            row["error"] = repr(e)
        busy1, own1, wall1 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        row["load_end"] = _loadavg()
        if busy0 is not None and busy1 is not None and "child_cpu_seconds" in row:
            other = (busy1 - busy0) - row["child_cpu_seconds"] - (own1 - own0)
            row["other_cpus"] = round(max(0.0, other) / (wall1 - wall0), 3)
        print(json.dumps({k: row.get(k) for k in ("dataset", "tool", "threads", "round", "budget", "epochs",
                                                  "seconds", "cells_per_second", "heldout_elbo", "load_start",
                                                  "load_end", "other_cpus", "error")}), flush=True)
        return row

    for ds in args.datasets:
        lk = vs_scvi.DATASETS[ds]
        if args.mode == "speed":
            import anndata as ad

            n = ad.read_h5ad(Path(args.data_dir) / f"{ds}.h5ad", backed="r").n_obs
            epochs = speed_epochs(int(0.9 * n))
            for th in args.threads:
                for r in range(args.rounds):
                    order = ("cellvae", "scvi") if r % 2 == 0 else ("scvi", "cellvae")
                    rows = [run({**base, "dataset": ds, "label_key": lk, "tool": t, "threads": th, "round": r,
                                 "epochs": epochs}) for t in order]
                    for row in rows:  # the pair's loads: the first tool's start and the second's end
                        row["pair_load_start"], row["pair_load_end"] = rows[0]["load_start"], rows[-1]["load_end"]
                    _save(path, rows, meta)
        else:
            s = run({**base, "dataset": ds, "label_key": lk, "tool": "scvi", "threads": "default", "epochs": None,
                     "budget": None})
            _save(path, [s], meta)
            from cellvae.settings import default_max_epochs

            full = default_max_epochs(_prepare(args.data_dir, ds, lk)[0].n_obs)
            for f in TTQ_FRACTIONS:
                e = max(2, int(round(f * full)))
                c = run({**base, "dataset": ds, "label_key": lk, "tool": "cellvae", "threads": "default",
                         "epochs": e, "budget": e})
                _save(path, [c], meta)
                if not s.get("error") and not c.get("error") and c["heldout_elbo"] >= s["heldout_elbo"]:
                    break
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
