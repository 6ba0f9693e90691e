"""Segmentation and continual-learning metrics.

Segmentation: IoU, Dice, boundary IoU (Cheng et al. 2021). Continual: the matrix R[k, j] (score on task j
after learning task k), final average, backward transfer (BWT) and forgetting.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from scipy import ndimage


def _pair(pred: np.ndarray, gt: np.ndarray):
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    return p, g


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two binary masks (1.0 when both are empty)."""
    p, g = _pair(pred, gt)
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty)."""
    p, g = _pair(pred, gt)
    s = p.sum() + g.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(p, g).sum() / s)


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~eroded


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU: IoU of the inner bands of width d = ratio × image diagonal (at least 1 px)."""
    p, g = _pair(pred, gt)
    width = max(1, int(round(dilation_ratio * np.hypot(*p.shape))))
    bp, bg = _boundary(p, width), _boundary(g, width)
    union = np.logical_or(bp, bg).sum()
    return 1.0 if union == 0 else float(np.logical_and(bp, bg).sum() / union)


def continual_summary(R: Sequence[Sequence[float]]) -> Dict[str, float]:
    """Summarises a lower-triangular continual matrix.

    Args:
        R: T rows (row k = scores after learning task k on tasks 0..k; longer rows and None entries beyond
            the diagonal are ignored), e.g. a ragged lower-triangular list.

    Returns:
        dict with ``avg`` (mean of the last row), ``bwt`` (mean over j < T of R[T, j] − R[j, j]) and
        ``forgetting`` (mean over j < T of max_{k<T} R[k, j] − R[T, j]). BWT and forgetting are 0 for T = 1.
    """
    T = len(R)
    A = np.full((T, T), np.nan)
    for k, row in enumerate(R):
        for j in range(k + 1):
            A[k, j] = np.nan if row[j] is None else float(row[j])
    last = A[T - 1, :T]
    if T == 1:
        return {"avg": float(last.mean()), "bwt": 0.0, "forgetting": 0.0}
    bwt = float(np.mean([A[T - 1, j] - A[j, j] for j in range(T - 1)]))
    forgetting = float(np.mean([A[j:T - 1, j].max() - A[T - 1, j] for j in range(T - 1)]))
    return {"avg": float(last.mean()), "bwt": bwt, "forgetting": forgetting}
