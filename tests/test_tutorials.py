"""The tutorials of docs/tutorials/ run in their reduced mode (``CELLVAE_TUTORIAL_FAST=1``: small subsets, a few
epochs), so that they cannot rot between documentation builds (``make docs`` runs them in full).

One subprocess (with the Agg backend, in a temporary directory) runs every tutorial script in a fresh namespace and
reports each one's outcome, so the imports (torch, scanpy) are paid once; each tutorial is then its own test case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA_DIR

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "docs" / "tutorials").glob("t*.py"))

RUNNER = r"""
import json, runpy, sys, time, traceback
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = {}
for path in sys.argv[2:]:
    t0 = time.perf_counter()
    try:
        runpy.run_path(path, run_name="__main__")
        out[path] = {"ok": True}
    except BaseException:  # noqa: BLE001 - reported per tutorial
        out[path] = {"ok": False, "error": traceback.format_exc()[-4000:]}
    out[path]["seconds"] = round(time.perf_counter() - t0, 1)
    plt.close("all")
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    if not (DATA_DIR / "kang2018_ifnb_pbmc_muscat.h5ad").exists():
        pytest.skip(f"the tutorials' data are not in {DATA_DIR}")
    work = tmp_path_factory.mktemp("tutorials")
    report = work / "outcomes.json"
    env = {**os.environ, "CELLVAE_TUTORIAL_FAST": "1", "CELLVAE_DATA_DIR": str(DATA_DIR.resolve()),
           "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(report), *map(str, TUTORIALS)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1800)
    if not report.exists():
        pytest.fail(f"the tutorial runner died (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(report.read_text())


def test_every_tutorial_is_listed():
    names = [p.stem for p in TUTORIALS]
    assert names == ["t1_quickstart", "t2_de_perturbation", "t3_integration", "t4_generation_anomaly", "t5_images",
                     "t6_label_transfer", "t7_citeseq"]
    for p in TUTORIALS:
        text = p.read_text()
        assert text.startswith("# %% [markdown]") and "CELLVAE_TUTORIAL_FAST" in text  # jupytext percent format


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_in_reduced_mode(outcomes, path):
    result = outcomes[str(path)]
    assert result["ok"], f"{path.name} failed in reduced mode:\n{result['error']}"
