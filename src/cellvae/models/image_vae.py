"""The convolutional VAE for single-cell images on numpy arrays: :class:`ImageVAE` (train, latent codes, decoding,
interpolation, sampling, anomaly scores, save/load). The model and its likelihoods are described in
:mod:`cellvae.vae.conv` (Kingma & Welling 2014; continuous Bernoulli: Loaiza-Ganem & Cunningham 2019; beta-VAE:
Higgins et al. 2017).

Training uses :func:`cellvae.train.train_module` (Adam, KL warm-up, early stopping on the validation ELBO, best
weights, guards against non-finite steps), with :class:`cellvae.data.images.ImageData` as the data object.

Image arrays passed to the public methods are channels-last ``(n, H, W, C)``: ``uint8`` (divided by 255) or float in
[0, 1]. Internally the module works on channels-first float32 tensors ``(n, C, H, W)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.images import ImageData, channels_first, channels_last, to_float_images
from ..errors import CellvaeInputError, CellvaeTrainingError
from ..settings import TrainSettings, build
from ..train.loop import train_module
from ..vae.conv import ImageVAEModule
from ..vae.module import evaluation
from .base import BaseModel

__all__ = ['IMAGE_FORMAT_VERSION', 'IMAGE_TRAIN_DEFAULTS', 'ImageVAE', 'stratified_split']


IMAGE_FORMAT_VERSION = 1
IMAGE_TRAIN_DEFAULTS = {"max_epochs": 30, "early_stopping_patience": 10}  # over TrainSettings' defaults


# ------------------------------------------------------------------------------------------------ model
class ImageVAE(BaseModel):
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

    FORMAT_VERSION = IMAGE_FORMAT_VERSION
    MIGRATIONS = {0: lambda cfg: {**cfg, "format_version": 1}}  # format 0: the same layout without a version

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
        return channels_first(to_float_images(images, self.n_channels, self.image_size, what))

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
    def train(self, images, labels=None, settings: TrainSettings | None = None, **train_settings) -> dict:
        """Fit by maximising the (beta-weighted) ELBO with :func:`cellvae.train.train_module`.

        Args:
            images: (n, H, W, C) uint8 or float in [0, 1].
            labels: optional (n,) labels (any hashable values); used only to stratify the train/validation split
                so that rare classes fall on both sides. The model itself is unsupervised.
            settings: a :class:`cellvae.settings.TrainSettings` (None: its defaults with those of
                :data:`IMAGE_TRAIN_DEFAULTS`: 30 epochs, patience 10), updated by the keywords.
            **train_settings: fields of :class:`cellvae.settings.TrainSettings`: ``max_epochs`` (passes over the
                training images), ``batch_size``, ``train_size`` (the rest, a seeded split stratified by
                ``labels``, is the validation set for early stopping and the best weights; 1.0: none), ``seed``
                (weight initialisation on the first call, split, minibatch order, z samples), ``lr``,
                ``weight_decay``, ``n_epochs_kl_warmup`` (None: half of ``max_epochs``), ``early_stopping``,
                ``early_stopping_patience``, ``progress_bar``, ``n_threads``.

        Returns:
            The history dict of :func:`cellvae.train.train_module` (per-epoch ``train_elbo``,
            ``validation_elbo`` ... in nats per image; ``best_epoch``, ``train_cells_per_second`` = images/s),
            also kept in ``self.history``.

        Raises:
            CellvaeInputError: bad images (see :func:`to_float_images`), labels of another length, fewer than 3
                images, or fewer training images than one minibatch.
            cellvae.CellvaeTrainingError: repeated non-finite losses (the best weights so far are kept).
        """
        s = build(TrainSettings, settings, train_settings if settings is not None else
                  {**IMAGE_TRAIN_DEFAULTS, **train_settings}, "training settings")
        x = self._images(images)
        n = x.shape[0]
        if n < 3:
            raise CellvaeInputError(f"Training needs at least 3 images, got {n}.")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,):
                raise CellvaeInputError(f"labels must have shape ({n},) like the images, got {labels.shape}.")
        tr, va = stratified_split(n, s.train_size, s.seed, labels)
        if len(tr) < s.batch_size:
            raise CellvaeInputError(
                f"Only {len(tr)} training images, fewer than one minibatch of batch_size={s.batch_size}: pass a "
                f"smaller batch_size (e.g. {max(2, len(tr) // 4)}), a larger train_size, or more images.")
        if not self.is_trained:  # first fit: initialise the weights from the seed, for reproducibility
            torch.manual_seed(s.seed)
            self.module = self._build_module()
        self.train_indices, self.validation_indices = tr, va
        try:
            self.history = train_module(self.module, ImageData(x), tr, va, s)
        except CellvaeTrainingError as e:  # the best (or last finite) weights are kept, as in CountVAE
            self.history = e.history
            raise
        finally:
            self.history["n_train"], self.history["n_validation"] = int(len(tr)), int(len(va))
            self.is_trained = True
        return self.history

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
        return channels_last(torch.cat(out))

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
        return {"module_kwargs": self.module_kwargs}

    @classmethod
    def _from_config(cls, cfg: dict, state: dict, directory: Path) -> "ImageVAE":
        kwargs = cfg["module_kwargs"]
        if not isinstance(kwargs, dict):
            raise TypeError(f"module_kwargs is a {type(kwargs).__name__}, not an object")
        return cls(**kwargs)

    @classmethod
    def load(cls, dir_path: str | os.PathLike) -> "ImageVAE":
        """Load a model written by :meth:`save` (weights read with ``torch.load(weights_only=True)``).

        Raises:
            CellvaeInputError: not a model directory, damaged (checksum) or newer-format files, another model class,
                or weights that do not match the config.
        """
        return super().load(dir_path)


# ---------------------------------------------------------------------------------------------- helpers
def _slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Start/stop pairs covering range(n) (evaluation only: a batch of one image is fine in eval mode)."""
    bs = max(1, int(batch_size))
    return [(a, min(a + bs, n)) for a in range(0, n, bs)]


def stratified_split(n: int, train_size: float, seed: int, labels=None) -> tuple[np.ndarray, np.ndarray]:
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
