"""The semi-supervised count VAE of scANVI (Xu et al. 2021, Mol. Syst. Biol. 17:e9620) as a pure torch module.

Generative model (Kingma et al. 2014, NeurIPS, "Semi-supervised learning with deep generative models", model M2,
stacked on the scVI likelihood of :class:`cellvae.vae.module.VAEModule`):

- ``y ~ Cat(pi)`` (a cell type; ``pi`` uniform), ``z2 ~ N(0, I)``, ``z1 | z2, y ~ N(m(z2, y), diag v(z2, y))``;
- ``x | z1, l ~ p(x | z1, l)``: the scVI decoder and gene likelihood (``z1`` is the latent space of the model).

Inference: ``q(z1 | x)`` (the scVI encoder), a classifier ``q(y | z1)``, and ``q(z2 | z1, y)``. The ELBO of a cell
with a known label ``y`` is ``E[log p(x | z1) + log p(z1 | z2, y) - log q(z1 | x) - KL(q(z2 | z1, y) || p(z2)) +
log p(y)]``; for a cell without one, the label is summed out under ``q(y | z1)``, which adds ``KL(q(y | z1) || p(y))``
(Kingma et al. 2014, Eqs. 6-7). The classifier also gets a cross-entropy on the labelled cells, weighted by
``classification_ratio`` (Eq. 9 there; 50 as scvi-tools).

Tensors: as :class:`VAEModule`, with the label code as the last column of ``cat`` (``n_labels`` for "no label"); the
other columns are the covariates, so analyses that pass the same ``cat`` to :meth:`inference` and
:meth:`generative` get the scVI model's behaviour.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .module import LossOutput, VAEModule, _kl_normal
from .nn import Encoder, FCLayers

__all__ = ["LabelTransferModule"]


def _log_normal(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log N(x; m, diag v) summed over the last axis (nats)."""
    return -0.5 * (((x - m) ** 2) / v + torch.log(v) + math.log(2 * math.pi)).sum(-1)


class LabelTransferModule(VAEModule):
    """scANVI: :class:`VAEModule` with a label ``y`` and a second latent ``z2`` in the prior of ``z1`` (module
    docstring).

    Args:
        n_input, n_batch, n_cats_per_cov, n_continuous_cov, library_log_means, library_log_vars, settings,
            **kwargs: as :class:`VAEModule` (``classification_ratio``: the weight of the classifier's
            cross-entropy on labelled cells, 50 as scvi-tools).
        n_labels: number of known labels (cell types), >= 2.
        label_prior: (n_labels,) prior probabilities of the labels (None: uniform).
        label_counts: (n_labels,) labelled training cells per label, for ``class_weighting="balanced"`` (None:
            equal weights until set with :meth:`set_label_counts`).

    Raises:
        CellvaeInputError: fewer than 2 labels, and the errors of :class:`VAEModule`.
    """

    label_networks = ("classifier", "z2_encoder", "z1_decoder")  # conditioned on labels, not on covariates

    def __init__(self, n_input: int, n_labels: int, n_batch: int = 1, n_cats_per_cov: tuple[int, ...] = (),
                 n_continuous_cov: int = 0, library_log_means=None, library_log_vars=None, settings=None,
                 label_prior=None, label_counts=None, **kwargs):
        from ..errors import CellvaeInputError

        super().__init__(n_input, n_batch, n_cats_per_cov, n_continuous_cov, library_log_means, library_log_vars,
                         settings, **kwargs)
        if int(n_labels) < 2:
            raise CellvaeInputError(f"Label transfer needs at least 2 known labels, got {n_labels}.")
        s = self.settings
        self.n_covariate_columns = 1 + len(tuple(n_cats_per_cov))  # batch + other categorical covariates
        self.n_labels = int(n_labels)
        self.classification_ratio = float(s.classification_ratio)
        bn = s.use_batch_norm in ("both", "encoder")
        ln = s.use_layer_norm in ("both", "encoder")
        self.classifier = nn.Sequential(
            FCLayers(s.n_latent, s.n_hidden, (), 0, 1, s.n_hidden, s.dropout_rate, bn, ln),
            nn.Linear(s.n_hidden, self.n_labels),
        )
        self.z2_encoder = Encoder(s.n_latent, s.n_latent, (self.n_labels,), 0, s.n_layers, s.n_hidden, s.dropout_rate,
                                  bn, ln)
        self.z1_decoder = Encoder(s.n_latent, s.n_latent, (self.n_labels,), 0, s.n_layers, s.n_hidden, 0.0,
                                  s.use_batch_norm in ("both", "decoder"), s.use_layer_norm in ("both", "decoder"))
        prior = torch.full((self.n_labels,), 1.0 / self.n_labels) if label_prior is None else \
            torch.as_tensor(label_prior, dtype=torch.float32).view(-1)
        self.register_buffer("log_label_prior", torch.log(prior / prior.sum()))
        self.register_buffer("class_weight", torch.ones(self.n_labels))
        if label_counts is not None:
            self.set_label_counts(label_counts)

    @torch.no_grad()
    def set_label_counts(self, label_counts) -> None:
        """Set the per-label weights of the cross-entropy from the labelled training cells per label (n_labels,):
        ``n / (n_labels * n_label)`` with ``class_weighting="balanced"`` (labels without cells get weight 0), else
        1."""
        c = torch.as_tensor(label_counts, dtype=torch.float32).reshape(-1)
        if self.settings.class_weighting != "balanced" or c.numel() != self.n_labels or float(c.sum()) <= 0:
            self.class_weight.fill_(1.0)
            return
        w = torch.where(c > 0, c.sum() / (self.n_labels * c.clamp(min=1.0)), torch.zeros_like(c))
        self.class_weight.copy_(w)

    def _covariates(self, cat: torch.Tensor | None) -> torch.Tensor | None:
        """``cat`` without the label column (when it has one): the covariates, batch first."""
        n = self.n_covariate_columns
        return cat[:, :n] if cat is not None and cat.dim() == 2 and cat.shape[1] > n else cat

    def inference(self, x: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor | None = None,
                  n_samples: int = 1) -> dict:
        """:meth:`VAEModule.inference` (``cat`` with or without the label column)."""
        return super().inference(x, self._covariates(cat), cont, n_samples)

    def generative(self, z: torch.Tensor, library: torch.Tensor, cat: torch.Tensor,
                   cont: torch.Tensor | None = None) -> dict:
        """:meth:`VAEModule.generative` (``cat`` with or without the label column)."""
        return super().generative(z, library, self._covariates(cat), cont)

    def _fast_reconstruction(self, x, z, library, cat, cont) -> torch.Tensor:
        return super()._fast_reconstruction(x, z, library, self._covariates(cat), cont)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """(n_cells, n_labels) logits of ``q(y | z)`` for latent codes (the latent means when predicting)."""
        return self.classifier[1](self.classifier[0](z))

    def label_terms(self, z1: torch.Tensor) -> torch.Tensor:
        """(n_cells, n_labels) ``-log p(z1 | z2, y) + KL(q(z2 | z1, y) || N(0, I))`` for every label y, one z2
        sample each (nats)."""
        n, L = z1.shape[0], self.n_labels
        z1s = z1.repeat(L, 1)
        ys = torch.arange(L, device=z1.device).repeat_interleave(n).view(-1, 1)
        m2, v2 = self.z2_encoder(z1s, ys)
        z2 = m2 + v2.sqrt() * torch.randn_like(m2)
        m1, v1 = self.z1_decoder(z2, ys)
        kl_z2 = 0.5 * (v2 + m2 * m2 - 1.0 - torch.log(v2)).sum(-1)
        return (kl_z2 - _log_normal(z1s, m1, v1)).view(L, n).t()

    def forward(self, x: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor | None = None,
                kl_weight: float = 1.0) -> LossOutput:
        """Negative ELBO (labelled and unlabelled cells, module docstring) plus the weighted cross-entropy of the
        classifier on the labelled cells, for one minibatch. ``cat``'s last column holds the label codes.

        Returns:
            :class:`LossOutput`: ``reconstruction_loss`` ``-log p(x | z1, l)`` and ``kl_local`` the rest of the
            negative ELBO per cell (nats), so that ``elbo`` is the ELBO; ``loss`` adds the KL weight and the
            cross-entropy.
        """
        n = self.n_covariate_columns
        labels = cat[:, n] if cat.shape[1] > n else torch.full_like(cat[:, 0], self.n_labels)
        cat = cat[:, :n]
        if x.layout == torch.sparse_csr and not self.sparse_input:
            x = x.to_dense()
        inf = self.inference(x, cat, cont)
        recon = self.reconstruction(x, inf, cat, cont)
        z1, qz_m, qz_v = inf["z"], inf["qz_m"], inf["qz_v"]
        terms = self.label_terms(z1)
        log_probs = torch.log_softmax(self.classify(z1), dim=-1)
        known = labels < self.n_labels
        y = labels.clamp(max=self.n_labels - 1)
        labelled = terms.gather(1, y.view(-1, 1)).squeeze(1) - self.log_label_prior[y]
        unlabelled = (log_probs.exp() * (terms + log_probs - self.log_label_prior)).sum(-1)
        kl = _log_normal(z1, qz_m, qz_v) + torch.where(known, labelled, unlabelled)
        kl_l = torch.zeros_like(kl)
        if not self.use_observed_lib_size:
            b = cat[:, 0]
            kl_l = _kl_normal(inf["ql_m"], inf["ql_v"], self.library_log_means[b].unsqueeze(-1),
                              self.library_log_vars[b].unsqueeze(-1))
        loss = (recon + kl_weight * kl + kl_l).mean()
        any_known = bool(known.any())
        if any_known:
            w = self.class_weight[labels[known]]
            ce = nn.functional.cross_entropy(self.classify(qz_m)[known], labels[known], reduction="none") * w
            loss = loss + self.classification_ratio * ce.sum() / w.sum().clamp(min=1e-12)
        ce_cells = w_cells = None
        if not self.training:  # per-cell parts for the validation score (evaluate_elbo); not built on training steps
            ce_cells, w_cells = torch.zeros_like(recon), torch.zeros_like(recon)
            if any_known:
                ce_cells = ce_cells.masked_scatter(known, ce.detach())
                w_cells = w_cells.masked_scatter(known, w)
        adv = None
        if self.adversarial_batch_weight > 0:
            adv = self._adversarial_loss(qz_m, cat[:, 0])
            loss = loss + self.adversarial_batch_weight * adv
        return LossOutput(loss=loss, reconstruction_loss=recon, kl_local=kl + kl_l, adversarial_loss=adv,
                          classification_loss=ce_cells, classification_weight=w_cells)
