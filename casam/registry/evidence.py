"""The gate's rule: serve a layer for a prompt type only where validation shows it beats plain SAM.

On the layer's validation masks (patients it was not trained on) each mask gives a paired gain
``d = IoU(layer) − IoU(plain SAM)``. The layer serves that prompt type when the mean gain is at least
:data:`GATE_MIN_GAIN` **and** more than :data:`GATE_SE` standard errors of the mean above zero, on at least
:data:`GATE_MIN_MASKS` masks. A layer whose gain is noise stays out; a layer that helps clearly on every mask is
served even on few masks; one mask is no evidence (its standard error cannot be measured), so a layer validated
on one mask serves neither prompt type.

Where the validation masks come from: an institution with many labels holds out a share of its patients, and the
layer it serves is validated on them. With few labels a hold-out would leave one or two masks and throw the rest of
the evidence away, so up to :data:`casam.training.config.CV_MAX_IMAGES` images (9) every label is validated by a
model that did not see it instead:
:data:`casam.training.config.CV_FOLDS`-fold cross-validation over patients (over images when there is one
patient), each fold's model trained with the served layer's recipe on the other folds. The
paired gains of all folds are pooled (:func:`decide_pooled`) and the same rule decides; the layer then served is
trained on every label, so the evidence is that of the same recipe on about half the labels.

:func:`decide` is the rule; :meth:`casam.registry.store.LayerInfo.serves` reads the decision a layer was stored
with (``extra["use"]``), and for a layer stored without per-prompt validation records falls back to the box rule
``val_iou > zero_shot_val_iou``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

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
    return _verdict(gain, se, len(d), min_gain, se_factor, min_masks)


def _verdict(gain: float, se: float, n: int, min_gain: float, se_factor: float, min_masks: int) -> Dict[str, object]:
    """The rule on a mean gain, its standard error and the number of masks (:func:`decide`'s record)."""
    use = n >= max(1, min_masks) and gain >= min_gain and gain > se_factor * se
    return {"use": bool(use), "gain": round(gain, 5), "se": round(se, 5), "n": int(n)}


def decide_pooled(parts: Sequence[Tuple[Sequence[float], Sequence[float]]], min_gain: float = GATE_MIN_GAIN,
                  se_factor: float = GATE_SE, min_masks: int = GATE_MIN_MASKS) -> Dict[str, object]:
    """:func:`decide` on the paired IoUs of several disjoint validation sets pooled, e.g. the held-out folds of a
    cross-validation, each scored by the fold's own model.

    Each part is checked on its own before pooling, so that a part with one score too many cannot pair its scores
    with another part's.

    Args:
        parts: per validation set, (IoU of each mask with the layer, IoU of the same masks with plain SAM).
        min_gain, se_factor, min_masks: as in :func:`decide`.

    Returns:
        :func:`decide`'s record of the pooled masks.

    Raises:
        ValueError: a part's two lists differ in length.
    """
    for k, (layer, plain) in enumerate(parts):
        if len(layer) != len(plain):
            raise ValueError(f"validation set {k}: {len(layer)} layer scores but {len(plain)} plain SAM scores")
    return decide([x for layer, _ in parts for x in layer], [x for _, plain in parts for x in plain], min_gain,
                  se_factor, min_masks)


def pool_decisions(parts: Sequence[Optional[Dict[str, object]]], min_gain: float = GATE_MIN_GAIN,
                   se_factor: float = GATE_SE, min_masks: int = GATE_MIN_MASKS) -> Dict[str, object]:
    """The rule on the union of disjoint validation sets from :func:`decide`'s records of each (their count, mean
    gain and standard error), for evidence whose per-mask values are not at hand (e.g. the click sequences of
    :func:`casam.training.head.click_evidence`, one record per fold).

    The pooled mean is the count-weighted mean; the pooled standard deviation adds each part's sum of squares
    (recovered from its standard error) and the spread of the part means around the pooled mean. The result equals
    :func:`decide` on the pooled values up to the records' rounding (5 decimals).

    Args:
        parts: :func:`decide` records (None and records of no mask are skipped).
        min_gain, se_factor, min_masks: as in :func:`decide`.

    Returns:
        :func:`decide`'s record of the pooled masks.
    """
    parts = [p for p in parts if p and p.get("n") and p.get("gain") is not None]
    n = sum(int(p["n"]) for p in parts)
    if n == 0:
        return {"use": False, "gain": None, "se": None, "n": 0}
    gain = sum(int(p["n"]) * float(p["gain"]) for p in parts) / n
    ss = sum((int(p["n"]) - 1) * int(p["n"]) * float(p["se"]) ** 2 + int(p["n"]) * (float(p["gain"]) - gain) ** 2
             for p in parts)
    se = math.sqrt(ss / (n - 1)) / math.sqrt(n) if n > 1 else 0.0
    return _verdict(gain, se, n, min_gain, se_factor, min_masks)
