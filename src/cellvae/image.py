"""A convolutional VAE for single-cell images (:class:`ImageVAE`), trained with the count model's loop.

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

Training uses :func:`cellvae.train.train_module` (Adam, KL warm-up, early stopping on the validation ELBO, best
weights, guards against non-finite steps), with :class:`ImageData` as the data object.

Image arrays passed to the public methods are channels-last ``(n, H, W, C)``: ``uint8`` (divided by 255) or float in
[0, 1]. Internally the module works on channels-first float32 tensors ``(n, C, H, W)``.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .data import CellvaeInputError, minibatch_slices
from .fileio import atomic_directory, write_synced
from .module import LossOutput, evaluation
from .train import CellvaeTrainingError, TrainingPlan, train_module

__all__ = ["ImageVAE", "ImageVAEModule", "ImageData", "to_float_images", "IMAGE_LIKELIHOODS",
           "IMAGE_FORMAT_VERSION"]

IMAGE_LIKELIHOODS = ("gaussian", "continuous_bernoulli")
VARIANCES = ("channel", "pixel")
IMAGE_FORMAT_VERSION = 1
_CONFIG = "config.json"
_WEIGHTS = "model.pt"
_HISTORY = "history.json"
_LOG_2PI = math.log(2.0 * math.pi)
_SCALE_SPEED = 10.0


# ------------------------------------------------------------------------------------------------ inputs
def to_float_images(images, n_channels: int | None = None, image_size: tuple[int, int] | None = None,
                    what: str = "images") -> np.ndarray:
    """Check an image stack and return it as float32 in [0, 1], channels last.

    Args:
        images: (n, H, W, C) array: ``uint8`` (divided by 255) or float (must lie in [0, 1]); a torch tensor is
            accepted too.
        n_channels, image_size: when given (a trained model's), C and (H, W) must match them.
        what: the argument's name, for the messages.

    Returns:
        (n, H, W, C) float32 array with values in [0, 1].

    Raises:
        CellvaeInputError: not an array, ndim other than 4, an image shape or channel count other than the model's
            (with a hint when the array looks channels-first), an integer dtype other than uint8, a bool or
            non-numeric dtype, NaN or infinite values, or float values outside [0, 1].
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    try:
        arr = np.asarray(images)
    except Exception as e:  # noqa: BLE001 - ragged lists and the like
        raise CellvaeInputError(f"{what} cannot be read as an array ({type(e).__name__}: {e}).") from e
    if arr.dtype == object or arr.dtype.kind not in "uif":
        raise CellvaeInputError(f"{what} must be a numeric array (uint8 or float in [0, 1]), got dtype {arr.dtype}.")
    if arr.ndim != 4:
        hint = " For a single image use images[None]." if arr.ndim == 3 else ""
        raise CellvaeInputError(f"{what} must have 4 dimensions (n_images, height, width, channels), got shape "
                                f"{arr.shape}.{hint}")
    n, h, w, c = arr.shape
    if n_channels is not None and image_size is not None:
        want = (int(image_size[0]), int(image_size[1]), int(n_channels))
        if (h, w, c) != want:
            hint = ""
            if arr.shape[1] == n_channels and tuple(arr.shape[2:]) == want[:2]:
                hint = " The array looks channels-first (n, C, H, W): pass images.transpose(0, 2, 3, 1)."
            raise CellvaeInputError(
                f"{what} have shape (H, W, C) = {(h, w, c)}, but the model was built for {want} (n_images, "
                f"{want[0]}, {want[1]}, {want[2]}).{hint}")
    if arr.dtype.kind in "iu":
        if arr.dtype != np.uint8:
            raise CellvaeInputError(
                f"{what} have integer dtype {arr.dtype}; pass uint8 (0-255, divided by 255) or float in [0, 1] "
                "(e.g. images / images.max() for 16-bit data, with one scale for all images).")
        return arr.astype(np.float32) / np.float32(255.0)
    out = np.asarray(arr, dtype=np.float32)
    if out.size:
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise CellvaeInputError(f"{what} contain {bad} NaN or infinite values; remove or fill them first.")
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:
            raise CellvaeInputError(
                f"float {what} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]. Pass uint8 images (0-255), "
                "or rescale with one scale for all images (e.g. images / 255).")
    return out


def _chw(x: np.ndarray) -> torch.Tensor:
    """(n, H, W, C) float32 numpy -> (n, C, H, W) contiguous tensor."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _hwc(x: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) tensor -> (n, H, W, C) float32 numpy."""
    return np.ascontiguousarray(x.detach().cpu().numpy().transpose(0, 2, 3, 1)).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------- data
class ImageData:
    """Image tensors in the form :func:`cellvae.train.train_module` expects of a data object.

    Args:
        images: (n, C, H, W) float32 tensor with values in [0, 1] (channels first).

    Attributes:
        X: the images, (n, C, H, W) float32.
        cat: (n, 1) int64 zeros (one "batch"; the image model has no covariates).
        cont: None.
        n_cells: n.
    """

    def __init__(self, images: torch.Tensor):
        if images.dim() != 4:
            raise CellvaeInputError(f"ImageData needs an (n, C, H, W) tensor, got shape {tuple(images.shape)}.")
        self.X = images.float().contiguous()
        self.n_cells = int(images.shape[0])
        self.cat = torch.zeros(self.n_cells, 1, dtype=torch.int64)
        self.cont = None
        self.csr = None
        # what a training failure suggests (cellvae.train; the default text is about count data)
        self.failure_hint = ("images with non-finite or extreme pixel values (scale them to [0, 1]; "
                             "cellvae.image.to_float_images)")

    def __len__(self) -> int:
        return self.n_cells

    def batch(self, idx: torch.Tensor):
        """Images ``idx`` (int64 tensor) as ``(x, cat, cont)``: (len(idx), C, H, W), (len(idx), 1), None."""
        return self.X.index_select(0, idx), self.cat.index_select(0, idx), None

    def iterate(self, indices: torch.Tensor, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple]:
        """Yield ``(x, cat, cont)`` minibatches over ``indices`` (see :func:`cellvae.data.minibatch_slices`)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if shuffle:
            indices = indices[torch.randperm(len(indices), generator=generator)]
        for a, b in minibatch_slices(len(indices), batch_size):
            yield self.batch(indices[a:b])


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


# ------------------------------------------------------------------------------------------------ model
class ImageVAE:
    """Convolutional variational autoencoder for single-cell images (Kingma & Welling 2014).

    See the :mod:`cellvae.image` module docstring for the model, the likelihoods and why the Gaussian one with a
    learned per-channel variance is the default.

    Args:
        n_channels: channels per image (3 for brightfield, DNA stain, darkfield).
        image_size: height and width in pixels (an int for square images, or (H, W)); divisible by
            ``2 ** len(channels)`` (8 with the default three layers; 40 x 40 works).
        n_latent: dimension of the latent space (default 16).
        channels: output channels of the encoder's stride-2 convolutions, mirrored by the decoder.
        likelihood: ``"gaussian"`` (learned variance; default) or ``"continuous_bernoulli"`` (Loaiza-Ganem &
            Cunningham 2019).
        variance: ``"channel"`` (one learned standard deviation per channel) or ``"pixel"`` (one per channel and
            pixel); Gaussian only.
        beta: KL weight reached at the end of the KL warm-up (beta-VAE, Higgins et al. 2017; 1 = the ELBO).
        min_scale: lower bound of the Gaussian standard deviation (intensity units, default 1e-3).

    Attributes:
        module: the :class:`ImageVAEModule`.
        history: per-epoch training history (empty until trained).
        is_trained: whether :meth:`train` ran (or a trained model was loaded).

    Raises:
        CellvaeInputError: bad sizes, likelihood, variance or beta.

    Example::

        vae = ImageVAE(n_channels=3, image_size=40, n_latent=16)
        vae.train(images_uint8, max_epochs=30)          # (n, 40, 40, 3)
        z = vae.get_latent_representation(images_uint8)  # (n, 16)
        x = vae.decode(z)                                # (n, 40, 40, 3), float in [0, 1]
    """

    def __init__(self, n_channels: int, image_size: int | Sequence[int], n_latent: int = 16,
                 channels: Sequence[int] = (32, 64, 128), likelihood: str = "gaussian", variance: str = "channel",
                 beta: float = 1.0, min_scale: float = 1e-3):
        if isinstance(image_size, (int, np.integer)):
            size = (int(image_size), int(image_size))
        else:
            size = tuple(int(s) for s in image_size)
            if len(size) != 2:
                raise CellvaeInputError(f"image_size must be an int or (height, width), got {image_size!r}.")
        self.module_kwargs = {
            "n_channels": int(n_channels), "image_size": list(size), "n_latent": int(n_latent),
            "channels": [int(c) for c in channels], "likelihood": str(likelihood), "variance": str(variance),
            "beta": float(beta), "min_scale": float(min_scale),
        }
        self.module = self._build_module()
        self.history: dict = {}
        self.is_trained = False
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None

    def _build_module(self) -> ImageVAEModule:
        kw = dict(self.module_kwargs)
        kw["image_size"] = tuple(kw["image_size"])
        try:
            return ImageVAEModule(**kw)
        except (TypeError, ValueError) as e:
            raise CellvaeInputError(str(e)) from e

    # ------------------------------------------------------------------------------------- properties
    @property
    def n_channels(self) -> int:
        return self.module.n_channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self.module.image_size

    @property
    def n_latent(self) -> int:
        return self.module.n_latent

    def __repr__(self) -> str:
        k = self.module_kwargs
        return (f"ImageVAE(n_channels={k['n_channels']}, image_size={tuple(k['image_size'])}, "
                f"n_latent={k['n_latent']}, channels={tuple(k['channels'])}, likelihood={k['likelihood']!r}, "
                f"variance={k['variance']!r}, beta={k['beta']:g}, trained={self.is_trained})")

    def _images(self, images, what: str = "images") -> torch.Tensor:
        return _chw(to_float_images(images, self.n_channels, self.image_size, what))

    def _latent_codes(self, z, what: str = "z") -> torch.Tensor:
        arr = np.asarray(z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else z)
        if arr.dtype == object or arr.dtype.kind not in "uif":
            raise CellvaeInputError(f"{what} must be a numeric array, got dtype {arr.dtype}.")
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != self.n_latent:
            raise CellvaeInputError(f"{what} must have shape (n, n_latent={self.n_latent}), got {arr.shape}.")
        if not np.isfinite(arr).all():
            raise CellvaeInputError(f"{what} contains NaN or infinite values.")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    # ------------------------------------------------------------------------------------------ train
    def train(self, images, labels=None, max_epochs: int = 30, batch_size: int = 128, train_size: float = 0.9,
              seed: int = 0, lr: float = 1e-3, weight_decay: float = 1e-6, n_epochs_kl_warmup: int | None = None,
              early_stopping: bool = True, early_stopping_patience: int = 10, progress_bar: bool = True,
              n_threads: int | None = None) -> dict:
        """Fit by maximising the (beta-weighted) ELBO with :func:`cellvae.train.train_module`.

        Args:
            images: (n, H, W, C) uint8 or float in [0, 1].
            labels: optional (n,) labels (any hashable values); used only to stratify the train/validation split
                so that rare classes fall on both sides. The model itself is unsupervised.
            max_epochs: passes over the training images.
            batch_size: images per minibatch.
            train_size: fraction of images for training; the rest (seeded split) is the validation set for early
                stopping and the best-weights choice (1.0: no validation set, the last weights are kept).
            seed: seeds the weight initialisation (first call only), split, minibatch order and z samples.
            lr, weight_decay: Adam settings.
            n_epochs_kl_warmup: epochs of linear KL warm-up from 0 to ``beta`` (None: half of ``max_epochs``).
            early_stopping, early_stopping_patience: stop when the validation ELBO has not improved for this many
                epochs after the warm-up; the best weights are kept either way.
            progress_bar: tqdm bar.
            n_threads: torch threads (None: :func:`cellvae.train.default_n_threads`).

        Returns:
            The history dict of :func:`cellvae.train.train_module` (per-epoch ``train_elbo``,
            ``validation_elbo`` ... in nats per image; ``best_epoch``, ``train_cells_per_second`` = images/s),
            also kept in ``self.history``.

        Raises:
            CellvaeInputError: bad images (see :func:`to_float_images`), labels of another length, fewer than 3
                images, or fewer training images than one minibatch.
            cellvae.CellvaeTrainingError: repeated non-finite losses (the best weights so far are kept).
        """
        x = self._images(images)
        n = x.shape[0]
        if n < 3:
            raise CellvaeInputError(f"Training needs at least 3 images, got {n}.")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,):
                raise CellvaeInputError(f"labels must have shape ({n},) like the images, got {labels.shape}.")
        if not 0.0 < train_size <= 1.0:
            raise CellvaeInputError(f"train_size must be in (0, 1], got {train_size}.")
        if int(max_epochs) < 1:
            raise CellvaeInputError(f"max_epochs must be >= 1, got {max_epochs}.")
        tr, va = _stratified_split(n, train_size, seed, labels)
        if len(tr) < max(2, int(batch_size)):
            raise CellvaeInputError(
                f"Only {len(tr)} training images, fewer than one minibatch of batch_size={batch_size}: pass a smaller "
                f"batch_size (e.g. {max(2, len(tr) // 4)}), a larger train_size, or more images.")
        if not self.is_trained:  # first fit: initialise the weights from the seed, for reproducibility
            torch.manual_seed(seed)
            self.module = self._build_module()
        plan = TrainingPlan(
            max_epochs=int(max_epochs), batch_size=int(batch_size), lr=lr, weight_decay=weight_decay,
            n_epochs_kl_warmup=n_epochs_kl_warmup, early_stopping=early_stopping,
            early_stopping_patience=int(early_stopping_patience), seed=seed, progress_bar=progress_bar,
            n_threads=n_threads, max_kl_weight=self.module.beta,
        )
        try:
            self.history = train_module(self.module, ImageData(x), tr, va, plan)
        except CellvaeTrainingError as e:  # the best (or last finite) weights are kept, as in CountVAE
            self.history = e.history
            self._finish_training(plan, tr, va)
            raise
        self._finish_training(plan, tr, va)
        return self.history

    def _finish_training(self, plan: TrainingPlan, tr: np.ndarray, va: np.ndarray) -> None:
        self.train_indices, self.validation_indices = tr, va
        self.module.eval()
        self.history["plan"] = {k: getattr(plan, k) for k in plan.__dataclass_fields__}
        self.history["n_train"], self.history["n_validation"] = int(len(tr)), int(len(va))
        self.is_trained = True

    # ------------------------------------------------------------------------------------ inference
    def _encode(self, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        ms, vs = [], []
        with evaluation(self.module):
            for a, b in _slices(x.shape[0], batch_size):
                inf = self.module.inference(x[a:b])
                ms.append(inf["qz_m"])
                vs.append(inf["qz_v"])
        if not ms:
            return torch.zeros(0, self.n_latent), torch.zeros(0, self.n_latent)
        return torch.cat(ms), torch.cat(vs)

    def get_latent_representation(self, images, give_variance: bool = False, batch_size: int = 512):
        """Posterior means of z for each image.

        Args:
            images: (n, H, W, C) uint8 or float in [0, 1].
            give_variance: also return the posterior variances.
            batch_size: images per forward pass.

        Returns:
            (n, n_latent) float32 numpy array of ``E_q[z | x]``; with ``give_variance`` a tuple (means, variances).

        Raises:
            CellvaeInputError: bad images (see :func:`to_float_images`).
        """
        m, v = self._encode(self._images(images), batch_size)
        if give_variance:
            return m.numpy(), v.numpy()
        return m.numpy()

    def decode(self, z, batch_size: int = 512) -> np.ndarray:
        """Mean of ``p(x | z)`` for latent codes ``z``.

        Args:
            z: (n, n_latent) (or (n_latent,)) latent codes.

        Returns:
            (n, H, W, C) float32 images in [0, 1] (the likelihood's mean).

        Raises:
            CellvaeInputError: ``z`` of another width, or with NaN/inf values.
        """
        zt = self._latent_codes(z)
        out = []
        with evaluation(self.module):
            for a, b in _slices(zt.shape[0], batch_size):
                out.append(self.module.mean(self.module.decoder_output(zt[a:b])))
        if not out:
            return np.zeros((0, *self.image_size, self.n_channels), dtype=np.float32)
        return _hwc(torch.cat(out))

    def reconstruct(self, images, batch_size: int = 512) -> np.ndarray:
        """Decode the posterior means: ``E[x | z = E_q[z | x]]``.

        Args:
            images: (n, H, W, C) uint8 or float in [0, 1].

        Returns:
            (n, H, W, C) float32 in [0, 1].

        Raises:
            CellvaeInputError: bad images.
        """
        return self.decode(self.get_latent_representation(images, batch_size=batch_size), batch_size=batch_size)

    def sample(self, n: int, seed: int | None = 0, images=None) -> np.ndarray:
        """Decoded latent draws (the likelihood's mean, not a noisy draw).

        Without ``images``, ``z ~ N(0, I)``, the prior. A VAE whose posteriors are much narrower than the prior
        (common for images, where the reconstruction term dwarfs the KL) leaves parts of the prior's mass between
        the training codes, and some prior draws then decode to implausible images. With ``images``, ``z`` is drawn
        from the Gaussian with the mean and covariance of their aggregate posterior ``q(z) = mean_i q(z | x_i)``
        (covariance of the posterior means plus the mean posterior variance), an ex-post density estimate in the
        spirit of Ghosh et al. 2020 ("From variational to deterministic autoencoders", ICLR), which stays on the
        data; pass the images of one group to generate images like them.

        Args:
            n: number of images.
            seed: seed of the z draw (None: torch's global stream).
            images: optional (m, H, W, C) uint8 or float in [0, 1], m >= 2, defining the sampling distribution.

        Returns:
            (n, H, W, C) float32 in [0, 1].

        Raises:
            CellvaeInputError: n < 0, or bad or fewer than 2 images.
        """
        if int(n) < 0:
            raise CellvaeInputError(f"n must be >= 0, got {n}.")
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        eps = torch.randn(int(n), self.n_latent, generator=gen, dtype=torch.float64)
        if images is None:
            return self.decode(eps.float())
        m, v = self.get_latent_representation(images, give_variance=True)
        if len(m) < 2:
            raise CellvaeInputError(f"sample(images=...) needs at least 2 images, got {len(m)}.")
        cov = np.cov(m.astype(np.float64), rowvar=False).reshape(self.n_latent, self.n_latent)
        cov += np.diag(v.astype(np.float64).mean(0) + 1e-8)
        chol = torch.from_numpy(np.linalg.cholesky(cov))
        z = torch.from_numpy(m.astype(np.float64).mean(0)) + eps @ chol.T
        return self.decode(z.float())

    def interpolate(self, z_a, z_b, n_steps: int = 10, return_latent: bool = False):
        """Decode the straight path ``z(t) = (1 - t) z_a + t z_b``, ``t = linspace(0, 1, n_steps)``.

        Args:
            z_a, z_b: (n_latent,) latent codes, e.g. means of the latent codes of two groups (see
                :meth:`group_latent_means`).
            n_steps: points on the path, both ends included (>= 2).
            return_latent: also return the path's codes.

        Returns:
            (n_steps, H, W, C) float32 images; with ``return_latent`` a tuple (images, (n_steps, n_latent) codes).

        Raises:
            CellvaeInputError: codes of another width or non-finite, ``n_steps`` < 2.
        """
        if int(n_steps) < 2:
            raise CellvaeInputError(f"n_steps must be >= 2, got {n_steps}.")
        za, zb = self._latent_codes(z_a, "z_a"), self._latent_codes(z_b, "z_b")
        if za.shape[0] != 1 or zb.shape[0] != 1:
            raise CellvaeInputError("z_a and z_b must each be one latent code of shape (n_latent,).")
        t = torch.linspace(0.0, 1.0, int(n_steps))[:, None]
        z = (1 - t) * za + t * zb
        imgs = self.decode(z)
        return (imgs, z.numpy()) if return_latent else imgs

    def group_latent_means(self, images, labels) -> dict:
        """Mean of the posterior means of the images of each label.

        Args:
            images: (n, H, W, C) uint8 or float in [0, 1].
            labels: (n,) labels.

        Returns:
            dict label -> (n_latent,) float32 mean code, in the order of ``np.unique(labels)``.

        Raises:
            CellvaeInputError: bad images, or labels of another length.
        """
        labels = np.asarray(labels)
        z = self.get_latent_representation(images)
        if labels.shape != (z.shape[0],):
            raise CellvaeInputError(f"labels must have shape ({z.shape[0]},), got {labels.shape}.")
        return {lab.item() if hasattr(lab, "item") else lab: z[labels == lab].mean(0) for lab in np.unique(labels)}

    def latent_arithmetic(self, terms: Sequence, weights: Sequence[float] | None = None) -> dict:
        """Decode a weighted sum of latent codes, ``z = sum_k weights[k] * code_k``.

        Each term is a latent code (n_latent,) or a stack of images (n, H, W, C), which stands for the mean of
        their posterior means. Examples: the midpoint of two phases, ``latent_arithmetic([prophase, anaphase],
        [0.5, 0.5])``; an scGen-style shift, ``latent_arithmetic([cells, group_b, group_a], [1, 1, -1])``.

        Args:
            terms: K latent codes and/or image stacks.
            weights: K floats (default: all 1).

        Returns:
            dict with ``z`` (n_latent,), ``image`` (H, W, C) float32 in [0, 1] (decoded mean) and ``codes``
            (K, n_latent), the code of each term.

        Raises:
            CellvaeInputError: no terms, weights of another length or non-finite, bad images or codes.
        """
        terms = list(terms)
        if not terms:
            raise CellvaeInputError("latent_arithmetic needs at least one term.")
        w = np.ones(len(terms)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(terms),) or not np.isfinite(w).all():
            raise CellvaeInputError(f"weights must be {len(terms)} finite numbers, got {weights!r}.")
        codes = []
        for k, t in enumerate(terms):
            arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            if arr.ndim == 4:
                z = self.get_latent_representation(arr)
                if len(z) == 0:
                    raise CellvaeInputError(f"terms[{k}] holds no images.")
                codes.append(z.mean(0))
            else:
                code = self._latent_codes(arr, f"terms[{k}]").numpy()
                if code.shape[0] != 1:
                    raise CellvaeInputError(f"terms[{k}] must be one latent code (n_latent,) or a stack of images "
                                            f"(n, H, W, C), got shape {arr.shape}.")
                codes.append(code[0])
        codes_a = np.stack(codes).astype(np.float32)
        z = (w[:, None] * codes_a).sum(0).astype(np.float32)
        return {"z": z, "image": self.decode(z[None])[0], "codes": codes_a}

    @torch.no_grad()
    def get_elbo(self, images, n_samples: int = 1, seed: int | None = 0, batch_size: int = 512,
                 return_parts: bool = False):
        """Evidence lower bound per image, ``E_q[log p(x | z)] - KL(q(z | x) || p(z))``, in nats per image.

        The expectation is estimated with ``n_samples`` draws of z per image (averaged). For the Gaussian
        likelihood this is a density on [0, 1]^(C H W), so values can be positive.

        Args:
            images: (n, H, W, C) uint8 or float in [0, 1].
            n_samples: z draws per image.
            seed: seeds the draws (reproducible; the global torch stream is left untouched). None: global stream.
            return_parts: also return the reconstruction term and the KL.

        Returns:
            (n,) float64 ELBO; with ``return_parts`` a dict with ``elbo``, ``reconstruction_loss``
            (``-E_q log p(x|z)``) and ``kl_local``, each (n,).

        Raises:
            CellvaeInputError: bad images or ``n_samples`` < 1.
        """
        if int(n_samples) < 1:
            raise CellvaeInputError(f"n_samples must be >= 1, got {n_samples}.")
        x = self._images(images)
        recs, kls = [], []
        with evaluation(self.module, seed=seed):
            for a, b in _slices(x.shape[0], batch_size):
                xb = x[a:b]
                rec = torch.zeros(xb.shape[0], dtype=torch.float64)
                kl = None
                for _ in range(int(n_samples)):
                    out = self.module(xb)
                    rec += out.reconstruction_loss.double()
                    kl = out.kl_local.double()  # analytic: the same for every draw
                recs.append(rec / int(n_samples))
                kls.append(kl)
        rec = torch.cat(recs).numpy() if recs else np.zeros(0)
        kl = torch.cat(kls).numpy() if kls else np.zeros(0)
        elbo = -(rec + kl)
        if return_parts:
            return {"elbo": elbo, "reconstruction_loss": rec, "kl_local": kl}
        return elbo

    def get_anomaly_score(self, images, n_samples: int = 8, seed: int | None = 0, batch_size: int = 512) -> np.ndarray:
        """Anomaly score: the negative ELBO, ``-ELBO(x)`` in nats per image; higher = less typical of the
        training images (a lower bound on ``-log p(x)``, so an upper bound on the surprise).

        Args:
            images: (n, H, W, C) uint8 or float in [0, 1].
            n_samples: z draws per image for the ELBO estimate (default 8, to lower the noise).
            seed: seeds the draws.

        Returns:
            (n,) float64 scores (nats per image; for the Gaussian likelihood they can be negative).

        Raises:
            CellvaeInputError: bad images.
        """
        return -self.get_elbo(images, n_samples=n_samples, seed=seed, batch_size=batch_size)

    # ------------------------------------------------------------------------------------- save / load
    def _config(self) -> dict:
        return {"format_version": IMAGE_FORMAT_VERSION, "cellvae_version": __version__,
                "model_class": type(self).__name__, "module_kwargs": self.module_kwargs,
                "is_trained": self.is_trained}

    def save(self, dir_path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save to a directory: ``config.json`` (format version and settings), ``model.pt`` (a plain state dict,
        loadable with ``torch.load(weights_only=True)``) and ``history.json``.

        Every file is written and fsynced (:func:`cellvae.fileio.write_synced`) in a temporary directory beside
        the target, which is then renamed onto it, so a crash never leaves a half-written or mixed model.

        Raises:
            FileExistsError: the directory exists and ``overwrite`` is False.
        """
        target = Path(dir_path)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        buf = io.BytesIO()
        torch.save(state, buf)
        with atomic_directory(target, overwrite) as tmp:  # each file fsynced, then the directory renamed
            write_synced(tmp / _WEIGHTS, buf.getvalue())
            write_synced(tmp / _HISTORY, json.dumps(_jsonable(self.history)).encode())
            write_synced(tmp / _CONFIG, json.dumps(self._config(), indent=2).encode())
        return target

    @classmethod
    def load(cls, dir_path: str | os.PathLike) -> "ImageVAE":
        """Load a model written by :meth:`save` (weights read with ``torch.load(weights_only=True)``).

        Raises:
            CellvaeInputError: not a model directory, damaged or newer-format files, another model class, or
                weights that do not match the config.
        """
        d = Path(dir_path)
        if not (d / _CONFIG).exists() or not (d / _WEIGHTS).exists():
            raise CellvaeInputError(f"{str(d)!r} is not an ImageVAE model directory (needs {_CONFIG} and "
                                    f"{_WEIGHTS}); pass the directory written by ImageVAE.save (for "
                                    "`cellvae fit-images`: OUT/model).")
        try:
            cfg = json.loads((d / _CONFIG).read_text())
            kwargs = dict(cfg["module_kwargs"])
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CellvaeInputError(f"{str(d / _CONFIG)!r} is not a valid ImageVAE config ({e}); save or train the "
                                    "model again.") from e
        if cfg.get("model_class") != cls.__name__:
            raise CellvaeInputError(f"{str(d)!r} holds a {cfg.get('model_class')!r}, not an ImageVAE; load it with "
                                    "its own class (e.g. cellvae.CountVAE.load).")
        if int(cfg.get("format_version", 0)) > IMAGE_FORMAT_VERSION:
            raise CellvaeInputError(f"{str(d)!r} has format version {cfg['format_version']}, newer than this "
                                    f"cellvae supports ({IMAGE_FORMAT_VERSION}); upgrade cellvae.")
        try:
            self = cls(**kwargs)
        except TypeError as e:
            raise CellvaeInputError(f"The settings in {str(d / _CONFIG)!r} cannot build a model ({e}).") from e
        try:
            state = torch.load(d / _WEIGHTS, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - unreadable, truncated, or pickled objects other than tensors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CellvaeInputError(f"{str(d / _WEIGHTS)!r} cannot be loaded as plain weights ({type(e).__name__}: "
                                    f"{first}); save the model again.") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CellvaeInputError(f"{str(d / _WEIGHTS)!r} is not a state dict of tensors; save the model again.")
        try:
            self.module.load_state_dict(state)
        except RuntimeError as e:
            raise CellvaeInputError(f"Weights in {str(d / _WEIGHTS)!r} do not match its config "
                                    f"({str(e).splitlines()[0][:300]}); save the model again.") from e
        self.module.eval()
        hist = d / _HISTORY
        self.history = json.loads(hist.read_text()) if hist.exists() else {}
        self.is_trained = bool(cfg.get("is_trained", True))
        return self


# ---------------------------------------------------------------------------------------------- helpers
def _slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Start/stop pairs covering range(n) (evaluation only: a batch of one image is fine in eval mode)."""
    bs = max(1, int(batch_size))
    return [(a, min(a + bs, n)) for a in range(0, n, bs)]


def _stratified_split(n: int, train_size: float, seed: int, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of range(n); with labels, ``train_size`` of each label (at least one
    validation image for labels with >= 2 images when ``train_size < 1``). Sorted index arrays."""
    rng = np.random.default_rng(seed)
    if train_size >= 1.0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == u) for u in np.unique(labels)]
    tr, va = [], []
    for g in groups:
        g = rng.permutation(g)
        k = int(np.ceil(train_size * len(g)))
        if k >= len(g) and len(g) >= 2:
            k = len(g) - 1
        tr.append(g[:k])
        va.append(g[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
