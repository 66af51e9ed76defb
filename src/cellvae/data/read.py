"""Find and read single-cell data: a path, a file name in ``$CELLVAE_DATA_DIR`` or an http(s) URL; ``.h5ad``, 10x
``.h5`` and directories, ``.csv``/``.tsv`` tables and ``.loom``. The file is never modified; a download is written
to a temporary name and renamed.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from ..errors import CellvaeInputError, warn
from .checks import canonical_sparse

__all__ = ['DATA_DIR_ENV', 'resolve_data_path', 'read_data']



DATA_DIR_ENV = "CELLVAE_DATA_DIR"


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

    Supported: ``.h5ad`` (anndata), ``.h5mu`` (MuData: its ``rna`` modality, with the ``prot`` modality's counts in
    ``obsm['protein_expression']`` when it has one; :func:`cellvae.data.protein.mudata_to_anndata`), 10x ``.h5`` and
    10x directories (``matrix.mtx[.gz]``; scanpy readers),
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
        elif suffixes.endswith(".h5mu"):
            adata = _read_h5mu(p)
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
                f"Unknown data format for {p.name!r}: use .h5ad, .h5mu, 10x .h5, a 10x directory, .csv, .tsv or "
                ".loom."
            )
    except CellvaeInputError:
        raise
    except pd.errors.ParserError as e:
        first = (str(e).strip().splitlines() or ["parse error"])[0]
        raise CellvaeInputError(
            f"Could not read {str(p)!r} as a table: {first}. A row has more values than the header has gene names "
            "(header: cell-name column, then one name per gene); fix that row or the header."
        ) from e
    except (OSError, ValueError, KeyError, TypeError, EOFError, UnicodeDecodeError, RuntimeError) as e:
        what = suffixes or "a 10x directory"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CellvaeInputError(
            f"Could not read {str(p)!r} as {what}: {first}. The file is truncated, damaged or not in that format; "
            "check it (e.g. download or export it again)."
        ) from e
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CellvaeInputError(f"{str(p)!r} holds an empty matrix ({adata.n_obs} cells x {adata.n_vars} genes); "
                                "check the file.")
    if sp.issparse(adata.X):  # a malformed sparse matrix is refused here, before anything reads it
        adata.X = canonical_sparse(adata.X, f"{p.name}: X")
    for key in list(adata.layers.keys()):
        if sp.issparse(adata.layers[key]):
            adata.layers[key] = canonical_sparse(adata.layers[key], f"{p.name}: layers[{key!r}]")
    return adata


def _read_h5mu(path: Path) -> ad.AnnData:
    """The ``rna`` modality of a MuData file, with the ``prot`` counts in ``obsm['protein_expression']`` when there
    are some (a MuData of one modality: that one).

    Raises:
        CellvaeInputError: no ``rna`` modality in a MuData of several, or mismatched cells between the modalities.
    """
    import mudata

    from .protein import PROTEIN_MODALITY, RNA_MODALITY, mudata_to_anndata

    md = mudata.read_h5mu(path)
    if RNA_MODALITY in md.mod and PROTEIN_MODALITY in md.mod:
        return mudata_to_anndata(md)
    if len(md.mod) == 1 or RNA_MODALITY in md.mod:
        return md.mod[RNA_MODALITY if RNA_MODALITY in md.mod else next(iter(md.mod))]
    raise CellvaeInputError(f"{path.name}: a MuData without an {RNA_MODALITY!r} modality (modalities: "
                            f"{list(md.mod)}); name the RNA modality {RNA_MODALITY!r} (and the ADT one "
                            f"{PROTEIN_MODALITY!r}).")


def _table_to_adata(df: pd.DataFrame, path: Path) -> ad.AnnData:
    """A cells x genes table (first column cell names, header row gene names) as AnnData, with checks.

    Raises:
        CellvaeInputError: non-numeric columns, or rows with fewer values than the header (empty fields).
    """
    name = path.name
    if df.shape[0] == 0:
        raise CellvaeInputError(
            f"{name} has a header row ({df.shape[1]} gene names) but no rows of counts: there are no cells in it. A "
            "count table needs one row per cell (its name, then one count per gene); check that the file was "
            "written completely."
        )
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


