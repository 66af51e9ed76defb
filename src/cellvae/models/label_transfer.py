"""Label transfer with a semi-supervised count VAE: :class:`LabelTransferVAE` (the scANVI model; Xu et al. 2021,
Mol. Syst. Biol. 17:e9620).

The usual workflow, as scvi-tools' ``SCVI`` -> ``SCANVI.from_scvi_model`` -> ``load_query_data``:

    ref = cellvae.CountVAE(reference, batch_key="batch").train()
    lt = cellvae.LabelTransferVAE.from_count_vae(ref, labels_key="cell_type", unlabeled_category="Unknown").train()
    mapped = lt.map_query(query, batch_key="batch")           # scArches surgery: the reference stays frozen
    table = mapped.predict_table()                             # label, confidence, unknown flag per query cell

Beyond scANVI:

- **Every label counts.** The classifier's cross-entropy weighs each labelled cell by the inverse frequency of its
  label (``class_weighting="balanced"``, :class:`cellvae.settings.ModelSettings`), so rare types are predicted.
  Chosen on five splits of ``benchmarks/label_transfer.py`` (seed 0): balanced accuracy on the query 0.937 on
  average against 0.804 unweighted (10x PBMC chemistries: 0.48 -> 0.87 and 0.65 -> 0.92; the other three within
  0.02), and confirmed on the others in ``benchmarks/results/label_transfer.md``.
- **Known labels are kept.** :meth:`LabelTransferVAE.predict` returns a cell's own label when it has a known one
  (``overwrite_known=True`` predicts every cell).
- **Calibrated confidence.** After training, a temperature (Guo et al. 2017) is fitted on all the held-out
  (validation) reference cells with known labels. The expected calibration error (ECE) before and after it
  (``model.calibration``) is cross-fitted: the cells are split in two seeded halves, and each half's ECE after
  scaling uses the temperature fitted on the other half. Confidences are the tempered probabilities.
- **An "unknown" call** for cells unlike every reference label, from three signals, each compared with its values
  on held-out reference cells: the latent kNN distance to the reference cells (mean over 10 neighbours), the
  uncertainty ``1 - confidence``, and the gene surprise (the mean of the 50 largest per-gene NLL z-scores,
  :func:`cellvae.analysis.anomaly.gene_surprise`: a new type's marker genes stay unexplained even where its cells
  are encoded near a known type). Each value becomes the normal quantile of its rank among the held-out cells'
  values, ``Phi^-1((rank + 0.5) / (n + 1))`` (plus 0.001 times its z-score, which orders values beyond the held-out
  range), and ``unknown_score`` is their sum; ``unknown`` is ``unknown_score`` above the ``unknown_quantile``
  (0.99) of the held-out cells' own scores, so that about 1 % of cells like the reference are flagged. The
  combination was chosen on five splits of ``benchmarks/label_transfer.py`` (seed 0; mean AUROC 0.937 against
  0.882 for the distance alone) and is confirmed on the rest in ``benchmarks/results/label_transfer.md``.

  *Limitation:* the threshold comes from reference cells. A query much deeper than the reference, or from another
  technology, scores higher on every signal, so the flag can mark many cells of known types: 13 % of them on
  average over the 12 splits of ``benchmarks/label_transfer.py``, and 76 % on one cell-line split whose query is
  1.8x deeper. :meth:`LabelTransferVAE.predict_table` warns when more than a quarter of the cells it predicts are
  flagged. On such a query, rank cells by ``unknown_score`` and look at the flagged fraction per predicted label.
  Scoring the gene surprise against the query's own per-gene statistics cut those false calls to 2-3 %, but it lost
  40 % of the left-out-type calls on the PBMC splits, so it was not adopted
  (``benchmarks/results/label_transfer_defaults.md``).

The reference's latent means (at most :data:`MAX_REFERENCE_CELLS` training cells, a seeded sample) and their
labels are saved with the model (``label_reference.npz``) and carried into mapped models, so a mapped model scores
query cells without the reference data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..errors import CellvaeInputError
from ..metrics.calibration import expected_calibration_error, fit_temperature, softmax
from ..settings import ModelSettings, TrainSettings, build, default_max_epochs, with_signature
from ..vae.module import VAEModule
from ..vae.scanvi import LabelTransferModule
from .count_vae import CountVAE

__all__ = ["LabelTransferVAE", "MAX_REFERENCE_CELLS", "UNKNOWN_LABEL", "PRETRAINED_MAX_EPOCHS", "UNKNOWN_WARN_FRACTION",
           "UNKNOWN_WARN_MIN_CELLS"]

MAX_REFERENCE_CELLS = 20_000  # reference latent means kept for the unknown score (a seeded sample)
UNKNOWN_LABEL = "unknown"  # predict_table's label of cells flagged unknown (with unknown_as_label=True)
PRETRAINED_MAX_EPOCHS = 10  # epochs after from_count_vae (scvi-tools: min(10, max(2, round(default / 3))))
REFERENCE_FILE = "label_reference.npz"
UNKNOWN_N_NEIGHBORS = 10  # neighbours of the latent kNN distance of the unknown score
UNKNOWN_N_TOP_GENES = 50  # genes of the gene surprise of the unknown score
MAX_HELDOUT_CELLS = 5_000  # held-out reference values kept per signal (a seeded sample)
UNKNOWN_WARN_FRACTION = 0.25  # predict_table warns when more of its predicted cells than this are flagged unknown
UNKNOWN_WARN_MIN_CELLS = 50  # ... and it predicted at least this many cells


class LabelTransferVAE(CountVAE):
    """The semi-supervised count VAE of scANVI (module docstring; the model: :class:`cellvae.vae.scanvi.
    LabelTransferModule`, Kingma et al. 2014 M2 on the scVI likelihood).

    Args:
        adata: AnnData (n_cells, n_genes) of raw counts, as :class:`CountVAE`. Not modified.
        labels_key: obs column of the cell labels; cells whose value is ``unlabeled_category`` or missing have no
            label and are learned from without one.
        unlabeled_category: the value of ``labels_key`` that marks a cell without a label ("Unknown").
        layer, batch_key, categorical_covariate_keys, continuous_covariate_keys, out_of_core, settings: as
            :class:`CountVAE`.
        **model_settings: as :class:`CountVAE` (``classification_ratio``, the weight of the classifier's
            cross-entropy on labelled cells, defaults to 50 as scvi-tools').

    Attributes:
        labels: the known labels in code order (the columns of :meth:`predict` with ``soft=True``).
        temperature: the fitted temperature (1.0 before training).
        calibration: ECE before and after temperature scaling on held-out labelled cells, and their numbers.
        unknown_thresholds: the threshold of ``unknown_score`` (the held-out reference cells' ``unknown_quantile``)
            and its settings.
        pretrain_history: after :meth:`from_count_vae`, the CountVAE's training history (not saved).

    Raises:
        CellvaeInputError: a missing ``labels_key``, fewer than 2 known labels, and the errors of
            :class:`CountVAE`.
    """

    @with_signature(ModelSettings, keep=9)
    def __init__(self, adata: ad.AnnData, labels_key: str, unlabeled_category: str = "Unknown",
                 layer: str | None = None, batch_key: str | None = None,
                 categorical_covariate_keys: Sequence[str] | None = None,
                 continuous_covariate_keys: Sequence[str] | None = None, out_of_core: bool = False,
                 settings: ModelSettings | None = None, **model_settings):
        labels = _label_categories(adata, labels_key, unlabeled_category)
        self._pending_labels = (labels_key, labels, str(unlabeled_category))
        super().__init__(adata, layer=layer, batch_key=batch_key, labels_key=labels_key,
                         categorical_covariate_keys=categorical_covariate_keys,
                         continuous_covariate_keys=continuous_covariate_keys, out_of_core=out_of_core,
                         settings=settings, **model_settings)
        del self._pending_labels
        self._init_label_state()

    def _init_label_state(self) -> None:
        self._pretrained = False
        self.temperature = 1.0
        self.calibration: dict = {}
        self.unknown_thresholds: dict = {}
        self._reference_latent: np.ndarray | None = None
        self._reference_labels: np.ndarray | None = None
        self._heldout: dict[str, np.ndarray] = {}  # sorted held-out values of each signal, and the gene NLL stats

    @property
    def labels(self) -> list[str]:
        """The known labels in code order."""
        return list(self.spec.label_categories)

    def _build_module(self, lib_means=None, lib_vars=None) -> VAEModule:
        pending = getattr(self, "_pending_labels", None)
        if pending is not None and self.spec.label_categories is None:
            key, labels, unlabeled = pending
            self.spec = dataclasses.replace(self.spec, labels_key=key, label_categories=labels,
                                            unlabeled_category=unlabeled)
        counts = None
        if getattr(self, "adata", None) is not None:  # labelled cells per label, for the balanced cross-entropy
            codes = self.spec.label_codes(self.adata)
            counts = np.bincount(codes[codes < len(self.spec.label_categories)],
                                 minlength=len(self.spec.label_categories))
        return LabelTransferModule(
            n_input=len(self.spec.gene_names), n_labels=len(self.spec.label_categories), n_batch=self.spec.n_batch,
            n_cats_per_cov=self.spec.n_cats_per_cov, n_continuous_cov=len(self.spec.continuous_covariate_keys),
            library_log_means=lib_means, library_log_vars=lib_vars, settings=self.settings, label_counts=counts,
        )

    @property
    def _has_weights(self) -> bool:
        return self.is_trained or self._pretrained

    @classmethod
    def from_count_vae(cls, model: CountVAE, labels_key: str, unlabeled_category: str = "Unknown",
                       adata: ad.AnnData | None = None) -> "LabelTransferVAE":
        """A label-transfer model that starts from a trained :class:`CountVAE` (its encoder, decoder, dispersion
        and settings), as scvi-tools' ``SCANVI.from_scvi_model``; the classifier and the label prior networks are
        new. :meth:`train` then runs :data:`PRETRAINED_MAX_EPOCHS` epochs by default, with the KL weight at 1.

        Args:
            model: a trained CountVAE.
            labels_key, unlabeled_category: as the constructor.
            adata: the AnnData to train on (default: the model's; it must have the model's genes and covariates).

        Raises:
            CellvaeInputError: an untrained model or no AnnData, and the errors of the constructor.
        """
        if not model.is_trained:
            raise CellvaeInputError("from_count_vae needs a trained CountVAE: call .train() on it first.")
        adata = adata if adata is not None else model.adata
        if adata is None:
            raise CellvaeInputError("The CountVAE has no AnnData attached: pass adata=... .")
        spec = model.spec
        new = cls(adata[:, spec.gene_names] if list(adata.var_names) != spec.gene_names else adata,
                  labels_key=labels_key, unlabeled_category=unlabeled_category, layer=spec.layer,
                  batch_key=spec.batch_key, categorical_covariate_keys=spec.categorical_covariate_keys or None,
                  continuous_covariate_keys=spec.continuous_covariate_keys or None,
                  out_of_core=getattr(model, "out_of_core", False), settings=model.settings)
        if (new.spec.batch_categories != spec.batch_categories
                or new.spec.categorical_categories != spec.categorical_categories):
            raise CellvaeInputError("adata has other batch or covariate categories than the CountVAE was trained on; "
                                    "pass the model's own AnnData.")
        missing, unexpected = new.module.load_state_dict(model.module.state_dict(), strict=False)
        if unexpected or any(not k.startswith(("classifier.", "z2_encoder.", "z1_decoder.", "log_label_prior",
                                                "class_weight"))
                             for k in missing):
            raise CellvaeInputError(f"The CountVAE's weights do not fit the label-transfer model ({unexpected or missing}).")
        new._pretrained = True
        new.pretrain_history = model.history
        return new

    # ------------------------------------------------------------------------------------------ training
    @with_signature(TrainSettings, keep=2)
    def train(self, settings: TrainSettings | None = None, checkpoint_dir: str | os.PathLike | None = None,
              resume: bool = False, **train_settings) -> "LabelTransferVAE":
        """Train as :meth:`CountVAE.train`, then fit the temperature and the unknown thresholds on held-out cells.

        After :meth:`from_count_vae`, ``max_epochs`` defaults to ``min(10, max(2, round(default / 3)))`` and
        ``n_epochs_kl_warmup`` to 0 (as scvi-tools' SCANVI from a pretrained SCVI).

        Raises:
            CellvaeInputError: as :meth:`CountVAE.train`, and no held-out cell with a known label
                (``train_size`` = 1 or too few labelled cells): the calibration then needs
                :meth:`calibrate` with labelled cells.
        """
        s = build(TrainSettings, settings, train_settings, "training settings")
        if self._pretrained and not self.is_trained:
            extra = {}
            if "max_epochs" not in train_settings and (settings is None or settings.max_epochs is None):
                n = int(self.prepared_data().n_cells)
                extra["max_epochs"] = int(min(PRETRAINED_MAX_EPOCHS, max(2, round(default_max_epochs(n) / 3))))
            if "n_epochs_kl_warmup" not in train_settings and (settings is None or settings.n_epochs_kl_warmup is None):
                extra["n_epochs_kl_warmup"] = 0
            s = build(TrainSettings, s, extra)
        super().train(s, checkpoint_dir=checkpoint_dir, resume=resume)
        self.calibrate(seed=s.seed)
        return self

    @torch.no_grad()
    def _latent_and_logits(self, adata: ad.AnnData | None = None, indices=None,
                           batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(latent means (n, n_latent), classifier logits (n, n_labels)) of the cells."""
        data, idx = self.prepared_cells(adata, indices)
        self.module.eval()
        zs, ls = [], []
        for x, cat, cont in data.iterate(idx, batch_size):
            qz_m = self.module.inference(x, cat, cont)["qz_m"]
            zs.append(qz_m)
            ls.append(self.module.classify(qz_m))
        if not zs:
            return np.zeros((0, self.settings.n_latent), np.float32), np.zeros((0, len(self.labels)), np.float32)
        return torch.cat(zs).numpy(), torch.cat(ls).numpy()

    def calibrate(self, adata: ad.AnnData | None = None, indices=None, unknown_quantile: float = 0.99,
                  seed: int = 0) -> dict:
        """Fit the temperature and the unknown thresholds on held-out reference cells (run by :meth:`train`).

        The temperature is fitted (:func:`cellvae.metrics.calibration.fit_temperature`) on all the cells (default:
        the validation cells of the training AnnData) with a known label. For the report, they are split in two
        seeded halves, and the ECE after scaling is measured on each half with the temperature fitted on the other
        (cross-fitting, so no cell is scored with a temperature fitted on it); the ECE before is on all of them at
        temperature 1. All the held-out cells (at most 5,000, a seeded
        sample) give the per-gene NLL statistics of the gene surprise, the reference values of the three signals of
        the unknown score, and its threshold: the ``unknown_quantile`` of their own scores (module docstring).

        Returns:
            ``self.calibration``.

        Raises:
            CellvaeInputError: fewer than 4 held-out cells with known labels, ``unknown_quantile`` outside (0, 1).
        """
        if not 0.0 < float(unknown_quantile) < 1.0:
            raise CellvaeInputError(f"unknown_quantile must be in (0, 1), got {unknown_quantile}.")
        rng = np.random.default_rng(seed)
        if self.train_indices is None and self._reference_latent is None:
            raise CellvaeInputError("The training cells are unknown: train the model (or load it with its AnnData).")
        if self.train_indices is not None and (adata is None or adata is self.adata):
            tr = np.asarray(self.train_indices)
            if len(tr) > MAX_REFERENCE_CELLS:
                tr = np.sort(rng.choice(tr, MAX_REFERENCE_CELLS, replace=False))
            self._reference_latent, _ = self._latent_and_logits(None, tr)
            self._reference_labels = self.spec.label_codes(self.adata)[tr].astype(np.int16)
        if indices is None and adata is None:
            if self.validation_indices is None or len(self.validation_indices) == 0:
                raise CellvaeInputError("No held-out cells to calibrate on: train with train_size < 1, or pass "
                                        "adata=... (labelled reference cells not used in training).")
            indices = self.validation_indices
        data_adata = adata if adata is not None else self.adata
        z, logits = self._latent_and_logits(adata, indices)
        codes = self.spec.label_codes(data_adata)
        codes = codes[np.asarray(indices)] if indices is not None else codes
        known = np.flatnonzero(codes < len(self.labels))
        if len(known) < 4:
            raise CellvaeInputError(f"Only {len(known)} held-out cells have a known label; at least 4 are needed "
                                    "to fit the temperature (label more cells, or lower train_size).")
        perm = rng.permutation(known)
        halves = (perm[: len(perm) // 2], perm[len(perm) // 2:])
        t = fit_temperature(logits[known], codes[known])
        self.temperature = t
        crossed = np.zeros((len(known), logits.shape[1]))
        for i, part in enumerate(halves):  # each half scaled with the temperature fitted on the other half
            other = halves[1 - i]
            crossed[np.searchsorted(known, part)] = softmax(logits[part], fit_temperature(logits[other], codes[other]))
        self.calibration = {
            "temperature": t, "n_fit_cells": int(len(known)), "n_eval_cells": int(len(known)),
            "ece_before": expected_calibration_error(softmax(logits[known]), codes[known]),
            "ece_after": expected_calibration_error(crossed, codes[known]),
            "accuracy": float((logits[known].argmax(1) == codes[known]).mean()),
        }
        from ..analysis.anomaly import gene_nll_reference_stats

        keep = np.arange(len(z))
        if len(keep) > MAX_HELDOUT_CELLS:
            keep = np.sort(rng.choice(keep, MAX_HELDOUT_CELLS, replace=False))
        sub = data_adata[np.asarray(indices)[keep]] if indices is not None else data_adata[keep]
        mean, sd = gene_nll_reference_stats(self.module, self.prepared_data(sub))
        self._heldout = {"gene_nll_mean": mean.numpy(), "gene_nll_sd": sd.numpy()}
        signals = self._signals(z[keep], logits[keep], sub)
        self._heldout.update({k: np.sort(v).astype(np.float64) for k, v in signals.items()})
        score = self._combine(signals)
        self.unknown_thresholds = {"score": float(np.quantile(score, float(unknown_quantile))),
                                   "quantile": float(unknown_quantile), "n_neighbors": UNKNOWN_N_NEIGHBORS,
                                   "n_top_genes": UNKNOWN_N_TOP_GENES, "n_cells": int(len(keep))}
        return self.calibration

    def _signals(self, z: np.ndarray, logits: np.ndarray, adata: ad.AnnData | None) -> dict[str, np.ndarray]:
        """The three raw signals of the unknown score (module docstring) of cells with latent means ``z`` and
        logits ``logits`` (``adata``: the cells, for the gene surprise; None: the attached AnnData)."""
        from ..analysis.anomaly import gene_surprise

        stats = (torch.as_tensor(self._heldout["gene_nll_mean"]), torch.as_tensor(self._heldout["gene_nll_sd"]))
        return {"distance": self._knn_distance(z), "uncertainty": 1.0 - softmax(logits, self.temperature).max(1),
                "gene_surprise": np.asarray(gene_surprise(self.module, self.prepared_data(adata), stats,
                                                          UNKNOWN_N_TOP_GENES), dtype=np.float64)}

    def _combine(self, signals: dict[str, np.ndarray]) -> np.ndarray:
        """``unknown_score``: the sum over the signals of the normal quantile of each value's rank among the held-out
        values, plus 0.001 times its z-score against them (module docstring)."""
        from scipy.stats import norm

        total = 0.0
        for k, v in signals.items():
            ref = self._heldout[k]
            p = (np.searchsorted(ref, v, side="right") + 0.5) / (len(ref) + 1.0)
            total = total + norm.ppf(p) + 1e-3 * (v - ref.mean()) / max(float(ref.std()), 1e-12)
        return total

    def _knn_distance(self, z: np.ndarray) -> np.ndarray:
        from sklearn.neighbors import NearestNeighbors

        ref = self._reference_latent
        if ref is None or len(ref) == 0:
            raise CellvaeInputError("The model has no reference latent: train it (or map a query with it) first.")
        k = min(UNKNOWN_N_NEIGHBORS, len(ref))
        dist, _ = NearestNeighbors(n_neighbors=k).fit(ref).kneighbors(z)
        return dist.mean(1)

    # ---------------------------------------------------------------------------------------- prediction
    def predict(self, adata: ad.AnnData | None = None, soft: bool = False, overwrite_known: bool = False,
                batch_size: int = 1024):
        """Predicted labels, as scvi-tools' ``SCANVI.predict``, but never overwriting known labels unless asked.

        Args:
            adata: cells (default: the attached AnnData); genes are matched by name.
            soft: return the (tempered) probabilities of every label instead of the labels.
            overwrite_known: also predict cells whose ``labels_key`` value is a known label (default: they keep
                it). Has no effect with ``soft=True`` (probabilities are the classifier's for every cell).
            batch_size: cells per forward pass.

        Returns:
            ``soft=False``: (n_cells,) object array of labels; ``soft=True``: DataFrame (n_cells, n_labels) of
            probabilities (rows sum to 1) indexed by obs names, columns :attr:`labels`.

        Raises:
            CellvaeInputError: as :meth:`get_latent_representation`.
        """
        self.check_trained()
        adata_ = adata if adata is not None else self.adata
        _, logits = self._latent_and_logits(adata, None, batch_size)
        probs = softmax(logits, self.temperature)
        if soft:
            return pd.DataFrame(probs, index=adata_.obs_names, columns=self.labels)
        labels = np.asarray(self.labels, dtype=object)[probs.argmax(1)]
        if not overwrite_known:
            codes = self.spec.label_codes(adata_)
            known = codes < len(self.labels)
            labels[known] = np.asarray(self.labels, dtype=object)[codes[known]]
        return labels

    def predict_table(self, adata: ad.AnnData | None = None, overwrite_known: bool = False,
                      batch_size: int = 1024) -> pd.DataFrame:
        """Per cell: ``predicted_label``, ``label_confidence`` (tempered probability of the predicted label; 1 for
        a kept known label), ``unknown_score`` (module docstring; unitless, about N(0, 3) for cells like the
        reference), ``unknown`` (bool: above ``unknown_thresholds["score"]``) and ``label_known`` (the label was
        given, not predicted). Indexed by obs names.

        Raises:
            CellvaeInputError: a model without calibration (train it first), and the errors of :meth:`predict`.

        Warns:
            UserWarning: more than :data:`UNKNOWN_WARN_FRACTION` (25 %) of at least
                :data:`UNKNOWN_WARN_MIN_CELLS` predicted cells are flagged unknown, against about
                ``1 - unknown_quantile`` (1 %) of held-out reference cells: many cells of ``adata`` are unlike
                every reference label, or it differs technically from the reference (sequencing depth, technology;
                module docstring, *Limitation*).
        """
        self.check_trained()
        if not self.unknown_thresholds:
            raise CellvaeInputError("The model is not calibrated: train it (or call calibrate()) first.")
        adata_ = adata if adata is not None else self.adata
        z, logits = self._latent_and_logits(adata, None, batch_size)
        probs = softmax(logits, self.temperature)
        conf = probs.max(1)
        score = self._combine(self._signals(z, logits, adata))
        labels = np.asarray(self.labels, dtype=object)[probs.argmax(1)]
        known = np.zeros(len(labels), bool)
        if not overwrite_known:
            codes = self.spec.label_codes(adata_)
            known = codes < len(self.labels)
            labels[known] = np.asarray(self.labels, dtype=object)[codes[known]]
            conf = np.where(known, 1.0, conf)
        flag = (score > self.unknown_thresholds["score"]) & ~known
        n_pred = int((~known).sum())
        if n_pred >= UNKNOWN_WARN_MIN_CELLS and flag.sum() > UNKNOWN_WARN_FRACTION * n_pred:
            expected = 1.0 - float(self.unknown_thresholds.get("quantile", 0.99))
            warnings.warn(
                f"{flag.sum() / n_pred:.0%} of the {n_pred} predicted cells are flagged unknown, against about "
                f"{expected:.0%} of held-out reference cells. Either many of these cells are unlike every reference "
                "label, or they differ technically from the reference (sequencing depth, technology), which raises "
                "every cell's unknown_score. Compare the flagged fraction per predicted label (a new cell type "
                "concentrates in a few labels, a technical shift spreads over all of them), and if it is high "
                "everywhere, rank the cells by unknown_score instead of reading the flag.", UserWarning, stacklevel=2)
        return pd.DataFrame({"predicted_label": pd.Categorical(labels, categories=self.labels),
                             "label_confidence": conf, "unknown_score": score, "unknown": flag,
                             "label_known": known}, index=adata_.obs_names)

    def reference_latent(self) -> tuple[np.ndarray, np.ndarray]:
        """The stored reference latent means (n_ref, n_latent) float32 and their labels (n_ref,) object
        (``unlabeled_category`` for cells without one): a seeded sample of the reference's training cells."""
        if self._reference_latent is None:
            raise CellvaeInputError("The model has no reference latent: train it first.")
        names = np.asarray(self.labels + [str(self.spec.unlabeled_category)], dtype=object)
        return self._reference_latent, names[self._reference_labels.astype(np.int64)]

    # ------------------------------------------------------------------------------------ mapping / io
    def _copy_reference_state(self, reference: "CountVAE") -> None:
        self._init_label_state()
        self.temperature = reference.temperature
        self.calibration = dict(reference.calibration)
        self.unknown_thresholds = dict(reference.unknown_thresholds)
        self._reference_latent, self._reference_labels = reference._reference_latent, reference._reference_labels
        self._heldout = dict(reference._heldout)

    def map_query(self, query: ad.AnnData, batch_key: str | None = None, max_epochs: int | None = None,
                  max_missing_genes: float = 0.2, seed: int = 0, progress_bar: bool = True, **train_settings):
        """:meth:`CountVAE.map_query` for a label-transfer model: the classifier, temperature and unknown
        thresholds stay the reference's, and the query's cells are predicted with :meth:`predict_table`. Query
        cells whose ``labels_key`` value is a known label are learned from as labelled cells (and keep it);
        drop or rename that column to treat every query cell as unlabelled."""
        mapped = super().map_query(query, batch_key=batch_key, max_epochs=max_epochs,
                                   max_missing_genes=max_missing_genes, seed=seed, progress_bar=progress_bar,
                                   **train_settings)
        mapped._pretrained = False
        return mapped

    def _config(self) -> dict:
        cfg = super()._config()
        cfg["label_transfer"] = {"temperature": self.temperature, "calibration": self.calibration,
                                 "unknown_thresholds": self.unknown_thresholds}
        return cfg

    def _extra_files(self) -> dict[str, bytes]:
        files = super()._extra_files()
        if self._reference_latent is not None:
            buf = io.BytesIO()
            np.savez(buf, latent=self._reference_latent, labels=self._reference_labels,
                     **{f"heldout_{k}": v for k, v in self._heldout.items()})
            files[REFERENCE_FILE] = buf.getvalue()
        return files

    @classmethod
    def _from_config(cls, cfg: dict, state: dict, directory: Path, adata: ad.AnnData | None = None,
                     out_of_core: bool = False) -> "LabelTransferVAE":
        self = super()._from_config(cfg, state, directory, adata=adata, out_of_core=out_of_core)
        self._init_label_state()
        lt = cfg.get("label_transfer") or {}
        self.temperature = float(lt.get("temperature", 1.0))
        self.calibration = dict(lt.get("calibration") or {})
        self.unknown_thresholds = dict(lt.get("unknown_thresholds") or {})
        return self

    def _after_load(self, directory: Path, cfg: dict, adata: ad.AnnData | None = None,
                    out_of_core: bool = False) -> None:
        super()._after_load(directory, cfg, adata=adata, out_of_core=out_of_core)
        path = directory / REFERENCE_FILE
        if path.exists():
            data = path.read_bytes()
            want = (cfg.get("files") or {}).get(REFERENCE_FILE)
            if isinstance(want, str) and hashlib.sha256(data).hexdigest() != want:
                raise CellvaeInputError(f"{str(path)!r} is damaged (its SHA-256 differs from the one recorded in "
                                        "config.json); copy the model directory again.")
            with np.load(io.BytesIO(data)) as f:
                self._reference_latent, self._reference_labels = f["latent"], f["labels"]
                self._heldout = {k[len("heldout_"):]: f[k] for k in f.files if k.startswith("heldout_")}

    def __repr__(self) -> str:
        return super().__repr__().replace("CountVAE(", f"LabelTransferVAE({len(self.labels)} labels, ", 1)


def _label_categories(adata: ad.AnnData, labels_key: str, unlabeled_category: str) -> list[str]:
    """The known labels of ``obs[labels_key]`` (sorted; without ``unlabeled_category`` and missing values).

    Raises:
        CellvaeInputError: no such column, or fewer than 2 known labels.
    """
    if labels_key is None or labels_key not in adata.obs.columns:
        raise CellvaeInputError(f"labels_key {labels_key!r} is not an obs column; available: "
                                f"{list(adata.obs.columns)}.")
    col = adata.obs[labels_key]
    values = col[col.notna()].astype(str)
    present = set(pd.unique(values))
    order = ([str(c) for c in col.cat.categories] if isinstance(col.dtype, pd.CategoricalDtype)
             else sorted(present))
    labels = [c for c in order if c in present and c != str(unlabeled_category)]
    if len(labels) < 2:
        raise CellvaeInputError(
            f"obs[{labels_key!r}] has {len(labels)} known label(s) besides unlabeled_category="
            f"{unlabeled_category!r}: label transfer needs at least 2. Check labels_key and unlabeled_category.")
    return labels
