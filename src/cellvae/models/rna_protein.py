"""The joint RNA + surface-protein count VAE on an AnnData or a MuData: :class:`RNAProteinVAE` (the totalVI model,
Gayoso et al. 2021, Nat. Methods 18:272; module: :class:`cellvae.vae.totalvi.RNAProteinModule`).

    model = cellvae.RNAProteinVAE(adata, protein_key="protein_expression", batch_key="batch").train()
    z = model.get_latent_representation()                      # one latent space for both modalities
    rna, protein = model.get_normalized_expression()           # denoised RNA and protein foreground intensity
    fg = model.get_protein_foreground_probability()            # 1 - pi: probability that a protein is truly there
    ll = model.get_marginal_ll(indices=model.validation_indices, modality="all")  # joint, RNA and protein log p
    de = model.differential_expression(groupby="cell_type")    # genes and proteins ("<name>_protein")

Input: an AnnData with raw RNA counts (``X`` or a layer) and raw protein (ADT) counts in ``obsm[protein_key]`` (a
DataFrame, one column per protein), or a :class:`mudata.MuData` with ``rna`` and ``prot`` modalities
(:func:`cellvae.data.protein.mudata_to_anndata`). The cellvae analyses of :class:`cellvae.CountVAE` that need only
the latent space or the RNA decoder apply too; reference mapping (``map_query``) does not yet.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data.obs import categories, encode
from ..data.protein import (PROTEIN_KEY, ProteinSpec, background_prior as estimate_background_prior, is_mudata,
                            isotype_controls as find_isotype_controls, mudata_to_anndata, protein_batch_mask,
                            protein_table, warn_masked)
from ..data.tensors import as_indices
from ..errors import CellvaeInputError
from ..settings import ModelSettings, RNAProteinSettings, as_dict, build, from_dict, with_signature
from ..vae.module import evaluation
from ..vae.totalvi import RNAProteinModule
from .count_vae import CountVAE

__all__ = ["RNAProteinVAE", "MODALITIES", "PROTEIN_SUFFIX"]

MODALITIES = ("joint", "rna", "protein", "all")
PROTEIN_SUFFIX = "_protein"  # proteins in differential_expression's index (scvi-tools' TOTALVI convention)
_MAX_ELEMENTS = 1 << 22  # samples x cells x features per decoder pass of get_marginal_ll


class RNAProteinVAE(CountVAE):
    """Joint RNA + protein VAE of the totalVI class (module docstring).

    Args:
        adata: AnnData (n_cells, n_genes) of raw RNA counts with raw protein counts in ``obsm[protein_key]``, or a
            MuData with ``rna`` and ``prot`` modalities (converted; the proteins then land in
            ``obsm[protein_key]`` of the attached AnnData). Not modified.
        protein_key: obsm key of the protein counts (``"protein_expression"``, as scvi-tools).
        layer, batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys: as
            :class:`cellvae.CountVAE` (the batch also indexes the protein background prior and masks).
        isotype_controls: names of isotype-control proteins; ``"auto"`` finds them by name
            (:func:`cellvae.data.protein.isotype_controls`); None: none.
        background_prior: how the prior of the protein background starts (then learned): ``"auto"`` (isotype
            controls when there are some, else a mixture fit), ``"isotype"`` or ``"mixture"``
            (:func:`cellvae.data.protein.background_prior`).
        override_missing_proteins: proteins that are all zero in a batch are treated as measured (their zeros are
            real) instead of masked as missing from that batch's panel.
        settings: a :class:`cellvae.settings.RNAProteinSettings` (None: its defaults), updated by the keywords.
        **model_settings: any field of :class:`cellvae.settings.RNAProteinSettings` (``gene_likelihood="nb"``,
            ``protein_dispersion="protein"``, ``n_latent``, ``n_hidden``, ``n_layers``, ...).

    Attributes:
        spec: a :class:`cellvae.data.protein.ProteinSpec` (genes, proteins, covariates).
        protein_info: the background prior method used, the isotype controls, and the masked (batch, protein) pairs.
        KL_WARMUP_CAP: 50, the longest default KL warm-up in epochs of :meth:`train` (``n_epochs_kl_warmup=None``:
            half of ``max_epochs``, at most this; ``CountVAE``: at most 400).
        As :class:`cellvae.CountVAE` otherwise.

    Raises:
        CellvaeInputError: the errors of :class:`cellvae.CountVAE`, an absent protein key, negative, non-integer or
            infinite protein counts, mismatched cells between the modalities, partly missing (NaN) proteins, unknown
            isotype controls, settings this model does not support (a ``"normal"`` likelihood, a latent library
            size, a linear decoder).
    """

    FORMAT_VERSION = 1
    MIGRATIONS: dict = {}
    #: Default KL warm-up: half of ``max_epochs``, at most 50 epochs (CountVAE: at most 400). With the 200-epoch
    #: warm-up of a 400-epoch run the best validation ELBO came right after the warm-up, and a 50-epoch warm-up gave
    #: a better held-out RNA and protein log p on every seed of CBMC (chosen there against 100 and 200) and of
    #: pbmc10k (confirmed there): ``benchmarks/results/rna_protein_default_trials.md``.
    KL_WARMUP_CAP = 50

    @with_signature(RNAProteinSettings, keep=11)
    def __init__(self, adata, protein_key: str = PROTEIN_KEY, layer: str | None = None,
                 batch_key: str | None = None, labels_key: str | None = None,
                 categorical_covariate_keys: Sequence[str] | None = None,
                 continuous_covariate_keys: Sequence[str] | None = None,
                 isotype_controls: Sequence[str] | str | None = "auto", background_prior: str = "auto",
                 override_missing_proteins: bool = False, settings: RNAProteinSettings | None = None,
                 **model_settings):
        adata = _as_anndata(adata, protein_key)
        if isinstance(settings, ModelSettings) and not isinstance(settings, RNAProteinSettings):
            settings = from_dict(RNAProteinSettings, as_dict(settings), "RNAProteinVAE settings")
        s = build(RNAProteinSettings, settings, model_settings, "RNAProteinVAE settings")
        table = protein_table(adata, protein_key)
        names = [str(c) for c in table.columns]
        batch_cats = categories(adata, batch_key, "batch_key") if batch_key else ["0"]
        codes = encode(adata, batch_key, batch_cats, "batch_key") if batch_key else np.zeros(adata.n_obs, np.int64)
        values = table.to_numpy()
        mask = protein_batch_mask(values, codes, len(batch_cats), names, batch_cats, bool(override_missing_proteins))
        warn_masked(mask, names, batch_cats)
        isotypes = _isotype_names(isotype_controls, names)
        mean, scale, method = estimate_background_prior(values, codes, mask, [names.index(n) for n in isotypes],
                                                        background_prior)
        self._protein_init = {"mask": mask, "mean": mean, "scale": scale}
        self._pending_protein = (protein_key, names)
        super().__init__(adata, layer=layer, batch_key=batch_key, labels_key=labels_key,
                         categorical_covariate_keys=categorical_covariate_keys,
                         continuous_covariate_keys=continuous_covariate_keys, out_of_core=False, settings=s)
        del self._pending_protein
        self.protein_info = {
            "background_prior": method, "isotype_controls": isotypes,
            "masked": {batch_cats[b]: [names[t] for t in np.flatnonzero(~mask[b])] for b in range(len(batch_cats))
                       if not mask[b].all()}}

    # ---------------------------------------------------------------------------------------------- set-up
    def _build_module(self, lib_means=None, lib_vars=None) -> RNAProteinModule:
        pending = getattr(self, "_pending_protein", None)
        if pending is not None and not isinstance(self.spec, ProteinSpec):
            self.spec = ProteinSpec(**self.spec.to_dict(), protein_key=pending[0], protein_names=list(pending[1]))
        init = self._protein_init
        return RNAProteinModule(
            n_genes=len(self.spec.gene_names), n_proteins=self.spec.n_proteins, n_batch=self.spec.n_batch,
            n_cats_per_cov=self.spec.n_cats_per_cov, n_continuous_cov=len(self.spec.continuous_covariate_keys),
            protein_batch_mask=init["mask"], background_prior_mean=init["mean"],
            background_prior_scale=init["scale"], settings=self.settings)

    @property
    def protein_names(self) -> list[str]:
        """The modelled proteins, in model order."""
        return list(self.spec.protein_names)

    @property
    def protein_batch_mask(self) -> pd.DataFrame:
        """(n_batch, n_proteins) bool DataFrame: which proteins are measured in which batch."""
        return pd.DataFrame(self.module.protein_batch_mask.numpy() > 0, index=self.spec.batch_categories,
                            columns=self.protein_names)

    def _prepare(self, adata):
        return self.spec.prepare(_as_anndata(adata, self.spec.protein_key))

    def prepared_data(self, adata=None):
        """Prepared tensors (:class:`cellvae.data.protein.RNAProteinData`: genes, then proteins) of ``adata`` (an
        AnnData or MuData; None: the attached one)."""
        return super().prepared_data(None if adata is None else _as_anndata(adata, self.spec.protein_key))

    # ------------------------------------------------------------------------------------------- decoding
    def _select(self, names: Sequence[str] | None, known: list[str], what: str) -> np.ndarray | None:
        if names is None:
            return None
        idx = pd.Index(known).get_indexer([str(n) for n in names])
        if (idx < 0).any():
            raise CellvaeInputError(f"{what} not in the model: {[n for n, i in zip(names, idx) if i < 0][:5]}.")
        return idx

    def _batch_code(self, transform_batch) -> int | None:
        if transform_batch is None:
            return None
        if str(transform_batch) not in self.spec.batch_categories:
            raise CellvaeInputError(f"transform_batch {transform_batch!r} is not a batch of the model: "
                                    f"{self.spec.batch_categories}.")
        return self.spec.batch_categories.index(str(transform_batch))

    def _decoded(self, adata, indices, n_samples: int, transform_batch, batch_size: int, seed):
        """Yield ``(gen, n_cells)`` per minibatch: the generative outputs at the posterior mean of z and of
        ``log beta`` (``n_samples == 1``) or at ``n_samples`` draws of both (leading sample axis)."""
        if int(n_samples) < 1:
            raise CellvaeInputError(f"n_samples must be >= 1, got {n_samples}.")
        self.check_trained()
        b = self._batch_code(transform_batch)
        data, idx = self.prepared_cells(adata, indices)
        with evaluation(self.module, seed):
            for x, cat, cont in data.iterate(idx, batch_size):
                inf = self.module.inference(x, cat, cont, n_samples=n_samples)
                gcat = cat
                if b is not None:
                    gcat = cat.clone()
                    gcat[:, 0] = b
                z = inf["qz_m"] if n_samples == 1 else inf["z"]
                gen = self.module.rna_generative(z, inf["library"], gcat, cont)
                gen.update(self.module.protein_generative(z, gcat, cont, sample_background=n_samples > 1))
                yield gen, x.shape[0]

    def get_normalized_expression(self, adata=None, indices=None, library_size: float | str = 1.0,
                                  n_samples: int = 1, transform_batch: str | None = None,
                                  gene_list: Sequence[str] | None = None, protein_list: Sequence[str] | None = None,
                                  include_protein_background: bool = False, sample_protein_mixing: bool = False,
                                  batch_size: int = 1024, return_numpy: bool = False, seed: int | None = 0):
        """Denoised expression of both modalities, as scvi-tools' ``TOTALVI.get_normalized_expression``.

        - RNA: the decoder's ``rho`` (rows sum to 1) times ``library_size`` (``"latent"``: the NB mean at the cell's
          observed library size), as :meth:`cellvae.CountVAE.get_normalized_expression`;
        - protein: the foreground intensity ``(1 - pi) alpha beta`` in counts (the expected counts of the protein
          truly on the cell, background removed); with ``include_protein_background`` plus ``pi beta``;
          ``sample_protein_mixing`` draws the component (foreground or background) instead of weighting by ``pi``.

        With ``n_samples == 1`` the posterior means of z and ``log beta`` are decoded (deterministic); otherwise the
        mean over ``n_samples`` draws of both (seeded by ``seed``).

        Args:
            adata: cells (AnnData or MuData; default: the training data); indices: positions or a mask (None: all).
            transform_batch: decode every cell as if from this batch (counterfactual expression).
            gene_list, protein_list: return only these.
            return_numpy: arrays instead of DataFrames.

        Returns:
            ``(rna, protein)``: DataFrames (n_cells, n_genes) and (n_cells, n_proteins) indexed by cell, or float32
            arrays.

        Raises:
            CellvaeInputError: unknown genes, proteins or batch, a bad ``library_size``, ``n_samples < 1``, and the
                causes of :meth:`get_latent_representation`.
        """
        if isinstance(library_size, str) and library_size != "latent":
            raise CellvaeInputError(f"library_size must be a number or 'latent', got {library_size!r}.")
        gidx = self._select(gene_list, self.spec.gene_names, "Genes")
        pidx = self._select(protein_list, self.protein_names, "Proteins")
        rna, prot = [], []
        gen_seed = np.random.default_rng(seed)
        for gen, _ in self._decoded(adata, indices, n_samples, transform_batch, batch_size, seed):
            r = gen["px"].mu if library_size == "latent" else gen["rho"] * float(library_size)
            py = gen["py"]
            fg = py.foreground_probability
            if sample_protein_mixing:
                u = torch.as_tensor(gen_seed.random(tuple(fg.shape)), dtype=fg.dtype)
                fg = (u < fg).to(fg.dtype)
            p = fg * py.mu2 + ((1 - fg) * py.mu1 if include_protein_background else 0.0)
            if n_samples > 1:
                r, p = r.mean(0), p.mean(0)
            rna.append(r if gidx is None else r[:, torch.as_tensor(gidx)])
            prot.append(p if pidx is None else p[:, torch.as_tensor(pidx)])
        rna_a, prot_a = torch.cat(rna).numpy(), torch.cat(prot).numpy()
        if return_numpy:
            return rna_a, prot_a
        cells = self._cell_names(adata, indices)
        genes = pd.Index(self.spec.gene_names) if gidx is None else pd.Index(self.spec.gene_names)[gidx]
        prots = pd.Index(self.protein_names) if pidx is None else pd.Index(self.protein_names)[pidx]
        return pd.DataFrame(rna_a, index=cells, columns=genes), pd.DataFrame(prot_a, index=cells, columns=prots)

    def get_protein_foreground_probability(self, adata=None, indices=None, protein_list: Sequence[str] | None = None,
                                           n_samples: int = 1, transform_batch: str | None = None,
                                           batch_size: int = 1024, return_numpy: bool = False,
                                           seed: int | None = 0):
        """Probability that each protein's counts come from the foreground (the protein is on the cell), ``1 - pi``
        of the decoder (Gayoso et al. 2021; scvi-tools' ``get_protein_foreground_probability``): at the posterior
        mean of z (``n_samples == 1``) or averaged over ``n_samples`` draws.

        It is a call relative to the background the model learned for each protein (and batch): a cell type that binds
        an antibody unspecifically (Fc-receptor-carrying monocytes and NK cells, say) can be called foreground. On
        CBMC, which has no isotype controls, raw ADT counts ranked marker-positive types above marker-negative ones
        better than this probability (``benchmarks/results/rna_protein.md``); on pbmc10k it ranked them better.

        Returns:
            DataFrame (n_cells, n_proteins) in [0, 1] indexed by cell, or a float32 array.

        Raises:
            CellvaeInputError: unknown proteins or batch, ``n_samples < 1``, and the causes of
                :meth:`get_latent_representation`.
        """
        pidx = self._select(protein_list, self.protein_names, "Proteins")
        out = []
        for gen, _ in self._decoded(adata, indices, n_samples, transform_batch, batch_size, seed):
            fg = gen["foreground_probability"]
            fg = fg.mean(0) if n_samples > 1 else fg
            out.append(fg if pidx is None else fg[:, torch.as_tensor(pidx)])
        arr = torch.cat(out).numpy()
        if return_numpy:
            return arr
        prots = pd.Index(self.protein_names) if pidx is None else pd.Index(self.protein_names)[pidx]
        return pd.DataFrame(arr, index=self._cell_names(adata, indices), columns=prots)

    def _cell_names(self, adata, indices) -> pd.Index:
        a = self.adata if adata is None else _as_anndata(adata, self.spec.protein_key)
        if a is None:
            raise CellvaeInputError("No AnnData attached to this model: pass adata=... .")
        return a.obs_names[as_indices(indices, a.n_obs).numpy()]

    # ---------------------------------------------------------------------------------- likelihood metrics
    def get_elbo(self, adata=None, indices=None, return_mean: bool = True, batch_size: int = 1024,
                 seed: int | None = None, modality: str = "joint"):
        """ELBO per cell (nats, higher is better), one sample of z and of ``log beta`` per cell.

        Args:
            modality: ``"joint"`` (the ELBO of RNA and proteins), ``"rna"`` (``E_q[log p(x | z)] - KL_z``, a bound of
                the RNA marginal ``log p(x)``), ``"protein"`` (``E_q[log p(y | z, beta)] - KL_z - KL_beta``, a bound of
                ``log p(y)``) or ``"all"`` (a dict of the three, from the same samples).
            adata, indices, return_mean, batch_size, seed: as :meth:`cellvae.CountVAE.get_elbo`.

        Returns:
            float (mean over cells) or (n_cells,) float32 array; a dict of them for ``"all"``.

        Raises:
            CellvaeInputError: an unknown modality, bad ``indices``, and the causes of
                :meth:`get_latent_representation`.
        """
        _check_modality(modality)
        self.check_trained()
        data, idx = self.prepared_cells(adata, indices)
        parts = {"joint": [], "rna": [], "protein": []}
        with evaluation(self.module, seed):
            for x, cat, cont in data.iterate(idx, batch_size):
                out = self.module(x, cat, cont, kl_weight=1.0)
                parts["joint"].append(out.elbo)
                parts["rna"].append(out.elbo_rna)
                parts["protein"].append(out.elbo_protein)
        return _finish(parts, modality, return_mean)

    def get_marginal_ll(self, adata=None, indices=None, n_samples: int = 1000, batch_size: int = 128,
                        return_mean: bool = True, seed: int | None = None, modality: str = "joint"):
        """Marginal log-likelihood per cell (nats, higher is better) by importance sampling with ``n_samples`` draws
        of ``(z, log beta) ~ q(z | x, y) q(log beta | z)`` (IWAE, Burda et al. 2016; the weights of
        :meth:`cellvae.vae.totalvi.RNAProteinModule.log_importance_weights`).

        Args:
            modality: ``"joint"`` (``log p(x, y)``), ``"rna"`` (``log p(x)``), ``"protein"`` (``log p(y)``) or
                ``"all"`` (a dict of the three from the same draws). Each is a stochastic lower bound whose expectation
                rises with ``n_samples`` towards the true value.
            adata, indices, n_samples, batch_size, return_mean, seed: as :meth:`cellvae.CountVAE.get_marginal_ll`.

        Raises:
            CellvaeInputError: an unknown modality, ``n_samples < 1``, bad ``indices``, and the causes of
                :meth:`get_latent_representation`.
        """
        _check_modality(modality)
        if int(n_samples) < 1:
            raise CellvaeInputError(f"n_samples must be at least 1, got {n_samples}.")
        self.check_trained()
        n_samples = int(n_samples)
        data, idx = self.prepared_cells(adata, indices)
        parts = {"joint": [], "rna": [], "protein": []}
        with evaluation(self.module, seed):
            for x, cat, cont in data.iterate(idx, batch_size):
                per_pass = max(1, min(n_samples, _MAX_ELEMENTS // max(1, x.shape[0] * x.shape[1])))
                acc = {k: torch.full((x.shape[0],), -math.inf, dtype=torch.float64) for k in parts}
                done = 0
                while done < n_samples:
                    s = min(per_pass, n_samples - done)
                    w = self.module.log_importance_weights(x, cat, cont, s)
                    for k in parts:
                        acc[k] = torch.logaddexp(acc[k], torch.logsumexp(w[k].double(), dim=0))
                    done += s
                for k in parts:
                    parts[k].append((acc[k] - math.log(n_samples)).float())
        return _finish(parts, modality, return_mean)

    # ------------------------------------------------------------------------------------------- analyses
    def differential_expression(self, adata=None, groupby: str | None = None, group1=None, group2: str | None = None,
                                mode: str = "vanilla", delta: float = 0.25, fdr_target: float = 0.05,
                                n_samples: int = 5000, protein_prior_count: float = 0.1, **kwargs) -> pd.DataFrame:
        """Bayes-factor differential expression of genes and proteins together (Lopez et al. 2018; Boyeau et al.
        2019), as scvi-tools' ``TOTALVI.differential_expression``: the compared quantity is the decoder's ``rho`` for
        genes and the protein foreground intensity ``(1 - pi) alpha beta`` (counts) plus ``protein_prior_count`` for
        proteins, each drawn from the posterior (one z and one ``log beta`` per draw).

        Returns:
            DataFrame with scvi-tools' columns (``proba_de``, ``proba_not_de``, ``bayes_factor``, ``scale1``,
            ``scale2``, ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max``,
            ``is_de_fdr_<fdr_target>``, ``raw_mean1/2``, ``non_zeros_proportion1/2``, ``raw_normalized_mean1/2``,
            ``comparison``, ``group1``, ``group2``), indexed by the genes and then the proteins as
            ``<protein>_protein``. ``raw_normalized_mean`` is per 10,000 RNA counts for genes and NaN for proteins
            (as scvi-tools). See :func:`cellvae.analysis.de.differential_expression` for every argument.

        Raises:
            CellvaeInputError: as :meth:`cellvae.CountVAE.differential_expression`, and a negative
                ``protein_prior_count``.
        """
        from ..analysis.de import differential_expression

        if not float(protein_prior_count) >= 0:
            raise CellvaeInputError(f"protein_prior_count must be >= 0, got {protein_prior_count}.")
        adata_ = None if adata is None else _as_anndata(adata, self.spec.protein_key)
        view = _JointFeatures(self, float(protein_prior_count))
        df = differential_expression(view, adata_, groupby=groupby, group1=group1, group2=group2, mode=mode,
                                     delta=delta, fdr_target=fdr_target, n_samples=n_samples, **kwargs)
        prot = df.index.isin(view.spec.gene_names[len(self.spec.gene_names):])
        for c in ("raw_normalized_mean1", "raw_normalized_mean2"):
            if c in df.columns:
                df.loc[prot, c] = np.nan
        return df

    def map_query(self, *args, **kwargs):
        """Not available for the RNA + protein model yet.

        Raises:
            CellvaeInputError: always.
        """
        raise CellvaeInputError("map_query (reference mapping) is not available for RNAProteinVAE yet; map the RNA "
                                "with a CountVAE.")

    # -------------------------------------------------------------------------------------------- sampling
    def posterior_predictive_sample(self, adata=None, indices=None, n_samples: int = 1, seed: int = 0,
                                    batch_size: int = 1024, gene_list: Sequence[str] | None = None,
                                    protein_list: Sequence[str] | None = None) -> dict:
        """Counts drawn from the fitted likelihoods with ``z ~ q(z | x, y)`` and ``log beta ~ q(log beta | z)``, as
        scvi-tools' ``TOTALVI.posterior_predictive_sample``.

        Returns:
            ``{"rna": (n_cells, n_genes), "protein": (n_cells, n_proteins)}`` float32 integer-valued arrays, with a
            leading (n_samples,) axis when ``n_samples > 1``.

        Raises:
            CellvaeInputError: ``n_samples < 1``, unknown genes or proteins, bad ``indices``.
        """
        k = int(n_samples)
        if k < 1:
            raise CellvaeInputError(f"n_samples must be >= 1, got {n_samples}.")
        gidx = self._select(gene_list, self.spec.gene_names, "Genes")
        pidx = self._select(protein_list, self.protein_names, "Proteins")
        data, idx = self.prepared_cells(adata, indices)
        rna, prot = [], []
        with evaluation(self.module, seed):
            for x, cat, cont in data.iterate(idx, batch_size):
                inf = self.module.inference(x, cat, cont, n_samples=k)
                gen = self.module.generative(inf["z"], inf["library"], cat, cont)
                r, p = gen["px"].sample(), gen["py"].sample()
                rna.append(r if gidx is None else r[..., torch.as_tensor(gidx)])
                prot.append(p if pidx is None else p[..., torch.as_tensor(pidx)])
        return {"rna": np.round(torch.cat(rna, dim=-2).numpy()).astype(np.float32),
                "protein": np.round(torch.cat(prot, dim=-2).numpy()).astype(np.float32)}

    def sample(self, n_cells: int, covariates: dict | None = None, library_size: float | None = None,
               seed: int = 0, batch_size: int = 1024, **kwargs) -> ad.AnnData:
        """Generate ``n_cells`` new cells from the prior: ``z ~ N(0, I)``, ``log beta`` from the background prior of
        the chosen batch, RNA and protein counts from their likelihoods; library sizes resampled from the training
        cells' RNA totals unless ``library_size`` is given; covariates ``{obs_key: category}`` (default: the most
        frequent training category; :func:`cellvae.analysis.generate.resolve_covariates`).

        Returns:
            AnnData (n_cells, n_genes): RNA counts in ``X`` and ``layers["counts"]``, ``rho`` in
            ``layers["normalized"]``; protein counts in ``obsm[protein_key]`` (a DataFrame), the foreground
            intensity in ``obsm["protein_foreground"]`` and the foreground probability in
            ``obsm["protein_foreground_probability"]``; ``obsm["X_cellvae"]`` the latent codes.

        Raises:
            CellvaeInputError: ``n_cells < 1``, unknown covariates, a bad ``library_size``, no way to choose
                library sizes (no data attached and no ``library_size``).
        """
        from ..analysis.generate import resolve_covariates

        if kwargs:
            raise CellvaeInputError(f"RNAProteinVAE.sample does not take {sorted(kwargs)} (label sampling is not "
                                    "available for this model).")
        n = int(n_cells)
        if n < 1:
            raise CellvaeInputError(f"n_cells must be >= 1, got {n_cells}.")
        if library_size is not None and not (np.isfinite(library_size) and library_size > 0):
            raise CellvaeInputError(f"library_size must be a positive number, got {library_size!r}.")
        self.check_trained()
        codes, values = resolve_covariates(self, covariates)
        rng = np.random.default_rng(seed)
        if library_size is not None:
            lib = np.full(n, float(library_size))
        elif self.adata is not None:
            tot = self.prepared_data().row_sums()
            pos = self.train_indices if self.train_indices is not None else np.arange(len(tot))
            tot = tot[pos]
            lib = rng.choice(tot[tot > 0], size=n, replace=True)
        else:
            raise CellvaeInputError("No training data attached to resample library sizes from: pass library_size=...")
        cat = torch.as_tensor(codes["cat"], dtype=torch.int64).view(1, -1).repeat(n, 1)
        cont = (torch.as_tensor(codes["cont"], dtype=torch.float32).view(1, -1).repeat(n, 1) if codes["cont"]
                else None)
        m = self.module
        outs = {k: [] for k in ("x", "rho", "y", "fg", "fgp")}
        with evaluation(m, seed):
            z = torch.randn(n, m.n_latent)
            log_lib = torch.as_tensor(np.log(lib), dtype=torch.float32).view(-1, 1)
            for a in range(0, n, batch_size):
                sl = slice(a, a + batch_size)
                c, u = cat[sl], cont[sl] if cont is not None else None
                gen = m.rna_generative(z[sl], log_lib[sl], c, u)
                pg = m.protein_generative(z[sl], c, u)
                # log beta from its prior (the cells are not observed: no posterior to draw from)
                log_beta = pg["pb_m"] + pg["pb_v"].sqrt() * torch.randn_like(pg["pb_m"])
                py = type(pg["py"])(log_beta, log_beta + pg["log_alpha"], pg["log_theta"], pg["logit"])
                outs["x"].append(gen["px"].sample())
                outs["rho"].append(gen["rho"])
                outs["y"].append(py.sample())
                outs["fg"].append(py.foreground_probability * py.mu2)
                outs["fgp"].append(py.foreground_probability)
        cat_np = {k: torch.cat(v).numpy().astype(np.float32) for k, v in outs.items()}
        X = np.round(cat_np["x"])
        obs = pd.DataFrame(index=pd.Index([f"generated_{i}" for i in range(n)]))
        obs["library_size"] = lib.astype(np.float32)
        for k, v in values.items():
            obs[k] = pd.Categorical([v] * n) if isinstance(v, str) else v
        out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(self.spec.gene_names)))
        out.layers["counts"] = X.copy()
        out.layers["normalized"] = cat_np["rho"]
        cols = pd.Index(self.protein_names)
        out.obsm[self.spec.protein_key] = pd.DataFrame(np.round(cat_np["y"]), index=obs.index, columns=cols)
        out.obsm["protein_foreground"] = pd.DataFrame(cat_np["fg"], index=obs.index, columns=cols)
        out.obsm["protein_foreground_probability"] = pd.DataFrame(cat_np["fgp"], index=obs.index, columns=cols)
        out.obsm["X_cellvae"] = z.numpy().astype(np.float32)
        out.uns["cellvae_sample"] = {"z": "prior N(0, I)", "background": "prior of the batch", "seed": int(seed),
                                     "covariates": {k: (v if isinstance(v, str) else float(v))
                                                    for k, v in values.items()}}
        return out

    # ---------------------------------------------------------------------------------------- save / load
    def _config(self) -> dict:
        cfg = super()._config()
        cfg["protein_info"] = getattr(self, "protein_info", {})
        return cfg

    @classmethod
    def _from_config(cls, cfg: dict, state: dict, directory: Path, adata=None,
                     out_of_core: bool = False) -> "RNAProteinVAE":
        if out_of_core:
            raise CellvaeInputError("RNAProteinVAE does not read data out of core; load it without out_of_core.")
        self = cls.__new__(cls)
        self.spec = ProteinSpec.from_dict(cfg["data_spec"])
        self.labels_key = cfg.get("labels_key")
        kwargs = cfg["module_kwargs"]
        if not isinstance(kwargs, dict):
            raise TypeError(f"module_kwargs is a {type(kwargs).__name__}, not an object")
        self.settings = build(RNAProteinSettings, None, kwargs, "module_kwargs")
        self.reference = cfg.get("reference")
        self.protein_info = dict(cfg.get("protein_info") or {})
        shape = (self.spec.n_batch, self.spec.n_proteins)
        mask = state.get("protein_batch_mask")
        mean = state.get("background_prior_mean")
        log_scale = state.get("background_prior_log_scale")
        self._protein_init = {
            "mask": mask.numpy() if mask is not None else np.ones(shape, np.float32),
            "mean": mean.numpy() if mean is not None else np.zeros(shape, np.float32),
            "scale": np.exp(log_scale.numpy()) if log_scale is not None else np.ones(shape, np.float32)}
        self.module = self._build_module()
        return self

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata=None, out_of_core: bool = False) -> "RNAProteinVAE":
        """Load a model saved by :meth:`save`; ``adata`` (an AnnData with ``obsm[protein_key]`` or a MuData) is
        attached as in :meth:`cellvae.CountVAE.load`.

        Raises:
            CellvaeInputError: as :meth:`cellvae.CountVAE.load`, and the protein errors of the constructor.
        """
        return super().load(dir_path, adata=adata, out_of_core=out_of_core)

    def _after_load(self, directory: Path, cfg: dict, adata=None, out_of_core: bool = False) -> None:
        if adata is not None:
            adata = _as_anndata(adata, self.spec.protein_key)
            self.spec.protein_values(adata)  # fail early on missing proteins
        super()._after_load(directory, cfg, adata=adata, out_of_core=out_of_core)

    def __repr__(self) -> str:
        k = self.settings
        return (f"RNAProteinVAE({len(self.spec.gene_names)} genes, {self.spec.n_proteins} proteins, "
                f"n_latent={k.n_latent}, n_hidden={k.n_hidden}, n_layers={k.n_layers}, "
                f"gene_likelihood={k.gene_likelihood!r}, n_batch={self.spec.n_batch}, trained={self.is_trained})")


# ---------------------------------------------------------------------------------------------------- helpers
def _as_anndata(adata, protein_key: str):
    """An AnnData for the model: a MuData is converted (:func:`cellvae.data.protein.mudata_to_anndata`).

    Raises:
        CellvaeInputError: neither an AnnData nor a MuData.
    """
    if is_mudata(adata):
        return mudata_to_anndata(adata, protein_key=protein_key)
    if not isinstance(adata, ad.AnnData):
        raise CellvaeInputError(f"RNAProteinVAE needs an AnnData (with obsm[{protein_key!r}]) or a MuData with 'rna' "
                                f"and 'prot' modalities, got {type(adata).__name__}.")
    return adata


def _isotype_names(isotype_controls, names: list[str]) -> list[str]:
    """The isotype controls: found by name (``"auto"``), none (None), or the given names (checked).

    Raises:
        CellvaeInputError: given names that are not proteins of the data.
    """
    if isotype_controls is None:
        return []
    if isinstance(isotype_controls, str) and isotype_controls == "auto":
        return find_isotype_controls(names)
    given = [isotype_controls] if isinstance(isotype_controls, str) else [str(n) for n in isotype_controls]
    missing = [n for n in given if n not in names]
    if missing:
        raise CellvaeInputError(f"isotype_controls {missing} are not proteins of the data: {names}.")
    return given


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise CellvaeInputError(f"modality must be one of {MODALITIES}, got {modality!r}.")


def _finish(parts: dict, modality: str, return_mean: bool):
    arrays = {k: torch.cat(v).numpy().astype(np.float32) for k, v in parts.items()}
    vals = {k: float(np.mean(a, dtype=np.float64)) if return_mean else a for k, a in arrays.items()}
    return vals if modality == "all" else vals[modality]


class _JointExpression(nn.Module):
    """The joint module as the Bayes-factor DE sees it (:mod:`cellvae.analysis.de`): ``generative(...)["rho"]`` is
    the genes' ``rho`` followed by the proteins' foreground intensity plus a prior count (one ``log beta`` draw)."""

    def __init__(self, module: RNAProteinModule, prior_count: float):
        super().__init__()
        self.inner = module
        self.prior_count = prior_count
        self.likelihood = module.likelihood
        self.n_latent = module.n_latent

    def inference(self, x, cat, cont=None, n_samples: int = 1) -> dict:
        return self.inner.inference(x, cat, cont, n_samples)

    def generative(self, z, library, cat, cont=None) -> dict:
        gen = self.inner.generative(z, library, cat, cont)
        return {"rho": torch.cat([gen["rho"], gen["foreground_mean"] + self.prior_count], -1)}


class _JointFeatures:
    """The public model protocol (:class:`cellvae.analysis.protocol.TrainedModel`) of a joint model whose features
    are its genes and then its proteins (named ``<protein>_protein``)."""

    def __init__(self, model: RNAProteinVAE, prior_count: float):
        self.model = model
        self.module = _JointExpression(model.module, prior_count)
        names = list(model.spec.gene_names) + [p + PROTEIN_SUFFIX for p in model.protein_names]
        self.spec = dataclasses.replace(model.spec, gene_names=names)
        self.adata, self.labels_key = model.adata, model.labels_key
        self.train_indices, self.validation_indices = model.train_indices, model.validation_indices

    def check_trained(self) -> None:
        self.model.check_trained()

    def prepared_data(self, adata=None):
        return self.model.prepared_data(adata)

    def prepared_cells(self, adata=None, indices=None):
        return self.model.prepared_cells(adata, indices)

    def get_latent_representation(self, adata=None, give_mean: bool = True, batch_size: int = 1024):
        return self.model.get_latent_representation(adata, give_mean, batch_size)
