"""The scVI-style count VAE on an AnnData: :class:`CountVAE`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..data.backed import BackedData, is_backed, summarize_counts
from ..data.spec import DataSpec
from ..data.tensors import split_indices
from ..errors import CellvaeInputError, CellvaeTrainingError, warn
from ..settings import DataSettings, ModelSettings, TrainSettings, as_dict, build, default_max_epochs, with_signature
from ..train.evaluate import compute_elbo, compute_marginal_ll, compute_reconstruction_error
from ..train.loop import train_module
from ..vae.module import VAEModule
from .base import AnnDataModel

__all__ = ["CountVAE", "FORMAT_VERSION", "BIAS_INIT_MAX_CELLS", "decoder_bias_totals"]

FORMAT_VERSION = 1
BIAS_INIT_MAX_CELLS = 50_000  # the decoder bias comes from at most this many training cells (a seeded sample)
BIAS_INIT_BLOCKS = 11  # blocks of cells of the median of means (an odd number: one median value)


def _migrate_0_to_1(cfg: dict) -> dict:
    """Format 0 (before format versions were written): ``gene_names`` at the top level rather than in
    ``data_spec``; no ``data_spec.normal_transform`` (data were used as given: ``"none"``), no ``is_trained``
    (only trained models were saved), no ``model_class``."""
    cfg = dict(cfg)
    spec = dict(cfg.get("data_spec", {}))
    if "gene_names" in cfg:
        spec["gene_names"] = cfg.pop("gene_names")
    spec.setdefault("normal_transform", "none")
    cfg["data_spec"] = spec
    cfg.setdefault("is_trained", True)
    cfg.setdefault("model_class", "CountVAE")
    cfg["format_version"] = 1
    return cfg


class CountVAE(AnnDataModel):
    """scVI-style variational autoencoder for single-cell counts (Lopez et al. 2018, Nat. Methods 15:1053).

    Encoder q(z | x) on log1p counts; decoder ``rho = softmax(f(z, s))`` times the library size gives the mean of
    a ZINB / NB / Poisson likelihood per gene; or a Gaussian VAE on log1p-normalized data
    (``gene_likelihood="normal"``). See :mod:`cellvae.vae.module` for the model.

    Args:
        adata: AnnData (n_cells, n_genes) with raw counts in ``X`` or ``layers[layer]``. Not modified.
        layer: layer with raw counts (None: ``X``).
        batch_key: obs column of the batch (a categorical covariate of the decoder, and the library prior).
        labels_key: obs column of known cell types (kept for reports and metrics; not used in training).
        categorical_covariate_keys: further categorical obs columns injected into the decoder.
        continuous_covariate_keys: numeric obs columns injected into the decoder.
        out_of_core: train and analyse without reading the counts into memory: ``adata`` must be opened with
            ``anndata.read_h5ad(path, backed="r")`` (or :func:`cellvae.data.open_backed`). The checks below run
            as one streamed pass over the file, and minibatches are read from disk chunk by chunk
            (:class:`cellvae.data.BackedData`; see ``docs/backed.md``). False (default): a backed AnnData is
            read into memory once. Not saved with the model (pass it to :meth:`load` again).
        settings: a :class:`cellvae.settings.ModelSettings` (None: its defaults), updated by the keywords.
        **model_settings: any field of :class:`cellvae.settings.ModelSettings`, whose defaults are scvi-tools'
            (``gene_likelihood="zinb"``, ``dispersion="gene"``, ``n_hidden=128``, ``n_latent=10``, ``n_layers=1``,
            ``dropout_rate=0.1``, ``use_observed_lib_size=True``, ``beta=1.0``, ``adversarial_batch_weight=0``,
            ...). ``beta``: KL weight of z after the warm-up (beta-VAE, Higgins et al. 2017; 1.0 is the ELBO).
            ``adversarial_batch_weight``: weight of an adversarial batch classifier on the latent means (needs
            ``batch_key`` with >= 2 batches; :class:`cellvae.vae.module.VAEModule`,
            ``benchmarks/results/integration.md``).

    Cells with zero counts are left out of training, and genes with zero counts in every cell are left out of
    the model, each with a warning.

    Attributes:
        settings: the :class:`cellvae.settings.ModelSettings` (saved in ``config.json`` as ``module_kwargs``).
        spec: the :class:`cellvae.data.DataSpec` (genes, covariate categories).
        train_indices, validation_indices: sorted positions, in the attached AnnData, of the training and the
            held-out validation cells of the last :meth:`train` (None before training). :meth:`save` stores
            their obs names and :meth:`load` restores them when the AnnData it attaches holds all of those cells;
            evaluate held-out cells with e.g. ``model.get_marginal_ll(indices=model.validation_indices)``.

    Raises:
        CellvaeInputError: NaN/inf, negative or non-integer values for a count likelihood, a missing layer or
            obs key, missing values in covariates, nothing left after removing empty cells and genes, a setting
            out of range, an adversary without two batches.
    """

    FORMAT_VERSION = FORMAT_VERSION
    MIGRATIONS = {0: _migrate_0_to_1}  # from version k to k + 1; see docs/model_format.md
    #: Longest default KL warm-up in epochs when ``n_epochs_kl_warmup`` is None: half of ``max_epochs``, at most this
    #: (None: the cap of :attr:`cellvae.settings.TrainSettings.warmup_epochs`, 400).
    KL_WARMUP_CAP: int | None = None

    @with_signature(ModelSettings, keep=8)
    def __init__(
        self,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        out_of_core: bool = False,
        settings: ModelSettings | None = None,
        **model_settings,
    ):
        self.settings = build(ModelSettings, settings, model_settings, "CountVAE settings")
        keys = DataSettings(layer, batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys)
        _check_adata(adata, keys)
        if out_of_core:
            _check_backed(adata)
        counts = self.settings.gene_likelihood != "normal"  # the DataSpec's is_counts, before there is one
        summary = summarize_counts(adata, layer, counts, out_of_core)

        keep_genes = summary.gene_abs > 0
        if not keep_genes.any():
            raise CellvaeInputError("Every gene has zero counts in every cell: nothing to model.")
        if not keep_genes.all():
            warn(f"{int((~keep_genes).sum())} genes with zero counts in every cell are left out of the model.")
        # (the genes left out are all zero, so the cells' sums over the kept genes are the totals)
        self._train_cells = (summary.cell_abs if keep_genes.all() else summary.cell_sum) > 0
        if not self._train_cells.any():
            raise CellvaeInputError("Every cell has zero counts: nothing to train on.")
        if not self._train_cells.all():
            warn(f"{int((~self._train_cells).sum())} cells with zero counts are left out of training.")

        self.spec = DataSpec.from_adata(
            adata, gene_names=adata.var_names[keep_genes], layer=layer, gene_likelihood=self.settings.gene_likelihood,
            batch_key=batch_key, categorical_covariate_keys=keys.categorical_covariate_keys,
            continuous_covariate_keys=keys.continuous_covariate_keys,
            normal_transform="log1p_cp10k" if (not counts and summary.is_count) else "none",
        )
        self.labels_key = labels_key
        if self.settings.adversarial_batch_weight > 0 and self.spec.n_batch < 2:
            raise CellvaeInputError(
                "adversarial_batch_weight > 0 needs a batch covariate with at least 2 batches: pass "
                "batch_key=<obs column of the batch> (or leave adversarial_batch_weight at 0)."
            )
        self.adata = adata
        self._data = None
        self.out_of_core = bool(out_of_core)
        self._summary = summary if out_of_core else None  # the streamed checks and totals, reused by BackedData
        lib_means, lib_vars = None, None
        if not self.settings.use_observed_lib_size and counts:
            lib_means, lib_vars = self._library_prior()
        self.module = self._build_module(lib_means, lib_vars)
        self.history: dict = {}
        self.is_trained = False
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None
        self._saved_split: dict | None = None
        self.reference: dict | None = None

    # -------------------------------------------------------------------------------------------- set-up
    @property
    def beta(self) -> float:
        """KL weight of z after the warm-up (beta-VAE; 1.0 = the ELBO); configs saved without it load as 1.0."""
        return self.settings.beta

    @property
    def module_kwargs(self) -> dict:
        """The model settings as a dict (the ``module_kwargs`` of ``config.json``)."""
        return as_dict(self.settings)

    def _build_module(self, lib_means=None, lib_vars=None) -> VAEModule:
        return VAEModule(
            n_input=len(self.spec.gene_names),
            n_batch=self.spec.n_batch,
            n_cats_per_cov=self.spec.n_cats_per_cov,
            n_continuous_cov=len(self.spec.continuous_covariate_keys),
            library_log_means=lib_means,
            library_log_vars=lib_vars,
            settings=self.settings,
        )

    @property
    def _has_weights(self) -> bool:
        """Whether the module holds weights to continue from (a trained model); else :meth:`train` starts afresh."""
        return self.is_trained

    def _library_prior(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and variance of log library size over cells with counts (scVI's l prior)."""
        data = self.prepared_data()
        logl = np.log(np.maximum(data.row_sums(), 1.0))
        b = data.cat[:, 0].numpy()
        means = np.zeros(self.spec.n_batch, np.float32)
        vars_ = np.ones(self.spec.n_batch, np.float32)
        for i in range(self.spec.n_batch):
            sel = logl[(b == i) & self._train_cells]
            if len(sel):
                means[i] = sel.mean()
                vars_[i] = max(sel.var(), 1e-4)
        return means, vars_

    def _prepare(self, adata: ad.AnnData):
        """``spec.prepare(adata)``; out of core, for a backed AnnData (``anndata.read_h5ad(path, backed="r")``), a
        :class:`cellvae.data.BackedData` that reads minibatches from disk (the attached AnnData's streamed checks
        are reused)."""
        if getattr(self, "out_of_core", False) and is_backed(adata):
            scan = self._summary if adata is self.adata else None
            return BackedData(adata, self.spec, scan=scan)
        return self.spec.prepare(adata)

    # ---------------------------------------------------------------------------------------- training
    @with_signature(TrainSettings, keep=2)
    def train(self, settings: TrainSettings | None = None, checkpoint_dir: str | os.PathLike | None = None,
              resume: bool = False, **train_settings) -> "CountVAE":
        """Fit the model by maximising the ELBO with Adam (:func:`cellvae.train.train_module`).

        Args:
            settings: a :class:`cellvae.settings.TrainSettings` (None: its defaults), updated by the keywords.
            checkpoint_dir: directory for a training checkpoint (``checkpoint.pt``: weights, optimizer, epoch,
                KL warm-up step, RNG states, early-stopping state, history), written atomically every
                ``checkpoint_every`` epochs and at the end. None: no checkpoints.
            resume: continue the run whose checkpoint is in ``checkpoint_dir`` (from the start if there is none
                yet), with the same data and settings; it ends with the same weights as an uninterrupted run. A
                finished run is not trained further unless ``max_epochs`` is larger (and it did not stop early).
            **train_settings: any field of :class:`cellvae.settings.TrainSettings`, whose docstring gives each
                default and why: ``max_epochs`` (None: ``min(400, round(20000 / n_cells * 400))``),
                ``batch_size=128``, ``train_size=0.9`` (the rest is the seeded validation set for early stopping),
                ``early_stopping=True``, ``early_stopping_patience=45``, ``lr=1e-3``, ``lr_schedule="constant"``
                (``"cosine"``; ``"plateau"`` with ``lr_factor=0.6``, ``lr_patience=30``), ``n_epochs_kl_warmup``
                (None: half of ``max_epochs``, at most 400, or at most the class's :attr:`KL_WARMUP_CAP`),
                ``decoder_bias_init="frequency"``, ``dispersion_init="random"``, ``dispersion_lr_multiplier=30``
                falling to 1 over ``dispersion_lr_decay=1000`` steps,
                ``seed=0``, ``progress_bar``, ``n_threads``, ``checkpoint_every=10``, ``max_bad_steps=20``,
                ``accelerator="auto"``. Under ``torchrun`` training is data-parallel over the processes
                (:mod:`cellvae.train.distributed`).

        The first call initialises the weights from ``seed``; a later call continues from the current weights
        (with a fresh optimizer and warm-up) and replaces ``self.history``.

        Returns:
            self, trained; ``self.history`` holds the per-epoch losses and ``history["plan"]`` the settings.

        Raises:
            CellvaeInputError: fewer than 3 cells with counts, fewer training cells than one minibatch, a setting
                out of range (:class:`cellvae.settings.TrainSettings`), a number for ``dispersion_init`` where the
                likelihood has no per-gene theta, or a checkpoint that cannot be resumed (unreadable, another
                model/data/split, or present while ``resume`` is False).
            CellvaeTrainingError: ``max_bad_steps`` consecutive non-finite steps. The model then keeps the best
                weights so far (``self.history`` up to the failure); with ``checkpoint_dir`` they are also in the
                checkpoint.

        Warns:
            UserWarning: ``resume`` with settings other than the checkpoint's (e.g. ``max_epochs``), including a
                setting that a checkpoint of an older cellvae did not record and whose current default trains
                differently (``dispersion_lr_decay``: such a checkpoint was trained with ``"none"``). The run
                continues under the current settings; ``docs/inputs.md`` R9 and R9b.
        """
        s = build(TrainSettings, settings, train_settings, "training settings")
        if self._train_cells is None:  # a loaded model: train on the attached cells that have counts
            self._train_cells = self.prepared_data().row_sums(absolute=True) > 0
        cells = np.flatnonzero(self._train_cells)
        if len(cells) < 3:
            raise CellvaeInputError(f"Only {len(cells)} cells with counts: at least 3 are needed to train.")
        likelihood = self.module.likelihood
        if s.dispersion_init != "random" and not likelihood.has_gene_theta(self.settings.dispersion):
            raise CellvaeInputError(
                f"dispersion_init={s.dispersion_init!r} needs the 'nb' or 'zinb' likelihood with 'gene' or "
                f"'gene-batch' dispersion (this model: {likelihood.name!r}, {self.settings.dispersion!r}); use "
                "'random'.")
        tr, va = split_indices(len(cells), s.train_size, s.seed)
        tr, va = cells[tr], cells[va]
        if len(tr) < s.batch_size:
            raise CellvaeInputError(
                f"Only {len(tr)} training cells, fewer than one minibatch of batch_size={s.batch_size}: pass a smaller "
                f"batch_size (e.g. {max(2, len(tr) // 4)}, --batch-size on the CLI), a larger train_size, or more "
                "cells.")
        if s.max_epochs is None:
            s = build(TrainSettings, s, {"max_epochs": default_max_epochs(len(cells))})
        if s.n_epochs_kl_warmup is None and self.KL_WARMUP_CAP is not None:
            s = build(TrainSettings, s, {"n_epochs_kl_warmup": min(self.KL_WARMUP_CAP, s.warmup_epochs)})
        first_fit = not self._has_weights
        if first_fit:  # initialise the weights from the seed, for reproducibility
            torch.manual_seed(s.seed)
            self.module = self._build_module(getattr(self.module, "library_log_means", None),
                                             getattr(self.module, "library_log_vars", None))
        data = self.prepared_data()
        if first_fit and s.decoder_bias_init == "frequency":  # (a resumed checkpoint then replaces every weight)
            self.module.init_decoder_bias(decoder_bias_totals(data, tr, s.seed))
        if first_fit and s.dispersion_init != "random":
            self.module.init_dispersion(float(s.dispersion_init))
        meta = {"model_class": type(self).__name__, "data_spec": self.spec.to_dict(),
                "module_kwargs": self.module_kwargs}
        if isinstance(data, BackedData):  # another minibatch order: resume out of core only (no key in memory)
            meta["out_of_core"] = True
        if checkpoint_dir is not None:  # resuming on other counts (same cells and genes) is refused
            meta["data_fingerprint"] = data.fingerprint()
        self.train_indices, self.validation_indices = tr, va
        try:
            self.history = train_module(self.module, data, tr, va, s, checkpoint_dir=checkpoint_dir, resume=resume,
                                        meta=meta)
        except CellvaeTrainingError as e:
            self.history = e.history
            self.is_trained = True
            raise
        self.is_trained = True
        return self

    # --------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def get_latent_representation(
        self, adata: ad.AnnData | None = None, give_mean: bool = True, batch_size: int = 1024
    ) -> np.ndarray:
        """Latent representation of each cell.

        Args:
            adata: cells to embed (default: the training AnnData); genes are matched to the model by name.
            give_mean: the mean of q(z | x) (default) or one sample from it.
            batch_size: cells per forward pass.

        Returns:
            float32 array (n_cells, n_latent).

        Raises:
            CellvaeInputError: genes missing from ``adata``, unknown covariate categories, bad values.
        """
        self.check_trained()
        data = self.prepared_data(adata)
        self.module.eval()
        out = []
        for x, cat, cont in data.iterate(torch.arange(data.n_cells), batch_size):
            inf = self.module.inference(x, cat, cont)
            out.append(inf["qz_m"] if give_mean else inf["z"])
        return torch.cat(out).numpy()

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        library_size: float | str = 1.0,
        n_samples: int = 1,
        transform_batch: str | None = None,
        gene_list: Sequence[str] | None = None,
        batch_size: int = 1024,
        return_numpy: bool = False,
    ):
        """Normalized (denoised) expression: the decoder's ``rho`` (rows sum to 1) times ``library_size``.

        Args:
            adata: cells (default: the training AnnData).
            library_size: a number (1.0 gives proportions, 1e4 counts per 10k) or ``"latent"`` for the model's
                mean counts ``l_n * rho_ng`` at each cell's own (observed or inferred) library size.
            n_samples: z samples from q(z | x) averaged (1: the posterior mean of z is decoded).
            transform_batch: decode every cell as if from this batch category (counterfactual expression).
            gene_list: return only these genes.
            batch_size: cells per forward pass.
            return_numpy: return a numpy array instead of a DataFrame.

        Returns:
            DataFrame (n_cells, n_genes) indexed by cell and gene names, or float32 array. For
            ``gene_likelihood="normal"``, the decoded mean in log1p units, and ``library_size`` is ignored.

        Raises:
            CellvaeInputError: unknown ``transform_batch`` or genes, or the causes of
                :meth:`get_latent_representation`.
        """
        self.check_trained()
        adata_ = adata if adata is not None else self.adata
        data = self.prepared_data(adata)
        if transform_batch is not None:
            if str(transform_batch) not in self.spec.batch_categories:
                raise CellvaeInputError(
                    f"transform_batch {transform_batch!r} is not a batch of the model: {self.spec.batch_categories}."
                )
            b = self.spec.batch_categories.index(str(transform_batch))
        if isinstance(library_size, str) and library_size != "latent":
            raise CellvaeInputError(f"library_size must be a number or 'latent', got {library_size!r}.")
        genes = pd.Index(self.spec.gene_names)
        gidx = None
        if gene_list is not None:
            gidx = genes.get_indexer(list(gene_list))
            if (gidx < 0).any():
                raise CellvaeInputError(f"Genes not in the model: {list(np.asarray(gene_list)[gidx < 0][:5])}.")
            genes = genes[gidx]
        self.module.eval()
        out = []
        for x, cat, cont in data.iterate(torch.arange(data.n_cells), batch_size):
            inf = self.module.inference(x, cat, cont, n_samples=n_samples)
            z = inf["qz_m"] if n_samples == 1 else inf["z"]
            lib = inf["ql_m"] if (n_samples == 1 and "ql_m" in inf) else inf["library"]
            gcat = cat
            if transform_batch is not None:
                gcat = cat.clone()
                gcat[:, 0] = b
            gen = self.module.generative(z, lib, gcat, cont)
            if not self.module.likelihood.models_counts:
                val = gen["rho"]
            elif library_size == "latent":
                val = gen["px"].mu
            else:
                val = gen["rho"] * float(library_size)
            if n_samples > 1:
                val = val.mean(0)
            if gidx is not None:
                val = val[:, torch.as_tensor(gidx)]
            out.append(val)
        arr = torch.cat(out).numpy()
        if return_numpy:
            return arr
        return pd.DataFrame(arr, index=adata_.obs_names, columns=genes)

    def get_elbo(self, adata: ad.AnnData | None = None, indices: np.ndarray | None = None,
                 return_mean: bool = True, batch_size: int = 1024, seed: int | None = None):
        """ELBO per cell (nats, higher is better), one z sample per cell, as scvi-tools' ``get_elbo``.

        Args:
            adata: cells (default: the training AnnData); genes are matched to the model by name.
            indices: positions (or a boolean mask) of the cells to evaluate in ``adata``; None: all cells.
                ``model.validation_indices`` gives the held-out cells of the training AnnData.
            return_mean: the mean over cells (float, default) instead of the (n_cells,) float32 array.
            batch_size: cells per forward pass.
            seed: seed for the z samples (None: torch's global generator).

        Returns:
            float, or (n_cells,) array, of ``E_q[log p(x | z, l)] - KL`` (see
            :func:`cellvae.metrics.compute_elbo` for the parts).

        Raises:
            CellvaeInputError: bad ``indices``, or the causes of :meth:`get_latent_representation`.
        """
        self.check_trained()
        data, idx = self.prepared_cells(adata, indices)
        return compute_elbo(self.module, data, idx, batch_size, return_mean=return_mean, seed=seed)["elbo"]

    def get_marginal_ll(self, adata: ad.AnnData | None = None, indices: np.ndarray | None = None,
                        n_samples: int = 1000, batch_size: int = 128, return_mean: bool = True,
                        seed: int | None = None):
        """Marginal log-likelihood ``log p(x)`` per cell (nats, higher is better), estimated by importance sampling
        with ``n_samples`` draws from q (IWAE, Burda et al. 2016), as scvi-tools' ``get_marginal_ll``.

        Tighter than the ELBO (its expectation is at least the ELBO and grows with ``n_samples``). Computed in
        chunks of samples, so the default 1000 samples need little memory; the time grows linearly with
        ``n_samples``. See :func:`cellvae.metrics.compute_marginal_ll`.

        Args:
            adata, indices: as in :meth:`get_elbo`.
            n_samples: importance samples per cell (K).
            batch_size: cells per pass.
            return_mean: the mean over cells (float, default, as scvi-tools) instead of the (n_cells,) float32 array.
            seed: seed for the samples (None: torch's global generator).

        Raises:
            CellvaeInputError: ``n_samples < 1``, bad ``indices``, or the causes of
                :meth:`get_latent_representation`.
        """
        self.check_trained()
        data, idx = self.prepared_cells(adata, indices)
        return compute_marginal_ll(self.module, data, idx, n_samples=n_samples, batch_size=batch_size,
                                   return_mean=return_mean, seed=seed)

    def get_reconstruction_error(self, adata: ad.AnnData | None = None, indices: np.ndarray | None = None,
                                 batch_size: int = 1024, return_mean: bool = True,
                                 seed: int | None = None) -> dict:
        """Reconstruction error ``-log p(x | z, l)`` (nats per cell, lower is better) with one ``z ~ q(z | x)``
        per cell, as scvi-tools' ``get_reconstruction_error``.

        Args:
            adata, indices, batch_size, seed: as in :meth:`get_elbo`.
            return_mean: the mean over cells (float, default) instead of the (n_cells,) array.

        Returns:
            ``{"reconstruction_loss": value}``.

        Raises:
            CellvaeInputError: bad ``indices``, or the causes of :meth:`get_latent_representation`.
        """
        self.check_trained()
        data, idx = self.prepared_cells(adata, indices)
        return compute_reconstruction_error(self.module, data, idx, batch_size, return_mean=return_mean, seed=seed)

    # ----------------------------------------------------------------------------------- save / load
    def _config(self) -> dict:
        cfg = {"data_spec": self.spec.to_dict(), "labels_key": self.labels_key, "module_kwargs": self.module_kwargs}
        if getattr(self, "reference", None) is not None:
            cfg["reference"] = self.reference
        return cfg

    @classmethod
    def _from_config(cls, cfg: dict, state: dict, directory: Path, adata: ad.AnnData | None = None,
                     out_of_core: bool = False) -> "CountVAE":
        self = cls.__new__(cls)
        self.spec = DataSpec.from_dict(cfg["data_spec"])
        self.labels_key = cfg.get("labels_key")
        kwargs = cfg["module_kwargs"]
        if not isinstance(kwargs, dict):
            raise TypeError(f"module_kwargs is a {type(kwargs).__name__}, not an object")
        self.settings = build(ModelSettings, None, kwargs, "module_kwargs")
        self.reference = cfg.get("reference")
        self.module = self._build_module(state.get("library_log_means"), state.get("library_log_vars"))
        return self

    def _after_load(self, directory: Path, cfg: dict, adata: ad.AnnData | None = None,
                    out_of_core: bool = False) -> None:
        self.out_of_core = bool(out_of_core)
        self._summary = None
        self._train_cells = None
        if adata is not None and out_of_core:
            _check_backed(adata)
        self._attach(directory, cfg, adata)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: ad.AnnData | None = None,
             out_of_core: bool = False) -> "CountVAE":
        """Load a model saved by :meth:`save` (format 0 and 1 directories; ``docs/model_format.md``).

        Args:
            dir_path: the model directory.
            adata: data to attach (genes are matched to the model by name); None attaches none, and the
                ``get_*`` methods then need ``adata``. When it holds every training and validation cell of the
                saved model (by obs name, from ``split.json``), ``train_indices`` and ``validation_indices`` are
                set to their positions in it; otherwise they are None.
            out_of_core: read backed AnnData (``adata`` and those passed to methods) from disk chunk by chunk
                instead of into memory, as ``CountVAE(..., out_of_core=True)``; ``adata``, if given, must be backed.

        Raises:
            CellvaeInputError: missing files, a newer format version, a damaged file (checksum), weights that do not
                match the config, or ``adata`` without the model's genes.
        """
        return super().load(dir_path, adata=adata, out_of_core=out_of_core)

    @classmethod
    def from_scvi(cls, path: str | os.PathLike, adata: ad.AnnData | None = None,
                  prefix: str | None = None) -> "CountVAE":
        """A trained model with the weights of an scvi-tools ``SCVI`` saved by ``model.save(path)`` (scvi-tools
        1.x), read without scvi-tools: ``model.pt`` is loaded with ``torch.load(weights_only=True)`` (nothing in it
        is executed) and its weights are mapped onto cellvae's module, which has the same architecture (scVI, Lopez
        et al. 2018). The latent representation, normalized expression, ELBO and every analysis then match what
        scvi-tools computes for that model (``tests/test_from_scvi.py``). See :mod:`cellvae.models.scvi_import`.

        Args:
            path: the directory scvi-tools wrote (or its ``model.pt``).
            adata: data to attach (genes matched by name; counts in the layer the scvi-tools model was set up
                with, the same batch and covariate columns). None: pass ``adata`` to each method.
            prefix: the ``prefix`` given to scvi-tools' ``save`` (the file is ``{prefix}model.pt``).

        Returns:
            A trained :class:`CountVAE` (``history["imported_from"]`` names the source); save it with :meth:`save`.

        Raises:
            CellvaeInputError: a missing or unreadable file; a model other than SCVI, or a setting cellvae does not
                reproduce (named: ``gene_likelihood="normal"``, ``dispersion="gene-label"``, ``latent_distribution=
                "ln"``, batch embeddings, a size-factor key, a custom variance activation, MuData, ...); weights that
                do not match; ``adata`` without the model's genes.
        """
        from .scvi_import import count_vae_from_scvi

        return count_vae_from_scvi(cls, path, adata, prefix)

    # ---------------------------------------------------------------------------- reference mapping
    def map_query(self, query: ad.AnnData, batch_key: str | None = None, max_epochs: int | None = None,
                  max_missing_genes: float = 0.2, seed: int = 0, progress_bar: bool = True, **train_settings):
        """Place a query dataset in this (reference) model's latent space by architecture surgery (scArches;
        Lotfollahi et al. 2022, Nat. Biotechnol. 40:121), without changing what the reference learned; the
        counterpart of scvi-tools' ``load_query_data`` followed by ``train``. See :mod:`cellvae.models.query`.

        Args:
            query: AnnData (n_query_cells, genes) of raw counts; genes are matched to the reference's by name
                (missing ones zero-filled with a warning). Not modified.
            batch_key: obs column of the query's batches (None: the reference's batch key if the query has it,
                else the query is one new batch). New batch categories, and new categories of every other
                categorical covariate, get new embedding rows.
            max_epochs: epochs of query training (None: ``min(30, default)``).
            max_missing_genes: largest fraction of the reference's genes the query may lack (0.2).
            seed, progress_bar, **train_settings: as :meth:`train`, except that ``lr`` defaults to 1e-2
                (:data:`cellvae.models.query.QUERY_LR`) and weight decay is 0.

        Returns:
            A new model of this class attached to the query (its genes in the reference's order), trained;
            ``model.reference`` records the reference's categories. Save and load it like any model.

        Raises:
            CellvaeInputError: an untrained reference, more than ``max_missing_genes`` missing, covariate
                columns missing from the query, missing values in them.
        """
        from .query import map_query

        return map_query(self, query, batch_key=batch_key, max_epochs=max_epochs,
                         max_missing_genes=max_missing_genes, seed=seed, progress_bar=progress_bar, **train_settings)

    def query_copy(self, spec: DataSpec, adata: ad.AnnData) -> "CountVAE":
        """A new, untrained model of this class and settings for ``spec`` (the reference's, with the query's new
        categories), attached to ``adata`` (the query, aligned to the reference's genes); its module has fresh
        weights (:func:`cellvae.vae.surgery.extend_module` then copies the reference's)."""
        new = type(self).__new__(type(self))
        new.settings, new.spec, new.labels_key = self.settings, spec, self.labels_key
        new.adata, new._data, new.out_of_core, new._summary = adata, None, False, None
        new.history, new.is_trained, new._saved_split, new.reference = {}, False, None, None
        new.train_indices = new.validation_indices = None
        new._train_cells = None
        new._copy_reference_state(self)
        lib_means = lib_vars = None
        if not self.settings.use_observed_lib_size and self.module.likelihood.models_counts:
            new._train_cells = new.prepared_data().row_sums(absolute=True) > 0
            lib_means, lib_vars = new._library_prior()
        new.module = new._build_module(lib_means, lib_vars)
        return new

    def _copy_reference_state(self, reference: "CountVAE") -> None:
        """What a query model keeps of its reference besides the weights (subclasses add to it)."""

    # ------------------------------------------------------------------------------------- analyses
    def differential_expression(self, adata: ad.AnnData | None = None, groupby: str | None = None,
                                group1=None, group2: str | None = None, mode: str = "vanilla",
                                delta: float = 0.25, fdr_target: float = 0.05, n_samples: int = 5000,
                                **kwargs) -> pd.DataFrame:
        """Bayes-factor differential expression (Lopez et al. 2018; Boyeau et al. 2019), as scvi-tools'.

        One-vs-rest when ``group2`` is None; every group of ``groupby`` against the rest when ``group1`` is None.
        Returns a DataFrame indexed by gene name with ``proba_de``, ``proba_not_de``, ``bayes_factor`` (natural
        log), ``scale1``/``scale2`` (mean normalized expression), ``lfc_mean``/``lfc_median``/``lfc_std``
        (log2 fold change), ``is_de_fdr_<fdr_target>`` and raw-count summaries, sorted by ``bayes_factor``.
        Memory is bounded: posterior draws are decoded and reduced in chunks. See
        :func:`cellvae.de.differential_expression` for every argument (``idx1``/``idx2``, ``batch_correction``,
        ``pseudocount``, ``seed``, ...).

        Raises:
            CellvaeInputError: unknown ``groupby`` or group, an empty group, a ``"normal"`` likelihood model.
        """
        from ..analysis.de import differential_expression

        return differential_expression(self, adata, groupby=groupby, group1=group1, group2=group2, mode=mode,
                                       delta=delta, fdr_target=fdr_target, n_samples=n_samples, **kwargs)

    def get_anomaly_score(self, adata: ad.AnnData | None = None, method: str = "latent_knn",
                          **kwargs) -> np.ndarray:
        """Anomaly score per cell, (n_cells,) float, higher = less like the training (reference) cells.

        ``method="latent_knn"`` (default): mean latent distance to the nearest reference cells;
        ``"gene_surprise"``: mean of the largest per-gene likelihood z-scores (genes the model explains worst,
        against the reference cells); ``"latent_knn_gene"``: both, z-scored and summed; ``"elbo"`` or
        ``"marginal_ll"``: negative ELBO / IWAE log-likelihood (nats per cell) with the log-library-size trend
        of the reference cells removed. See :func:`cellvae.anomaly.anomaly_score`.

        Raises:
            CellvaeInputError: an unknown ``method`` or ``normalize_library``, no reference cells (no AnnData
                attached and no ``reference``), data without the model's genes.
        """
        from ..analysis.anomaly import anomaly_score

        return anomaly_score(self, adata, method=method, **kwargs)

    def annotate_anomalies(self, adata: ad.AnnData | None = None, quantile: float = 0.99,
                           threshold: float | None = None, copy: bool = False, **kwargs):
        """Write ``obs['cellvae_anomaly']`` (score) and ``obs['cellvae_is_anomaly']`` (score above a threshold
        calibrated as the ``quantile`` of held-out reference cells' scores, unless ``threshold`` is given), in
        place unless ``copy``; returns the annotated copy (n_cells obs) with ``copy=True``, else None. See
        :func:`cellvae.anomaly.annotate_anomalies`.

        Raises:
            CellvaeInputError: ``quantile`` outside (0, 1), no held-out reference cells to calibrate on (pass
                ``calibration_adata`` or ``threshold``), and the errors of :meth:`get_anomaly_score`.
        """
        from ..analysis.anomaly import annotate_anomalies

        return annotate_anomalies(self, adata, threshold=threshold, quantile=quantile, copy=copy, **kwargs)

    def predict_perturbation(self, adata_ctrl: ad.AnnData, condition_key: str, control: str, perturbed: str,
                             cell_type_key: str | None = None, cell_type: str | None = None,
                             method: str = "latent_arithmetic", **kwargs) -> ad.AnnData:
        """Predict how control cells would look under ``perturbed`` (scGen-style latent arithmetic, Lotfollahi et
        al. 2019, or the conditional decoder swap). Returns an AnnData (n_cells, n_genes) with ``X`` = expected
        counts at each cell's library size and ``layers['counts']`` sampled from the likelihood; with
        ``n_samples=K > 1`` (keyword) also K posterior draws of each gene's population response
        (``varm['cellvae_perturbed_samples']``, ``varm['cellvae_control_samples']``, ``var['cellvae_lfc_*']``), and
        with ``return_samples=True`` every cell's draws (``obsm['cellvae_samples']``, (n_cells, K, n_genes)). See
        :func:`cellvae.perturb.predict_perturbation`.

        Raises:
            CellvaeInputError: unknown keys or categories, no control cells, or a decoder swap on a model without
                the condition as a covariate.
        """
        from ..analysis.perturb import predict_perturbation

        return predict_perturbation(self, adata_ctrl, condition_key, control, perturbed, cell_type_key=cell_type_key,
                                    cell_type=cell_type, method=method, **kwargs)

    # ----------------------------------------------------------------------- generation and latent space
    def sample(self, n_cells: int, covariates: dict | None = None, library_size: float | None = None,
               seed: int = 0, labels=None, labels_key: str | None = None, label_sampling: str = "posterior",
               **kwargs) -> ad.AnnData:
        """Generate ``n_cells`` new cells: z from the prior N(0, I), or with ``labels`` from the aggregated
        posterior of that label's training cells (``label_sampling="posterior"``: resample the cells and draw
        ``z ~ q(z|x)``; ``"gaussian"``: a Gaussian moment-matched to it); library sizes resampled from the
        training cells' observed ones unless ``library_size`` is given; covariates ``{obs_key: category}``
        (default: the most frequent training category). Returns an AnnData (n_cells, n_genes) with sampled
        integer counts in ``X`` and ``layers["counts"]``, the decoded mean ``l * rho`` in ``layers["mean"]``,
        ``rho`` in ``layers["normalized"]``. See :func:`cellvae.generate.sample`.

        Raises:
            CellvaeInputError: unknown covariate keys or categories, an unknown label, bad arguments.
        """
        from ..analysis.generate import sample

        return sample(self, n_cells, covariates=covariates, library_size=library_size, seed=seed, labels=labels,
                      labels_key=labels_key, label_sampling=label_sampling, **kwargs)

    def posterior_predictive_sample(self, adata: ad.AnnData | None = None, indices=None, n_samples: int = 1,
                                    seed: int = 0, batch_size: int = 1024) -> np.ndarray:
        """Counts drawn from the fitted likelihood ``p(x | z, l)`` with ``z ~ q(z | x)``: float32 integer-valued
        array (n_cells, n_genes), or (n_samples, n_cells, n_genes) when ``n_samples > 1``. See
        :func:`cellvae.generate.posterior_predictive_sample`.

        Raises:
            CellvaeInputError: ``n_samples < 1``, bad ``indices``, data without the model's genes.
        """
        from ..analysis.generate import posterior_predictive_sample

        return posterior_predictive_sample(self, adata, indices=indices, n_samples=n_samples, seed=seed,
                                           batch_size=batch_size)

    def interpolate(self, cells_a, cells_b, n_steps: int = 10, adata: ad.AnnData | None = None,
                    covariates: dict | None = None, library_size: float = 1e4) -> ad.AnnData:
        """Decode ``n_steps`` points on the straight latent path from ``cells_a`` to ``cells_b`` (a cell position or
        obs name, or a list/mask of cells: their mean posterior mean). Returns an AnnData (n_steps, n_genes) of
        normalized expression (``rho * library_size``, counts per 10k by default) with ``obs["t"]`` in [0, 1].
        See :func:`cellvae.latent.interpolate`.

        Raises:
            CellvaeInputError: cells not found (bad position, obs name or mask), no cells selected, ``n_steps < 2``,
                no AnnData attached and none given, unknown covariate categories.
        """
        from ..analysis.latent import interpolate

        return interpolate(self, cells_a, cells_b, n_steps=n_steps, adata=adata, covariates=covariates,
                           library_size=library_size)

    def latent_arithmetic(self, adata: ad.AnnData | None = None, base=None, plus=None, minus=None,
                          library_size: float = 1e4) -> ad.AnnData:
        """Decode ``z_c + (mean z[plus] - mean z[minus])`` for every base cell c (scGen-style latent arithmetic);
        AnnData (n_base, n_genes) of normalized expression. See :func:`cellvae.latent.latent_arithmetic`.

        Raises:
            CellvaeInputError: a missing ``base``/``plus``/``minus`` selection, cells not found, no AnnData.
        """
        from ..analysis.latent import latent_arithmetic

        return latent_arithmetic(self, adata, base=base, plus=plus, minus=minus, library_size=library_size)

    def latent_traversal(self, dims=None, n_steps: int = 13, limit: float = 3.0, covariates: dict | None = None,
                         library_size: float = 1e4) -> ad.AnnData:
        """Decode along each latent dimension from ``-limit`` to ``limit``, the others at 0: AnnData
        (n_dims * n_steps, n_genes) with ``obs["dim"]``, ``obs["value"]``. Plot it with
        :func:`cellvae.latent.plot_latent_traversal`. See :func:`cellvae.latent.latent_traversal`.

        Raises:
            CellvaeInputError: ``dims`` out of range for ``n_latent``, unknown covariate categories.
        """
        from ..analysis.latent import latent_traversal

        return latent_traversal(self, dims=dims, n_steps=n_steps, limit=limit, covariates=covariates,
                                library_size=library_size)

    def get_loadings(self) -> pd.DataFrame:
        """Gene loadings of a linearly decoded model (LDVAE, ``decoder="linear"``; Svensson et al. 2020), as
        scvi-tools' ``LinearSCVI.get_loadings``.

        Returns:
            DataFrame (n_genes, n_latent) indexed by gene name, columns ``Z_0 ... Z_{n_latent-1}``: the change of
            each gene's log normalized expression (nats, before the softmax's shift common to all genes) per unit
            of each latent dimension. :func:`cellvae.analysis.loadings.top_loadings` lists the strongest genes.

        Raises:
            CellvaeInputError: the model's decoder is not linear.
        """
        from ..analysis.loadings import get_loadings

        return get_loadings(self)

    def __repr__(self) -> str:
        k = self.settings
        return (
            f"{type(self).__name__}({len(self.spec.gene_names)} genes, n_latent={k.n_latent}, n_hidden={k.n_hidden}, "
            f"n_layers={k.n_layers}, gene_likelihood={k.gene_likelihood!r}, dispersion={k.dispersion!r}, "
            f"n_batch={self.spec.n_batch}{f', beta={self.beta:g}' if self.beta != 1.0 else ''}"
            f"{', decoder=' + repr(k.decoder) if k.decoder != 'nonlinear' else ''}, "
            f"trained={self.is_trained})"
        )


def decoder_bias_totals(data, rows: np.ndarray, seed: int, n_blocks: int = BIAS_INIT_BLOCKS) -> np.ndarray:
    """(n_genes,) float64 robust mean expression profile of the training cells ``rows`` of ``data`` (a
    :class:`cellvae.data.CellData`, in memory or on disk), the starting point of the decoder bias
    (:meth:`cellvae.vae.module.VAEModule.init_decoder_bias` takes its log).

    Each cell's counts are divided by its library size (a profile summing to 1), the cells are dealt into
    ``n_blocks`` seeded blocks, and each gene gets the median over the blocks of the mean profile in the block
    (median of means; at most ``BIAS_INIT_MAX_CELLS`` cells, a seeded sample). One cell with an extreme count then
    moves one block's mean only, and cannot set the starting expression of its gene for every other cell, as the
    plain sum of counts let it (issue 23; ``tests/test_reliability.py``). With fewer than 3 blocks' worth of cells
    (20 each) the plain mean of the profiles is used.
    """
    rows = np.asarray(rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if len(rows) > BIAS_INIT_MAX_CELLS:
        rows = rng.choice(rows, BIAS_INIT_MAX_CELLS, replace=False)
    weights = 1.0 / np.maximum(data.row_sums()[rows], 1.0)
    k = min(int(n_blocks), len(rows) // 20)
    if k < 3:
        return data.col_sums(rows, weights=weights) / max(len(rows), 1)
    block = rng.permutation(len(rows)) % k
    means = [data.col_sums(rows[block == b], weights=weights[block == b]) / (block == b).sum() for b in range(k)]
    return np.median(np.stack(means), axis=0)


def _check_adata(adata: ad.AnnData, keys: DataSettings) -> None:
    """Refuse an empty AnnData, duplicated gene names and a missing labels key; warn about duplicated cell names.

    Raises:
        CellvaeInputError: as above.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CellvaeInputError(
            f"The data are empty ({adata.n_obs} cells x {adata.n_vars} genes): nothing to train on. Check the "
            "file and any filtering or subsetting done before (e.g. adata[mask])."
        )
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        raise CellvaeInputError(
            f"adata.var_names are not unique ({len(dup)} duplicated, e.g. {list(dup[:3])}): genes are matched by "
            "name. Call adata.var_names_make_unique() first, or sum the duplicated genes' counts."
        )
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        warn(f"adata.obs_names are not unique ({len(dup)} duplicated, e.g. {list(dup[:3])}): training works, "
             "but the training/validation split cannot be saved by cell name. Call "
             "adata.obs_names_make_unique() to fix it.")
    if keys.labels_key is not None and keys.labels_key not in adata.obs.columns:
        raise CellvaeInputError(f"labels_key {keys.labels_key!r} not found in obs columns {list(adata.obs.columns)}.")


def _check_backed(adata) -> None:
    """Raise unless ``adata`` is a backed AnnData that can be read out of core."""
    if not is_backed(adata):
        what = "a view of a backed AnnData" if getattr(adata, "isbacked", False) else "an in-memory AnnData"
        raise CellvaeInputError(
            f"out_of_core=True needs an AnnData opened with anndata.read_h5ad(path, backed='r') (or "
            f"cellvae.data.open_backed(path)), got {what}. Open the .h5ad backed, or leave out_of_core False to "
            "train in memory."
        )
