"""Prompts derived from masks: tight boxes, jittered boxes, centroid points (CA-SAM's prompt sampling).

All coordinates are (x = column, y = row) pixel coordinates of the image the mask belongs to; boxes are
``(x0, y0, x1, y1)`` with inclusive pixel corners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from casam.errors import ImageError, PromptError

# The prompt types casam trains, validates, gates and scores: a box, and a click answered through box proposals.
BOX, CLICK = "box", "click"
PROMPT_TYPES = (BOX, CLICK)

# Most masks (one per class, the smallest class ids first) that one label map gives.
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


@dataclass
class SlicePrompts:
    """Prompts of one interaction, resolved to one slice of the image.

    Attributes:
        slice: the prompted slice (0 for a 2D picture).
        points: N×2 (x, y) pixel coordinates on that slice, or None.
        labels: N labels (1 foreground, 0 background), or None.
        box: (x0, y0, x1, y1) on that slice, or None.
        slice_range: (first, last) slice the object may span (from a 3D ROI), or None.
        ignored: points given on other slices (not used).
    """

    slice: int
    points: Optional[np.ndarray]
    labels: Optional[np.ndarray]
    box: Optional[np.ndarray]
    slice_range: Optional[Tuple[int, int]] = None
    ignored: List[List[int]] = field(default_factory=list)


def _voxels(points: Optional[Sequence], ndim: int, what: str) -> List[List[int]]:
    out = []
    for p in points or []:
        try:
            v = [int(round(float(c))) for c in p]
        except (TypeError, ValueError) as e:
            raise PromptError(f"{what} point {p!r} is not a list of numbers") from e
        if len(v) not in (2, 3):
            raise PromptError(f"{what} point {p!r} must be [i, j] or [i, j, k]")
        out.append(v + [0] * (3 - len(v)))
    return out


def voxel_prompts(shape: Sequence[int], is_volume: bool, foreground: Optional[Sequence] = None,
                  background: Optional[Sequence] = None, roi: Optional[Sequence] = None,
                  slice_index: Optional[int] = None) -> SlicePrompts:
    """Resolves prompts in voxel indices (as 3D Slicer and OHIF send them) to one slice.

    Points are ``[i, j, k]`` = (column, row, slice); a ROI is ``[i0, i1, j0, j1]`` or
    ``[i0, i1, j0, j1, k0, k1]`` (a pair may come reversed); a ROI spanning several slices also bounds the
    propagation, a flat one only picks the slice. The prompted slice is ``slice_index`` when given,
    else the slice of the first foreground point, else the middle of the ROI's slice range.

    Args:
        shape: D×H×W for a volume, H×W(×C) for a 2D picture.
        is_volume: whether ``shape`` is a volume.
        foreground, background: lists of voxel indices.
        roi: the box.
        slice_index: the slice, for 2D models working on one slice of a volume.

    Returns:
        The SlicePrompts.

    Raises:
        PromptError: malformed prompts, a point or box outside the image, or no prompt at all.
    """
    d, h, w = (int(shape[0]), int(shape[1]), int(shape[2])) if is_volume else (1, int(shape[0]), int(shape[1]))
    fg, bg = _voxels(foreground, 3, "foreground"), _voxels(background, 3, "background")
    for p in fg + bg:
        if not (0 <= p[0] < w and 0 <= p[1] < h and 0 <= p[2] < d):
            raise PromptError(f"point {p} is outside the image (i < {w}, j < {h}, k < {d})")
    box = k_range = None
    if roi is not None and len(roi) > 0:
        try:
            r = [float(v) for v in roi]
        except (TypeError, ValueError) as e:
            raise PromptError(f"roi {roi!r} is not a list of numbers") from e
        if len(r) not in (4, 6):
            raise PromptError(f"roi must be [i0, i1, j0, j1] or [i0, i1, j0, j1, k0, k1], got {roi!r}")
        (i0, i1), (j0, j1) = sorted(r[0:2]), sorted(r[2:4])
        if i1 < 0 or j1 < 0 or i0 > w - 1 or j0 > h - 1:
            raise PromptError(f"roi {roi!r} lies outside the image ({w}×{h})")
        box = np.array([max(i0, 0), max(j0, 0), min(i1, w - 1), min(j1, h - 1)], np.float32)
        if len(r) == 6 and is_volume:
            k0, k1 = sorted(r[4:6])
            if k1 < 0 or k0 > d - 1:
                raise PromptError(f"roi {roi!r} lies outside the volume's slices (0..{d - 1})")
            k_range = (int(max(np.floor(k0), 0)), int(min(np.ceil(k1), d - 1)))
            if k_range[0] == k_range[1]:  # a flat box drawn on one slice: it picks the slice, not the extent
                k, k_range = k_range[0], None
                slice_index = k if slice_index is None else slice_index
    if slice_index is not None:
        try:
            k = int(slice_index)
        except (TypeError, ValueError) as e:
            raise PromptError(f"slice must be an integer, got {slice_index!r}") from e
        if not 0 <= k < d:
            raise PromptError(f"slice {k} is outside the image (0..{d - 1})")
    elif fg:
        k = fg[0][2]
    elif k_range is not None:
        k = (k_range[0] + k_range[1]) // 2
    elif box is not None and d == 1:
        k = 0
    else:
        raise PromptError("give a foreground point, or a box (roi) with its slice")
    on = [(p, 1) for p in fg if p[2] == k] + [(p, 0) for p in bg if p[2] == k]
    ignored = [p for p in fg + bg if p[2] != k]
    pts = np.array([[p[0], p[1]] for p, _ in on], np.float32) if on else None
    labs = np.array([lab for _, lab in on], np.int64) if on else None
    if box is None and (labs is None or not (labs == 1).any()):
        raise PromptError(f"no foreground point on slice {k} and no box")
    return SlicePrompts(k, pts, labs, box, k_range, ignored)
