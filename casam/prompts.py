"""Prompts derived from masks: tight boxes, jittered boxes, centroid points (METHOD.md's sampling).

All coordinates are (x = column, y = row) pixel coordinates of the image the mask belongs to; boxes are
``(x0, y0, x1, y1)`` with inclusive pixel corners.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .errors import ImageError

MAX_MASKS_PER_IMAGE = 5


def binary_masks(label: np.ndarray, max_masks: int = MAX_MASKS_PER_IMAGE) -> List[Tuple[int, np.ndarray]]:
    """Splits a label map of class ids into one binary mask per class present (0 = background).

    Args:
        label: H×W integer label map.
        max_masks: keep at most this many classes (the smallest ids first).

    Returns:
        List of (class id, H×W bool mask).

    Raises:
        ImageError: the label is not 2D.
    """
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[-1] in (1, 3, 4):
        label = label[..., 0]
    if label.ndim != 2:
        raise ImageError(f"a label must be 2D, got shape {label.shape}")
    classes = [int(c) for c in np.unique(label) if c != 0][:max_masks]
    return [(c, label == c) for c in classes]


def tight_box(mask: np.ndarray) -> np.ndarray:
    """Returns the tight (x0, y0, x1, y1) box of a non-empty binary mask.

    Raises:
        ImageError: the mask is empty.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ImageError("empty mask: no box")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def jittered_box(box: np.ndarray, rng: np.random.Generator, hw: Tuple[float, float], jitter: float = 5.0) -> np.ndarray:
    """Moves each side of a box by a uniform random offset in ±``jitter`` pixels, clipped to ``hw``.

    Args:
        box: (x0, y0, x1, y1).
        rng: random generator.
        hw: (height, width) of the frame the box lives in.
        jitter: maximal offset in pixels (5 in CA-SAM).

    Returns:
        The jittered (x0, y0, x1, y1), still ordered.
    """
    h, w = hw
    b = np.asarray(box, dtype=np.float32) + rng.uniform(-jitter, jitter, size=4).astype(np.float32)
    x0, x1 = sorted((float(np.clip(b[0], 0, w)), float(np.clip(b[2], 0, w))))
    y0, y1 = sorted((float(np.clip(b[1], 0, h)), float(np.clip(b[3], 0, h))))
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def central_pixels(mask: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Returns the (x, y) foreground pixels nearest the centroid, the closest ``fraction`` of them, nearest first."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ImageError("empty mask: no point")
    d = (xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2
    order = np.argsort(d, kind="stable")[: max(1, int(np.ceil(len(xs) * fraction)))]
    return np.stack([xs[order], ys[order]], axis=1).astype(np.float32)


def centroid_point(mask: np.ndarray) -> np.ndarray:
    """The foreground pixel nearest the mask's centroid (inside the object even when it is not convex), as 1×2."""
    return central_pixels(mask, fraction=0.0)[:1]


def random_central_point(mask: np.ndarray, rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    """A random pixel among the ``fraction`` of foreground pixels nearest the centroid, as 1×2."""
    pix = central_pixels(mask, fraction)
    return pix[rng.integers(len(pix))][None]
