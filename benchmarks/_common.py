"""Pieces shared by the benchmark scripts in this folder (``vs_scvi.py``, ``throughput.py``, ``label_transfer.py``, ...).

Everything here is light to import (numpy, scanpy, torch and the tools are imported inside the functions), so
a script can cap its thread counts with :func:`limit_threads` *before* any numeric library is loaded.

- :data:`DEFAULT_DATASETS`: the labelled datasets of ``../shared/data`` and their label keys.
- :func:`load_dataset`: read one ``.h5ad`` (raw counts in ``X``), reduce > 5000 genes to 2000 seurat_v3 HVGs.
- :func:`cluster_scores`: KMeans ARI / NMI on a latent space; :func:`silhouette_scores`: label ASW.
- :func:`import_tool`: import scvi-tools or cellvae quietly, with its version.
- :func:`mean_sd`, :func:`fmt_mean_sd`: mean ± sd over seeds for the Markdown reports.
- :func:`atomic_write_text`: write a file through a temporary file and ``os.replace``.
- :func:`git_commit`: the short commit of the repository (and whether a path in it has uncommitted changes).
- :func:`paired_t_ci`: mean and t-based 95 % confidence interval of paired differences.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# dataset name -> label key (default list, in this order)
DEFAULT_DATASETS: dict[str, str] = {
    "pbmc4k_10x_top2000genes": "cell_type",
    "zeisel2015_cortex_subset_1464cells": "cell_type",
    "kang2018_ifnb_pbmc_muscat": "cell_type",
    "pbmc_10x_3chemistries": "cell_type_marker",
    "pbmc_10x_3tech_savercat_2000cells": "cell_type",
    "mouse_bladder_mca_2100cells": "cell_type",
    "worm_neuron_cao2017": "cell_type",
    "human_kidney_top2000genes": "cell_type",
    "cbmc_citeseq_rna_top2000genes": "cell_type",
    "mesc_kolodziejczyk2015_300cells": "cell_type",
}
TOOLS = ("scvi", "cellvae")
TOOL_LABEL = {"scvi": "scvi-tools SCVI", "cellvae": "cellvae CountVAE"}
HVG_GENE_THRESHOLD = 5000
N_HVG = 2000
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def default_data_dir() -> str:
    """``$CELLVAE_DATA_DIR`` if set, else ``<repo>/../shared/data``."""
    return os.environ.get("CELLVAE_DATA_DIR") or str(REPO_ROOT.parent / "shared" / "data")


def parse_dataset_spec(spec: str) -> tuple[str, str]:
    """``NAME`` or ``NAME:LABEL_KEY`` -> (name, label key); the key defaults to the built-in table, else cell_type."""
    name, _, key = spec.partition(":")
    return name, key or DEFAULT_DATASETS.get(name, "cell_type")


# ----------------------------------------------------------------------------- threads
def limit_threads(n: int) -> None:
    """Cap OpenMP / BLAS threads through the environment. Call before numpy / torch are imported (child
    processes started later inherit the variables)."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)


def cap_loaded_threads(n: int) -> None:
    """Cap the threads of libraries that may already be loaded: torch (if importable) and threadpoolctl's pools."""
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except Exception:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass


def machine_description() -> str:
    """e.g. ``x86_64 (AMD EPYC), 2 logical CPUs, Python 3.11.9, Linux``."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor()
    return (f"{platform.machine()}{' (' + cpu + ')' if cpu else ''}, {os.cpu_count()} logical CPUs, "
            f"Python {platform.python_version()}, {platform.system()}")


def loadavg() -> str:
    """The 1-minute load average as text (``"?"`` where the OS has none)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # pragma: no cover
        return "?"


def package_version(dist: str) -> str:
    """Installed version of a distribution (without importing it), or '?'."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# ----------------------------------------------------------------------------- data
def load_dataset(data_dir: Path, name: str, label_key: str, extra_obs: tuple[str, ...] = ()):
    """Read ``<data_dir>/<name>.h5ad`` and keep counts + labels (+ the obs columns ``extra_obs``, e.g. the batch).

    Datasets with more than :data:`HVG_GENE_THRESHOLD` genes are reduced to :data:`N_HVG` genes with
    ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")`` on the raw counts (needs scikit-misc). If skmisc's
    loess fails (very shallow data, e.g. ``worm_neuron_cao2017``), genes detected in < 3 cells are dropped and the
    call is retried; ``info["hvg_prefilter_min_cells"]`` says so.

    Returns:
        (adata with float32 counts in X and obs[[label_key]], labels as a str array, info dict).
    """
    import anndata as ad
    import numpy as np
    import scanpy as sc

    path = Path(data_dir) / f"{name}.h5ad"
    adata = ad.read_h5ad(path)
    if label_key not in adata.obs:
        raise KeyError(f"{name}: no obs column {label_key!r} (columns: {list(adata.obs.columns)})")
    n_genes_orig = adata.n_vars
    hvg = False
    prefilter = None
    if adata.n_vars > HVG_GENE_THRESHOLD:
        try:
            sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N_HVG)
        except ValueError as e:
            # skmisc's loess can fail on very shallow data (many genes seen in 1-2 cells,
            # "reciprocal condition number ..."): drop genes detected in < 3 cells and retry.
            print(f"  [hvg] seurat_v3 failed on {name} ({e!r}); retrying after dropping genes "
                  "detected in < 3 cells", flush=True)
            sc.pp.filter_genes(adata, min_cells=3)
            sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N_HVG)
            prefilter = 3
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
        hvg = True
    # keep only what the tools need: counts + labels
    labels = adata.obs[label_key].astype(str).to_numpy()
    keep = [label_key] + [k for k in extra_obs if k != label_key]
    adata = ad.AnnData(X=adata.X.astype(np.float32), obs=adata.obs[keep].copy(),
                       var=adata.var[[]].copy())
    info = {
        "dataset": name,
        "label_key": label_key,
        "n_cells": int(adata.n_obs),
        "n_genes_file": int(n_genes_orig),
        "n_genes": int(adata.n_vars),
        "hvg_seurat_v3": hvg,
        "hvg_prefilter_min_cells": prefilter,
        "n_labels": int(len(np.unique(labels))),
    }
    return adata, labels, info


# ----------------------------------------------------------------------------- metrics
def cluster_scores(z, labels, n_clusters: int) -> tuple[float, float]:
    """ARI and NMI of ``KMeans(n_clusters, random_state=0, n_init=10)`` on ``z`` against ``labels``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    pred = KMeans(n_clusters=n_clusters, random_state=0, n_init=10).fit_predict(z)
    return float(adjusted_rand_score(labels, pred)), float(normalized_mutual_info_score(labels, pred))


def silhouette_scores(z, labels) -> tuple[float, float]:
    """Label silhouette on ``z`` (Euclidean): (raw mean silhouette in [-1, 1], scib-style ``(s + 1) / 2``)."""
    from sklearn.metrics import silhouette_score

    s = float(silhouette_score(z, labels))
    return s, (s + 1.0) / 2.0


# ----------------------------------------------------------------------------- tools
def import_tool(tool: str):
    """Return (module, version) or raise ImportError with a clear message."""
    if tool == "scvi":
        import logging

        import scvi  # noqa: F401

        scvi.settings.verbosity = logging.WARNING
        for lg in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric"):
            logging.getLogger(lg).setLevel(logging.ERROR)
        return scvi, scvi.__version__
    if tool == "cellvae":
        import cellvae

        if not hasattr(cellvae, "CountVAE"):
            raise ImportError("cellvae is importable but has no CountVAE yet")
        return cellvae, getattr(cellvae, "__version__", "?")
    raise ValueError(tool)


# ----------------------------------------------------------------------------- report helpers
def mean_sd(vals):
    """(mean, sample sd) of the non-None values; (None, None) when there are none; sd 0.0 for one value."""
    import numpy as np

    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    a = np.asarray(vals, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt_mean_sd(vals, digits=3, missing="-"):
    """``m ± sd`` (or ``m`` for a single value, ``missing`` for none)."""
    m, s = mean_sd(vals)
    if m is None:
        return missing
    if len([v for v in vals if v is not None]) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (folders created) atomically, with :func:`cellvae.fileio.write_text_atomic`: a
    reader (or an interruption) never sees a half-written file."""
    from cellvae.data.fileio import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def run_record_line() -> str:
    """``commit <hash>[ (src/ with uncommitted changes)], <ISO date>, load <1-min load average>``: the first line of
    every results file (which commit and date it ran on)."""
    import datetime as _dt

    gc = git_commit("src")
    return (f"commit {gc['commit']}{' (src/ with uncommitted changes)' if gc['dirty'] else ''}, "
            f"{_dt.datetime.now().astimezone().isoformat(timespec='minutes')}, load {loadavg()}")


def write_json_and_md(out: Path, payload: dict, markdown: str) -> None:
    """Write ``payload`` as ``out.json`` and ``markdown`` as ``out.md`` (each atomically), and print the Markdown.

    A Markdown that does not start with a ``commit ...`` line gets :func:`run_record_line` (also stored in the
    payload as ``run_record``) as its first line."""
    import json

    if not markdown.startswith("commit "):
        rec = payload.setdefault("run_record", run_record_line())
        markdown = f"{rec}\n\n{markdown}"
    out = Path(out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(payload, indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown)
    print(markdown)


def rows_stamp(rows) -> str:
    """``commit <newest row's commit>, <its date> (the newest row; rows <first> … <last>, commits <all>)``: the first
    line of a results file whose rows carry ``commit`` and ``date`` (ISO text)."""
    dates = sorted(r["date"] for r in rows if r.get("date"))
    return (f"commit {newest_commit(rows)}, {dates[-1][:10] if dates else '?'} (the newest row; rows "
            f"{dates[0][:16] if dates else '?'} … {dates[-1][:16] if dates else '?'}, commits "
            f"{', '.join(sorted({r.get('commit', '?') for r in rows}))})")


def newest_commit(rows) -> str:
    """The ``commit`` of the row with the latest ``date`` (ISO text) among result rows ("?" when none has one)."""
    dated = [r for r in rows if r.get("commit") and r.get("date")]
    return max(dated, key=lambda r: r["date"])["commit"] if dated else "?"


def git_commit(path: str | None = None) -> dict:
    """``{"commit": git rev-parse --short HEAD, "dirty": bool | None}`` of :data:`REPO_ROOT`; ``dirty`` says whether
    ``path`` (relative to the repository, e.g. ``"src"``; None: the whole tree) has uncommitted changes to tracked
    files. Values are ``"?"`` / None where git is not available."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *a], capture_output=True, text=True, timeout=30)

    try:
        commit = git("rev-parse", "--short", "HEAD").stdout.strip() or "?"
        st = git("status", "--porcelain", "--untracked-files=no", *([path] if path else []))
        dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return {"commit": "?", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def paired_t_ci(diffs, level: float = 0.95) -> tuple:
    """(mean, half-width, n) of paired differences, with the t-based interval mean ± t_{(1+level)/2, n-1} sd/sqrt(n)
    (sample sd). The half-width is None for fewer than 2 values; (None, None, 0) for none. None values are skipped."""
    import math

    import numpy as np

    vals = [float(v) for v in diffs if v is not None]
    n = len(vals)
    if n == 0:
        return None, None, 0
    m = float(np.mean(vals))
    if n < 2:
        return m, None, n
    from scipy import stats

    sd = float(np.std(vals, ddof=1))
    return m, float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)), n
