"""Gene loadings of a linearly decoded VAE (LDVAE; Svensson et al. 2020, Bioinformatics 36:3418): the weights of
the linear map from the latent space to the genes' log expression, and the genes that load most on each
dimension."""

from __future__ import annotations

import pandas as pd

from ..errors import CellvaeInputError

__all__ = ["get_loadings", "top_loadings"]


def get_loadings(model) -> pd.DataFrame:
    """The gene loadings of a model with a linear decoder (``decoder="linear"``).

    Args:
        model: a model of the public protocol (:class:`cellvae.analysis.protocol.TrainedModel`) whose module has a
            :class:`cellvae.vae.nn.LinearDecoderSCVI`.

    Returns:
        DataFrame (n_genes, n_latent), indexed by gene name, columns ``Z_0 ... Z_{n_latent-1}`` (scvi-tools'
        ``LinearSCVI.get_loadings`` names): the change of the gene's log normalized expression (before the softmax's
        common shift, in nats) per unit of the latent dimension, the batch norm's scale folded in.

    Raises:
        CellvaeInputError: the model's decoder is not linear.
    """
    model.check_trained()
    dec = model.module.decoder
    if not hasattr(dec, "loadings"):
        raise CellvaeInputError("get_loadings needs a linear decoder (LDVAE): train cellvae.LinearCountVAE, or "
                                "CountVAE(..., decoder='linear') (cellvae fit --decoder linear).")
    w = dec.loadings().cpu().numpy()
    return pd.DataFrame(w, index=pd.Index(model.spec.gene_names, name="gene"),
                        columns=[f"Z_{k}" for k in range(w.shape[1])])


def top_loadings(loadings: pd.DataFrame, n_top: int = 20) -> pd.DataFrame:
    """The genes with the largest positive and the most negative loading on each latent dimension.

    Args:
        loadings: (n_genes, n_latent) from :func:`get_loadings`.
        n_top: genes per dimension and sign.

    Returns:
        DataFrame with one row per (dimension, sign, rank): ``dimension``, ``sign`` (``"+"``/``"-"``), ``rank``
        (1 = strongest), ``gene``, ``loading``; ``n_latent * 2 * min(n_top, n_genes)`` rows.

    Raises:
        CellvaeInputError: ``n_top < 1``.
    """
    if int(n_top) < 1:
        raise CellvaeInputError(f"n_top must be at least 1, got {n_top!r}.")
    rows = []
    for dim in loadings.columns:
        col = loadings[dim]
        for sign, order in (("+", col.sort_values(ascending=False, kind="stable")),
                            ("-", col.sort_values(ascending=True, kind="stable"))):
            for rank, (gene, value) in enumerate(order.iloc[:n_top].items(), start=1):
                rows.append((dim, sign, rank, str(gene), float(value)))
    return pd.DataFrame(rows, columns=["dimension", "sign", "rank", "gene", "loading"])
