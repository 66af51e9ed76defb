"""A joint RNA + surface-protein count VAE of the totalVI class (Gayoso et al. 2021, Nat. Methods 18:272) as a pure
torch module.

Generative model for cell n with batch s (Methods of the paper; our own implementation):

- ``z_n ~ N(0, I)`` (n_latent): one latent space for both modalities;
- RNA, as scVI (:class:`cellvae.vae.module.VAEModule`): ``rho_n = softmax(f_rho(z_n, s_n))``,
  ``x_ng ~ NB(l_n rho_ng, theta_g)`` (or ZINB / Poisson), ``l_n`` the observed RNA library size;
- protein background: ``log beta_nt ~ N(c_st, d_st^2)``, a prior per batch and protein whose mean and scale are
  learned, starting from values estimated from the data (:mod:`cellvae.data.protein`);
- protein foreground: ``alpha_nt = 1 + softplus(f_alpha(z_n, s_n))`` (>= 1, so the foreground mean
  ``alpha beta`` is a scaled-up background), background probability ``pi_nt = sigmoid(f_pi(z_n, s_n))``;
- ``y_nt ~ pi_nt NB(beta_nt, phi_t) + (1 - pi_nt) NB(alpha_nt beta_nt, phi_t)``
  (:class:`cellvae.vae.nb_mixture.NegativeBinomialMixture`), ``phi_t`` per protein (or per protein and batch).

Inference: ``q(z | x, y) = N(m, diag v)`` of ``[log1p(x), log1p(y / (1 + mean_t y_t))]`` (observed proteins only)
and ``q(log beta_nt | z, s) = N(a_t(z, s), b_t(z, s)^2)`` (amortized through z, as totalVI). The ELBO is

    E_q[log p(x | z) + sum_t m_st log p(y_t | z, beta_t)] - KL(q(z | x, y) || p(z)) - sum_t m_st KL(q(beta_t) || p(beta_t))

where ``m_st`` is the protein mask of the batch: a protein absent from a batch's panel (:func:`cellvae.data.protein.
protein_batch_mask`) contributes nothing, rather than being modelled as zero counts. Every log-likelihood is in nats
per cell.

Tensors passed in: ``x`` (n_cells, n_genes + n_proteins) float counts, RNA first; ``cat`` (n_cells, 1 +
n_cat_covariates) int64 codes, batch first; ``cont`` (n_cells, n_cont) or None. One concatenated matrix keeps the
training loop (:func:`cellvae.train.train_module`) and the prepared-data interface generic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.sparse import csr_rows, csr_tensor
from ..errors import CellvaeInputError
from ..native import ops
from ..settings import PROTEIN_DISPERSIONS, ModelSettings, build
from .likelihoods import get_likelihood
from .module import LossOutput, VAEModule, _row_sums
from .nb_mixture import NegativeBinomialMixture, log_nb_mixture, protein_elbo_terms, protein_elbo_terms_native
from .nn import Encoder, FCLayers

__all__ = ["RNAProteinModule", "RNAProteinLossOutput"]

_LOG_2PI = math.log(2.0 * math.pi)
_SCALE_EPS = 1e-4  # floor of the standard deviation of q(log beta | z)
_NATIVE_INPUT_MODES = {"log1p": 0, "log1p_cp10k": 1, "log1p_mean": 2}  # encoder_input -> cv_joint_split's scale_mode


@dataclass
class RNAProteinLossOutput(LossOutput):
    """:class:`cellvae.vae.module.LossOutput` with the parts of each modality (nats per cell, (n_cells,)).

    Attributes:
        reconstruction_loss_rna: ``-log p(x | z)``.
        reconstruction_loss_protein: ``-sum_t m_st log p(y_t | z, beta_t)``.
        kl_z: ``KL(q(z | x, y) || p(z))``.
        kl_background: ``sum_t m_st KL(q(log beta_t | z) || p(log beta_t))``.

    ``reconstruction_loss`` is the sum of the two reconstruction losses and ``kl_local`` of the two KL terms, so
    ``elbo`` is the joint ELBO; :attr:`elbo_rna` and :attr:`elbo_protein` bound ``log p(x)`` and ``log p(y)``.
    """

    reconstruction_loss_rna: torch.Tensor | None = None
    reconstruction_loss_protein: torch.Tensor | None = None
    kl_z: torch.Tensor | None = None
    kl_background: torch.Tensor | None = None

    @property
    def elbo_rna(self) -> torch.Tensor:
        """(n_cells,) ``E_q[log p(x | z)] - KL(q(z) || p(z))``: a lower bound of the RNA marginal ``log p(x)``."""
        return -(self.reconstruction_loss_rna + self.kl_z)

    @property
    def elbo_protein(self) -> torch.Tensor:
        """(n_cells,) ``E_q[log p(y | z, beta)] - KL(q(z) || p(z)) - KL(q(beta) || p(beta))``: a lower bound of the
        protein marginal ``log p(y)``."""
        return -(self.reconstruction_loss_protein + self.kl_z + self.kl_background)


class RNAProteinModule(VAEModule):
    """totalVI: the scVI module for the RNA with a protein decoder and a shared latent space (module docstring).

    The RNA half is :class:`cellvae.vae.module.VAEModule` (its decoder, dispersion, fused training likelihood and
    adversary); the encoder reads genes and proteins.

    Args:
        n_genes: number of genes (the first columns of ``x``).
        n_proteins: number of proteins (the last columns).
        n_batch, n_cats_per_cov, n_continuous_cov: covariates, as :class:`VAEModule`.
        protein_batch_mask: (n_batch, n_proteins) 0/1, 1 where the protein is measured in the batch (None: all).
        background_prior_mean, background_prior_scale: (n_batch, n_proteins) initial mean and standard deviation of
            the prior of ``log beta`` (log counts); None: mean 3, scale 1 (scvi-tools' default without data).
        settings, **kwargs: a :class:`cellvae.settings.ModelSettings` (an ``RNAProteinSettings``) or keywords:
            ``protein_dispersion`` (``"protein"`` or ``"protein-batch"``) and the scVI settings. The library size
            is the observed RNA total, and the gene likelihood a count one.

    Raises:
        CellvaeInputError: ``gene_likelihood="normal"``, a latent library size, a linear decoder, masks or priors
            of the wrong shape, an unknown ``protein_dispersion``, and the errors of :class:`VAEModule`.
    """

    def __init__(self, n_genes: int, n_proteins: int, n_batch: int = 1, n_cats_per_cov: tuple[int, ...] = (),
                 n_continuous_cov: int = 0, protein_batch_mask=None, background_prior_mean=None,
                 background_prior_scale=None, settings: ModelSettings | None = None, **kwargs):
        s = build(ModelSettings, settings, kwargs, "RNAProteinModule settings")
        if not get_likelihood(s.gene_likelihood).models_counts:
            raise CellvaeInputError("The RNA + protein model needs a count gene likelihood ('nb', 'zinb' or "
                                    f"'poisson'), not {s.gene_likelihood!r}.")
        if not s.use_observed_lib_size:
            raise CellvaeInputError("The RNA + protein model uses the observed RNA library size: leave "
                                    "use_observed_lib_size=True.")
        super().__init__(n_genes, n_batch, n_cats_per_cov, n_continuous_cov, None, None, s)
        if getattr(self, "linear_decoder", False):
            raise CellvaeInputError("The RNA + protein model has no linear decoder: use decoder='nonlinear'.")
        protein_dispersion = getattr(s, "protein_dispersion", "protein")
        if protein_dispersion not in PROTEIN_DISPERSIONS:
            raise CellvaeInputError(f"protein_dispersion must be one of {PROTEIN_DISPERSIONS}, got "
                                    f"{protein_dispersion!r}.")
        self.n_genes, self.n_proteins = int(n_genes), int(n_proteins)
        if self.n_proteins < 1:
            raise CellvaeInputError("The RNA + protein model needs at least one protein.")
        self.protein_dispersion = protein_dispersion
        nb, P = self.n_batch, self.n_proteins

        n_cats = (nb, *[int(n) for n in n_cats_per_cov])
        enc_cats = n_cats if s.encode_covariates else ()
        enc_cont = n_continuous_cov if s.encode_covariates else 0
        bn_enc = s.use_batch_norm in ("both", "encoder")
        ln_enc = s.use_layer_norm in ("both", "encoder")
        bn_dec = s.use_batch_norm in ("both", "decoder")
        ln_dec = s.use_layer_norm in ("both", "decoder")
        deep = s.deeply_inject_covariates
        # The encoder reads genes and proteins (the VAEModule's reads the genes only: replaced).
        self.z_encoder = Encoder(self.n_genes + P, s.n_latent, enc_cats, enc_cont, s.n_layers, s.n_hidden,
                                 s.dropout_rate, bn_enc, ln_enc, deep)
        self.protein_decoder = FCLayers(s.n_latent, s.n_hidden, n_cats, n_continuous_cov, s.n_layers, s.n_hidden,
                                        s.dropout_rate_decoder, bn_dec, ln_dec, deep)
        h = s.n_hidden + s.n_latent  # the heads read the hidden layer and z (totalVI's skip connection)
        self.background_mean = nn.Linear(h, P)
        self.background_scale = nn.Linear(h, P)
        self.foreground_scale = nn.Linear(h, P)
        self.background_logit = nn.Linear(h, P)
        self.py_r = nn.Parameter(torch.zeros(P) if protein_dispersion == "protein" else torch.zeros(nb, P))

        mask = np.ones((nb, P), np.float32) if protein_batch_mask is None else \
            np.asarray(protein_batch_mask, dtype=np.float32)
        mean = np.full((nb, P), 3.0, np.float32) if background_prior_mean is None else \
            np.asarray(background_prior_mean, dtype=np.float32)
        scale = np.ones((nb, P), np.float32) if background_prior_scale is None else \
            np.asarray(background_prior_scale, dtype=np.float32)
        for name, arr in (("protein_batch_mask", mask), ("background_prior_mean", mean),
                          ("background_prior_scale", scale)):
            if arr.shape != (nb, P) or not np.isfinite(arr).all():
                raise CellvaeInputError(f"{name} must be finite with shape (n_batch, n_proteins) = {(nb, P)}, got "
                                        f"{arr.shape}.")
        if (scale <= 0).any():
            raise CellvaeInputError("background_prior_scale must be positive.")
        self.register_buffer("protein_batch_mask", torch.as_tensor(mask))
        self.background_prior_mean = nn.Parameter(torch.as_tensor(mean))
        self.background_prior_log_scale = nn.Parameter(torch.log(torch.as_tensor(scale)))
        with torch.no_grad():  # q(log beta | z) starts at the prior: the heads' biases, averaged over batches
            self.background_mean.bias.copy_(self.background_prior_mean.mean(0))
            self.background_scale.bias.copy_(_softplus_inverse(torch.as_tensor(scale).mean(0).clamp(min=0.05)))

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def sparse_input(self) -> bool:
        """Whether :meth:`forward` takes its minibatches as sparse CSR tensors (genes, then proteins) without
        densifying the genes: the fast RNA likelihood with ``use_sparse_counts``, as :class:`VAEModule`. The
        protein block is made dense (it is small and mostly non-zero) and the encoder reads one CSR input."""
        return self.use_sparse_counts and self.fast_likelihood

    def dispersion_parameters(self) -> list[nn.Parameter]:
        """The gene and protein log inverse dispersions (``px_r`` when the gene likelihood has one, and ``py_r``):
        the training loop gives them their own learning rate (``TrainSettings.dispersion_lr_multiplier``)."""
        return [*super().dispersion_parameters(), self.py_r]

    @torch.no_grad()
    def init_decoder_bias(self, gene_totals) -> bool:
        """:meth:`VAEModule.init_decoder_bias` on the genes: ``gene_totals`` of length n_genes, or n_genes +
        n_proteins (the proteins' entries are ignored)."""
        t = np.asarray(gene_totals, dtype=np.float64).ravel()
        return super().init_decoder_bias(t[: self.n_genes] if len(t) == self.n_genes + self.n_proteins else t)

    # ----------------------------------------------------------------------------------------------- tensors
    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rna, protein)``: the (n, n_genes) and (n, n_proteins) column blocks of ``x`` (dense or sparse CSR;
        returned dense and contiguous; :meth:`_blocks` keeps a CSR x's genes sparse).

        Raises:
            ValueError: ``x`` does not have n_genes + n_proteins columns.
        """
        if x.shape[-1] != self.n_genes + self.n_proteins:
            raise ValueError(f"x has {x.shape[-1]} columns, expected {self.n_genes} genes + {self.n_proteins} "
                             "proteins.")
        if x.layout == torch.sparse_csr:
            x = x.to_dense()
        return x[..., : self.n_genes].contiguous(), x[..., self.n_genes:].contiguous()

    def _blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """``(rna, protein, joint)``: :meth:`split` with a CSR RNA block for a CSR ``x``, and ``joint = (x, rows of
        its entries, positions of its protein entries, their flat (n, n_proteins) index)`` (None for a dense x),
        from which :meth:`_inference` makes the encoder input without building a new sparsity structure."""
        if x.layout != torch.sparse_csr or x.shape[-1] != self.n_genes + self.n_proteins:
            return *self.split(x), None  # split raises for the wrong number of columns
        rna, y, rows, p_idx, flat = _split_csr(x, self.n_genes, self.n_proteins)
        return rna, y, (x, rows, p_idx, flat)

    def protein_mask(self, cat: torch.Tensor) -> torch.Tensor:
        """(n_cells, n_proteins) 0/1 mask of the proteins measured in each cell's batch."""
        return self.protein_batch_mask[cat[:, 0]]

    def _protein_encoder_input(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``log1p(y / (1 + mean_t y_t))`` over the observed proteins (totalVI's scaling), 0 for missing ones."""
        y = y * mask
        mean = y.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        return torch.log1p(y / (1.0 + mean)) * mask

    # -------------------------------------------------------------------------------------------- inference
    def inference(self, x: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor | None = None,
                  n_samples: int = 1) -> dict:
        """Encode a minibatch of RNA and protein counts.

        Args:
            x: (n_cells, n_genes + n_proteins) counts, RNA first.
            cat, cont: covariates (batch first).
            n_samples: number of z samples; > 1 adds a leading sample axis.

        Returns:
            dict with ``qz_m``, ``qz_v`` (n_cells, n_latent), ``z`` ((n_samples,) n_cells, n_latent) and ``library``
            ((n_samples,) n_cells, 1), the log RNA library size.
        """
        fast = self._native_split(x, cat)
        if fast is not None:
            return self._encode(fast[2], fast[3], cat, cont, n_samples)
        return self._inference(*self._blocks(x), cat, cont, n_samples)

    def _inference(self, rna: torch.Tensor, y: torch.Tensor, joint: tuple | None, cat: torch.Tensor,
                   cont: torch.Tensor | None, n_samples: int = 1) -> dict:
        """:meth:`inference` on the blocks of :meth:`_blocks`."""
        pin = self._protein_encoder_input(y, self.protein_mask(cat))
        lib = _row_sums(rna).clamp(min=1.0)  # (n, 1) RNA library sizes
        if joint is None:
            x_in = torch.cat([self._encoder_input(rna), pin], -1)
        else:  # the CSR x with its values transformed: genes as VAEModule's encoder input, proteins by pin
            x, rows, p_idx, flat = joint
            val = x.values()
            scale = self.input_scale(lib, self.n_genes)
            if scale is not None:
                val = val * scale.view(-1).take(rows)
            val = torch.log1p(val).index_copy(0, p_idx, pin.reshape(-1).take(flat))
            x_in = csr_tensor(x.crow_indices(), x.col_indices(), val, x.shape)
        return self._encode(x_in, lib, cat, cont, n_samples)

    def _encode(self, x_in: torch.Tensor, lib: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor | None,
                n_samples: int = 1) -> dict:
        """The encoder on its input ``x_in`` (n, n_genes + n_proteins) and the (n, 1) RNA library sizes ``lib``:
        :meth:`inference`'s dict."""
        ecat = cat if self.encode_covariates else None
        econt = cont if self.encode_covariates else None
        qz_m, qz_v = self.z_encoder(x_in, ecat, econt)
        shape = (n_samples, *qz_m.shape) if n_samples > 1 else qz_m.shape
        z = qz_m + qz_v.sqrt() * torch.randn(shape, dtype=qz_m.dtype, device=qz_m.device)
        library = torch.log(lib)
        if n_samples > 1:
            library = library.expand(n_samples, *library.shape)
        return {"qz_m": qz_m, "qz_v": qz_v, "z": z, "library": library}

    def _native_split(self, x: torch.Tensor, cat: torch.Tensor) -> tuple | None:
        """``(rna CSR, protein (n, n_proteins), encoder input CSR, lib (n, 1))`` of a CSR minibatch by the C kernel
        :func:`cellvae.native.ops.joint_split` (one call instead of about fifty small operators; the same values
        as :meth:`_blocks` and :meth:`_inference`'s input within float32 rounding), or None where it does not
        apply (dense x, no compiler, not float32 / int64 CPU tensors)."""
        if x.layout != torch.sparse_csr or x.shape[-1] != self.n_genes + self.n_proteins:
            return None
        crow, col, val = x.crow_indices(), x.col_indices(), x.values()
        batch = cat[:, 0].contiguous()
        if crow.dtype != torch.int64 or not ops.applies(crow, col, val, batch, self.protein_batch_mask):
            return None
        mode = _NATIVE_INPUT_MODES.get(self.encoder_input)
        if mode is None:
            return None
        g_crow, g_col, g_val, y, lib, enc = ops.joint_split(crow, col, val, self.n_genes, self.n_proteins, batch,
                                                            self.protein_batch_mask, mode)
        return (csr_tensor(g_crow, g_col, g_val, (x.shape[0], self.n_genes)), y,
                csr_tensor(crow, col, enc, x.shape), lib)

    # ------------------------------------------------------------------------------------------- generative
    def _heads(self, z: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor | None) -> tuple:
        """``(heads, batch, log theta)`` for z of shape (n_cells, n_latent): the (n_cells, 4 n_proteins) outputs
        ``[mean, scale, foreground scale, logit]`` of the four protein heads in one product (one autograd node; the
        parameters stay the four nn.Linear's), the cells' batch codes and the protein log inverse dispersion."""
        hz = torch.cat([self.protein_decoder(z, cat, cont), z], -1)
        heads = (self.background_mean, self.background_scale, self.foreground_scale, self.background_logit)
        h = F.linear(hz, torch.cat([m.weight for m in heads]), torch.cat([m.bias for m in heads]))
        b = cat[:, 0]
        return h, b, self.py_r if self.protein_dispersion == "protein" else self.py_r[b]

    def protein_generative(self, z: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor | None = None,
                           sample_background: bool = True) -> dict:
        """The protein half of the generative model.

        Args:
            z: (n_cells, n_latent) or (n_samples, n_cells, n_latent).
            cat, cont: covariates of the n_cells.
            sample_background: draw ``log beta ~ q(log beta | z)`` (True) or take its mean (False).

        Returns:
            dict of (..., n_cells, n_proteins) tensors: ``py`` (the :class:`NegativeBinomialMixture`),
            ``log_background`` (the drawn or mean ``log beta``), ``qb_m``, ``qb_v`` (mean and variance of
            ``q(log beta | z)``), ``pb_m``, ``pb_v`` (the prior of the cells' batches), ``foreground_probability``
            (``1 - pi``) and ``foreground_mean`` (``(1 - pi) alpha beta``: the denoised protein expression, counts).
        """
        lead = z.shape[:-2]
        n = z.shape[-2]
        if lead:
            s = int(np.prod(lead))
            z = z.reshape(s * n, -1)
            cat = cat.repeat(s, 1)
            cont = cont.repeat(s, 1) if cont is not None else None
        h, b, log_theta = self._heads(z, cat, cont)
        qb_m, qb_s, fg_s, logit = h.split(self.n_proteins, -1)
        qb_sd = F.softplus(qb_s) + _SCALE_EPS
        log_beta = qb_m + qb_sd * torch.randn_like(qb_m) if sample_background else qb_m
        log_alpha = torch.log1p(F.softplus(fg_s))
        out = {"log_background": log_beta, "qb_m": qb_m, "qb_v": qb_sd * qb_sd,
               "pb_m": self.background_prior_mean[b], "pb_v": torch.exp(2.0 * self.background_prior_log_scale[b]),
               "log_alpha": log_alpha, "logit": logit,
               "log_theta": log_theta.expand_as(qb_m) if self.protein_dispersion == "protein" else log_theta}
        if lead:
            out = {k: v.reshape(*lead, n, -1) for k, v in out.items()}
        out["py"] = NegativeBinomialMixture(out["log_background"], out["log_background"] + out["log_alpha"],
                                            out["log_theta"], out["logit"])
        out["foreground_probability"] = out["py"].foreground_probability
        out["foreground_mean"] = out["foreground_probability"] * out["py"].mu2
        return out

    def rna_generative(self, z: torch.Tensor, library: torch.Tensor, cat: torch.Tensor,
                       cont: torch.Tensor | None = None) -> dict:
        """The RNA half of the generative model: :meth:`VAEModule.generative` (``px`` and ``rho`` of the genes)."""
        return super().generative(z, library, cat, cont)

    def generative(self, z: torch.Tensor, library: torch.Tensor, cat: torch.Tensor,
                   cont: torch.Tensor | None = None) -> dict:
        """:meth:`VAEModule.generative` (``px`` and ``rho`` of the genes) plus :meth:`protein_generative` (``py``,
        ``foreground_probability``, ``foreground_mean``, ...), for z of shape ((n_samples,) n_cells, n_latent)."""
        out = super().generative(z, library, cat, cont)
        out.update(self.protein_generative(z, cat, cont))
        return out

    # ------------------------------------------------------------------------------------------------- loss
    def protein_terms(self, y: torch.Tensor, z: torch.Tensor, cat: torch.Tensor,
                      cont: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(log p(y | z, beta), KL(q(beta) || p(beta)), protein_generative output)`` per cell (nats), masked
        by the cells' batches; z of shape ((n_samples,) n_cells, n_latent)."""
        gen = self.protein_generative(z, cat, cont)
        mask = self.protein_mask(cat)
        ll = log_nb_mixture(y, gen["log_background"], gen["log_background"] + gen["log_alpha"], gen["log_theta"],
                            gen["logit"])
        kl = 0.5 * (torch.log(gen["pb_v"] / gen["qb_v"]) + (gen["qb_v"] + (gen["qb_m"] - gen["pb_m"]) ** 2)
                    / gen["pb_v"] - 1.0)
        return (ll * mask).sum(-1), (kl * mask).sum(-1), gen

    def _protein_loss_terms(self, y: torch.Tensor, z: torch.Tensor, cat: torch.Tensor,
                            cont: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first two outputs of :meth:`protein_terms` for z of shape (n_cells, n_latent), through the fused
        :func:`cellvae.vae.nb_mixture.protein_elbo_terms` (one autograd node after the heads; the same draws of
        ``log beta``), or its C kernel :func:`cellvae.vae.nb_mixture.protein_elbo_terms_native` where that applies."""
        h, b, log_theta = self._heads(z, cat, cont)
        eps = torch.randn(h.shape[0], self.n_proteins, dtype=h.dtype, device=h.device)
        fast = protein_elbo_terms_native(y, h, eps, self.py_r, b, self.background_prior_mean,
                                         self.background_prior_log_scale, self.protein_batch_mask, _SCALE_EPS)
        if fast is not None:
            return fast
        return protein_elbo_terms(y, h, eps, log_theta, self.background_prior_mean[b],
                                  self.background_prior_log_scale[b], self.protein_mask(cat), _SCALE_EPS)

    def forward(self, x: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor | None = None,
                kl_weight: float = 1.0) -> RNAProteinLossOutput:
        """Inference, generative pass and negative ELBO (module docstring) for one minibatch, one sample of z and
        of ``log beta``; the KL terms are weighted by ``kl_weight`` in ``loss`` (KL warm-up).

        Returns:
            :class:`RNAProteinLossOutput` (per-cell parts in nats).
        """
        if x.layout == torch.sparse_csr and not self.sparse_input:
            x = x.to_dense()
        fast = self._native_split(x, cat)
        if fast is not None:
            rna, y, x_in, lib = fast
            inf = self._encode(x_in, lib, cat, cont)
        else:
            rna, y, joint = self._blocks(x)
            inf = self._inference(rna, y, joint, cat, cont)
        recon_rna = self.reconstruction(rna, inf, cat, cont)
        ll_prot, kl_b = self._protein_loss_terms(y, inf["z"], cat, cont)
        qz_m, qz_v = inf["qz_m"], inf["qz_v"]
        kl_z = 0.5 * (qz_v + qz_m * qz_m - 1.0 - torch.log(qz_v)).sum(-1)
        recon_prot = -ll_prot
        loss = (recon_rna + recon_prot + kl_weight * (kl_z + kl_b)).mean()
        adv = None
        if self.adversarial_batch_weight > 0:
            adv = self._adversarial_loss(qz_m, cat[:, 0])
            loss = loss + self.adversarial_batch_weight * adv
        return RNAProteinLossOutput(loss=loss, reconstruction_loss=recon_rna + recon_prot, kl_local=kl_z + kl_b,
                                    adversarial_loss=adv, reconstruction_loss_rna=recon_rna,
                                    reconstruction_loss_protein=recon_prot, kl_z=kl_z, kl_background=kl_b)

    # ---------------------------------------------------------------------------------- marginal likelihood
    def log_importance_weights(self, x: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor | None,
                               n_samples: int) -> dict:
        """(n_samples, n_cells) log importance weights of the joint and of each modality, with ``(z, log beta) ~
        q(z | x, y) q(log beta | z)`` as the proposal (IWAE, Burda et al. 2016):

        - ``joint``: ``log p(x | z) + log p(y | z, beta) + log p(z) + log p(beta) - log q(z) - log q(beta)``;
        - ``rna``: ``log p(x | z) + log p(z) - log q(z)`` (beta integrates out);
        - ``protein``: ``log p(y | z, beta) + log p(z) + log p(beta) - log q(z) - log q(beta)``.

        ``logsumexp`` over the samples minus ``log n_samples`` estimates ``log p(x, y)``, ``log p(x)`` and ``log p(y)``
        (each a stochastic lower bound whose expectation rises with n_samples). Masked proteins are left out.
        """
        rna, y = self.split(x)
        inf = self.inference(x, cat, cont, n_samples=n_samples)
        z, library = inf["z"], inf["library"]
        if n_samples == 1:
            z, library = z.unsqueeze(0), library.unsqueeze(0)
        gen = self.generative(z, library, cat, cont)
        log_px = gen["px"].log_prob(rna).sum(-1)
        mask = self.protein_mask(cat)
        log_py = (gen["py"].log_prob(y) * mask).sum(-1)
        log_pb = (_log_normal(gen["log_background"], gen["pb_m"], gen["pb_v"]) * mask).sum(-1)
        log_qb = (_log_normal(gen["log_background"], gen["qb_m"], gen["qb_v"]) * mask).sum(-1)
        log_pz = _log_normal(z, torch.zeros(()), torch.ones(())).sum(-1)
        log_qz = _log_normal(z, inf["qz_m"], inf["qz_v"]).sum(-1)
        return {"joint": log_px + log_py + log_pz + log_pb - log_qz - log_qb, "rna": log_px + log_pz - log_qz,
                "protein": log_py + log_pz + log_pb - log_qz - log_qb}


def _split_csr(x: torch.Tensor, n_genes: int, n_proteins: int) -> tuple:
    """``(CSR (n, n_genes) genes, dense (n, n_proteins) proteins, row of each entry of x, positions of the protein
    entries in x, their flat index in the dense block)`` of a CSR (n, n_genes + n_proteins) tensor whose rows hold
    their columns in ascending order (the gene entries of a row are a prefix of it)."""
    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    n = x.shape[0]
    rows = csr_rows(x)
    is_p = col >= n_genes
    p_idx = torch.nonzero(is_p).squeeze(1)
    g_idx = torch.nonzero(~is_p).squeeze(1)
    flat = rows.index_select(0, p_idx) * n_proteins + col.index_select(0, p_idx) - n_genes
    y = torch.zeros(n * n_proteins, dtype=val.dtype, device=val.device).index_copy_(0, flat, val.index_select(0, p_idx))
    g_crow = torch.zeros(n + 1, dtype=crow.dtype, device=crow.device)
    g_crow[1:] = torch.cumsum(crow.diff() - torch.bincount(rows.index_select(0, p_idx), minlength=n), 0)
    return (csr_tensor(g_crow, col.index_select(0, g_idx), val.index_select(0, g_idx), (n, n_genes)),
            y.view(n, n_proteins), rows, p_idx, flat)


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var) element-wise (nats)."""
    return -0.5 * (_LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0)."""
    return y + torch.log(-torch.expm1(-y))
