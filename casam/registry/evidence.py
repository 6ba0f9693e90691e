"""The gate's rule: serve a layer for a prompt type only where validation shows it beats plain SAM.

On the layer's validation masks (patients it was not trained on) each mask gives a paired gain
``d = IoU(layer) − IoU(plain SAM)``. The layer serves that prompt type when the mean gain is at least
:data:`GATE_MIN_GAIN` **and** more than :data:`GATE_SE` standard errors of the mean above zero, on at least
:data:`GATE_MIN_MASKS` masks. A layer whose gain is noise stays out; a layer that helps clearly on every mask is
served even on few masks; one mask is no evidence (its standard error cannot be measured), so a layer validated
on one mask serves neither prompt type.

:func:`decide` is the rule; :meth:`casam.registry.store.LayerInfo.serves` reads the decision a layer was stored
with (``extra["use"]``), and for a layer stored without per-prompt validation records falls back to the box rule
``val_iou > zero_shot_val_iou``.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np

# Smallest mean paired IoU gain over plain SAM that counts: a smaller gain is not worth serving a layer for.
GATE_MIN_GAIN = 0.005

# How many standard errors of the mean the gain must clear, so that a gain within noise does not count.
GATE_SE = 2.0

# Fewest validation masks that count as evidence: one mask has no spread to measure.
GATE_MIN_MASKS = 2


def decide(layer: Sequence[float], plain: Sequence[float], min_gain: float = GATE_MIN_GAIN,
           se_factor: float = GATE_SE, min_masks: int = GATE_MIN_MASKS) -> Dict[str, object]:
    """Whether the evidence of paired per-mask IoUs lets a layer serve.

    Args:
        layer: IoU of each validation mask with the layer.
        plain: IoU of the same masks with plain SAM.
        min_gain: smallest mean gain that counts.
        se_factor: how many standard errors of the mean gain it must clear.
        min_masks: fewest masks (with a finite gain) that count as evidence.

    Returns:
        ``use`` (bool), ``gain`` (mean), ``se`` (its standard error, 0 for one mask), ``n`` (masks).

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(layer) != len(plain):
        raise ValueError(f"{len(layer)} layer scores but {len(plain)} plain SAM scores")
    d = np.asarray(layer, dtype=np.float64) - np.asarray(plain, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return {"use": False, "gain": None, "se": None, "n": 0}
    gain = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    use = len(d) >= max(1, min_masks) and gain >= min_gain and gain > se_factor * se
    return {"use": bool(use), "gain": round(gain, 5), "se": round(se, 5), "n": int(len(d))}
