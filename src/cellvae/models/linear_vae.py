"""The linearly decoded count VAE (LDVAE): :class:`LinearCountVAE`, cellvae's counterpart of scvi-tools'
``LinearSCVI``."""

from __future__ import annotations

import inspect
from typing import Sequence

import anndata as ad

from ..errors import CellvaeInputError
from ..settings import ModelSettings, build, with_signature
from .count_vae import CountVAE

__all__ = ["LinearCountVAE"]


class LinearCountVAE(CountVAE):
    """Linearly decoded VAE (LDVAE; Svensson et al. 2020, Bioinformatics 36:3418), as scvi-tools' ``LinearSCVI``.

    The encoder is scVI's (``n_layers`` hidden layers); the decoder is linear: ``rho = softmax(BN(W z + s))``
    (:class:`cellvae.vae.nn.LinearDecoderSCVI`), so the latent dimensions are factors with gene loadings
    (:meth:`get_loadings`, (n_genes, n_latent)) while the encoder stays non-linear. It is a :class:`CountVAE` with
    ``decoder="linear"`` (every method, ``save``/``load``, the analyses), and with ``gene_likelihood="nb"`` by default
    as ``LinearSCVI``. ``cellvae fit --decoder linear`` trains the same model, and its report lists the top genes
    of each dimension.

    Args:
        adata, layer, batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys: as
            :class:`CountVAE`.
        out_of_core, settings: as :class:`CountVAE`.
        **model_settings: fields of :class:`cellvae.settings.ModelSettings`; ``gene_likelihood`` defaults to
            ``"nb"`` here, ``decoder`` is ``"linear"``.

    Raises:
        CellvaeInputError: ``decoder`` other than ``"linear"``, ``dispersion="gene-cell"``, and the errors of
            :class:`CountVAE`.
    """

    @with_signature(ModelSettings, keep=8)
    def __init__(
        self,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        out_of_core: bool = False,
        settings: ModelSettings | None = None,
        **model_settings,
    ):
        if model_settings.get("decoder", "linear") != "linear":
            raise CellvaeInputError("LinearCountVAE has a linear decoder; for decoder='nonlinear' use CountVAE.")
        if settings is None:
            model_settings.setdefault("gene_likelihood", "nb")
        settings = build(ModelSettings, settings, {**model_settings, "decoder": "linear"}, "LinearCountVAE settings")
        super().__init__(adata, layer, batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys,
                         out_of_core, settings=settings)


def _linear_defaults(sig: inspect.Signature) -> inspect.Signature:
    """The signature of :class:`CountVAE` with LinearSCVI's defaults shown."""
    new = {"gene_likelihood": "nb", "decoder": "linear"}
    return sig.replace(parameters=[p.replace(default=new[p.name]) if p.name in new else p
                                   for p in sig.parameters.values()])


LinearCountVAE.__init__.__signature__ = _linear_defaults(LinearCountVAE.__init__.__signature__)
