#!/usr/bin/env python
"""KMeans against Leiden on cellvae's latent over many training seeds (issue 20: may the tests that moved from KMeans
to Leiden check KMeans again?).

For each seed: ``CountVAE(adata).train(seed=seed)`` at the defaults (all cells, early stopping), then on the latent
means (n_cells, n_latent): KMeans ARI / NMI with k = number of labels (``cellvae.metrics.clustering.kmeans_agreement``,
KMeans seed 0) and Leiden ARI / NMI with the resolution bisected to k clusters (``leiden_agreement``). One thread.

    .venv/bin/python benchmarks/kmeans_seeds.py [--dataset zeisel2015_cortex_subset_1464cells] [--seeds 0 1 2 3 4 5]

Results: ``benchmarks/results/kmeans_seeds.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, default_data_dir, git_commit, limit_threads, loadavg, machine_description  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="zeisel2015_cortex_subset_1464cells")
    p.add_argument("--labels-key", default="cell_type")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--data-dir", default=default_data_dir())
    a = p.parse_args(argv)
    limit_threads(1)
    warnings.filterwarnings("ignore")
    import anndata as ad
    import numpy as np

    from cellvae import CountVAE
    from cellvae.metrics import leiden_agreement
    from cellvae.metrics.clustering import kmeans_agreement

    adata = ad.read_h5ad(Path(a.data_dir) / f"{a.dataset}.h5ad")
    labels = adata.obs[a.labels_key].astype(str).to_numpy()
    meta = {"commit": git_commit("src"), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"),
            "machine": machine_description(), "load_start": loadavg(), "dataset": a.dataset,
            "command": "python benchmarks/kmeans_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows = []
    for seed in a.seeds:
        m = CountVAE(adata).train(seed=seed, progress_bar=False, n_threads=1)
        z = m.get_latent_representation()
        km, le = kmeans_agreement(z, labels, seed=0), leiden_agreement(z, labels, seed=0)
        rows.append({"seed": seed, "epochs": len(m.history["epoch"]), "kmeans_ari": km["ari"], "kmeans_nmi": km["nmi"],
                     "leiden_ari": le["ari"], "leiden_nmi": le["nmi"]})
        print(rows[-1], flush=True)
    meta["load_end"] = loadavg()
    c = meta["commit"]
    md = [f"# KMeans against Leiden over training seeds: {a.dataset}", "",
          f"- commit {c.get('commit')}{' (dirty)' if c.get('dirty') else ''}, {meta['date']}; {meta['machine']}; "
          f"load average {meta['load_start']} at start, {meta['load_end']} at end", f"- command: `{meta['command']}`",
          "- protocol: the docstring of `benchmarks/kmeans_seeds.py` (defaults, all cells, latent means).", "",
          "| seed | epochs | KMeans ARI | KMeans NMI | Leiden ARI | Leiden NMI |", "|---|---|---|---|---|---|"]
    md += [f"| {r['seed']} | {r['epochs']} | {r['kmeans_ari']:.3f} | {r['kmeans_nmi']:.3f} | {r['leiden_ari']:.3f} | "
           f"{r['leiden_nmi']:.3f} |" for r in rows]
    km = np.array([r["kmeans_ari"] for r in rows])
    le = np.array([r["leiden_ari"] for r in rows])
    md += ["", f"KMeans ARI below 0.5 in {int((km < 0.5).sum())} of {len(km)} seeds (min {km.min():.3f}); "
           f"Leiden ARI min {le.min():.3f}, mean {le.mean():.3f}.", ""]
    out = REPO_ROOT / "benchmarks" / "results" / "kmeans_seeds"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
