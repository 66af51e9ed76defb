"""Architecture surgery for reference mapping (scArches; Lotfollahi et al. 2022, Nat. Biotechnol. 40:121).

A query dataset brings batches (and categories of other categorical covariates) that the reference model has never
seen. :func:`extend_module` copies a trained module into a new one built with more categories per covariate, and
:func:`freeze_for_query` then freezes everything learned on the reference, so that training on the query moves
only:

- the new categories' rows of the covariate embeddings (every :class:`cellvae.vae.nn.CovariateLinear` of the
  encoder and decoder; the reference rows get zero gradients);
- the rows of new batches of a per-batch inverse dispersion (``px_r`` with ``dispersion="gene-batch"``);
- the decoder's batch-normalisation layers (their affine weights and running statistics, as scArches' default
  ``freeze_batchnorm_decoder=False``) and the library-size encoder of a latent-library model;

while the encoder's batch normalisation keeps the reference's running statistics (it stays in eval mode). The
reference's latent space is therefore unchanged for reference cells, and query cells are placed in it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CellvaeInputError
from .nn import CovariateLinear

__all__ = ["extend_module", "freeze_for_query"]


def _covariate_layers(module: nn.Module) -> list[tuple[str, CovariateLinear]]:
    """The layers that embed the batch and the categorical covariates (not those of ``module.label_networks``,
    e.g. the label-conditioned networks of :class:`cellvae.vae.scanvi.LabelTransferModule`, whose categories are
    labels and which stay frozen whole)."""
    skip = tuple(f"{n}." for n in getattr(module, "label_networks", ()))
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, CovariateLinear) and not name.startswith(skip)]


@torch.no_grad()
def extend_module(old: nn.Module, new: nn.Module, n_old: tuple[int, ...]) -> None:
    """Copy the weights of ``old`` into ``new``, a module of the same class and settings whose categorical covariates
    have at least as many categories (``n_old``: the old counts, batch first).

    Embedding rows of the old categories are copied; rows of new categories start at zero (a new category starts as
    "no shift"); a covariate that had one category (no embedding) gets an embedding whose old row is zero, the
    function it had. ``px_r`` per batch and the per-batch library prior get their old rows copied; new rows of
    ``px_r`` start at the mean of the old ones, and the library prior of new batches is left as ``new`` has it
    (set from the query's cells by the caller).

    Raises:
        CellvaeInputError: the modules' other weights differ in shape (other settings or genes).
    """
    new_layers = dict(_covariate_layers(new))
    skip = set()
    for name, cl in _covariate_layers(old):
        ncl = new_layers[name]
        pre = f"{name}." if name else ""
        ncl.linear.load_state_dict(cl.linear.state_dict())
        if cl.cont is not None:
            ncl.cont.load_state_dict(cl.cont.state_dict())
        old_j = new_j = 0
        for k, (used_old, used_new) in enumerate(zip(cl._use, ncl._use)):
            if used_new:
                w = ncl.embeddings[new_j].weight
                w.zero_()
                if used_old:
                    src = cl.embeddings[old_j].weight
                    w[: src.shape[0]] = src
                new_j += 1
            if used_old:
                old_j += 1
        skip.update(f"{pre}{k}" for k in cl.state_dict())
    state = {k: v for k, v in old.state_dict().items() if k not in skip}
    target = new.state_dict()
    for key, val in state.items():
        if key not in target:
            raise CellvaeInputError(f"Reference weight {key!r} has no place in the query model.")
        dst = target[key]
        if dst.shape == val.shape:
            dst.copy_(val)
        elif key in ("px_r", "library_log_means", "library_log_vars") and dst.shape[1:] == val.shape[1:]:
            dst[: val.shape[0]] = val
            if key == "px_r":
                dst[val.shape[0]:] = val.mean(0, keepdim=True)
        else:
            raise CellvaeInputError(f"Reference weight {key!r} has shape {tuple(val.shape)} but the query model's "
                                    f"has {tuple(dst.shape)}: the models differ in more than their categories.")


def freeze_for_query(module: nn.Module, n_old: tuple[int, ...]) -> list[nn.Parameter]:
    """Freeze ``module`` (built by :func:`extend_module`) for training on the query (module docstring).

    Returns:
        the parameters that train (their frozen rows get zero gradients through hooks; train them with weight decay
        0, so that Adam leaves those rows exactly as they are).
    """
    for p in module.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Parameter] = []

    def rows_after(w: nn.Parameter, n: int) -> None:
        if w.shape[0] <= n:
            return
        mask = torch.zeros(w.shape[0], *([1] * (w.dim() - 1)), dtype=w.dtype)
        mask[n:] = 1.0
        w.requires_grad_(True)
        w.register_hook(lambda g, m=mask: g * m.to(g.device))
        trainable.append(w)

    for _, cl in _covariate_layers(module):
        j = 0
        for k, used in enumerate(cl._use):
            if used:
                rows_after(cl.embeddings[j].weight, n_old[k] if n_old[k] > 1 else 1)
                j += 1
    if getattr(module, "dispersion", None) == "gene-batch" and hasattr(module, "px_r"):
        rows_after(module.px_r, n_old[0])
    frozen_norms = []
    for name, m in module.named_modules():
        if isinstance(m, nn.BatchNorm1d):
            if name.startswith("decoder."):
                for p in m.parameters():
                    p.requires_grad_(True)
                    trainable.append(p)
            elif not name.startswith("l_encoder."):
                frozen_norms.append(m)
    if hasattr(module, "l_encoder"):
        for p in module.l_encoder.parameters():
            p.requires_grad_(True)
            trainable.append(p)
    module.frozen_norms = frozen_norms  # kept in eval mode by VAEModule.train
    return trainable
