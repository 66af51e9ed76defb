"""cellvae: variational autoencoders for single-cell data.

Main entry points:

- :class:`cellvae.CountVAE`: scVI-style count VAE on an AnnData (train, latent representation, normalized
  expression, save/load).
- :class:`cellvae.CVAE`, :class:`cellvae.CVAE_NB`, :class:`cellvae.CVAE_ZINB`: conditional VAEs as plain torch
  modules.
- :class:`cellvae.Autoencoder`: deterministic autoencoder baseline (MSE on log1p-normalized data).
- ``cellvae fit DATA.h5ad --out DIR`` and ``cellvae evaluate DIR/model DATA.h5ad`` on the command line.
- :mod:`cellvae.metrics`: held-out ELBO, IWAE marginal log-likelihood, reconstruction error, clustering and
  batch-mixing scores.
"""

__version__ = "0.1.0"

from .autoencoder import Autoencoder  # noqa: E402
from .cvae import CVAE, CVAE_NB, CVAE_ZINB  # noqa: E402
from .data import CellvaeInputError, read_data  # noqa: E402
from .image import ImageVAE  # noqa: E402
from .model import CountVAE  # noqa: E402
from .train import CellvaeTrainingError  # noqa: E402

__all__ = ["CountVAE", "ImageVAE", "Autoencoder", "CVAE", "CVAE_NB", "CVAE_ZINB", "CellvaeInputError", "CellvaeTrainingError", "read_data",
           "__version__"]
