"""Training-step CPU time and training cells/s: dense vs sparse (CSR) minibatches, in one process (issue 6).

A step is what ``cellvae.train.train_module`` does per minibatch: forward, backward, the finiteness check and the
Adam update; pbmc4k (2,000 genes, raw counts), ZINB, gene dispersion, n_hidden 128, n_latent 10, batch 128,
one thread. The variants are timed in alternating blocks of ``--steps`` steps over the same minibatches and the
median per-step CPU time of the thread (``time.thread_time``: time slices lost to other processes on a busy machine
do not count) of each is reported, so contention for caches and cores affects them alike:

- ``sparse``: this cellvae (``use_sparse_counts=True``, the default: CSR minibatches, see ``cellvae.train``);
- ``dense``: this cellvae with ``use_sparse_counts=False`` (dense minibatches);
- ``base`` (with ``--baseline-src DIR``): another cellvae source tree, e.g. the last commit's
  (``git archive HEAD src/cellvae | tar -x -C /tmp/base`` then ``--baseline-src /tmp/base/src``), imported as
  ``cellvae_base`` beside this one; dense minibatches, or CSR ones with ``--baseline-sparse`` (a tree that has
  ``use_sparse_counts``).
- ``python`` (with ``--python-only``): this cellvae with its native kernels off (``CELLVAE_NATIVE=0``: the PyTorch
  code of the same step, see ``cellvae.native``), CSR minibatches.

``--epochs N`` also times whole ``CountVAE.train`` runs (N epochs, no early stopping, validation on 10 % of the
cells each epoch), three per variant, alternating: wall-clock cells/s from the training history and cells per CPU
second of the whole ``train()`` call.

    .venv/bin/python benchmarks/step_time.py [--rounds 9] [--steps 30] [--epochs 0] [--baseline-src DIR]
        [--baseline-sparse] [--python-only] [--skip-dense]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_data_dir  # noqa: E402


def _import_baseline(src: str):
    """The ``cellvae`` package under ``src`` imported as ``cellvae_base`` (its imports are relative)."""
    root = Path(src) / "cellvae"
    spec = importlib.util.spec_from_file_location("cellvae_base", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["cellvae_base"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def _submodules(pkg_name: str):
    import importlib

    return {m: importlib.import_module(f"{pkg_name}.{m}") for m in ("data", "module", "train")}


def _step_timer(pkg_name: str, adata, sparse: bool, batch_size: int, steps: int, python_only: bool = False):
    """A function that runs ``steps`` training steps and returns the mean CPU ms per step."""
    import torch

    from cellvae.native import build as native

    mods = _submodules(pkg_name)
    data = mods["data"].DataSpec(list(map(str, adata.var_names))).prepare(adata)
    torch.manual_seed(0)
    kw = {"use_sparse_counts": sparse} if pkg_name == "cellvae" or sparse else {}
    module = mods["module"].VAEModule(data.n_genes, **kw)
    params = list(module.parameters())
    train = mods["train"]
    opt = train.make_optimizer(params, train.TrainingPlan())
    it = data.iterate_sparse if sparse else data.iterate
    gen = torch.Generator().manual_seed(0)
    batches = list(it(torch.arange(data.n_cells), batch_size, shuffle=True, generator=gen))[:steps]

    def run() -> float:
        lib = native.library()
        if python_only:
            native._state["lib"] = None  # this variant: the PyTorch code paths
        try:
            t0 = time.thread_time()
            for x, cat, cont in batches:
                out = module(x, cat, cont, kl_weight=0.5)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if hasattr(train, "grads_finite"):  # the training loop's guard, as that tree has it
                    bool(torch.isfinite(out.loss.detach())) and train.grads_finite(params)
                else:
                    bool(torch.isfinite(out.loss.detach()) & torch.isfinite(train._grad_norm(params)))
                opt.step()
            return (time.thread_time() - t0) / len(batches) * 1e3
        finally:
            native._state["lib"] = lib

    run()  # warm-up
    return run


def _train_rates(pkg_name: str, adata, sparse: bool, epochs: int, python_only: bool = False) -> tuple[float, float]:
    """(wall-clock training cells/s of the history, training cells x epochs per CPU second of ``train()``)."""
    import importlib

    from cellvae.native import build as native

    kw = {"use_sparse_counts": sparse} if pkg_name == "cellvae" or sparse else {}
    model = importlib.import_module(pkg_name).CountVAE(adata, **kw)
    lib = native.library()
    if python_only:
        native._state["lib"] = None
    try:
        t0 = time.process_time()
        model.train(max_epochs=epochs, n_threads=1, progress_bar=False, early_stopping=False)
        cpu = time.process_time() - t0
    finally:
        native._state["lib"] = lib
    return model.history["train_cells_per_second"], len(model.train_indices) * epochs / cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(default_data_dir()) / "pbmc4k_10x_top2000genes.h5ad"))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=0, help="also time CountVAE.train for this many epochs")
    p.add_argument("--baseline-src", default=None, help="directory holding another cellvae/ package")
    p.add_argument("--baseline-sparse", action="store_true", help="CSR minibatches for the baseline too")
    p.add_argument("--python-only", action="store_true", help="also time this cellvae without its native kernels")
    p.add_argument("--skip-dense", action="store_true", help="leave out the dense-minibatch variant")
    args = p.parse_args(argv)

    import anndata as ad
    import torch

    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    torch.set_num_threads(1)
    adata = ad.read_h5ad(args.data)
    variants = {"sparse": ("cellvae", True)} if args.skip_dense else {"sparse": ("cellvae", True),
                                                                      "dense": ("cellvae", False)}
    if args.python_only:
        variants["python"] = ("cellvae", True)
    if args.baseline_src:
        _import_baseline(args.baseline_src)
        variants["base"] = ("cellvae_base", args.baseline_sparse)
    print(f"{args.data}: {adata.n_obs} cells x {adata.n_vars} genes; variants {list(variants)}")
    timers = {v: _step_timer(pkg, adata, sparse, args.batch_size, args.steps, python_only=v == "python")
              for v, (pkg, sparse) in variants.items()}
    times: dict = {v: [] for v in timers}
    for _ in range(args.rounds):
        for v, run in timers.items():
            times[v].append(run())
    _report(f"step CPU ms (median of {args.rounds} alternating blocks of {args.steps} steps)",
            {v: statistics.median(t) for v, t in times.items()}, lower_is_better=True)
    ref = "base" if "base" in times else "dense" if "dense" in times else None
    if ref:  # the ratio of each round's adjacent blocks: steadier than a ratio of medians on a machine whose speed drifts
        paired = {v: statistics.median(a / b for a, b in zip(t, times[ref])) for v, t in times.items() if v != ref}
        print(f"median over rounds of the per-round ratio to {ref}: "
              + ", ".join(f"{v} {r:.3f}" for v, r in paired.items()))
    if args.epochs:
        rates: dict = {v: [] for v in variants}
        for _ in range(3):
            for v, (pkg, sparse) in variants.items():
                rates[v].append(_train_rates(pkg, adata, sparse, args.epochs, python_only=v == "python"))
        what = f"(median of 3 alternating runs of {args.epochs} epochs)"
        _report(f"CountVAE.train cells/s, wall clock {what}",
                {v: statistics.median(r[0] for r in rs) for v, rs in rates.items()}, lower_is_better=False)
        _report(f"CountVAE.train cells per CPU second of train() {what}",
                {v: statistics.median(r[1] for r in rs) for v, rs in rates.items()}, lower_is_better=False)
    return 0


def _report(title: str, med: dict, lower_is_better: bool) -> None:
    name = "base" if "base" in med else "dense" if "dense" in med else None
    parts = [f"{v} {m:.2f}" if lower_is_better else f"{v} {m:.0f}" for v, m in med.items()]
    if name is None:
        print(f"{title}: " + ", ".join(parts))
        return
    ref = med[name]
    ratios = [f"{v}/{name} {m / ref:.3f}" for v, m in med.items() if v != name]
    print(f"{title}: " + ", ".join(parts) + " (" + ", ".join(ratios) + ")")


if __name__ == "__main__":
    raise SystemExit(main())
