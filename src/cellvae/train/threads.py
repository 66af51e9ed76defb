"""One training loop: Adam on the negative ELBO, KL warm-up, early stopping on validation ELBO, best weights,
checkpoints and resume, and guards against non-finite losses and gradients.

The loop touches tensors only (minibatches come from :class:`cellvae.data.TensorData`), accumulates epoch
statistics on tensors, and reads them back once per epoch. On the CPU, a module that takes sparse counts
(``VAEModule.sparse_input``) gets the same minibatches as sparse CSR tensors when the data are sparse enough
(:meth:`cellvae.data.TensorData.iterate_sparse`): the encoder's first layer and the likelihood then cost in
proportion to the non-zero counts (issue 6; same results to float rounding, tests/test_sparse_path.py).

Checkpoints (``checkpoint_dir``): every ``checkpoint_every`` epochs and at the end, ``checkpoint.pt`` holds the
weights, the Adam state, the epoch and step (KL warm-up), the minibatch-order generator and torch's global RNG
(dropout, z samples), the early-stopping state (best weights, best epoch, epochs without improvement) and the
history. It is written to a temporary file in the same directory, flushed and fsynced, renamed over the old one
and the directory fsynced, so the name ``checkpoint.pt`` only ever holds a complete checkpoint; a leftover
temporary file (a crash while writing) is ignored and removed. It holds plain tensors and containers only
(``torch.load(weights_only=True)``). Resuming restores all of it at an epoch boundary, so an interrupted and
resumed run ends with the same weights as an uninterrupted one (on CPU, same seed and thread count). numpy's and
Python's global RNGs are not used by the loop (the cell split is drawn from its own seeded generator).
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ['default_n_threads', 'torch_threads']



def default_n_threads() -> int:
    """Threads for training: half the logical CPUs (at least 1, at most torch's current setting).

    A minibatch step of a VAE with 128 hidden units is made of small matrix products and element-wise kernels
    that gain little from more threads, while OpenMP threads that find their cores busy (a shared machine, two
    jobs at once) spin and can slow a step down a hundredfold. Leaving half the cores free avoids that.
    """
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) // 2))


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (None: :func:`default_n_threads`), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n) if n else default_n_threads())
    try:
        yield
    finally:
        torch.set_num_threads(old)


