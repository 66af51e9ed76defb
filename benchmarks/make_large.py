"""Write a large synthetic single-cell .h5ad (default 1,000,000 cells x 2,000 genes) sampled from a CountVAE fitted
on a real dataset, chunk by chunk, without ever holding the whole matrix in memory.

    python benchmarks/make_large.py --n-cells 1000000 --out /tmp/large_1M.h5ad

How a cell is made (all randomness from ``--seed``):

1. A :class:`cellvae.CountVAE` (``--likelihood`` nb by default, or zinb) is fitted on ``--source`` (default
   ``pbmc4k_10x_top2000genes.h5ad`` from ``$CELLVAE_DATA_DIR`` / ``../shared/data``) for ``--epochs`` epochs, or
   loaded from ``--model-dir`` when that holds a saved model (a fitted model is saved there).
2. Each generated cell picks a random real cell i (uniformly) and draws ``z ~ q(z | x_i)``: a sample of the
   *aggregated posterior* ``(1/n) sum_i q(z | x_i)``, so the cell-type structure of the real data is kept (z from
   the prior N(0, I) would blur it); ``obs['cell_type']`` is cell i's label and ``obs['source_cell']`` its name.
3. Its library size is cell i's observed total count times ``exp(N(0, 0.1^2))`` (the empirical distribution of
   the real library sizes, jointly with the cell type, slightly jittered).
4. ``obs['batch']`` is one of ``--n-batches`` batches at random; each batch multiplies the decoded expression
   ``rho`` by its own per-gene factor ``exp(N(0, --batch-effect^2))`` (renormalized to sum to 1), a simulated
   batch effect (``--batch-effect 0`` for none).
5. Counts are drawn from the fitted likelihood ``p(x | z, l)`` (NB: Gamma-Poisson; ZINB adds structural zeros)
   with :mod:`cellvae.distributions`.

The matrix is written as CSR in anndata's on-disk layout (group ``X`` with ``encoding-type=csr_matrix``,
``encoding-version=0.1.0``, ``shape``; datasets ``data`` float32, ``indices`` int32, ``indptr`` int64) into
resizable HDF5 datasets, one chunk of cells at a time; ``obs``/``var``/``uns`` are written by anndata first. The
file is written under a temporary name and renamed (``os.replace``) when complete, then opened with
``anndata.read_h5ad(path, backed="r")`` and rows of two chunks are compared with what was written. Time, size and
peak RSS go to stdout and to ``<out>.json``.

Why not :func:`cellvae.generate.sample`: it returns an in-memory AnnData with three more dense layers (mean,
normalized, counts) and resamples library sizes independently of the cell; here only the counts of one chunk are
ever dense. The sampling itself is the model's own (``module.inference`` / ``module.generative`` / ``px.sample``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_data_dir, limit_threads  # noqa: E402

DEFAULT_SOURCE = "pbmc4k_10x_top2000genes.h5ad"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", type=int, default=1_000_000, help="cells to generate (default 1,000,000)")
    p.add_argument("--out", type=Path, default=None,
                   help="output .h5ad (default: large_<N>cells.h5ad in the system's temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=10_000, help="cells generated and written per step")
    p.add_argument("--source", default=DEFAULT_SOURCE, help="real dataset (file name in --data-dir, or a path)")
    p.add_argument("--data-dir", default=default_data_dir())
    p.add_argument("--label-key", default="cell_type", help="obs column of the source's cell types")
    p.add_argument("--likelihood", choices=("nb", "zinb"), default="nb")
    p.add_argument("--epochs", type=int, default=60, help="training epochs of the source model")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="load the source model from here if saved there, else fit it and save it here")
    p.add_argument("--n-batches", type=int, default=2)
    p.add_argument("--batch-effect", type=float, default=0.2, help="sd of the per-gene log batch factors")
    p.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none",
                   help="HDF5 compression of X (none: largest file, fastest to read)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.n_cells < 1 or a.chunk_size < 1 or a.n_batches < 1:
        p.error("--n-cells, --chunk-size and --n-batches must be >= 1")
    if a.out is None:
        a.out = Path(tempfile.gettempdir()) / f"large_{a.n_cells}cells.h5ad"
    return a


def fit_source_model(args, log):
    """The source AnnData and a CountVAE fitted on it (or loaded from ``--model-dir``)."""
    import anndata as ad

    from cellvae import CountVAE

    src_path = Path(args.source) if Path(args.source).exists() else Path(args.data_dir) / args.source
    src = ad.read_h5ad(src_path)
    if args.label_key not in src.obs.columns:
        src.obs[args.label_key] = "unknown"
    src.obs[args.label_key] = src.obs[args.label_key].astype(str)
    if args.model_dir is not None and (Path(args.model_dir) / "config.json").exists():
        model = CountVAE.load(args.model_dir, adata=src)
        log(f"source model loaded from {args.model_dir}")
        if model.module_kwargs["gene_likelihood"] != args.likelihood:
            log(f"  (its likelihood is {model.module_kwargs['gene_likelihood']!r}, not --likelihood {args.likelihood})")
        return src, src_path, model, 0.0
    t0 = time.perf_counter()
    model = CountVAE(src, gene_likelihood=args.likelihood, labels_key=args.label_key)
    model.train(max_epochs=args.epochs, seed=args.seed, progress_bar=False, n_threads=args.threads)
    fit_s = time.perf_counter() - t0
    log(f"source model: {args.epochs} epochs on {src.n_obs} cells x {len(model.spec.gene_names)} genes in "
        f"{fit_s:.1f} s, validation ELBO {model.history['validation_elbo'][-1]:.1f}")
    if args.model_dir is not None:
        model.save(args.model_dir, overwrite=True)
    return src, src_path, model, fit_s


def main(argv=None) -> dict:
    args = parse_args(argv)
    limit_threads(args.threads)
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    import torch

    from cellvae.vae.module import evaluation

    torch.set_num_threads(args.threads)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    t_start = time.perf_counter()
    src, src_path, model, fit_s = fit_source_model(args, log)
    module = model.module
    genes = list(model.spec.gene_names)
    g = len(genes)

    # Posterior of every real cell (mean and variance of q(z|x)) and its observed library size.
    data = model.prepared_data()
    qm, qv, lib = [], [], []
    with evaluation(module, args.seed):
        for x, cat, cont in data.iterate(torch.arange(data.n_cells), 1024):
            inf = module.inference(x, cat, cont)
            qm.append(inf["qz_m"])
            qv.append(inf["qz_v"])
            lib.append(x.sum(1))
    qm, qv, lib = torch.cat(qm), torch.cat(qv), torch.cat(lib).double().numpy()
    ok = lib > 0
    src_cells = np.flatnonzero(ok)

    # Per-cell choices, drawn up front (independent of --chunk-size): source cell, batch, library jitter.
    n = int(args.n_cells)
    rng = np.random.default_rng(args.seed)
    pick = src_cells[rng.integers(0, len(src_cells), size=n)]
    batch = rng.integers(0, args.n_batches, size=n)
    libsize = (lib[pick] * np.exp(rng.normal(0.0, 0.1, size=n))).astype(np.float32)
    batch_factor = torch.as_tensor(np.exp(rng.normal(0.0, args.batch_effect, size=(args.n_batches, g))),
                                   dtype=torch.float32) if args.batch_effect > 0 else None
    labels = src.obs[args.label_key].astype(str).to_numpy()
    width = len(str(n - 1))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(labels[pick]),
            "batch": pd.Categorical.from_codes(batch, categories=[f"batch{b}" for b in range(args.n_batches)]),
            "source_cell": pd.Categorical.from_codes(pick, categories=src.obs_names.astype(str)),
            "library_size": libsize,
        },
        index=pd.Index([f"gen{i:0{width}d}" for i in range(n)]),
    )
    obs["source_cell"] = obs["source_cell"].cat.remove_unused_categories()
    var = pd.DataFrame(index=pd.Index(genes))
    uns = {"make_large": {
        "source": str(src_path.name), "n_source_cells": int(src.n_obs), "seed": int(args.seed),
        "likelihood": model.module_kwargs["gene_likelihood"], "source_epochs": int(args.epochs),
        "z": "aggregated posterior: z ~ q(z | x_i) of a uniformly drawn real cell i",
        "library": "observed total counts of cell i times exp(N(0, 0.1^2))",
        "batch_effect_sd": float(args.batch_effect), "n_batches": int(args.n_batches),
    }}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part{os.getpid()}")
    comp = None if args.compression == "none" else args.compression
    t_gen = time.perf_counter()
    check = {}  # rows of two chunks, kept to compare with the file
    check_chunks = {0, (n - 1) // args.chunk_size}
    try:
        ad.AnnData(obs=obs, var=var, uns=uns).write_h5ad(tmp)
        del obs
        with h5py.File(tmp, "a") as f:
            grp = f.create_group("X")
            grp.attrs["encoding-type"] = "csr_matrix"
            grp.attrs["encoding-version"] = "0.1.0"
            grp.attrs["shape"] = np.array([n, g], dtype=np.int64)
            kw = dict(maxshape=(None,), chunks=(1 << 18,), compression=comp)
            d_data = grp.create_dataset("data", shape=(0,), dtype=np.float32, **kw)
            d_ind = grp.create_dataset("indices", shape=(0,), dtype=np.int32, **kw)
            d_ptr = grp.create_dataset("indptr", shape=(n + 1,), dtype=np.int64)
            d_ptr[0] = 0
            nnz = 0
            with evaluation(module, args.seed):
                for ci, a in enumerate(range(0, n, args.chunk_size)):
                    b = min(n, a + args.chunk_size)
                    src_i = torch.as_tensor(pick[a:b])
                    z = qm[src_i] + qv[src_i].sqrt() * torch.randn(b - a, qm.shape[1])
                    log_l = torch.log(torch.as_tensor(libsize[a:b])).view(-1, 1)
                    cat = torch.zeros(b - a, 1 + len(model.spec.categorical_covariate_keys), dtype=torch.int64)
                    gen = module.generative(z, log_l, cat, None)
                    px = gen["px"]
                    if batch_factor is not None:
                        rho = gen["rho"] * batch_factor[torch.as_tensor(batch[a:b])]
                        px.mu = torch.exp(log_l) * (rho / rho.sum(1, keepdim=True))
                    counts = px.sample().numpy()
                    m = sp.csr_matrix(counts, dtype=np.float32)
                    del counts
                    k = m.nnz
                    d_data.resize((nnz + k,))
                    d_ind.resize((nnz + k,))
                    d_data[nnz:nnz + k] = m.data
                    d_ind[nnz:nnz + k] = m.indices.astype(np.int32, copy=False)
                    d_ptr[a + 1:b + 1] = nnz + m.indptr[1:].astype(np.int64)
                    nnz += k
                    if ci in check_chunks:
                        check[(a, b)] = m
                    if not args.quiet and (ci % 10 == 0 or b == n):
                        el = time.perf_counter() - t_gen
                        log(f"  {b:>10,} / {n:,} cells, {nnz / b:.0f} stored values per cell, {el:.0f} s")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    gen_s = time.perf_counter() - t_gen

    # Check: the file opens backed and rows come back as written.
    back = ad.read_h5ad(out, backed="r")
    assert back.shape == (n, g), back.shape
    for (a, b), m in check.items():
        got = back.X[a:b]
        if not (got.shape == m.shape and (got != m).nnz == 0):
            raise RuntimeError(f"rows {a}:{b} of {out} differ from what was written")
    n_types = back.obs["cell_type"].nunique()
    back.file.close()
    size = out.stat().st_size
    import resource

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes on Linux
    result = {
        "path": str(out), "n_cells": n, "n_genes": g, "nnz": int(nnz), "nnz_per_cell": nnz / n,
        "file_bytes": int(size), "generation_seconds": gen_s, "source_fit_seconds": fit_s,
        "total_seconds": time.perf_counter() - t_start, "n_cell_types": int(n_types),
        "median_library_size": float(np.median(libsize)), "compression": args.compression,
        "likelihood": model.module_kwargs["gene_likelihood"], "chunk_size": int(args.chunk_size),
        "peak_rss_bytes": int(peak_rss),
    }
    log(f"wrote {out}: {n:,} cells x {g:,} genes, {nnz:,} stored values ({nnz / n:.0f} per cell), "
        f"{size / 2**30:.2f} GiB, generated and written in {gen_s:.1f} s ({n / gen_s:,.0f} cells/s); "
        f"total {result['total_seconds']:.1f} s; peak RSS {peak_rss / 2**30:.2f} GiB; checked: opens backed, rows "
        "as written")
    side = Path(f"{out}.json")  # what benchmarks/out_of_core.py reports about the file
    tmp_side = side.with_name(f".{side.name}.part{os.getpid()}")
    tmp_side.write_text(json.dumps(result, indent=2))
    os.replace(tmp_side, side)
    if not args.quiet:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
