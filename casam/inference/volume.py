"""3D segmentation from prompts on one slice: the slice's mask propagated slice by slice.

Each next slice is prompted with the tight box of the previous slice's mask (SAM's most reliable prompt);
propagation stops in a direction when the object ends: the mask vanishes or shrinks below ``min_area``, the
decoder's predicted IoU drops below ``min_iou``, or it no longer overlaps the previous slice. With a time
budget (an interactive click), slices not encoded yet stop propagation once the budget is spent: the answer
comes back in time with the slices at hand, and says where it stopped (``pending``).
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from casam.errors import ImageError, PromptError
from casam.inference.predictor import AUTO, CASAMPredictor
from casam.prompts.masks import tight_box


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    return float(inter / max(1, min(a.sum(), b.sum())))


def segment_volume(predictor: CASAMPredictor, volume: np.ndarray, slice_index: int, points=None, point_labels=None,
                   box=None, layer: str = AUTO, key: Optional[str] = None, min_area: int = 10, min_iou: float = 0.5,
                   min_overlap: float = 0.3, max_slices: Optional[int] = None,
                   slice_range: Optional[Tuple[int, int]] = None,
                   budget_s: Optional[float] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Segments an object in a volume from prompts on one slice.

    Both directions advance one slice at a time, a slice whose embedding is cached first, else the direction
    nearer the prompted slice; each direction's masks are the same whatever the order.

    Args:
        predictor: the CA-SAM predictor.
        volume: D×H×W array, slices along axis 0.
        slice_index: the prompted slice.
        points, point_labels, box: prompts on that slice, (x = column, y = row) in the slice's pixels.
        layer: "auto" (routed once on the prompted slice and kept for the volume), "none" or a layer name.
        key: cache key prefix for the slice embeddings (slice index appended).
        min_area: smallest mask (pixels) that continues propagation.
        min_iou: smallest predicted IoU that continues propagation.
        min_overlap: smallest overlap with the previous slice's mask that continues propagation.
        max_slices: propagate at most this many slices each way (None: to the volume's end).
        slice_range: (first, last) slices propagation may reach (e.g. a 3D ROI's extent); None = the whole volume.
        budget_s: no slice is encoded that would end after this many seconds (judged by the last slice encoded):
            propagation then goes on only through slices whose embeddings are cached (e.g. encoded in the
            background) and stops at the first slice that is not. None: no time budget.

    Returns:
        (D×H×W uint8 mask, info dict with ``route`` (the prompted slice's :class:`~casam.inference.routing.Routing`),
        ``slices`` [first, last], ``iou`` of the prompted slice and
        ``pending``: the slices where propagation stopped for the time budget, each the next slice of its
        direction, not encoded yet; empty when the object's whole extent was followed).

    Raises:
        ImageError: not a 3D volume. PromptError: bad prompts or slice index.
    """
    t0 = time.monotonic()
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ImageError(f"a volume must be 3D (D×H×W), got shape {vol.shape}")
    d = vol.shape[0]
    if not 0 <= int(slice_index) < d:
        raise PromptError(f"slice {slice_index} outside the volume (0..{d - 1})")
    s0 = int(slice_index)

    def k(i: int) -> Optional[str]:
        return f"{key}:{i}" if key is not None else None

    out = np.zeros(vol.shape, np.uint8)
    first = predictor.predict(vol[s0], points, point_labels, box, layer=layer, key=k(s0))
    out[s0] = first.mask
    route = first.route
    lo = hi = s0
    lo_k, hi_k = slice_range if slice_range is not None else (0, d - 1)
    limit = d if max_slices is None else max_slices

    def inside(i: int) -> bool:
        return max(0, lo_k) <= i <= min(d - 1, hi_k) and abs(i - s0) <= limit

    fronts = ({step: (first.mask, s0 + step) for step in (-1, 1) if inside(s0 + step)}
              if first.mask.sum() >= min_area else {})
    pending, slice_s = [], time.monotonic() - t0  # slice_s: the last slice that was not cached took this long
    while fronts:
        ready = [st for st, (_, i) in fronts.items() if key is not None and predictor.cached(k(i))]
        if ready:
            step = ready[0]
        elif budget_s is None or time.monotonic() - t0 + slice_s <= budget_s:  # the next encode ends in time
            step = min(fronts, key=lambda st: abs(fronts[st][1] - s0))
        else:
            pending = sorted(i for _, i in fronts.values())
            break
        prev, i = fronts.pop(step)
        t1 = time.monotonic()
        p = predictor.predict(vol[i], box=tight_box(prev), key=k(i), route=route)
        if not ready:
            slice_s = time.monotonic() - t1
        m = p.mask
        if m.sum() < min_area or p.iou < min_iou or _overlap(m, prev) < min_overlap:
            continue
        out[i] = m
        lo, hi = min(lo, i), max(hi, i)
        if inside(i + step):
            fronts[step] = (m, i + step)
    return out, {"route": route, "slices": [lo, hi], "iou": first.iou, "pending": pending}
