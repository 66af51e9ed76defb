"""The convolutional VAE module for single-cell images (:class:`ImageVAEModule`; the model on arrays is
:class:`cellvae.ImageVAE`).

Generative model (Kingma & Welling 2014, "Auto-encoding variational Bayes", ICLR):

- ``z_n ~ N(0, I)`` (``n_latent``);
- ``x_n | z_n ~ p(x | f(z_n))`` for an image ``x_n`` of shape (C, H, W) with intensities in [0, 1], where ``f`` is
  a convolutional decoder (a linear layer to a (channels[-1], H/2^L, W/2^L) map, then L stages of 2x
  nearest-neighbour upsampling and a 3x3 convolution, the last one to C channels);
- inference ``q(z | x) = N(m(x), diag v(x))``, ``m`` and ``v`` from a convolutional encoder of L stride-2
  convolutions (kernel 4) with batch normalisation and LeakyReLU, sampled with the reparameterisation trick.

Likelihoods (``likelihood=``):

- ``"gaussian"`` (default): ``x_chw ~ N(mu_chw(z), sigma^2)`` with ``mu = sigmoid(decoder output)`` (so the mean
  stays in [0, 1]) and a *learned* standard deviation, one per channel (``variance="channel"``) or one per pixel and
  channel (``variance="pixel"``), not depending on z. Why this choice: the three channels of the Jurkat data
  (brightfield, DNA stain, darkfield) have very different noise levels, and a learned variance lets the ELBO weigh
  them accordingly instead of a fixed MSE weight; the decoded mean is the image itself (no correction needed), and
  the per-image negative ELBO is a well-behaved anomaly score. The standard deviation is bounded below by
  ``min_scale`` (default 1e-3, about a quarter of one uint8 step, 1/255) so that flat background pixels cannot drive
  the density to infinity. Because this is a density on continuous values, log-likelihoods and ELBOs are in nats
  per image and can be positive; comparisons between images and models on the same data are meaningful, absolute
  values are not comparable with discrete (bits/dim) figures.
- ``"continuous_bernoulli"``: ``x_chw ~ CB(lambda_chw(z))`` (Loaiza-Ganem & Cunningham 2019, "The continuous
  Bernoulli: fixing a pervasive error in variational autoencoders", NeurIPS), the properly normalised version of
  the Bernoulli "likelihood" often used on [0, 1] intensities. Its mean (returned by :meth:`ImageVAE.decode`) is
  ``lambda / (2 lambda - 1) + 1 / (2 atanh(1 - 2 lambda))``, not ``lambda``. It has no variance parameter, and it
  favours values near 0 and 1, which suits near-binary images better than the grey-level Jurkat tiles.

The KL term may be weighted by ``beta`` after a linear KL warm-up (beta-VAE, Higgins et al. 2017, "beta-VAE: learning
basic visual concepts with a constrained variational framework", ICLR); ``beta = 1`` is the ELBO.

The module works on channels-first float32 tensors ``(n, C, H, W)`` with values in [0, 1]; ``forward(x, cat, cont,
kl_weight)`` returns a :class:`cellvae.vae.module.LossOutput` in nats per image, as the training loop expects.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .module import LossOutput

__all__ = ['IMAGE_LIKELIHOODS', 'VARIANCES', 'ImageVAEModule']


IMAGE_LIKELIHOODS = ("gaussian", "continuous_bernoulli")
VARIANCES = ("channel", "pixel")
_LOG_2PI = math.log(2.0 * math.pi)
_SCALE_SPEED = 10.0


# ----------------------------------------------------------------------------------------------- module
class ImageVAEModule(nn.Module):
    """Convolutional VAE as a torch module (see the module docstring for the model).

    Args:
        n_channels: C.
        image_size: (H, W); both divisible by ``2 ** len(channels)``.
        n_latent: dimension of z.
        channels: output channels of the encoder's stride-2 convolutions (the decoder mirrors them).
        likelihood: ``"gaussian"`` or ``"continuous_bernoulli"``.
        variance: ``"channel"`` or ``"pixel"`` (learned Gaussian standard deviation; ignored for the continuous
            Bernoulli).
        min_scale: lower bound of the Gaussian standard deviation (intensity units).
        beta: KL weight after warm-up (recorded here, applied by the training loop).

    Raises:
        ValueError: an unknown likelihood or variance, an image size not divisible by ``2 ** len(channels)``, or
            non-positive sizes.
    """

    def __init__(self, n_channels: int, image_size: tuple[int, int], n_latent: int = 16,
                 channels: Sequence[int] = (32, 64, 128), likelihood: str = "gaussian", variance: str = "channel",
                 min_scale: float = 1e-3, beta: float = 1.0):
        super().__init__()
        if likelihood not in IMAGE_LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {IMAGE_LIKELIHOODS}, got {likelihood!r}.")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}.")
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1 or n_channels < 1 or n_latent < 1:
            raise ValueError("n_channels, n_latent and every entry of channels must be >= 1 (and channels not empty).")
        if (len(channels) > 8 or max(channels) > 4096 or n_channels > 256 or n_latent > 4096
                or max(image_size) > 8192):  # a config read from a file must not make a huge allocation
            raise ValueError(f"sizes out of range: n_channels {n_channels} (<= 256), n_latent {n_latent} (<= 4096), "
                             f"channels {list(channels)} (<= 8 stages of <= 4096), image_size {tuple(image_size)} "
                             "(<= 8192 px).")
        if not (np.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}.")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale!r}.")
        h, w = int(image_size[0]), int(image_size[1])
        f = 2 ** len(channels)
        if h % f or w % f or h < f or w < f:
            raise ValueError(f"image_size {(h, w)} must be divisible by 2 ** len(channels) = {f} (one halving per "
                             f"encoder layer); crop or pad the images, or use fewer channel entries.")
        self.n_channels, self.image_size, self.n_latent = int(n_channels), (h, w), int(n_latent)
        self.likelihood, self.variance = likelihood, variance
        self.min_scale, self.beta = float(min_scale), float(beta)
        self.bottom = (channels[-1], h // f, w // f)
        n_flat = int(np.prod(self.bottom))

        enc: list[nn.Module] = []
        cin = self.n_channels
        for c in channels:
            enc += [nn.Conv2d(cin, c, 4, 2, 1), nn.BatchNorm2d(c), nn.LeakyReLU(0.2)]
            cin = c
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.z_mean = nn.Linear(n_flat, self.n_latent)
        self.z_logvar = nn.Linear(n_flat, self.n_latent)

        # Decoder: nearest-neighbour upsampling + 3x3 convolution (no checkerboard artefacts of transposed
        # convolutions, Odena et al. 2016) and no batch normalisation: with either, decoded latent interpolations
        # showed washed-out or chequered images midway between groups. The last stage outputs the C channels.
        self.dec_in = nn.Sequential(nn.Linear(self.n_latent, n_flat), nn.LeakyReLU(0.2))
        dec: list[nn.Module] = []
        outs = list(reversed(channels))[1:] + [self.n_channels]
        cin = channels[-1]
        for i, c in enumerate(outs):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, c, 3, 1, 1)]
            if i < len(outs) - 1:
                dec.append(nn.LeakyReLU(0.2))
            cin = c
        self.decoder = nn.Sequential(*dec)
        if likelihood == "gaussian":
            shape = (self.n_channels, 1, 1) if variance == "channel" else (self.n_channels, h, w)
            # log(sigma) = _SCALE_SPEED * scale_param: Adam moves a parameter by about lr per step, which would
            # take thousands of steps to bring sigma from its start (0.1) to the reconstruction error (~0.03).
            self.scale_param = nn.Parameter(torch.full(shape, math.log(0.1) / _SCALE_SPEED))

    # ---------------------------------------------------------------------------------------- parts
    def inference(self, x: torch.Tensor, n_samples: int = 1) -> dict:
        """Encode ``x`` (n, C, H, W) in [0, 1]: ``qz_m``, ``qz_v`` (n, n_latent) and ``z`` ((n_samples,) n, n_latent)."""
        h = self.encoder(x * 2.0 - 1.0)
        qz_m = self.z_mean(h)
        qz_v = torch.exp(self.z_logvar(h).clamp(-15.0, 10.0)) + 1e-6
        shape = (n_samples, *qz_m.shape) if n_samples > 1 else qz_m.shape
        z = qz_m + qz_v.sqrt() * torch.randn(shape, dtype=qz_m.dtype, device=qz_m.device)
        return {"qz_m": qz_m, "qz_v": qz_v, "z": z}

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """(n, n_latent) -> (n, C, H, W) unconstrained decoder output (logits)."""
        h = self.dec_in(z).view(z.shape[0], *self.bottom)
        return self.decoder(h)

    def scale(self) -> torch.Tensor:
        """Gaussian standard deviation, (C, 1, 1) or (C, H, W), bounded below by ``min_scale``."""
        return torch.exp(self.scale_param * _SCALE_SPEED).clamp(min=self.min_scale)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) from the decoder output: sigmoid (Gaussian) or the continuous Bernoulli mean."""
        if self.likelihood == "gaussian":
            return torch.sigmoid(logits)
        return torch.distributions.ContinuousBernoulli(logits=logits).mean

    def log_likelihood(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``log p(x | z)`` summed over channels and pixels: (n,) nats per image."""
        if self.likelihood == "gaussian":
            mu = torch.sigmoid(logits)
            scale = self.scale()
            lp = -0.5 * ((x - mu) / scale) ** 2 - torch.log(scale) - 0.5 * _LOG_2PI
        else:
            lp = torch.distributions.ContinuousBernoulli(logits=logits, validate_args=False).log_prob(x)
        return lp.flatten(1).sum(1)

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None,
                kl_weight: float = 1.0) -> LossOutput:
        """Negative ELBO of a minibatch (one z sample per image), KL weighted by ``kl_weight`` in ``loss``.

        Args:
            x: (n, C, H, W) float in [0, 1]. ``cat`` and ``cont`` are accepted for the training loop and ignored.

        Returns:
            :class:`cellvae.module.LossOutput`: ``reconstruction_loss`` = ``-log p(x | z)`` and ``kl_local`` =
            ``KL(q(z|x) || N(0, I))``, both (n,) in nats per image.
        """
        inf = self.inference(x)
        recon = -self.log_likelihood(x, self.decoder_output(inf["z"]))
        qz_m, qz_v = inf["qz_m"], inf["qz_v"]
        kl = 0.5 * (qz_v + qz_m * qz_m - 1.0 - torch.log(qz_v)).sum(-1)
        loss = (recon + kl_weight * kl).mean()
        return LossOutput(loss=loss, reconstruction_loss=recon, kl_local=kl)


