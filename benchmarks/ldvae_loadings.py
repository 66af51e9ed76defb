#!/usr/bin/env python
"""LDVAE gene loadings on Kang et al. 2018 (IFN-beta stimulated and control PBMCs): do known markers load on some
latent dimension (issue 26)?

A :class:`cellvae.LinearCountVAE` (LDVAE, Svensson et al. 2020; scvi-tools' LinearSCVI defaults: NB, n_latent 10,
n_hidden 128, batch norm in the decoder, no covariates) is trained on all 1,556 cells x 1,267 genes of
``kang2018_ifnb_pbmc_muscat.h5ad`` for each seed. For every latent dimension and sign the 20 genes with the
largest loading are listed, and the report names which known markers are among them: B cells (MS4A1, CD79A),
CD14+ monocytes (LYZ, CD14, S100A8, S100A9), FCGR3A+ monocytes (FCGR3A), NK / cytotoxic (GNLY, NKG7), T cells
(CD3D, IL7R, CD8A), and the interferon response of the stimulation (ISG15, IFIT1/2/3, IFI6, MX1, OAS1, IFITM3,
ISG20, LY6E, IFI44L, RSAD2, CXCL10). Each dimension is also correlated (over cells, latent mean) with the
stimulation (condition stim vs ctrl) and with each cell type, to say which axis it is. No peer is run: the
question is whether the loadings are interpretable, not a comparison.

Usage (from the repository root; about 3 min per seed on one thread)::

    .venv/bin/python benchmarks/ldvae_loadings.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, default_data_dir, git_commit, limit_threads, loadavg, machine_description  # noqa: E402

MARKERS = {
    "B": ["MS4A1", "CD79A"],
    "CD14 mono": ["LYZ", "CD14", "S100A8", "S100A9"],
    "FCGR3A mono": ["FCGR3A"],
    "NK/cytotoxic": ["GNLY", "NKG7"],
    "T": ["CD3D", "IL7R", "CD8A"],
    "IFN response": ["ISG15", "IFIT1", "IFIT2", "IFIT3", "IFI6", "MX1", "OAS1", "IFITM3", "ISG20", "LY6E", "IFI44L",
                     "RSAD2", "CXCL10"],
}
N_TOP = 20


def run(seed: int, data_dir: Path, max_epochs: int | None) -> dict:
    import anndata as ad
    import numpy as np

    import cellvae
    from cellvae.analysis.loadings import top_loadings

    a = ad.read_h5ad(Path(data_dir) / "kang2018_ifnb_pbmc_muscat.h5ad")
    t0 = time.perf_counter()
    m = cellvae.LinearCountVAE(a, n_latent=10)
    m.train(max_epochs=max_epochs, seed=seed, progress_bar=False)
    secs = time.perf_counter() - t0
    load = m.get_loadings()
    top = top_loadings(load, N_TOP)
    z = m.get_latent_representation()
    stim = (a.obs["condition"].astype(str) == "stim").to_numpy().astype(float)
    types = a.obs["cell_type"].astype(str).to_numpy()
    dims = []
    for k, dim in enumerate(load.columns):
        zc = z[:, k]
        corr = {"stim": float(np.corrcoef(zc, stim)[0, 1])}
        for t in sorted(set(types)):
            corr[t] = float(np.corrcoef(zc, (types == t).astype(float))[0, 1])
        for sign in ("+", "-"):
            genes = top[(top["dimension"] == dim) & (top["sign"] == sign)]["gene"].tolist()
            hits = {grp: [g for g in gs if g in genes] for grp, gs in MARKERS.items()}
            s = 1.0 if sign == "+" else -1.0  # the direction in which these genes go up
            best = max(corr, key=lambda c: s * corr[c])
            dims.append({"dimension": dim, "sign": sign, "top_genes": genes,
                         "markers": {g: h for g, h in hits.items() if h},
                         "strongest_association": best, "association_r": s * corr[best]})
    return {"seed": seed, "epochs": len(m.history["epoch"]), "train_seconds": round(secs, 1),
            "validation_elbo": float(m.history["validation_elbo"][m.history["best_epoch"] - 1]), "dimensions": dims}


def markdown(payload: dict) -> str:
    lines = [
        "# LDVAE loadings on Kang 2018 (issue 26)",
        "",
        f"commit {payload['commit']['commit']}{' (dirty)' if payload['commit']['dirty'] else ''}, "
        f"{payload['date']}, load average {payload['loadavg']} (1 min) at start, {payload['machine']}.",
        "",
        "`cellvae.LinearCountVAE` (LinearSCVI defaults: NB, n_latent 10, n_hidden 128, decoder batch norm), all "
        "1,556 cells x 1,267 genes, no covariates, default epochs with early stopping. For each latent dimension and "
        f"sign, the known markers among its top {N_TOP} genes by loading, and the cell group (stimulation or cell "
        "type) whose indicator correlates most with the latent mean in that direction (Pearson r over cells).",
        "",
        "Command: `.venv/bin/python benchmarks/ldvae_loadings.py " + " ".join(payload["argv"]) + "`",
        "",
    ]
    for run_ in payload["runs"]:
        lines += [f"## seed {run_['seed']}: {run_['epochs']} epochs, {run_['train_seconds']} s, validation ELBO "
                  f"{run_['validation_elbo']:.2f} nats/cell", "",
                  "| dimension | sign | markers in the top 20 | strongest association (r) | top 8 genes |",
                  "| --- | --- | --- | --- | --- |"]
        for d in run_["dimensions"]:
            mk = "; ".join(f"{g}: {', '.join(h)}" for g, h in d["markers"].items()) or "-"
            lines.append(f"| {d['dimension']} | {d['sign']} | {mk} | {d['strongest_association']} "
                         f"({d['association_r']:.2f}) | {', '.join(d['top_genes'][:8])} |")
        lines.append("")
    found = {}
    for run_ in payload["runs"]:
        for d in run_["dimensions"]:
            for grp, hits in d["markers"].items():
                found.setdefault(grp, set()).add(run_["seed"])
    lines += ["## Summary", "", "| marker group | seeds with some of its markers in a top-20 list |", "| --- | --- |"]
    for grp in MARKERS:
        lines.append(f"| {grp} ({', '.join(MARKERS[grp])}) | {sorted(found.get(grp, []))} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "ldvae_loadings"))
    args = p.parse_args(argv)
    limit_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from _common import write_json_and_md

    payload = {"commit": git_commit("src"), "date": _dt.date.today().isoformat(), "loadavg": loadavg(),
               "machine": machine_description(), "argv": sys.argv[1:] if argv is None else list(argv),
               "runs": [run(s, Path(args.data_dir), args.max_epochs) for s in args.seeds]}
    write_json_and_md(Path(args.out), payload, markdown(payload))


if __name__ == "__main__":
    main()
