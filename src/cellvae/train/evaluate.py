"""Likelihood metrics of a trained :class:`cellvae.module.VAEModule` on prepared cells (nats per cell).

- ELBO and its parts, one z sample per cell (Kingma & Welling 2014; scVI: Lopez et al. 2018):
  ``ELBO(x) = E_q[log p(x | z, l)] - KL(q(z | x) || p(z)) [- KL(q(l | x) || p(l))]``.
- Importance-weighted estimate of the marginal log-likelihood ``log p(x)`` (IWAE bound, Burda et al. 2016,
  "Importance Weighted Autoencoders", ICLR), with K samples of q:
  ``log p(x) ~= logsumexp_k [log p(x | z_k, l_k) + log p(z_k) - log q(z_k | x) (+ log p(l_k) - log q(l_k | x))]
  - log K``. It is a lower bound of ``log p(x)`` whose expectation increases with K towards it; K = 1 is an
  unbiased single-sample estimate of the ELBO. This is what scvi-tools' ``get_marginal_ll`` computes.
- Reconstruction error ``-log p(x | z, l)`` with z sampled from q (scvi-tools' ``get_reconstruction_error``).

All values are log-likelihoods in nats per cell (higher is better) except the losses
``reconstruction_loss`` and ``kl_local`` (lower is better). For count likelihoods ``log p(x)`` is a log
probability (negative); for ``gene_likelihood="normal"`` it is a log density of the log1p-normalized data.

Randomness comes from torch's global generator, or from ``seed`` (then the global state is left unchanged).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import CellvaeInputError
from ..data.tensors import TensorData, as_indices
from ..vae.module import evaluation
from .distributed import allreduce_sum, to_device

__all__ = ["evaluate_elbo", "sparse_minibatches", "compute_elbo", "compute_marginal_ll", "compute_reconstruction_error"]

_LOG_2PI = math.log(2.0 * math.pi)
DEFAULT_MAX_ELEMENTS = 1 << 22  # n_samples * n_cells * n_genes per decoder pass (~16 MB per float32 tensor)


def compute_elbo(
    module,
    data: TensorData,
    indices=None,
    batch_size: int = 1024,
    return_mean: bool = False,
    seed: int | None = None,
) -> dict:
    """ELBO per cell and its parts, in eval mode, one z (and l) sample per cell.

    Args:
        module: a :class:`cellvae.module.VAEModule` (its ``forward`` returns a ``LossOutput``).
        data: prepared cells (:meth:`cellvae.data.DataSpec.prepare`, ``CountVAE.prepared_data``).
        indices: cells to evaluate (see :func:`as_indices`); None: all.
        batch_size: cells per forward pass.
        return_mean: return means over cells (floats, from :func:`cellvae.train.evaluate_elbo`, the function
            the training loop reports the validation ELBO with) instead of per-cell arrays.
        seed: seed for the z samples; None uses torch's global generator.

    Returns:
        dict with ``elbo`` (log-likelihood bound, higher is better), ``reconstruction_loss``
        (``-log p(x | z, l)``) and ``kl_local`` (``KL(q(z|x) || p(z))`` plus the library KL when the library is
        latent), each a float32 array of shape (n_cells,) in nats per cell, or a float (mean over cells) with
        ``return_mean``. ``elbo = -(reconstruction_loss + kl_local)``.

    Raises:
        CellvaeInputError: empty or out-of-range ``indices``.
    """
    idx = as_indices(indices, data.n_cells)
    with evaluation(module, seed):
        if return_mean:
            return evaluate_elbo(module, data, idx, batch_size)
        recon, kl = [], []
        for x, cat, cont in data.iterate(idx, batch_size):
            out = module(x, cat, cont, kl_weight=1.0)
            recon.append(out.reconstruction_loss)
            kl.append(out.kl_local)
    r = torch.cat(recon).numpy()
    k = torch.cat(kl).numpy()
    return {"elbo": -(r + k), "reconstruction_loss": r, "kl_local": k}


def compute_reconstruction_error(
    module,
    data: TensorData,
    indices=None,
    batch_size: int = 1024,
    return_mean: bool = True,
    seed: int | None = None,
) -> dict:
    """Reconstruction error ``-log p(x | z, l)`` with one sample ``z ~ q(z | x)`` (and ``l ~ q(l | x)`` when the
    library is latent), as scvi-tools' ``get_reconstruction_error``.

    Args:
        module, data, indices, batch_size, seed: as in :func:`compute_elbo`.
        return_mean: the mean over cells (float, default) instead of the (n_cells,) array.

    Returns:
        ``{"reconstruction_loss": value}`` in nats per cell (lower is better).

    Raises:
        CellvaeInputError: empty or out-of-range ``indices``.
    """
    out = compute_elbo(module, data, indices, batch_size, return_mean=return_mean, seed=seed)
    return {"reconstruction_loss": out["reconstruction_loss"]}


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var) element-wise (nats)."""
    return -0.5 * (_LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)


def _log_weights(module, x: torch.Tensor, cat: torch.Tensor, cont, n_samples: int) -> torch.Tensor:
    """(n_samples, n_cells) log importance weights ``log p(x, z, l) - log q(z, l | x)`` for one minibatch."""
    inf = module.inference(x, cat, cont, n_samples=n_samples)
    z, library = inf["z"], inf["library"]
    if n_samples == 1:  # inference adds the sample axis only for n_samples > 1
        z, library = z.unsqueeze(0), library.unsqueeze(0)
    px = module.generative(z, library, cat, cont)["px"]
    log_w = px.log_prob(x).sum(-1)  # log p(x | z, l)
    log_w = log_w + _log_normal(z, torch.zeros(()), torch.ones(())).sum(-1)  # log p(z)
    log_w = log_w - _log_normal(z, inf["qz_m"], inf["qz_v"]).sum(-1)  # log q(z | x)
    if not module.use_observed_lib_size:
        b = cat[:, 0]
        prior_m = module.library_log_means[b].unsqueeze(-1)
        prior_v = module.library_log_vars[b].unsqueeze(-1)
        log_w = log_w + _log_normal(library, prior_m, prior_v).sum(-1)  # log p(l)
        log_w = log_w - _log_normal(library, inf["ql_m"], inf["ql_v"]).sum(-1)  # log q(l | x)
    return log_w


def compute_marginal_ll(
    module,
    data: TensorData,
    indices=None,
    n_samples: int = 1000,
    batch_size: int = 128,
    return_mean: bool = False,
    seed: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray | float:
    """Importance-sampled marginal log-likelihood ``log p(x)`` per cell (IWAE estimator, Burda et al. 2016).

    For each cell, K = ``n_samples`` draws ``(z_k, l_k) ~ q(z, l | x)`` give
    ``log p(x) ~= logsumexp_k [log p(x | z_k, l_k) + log p(z_k) - log q(z_k | x) + log p(l_k) - log q(l_k | x)]
    - log K``; the library terms appear only when the library size is latent (``use_observed_lib_size=False``,
    prior ``N(library_log_means[s], library_log_vars[s])`` of the cell's batch ``s = cat[:, 0]``). The estimate
    is a stochastic lower bound of ``log p(x)``, tighter for larger K; with K = 1 its expectation is the ELBO.

    Memory: cells are processed ``batch_size`` at a time and samples in chunks of at most
    ``max(1, max_elements // (n_cells_in_batch * n_genes))``, combined with a running ``logsumexp``, so
    K = 1000 or more needs no more memory than one chunk.

    Args:
        module: a :class:`cellvae.module.VAEModule`.
        data: prepared cells.
        indices: cells to evaluate (see :func:`as_indices`); None: all.
        n_samples: K, importance samples per cell (scvi-tools' default 1000).
        batch_size: cells per pass.
        return_mean: the mean over cells (float) instead of the (n_cells,) array.
        seed: seed for the samples; None uses torch's global generator.
        max_elements: bound on ``samples x cells x genes`` per decoder pass.

    Returns:
        float32 array (n_cells,) of ``log p(x)`` in nats per cell (higher is better), or its mean.

    Raises:
        CellvaeInputError: ``n_samples < 1``, or empty or out-of-range ``indices``.
    """
    if int(n_samples) < 1:
        raise CellvaeInputError(f"n_samples must be at least 1, got {n_samples}.")
    n_samples = int(n_samples)
    idx = as_indices(indices, data.n_cells)
    out = []
    with evaluation(module, seed):
        for x, cat, cont in data.iterate(idx, batch_size):
            per_pass = max(1, min(n_samples, int(max_elements) // max(1, x.shape[0] * x.shape[1])))
            acc = torch.full((x.shape[0],), -math.inf)
            done = 0
            while done < n_samples:
                s = min(per_pass, n_samples - done)
                acc = torch.logaddexp(acc, torch.logsumexp(_log_weights(module, x, cat, cont, s), dim=0))
                done += s
            out.append(acc - math.log(n_samples))
    ll = torch.cat(out).numpy()
    return float(np.mean(ll, dtype=np.float64)) if return_mean else ll


@torch.no_grad()
def evaluate_elbo(module, data: TensorData, indices: torch.Tensor, batch_size: int = 1024) -> dict:
    """Mean ELBO and its parts (nats per cell) over ``indices``, in eval mode, one z sample per cell (from sparse
    minibatches where training uses them, see :func:`train_module`). In a distributed run each rank passes its shard
    of cells and the sums are all-reduced (same value on every rank).

    Returns:
        ``{"elbo", "reconstruction_loss", "kl_local"}`` (nats per cell), plus ``"classification_loss"`` (the
        class-weighted mean cross-entropy of the label classifier over the labelled cells, nats) for a module whose
        ``LossOutput`` has one and when some of the cells are labelled.
    """
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # reconstruction, KL, cells, weighted CE, CE weights
    minibatches = data.iterate_sparse if sparse_minibatches(module, data, device) else data.iterate
    for batch in minibatches(indices, batch_size):
        x, cat, cont = to_device(batch, device)
        out = module(x, cat, cont, kl_weight=1.0)
        sums[0] += out.reconstruction_loss.sum()
        sums[1] += out.kl_local.sum()
        sums[2] += x.shape[0]
        if getattr(out, "classification_loss", None) is not None:
            sums[3] += out.classification_loss.sum()
            sums[4] += out.classification_weight.sum()
    module.train(was_training)
    sums = allreduce_sum(sums).cpu()
    n = max(float(sums[2]), 1.0)
    r, k = float(sums[0]) / n, float(sums[1]) / n
    res = {"elbo": -(r + k), "reconstruction_loss": r, "kl_local": k}
    if float(sums[4]) > 0:  # labelled cells of a module with a classifier: their class-weighted mean cross-entropy
        res["classification_loss"] = float(sums[3]) / float(sums[4])
    return res


def sparse_minibatches(module, data, device: torch.device) -> bool:
    """Whether to feed sparse CSR minibatches (training and validation): a module that takes them
    (``VAEModule.sparse_input``) on the CPU, with data that offer them and are sparse enough
    (``TensorData.sparse_counts``). The cells of each minibatch are the same either way."""
    return (device.type == "cpu" and bool(getattr(module, "sparse_input", False))
            and hasattr(data, "iterate_sparse") and data.sparse_counts() is not None)


