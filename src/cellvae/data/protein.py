"""Surface-protein counts next to the RNA (CITE-seq, REAP-seq, TEA-seq): where they are, what they must satisfy, and how
they join the RNA in the prepared tensors of a joint model (:class:`cellvae.RNAProteinVAE`).

- In an AnnData the antibody-derived tag (ADT) counts are ``obsm[protein_key]``, a DataFrame (one column per
  protein, indexed by the cells) or an array; in a :class:`mudata.MuData` they are the ``prot`` modality next to
  ``rna`` (the scverse convention), joined by :func:`mudata_to_anndata`.
- :func:`protein_table` checks them (numbers, non-negative integers, one row per cell) with messages that say how to
  fix them; :func:`protein_batch_mask` marks a protein that is all zero (or all missing) in a batch as not measured
  there, so a batch whose panel lacks it is masked instead of being taught zeros (as scvi-tools' TOTALVI);
  :func:`background_prior` estimates the starting prior of each protein's background per batch.
- :class:`ProteinSpec` records the proteins next to the genes and prepares :class:`RNAProteinData`: one
  (n_cells, n_genes + n_proteins) matrix, RNA first, so that the training loop and the minibatch interface stay
  generic; its library sizes are those of the RNA.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import CellvaeInputError, warn
from .checks import check_values
from .spec import DataSpec
from .tensors import TensorData

__all__ = ["PROTEIN_KEY", "RNA_MODALITY", "PROTEIN_MODALITY", "BACKGROUND_PRIORS", "protein_table",
           "protein_batch_mask", "isotype_controls", "background_prior", "is_mudata", "mudata_to_anndata",
           "ProteinSpec", "RNAProteinData"]

PROTEIN_KEY = "protein_expression"  # scvi-tools' and the shared data's obsm key
RNA_MODALITY, PROTEIN_MODALITY = "rna", "prot"  # MuData modality names (scverse convention)
BACKGROUND_PRIORS = ("auto", "isotype", "mixture")
PRIOR_MAX_CELLS = 2000  # cells per batch for the mixture fit of the background prior (a seeded sample)
_ISOTYPE = re.compile(r"isotype|(^|[^a-z])(mouse|rat|hamster|armenian)?[_ -]?igg\d*[a-z]?($|[^a-z])|(^|[^a-z])ctrl|control",
                      re.IGNORECASE)
_EXACT = float(2 ** 24)


# ------------------------------------------------------------------------------------------------ the table
def protein_table(adata: ad.AnnData, protein_key: str = PROTEIN_KEY) -> pd.DataFrame:
    """The protein counts of ``adata`` as a float64 DataFrame (n_cells, n_proteins), indexed by ``obs_names``, one
    column per protein (an array in ``obsm`` gets columns ``protein_0``, ...; names from ``uns['protein_names']``
    when it lists one per column). Missing values (NaN) are kept: :func:`protein_batch_mask` decides about them.

    Raises:
        CellvaeInputError: ``protein_key`` absent from ``obsm``; not a 2-d table of numbers; rows that are not the
            cells (another index or length); duplicated protein names; infinite, negative or non-integer counts, or
            counts above 2^24.
    """
    if protein_key not in adata.obsm:
        keys = list(adata.obsm.keys())
        raise CellvaeInputError(
            f"protein_key {protein_key!r} is not in adata.obsm (keys: {keys or 'none'}). Store the protein (ADT) "
            f"counts there as a DataFrame with one column per protein (adata.obsm[{protein_key!r}] = df), pass the "
            "key that holds them (--protein-key), or pass a MuData with 'rna' and 'prot' modalities.")
    raw = adata.obsm[protein_key]
    where = f"obsm[{protein_key!r}]"
    if isinstance(raw, pd.DataFrame):
        if len(raw.index) == adata.n_obs and not raw.index.astype(str).equals(adata.obs_names.astype(str)):
            raise CellvaeInputError(f"{where} is indexed by other cells than adata.obs_names: the protein and RNA "
                                    "rows must be the same cells in the same order (reindex it: "
                                    f"adata.obsm[{protein_key!r}] = df.loc[adata.obs_names]).")
        bad = [str(c) for c, t in raw.dtypes.items() if not (pd.api.types.is_numeric_dtype(t)
                                                             and not pd.api.types.is_bool_dtype(t))]
        if bad:
            raise CellvaeInputError(f"{where} has non-numeric columns {bad[:5]}: protein counts must be numbers.")
        names = [str(c) for c in raw.columns]
        values = raw.to_numpy(dtype=np.float64)
    else:
        values = raw.toarray() if sp.issparse(raw) else np.asarray(raw)
        if values.ndim != 2 or not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype,
                                                                                             np.floating)):
            raise CellvaeInputError(f"{where} must be a 2-d table of numbers (cells x proteins), got "
                                    f"{type(raw).__name__} of dtype {values.dtype} and shape {values.shape}.")
        values = values.astype(np.float64)
        listed = adata.uns.get("protein_names")
        names = ([str(n) for n in listed] if listed is not None and len(listed) == values.shape[1]
                 else [f"protein_{i}" for i in range(values.shape[1])])
    if values.shape[0] != adata.n_obs:
        raise CellvaeInputError(f"{where} has {values.shape[0]} rows for {adata.n_obs} cells: mismatched cells "
                                "between the protein and RNA tables.")
    if values.shape[1] == 0:
        raise CellvaeInputError(f"{where} has no proteins (0 columns).")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CellvaeInputError(f"{where} has duplicated protein names {dup[:5]}; proteins are matched by name: "
                                "make them unique.")
    _check_protein_values(values, where)
    return pd.DataFrame(values, index=adata.obs_names.astype(str), columns=pd.Index(names))


def _check_protein_values(values: np.ndarray, where: str) -> None:
    finite = values[~np.isnan(values)]
    if np.isinf(finite).any():
        raise CellvaeInputError(f"{where} contains {int(np.isinf(finite).sum())} infinite values; protein counts "
                                "must be finite.")
    if finite.size and finite.min() < 0:
        raise CellvaeInputError(f"{where} contains negative values (min {finite.min():g}): the protein likelihood "
                                "needs raw ADT counts (non-negative integers), not normalized (e.g. CLR) values.")
    frac = finite[finite != np.round(finite)]
    if frac.size:
        raise CellvaeInputError(f"{where} contains {frac.size} non-integer values (e.g. {list(frac[:3])}): the "
                                "protein likelihood needs raw ADT counts, not normalized or log-transformed values.")
    if finite.size and finite.max() > _EXACT:
        raise CellvaeInputError(f"{where} contains counts above 2^24 (max {finite.max():.10g}), beyond what float32 "
                                "holds exactly; check that these are raw counts.")


def protein_batch_mask(values: np.ndarray, batch: np.ndarray, n_batch: int, names: Sequence[str] | None = None,
                       batch_names: Sequence[str] | None = None, override_missing: bool = False) -> np.ndarray:
    """(n_batch, n_proteins) bool: whether each protein is measured in each batch. A protein whose counts are all
    zero, or all missing (NaN), in a batch is not measured there (its panel lacks it); it is masked out of that
    batch's likelihood, not modelled as zeros. Missing values are allowed only that way.

    Args:
        values: (n_cells, n_proteins) counts (NaN = missing).
        batch: (n_cells,) batch codes in [0, n_batch).
        names, batch_names: for messages.
        override_missing: treat all-zero proteins as measured (their zeros are real); all-NaN ones stay masked.

    Raises:
        CellvaeInputError: NaN for some but not all cells of a batch, or a batch without any measured protein.
    """
    names = list(names) if names is not None else [str(i) for i in range(values.shape[1])]
    batch_names = list(batch_names) if batch_names is not None else [str(b) for b in range(n_batch)]
    nan = np.isnan(values)
    mask = np.ones((n_batch, values.shape[1]), dtype=bool)
    for b in range(n_batch):
        rows = batch == b
        if not rows.any():
            continue
        part_nan = nan[rows]
        some = part_nan.any(0) & ~part_nan.all(0)
        if some.any():
            t = int(np.flatnonzero(some)[0])
            raise CellvaeInputError(
                f"Protein {names[t]!r} has missing (NaN) counts in {int(part_nan[:, t].sum())} of "
                f"{int(rows.sum())} cells of batch {batch_names[b]!r}. A protein may be missing only for a whole batch "
                "(its panel lacks it); fill the other NaN with the measured counts or drop those cells.")
        absent = part_nan.all(0)
        if not override_missing:
            absent |= np.nan_to_num(values[rows]).sum(0) == 0
        mask[b] = ~absent
        if not mask[b].any():
            raise CellvaeInputError(f"Batch {batch_names[b]!r} has no measured protein (every protein is zero or "
                                    "missing in its cells); drop that batch or model its RNA with CountVAE.")
    return mask


def isotype_controls(names: Sequence[str]) -> list[str]:
    """The protein names that look like isotype controls (``isotype``, ``control``/``ctrl``, or an IgG isotype
    such as ``IgG1``, ``IgG2a``, ``Mouse_IgG2b``): antibodies without a target, whose counts are background only."""
    return [str(n) for n in names if _ISOTYPE.search(str(n))]


def background_prior(values: np.ndarray, batch: np.ndarray, mask: np.ndarray, isotypes: Sequence[int] = (),
                     method: str = "auto", seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Starting mean and standard deviation of the prior of each protein's log background mean ``log beta`` per
    batch (totalVI's prior, Gayoso et al. 2021; learned from there during training), in log counts.

    - ``"isotype"`` (``"auto"`` when isotype controls are named): the background of a cell is what its isotype
      controls bind. For each batch, mean and standard deviation over cells of ``log1p`` of the cell's mean
      isotype count; every protein starts from that, and each isotype control from its own counts.
    - ``"mixture"`` (``"auto"`` otherwise): per protein and batch, a two-component Gaussian mixture on ``log1p``
      counts (at most :data:`PRIOR_MAX_CELLS` cells, seeded); the lower component is the background. A protein
      too uniform for two components (fewer than 3 distinct values) takes the mean and standard deviation of its
      lower half. (scvi-tools fits one mixture per cell over proteins and averages it into one value per batch.)

    Args:
        values: (n_cells, n_proteins) counts (NaN where missing).
        batch: (n_cells,) batch codes; mask: (n_batch, n_proteins) measured proteins (:func:`protein_batch_mask`).
        isotypes: column indices of the isotype controls.
        method: ``"auto"``, ``"isotype"`` or ``"mixture"``.
        seed: seeds the cell sample and the mixture fits.

    Returns:
        ``(mean, scale, method used)``: two (n_batch, n_proteins) float32 arrays (scale >= 0.05) and the method.
        Masked entries get the mean of the batch's measured ones.

    Raises:
        CellvaeInputError: an unknown method, or ``"isotype"`` without isotype controls.
    """
    if method not in BACKGROUND_PRIORS:
        raise CellvaeInputError(f"background_prior must be one of {BACKGROUND_PRIORS}, got {method!r}.")
    isotypes = list(isotypes)
    if method == "auto":
        method = "isotype" if isotypes else "mixture"
    if method == "isotype" and not isotypes:
        raise CellvaeInputError("background_prior='isotype' needs isotype controls: name them (isotype_controls=[...])"
                                " or use 'mixture'.")
    rng = np.random.default_rng(seed)
    n_batch, n_prot = mask.shape
    mean = np.zeros((n_batch, n_prot), np.float64)
    scale = np.ones((n_batch, n_prot), np.float64)
    for b in range(n_batch):
        rows = np.flatnonzero(batch == b)
        if len(rows) == 0:
            mean[b], scale[b] = 3.0, 1.0
            continue
        if len(rows) > PRIOR_MAX_CELLS:
            rows = np.sort(rng.choice(rows, PRIOR_MAX_CELLS, replace=False))
        lv = np.log1p(np.nan_to_num(values[rows]))
        if method == "isotype":
            iso = [t for t in isotypes if mask[b, t]] or isotypes
            level = np.log1p(np.nan_to_num(values[rows][:, iso]).mean(1))
            mean[b], scale[b] = level.mean(), level.std()
            for t in iso:
                mean[b, t], scale[b, t] = lv[:, t].mean(), lv[:, t].std()
        else:
            for t in range(n_prot):
                if mask[b, t]:
                    mean[b, t], scale[b, t] = _lower_component(lv[:, t], seed)
        measured = mask[b]
        if (~measured).any() and measured.any():
            mean[b, ~measured], scale[b, ~measured] = mean[b, measured].mean(), scale[b, measured].mean()
    return mean.astype(np.float32), np.maximum(scale, 0.05).astype(np.float32), method


def _lower_component(v: np.ndarray, seed: int) -> tuple[float, float]:
    """Mean and standard deviation of the lower component of a two-component Gaussian mixture of ``v`` (1-d)."""
    from sklearn.mixture import GaussianMixture

    if len(np.unique(v)) >= 3 and len(v) >= 10:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = GaussianMixture(2, random_state=seed, reg_covar=1e-3).fit(v.reshape(-1, 1))
        k = int(np.argmin(gm.means_.ravel()))
        return float(gm.means_.ravel()[k]), float(np.sqrt(gm.covariances_.ravel()[k]))
    low = np.sort(v)[: max(1, len(v) // 2)]
    return float(low.mean()), float(low.std())


# ------------------------------------------------------------------------------------------------- MuData
def is_mudata(data) -> bool:
    """Whether ``data`` is a :class:`mudata.MuData` (checked without importing mudata)."""
    return type(data).__name__ == "MuData" and hasattr(data, "mod")


def mudata_to_anndata(mdata, protein_key: str = PROTEIN_KEY, rna_modality: str = RNA_MODALITY,
                      protein_modality: str = PROTEIN_MODALITY, protein_layer: str | None = None) -> ad.AnnData:
    """The RNA modality of a MuData as an AnnData with the protein counts in ``obsm[protein_key]`` (a DataFrame,
    proteins as columns, rows in the RNA's cell order) and the MuData's global ``obs`` columns joined to the RNA's
    own. The arrays are shared, not copied; the MuData is not modified.

    Raises:
        CellvaeInputError: a missing modality or protein layer, duplicated cell names, or mismatched cells between the
            modalities (the protein modality must hold exactly the RNA's cells, in any order).
    """
    for m in (rna_modality, protein_modality):
        if m not in mdata.mod:
            raise CellvaeInputError(f"The MuData has no {m!r} modality (modalities: {list(mdata.mod)}). The joint "
                                    f"model needs RNA in {rna_modality!r} and protein (ADT) counts in "
                                    f"{protein_modality!r}.")
    rna, prot = mdata.mod[rna_modality], mdata.mod[protein_modality]
    for a, m in ((rna, rna_modality), (prot, protein_modality)):
        if not a.obs_names.is_unique:
            raise CellvaeInputError(f"The MuData's {m!r} modality has duplicated cell names; make them unique.")
    r_names, p_names = rna.obs_names.astype(str), prot.obs_names.astype(str)
    if not r_names.equals(p_names):
        only_r, only_p = r_names.difference(p_names), p_names.difference(r_names)
        if len(only_r) or len(only_p):
            raise CellvaeInputError(
                f"Mismatched cells between modalities: {len(only_r)} cells of {rna_modality!r} are not in "
                f"{protein_modality!r} (e.g. {list(only_r[:3])}) and {len(only_p)} cells of {protein_modality!r} are "
                f"not in {rna_modality!r} (e.g. {list(only_p[:3])}). Keep the cells measured in both, e.g. "
                "mudata.pp.intersect_obs(mdata).")
    if protein_layer is not None and protein_layer not in prot.layers:
        raise CellvaeInputError(f"Layer {protein_layer!r} not in the {protein_modality!r} modality (layers: "
                                f"{list(prot.layers.keys()) or 'none'}).")
    Y = prot.layers[protein_layer] if protein_layer is not None else prot.X
    Y = Y.toarray() if sp.issparse(Y) else np.asarray(Y)
    order = p_names.get_indexer(r_names)
    df = pd.DataFrame(Y[order], index=rna.obs_names, columns=prot.var_names.astype(str))
    obs = rna.obs.copy()
    glob = mdata.obs.reindex(rna.obs_names.astype(str)) if mdata.obs.shape[1] else None
    if glob is not None:
        for c in glob.columns:  # shared columns, and the RNA's own prefixed ones under their plain name
            name = c[len(rna_modality) + 1:] if c.startswith(rna_modality + ":") else c
            if ":" not in name and name not in obs.columns:
                obs[name] = glob[c].to_numpy()
    out = ad.AnnData(X=rna.X, obs=obs, var=rna.var.copy(), layers={k: rna.layers[k] for k in rna.layers.keys()},
                     obsm={k: rna.obsm[k] for k in rna.obsm.keys() if k != protein_key}, uns=dict(rna.uns))
    out.obsm[protein_key] = df
    return out


# ------------------------------------------------------------------------------------------ prepared tensors
@dataclass
class ProteinSpec(DataSpec):
    """:class:`cellvae.data.DataSpec` with the proteins: the genes, then ``protein_names`` (model order) read from
    ``obsm[protein_key]`` and matched by name.

    Attributes:
        protein_key: the obsm key of the protein counts.
        protein_names: the modelled proteins, in model order.
    """

    protein_key: str = PROTEIN_KEY
    protein_names: list[str] = field(default_factory=list)

    @property
    def n_proteins(self) -> int:
        return len(self.protein_names)

    @property
    def feature_names(self) -> list[str]:
        """The columns of the prepared matrix: the genes, then the proteins."""
        return list(self.gene_names) + list(self.protein_names)

    def protein_values(self, adata: ad.AnnData) -> np.ndarray:
        """(n_cells, n_proteins) float32 counts of the model's proteins (NaN of missing panels as 0).

        Raises:
            CellvaeInputError: as :func:`protein_table`, and proteins of the model missing from the data.
        """
        table = protein_table(adata, self.protein_key)
        idx = table.columns.get_indexer(self.protein_names)
        if (idx < 0).any():
            missing = [p for p, i in zip(self.protein_names, idx) if i < 0]
            raise CellvaeInputError(f"{len(missing)} of the model's {self.n_proteins} proteins are missing from "
                                    f"obsm[{self.protein_key!r}] (e.g. {missing[:5]}); use data with the same "
                                    "protein panel (columns) as the training data.")
        return np.nan_to_num(table.to_numpy()[:, idx]).astype(np.float32)

    def prepare(self, adata: ad.AnnData, check: bool = True) -> "RNAProteinData":
        """Encode ``adata`` into :class:`RNAProteinData` (genes, then proteins).

        Raises:
            CellvaeInputError: as :meth:`DataSpec.prepare` and :meth:`protein_values`.
        """
        X = self.counts_matrix(adata)
        if check:
            check_values(X, True, where=f"layers[{self.layer!r}]" if self.layer else "X")
        Y = self.protein_values(adata)
        cat, cont = self.covariate_tensors(adata)
        return RNAProteinData(X, Y, cat, cont)


class RNAProteinData(TensorData):
    """Prepared cells of a joint model: the (n_cells, n_genes + n_proteins) matrix (RNA first) of
    :class:`cellvae.data.TensorData`, whose ``n_genes`` is the number of its columns; :meth:`row_sums` are the RNA
    library sizes.

    Args:
        X: (n_cells, n_rna_genes) RNA counts, dense or sparse.
        Y: (n_cells, n_proteins) protein counts, dense.
        cat, cont: covariates, as :class:`TensorData`.

    Attributes:
        n_rna_genes, n_proteins: the column blocks.
    """

    def __init__(self, X, Y: np.ndarray, cat, cont=None):
        Y = np.asarray(Y, dtype=np.float32)
        joint = sp.hstack([sp.csr_matrix(X), sp.csr_matrix(Y)], format="csr") if sp.issparse(X) else \
            np.hstack([np.asarray(X, dtype=np.float32), Y])
        super().__init__(joint, cat, cont)
        self.n_rna_genes, self.n_proteins = int(X.shape[1]), int(Y.shape[1])
        lib = np.asarray(X.sum(1, dtype=np.float64)).ravel()
        self._rna_library = lib
        self._rna_library_abs = lib if (sp.issparse(X) and X.nnz == 0) or _non_negative(X) else \
            np.asarray(abs(X).sum(1, dtype=np.float64)).ravel()

    def row_sums(self, absolute: bool = False) -> np.ndarray:
        """(n_cells,) float64 RNA library sizes (total counts over the genes; of |x| with ``absolute``)."""
        return self._rna_library_abs if absolute else self._rna_library

    def protein_counts(self, rows=None) -> np.ndarray:
        """(len(rows), n_proteins) float32 protein counts of the cells ``rows`` (None: all)."""
        rows = np.arange(self.n_cells) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        return self.rows(rows)[:, self.n_rna_genes:].toarray()


def _non_negative(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X)
    return bool(data.size == 0 or data.min() >= 0)


def warn_masked(mask: np.ndarray, names: Sequence[str], batch_names: Sequence[str]) -> None:
    """Warn, naming them, about proteins masked in some batches (:func:`protein_batch_mask`)."""
    if mask.all():
        return
    parts = [f"{batch_names[b]}: {[names[t] for t in np.flatnonzero(~mask[b])][:6]}" for b in range(mask.shape[0])
             if not mask[b].all()]
    warn("Some proteins are all zero (or missing) in a batch and are treated as not measured there (masked, not "
         f"modelled as zeros): {'; '.join(parts)}. Pass override_missing_proteins=True if those zeros are real.")
