"""How many CPU threads torch uses while training and analysing, and a context that sets them and restores the caller's
setting afterwards.
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


