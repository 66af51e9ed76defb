"""Data layer: read files, check counts, encode covariates once, and serve minibatches from prepared tensors.

Everything AnnData- or pandas-shaped happens here, once, before training. The training loop then only sees
:class:`TensorData`, which slices a dense float32 tensor (or a CSR matrix for large data) by integer index:
no AnnData indexing, no DataFrame access and no per-cell Python in the hot path.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .distributions import csr_tensor

__all__ = [
    "CellvaeInputError",
    "read_data",
    "resolve_data_path",
    "get_counts",
    "check_values",
    "select_highly_variable_genes",
    "DataSpec",
    "TensorData",
    "split_indices",
    "minibatch_slices",
]

DENSE_MAX_ELEMENTS = 300_000_000  # ~1.2 GB float32: above this, minibatches are densified from CSR per batch
SPARSE_MAX_DENSITY = 0.2  # sparse CSR training minibatches up to this fraction of non-zeros (slower above ~0.25)
DATA_DIR_ENV = "CELLVAE_DATA_DIR"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class CellvaeInputError(ValueError):
    """Bad input data or arguments; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------- reading
def resolve_data_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Find a dataset given as a path, a bare file name in ``$CELLVAE_DATA_DIR``, or an http(s) URL.

    URLs are downloaded once into ``cache_dir`` (default ``$CELLVAE_DATA_DIR`` or ``~/.cache/cellvae``),
    written to a temporary file and renamed, so an interrupted download never leaves a partial file.

    Raises:
        CellvaeInputError: if the file exists nowhere.
    """
    s = str(path)
    if s.startswith(("http://", "https://")):
        cache = Path(cache_dir or os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "cellvae")
        name = Path(urllib.parse.urlparse(s).path).name or "download.h5ad"
        target = cache / name
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{name}.part{os.getpid()}")
            try:
                with urllib.request.urlopen(s, timeout=120) as r, open(tmp, "wb") as f:  # noqa: S310
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
        return target
    p = Path(s).expanduser()
    if p.exists():
        return p
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir and (Path(data_dir) / s).exists():
        return Path(data_dir) / s
    where = f" or in ${DATA_DIR_ENV}={data_dir}" if data_dir else f" (set ${DATA_DIR_ENV} to a data directory)"
    raise CellvaeInputError(f"Data file {s!r} not found as a path{where}.")


def read_data(path: str | os.PathLike) -> ad.AnnData:
    """Read single-cell data into memory as an AnnData (cells x genes).

    Supported: ``.h5ad`` (anndata), 10x ``.h5`` and 10x directories (``matrix.mtx[.gz]``; scanpy readers),
    ``.csv`` / ``.tsv`` / ``.txt`` (cells as rows, genes as columns, first column cell names; a file with genes
    as rows can be transposed by the caller), ``.loom``, and URLs to any of these (see :func:`resolve_data_path`).
    The file itself is never modified.

    Raises:
        CellvaeInputError: unknown format, or a file that is not readable as its format.
    """
    import scanpy as sc

    p = resolve_data_path(path)
    suffixes = "".join(p.suffixes[-2:]).lower()
    try:
        if p.is_dir():
            adata = sc.read_10x_mtx(p, var_names="gene_symbols", make_unique=True)
        elif suffixes.endswith(".h5ad"):
            adata = ad.read_h5ad(p)
        elif suffixes.endswith(".h5"):
            adata = sc.read_10x_h5(p)
            adata.var_names_make_unique()
        elif suffixes.endswith((".csv", ".csv.gz")):
            adata = _table_to_adata(pd.read_csv(p, index_col=0), p)
        elif suffixes.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            adata = _table_to_adata(pd.read_csv(p, sep="\t", index_col=0), p)
        elif suffixes.endswith(".loom"):
            adata = ad.read_loom(p)
        else:
            raise CellvaeInputError(
                f"Unknown data format for {p.name!r}: use .h5ad, 10x .h5, a 10x directory, .csv, .tsv or .loom."
            )
    except CellvaeInputError:
        raise
    except pd.errors.ParserError as e:
        first = (str(e).strip().splitlines() or ["parse error"])[0]
        raise CellvaeInputError(
            f"Could not read {str(p)!r} as a table: {first}. A row has more values than the header has gene names "
            "(header: cell-name column, then one name per gene); fix that row or the header."
        ) from e
    except (OSError, ValueError, KeyError, TypeError, EOFError, UnicodeDecodeError) as e:
        what = suffixes or "a 10x directory"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CellvaeInputError(
            f"Could not read {str(p)!r} as {what}: {first}. The file is truncated, damaged or not in that format; "
            "check it (e.g. download or export it again)."
        ) from e
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CellvaeInputError(f"{str(p)!r} holds an empty matrix ({adata.n_obs} cells x {adata.n_vars} genes); "
                                "check the file.")
    return adata


def _table_to_adata(df: pd.DataFrame, path: Path) -> ad.AnnData:
    """A cells x genes table (first column cell names, header row gene names) as AnnData, with checks.

    Raises:
        CellvaeInputError: non-numeric columns, or rows with fewer values than the header (empty fields).
    """
    name = path.name
    bad_cols = [str(c) for c, t in df.dtypes.items() if not (pd.api.types.is_numeric_dtype(t)
                                                               and not pd.api.types.is_bool_dtype(t))]
    if bad_cols:
        raise CellvaeInputError(
            f"{name}: columns {bad_cols[:5]} are not numeric. A count table needs cell names in the first column, "
            "gene names in the header row and numbers everywhere else (cells as rows); move annotations such as "
            "cell types into a separate file and add them to adata.obs."
        )
    missing = df.isna().to_numpy()
    if missing.any():
        rows = np.flatnonzero(missing.any(1))
        raise CellvaeInputError(
            f"{name}: {int(missing.sum())} empty or missing values in {len(rows)} rows (first: cell "
            f"{str(df.index[rows[0]])!r}, line {rows[0] + 2}). Each row needs one value per gene in the header "
            f"({df.shape[1]} genes); a row with fewer fields, or a header with extra names, causes this."
        )
    cols = pd.Index(df.columns.astype(str))
    if len(cols) and pd.to_numeric(pd.Series(cols), errors="coerce").notna().all():
        warn(f"{name}: every column name is a number (e.g. {list(cols[:3])}). If the file has no header row, its "
             "first row was read as gene names and one cell was lost: add a header row with the gene names. "
             "(Numeric gene ids such as Entrez ids are fine.)")
    adata = ad.AnnData(df.astype(np.float32) if any(t.kind == "f" for t in df.dtypes) else df)
    adata.var_names = cols
    adata.obs_names = pd.Index(df.index.astype(str))
    return adata


# ------------------------------------------------------------------------------------------- checking
def get_counts(adata: ad.AnnData, layer: str | None = None):
    """The matrix the model is fitted on: ``adata.layers[layer]`` or ``adata.X`` (n_cells, n_genes).

    Raises:
        CellvaeInputError: a missing layer, or no ``X``.
    """
    return _in_memory(counts_source(adata, layer))


def counts_source(adata: ad.AnnData, layer: str | None = None):
    """``adata.layers[layer]`` or ``adata.X`` as stored: for a backed AnnData (``backed="r"``) the on-disk
    dataset, not read into memory (see :mod:`cellvae.backed`); otherwise the in-memory matrix.

    Raises:
        CellvaeInputError: a missing layer, or no ``X``.
    """
    if layer is not None:
        if layer not in adata.layers:
            layers = list(adata.layers.keys())
            fix = ("Pass layer=... (--layer) with one of them, or omit it to use X." if layers else
                   "Omit layer (--layer) to use X, or store the raw counts first: adata.layers[...] = counts.")
            raise CellvaeInputError(f"Layer {layer!r} not found; available layers: {layers or 'none'}. {fix}")
        return adata.layers[layer]
    if adata.X is None:
        raise CellvaeInputError("adata.X is empty; pass the layer holding raw counts (layer=... / --layer).")
    return adata.X


def _in_memory(X):
    """A backed matrix (``ad.read_h5ad(..., backed="r")``: an h5py dataset or anndata's sparse dataset) read into
    memory; in-memory matrices unchanged. Training visits every cell each epoch, so the counts are read once."""
    if hasattr(X, "to_memory"):  # anndata's backed CSR/CSC dataset
        return X.to_memory()
    if type(X).__module__.startswith("h5py"):  # backed dense X
        return X[()]
    return X


def _values(X) -> np.ndarray:
    if sp.issparse(X):
        return X.data if X.format in ("csr", "csc") else X.tocsr().data  # COO: duplicates summed first
    return np.asarray(X)


def _non_integer(v: np.ndarray) -> np.ndarray:
    return np.abs(v - np.round(v)) > 1e-6 * np.maximum(1.0, np.abs(v))


def is_count_matrix(X) -> bool:
    """True when every value of ``X`` (dense or sparse) is a non-negative integer (up to 1e-6 relative)."""
    v = _values(X)
    return bool(v.size == 0 or (v.min() >= 0 and not _non_integer(v).any()))


def check_values(X, count_likelihood: bool, where: str = "X") -> None:
    """Check a data matrix before training.

    Args:
        X: (n_cells, n_genes) dense or sparse.
        count_likelihood: True for zinb/nb/poisson: values must be non-negative integers.
        where: name of the matrix, for messages.

    Raises:
        CellvaeInputError: a dtype other than integers or floats; NaN or inf anywhere; values beyond the float32
            range; negative or non-integer values for a count likelihood.
    """
    raise_for_values(value_summary(_values(X), integers=count_likelihood), count_likelihood, where)


def value_summary(v: np.ndarray, integers: bool = True) -> dict:
    """What :func:`check_values` needs to know about the values ``v`` (a 1-d or 2-d array), mergeable over
    chunks with :func:`merge_value_summaries`: dtype, size, number of NaN/inf, min, max and (with ``integers``)
    the number of non-integer values and the first three of them."""
    out = {"dtype": v.dtype, "size": int(v.size), "n_nonfinite": 0, "min": None, "max": None,
           "n_nonint": 0, "nonint": []}
    if not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)) or not v.size:
        return out
    if np.issubdtype(v.dtype, np.floating):
        out["n_nonfinite"] = int((~np.isfinite(v)).sum())
        if out["n_nonfinite"]:
            return out
    out["min"], out["max"] = v.min(), v.max()
    if integers and np.issubdtype(v.dtype, np.floating):
        frac = _non_integer(v)
        out["n_nonint"] = int(frac.sum())
        out["nonint"] = list(v[frac][:3]) if out["n_nonint"] else []
    return out


def merge_value_summaries(a: dict | None, b: dict) -> dict:
    """The :func:`value_summary` of two chunks together (``a`` None: ``b``)."""
    if a is None:
        return dict(b)
    out = dict(a)
    if not (np.issubdtype(out["dtype"], np.integer) or np.issubdtype(out["dtype"], np.floating)):
        return out  # the first (non-numeric) dtype is what is reported
    out["size"] += b["size"]
    out["n_nonfinite"] += b["n_nonfinite"]
    for key, pick in (("min", min), ("max", max)):
        vals = [x for x in (a[key], b[key]) if x is not None]
        out[key] = pick(vals) if vals else None
    out["n_nonint"] += b["n_nonint"]
    out["nonint"] = (a["nonint"] + b["nonint"])[:3]
    return out


def raise_for_values(summary: dict, count_likelihood: bool, where: str = "X") -> None:
    """Raise :func:`check_values`' error for a :func:`value_summary` (of a whole matrix, or merged over chunks).

    Raises:
        CellvaeInputError: as :func:`check_values`.
    """
    dtype = summary["dtype"]
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise CellvaeInputError(
            f"{where} has dtype {dtype}, not integer or floating point numbers. Store the counts as numbers "
            f"(e.g. adata.X = adata.X.astype('float32') if they are numbers held as {dtype}), or pass the layer "
            "that holds them."
        )
    if summary["n_nonfinite"]:
        raise CellvaeInputError(
            f"{where} contains {summary['n_nonfinite']} NaN or infinite values; remove or fix those cells/genes "
            "first."
        )
    vmin, vmax = summary["min"], summary["max"]
    big = max(abs(float(vmax)), abs(float(vmin))) if summary["size"] else 0.0
    if big > _FLOAT32_MAX:
        raise CellvaeInputError(
            f"{where} contains values beyond the float32 range (max |x| {big:g} > 3.4e38), which "
            "training cannot represent; these are not counts: fix or remove them."
        )
    if not count_likelihood:
        return
    if summary["size"] and vmin < 0:
        raise CellvaeInputError(
            f"{where} contains negative values (min {vmin:g}): a count likelihood needs raw counts. "
            "Pass the raw-count layer (layer=... / --layer counts) or use gene_likelihood='normal'."
        )
    if summary["n_nonint"]:
        ex = summary["nonint"]
        raise CellvaeInputError(
            f"{where} contains non-integer values (e.g. {', '.join(f'{e:g}' for e in ex)}): a count likelihood "
            "needs raw counts, not normalized or log-transformed data. Pass the raw-count layer "
            "(layer=... / --layer counts) or use gene_likelihood='normal' (--gene-likelihood normal)."
        )


def select_highly_variable_genes(
    adata: ad.AnnData, n_top_genes: int, layer: str | None = None, batch_key: str | None = None
) -> np.ndarray:
    """Highly variable genes on raw counts with scanpy's ``seurat_v3`` flavour (Stuart et al. 2019).

    Works on a copy of the matrix; ``adata`` is not modified. When the flavour's loess fit fails (it can be singular
    when many genes are (nearly) undetected), the selection is retried on the genes detected in at least 3 cells,
    with a ``UserWarning``; other genes are then never selected.

    Args:
        adata: (n_cells, n_genes) raw counts in ``X`` or ``layer``.
        n_top_genes: number of genes to select; at least n_genes selects every gene.
        layer: layer holding the counts (default ``X``).
        batch_key: obs column for scanpy's per-batch selection.

    Returns:
        Boolean mask over genes, shape (n_genes,).

    Raises:
        ValueError: scanpy's error when the fit fails even on the detected genes, or when at most ``n_top_genes``
            genes are detected in 3 cells.
    """
    import scanpy as sc

    if n_top_genes >= adata.n_vars:
        return np.ones(adata.n_vars, dtype=bool)
    X = get_counts(adata, layer)
    tmp = ad.AnnData(X=X, obs=adata.obs[[batch_key]] if batch_key else None)
    tmp.var_names = adata.var_names
    try:
        df = sc.pp.highly_variable_genes(
            tmp, flavor="seurat_v3", n_top_genes=int(n_top_genes), batch_key=batch_key, inplace=False
        )
        return np.asarray(df["highly_variable"], dtype=bool)
    except ValueError as err:  # the loess fit of seurat_v3 can be singular with many (nearly) undetected genes
        detected = np.asarray((X > 0).sum(0)).ravel() >= 3
        if detected.sum() <= n_top_genes or detected.all():
            raise
        warnings.warn(f"seurat_v3 highly variable genes failed ({err}); retrying on the {int(detected.sum())} "
                      "genes detected in at least 3 cells.", stacklevel=2)
        mask = np.zeros(adata.n_vars, dtype=bool)
        mask[np.flatnonzero(detected)[select_highly_variable_genes(tmp[:, detected], n_top_genes, batch_key=batch_key)]] = True
        return mask


# --------------------------------------------------------------------------------------- covariates
def _categories(adata: ad.AnnData, key: str, role: str = "obs key") -> list[str]:
    col = _obs_column(adata, key, role)
    if col.isna().any():
        ex = adata.obs_names[np.flatnonzero(col.isna().to_numpy())[:3]].tolist()
        raise CellvaeInputError(
            f"obs[{key!r}] ({role}) has {int(col.isna().sum())} missing values (e.g. cells {ex}); fill them "
            f"(e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).fillna('unknown')) or drop those cells."
        )
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in col.cat.categories if (col == c).any()]
    else:
        cats = sorted(pd.unique(col.astype(str)).tolist())
    sizes = col.astype(str).value_counts()
    small = [c for c in cats if sizes.get(c, 0) < 3]
    if small:  # as scvi-tools' setup_anndata
        warn(f"obs[{key!r}] ({role}) has categories with fewer than 3 cells: {small[:5]}; the model may not learn "
             "them well. Merge or drop such categories if that matters.")
    return cats


def _obs_column(adata: ad.AnnData, key: str, role: str = "obs key") -> pd.Series:
    if key not in adata.obs.columns:
        raise CellvaeInputError(
            f"obs key {key!r} not found ({role} must be an obs column); available obs columns: "
            f"{list(adata.obs.columns) or 'none'}. Pass one of them, or add the column to adata.obs."
        )
    return adata.obs[key]


def _continuous(adata: ad.AnnData, keys: Sequence[str]) -> np.ndarray | None:
    """Continuous covariates as a float32 (n_cells, n_keys) array (None without keys).

    Raises:
        CellvaeInputError: a missing key, or NaN, inf or non-numeric values (naming the key and a few cells).
    """
    if not keys:
        return None
    cols = []
    for k in keys:
        col = _obs_column(adata, k, "continuous covariate")
        num = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(num)
        if bad.any():
            i = np.flatnonzero(bad)[:3]
            ex = ", ".join(f"cell {adata.obs_names[j]!s}: {col.iloc[j]}" for j in i)
            raise CellvaeInputError(
                f"obs[{k!r}] (continuous covariate) has {int(bad.sum())} NaN, infinite or non-numeric values "
                f"(e.g. {ex}); fix or drop those cells, or pass the column as a categorical covariate if it is one."
            )
        if np.abs(num).max() > 1e30:
            raise CellvaeInputError(f"obs[{k!r}] (continuous covariate) has values beyond 1e30; rescale it.")
        cols.append(num.astype(np.float32))
    return np.stack(cols, axis=1)


def _encode(adata: ad.AnnData, key: str, categories: Sequence[str], role: str = "obs key") -> np.ndarray:
    col = _obs_column(adata, key, role)
    if col.isna().any():
        raise CellvaeInputError(f"obs[{key!r}] ({role}) has {int(col.isna().sum())} missing values; fill them "
                                "(e.g. 'unknown') or drop those cells.")
    values = col.astype(str).to_numpy()
    codes = pd.Index(categories).get_indexer(values)
    if (codes < 0).any():
        unknown = sorted(set(values[codes < 0]))[:5]
        n_unknown = int((codes < 0).sum())
        raise CellvaeInputError(
            f"obs[{key!r}] ({role}) has categories unseen at training time: {unknown} ({n_unknown} cells); the "
            f"model knows {list(categories)}. Rename them to known categories, drop those cells, or train a model "
            "that includes them."
        )
    return codes.astype(np.int64)


@dataclass
class DataSpec:
    """How an AnnData becomes tensors: the genes, the matrix, and the covariate encodings (fixed at training).

    Attributes:
        gene_names: modelled genes, in model order.
        layer: layer holding the data, or None for ``X``.
        gene_likelihood: determines checks and the ``normal`` transform.
        batch_key, categorical_covariate_keys, continuous_covariate_keys: obs columns.
        batch_categories: categories of ``batch_key`` (``["0"]`` without one).
        categorical_categories: categories per categorical covariate key.
        normal_transform: for ``normal``: ``"log1p_cp10k"`` (counts normalized to 10,000 per cell, then log1p)
            or ``"none"`` (data used as given).
    """

    gene_names: list[str]
    layer: str | None = None
    gene_likelihood: str = "zinb"
    batch_key: str | None = None
    categorical_covariate_keys: list[str] = field(default_factory=list)
    continuous_covariate_keys: list[str] = field(default_factory=list)
    batch_categories: list[str] = field(default_factory=lambda: ["0"])
    categorical_categories: dict[str, list[str]] = field(default_factory=dict)
    normal_transform: str = "none"

    @classmethod
    def from_adata(
        cls,
        adata: ad.AnnData,
        gene_names: Sequence[str],
        layer: str | None = None,
        gene_likelihood: str = "zinb",
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        normal_transform: str = "none",
    ) -> "DataSpec":
        """Record genes and covariate categories from the training AnnData."""
        cat_keys = list(categorical_covariate_keys or [])
        cont_keys = list(continuous_covariate_keys or [])
        batch_categories = _categories(adata, batch_key, "batch_key") if batch_key else ["0"]
        _continuous(adata, cont_keys)  # NaN / inf / non-numeric: answered now, before training
        return cls(
            gene_names=[str(g) for g in gene_names],
            layer=layer,
            gene_likelihood=gene_likelihood,
            batch_key=batch_key,
            categorical_covariate_keys=cat_keys,
            continuous_covariate_keys=cont_keys,
            batch_categories=batch_categories,
            categorical_categories={k: _categories(adata, k, "categorical covariate") for k in cat_keys},
            normal_transform=normal_transform,
        )

    @property
    def n_batch(self) -> int:
        return len(self.batch_categories)

    @property
    def n_cats_per_cov(self) -> tuple[int, ...]:
        return tuple(len(self.categorical_categories[k]) for k in self.categorical_covariate_keys)

    def to_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(**d)

    # ----------------------------------------------------------------------------------------------
    def gene_indexer(self, adata: ad.AnnData) -> np.ndarray | None:
        """Column indices of the model's genes in ``adata`` (None when identical and in order).

        Raises:
            CellvaeInputError: genes of the model missing from ``adata``.
        """
        names = pd.Index(adata.var_names.astype(str))
        model = pd.Index(self.gene_names)
        if len(names) == len(model) and names.equals(model):
            return None
        if not names.is_unique:
            raise CellvaeInputError("adata.var_names are not unique; call adata.var_names_make_unique() first.")
        idx = names.get_indexer(model)
        if (idx < 0).any():
            missing = model[idx < 0]
            raise CellvaeInputError(
                f"{len(missing)} of the model's {len(model)} genes are missing from the data "
                f"(e.g. {list(missing[:5])}). Use data with the same genes (var_names) as the training data."
            )
        return idx

    def counts_matrix(self, adata: ad.AnnData):
        """The model's genes, in model order, from ``X`` or the layer (dense or CSR, not yet transformed)."""
        X = get_counts(adata, self.layer)
        idx = self.gene_indexer(adata)
        if idx is not None:
            X = X[:, idx]
        if sp.issparse(X):
            X = sp.csr_matrix(X)
        return X

    def prepare(self, adata: ad.AnnData, check: bool = True) -> "TensorData":
        """Encode ``adata`` once into :class:`TensorData`.

        Raises:
            CellvaeInputError: bad values, missing genes or obs keys, unknown categories, NaN/inf covariates.
        """
        X = self.counts_matrix(adata)
        if check:
            check_values(X, self.gene_likelihood != "normal", where=f"layers[{self.layer!r}]" if self.layer else "X")
        if self.gene_likelihood == "normal" and self.normal_transform == "log1p_cp10k":
            X = log1p_cp10k(X)
        cat, cont = self.covariate_tensors(adata)
        return TensorData(X, cat, cont)

    def covariate_tensors(self, adata: ad.AnnData) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Covariates of ``adata`` encoded as in :meth:`prepare`: ``cat`` (n_cells, 1 + n_cat) int64 codes,
        batch first, and ``cont`` (n_cells, n_cont) float32 or None.

        Raises:
            CellvaeInputError: missing obs keys, unknown categories, NaN/inf covariates.
        """
        n = adata.n_obs
        cols = [_encode(adata, self.batch_key, self.batch_categories, "batch_key") if self.batch_key
                else np.zeros(n, np.int64)]
        cols += [_encode(adata, k, self.categorical_categories[k], "categorical covariate")
                 for k in self.categorical_covariate_keys]
        cat = torch.from_numpy(np.stack(cols, axis=1))
        arr = _continuous(adata, self.continuous_covariate_keys)
        cont = torch.from_numpy(arr) if arr is not None else None
        return cat, cont


def log1p_cp10k(X):
    """``log1p(x / total * 1e4)`` per cell (scanpy ``normalize_total`` + ``log1p``), sparse-preserving."""
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        tot = np.asarray(X.sum(1)).ravel()
        tot[tot == 0] = 1.0
        X = sp.csr_matrix(sp.diags((1e4 / tot).astype(np.float32)) @ X)
        np.log1p(X.data, out=X.data)
        return X
    X = np.asarray(X, dtype=np.float32)
    tot = X.sum(1, keepdims=True)
    tot[tot == 0] = 1.0
    return np.log1p(X / tot * 1e4)


# --------------------------------------------------------------------------------------- minibatches
class TensorData:
    """Prepared tensors for n cells: data (dense tensor or CSR), covariate codes and continuous covariates.

    Args:
        X: (n_cells, n_genes) numpy array or scipy sparse matrix. Kept as float32 CSR (and densified per
            minibatch where a dense one is needed) when it is sparse with at most ``SPARSE_MAX_DENSITY`` of its
            entries non-zero (most count matrices: a fifth of the memory of a dense copy, and what the sparse
            training minibatches read) or has more than ``DENSE_MAX_ELEMENTS`` entries; else stored densely.
        cat: (n_cells, 1 + n_cat_covariates) int64 codes (batch first).
        cont: (n_cells, n_cont) float32 or None.
    """

    def __init__(self, X, cat: torch.Tensor, cont: torch.Tensor | None = None):
        n, g = X.shape
        self.n_cells, self.n_genes = n, g
        sparse_enough = sp.issparse(X) and X.nnz <= SPARSE_MAX_DENSITY * n * g
        if n * g <= DENSE_MAX_ELEMENTS and not sparse_enough:
            dense = X.toarray() if sp.issparse(X) else np.asarray(X)
            self.X = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
            self.csr = None
        else:
            self.X = None
            self.csr = sp.csr_matrix(X, dtype=np.float32)
        self.cat = cat
        self.cont = cont
        self._sparse = None  # see sparse_counts

    def __len__(self) -> int:
        return self.n_cells

    def sparse_counts(self) -> sp.csr_matrix | None:
        """The data as a canonical float32 CSR matrix without stored zeros (for :meth:`iterate_sparse`) when at most
        ``SPARSE_MAX_DENSITY`` of its entries are non-zero, else None. Made on first use (a dense ``X`` is
        converted, a CSR one kept as it is when already canonical) and kept."""
        if self._sparse is None:
            nnz = self.csr.nnz if self.csr is not None else np.count_nonzero(self.X.numpy())
            if nnz > SPARSE_MAX_DENSITY * self.n_cells * self.n_genes:
                self._sparse = False
            else:
                m = self.csr if self.csr is not None else sp.csr_matrix(self.X.numpy())
                if not (m.has_canonical_format and m.data.all()):  # sorted, no duplicates, no stored zeros
                    m = m.copy()
                    m.sum_duplicates()
                    m.eliminate_zeros()
                self._sparse = m
        return self._sparse if self._sparse is not False else None

    def densify(self) -> None:
        """Store a dense float32 copy of CSR-kept data that has at most ``DENSE_MAX_ELEMENTS`` entries, so that
        :meth:`batch` selects rows instead of densifying every minibatch (for a training loop that feeds dense
        minibatches); a no-op otherwise."""
        if self.X is None and self.n_cells * self.n_genes <= DENSE_MAX_ELEMENTS:
            self.X = torch.from_numpy(self.csr.toarray().astype(np.float32, copy=False))

    def batch(self, idx: torch.Tensor):
        """Rows ``idx`` (int64 tensor) as ``(x, cat, cont)`` tensors."""
        if self.X is not None:
            x = self.X.index_select(0, idx)
        else:
            x = torch.from_numpy(self.csr[idx.numpy()].toarray())
        cont = self.cont.index_select(0, idx) if self.cont is not None else None
        return x, self.cat.index_select(0, idx), cont

    def iterate(
        self,
        indices: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple]:
        """Yield ``(x, cat, cont)`` minibatches over ``indices``; see :func:`minibatch_slices`."""
        indices = _pass_order(indices, shuffle, generator)
        for a, b in minibatch_slices(len(indices), batch_size):
            yield self.batch(indices[a:b])

    def iterate_sparse(
        self,
        indices: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple]:
        """As :meth:`iterate` (the same minibatches in the same order, for the same generator state), with ``x`` a
        torch sparse CSR tensor (n_batch, n_genes) float32 with int64 indices (converted once per minibatch, the
        form the native kernels read; the pass itself keeps scipy's index type). The rows of the whole pass are gathered once (scipy's
        O(nnz) row indexing), so each minibatch is a contiguous slice of them.

        Raises:
            ValueError: the data are too dense for sparse minibatches (:meth:`sparse_counts` is None).
        """
        counts = self.sparse_counts()
        if counts is None:
            raise ValueError(f"iterate_sparse needs data with at most {SPARSE_MAX_DENSITY:.0%} non-zero entries; "
                             "use iterate().")
        indices = _pass_order(indices, shuffle, generator)
        m = counts[indices.numpy()]  # stored values are the non-zero counts, as the likelihood needs
        crow, col, val = (torch.from_numpy(a) for a in (m.indptr, m.indices, m.data))
        for a, b in minibatch_slices(len(indices), batch_size):
            s, e = int(crow[a]), int(crow[b])
            x = csr_tensor((crow[a:b + 1] - s).long(), col[s:e].long(), val[s:e], (b - a, self.n_genes))
            idx = indices[a:b]
            yield x, self.cat.index_select(0, idx), self.cont.index_select(0, idx) if self.cont is not None else None


def _pass_order(indices: torch.Tensor, shuffle: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The cells of one pass in minibatch order: ``indices`` permuted with ``generator`` when ``shuffle``."""
    return indices[torch.randperm(len(indices), generator=generator)] if shuffle else indices


def minibatch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Start/stop pairs covering ``range(n)`` in batches of ``batch_size``.

    A last batch of a single cell is merged into the one before (batch normalisation cannot train on one cell:
    scvi-tools issues #426, #2214), so no batch has size 1 unless n == 1.
    """
    if n <= 0:
        return []
    bounds = list(range(0, n, batch_size)) + [n]
    pairs = list(zip(bounds[:-1], bounds[1:]))
    if len(pairs) > 1 and pairs[-1][1] - pairs[-1][0] == 1:
        pairs[-2] = (pairs[-2][0], n)
        pairs.pop()
    return pairs


def split_indices(n: int, train_size: float = 0.9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)`` into train and validation indices (sorted).

    ``train_size`` of 1.0 gives no validation cells. With fewer than 2 validation cells and ``train_size < 1``,
    at least one cell is kept for validation when n >= 2.
    """
    if not 0.0 < train_size <= 1.0:
        raise CellvaeInputError(f"train_size must be in (0, 1], got {train_size}.")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_train = int(np.ceil(train_size * n))
    if train_size < 1.0 and n_train >= n and n >= 2:
        n_train = n - 1
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)
