"""cellvae: variational autoencoders for single-cell data.

Main entry points:

- :class:`cellvae.CountVAE`: scVI-style count VAE on an AnnData (train, latent representation, normalized
  expression, analyses, save/load); :class:`cellvae.LinearCountVAE`: its linearly decoded form (LDVAE), with gene
  loadings.
- :class:`cellvae.RNAProteinVAE`: joint RNA + surface-protein count VAE (totalVI class) on an AnnData with protein
  counts in ``obsm`` or a MuData.
- :class:`cellvae.ImageVAE`: convolutional VAE for single-cell images.
- :class:`cellvae.CVAE`, :class:`cellvae.CVAE_NB`, :class:`cellvae.CVAE_ZINB`: conditional VAEs as plain torch
  modules.
- :class:`cellvae.Autoencoder`: deterministic autoencoder baseline (MSE on log1p-normalized data).
- ``cellvae fit DATA.h5ad --out DIR`` and ``cellvae evaluate DIR/model DATA.h5ad`` on the command line.
- :mod:`cellvae.metrics`: held-out ELBO, IWAE marginal log-likelihood, reconstruction error, clustering and
  batch-mixing scores.

The package is layered (README, "Architecture"): ``cli -> jobs -> models -> {analysis, metrics, train} -> vae ->
native``, and every layer may use ``data``, ``errors`` and ``settings``. Module paths of cellvae 0.1's flat layout
(``cellvae.model``, ``cellvae.distributions``, ...) still import, as aliases of their new homes (:mod:`._aliases`).
"""

from ._aliases import install as _install_aliases
from ._version import __version__
from .errors import CellvaeInputError, CellvaeOutputError, CellvaeTrainingError
from .data.read import read_data
from .models.autoencoder import Autoencoder
from .models.count_vae import CountVAE
from .models.image_vae import ImageVAE
from .models.label_transfer import LabelTransferVAE
from .models.linear_vae import LinearCountVAE
from .models.rna_protein import RNAProteinVAE
from .vae.cvae import CVAE, CVAE_NB, CVAE_ZINB

_install_aliases()

__all__ = ["CountVAE", "LinearCountVAE", "LabelTransferVAE", "RNAProteinVAE", "ImageVAE", "Autoencoder", "CVAE", "CVAE_NB", "CVAE_ZINB", "CellvaeInputError",
           "CellvaeOutputError", "CellvaeTrainingError", "read_data", "__version__"]
