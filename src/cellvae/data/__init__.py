"""Data layer: AnnData and files in, checked and prepared tensors out (one interface for memory and disk).

- :mod:`.read`: find and read datasets (path, ``$CELLVAE_DATA_DIR``, URL; .h5ad, 10x, tables);
- :mod:`.checks`: what the counts must satisfy before training, with messages that say how to fix them;
- :mod:`.preprocess`: highly variable genes and log1p normalisation;
- :mod:`.spec`: :class:`DataSpec`, how an AnnData becomes tensors (genes, covariate encodings);
- :mod:`.tensors`: :class:`TensorData`, minibatches of cells held in memory; :mod:`.backed`: the same from disk;
- :mod:`.sparse`: CSR tensors and their checks; :mod:`.fileio`: atomic writes; :mod:`.images`: image arrays.

Every layer of cellvae may import from here; this package imports only :mod:`cellvae.errors` and
:mod:`cellvae.settings`.
"""

from ..errors import CellvaeInputError
from .backed import BackedData, is_backed, open_backed, scan_counts
from .checks import check_values, counts_source, get_counts, is_count_matrix
from .preprocess import log1p_cp10k, select_highly_variable_genes
from .read import DATA_DIR_ENV, read_data, resolve_data_path
from .spec import DataSpec
from .tensors import DENSE_MAX_ELEMENTS, SPARSE_MAX_DENSITY, TensorData, minibatch_slices, split_indices

__all__ = ["CellvaeInputError", "read_data", "resolve_data_path", "DATA_DIR_ENV", "get_counts", "counts_source",
           "check_values", "is_count_matrix", "select_highly_variable_genes", "log1p_cp10k", "DataSpec",
           "TensorData", "BackedData", "is_backed", "open_backed", "scan_counts", "split_indices",
           "minibatch_slices", "DENSE_MAX_ELEMENTS", "SPARSE_MAX_DENSITY"]
