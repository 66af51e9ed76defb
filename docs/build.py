#!/usr/bin/env python
"""Generate the parts of the documentation site that come from elsewhere, before ``mkdocs build``:

- ``docs/generated/tutorials/*.ipynb``: each tutorial ``docs/tutorials/t*.py`` (jupytext percent format) read with
  jupytext and executed with nbclient (cwd ``docs/generated/tutorials``), so the site shows its outputs and figures.
  A tutorial whose source and ``src/cellvae`` are unchanged since its last execution is not run again (``--force``
  runs all). A failing cell fails the build with the tutorial's name and the error.
- ``docs/generated/benchmarks/``: every ``benchmarks/results/*.md`` as a page, and an index with their titles.
- ``docs/generated/cli-help.md``: the ``--help`` of every ``cellvae`` command.

Environment: ``CELLVAE_DATA_DIR`` (the data sets; default ``../shared/data``), ``CELLVAE_TUTORIAL_FAST=1`` (the
tutorials' reduced settings, as ``make test`` runs them). Usage: ``.venv/bin/python docs/build.py [--force]
[--only NAME]``; ``make docs`` runs it and then ``mkdocs build --strict``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GEN = DOCS / "generated"
TUTORIALS = DOCS / "tutorials"
CELL_TIMEOUT = 900  # seconds per cell


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _src_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "src" / "cellvae").rglob("*")):
        if p.suffix in (".py", ".c") and p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def build_tutorials(force: bool, only: str | None) -> list[tuple[str, float, bool]]:
    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    out_dir = GEN / "tutorials"
    out_dir.mkdir(parents=True, exist_ok=True)
    src_digest = _src_digest()
    fast = os.environ.get("CELLVAE_TUTORIAL_FAST", "") == "1"
    done = []
    for script in sorted(TUTORIALS.glob("t*.py")):
        if only and only not in script.stem:
            continue
        key = hashlib.sha256(script.read_bytes() + src_digest.encode() + str(fast).encode()).hexdigest()
        target = out_dir / f"{script.stem}.ipynb"
        if not force and target.exists():
            try:
                if json.loads(target.read_text())["metadata"].get("cellvae_build_key") == key:
                    done.append((script.stem, 0.0, False))
                    continue
            except (ValueError, KeyError):
                pass
        nb = jupytext.read(script, fmt="py:percent")
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        t0 = time.perf_counter()
        client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                resources={"metadata": {"path": str(out_dir)}})
        try:
            # The kernel draws with the inline backend, so plt.show() and scanpy's plots become image outputs
            # (MPLBACKEND=Agg, set below for this process, would make them vanish from the page).
            client.execute(env={**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
        except CellExecutionError as e:
            sys.exit(f"docs/build.py: tutorial {script.name} failed:\n{e}")
        secs = time.perf_counter() - t0
        n_images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        if n_images == 0 and "plt.show()" in script.read_text():
            sys.exit(f"docs/build.py: tutorial {script.name} draws figures but none reached the page (backend?)")
        nb.metadata["cellvae_build_key"] = key
        nb.metadata["cellvae_seconds"] = round(secs, 1)
        _write(target, nbformat.writes(nb))
        print(f"executed {script.name} in {secs:.1f} s", flush=True)
        done.append((script.stem, secs, True))
    return done


def build_benchmarks() -> None:
    out = GEN / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for md in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        text = md.read_text()
        m = re.search(r"^#\s+(.+)$", text, flags=re.M)
        title = m.group(1).strip() if m else md.stem
        _write(out / md.name, text if m else f"# {md.stem}\n\n{text}")
        rows.append(f"| [{title}]({md.name}) | `benchmarks/results/{md.name}` |")
    _write(out / "index.md", "\n".join([
        "# Benchmarks", "",
        "Every results file of `benchmarks/results/`, as its benchmark script wrote it (each names the commit, the "
        "date and the load average it ran on; the scripts are in `benchmarks/`, and the Makefile's `bench-*` targets "
        "run them).", "", "| benchmark | file |", "| --- | --- |", *rows, ""]))


def build_cli_help() -> None:
    from click.testing import CliRunner

    from cellvae.cli import main

    parts = ["# CLI help", "", "The `--help` of every `cellvae` command, as this version prints it.", ""]
    runner = CliRunner()
    parts += ["## cellvae", "", "```text", runner.invoke(main, ["--help"], terminal_width=100).output.rstrip(), "```",
              ""]
    for name in sorted(main.commands):
        text = runner.invoke(main, [name, "--help"], terminal_width=100).output.rstrip()
        parts += [f"## cellvae {name}", "", "```text", text, "```", ""]
    _write(GEN / "cli-help.md", "\n".join(parts))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="execute every tutorial, even unchanged ones")
    p.add_argument("--only", help="execute only the tutorials whose name contains this")
    p.add_argument("--skip-tutorials", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("CELLVAE_DATA_DIR", str((ROOT.parent / "shared" / "data").resolve()))
    os.environ.setdefault("MPLBACKEND", "Agg")  # this process (the CLI help); the tutorials' kernel draws inline
    os.environ.setdefault("PYTHONWARNINGS", "ignore:IProgress not found")  # tqdm in a kernel without ipywidgets
    t0 = time.perf_counter()
    build_benchmarks()
    build_cli_help()
    if not args.skip_tutorials:
        for name, secs, ran in build_tutorials(args.force, args.only):
            print(f"  {name}: {'%.1f s' % secs if ran else 'unchanged, not run'}")
    print(f"docs/build.py: generated pages in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
