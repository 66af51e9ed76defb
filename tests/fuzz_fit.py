"""Property-based fuzzing of ``cellvae fit`` with malformed ``.h5ad`` files (issue 23).

Hypothesis draws a small count matrix and damages it the ways a hostile or careless user would: CSR arrays written by
hand (indices out of range or negative, a decreasing or short ``indptr``, duplicated or unsorted columns, more values
than indices), odd dtypes (bool, float16, uint8, int64), bad values (NaN, inf, negative, fractional, 1e30, above
2^24), names (duplicated, empty, with ``/`` or ``..``, very long, unicode) and obs columns (missing values, one
label, path-like labels), then runs ``cellvae fit`` on it in this process with random ``--labels-key``,
``--batch-key``, ``--backed`` and ``--n-top-genes``. The property: the command ends with exit status 0, or 2 and
exactly one ``error: ...`` line; no traceback, no other status. A crash of the interpreter (SIGSEGV, SIGABRT) ends
this process with a signal, which the caller sees.

    python tests/fuzz_fit.py --examples 30 --derandomize      # tests/test_fuzz.py runs this in a subprocess
    python tests/fuzz_fit.py --examples 3000 --seed 1          # the long run (benchmarks/results/fuzz_fit.md)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np

CORRUPTIONS = ("none", "column_too_large", "negative_column", "decreasing_indptr", "short_indptr", "duplicate",
               "unsorted", "extra_values", "indptr_past_end")
VALUE_DAMAGE = ("none", "nan", "inf", "negative", "fraction", "huge", "above_2_24", "all_zero_cell", "all_zero")
DTYPES = ("float32", "float64", "int32", "int64", "uint8", "float16", "bool")
NAMES = ("plain", "duplicate_genes", "duplicate_cells", "empty", "slash", "dotdot", "long", "unicode")


def write_case(path: Path, case: dict) -> None:
    """Write the case's .h5ad (anndata for a valid file, then h5py edits for the damage)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(case["seed"])
    n, g = case["n_cells"], case["n_genes"]
    X = rng.poisson(rng.gamma(0.5, 2.0, size=(n, g))).astype(np.float64)
    dmg = case["values"]
    if n and g:
        if dmg == "nan":
            X[0, 0] = np.nan
        elif dmg == "inf":
            X[-1, -1] = np.inf
        elif dmg == "negative":
            X[0, -1] = -3
        elif dmg == "fraction":
            X[-1, 0] = 0.5
        elif dmg == "huge":
            X[0, 0] = 1e30
        elif dmg == "above_2_24":
            X[0, 0] = 2.0**24 + 8
        elif dmg == "all_zero_cell":
            X[0] = 0
        elif dmg == "all_zero":
            X[:] = 0
    dtype = case["dtype"]
    if dtype == "bool":
        X = X > 0
    elif dtype != "float64":
        with np.errstate(invalid="ignore", over="ignore"):
            X = X.astype(dtype)
    obs_names = [f"c{i}" for i in range(n)]
    var_names = [f"g{j}" for j in range(g)]
    kind = case["names"]
    if kind == "duplicate_genes" and g > 1:
        var_names[1] = var_names[0]
    elif kind == "duplicate_cells" and n > 1:
        obs_names[1] = obs_names[0]
    elif kind == "empty" and g:
        var_names[0] = ""
    elif kind == "slash" and g:
        var_names[0] = "a/b"
    elif kind == "dotdot" and n:
        obs_names[0] = "../../x"
    elif kind == "long" and g:
        var_names[0] = "G" * 5000
    elif kind == "unicode" and g:
        var_names[0] = "gène-α"
    labels = rng.choice(case["label_values"], size=n)
    obs = pd.DataFrame({"cell_type": labels, "batch": rng.choice(["a", "b"], size=n)}, index=obs_names)
    if case["label_nan"] and n:
        obs.loc[obs.index[0], "cell_type"] = None
    matrix = sp.csr_matrix(X) if case["sparse"] else X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=var_names))
        a.write_h5ad(path)
    c = case["csr"]
    if not case["sparse"] or c == "none" or not n or not g:
        return
    with h5py.File(path, "r+") as f:
        ind, ptr = f["X/indices"], f["X/indptr"]
        nnz = ind.shape[0]
        if nnz == 0:
            return
        if c == "column_too_large":
            ind[nnz // 2] = g + 7
        elif c == "negative_column":
            ind[0] = -1
        elif c == "decreasing_indptr" and len(ptr) > 2:
            p = ptr[...]
            p[1] = p[-1]
            ptr[...] = p
        elif c == "short_indptr":
            p = ptr[...][:-1]
            del f["X/indptr"]
            f["X"].create_dataset("indptr", data=p)
        elif c == "duplicate":
            i = ind[...]
            i[-1] = i[-2] if nnz > 1 else i[-1]
            ind[...] = i
        elif c == "unsorted" and nnz > 1:
            i = ind[...]
            i[0], i[1] = i[1], i[0]
            ind[...] = i
        elif c == "extra_values":
            d = f["X/data"][...]
            del f["X/data"]
            f["X"].create_dataset("data", data=np.concatenate([d, d[:3]]))
        elif c == "indptr_past_end":
            p = ptr[...]
            p[-1] = nnz + 5
            ptr[...] = p


def run_case(case: dict, tmp: Path) -> tuple[bool, str]:
    """Run ``cellvae fit`` on the case; (property holds, what happened)."""
    from click.testing import CliRunner

    from cellvae.cli import main

    path = tmp / "in.h5ad"
    try:
        write_case(path, case)
    except Exception as e:  # noqa: BLE001 - a case anndata itself cannot write is not a cellvae failure
        return True, f"unwritable case ({type(e).__name__})"
    out = tmp / "out"
    args = ["fit", str(path), "--out", str(out), "--max-epochs", "1", "--n-hidden", "8", "--n-latent", "2",
            "--batch-size", "8", "--quiet"]
    if case["labels_key"]:
        args += ["--labels-key", case["labels_key"]]
    if case["batch_key"]:
        args += ["--batch-key", case["batch_key"]]
    if case["backed"]:
        args += ["--backed"]
    if case["n_top_genes"]:
        args += ["--n-top-genes", str(case["n_top_genes"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(main, args, catch_exceptions=True)
    shutil.rmtree(out, ignore_errors=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        tb = "".join(traceback.format_exception(type(r.exception), r.exception, r.exception.__traceback__))
        return False, f"traceback (exit {r.exit_code}):\n{tb[-3000:]}"
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    if r.exit_code == 0:
        return True, "ok"
    if r.exit_code == 2 and (len(errors) == 1 or "Invalid value" in r.output) and "Traceback" not in r.output:
        return True, (errors[0] if errors else r.output.strip().splitlines()[-1])[:160]
    return False, f"exit {r.exit_code}: {r.output[-2000:]}"


def cases():
    """The hypothesis strategy of cases."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries({
        "seed": st.integers(0, 2**31 - 1),
        "n_cells": st.sampled_from([40, 60, 3, 2, 0]),  # hypothesis favours the first entries
        "n_genes": st.sampled_from([15, 30, 1, 0]),
        "sparse": st.booleans(),
        "dtype": st.sampled_from(("float32",) * 4 + DTYPES),  # mostly what real files hold
        "values": st.sampled_from(("none",) * 6 + VALUE_DAMAGE),
        "csr": st.sampled_from(("none",) * 6 + CORRUPTIONS),
        "names": st.sampled_from(("plain",) * 4 + NAMES),
        "label_values": st.sampled_from([["T", "B"], ["../evil", "a/b"], ["only"], ["1", "2", "3"], ["", " "]]),
        "label_nan": st.booleans(),
        "labels_key": st.sampled_from([None, "cell_type", "missing_key"]),
        "batch_key": st.sampled_from([None, "batch", "cell_type"]),
        "backed": st.booleans(),
        "n_top_genes": st.sampled_from([None, 10, 10**9]),
    })


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--derandomize", action="store_true", help="the same examples every run (for make test)")
    p.add_argument("--report", default=None, help="write a Markdown summary here")
    p.add_argument("--verbose", action="store_true", help="print every example's outcome")
    p.add_argument("--trace", default=None,
                   help="write each case here before running it (names the case that crashed the interpreter)")
    args = p.parse_args(argv)
    from hypothesis import HealthCheck, given, seed, settings

    os.environ.setdefault("CELLVAE_NATIVE", "1")
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    tmp_root = Path(tempfile.mkdtemp(prefix="cellvae-fuzz-"))

    @seed(args.seed)
    @settings(max_examples=args.examples, derandomize=args.derandomize, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=True)
    @given(cases())
    def prop(case):
        tmp = Path(tempfile.mkdtemp(dir=tmp_root))
        if args.trace:
            with open(args.trace, "w") as fh:
                fh.write(repr(case) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        ok, what = run_case(case, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        key = ("ok" if what == "ok" else "unwritable case" if what.startswith("unwritable")
               else "error (exit 2)" if ok else "FAILED")
        if args.verbose:
            print(f"{key}: {what}", flush=True)
        outcomes[key] = outcomes.get(key, 0) + 1
        if not ok:
            failures.append(f"{case}\n{what}")
            print(f"FAILED: {case}\n{what}", flush=True)

    try:
        prop()
    except Exception:  # noqa: BLE001 - hypothesis re-raises; the failures are listed below
        pass
    shutil.rmtree(tmp_root, ignore_errors=True)
    total = sum(outcomes.values())
    print(f"{total} examples: {outcomes}", flush=True)
    if args.report:
        Path(args.report).write_text(f"{total} examples: {outcomes}\n\n" + "\n\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
