"""Native (C) kernels of the CPU training step: the only package that touches raw pointers.

:mod:`.build` compiles ``fastpath.c`` on first use and loads it; :mod:`.ops` is the checked boundary that every
caller goes through. Without a compiler, or with ``CELLVAE_NATIVE=0``, callers use their PyTorch code instead.
"""

from .build import available, library, reason_unavailable, usable

__all__ = ["available", "library", "reason_unavailable", "usable"]
