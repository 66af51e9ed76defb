"""Data layer: read files, check counts, encode covariates once, and serve minibatches from prepared tensors.

Everything AnnData- or pandas-shaped happens here, once, before training. The training loop then only sees
:class:`TensorData`, which slices a dense float32 tensor (or a CSR matrix for large data) by integer index:
no AnnData indexing, no DataFrame access and no per-cell Python in the hot path.
"""

from __future__ import annotations

import warnings

__all__ = ['CellvaeInputError', 'warn', 'CellvaeTrainingError']




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


