"""User-facing, AnnData-aware models: :class:`CountVAE` (scVI on counts)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import __version__
from .backed import BackedData, is_backed, scan_counts
from .data import (
    CellvaeInputError,
    DataSpec,
    TensorData,
    check_values,
    get_counts,
    is_count_matrix,
    split_indices,
    warn,
)
from .module import ADVERSARIAL_MODES, DISPERSIONS, GENE_LIKELIHOODS, VAEModule, has_gene_dispersion
from .metrics.likelihood import as_indices, compute_elbo, compute_marginal_ll, compute_reconstruction_error
from .fileio import atomic_directory, write_synced
from .train import CellvaeTrainingError, TrainingPlan, default_max_epochs, train_module

__all__ = ["CountVAE", "FORMAT_VERSION", "DECODER_BIAS_INITS"]

FORMAT_VERSION = 1
_CONFIG = "config.json"
_WEIGHTS = "model.pt"
_SPLIT = "split.json"
DECODER_BIAS_INITS = ("frequency", "default")
_BIAS_INIT_MAX_CELLS = 50_000  # out of core, the decoder bias comes from at most this many training cells


def _check_dispersion_init(value, module_kwargs: dict) -> float | None:
    """None for ``"random"``, else the finite log theta ``value`` as a float, for a likelihood with per-gene
    dispersion; raises :class:`CellvaeInputError` otherwise."""
    if isinstance(value, str) and value == "random":
        return None
    try:
        log_theta = float(value)
    except (TypeError, ValueError):
        log_theta = float("nan")
    if isinstance(value, bool) or not np.isfinite(log_theta):
        raise CellvaeInputError(f"dispersion_init must be 'random' or a finite log theta (a number), got {value!r}.")
    lik, disp = module_kwargs.get("gene_likelihood", "zinb"), module_kwargs.get("dispersion", "gene")
    if not has_gene_dispersion(lik, disp):
        raise CellvaeInputError(f"dispersion_init={value!r} needs the 'nb' or 'zinb' likelihood with 'gene' or "
                                f"'gene-batch' dispersion (this model: {lik!r}, {disp!r}); use 'random'.")
    return log_theta


class CountVAE:
    """scVI-style variational autoencoder for single-cell counts (Lopez et al. 2018, Nat. Methods 15:1053).

    Encoder q(z | x) on log1p counts; decoder ``rho = softmax(f(z, s))`` times the library size gives the mean of
    a ZINB / NB / Poisson likelihood per gene; or a Gaussian VAE on log1p-normalized data
    (``gene_likelihood="normal"``). See :mod:`cellvae.module` for the model.

    Args:
        adata: AnnData (n_cells, n_genes) with raw counts in ``X`` or ``layers[layer]``. Not modified.
        layer: layer with raw counts (None: ``X``).
        batch_key: obs column of the batch (a categorical covariate of the decoder, and the library prior).
        labels_key: obs column of known cell types (kept for reports and metrics; not used in training).
        categorical_covariate_keys: further categorical obs columns injected into the decoder.
        continuous_covariate_keys: numeric obs columns injected into the decoder.
        gene_likelihood: ``"zinb"`` (default), ``"nb"``, ``"poisson"``, ``"normal"``.
        dispersion: ``"gene"`` (default), ``"gene-batch"``, ``"gene-cell"``.
        n_hidden, n_latent, n_layers, dropout_rate: 128, 10, 1, 0.1 (scvi-tools defaults).
        use_observed_lib_size: True: library size = total counts of the cell; False: latent log-normal.
        encode_covariates: also inject covariates into the encoder.
        beta: KL weight of z after the warm-up (beta-VAE, Higgins et al. 2017; default 1.0, the ELBO). Training
            warms the weight up linearly from 0 to ``beta`` (``history["kl_weight"]``). beta > 1 presses q(z|x)
            towards the factorised prior (more disentangled, blurrier reconstructions); saved with the model
            (configs without it load as 1.0).
        adversarial_batch_weight: weight of an adversarial batch classifier with gradient reversal on the latent
            means (0: none, the default; needs ``batch_key`` with >= 2 batches). Pushes batch information out of
            the latent space beyond what the decoder's batch covariate does; see
            :class:`cellvae.module.VAEModule` and ``benchmarks/results/integration.md`` for its effect.
            ``adversarial_mode="confusion"`` (default) or ``"gradient_reversal"`` (a module keyword) picks how the
            encoder is trained against the classifier.
        out_of_core: train and analyse without reading the counts into memory: ``adata`` must be opened with
            ``anndata.read_h5ad(path, backed="r")`` (or :func:`cellvae.backed.open_backed`). The checks below run
            as one streamed pass over the file, and minibatches are read from disk chunk by chunk
            (:class:`cellvae.backed.BackedData`; see ``docs/backed.md``). False (default): a backed AnnData is
            read into memory once, as before. Not saved with the model (pass it to :meth:`load` again).
        **module_kwargs: passed to :class:`cellvae.module.VAEModule`.

    Cells with zero counts are left out of training, and genes with zero counts in every cell are left out of
    the model, each with a warning.

    Attributes:
        train_indices, validation_indices: sorted positions, in the attached AnnData, of the training and the
            held-out validation cells of the last :meth:`train` (None before training). :meth:`save` stores
            their obs names and :meth:`load` restores them when the AnnData it attaches holds all of those cells;
            evaluate held-out cells with e.g. ``model.get_marginal_ll(indices=model.validation_indices)``.

    Raises:
        CellvaeInputError: NaN/inf, negative or non-integer values for a count likelihood, a missing layer or
            obs key, missing values in covariates, or nothing left after removing empty cells and genes.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        gene_likelihood: str = "zinb",
        dispersion: str = "gene",
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        use_observed_lib_size: bool = True,
        encode_covariates: bool = False,
        beta: float = 1.0,
        adversarial_batch_weight: float = 0.0,
        out_of_core: bool = False,
        **module_kwargs,
    ):
        try:
            adversarial_batch_weight = float(adversarial_batch_weight)
        except (TypeError, ValueError):
            raise CellvaeInputError(
                f"adversarial_batch_weight must be a number >= 0, got {adversarial_batch_weight!r}.") from None
        if not (np.isfinite(adversarial_batch_weight) and adversarial_batch_weight >= 0):
            raise CellvaeInputError(
                f"adversarial_batch_weight must be a finite number >= 0, got {adversarial_batch_weight!r}.")
        try:
            beta = float(beta)
        except (TypeError, ValueError):
            raise CellvaeInputError(f"beta must be a number >= 0, got {beta!r}.") from None
        if not (np.isfinite(beta) and beta >= 0):
            raise CellvaeInputError(f"beta must be a finite number >= 0, got {beta!r}.")
        if gene_likelihood not in GENE_LIKELIHOODS:
            raise CellvaeInputError(f"gene_likelihood must be one of {GENE_LIKELIHOODS}, got {gene_likelihood!r}.")
        if dispersion not in DISPERSIONS:
            raise CellvaeInputError(f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}.")
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
        count_lik = gene_likelihood != "normal"
        scan = None
        if out_of_core:  # the same checks and totals, streamed over row chunks of the file
            _check_backed(adata)
            scan = scan_counts(adata, layer, count_lik)
            X = None
        else:
            X = get_counts(adata, layer)
            check_values(X, count_lik, where=f"layers[{layer!r}]" if layer else "X")
        if labels_key is not None and labels_key not in adata.obs.columns:
            raise CellvaeInputError(f"labels_key {labels_key!r} not found in obs columns {list(adata.obs.columns)}.")

        # Empty genes and cells.
        if scan is not None:
            gene_tot, cell_tot = scan.gene_abs, scan.cell_abs
        else:
            gene_tot = np.asarray(abs(X).sum(0)).ravel() if sp.issparse(X) else np.abs(np.asarray(X)).sum(0)
            cell_tot = np.asarray(abs(X).sum(1)).ravel() if sp.issparse(X) else np.abs(np.asarray(X)).sum(1)
        keep_genes = gene_tot > 0
        if not keep_genes.any():
            raise CellvaeInputError("Every gene has zero counts in every cell: nothing to model.")
        if not keep_genes.all():
            warn(f"{int((~keep_genes).sum())} genes with zero counts in every cell are left out of the model.")
        if sp.issparse(X):
            X = sp.csr_matrix(X)
        if not keep_genes.all():  # (the genes left out are all zero, so a backed scan's cell sums are the same)
            cell_tot = scan.cell_sum if scan is not None else np.asarray(X[:, keep_genes].sum(1)).ravel()
        self._train_cells = cell_tot > 0
        if not self._train_cells.any():
            raise CellvaeInputError("Every cell has zero counts: nothing to train on.")
        if not self._train_cells.all():
            warn(f"{int((~self._train_cells).sum())} cells with zero counts are left out of training.")

        normal_transform = "none"
        if gene_likelihood == "normal" and (scan.is_count if scan is not None else is_count_matrix(X)):
            normal_transform = "log1p_cp10k"
        self.spec = DataSpec.from_adata(
            adata,
            gene_names=adata.var_names[keep_genes],
            layer=layer,
            gene_likelihood=gene_likelihood,
            batch_key=batch_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            normal_transform=normal_transform,
        )
        self.labels_key = labels_key
        self.module_kwargs = dict(
            n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
            dispersion=dispersion, gene_likelihood=gene_likelihood,
            use_observed_lib_size=use_observed_lib_size, encode_covariates=encode_covariates, beta=beta,
            **module_kwargs,
        )
        if adversarial_batch_weight > 0:
            if self.spec.n_batch < 2:
                raise CellvaeInputError(
                    "adversarial_batch_weight > 0 needs a batch covariate with at least 2 batches: pass "
                    "batch_key=<obs column of the batch> (or leave adversarial_batch_weight at 0)."
                )
            self.module_kwargs["adversarial_batch_weight"] = adversarial_batch_weight
        mode = self.module_kwargs.get("adversarial_mode", "confusion")
        if mode not in ADVERSARIAL_MODES:
            raise CellvaeInputError(f"adversarial_mode must be one of {ADVERSARIAL_MODES}, got {mode!r}.")
        self.adata = adata
        self._data: TensorData | None = None
        self.out_of_core = bool(out_of_core)
        self._backed_scan = scan  # the streamed checks and totals of an out-of-core AnnData (None in memory)
        lib_means, lib_vars = None, None
        if not use_observed_lib_size and gene_likelihood != "normal":
            lib_means, lib_vars = self._library_prior(adata)
        self.module = self._build_module(lib_means, lib_vars)
        self.history: dict = {}
        self.is_trained = False
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None
        self._saved_split: dict | None = None

    # -------------------------------------------------------------------------------------------- set-up
    @property
    def beta(self) -> float:
        """KL weight of z after the warm-up (beta-VAE; 1.0 = the ELBO). Stored in ``module_kwargs["beta"]``;
        configs saved before it existed have none and mean 1.0."""
        return float(self.module_kwargs.get("beta", 1.0))

    def _build_module(self, lib_means=None, lib_vars=None) -> VAEModule:
        return VAEModule(
            n_input=len(self.spec.gene_names),
            n_batch=self.spec.n_batch,
            n_cats_per_cov=self.spec.n_cats_per_cov,
            n_continuous_cov=len(self.spec.continuous_covariate_keys),
            library_log_means=lib_means,
            library_log_vars=lib_vars,
            **self.module_kwargs,
        )

    def _library_prior(self, adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and variance of log library size over cells with counts (scVI's l prior)."""
        data = self._tensors(adata)
        X = data.X if data.X is not None else data.csr
        tot = np.asarray(X.sum(1)).ravel() if data.X is None else X.sum(1).numpy()
        logl = np.log(np.maximum(tot, 1.0))
        b = data.cat[:, 0].numpy()
        means = np.zeros(self.spec.n_batch, np.float32)
        vars_ = np.ones(self.spec.n_batch, np.float32)
        for i in range(self.spec.n_batch):
            sel = logl[(b == i) & self._train_cells]
            if len(sel):
                means[i] = sel.mean()
                vars_[i] = max(sel.var(), 1e-4)
        return means, vars_

    def _tensors(self, adata: ad.AnnData | None) -> TensorData:
        if adata is None and self.adata is None:
            raise CellvaeInputError("No AnnData attached to this model: pass adata=... to this method.")
        if adata is None or adata is self.adata:
            if self._data is None:
                self._data = self._prepare(self.adata, getattr(self, "_backed_scan", None))
            return self._data
        return self._prepare(adata)

    def _prepare(self, adata: ad.AnnData, scan=None) -> TensorData:
        """``spec.prepare(adata)``; out of core, for a backed AnnData (``anndata.read_h5ad(path, backed="r")``), a
        :class:`cellvae.backed.BackedData` that reads minibatches from disk (checked by a streamed pass unless
        ``scan`` of this AnnData is given)."""
        if getattr(self, "out_of_core", False) and is_backed(adata):
            return BackedData(adata, self.spec, scan=scan)
        return self.spec.prepare(adata)

    # ---------------------------------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        train_size: float = 0.9,
        early_stopping: bool = True,
        early_stopping_patience: int = 45,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        lr_schedule: str = "constant",
        n_epochs_kl_warmup: int | None = None,
        decoder_bias_init: str = "frequency",
        dispersion_init: str | float = "random",
        dispersion_lr_multiplier: float = 30.0,
        seed: int = 0,
        progress_bar: bool = True,
        n_threads: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        resume: bool = False,
        max_bad_steps: int = 20,
        accelerator: str = "auto",
    ) -> "CountVAE":
        """Fit the model by maximising the ELBO with Adam (see :class:`cellvae.train.TrainingPlan`).

        Args:
            max_epochs: passes over the training cells; None: ``min(400, round(20000 / n_cells * 400))``.
            batch_size: cells per minibatch.
            train_size: fraction of cells used for training; the rest (seeded split) is the validation set
                for early stopping and the reported validation ELBO.
            early_stopping: stop when the validation ELBO stalls for ``early_stopping_patience`` epochs after
                KL warm-up, keeping the best weights.
            lr, weight_decay, eps: Adam settings (the defaults are scvi-tools'); ``lr`` is the peak learning rate.
            lr_schedule: ``"constant"`` (default): ``lr`` throughout; ``"cosine"``: the learning rate falls per step
                from ``lr`` to ``lr / 100`` at the end of ``max_epochs`` (cosine annealing, Loshchilov & Hutter
                2017, without restarts). With ``lr=2e-3`` the cosine schedule reaches a given validation ELBO in
                fewer epochs on some datasets, but its best validation ELBO under early stopping was 0.25 % lower
                on average over five datasets (``benchmarks/results/lr_schedule.md``), hence the default.
            n_epochs_kl_warmup: KL warm-up length in epochs (None: half of ``max_epochs``, at most 400).
            decoder_bias_init: initial bias of the decoder's logits layer (count likelihoods; first fit only).
                ``"frequency"`` (default): the log of each gene's share of the training cells' counts,
                ``log(s_g / sum_g s_g)`` with ``s_g`` the gene's total (half a count where it has none; out of core
                from at most 50,000 training cells), which is the maximum-likelihood bias when the rest of the
                decoder's output is zero: training starts from the average expression profile instead of a
                uniform one and reaches a given validation ELBO in fewer epochs
                (``benchmarks/results/decoder_bias_init.md``). ``"default"``: PyTorch's ``nn.Linear``
                initialisation, as scvi-tools.
            dispersion_init: initial log inverse dispersion (log theta) of the NB / ZINB likelihood with ``"gene"``
                or ``"gene-batch"`` dispersion (first fit only). ``"random"`` (default): one N(0, 1) draw per gene,
                as scvi-tools; a number: that log theta for every gene. With ``dispersion_lr_multiplier=1`` theta
                hardly moves from its start, and log theta 1.0 was better on four of five datasets and much worse on
                one (``benchmarks/results/dispersion_init.md``); the default multiplier lets theta move instead.
            dispersion_lr_multiplier: the learning rate of log theta (``px_r``, NB / ZINB with ``"gene"`` /
                ``"gene-batch"`` dispersion) relative to ``lr``; other likelihoods ignore it. 1 is scvi-tools'
                setting, under which Adam moves log theta by at most about ``lr`` per step, so theta stays near its
                random start for tens of epochs. The default 30 gave a better best validation ELBO on all five datasets
                of ``benchmarks/results/dispersion_lr.md`` (+0.03 % to +6.8 % in 10 runs), reached in fewer epochs.
            seed: seeds initialisation, split, minibatch order, dropout and sampling.
            progress_bar: show progress.
            n_threads: torch threads while training (None: half the CPUs; see
                :func:`cellvae.train.default_n_threads`).
            checkpoint_dir: directory for a training checkpoint (``checkpoint.pt``: weights, optimizer, epoch,
                KL warm-up step, RNG states, early-stopping state, history), written atomically every
                ``checkpoint_every`` epochs and at the end. None: no checkpoints.
            checkpoint_every: epochs between checkpoints (a crash loses at most this many).
            resume: continue the run whose checkpoint is in ``checkpoint_dir`` (from the start if there is none
                yet), with the same data and settings; it ends with the same weights as an uninterrupted run. A
                finished run is not trained further unless ``max_epochs`` is larger (and it did not stop early).
            max_bad_steps: minibatches with a non-finite loss or gradients are skipped (counted in
                ``history["n_skipped_steps"]``); this many in a row stop training with
                :class:`cellvae.train.CellvaeTrainingError`.
            accelerator: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; the module returns to the CPU
                after training. Under ``torchrun`` (``WORLD_SIZE`` > 1, process group initialised, see
                :mod:`cellvae.distributed`) training is data-parallel over the processes.

        The first call initialises the weights from ``seed``; a later call continues from the current weights
        (with a fresh optimizer and warm-up) and replaces ``self.history``.

        Returns:
            self, trained; ``self.history`` holds the per-epoch losses.

        Raises:
            CellvaeInputError: fewer than 3 cells with counts, fewer training cells than one minibatch, an
                ``lr_schedule`` other than ``"constant"`` / ``"cosine"``, a ``decoder_bias_init`` other than
                ``"frequency"`` / ``"default"``, a ``dispersion_init`` other than ``"random"`` or a finite number
                (or a number where the likelihood has no per-gene dispersion), a ``dispersion_lr_multiplier`` that is
                not a positive number, or a checkpoint that cannot be resumed
                (unreadable, another model/data/split, or present while ``resume`` is False).
            CellvaeTrainingError: ``max_bad_steps`` consecutive non-finite steps. The model then keeps the best
                weights so far (``self.history`` up to the failure); with ``checkpoint_dir`` they are also in the
                checkpoint.
        """
        if self._train_cells is None:  # a loaded model: train on the attached cells that have counts
            data = self._tensors(None)
            tot = data.X.abs().sum(1).numpy() if data.X is not None else np.asarray(abs(data.csr).sum(1)).ravel()
            self._train_cells = tot > 0
        cells = np.flatnonzero(self._train_cells)
        if len(cells) < 3:
            raise CellvaeInputError(f"Only {len(cells)} cells with counts: at least 3 are needed to train.")
        if decoder_bias_init not in DECODER_BIAS_INITS:
            raise CellvaeInputError(f"decoder_bias_init must be one of {DECODER_BIAS_INITS}, "
                                    f"got {decoder_bias_init!r}.")
        log_theta0 = _check_dispersion_init(dispersion_init, self.module_kwargs)
        first_fit = not self.is_trained
        if first_fit:  # first fit: initialise the weights from the seed, for reproducibility
            torch.manual_seed(seed)
            self.module = self._build_module(
                getattr(self.module, "library_log_means", None), getattr(self.module, "library_log_vars", None)
            )
        tr, va = split_indices(len(cells), train_size, seed)
        tr, va = cells[tr], cells[va]
        if len(tr) < max(2, int(batch_size)):
            raise CellvaeInputError(
                f"Only {len(tr)} training cells, fewer than one minibatch of batch_size={batch_size}: pass a smaller "
                f"batch_size (e.g. {max(2, len(tr) // 4)}, --batch-size on the CLI), a larger train_size, or more cells."
            )
        if max_epochs is None:
            max_epochs = default_max_epochs(len(cells))
        plan = TrainingPlan(
            max_epochs=int(max_epochs), batch_size=int(batch_size), lr=lr, weight_decay=weight_decay, eps=eps,
            lr_schedule=lr_schedule, n_epochs_kl_warmup=n_epochs_kl_warmup, early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience, seed=seed, progress_bar=progress_bar,
            n_threads=n_threads, checkpoint_every=int(checkpoint_every), max_bad_steps=int(max_bad_steps),
            max_kl_weight=self.beta, accelerator=accelerator, dispersion_lr_multiplier=dispersion_lr_multiplier,
        )
        data = self._tensors(None)
        if first_fit and decoder_bias_init == "frequency":  # (a resumed checkpoint then replaces every weight)
            self.module.init_decoder_bias(_gene_totals(data, tr, seed))
        if first_fit and log_theta0 is not None:
            self.module.init_dispersion(log_theta0)
        meta = {"model_class": type(self).__name__, "data_spec": _jsonable(self.spec.to_dict()),
                "module_kwargs": _jsonable(self.module_kwargs)}
        if isinstance(data, BackedData):  # another minibatch order: resume out of core only (no key in memory)
            meta["out_of_core"] = True
        try:
            self.history = train_module(self.module, data, tr, va, plan, checkpoint_dir=checkpoint_dir,
                                        resume=resume, meta=meta)
        except CellvaeTrainingError as e:
            self.history = e.history
            self._finish_training(plan, train_size, tr, va, decoder_bias_init, dispersion_init)
            raise
        self._finish_training(plan, train_size, tr, va, decoder_bias_init, dispersion_init)
        return self

    def _finish_training(self, plan: TrainingPlan, train_size: float, tr: np.ndarray, va: np.ndarray,
                         decoder_bias_init: str, dispersion_init: str | float = "random") -> None:
        self.history["plan"] = {k: getattr(plan, k) for k in plan.__dataclass_fields__}
        self.history["plan"].update(train_size=train_size, decoder_bias_init=decoder_bias_init,
                                    dispersion_init=dispersion_init)
        self.train_indices, self.validation_indices = tr, va
        self.is_trained = True

    # --------------------------------------------------------------------------------------- inference
    def _check_trained(self):
        if not self.is_trained:
            warn("The model has not been trained; results come from random weights. Call .train() first.")

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
        self._check_trained()
        data = self._tensors(adata)
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
        self._check_trained()
        adata_ = adata if adata is not None else self.adata
        data = self._tensors(adata)
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
            if self.spec.gene_likelihood == "normal":
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

    def _eval_data(self, adata: ad.AnnData | None, indices) -> tuple[TensorData, torch.Tensor]:
        self._check_trained()
        data = self._tensors(adata)
        return data, as_indices(indices, data.n_cells)

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
        data, idx = self._eval_data(adata, indices)
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
        data, idx = self._eval_data(adata, indices)
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
        data, idx = self._eval_data(adata, indices)
        return compute_reconstruction_error(self.module, data, idx, batch_size, return_mean=return_mean, seed=seed)

    # ----------------------------------------------------------------------------------- save / load
    def _config(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "cellvae_version": __version__,
            "model_class": type(self).__name__,
            "data_spec": self.spec.to_dict(),
            "labels_key": self.labels_key,
            "module_kwargs": self.module_kwargs,
            "is_trained": self.is_trained,
        }

    def save(self, dir_path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save to a directory: ``config.json`` (format version, genes, covariate categories, settings),
        ``model.pt`` (a plain state dict, loadable with ``torch.load(weights_only=True)``), ``history.json`` and,
        when the training cells are known and their obs names unique, ``split.json`` (obs names of the training
        and validation cells). Written into a temporary directory beside the target (each file fsynced) and
        renamed, so a crash never leaves a half-written model. The format is described in
        ``docs/model_format.md``.

        Raises:
            FileExistsError: the directory exists and ``overwrite`` is False.
        """
        target = Path(dir_path)
        with atomic_directory(target, overwrite) as tmp:
            write_synced(tmp / _CONFIG, json.dumps(self._config(), indent=2).encode())
            write_synced(tmp / "history.json", json.dumps(_jsonable(self.history)).encode())
            split = self._split_names()
            if split is not None:
                write_synced(tmp / _SPLIT, json.dumps(split).encode())
            with open(tmp / _WEIGHTS, "wb") as f:
                torch.save(self.module.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
        return target

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: ad.AnnData | None = None,
             out_of_core: bool = False) -> "CountVAE":
        """Load a model saved by :meth:`save`.

        Args:
            dir_path: the model directory.
            adata: data to attach (genes are matched to the model by name); None attaches none, and the
                ``get_*`` methods then need ``adata``. When it holds every training and validation cell of the
                saved model (by obs name, from ``split.json``), ``train_indices`` and ``validation_indices`` are
                set to their positions in it; otherwise they are None.
            out_of_core: read backed AnnData (``adata`` and those passed to methods) from disk chunk by chunk
                instead of into memory, as ``CountVAE(..., out_of_core=True)``; ``adata``, if given, must be backed.

        Raises:
            CellvaeInputError: missing files, a newer format version, weights that do not match the config,
                or ``adata`` without the model's genes.
        """
        d = Path(dir_path)
        if not (d / _CONFIG).exists() or not (d / _WEIGHTS).exists():
            raise CellvaeInputError(
                f"{str(d)!r} is not a cellvae model directory (needs {_CONFIG} and {_WEIGHTS}); pass the directory "
                "written by CountVAE.save (for `cellvae fit`: OUT/model)."
            )
        try:
            cfg = json.loads((d / _CONFIG).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CellvaeInputError(f"{str(d / _CONFIG)!r} is not valid JSON ({e}); the model directory is damaged: "
                                    "save or train the model again.") from e
        if not isinstance(cfg, dict):
            raise CellvaeInputError(f"{str(d / _CONFIG)!r} does not hold a cellvae model config (a JSON object).")
        cfg = _migrate(cfg, where=str(d / _CONFIG))
        self = cls.__new__(cls)
        try:
            self.spec = DataSpec.from_dict(cfg["data_spec"])
            self.labels_key = cfg.get("labels_key")
            self.module_kwargs = dict(cfg["module_kwargs"])
        except (KeyError, TypeError) as e:
            raise CellvaeInputError(f"{str(d / _CONFIG)!r} lacks or has a malformed entry ({e}); the model "
                                    "directory is damaged: save or train the model again.") from e
        try:
            # weights_only: only tensors and plain containers are unpickled, never code.
            state = torch.load(d / _WEIGHTS, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - unreadable, truncated, or pickled objects other than tensors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CellvaeInputError(
                f"{str(d / _WEIGHTS)!r} cannot be loaded as plain weights ({type(e).__name__}: {first}). It is "
                "damaged, or holds pickled objects other than tensors, which cellvae never loads; save the model "
                "again with CountVAE.save."
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CellvaeInputError(f"{str(d / _WEIGHTS)!r} is not a state dict of tensors; save the model again.")
        lib_means = state.get("library_log_means")
        lib_vars = state.get("library_log_vars")
        try:
            self.module = self._build_module(lib_means, lib_vars)
        except (TypeError, ValueError) as e:
            raise CellvaeInputError(f"The settings in {str(d / _CONFIG)!r} cannot build a model ({e}).") from e
        try:
            self.module.load_state_dict(state)
        except RuntimeError as e:
            raise CellvaeInputError(
                f"Weights in {str(d / _WEIGHTS)!r} do not match its config ({_state_mismatch(e)}). The files of the "
                "directory come from different models, or were edited; save the model again."
            ) from e
        self.module.eval()
        hist = d / "history.json"
        self.history = json.loads(hist.read_text()) if hist.exists() else {}
        self.is_trained = bool(cfg.get("is_trained", True))
        self.train_indices = self.validation_indices = None
        self._data = None
        self.adata = None
        self.out_of_core = bool(out_of_core)
        if adata is not None:
            if out_of_core:
                _check_backed(adata)
            self.spec.gene_indexer(adata)  # fail early on missing genes
            self.adata = adata
        self._train_cells = None
        split = d / _SPLIT
        self._saved_split = json.loads(split.read_text()) if split.exists() else None
        if adata is not None:
            self.train_indices, self.validation_indices = _locate_split(self._saved_split, adata)
        return self

    def _split_names(self) -> dict | None:
        """Obs names of the training and validation cells (None when unknown or the names are not unique)."""
        if self.train_indices is None or self.validation_indices is None or self.adata is None:
            return self._saved_split
        names = self.adata.obs_names
        if not names.is_unique:
            return None
        return {"train": names[self.train_indices].astype(str).tolist(),
                "validation": names[self.validation_indices].astype(str).tolist()}

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
        from .de import differential_expression

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
        from .anomaly import anomaly_score

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
        from .anomaly import annotate_anomalies

        return annotate_anomalies(self, adata, threshold=threshold, quantile=quantile, copy=copy, **kwargs)

    def predict_perturbation(self, adata_ctrl: ad.AnnData, condition_key: str, control: str, perturbed: str,
                             cell_type_key: str | None = None, cell_type: str | None = None,
                             method: str = "latent_arithmetic", **kwargs) -> ad.AnnData:
        """Predict how control cells would look under ``perturbed`` (scGen-style latent arithmetic, Lotfollahi et
        al. 2019, or the conditional decoder swap). Returns an AnnData (n_cells, n_genes) with ``X`` = expected
        counts at each cell's library size and ``layers['counts']`` sampled from the likelihood. See
        :func:`cellvae.perturb.predict_perturbation`.

        Raises:
            CellvaeInputError: unknown keys or categories, no control cells, or a decoder swap on a model without
                the condition as a covariate.
        """
        from .perturb import predict_perturbation

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
        from .generate import sample

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
        from .generate import posterior_predictive_sample

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
        from .latent import interpolate

        return interpolate(self, cells_a, cells_b, n_steps=n_steps, adata=adata, covariates=covariates,
                           library_size=library_size)

    def latent_arithmetic(self, adata: ad.AnnData | None = None, base=None, plus=None, minus=None,
                          library_size: float = 1e4) -> ad.AnnData:
        """Decode ``z_c + (mean z[plus] - mean z[minus])`` for every base cell c (scGen-style latent arithmetic);
        AnnData (n_base, n_genes) of normalized expression. See :func:`cellvae.latent.latent_arithmetic`.

        Raises:
            CellvaeInputError: a missing ``base``/``plus``/``minus`` selection, cells not found, no AnnData.
        """
        from .latent import latent_arithmetic

        return latent_arithmetic(self, adata, base=base, plus=plus, minus=minus, library_size=library_size)

    def latent_traversal(self, dims=None, n_steps: int = 13, limit: float = 3.0, covariates: dict | None = None,
                         library_size: float = 1e4) -> ad.AnnData:
        """Decode along each latent dimension from ``-limit`` to ``limit``, the others at 0: AnnData
        (n_dims * n_steps, n_genes) with ``obs["dim"]``, ``obs["value"]``. Plot it with
        :func:`cellvae.latent.plot_latent_traversal`. See :func:`cellvae.latent.latent_traversal`.

        Raises:
            CellvaeInputError: ``dims`` out of range for ``n_latent``, unknown covariate categories.
        """
        from .latent import latent_traversal

        return latent_traversal(self, dims=dims, n_steps=n_steps, limit=limit, covariates=covariates,
                                library_size=library_size)

    def __repr__(self) -> str:
        k = self.module_kwargs
        return (
            f"CountVAE({len(self.spec.gene_names)} genes, n_latent={k['n_latent']}, n_hidden={k['n_hidden']}, "
            f"n_layers={k['n_layers']}, gene_likelihood={k['gene_likelihood']!r}, dispersion={k['dispersion']!r}, "
            f"n_batch={self.spec.n_batch}{f', beta={self.beta:g}' if self.beta != 1.0 else ''}, "
            f"trained={self.is_trained})"
        )


def _gene_totals(data, rows: np.ndarray, seed: int) -> np.ndarray:
    """(n_genes,) float64 total counts of each gene over the cells ``rows`` of ``data`` (a TensorData or, streamed,
    a BackedData: then over a seeded sample of at most ``_BIAS_INIT_MAX_CELLS`` of them)."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(data, BackedData):
        if len(rows) > _BIAS_INIT_MAX_CELLS:
            rows = np.random.default_rng(seed).choice(rows, _BIAS_INIT_MAX_CELLS, replace=False)
        return data.col_sums(rows)
    w = np.bincount(rows, minlength=data.n_cells).astype(np.float64)  # times each cell is counted: no row copies
    if data.X is None:
        return np.asarray(data.csr.T @ w).ravel()
    out = np.zeros(data.n_genes)
    for a in range(0, data.n_cells, 4096):  # float64 sums over blocks of the dense matrix
        out += w[a:a + 4096] @ data.X[a:a + 4096].numpy().astype(np.float64)
    return out


def _check_backed(adata) -> None:
    """Raise unless ``adata`` is a backed AnnData that can be read out of core."""
    if not is_backed(adata):
        what = "a view of a backed AnnData" if getattr(adata, "isbacked", False) else "an in-memory AnnData"
        raise CellvaeInputError(
            f"out_of_core=True needs an AnnData opened with anndata.read_h5ad(path, backed='r') (or "
            f"cellvae.backed.open_backed(path)), got {what}. Open the .h5ad backed, or leave out_of_core False to "
            "train in memory."
        )


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


_MIGRATIONS = {0: _migrate_0_to_1}  # from version k to k + 1; see docs/model_format.md


def _migrate(cfg: dict, where: str = "config.json") -> dict:
    """Bring a model config of any older format version up to :data:`FORMAT_VERSION`, one version at a time.

    A config without ``format_version`` is format 0. Each step is a pure function of the JSON config (weights are
    never rewritten); see ``docs/model_format.md`` for the versions and how to add one.

    Raises:
        CellvaeInputError: a version newer than this cellvae supports, or not a version number.
    """
    try:
        version = int(cfg.get("format_version", 0))
    except (TypeError, ValueError):
        raise CellvaeInputError(f"{where}: format_version {cfg.get('format_version')!r} is not a version number; "
                                "the model directory is damaged: save the model again.") from None
    if version > FORMAT_VERSION:
        raise CellvaeInputError(
            f"Model format version {version} is newer than this cellvae supports ({FORMAT_VERSION}); "
            f"upgrade cellvae (pip install -U cellvae) to load it."
        )
    if version < 0:
        raise CellvaeInputError(f"{where}: format_version {version} is not a cellvae format.")
    while version < FORMAT_VERSION:
        cfg = _MIGRATIONS[version](cfg)
        version += 1
    return cfg


def _locate_split(split: dict | None, adata: ad.AnnData) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Positions of a saved split's cells in ``adata``, matched by obs name; (None, None) unless all are found."""
    names = adata.obs_names.astype(str)
    if split is None or not names.is_unique:
        return None, None
    pos = [names.get_indexer(split.get(k, [])) for k in ("train", "validation")]
    if any((p < 0).any() for p in pos):
        return None, None
    return np.sort(pos[0]), np.sort(pos[1])


def _state_mismatch(e: RuntimeError) -> str:
    """The first difference of a failed ``load_state_dict``, briefly, and how many there are."""
    import re

    lines = [ln.strip().rstrip(".") for ln in str(e).splitlines()[1:] if ln.strip()]
    parts = []
    for ln in lines:
        m = re.match(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
                     r"the shape in current model is torch\.Size\((\[.*?\])\)", ln)
        parts.append(f"{m.group(1)} has shape {m.group(2)} in the file but {m.group(3)} by the config" if m else ln)
    if not parts:
        return str(e).splitlines()[0][:200]
    more = f"; {len(parts) - 1} more differences" if len(parts) > 1 else ""
    return parts[0][:300] + more


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
