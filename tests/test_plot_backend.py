"""cellvae.plot picks the headless Agg backend for the CLI and scripts, but keeps a backend the user chose
(MPLBACKEND, which a Jupyter kernel sets to its inline backend): forcing Agg there hid every later figure of the
documentation's tutorials (issue 26)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "import matplotlib, cellvae.plot; print(matplotlib.get_backend().lower())"


@pytest.mark.parametrize("backend,expected", [(None, "agg"), ("svg", "svg")])
def test_plot_keeps_a_chosen_backend(backend, expected):
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    if backend:
        env["MPLBACKEND"] = backend
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == expected
