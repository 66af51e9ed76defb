"""The errors cellvae raises for its users, and its one warning helper.

- :class:`CellvaeInputError` (a ``ValueError``): bad data, arguments or files; the message says what is wrong and
  how to fix it. The command line prints it as ``error: ...`` and exits with status 2.
- :class:`CellvaeOutputError` (a ``RuntimeError``): an output could not be written (a full disk, permissions);
  exit status 2.
- :class:`CellvaeTrainingError` (a ``RuntimeError``): training could not go on (repeated non-finite losses); exit
  status 3.
"""

from __future__ import annotations

import warnings

__all__ = ['CellvaeInputError', 'CellvaeOutputError', 'CellvaeTrainingError', 'warn']




class CellvaeInputError(ValueError):
    """Bad input data or arguments; the message says what is wrong and how to fix it."""


def warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)


class CellvaeTrainingError(RuntimeError):
    """Training could not go on (repeated non-finite losses or gradients). The message names the likely causes.

    Attributes:
        history: the history up to the failure (per-epoch lists, ``n_skipped_steps``, ``best_epoch``).
    """

    def __init__(self, message: str, history: dict | None = None):
        super().__init__(message)
        self.history = history or {}


class CellvaeOutputError(RuntimeError):
    """An output could not be written (a full disk, no permission); the message names the file and the cause. The
    earlier files are left as they were (outputs are written atomically). The command line prints it as
    ``error: ...`` and exits with status 2."""
