"""Atomic file writes: write to a temporary name in the target's directory, then rename.

A crash or a kill while writing leaves the previous file (or no file) in place, never a half-written one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["write_atomic", "write_text_atomic"]


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` to write a temporary file beside ``path``, then ``os.replace`` it onto ``path``.

    The temporary file is removed if ``writer`` raises. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))
