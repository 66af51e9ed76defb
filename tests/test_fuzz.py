"""``cellvae fit`` on malformed .h5ad files drawn by hypothesis never crashes: it succeeds or exits 2 with one
``error:`` line (tests/fuzz_fit.py; a few dozen fixed examples here, thousands in the long run of
benchmarks/results/fuzz_fit.md). Run in a subprocess, so that a crash of the interpreter fails this test instead of
the whole suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_fit_on_malformed_files_succeeds_or_exits_2():
    script = Path(__file__).resolve().parent / "fuzz_fit.py"
    r = subprocess.run([sys.executable, str(script), "--examples", "30", "--derandomize"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.returncode, r.stdout[-4000:], r.stderr[-4000:])
    assert "30 examples" in r.stdout and "FAILED" not in r.stdout, r.stdout[-4000:]
