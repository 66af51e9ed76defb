"""Calibration of predicted label probabilities (Guo et al. 2017, "On calibration of modern neural networks", ICML).

- :func:`expected_calibration_error`: the ECE, the mean gap between confidence and accuracy over equal-width bins
  of confidence weighted by their share of cells (Eq. 3 there; Naeini et al. 2015);
- :func:`fit_temperature`: temperature scaling (Sec. 4.2 there): the one positive number ``T`` that divides the
  logits so that the negative log-likelihood of known labels is smallest. Dividing by ``T`` changes no prediction
  (the arg max stays), only the confidence;
- :func:`softmax`: class probabilities of logits at a temperature.
"""

from __future__ import annotations

import numpy as np

from ..errors import CellvaeInputError

__all__ = ["expected_calibration_error", "fit_temperature", "softmax", "TEMPERATURE_RANGE"]

TEMPERATURE_RANGE = (0.05, 20.0)  # the temperatures fit_temperature searches (a log-scale bounded search)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(n_cells, n_labels) probabilities ``softmax(logits / temperature)`` (float64; rows sum to 1)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check(probs_or_logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(probs_or_logits, dtype=np.float64)
    y = np.asarray(labels)
    if a.ndim != 2 or y.ndim != 1 or a.shape[0] != y.shape[0] or a.shape[0] == 0:
        raise CellvaeInputError(f"Need an (n_cells, n_labels) array and (n_cells,) label codes with n_cells > 0, got "
                                f"shapes {a.shape} and {y.shape}.")
    y = y.astype(np.int64)
    if (y < 0).any() or (y >= a.shape[1]).any():
        raise CellvaeInputError(f"Label codes must be in [0, {a.shape[1]}), got {y.min()}..{y.max()}.")
    if not np.isfinite(a).all():
        raise CellvaeInputError("The probabilities or logits hold NaN or infinite values.")
    return a, y


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of predicted probabilities (Guo et al. 2017, Eq. 3).

    The cells are put into ``n_bins`` equal-width bins of their confidence (the largest probability); the ECE is
    ``sum_b (n_b / n) * |accuracy_b - mean confidence_b|``. 0 is perfectly calibrated; it is a fraction (not %).

    Args:
        probs: (n_cells, n_labels) predicted probabilities (rows summing to 1).
        labels: (n_cells,) int codes of the true labels (columns of ``probs``).
        n_bins: number of bins (15, as Guo et al.).

    Raises:
        CellvaeInputError: mismatched shapes, codes out of range, non-finite values, ``n_bins`` < 1.
    """
    p, y = _check(probs, labels)
    if int(n_bins) < 1:
        raise CellvaeInputError(f"n_bins must be at least 1, got {n_bins}.")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in range(int(n_bins)):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature ``T`` minimising the mean negative log-likelihood ``-log softmax(logits / T)[label]`` of known
    labels (Guo et al. 2017, Sec. 4.2), searched on a log scale in :data:`TEMPERATURE_RANGE`.

    Args:
        logits: (n_cells, n_labels) classifier logits of cells with known labels, held out from training.
        labels: (n_cells,) int codes of their labels.

    Returns:
        ``T`` > 0 (1: the classifier was calibrated; > 1: it was over-confident).

    Raises:
        CellvaeInputError: as :func:`expected_calibration_error`.
    """
    from scipy.optimize import minimize_scalar

    z, y = _check(logits, labels)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]))

    lo, hi = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))
