"""The scVI generative model as a pure torch module (no AnnData).

Generative model (Lopez et al. 2018, Nat. Methods 15:1053, Methods):

- ``z_n ~ N(0, I)`` (n_latent), library ``l_n`` observed (``log sum_g x_ng``) or ``log l_n ~ N(mu_s, sigma_s^2)``
  with the per-batch mean and variance of the training data's log library size;
- ``rho_n = softmax(f(z_n, s_n))`` (normalized expression, sums to 1 over genes), ``mu_ng = l_n rho_ng``;
- ``x_ng ~ ZINB(mu_ng, theta_g, pi_ng)`` (or NB, Poisson); ``theta`` per gene, per gene and batch, or per gene
  and cell.
- ``gene_likelihood="normal"``: ``x`` is log1p-normalized expression and ``x_ng ~ N(f(z_n, s_n)_g, sigma_g^2)``.

Inference: ``q(z | x) = N(m(log1p x), diag v(log1p x))`` (and ``q(log l | x)`` when the library is latent),
sampled with the reparameterization trick (Kingma & Welling 2014).

Tensors passed in: ``x`` (n_cells, n_genes) float counts; ``cat`` (n_cells, 1 + n_cat_covariates) int64 codes
whose first column is the batch; ``cont`` (n_cells, n_cont) float or None.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .losses import count_log_prob_sum, linear_softmax_count_log_prob_sum
from ..data.sparse import csr_rows, csr_tensor
from .likelihoods import FUSED_POISSON, get_likelihood
from .nn import DecoderSCVI, Encoder, LinearDecoderSCVI
from ..errors import CellvaeInputError
from ..settings import ModelSettings, build

__all__ = ["VAEModule", "LossOutput", "evaluation", "grad_reverse"]


@dataclass
class LossOutput:
    """Loss parts of one minibatch.

    Attributes:
        loss: scalar to minimise: mean over cells of ``reconstruction_loss + kl_weight * kl_z + kl_library``
            (plus ``adversarial_batch_weight * adversarial_loss`` when the module has a batch adversary).
        reconstruction_loss: (n_cells,) ``-log p(x | z, l)`` in nats per cell.
        kl_local: (n_cells,) ``KL(q(z|x) || p(z)) + KL(q(l|x) || p(l))`` in nats per cell (unweighted).
        adversarial_loss: scalar cross-entropy (nats per cell) of the latent batch classifier, or None.
        classification_loss: for a module with a label classifier (:class:`cellvae.vae.scanvi.LabelTransferModule`)
            in eval mode, (n_cells,) class-weighted cross-entropy of ``q(y | z)`` in nats (0 for cells without a
            label), detached; None on training steps and for other modules. ``loss`` adds ``classification_ratio *
            (sum of the labelled cells' weighted cross-entropies) / (sum of their class weights)``.
        classification_weight: (n_cells,) class weight of each labelled cell (0 without a label), when
            ``classification_loss`` is given; else None.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    kl_local: torch.Tensor
    adversarial_loss: torch.Tensor | None = None
    classification_loss: torch.Tensor | None = None
    classification_weight: torch.Tensor | None = None

    @property
    def elbo(self) -> torch.Tensor:
        """(n_cells,) evidence lower bound, nats per cell (higher is better)."""
        return -(self.reconstruction_loss + self.kl_local)


class _GradientReversal(torch.autograd.Function):
    """Identity forward; gradient multiplied by -1 backward (Ganin & Lempitsky 2015, ICML, "Unsupervised domain
    adaptation by backpropagation")."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def grad_reverse(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, with its gradient reversed (see :class:`_GradientReversal`)."""
    return _GradientReversal.apply(x)


def _kl_normal(m: torch.Tensor, v: torch.Tensor, pm, pv) -> torch.Tensor:
    """KL(N(m, v) || N(pm, pv)) summed over the last axis (nats)."""
    return 0.5 * (torch.log(pv / v) + (v + (m - pm) ** 2) / pv - 1.0).sum(-1)


class VAEModule(nn.Module):
    """scVI variational autoencoder on counts (or a Gaussian VAE on log1p-normalized data).

    The settings (every keyword after the data shapes) are those of :class:`cellvae.settings.ModelSettings`, whose
    defaults (scvi-tools' SCVI) are written there once; pass ``settings=`` or keywords.

    Args:
        n_input: number of genes.
        n_batch: number of batches (1 = no batch covariate).
        n_cats_per_cov: categories of each extra categorical covariate.
        n_continuous_cov: number of continuous covariates.
        library_log_means, library_log_vars: (n_batch,) prior of log library size per batch; required when
            the library is latent.
        settings: a :class:`cellvae.settings.ModelSettings` (None: the defaults), updated by ``**kwargs``.
        n_hidden, n_latent, n_layers, dropout_rate: network sizes (scVI defaults 128, 10, 1, 0.1).
        dispersion: ``"gene"``, ``"gene-batch"`` or ``"gene-cell"`` (inverse dispersion theta).
        gene_likelihood: ``"zinb"``, ``"nb"``, ``"poisson"``, ``"zip"`` or ``"normal"``.
        use_observed_lib_size: observed library size (default) or latent log-normal library size.
        encode_covariates: inject covariates into the encoder too.
        deeply_inject_covariates: inject covariates into every hidden layer, not only the first.
        use_batch_norm: ``"both"``, ``"encoder"``, ``"decoder"`` or ``"none"``.
        use_layer_norm: same choices.
        encoder_input: ``"log1p"`` (scVI: ``log1p(x)``), ``"log1p_cp10k"`` (``log1p`` of counts scaled to
            10,000 per cell, so the encoder does not have to learn to ignore library size) or ``"log1p_mean"``
            (totalVI's: ``log1p(x / (1 + mean_g x_g))``, the counts over one plus the cell's mean count per gene).
        beta: weight of ``KL(q(z|x) || p(z))`` after the KL warm-up (beta-VAE, Higgins et al. 2017, ICLR, "beta-VAE:
            learning basic visual concepts with a constrained variational framework"; 1.0 is the ELBO). It is
            recorded here and applied by the training loop (:func:`cellvae.train.train_module` warms the KL weight
            up from 0 to ``beta``); :meth:`loss` itself weights the KL by the ``kl_weight`` it is given.
        adversarial_batch_weight: weight of an adversarial batch classifier on the latent means (0: none, the
            default). A two-layer network (n_latent -> n_hidden -> n_batch) learns to predict the batch from the mean
            of ``q(z|x)`` by cross-entropy while the encoder is trained to defeat it (``adversarial_mode``), which
            pushes batch information out of the latent space beyond what the decoder's batch covariate does
            (domain-adversarial training, Ganin & Lempitsky 2015; the covariate discriminators of CPA, Lotfollahi
            et al. 2023, Mol. Syst. Biol.). The loss gains ``adversarial_batch_weight *`` the adversarial terms
            (nats per cell); the ELBO and its parts are unchanged. Needs ``n_batch >= 2``.
        adversarial_mode: how the encoder fights the classifier: ``"confusion"`` (default: the encoder pushes the
            classifier's output towards uniform over batches, the domain-confusion loss of Tzeng et al. 2015, ICCV,
            as scvi-tools' totalVI adversary does with uniform over the other batches) or ``"gradient_reversal"``
            (the encoder ascends the classifier's cross-entropy, Ganin & Lempitsky 2015). See
            :meth:`_adversarial_loss`.
        decoder: ``"nonlinear"`` (scVI's :class:`cellvae.vae.nn.DecoderSCVI`) or ``"linear"`` (LDVAE, Svensson et al.
            2020, Bioinformatics 36:3418: :class:`cellvae.vae.nn.LinearDecoderSCVI`, ``rho = softmax(BN(W z + s))``,
            whose ``loadings()`` are (n_genes, n_latent)).
        use_fast_likelihood: compute the training loss with :func:`cellvae.distributions.count_log_prob_sum`
            where it applies (:attr:`fast_likelihood`); False uses the distribution classes (same values, slower;
            for tests and comparisons).
        use_sparse_counts: accept minibatches of counts as sparse CSR tensors when the fast likelihood applies
            (:attr:`sparse_input`; the training loop then feeds them, see :func:`cellvae.train.train_module`): the
            encoder's first layer and the likelihood's count terms then cost in proportion to the non-zero counts.
            False: dense minibatches only (same values to float rounding; for tests and comparisons).

    Attributes:
        settings: the :class:`cellvae.settings.ModelSettings` of the module.
        likelihood: the :class:`cellvae.vae.likelihoods.GeneLikelihood` (``gene_likelihood`` is its name).

    Raises:
        cellvae.CellvaeInputError (a ValueError): a setting out of range or unknown, a latent library without its
            prior, an adversary without two batches.
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 1,
        n_cats_per_cov: tuple[int, ...] = (),
        n_continuous_cov: int = 0,
        library_log_means: np.ndarray | None = None,
        library_log_vars: np.ndarray | None = None,
        settings: ModelSettings | None = None,
        **kwargs,
    ):
        super().__init__()
        s = self.settings = build(ModelSettings, settings, kwargs, "VAEModule settings")
        self.likelihood = get_likelihood(s.gene_likelihood)
        self.gene_likelihood = s.gene_likelihood
        self.dispersion = s.dispersion
        self.beta = s.beta
        self.n_latent = s.n_latent
        self.n_batch = max(int(n_batch), 1)
        self.use_observed_lib_size = s.use_observed_lib_size or not self.likelihood.models_counts
        self.encode_covariates = s.encode_covariates
        self.encoder_input = s.encoder_input

        n_cats = (self.n_batch, *[int(n) for n in n_cats_per_cov])
        enc_cats = n_cats if s.encode_covariates else ()
        enc_cont = n_continuous_cov if s.encode_covariates else 0
        bn_enc = s.use_batch_norm in ("both", "encoder")
        bn_dec = s.use_batch_norm in ("both", "decoder")
        ln_enc = s.use_layer_norm in ("both", "encoder")
        ln_dec = s.use_layer_norm in ("both", "decoder")
        deep = s.deeply_inject_covariates

        self.z_encoder = Encoder(
            n_input, s.n_latent, enc_cats, enc_cont, s.n_layers, s.n_hidden, s.dropout_rate, bn_enc, ln_enc, deep,
        )
        if not self.use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise CellvaeInputError("A latent library size needs library_log_means and library_log_vars (per "
                                        "batch).")
            self.l_encoder = Encoder(n_input, 1, enc_cats, enc_cont, 1, s.n_hidden, s.dropout_rate, bn_enc, ln_enc, deep)
            self.register_buffer("library_log_means", torch.as_tensor(library_log_means, dtype=torch.float32).view(-1))
            self.register_buffer("library_log_vars", torch.as_tensor(library_log_vars, dtype=torch.float32).view(-1))
        self.linear_decoder = s.decoder == "linear"
        if self.linear_decoder:  # LDVAE (Svensson et al. 2020)
            self.decoder = LinearDecoderSCVI(s.n_latent, n_input, n_cats, n_continuous_cov, bn_dec, ln_dec,
                                             softmax=self.likelihood.models_counts)
        else:
            self.decoder = DecoderSCVI(
                s.n_latent, n_input, n_cats, n_continuous_cov, s.n_layers, s.n_hidden, bn_dec, ln_dec, deep,
                gene_cell_dispersion=s.dispersion == "gene-cell", softmax=self.likelihood.models_counts,
                latent_skip=s.latent_skip, dropout_rate=s.dropout_rate_decoder,
            )
        self.use_fast_likelihood = s.use_fast_likelihood
        self.use_sparse_counts = s.use_sparse_counts
        self.adversarial_batch_weight = s.adversarial_batch_weight
        self.adversarial_mode = s.adversarial_mode
        if self.adversarial_batch_weight > 0:
            if self.n_batch < 2:
                raise CellvaeInputError("adversarial_batch_weight > 0 needs a batch covariate with at least 2 "
                                        "batches: pass batch_key=<obs column of the batch> (or leave "
                                        "adversarial_batch_weight at 0).")
            self.batch_classifier = nn.Sequential(
                nn.Linear(s.n_latent, s.n_hidden), nn.ReLU(), nn.Linear(s.n_hidden, self.n_batch),
            )
        if s.dispersion == "gene":
            self.px_r = nn.Parameter(torch.randn(n_input))
        elif s.dispersion == "gene-batch":
            self.px_r = nn.Parameter(torch.randn(self.n_batch, n_input))

    def train(self, mode: bool = True) -> "VAEModule":
        """``nn.Module.train``, except that the normalisation layers listed in ``frozen_norms`` (set for reference
        mapping, :func:`cellvae.vae.surgery.freeze_for_query`) stay in eval mode: their running statistics are the
        reference's."""
        super().train(mode)
        for m in getattr(self, "frozen_norms", ()):
            m.eval()
        return self

    def dispersion_parameters(self) -> list[nn.Parameter]:
        """The inverse-dispersion parameter ``px_r`` (log theta, (n_genes,) or (n_batch, n_genes)) as a one-item list
        when the likelihood uses it (NB / ZINB with ``"gene"`` / ``"gene-batch"`` dispersion), else an empty list.
        The training loop gives it its own learning rate (``TrainSettings.dispersion_lr_multiplier``)."""
        return [self.px_r] if self.likelihood.has_gene_theta(self.dispersion) else []

    @torch.no_grad()
    def init_dispersion(self, log_theta: float) -> None:
        """Set every inverse dispersion of the NB / ZINB likelihood to ``exp(log_theta)`` (``px_r``, per gene or
        per gene and batch) instead of scVI's N(0, 1) draw of log theta per gene.

        Raises:
            ValueError: a likelihood without a dispersion parameter (``"poisson"``, ``"normal"``), per-cell
                dispersion (``"gene-cell"``, a decoder head), or a ``log_theta`` that is not finite.
        """
        if not self.likelihood.has_gene_theta(self.dispersion):
            raise CellvaeInputError("dispersion_init applies to the 'nb' and 'zinb' likelihoods with 'gene' or 'gene-batch' "
                             f"dispersion, not gene_likelihood={self.gene_likelihood!r}, "
                             f"dispersion={self.dispersion!r}; use dispersion_init='random'.")
        if not np.isfinite(log_theta):
            raise CellvaeInputError(f"dispersion_init must be 'random' or a finite log theta, got {log_theta!r}.")
        self.px_r.fill_(float(log_theta))

    @torch.no_grad()
    def init_decoder_bias(self, gene_totals) -> bool:
        """Set the bias of the decoder's logits layer to ``log(s_g / sum_g s_g)`` (centred), ``s_g`` the expression
        of gene g in the training cells: their mean profile (counts over library size, as
        :func:`cellvae.models.count_vae.decoder_bias_totals` computes it) or their total counts (the
        maximum-likelihood bias of the scVI decoder ``rho = softmax(h W^T + b)`` under a Poisson or multinomial
        likelihood when ``h W^T = 0``, ``mu_ng = l_n rho_g``). Training then starts from the average expression
        profile instead of a uniform one. A gene never seen gets half the smallest share of any other. Count
        likelihoods only; returns whether the bias was set (False for ``"normal"``).

        Args:
            gene_totals: (n_genes,) non-negative values, any scale (a profile or counts).

        Raises:
            ValueError: ``gene_totals`` of another length, negative or not finite.
        """
        if not self.likelihood.models_counts:
            return False
        s = np.asarray(gene_totals, dtype=np.float64).ravel()
        bias = self.decoder.logits_bias
        if s.shape != tuple(bias.shape) or not np.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"gene_totals must be {bias.shape[0]} finite non-negative totals, got shape {s.shape}.")
        share = s / s.sum() if s.sum() > 0 else np.full_like(s, 1.0 / max(len(s), 1))
        floor = 0.5 * share[share > 0].min() if (share > 0).any() else 1.0
        b = np.log(np.maximum(share, floor))
        bias.copy_(torch.as_tensor(b - b.mean(), dtype=bias.dtype))
        return True

    # ------------------------------------------------------------------ inference
    def inference(
        self,
        x: torch.Tensor,
        cat: torch.Tensor,
        cont: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict:
        """Encode a minibatch.

        Args:
            x: (n_cells, n_genes) counts (or log1p-normalized values for ``"normal"``), dense or sparse CSR.
            cat: (n_cells, 1 + n_cat_covariates) int64 codes, batch first.
            cont: (n_cells, n_cont) continuous covariates or None.
            n_samples: number of z samples; > 1 adds a leading sample axis.

        Returns:
            dict with ``qz_m``, ``qz_v`` (n_cells, n_latent), ``z`` ((n_samples,) n_cells, n_latent),
            ``library`` ((n_samples,) n_cells, 1) log library size, and ``ql_m``, ``ql_v`` when it is latent.
        """
        x_in = self._encoder_input(x)
        ecat = cat if self.encode_covariates else None
        econt = cont if self.encode_covariates else None
        qz_m, qz_v = self.z_encoder(x_in, ecat, econt)
        shape = (n_samples, *qz_m.shape) if n_samples > 1 else qz_m.shape
        z = qz_m + qz_v.sqrt() * torch.randn(shape, dtype=qz_m.dtype, device=qz_m.device)
        out = {"qz_m": qz_m, "qz_v": qz_v, "z": z}
        if self.use_observed_lib_size:
            library = torch.log(_row_sums(x).clamp(min=1.0))
            out["library"] = library.expand(n_samples, *library.shape) if n_samples > 1 else library
        else:
            ql_m, ql_v = self.l_encoder(x_in, ecat, econt)
            lshape = (n_samples, *ql_m.shape) if n_samples > 1 else ql_m.shape
            out.update(ql_m=ql_m, ql_v=ql_v)
            out["library"] = ql_m + ql_v.sqrt() * torch.randn(lshape, dtype=ql_m.dtype, device=ql_m.device)
        return out

    def input_scale(self, library: torch.Tensor, n_genes: int) -> torch.Tensor | None:
        """The per-cell factor the counts are multiplied by before ``log1p`` in the encoder's input.

        Args:
            library: (n_cells, 1) library sizes (counts summed over the genes).
            n_genes: number of genes the library sizes sum over.

        Returns:
            (n_cells, 1) factors (1 / counts): ``1e4 / library`` for ``"log1p_cp10k"``, ``1 / (1 + library /
            n_genes)`` for ``"log1p_mean"`` (totalVI's encoder input ``log(1 + x / (1 + mean_g x_g))``, Gayoso et
            al. 2021, Nat. Methods 18:272, reference implementation); None for ``"log1p"`` (no scaling).
        """
        if self.encoder_input == "log1p_cp10k":
            return 1e4 / library.clamp(min=1.0)
        if self.encoder_input == "log1p_mean":
            return 1.0 / (1.0 + library / max(int(n_genes), 1))
        return None

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.likelihood.models_counts:
            return x
        scaled = self.encoder_input != "log1p"  # log1p: no library sizes needed
        if x.layout == torch.sparse_csr:  # the transform maps 0 to 0: applied to the stored values only
            v = x.values()
            if scaled:
                v = v * self.input_scale(_row_sums(x), x.shape[-1]).view(-1).take(csr_rows(x))
            return csr_tensor(x.crow_indices(), x.col_indices(), torch.log1p(v), x.shape)
        return torch.log1p(x * self.input_scale(x.sum(-1, keepdim=True), x.shape[-1]) if scaled else x)

    # ----------------------------------------------------------------- generative
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        cat: torch.Tensor,
        cont: torch.Tensor | None = None,
    ) -> dict:
        """Decode latent codes into the likelihood p(x | z, l).

        Args:
            z: (n_cells, n_latent) or (n_samples, n_cells, n_latent).
            library: log library size, (n_cells, 1) or (n_samples, n_cells, 1).
            cat, cont: covariates for the n_cells, as in :meth:`inference`.

        Returns:
            dict with ``px`` (a distribution from :mod:`cellvae.distributions` of shape (..., n_cells, n_genes))
            and ``rho`` (normalized expression, rows sum to 1; the Gaussian mean for ``"normal"``).
        """
        lead = z.shape[:-2]
        if lead:
            n = z.shape[-2]
            s = int(np.prod(lead))
            z = z.reshape(s * n, -1)
            library = library.reshape(s * n, 1)
            cat = cat.repeat(s, 1)
            cont = cont.repeat(s, 1) if cont is not None else None
        rho, log_theta_cell, zi_logits = self.decoder(z, cat, cont)
        if self.dispersion == "gene":
            log_disp = self.px_r
        elif self.dispersion == "gene-batch":
            log_disp = self.px_r[cat[:, 0]]
        else:
            log_disp = log_theta_cell
        px = self.likelihood.distribution(rho, library, log_disp, zi_logits)
        if lead:
            px = _reshape_dist(px, (*lead, -1, rho.shape[-1]))
            rho = rho.reshape(*lead, -1, rho.shape[-1])
        return {"px": px, "rho": rho}

    # ----------------------------------------------------------------------- loss
    def loss(self, x: torch.Tensor, inference_outputs: dict, generative_outputs: dict, kl_weight: float = 1.0,
             cat: torch.Tensor | None = None) -> LossOutput:
        """Negative ELBO (Kingma & Welling 2014; scVI Eq. for the ELBO), KL of z weighted by ``kl_weight``.

        Returns a :class:`LossOutput` with per-cell parts in nats.
        """
        px = generative_outputs["px"]
        recon = -px.log_prob(x).sum(-1)
        return self._total(recon, inference_outputs, kl_weight, cat)

    def _total(self, recon: torch.Tensor, inference_outputs: dict, kl_weight: float, cat) -> LossOutput:
        """KL terms and the weighted loss around a per-cell reconstruction loss."""
        qz_m, qz_v = inference_outputs["qz_m"], inference_outputs["qz_v"]
        kl_z = 0.5 * (qz_v + qz_m * qz_m - 1.0 - torch.log(qz_v)).sum(-1)
        if self.use_observed_lib_size:
            kl_l = torch.zeros_like(kl_z)
        else:
            b = cat[:, 0]
            kl_l = _kl_normal(
                inference_outputs["ql_m"], inference_outputs["ql_v"],
                self.library_log_means[b].unsqueeze(-1), self.library_log_vars[b].unsqueeze(-1),
            )
        loss = (recon + kl_weight * kl_z + kl_l).mean()
        adv = None
        if self.adversarial_batch_weight > 0 and cat is not None:
            adv = self._adversarial_loss(qz_m, cat[:, 0])
            loss = loss + self.adversarial_batch_weight * adv
        return LossOutput(loss=loss, reconstruction_loss=recon, kl_local=kl_z + kl_l, adversarial_loss=adv)

    @property
    def fused_loss(self) -> str | None:
        """The fused training loss :meth:`forward` uses (:meth:`cellvae.vae.likelihoods.GeneLikelihood.fused_loss`;
        equal to the distribution classes' ``log_prob`` to float rounding), or None: the reference path. The linear
        decoder (LDVAE) has no hidden layer for the fused NB / ZINB loss to start from: it uses the reference path
        (the Poisson's fused loss takes any decoder's logits)."""
        fused = self.likelihood.fused_loss(self.dispersion) if self.use_fast_likelihood else None
        if self.linear_decoder and fused != FUSED_POISSON:
            return None
        return fused

    @property
    def fast_likelihood(self) -> bool:
        """Whether :meth:`forward` uses a fused training loss (:attr:`fused_loss` is not None)."""
        return self.fused_loss is not None

    @property
    def sparse_input(self) -> bool:
        """Whether :meth:`forward` takes its counts as a sparse CSR tensor without densifying them (the fast
        likelihood with ``use_sparse_counts``); other paths densify a sparse minibatch first."""
        return self.use_sparse_counts and self.fast_likelihood

    def _fast_reconstruction(self, x, z, library, cat, cont) -> torch.Tensor:
        """``-log p(x | z, l)`` per cell by :attr:`fused_loss`."""
        if self.fused_loss == FUSED_POISSON:
            logits = self.decoder.forward_logits(z, cat, cont, zero_inflation=False)[0]
            return -count_log_prob_sum(x, library + torch.log_softmax(logits, dim=-1))
        rows = cat[:, 0] if self.dispersion == "gene-batch" else None
        dec = self.decoder
        zi = self.likelihood.zero_inflated
        zw, zb = (dec.dropout_decoder.weight, dec.dropout_decoder.bias) if zi else (None, None)
        return -linear_softmax_count_log_prob_sum(x, dec.hidden(z, cat, cont), dec.scale_decoder.weight,
                                                  dec.scale_decoder.bias, library, self.px_r, zw, zb, rows)

    def _adversarial_loss(self, qz_m: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Classifier cross-entropy plus the encoder's adversarial term (nats per cell, mean over cells).

        ``"gradient_reversal"``: one cross-entropy; the classifier descends it, the encoder (through the reversed
        gradient) ascends it. ``"confusion"``: the classifier descends its cross-entropy on detached latent means,
        and the encoder descends the cross-entropy between the (frozen) classifier's output and the uniform
        distribution over batches, which is smallest when the classifier cannot tell the batches apart; unlike
        ascending the cross-entropy, it is not satisfied by a latent space that maps batches onto each other's
        labels (which still separates them).
        """
        if self.adversarial_mode == "gradient_reversal":
            return nn.functional.cross_entropy(self.batch_classifier(grad_reverse(qz_m)), batch)
        clf = nn.functional.cross_entropy(self.batch_classifier(qz_m.detach()), batch)
        h = qz_m
        for layer in self.batch_classifier:  # the same network with its parameters frozen for this term
            h = (nn.functional.linear(h, layer.weight.detach(), layer.bias.detach())
                 if isinstance(layer, nn.Linear) else layer(h))
        confusion = -torch.log_softmax(h, dim=-1).mean(-1).mean()
        return clf + confusion

    def forward(self, x: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor | None = None,
                kl_weight: float = 1.0) -> LossOutput:
        """Inference, generative pass and loss for one minibatch (one z sample).

        Where the likelihood has a fused training loss (:attr:`fused_loss`) it computes the reconstruction term
        from the decoder's last hidden layer; otherwise :meth:`generative` and :meth:`loss` do. ``x`` may be a sparse CSR
        tensor (see :attr:`sparse_input`).
        """
        if x.layout == torch.sparse_csr and not self.sparse_input:
            x = x.to_dense()
        inf = self.inference(x, cat, cont)
        return self._total(self.reconstruction(x, inf, cat, cont), inf, kl_weight, cat)

    def reconstruction(self, x: torch.Tensor, inf: dict, cat: torch.Tensor, cont: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """(n_cells,) ``-log p(x | z, l)`` in nats at the z sample and library of ``inf`` (:meth:`inference`): by the
        fused training loss where the likelihood has one (:attr:`fused_loss`), else by the distribution classes."""
        if self.fast_likelihood:
            return self._fast_reconstruction(x, inf["z"], inf["library"], cat, cont)
        gen = self.generative(inf["z"], inf["library"], cat, cont)
        return -gen["px"].log_prob(x).sum(-1)


@contextlib.contextmanager
def evaluation(module: torch.nn.Module, seed: int | None = None):
    """Run a block with ``module`` in eval mode and without autograd, then restore its mode.

    With a ``seed``, torch's global generator (z sampling) is seeded for the block and restored afterwards, so the
    block is reproducible and the caller's random stream is untouched; with None the global stream is used.
    """
    was_training = module.training
    module.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if seed is not None:
                stack.enter_context(torch.random.fork_rng(devices=[]))
                torch.manual_seed(int(seed))
            yield
    finally:
        module.train(was_training)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """(n, 1) sums of the rows of a dense or sparse CSR (n, m) tensor."""
    if x.layout == torch.sparse_csr:
        return torch.segment_reduce(x.values(), "sum", offsets=x.crow_indices()).unsqueeze(-1)
    return x.sum(-1, keepdim=True)


def _reshape_dist(px, shape):
    """Reshape every parameter tensor of a distribution that has a full (cells x genes) shape."""
    for name, val in list(vars(px).items()):
        if isinstance(val, torch.Tensor) and val.dim() == 2:
            setattr(px, name, val.reshape(shape))
    return px
