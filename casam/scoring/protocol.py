"""Click sequences as interactive-segmentation benchmarks score them.

A sequence starts with one prompt — a click at the object's centre (the foreground pixel nearest its centroid) or
its tight box; every next click goes to the centre of the largest error region of the current mask — a foreground
click where the mask misses the object, a background click where it spills over — the point of that region
farthest from its border (the protocol of the CVPR 2025 interactive 3D segmentation challenge). IoU, Dice and the
seconds of each answer are recorded after each step; the area under the IoU curve and the steps to IoU 0.8 / 0.9
(NoC@80 / NoC@90) summarise sequences.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from casam.prompts.masks import centroid_point, tight_box
from casam.scoring.metrics import dice, iou

# predict(points N×2 (x, y), labels N, box (x0, y0, x1, y1) or None) -> H×W bool mask
PredictFn = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], np.ndarray]

# IoU thresholds of the number-of-clicks summaries (NoC@80, NoC@90).
NOC_THRESHOLDS = (0.8, 0.9)


def next_click(pred: np.ndarray, truth: np.ndarray) -> Optional[Tuple[np.ndarray, int]]:
    """The corrective click for a mask: the centre of its largest error region.

    Args:
        pred: H×W bool prediction.
        truth: H×W bool ground truth.

    Returns:
        ((x, y) as a 1×2 float array, label 1 for a missed region / 0 for a spill), or None when the mask is exact.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    best = None
    for err, label in ((truth & ~pred, 1), (pred & ~truth, 0)):
        comp, n = ndimage.label(err)
        if n == 0:
            continue
        sizes = ndimage.sum(err, comp, range(1, n + 1))
        i = int(np.argmax(sizes))
        if best is None or sizes[i] > best[0]:
            best = (sizes[i], comp == i + 1, label)
    if best is None:
        return None
    inside = np.pad(best[1], 1)  # the image border counts as the region's border
    dist = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([[x, y]], np.float32), best[2]


def click_sequence(predict: PredictFn, truth: np.ndarray, clicks: int = 5,
                   first: str = "click") -> Dict[str, List[float]]:
    """Runs one interaction sequence on one object: a first prompt, then corrective clicks.

    Args:
        predict: maps the interaction so far — all clicks (N×2 (x, y), N labels) and the drawn box (x0, y0, x1, y1)
            or None — to a mask, as a client resending its clicks does.
        truth: H×W bool ground truth.
        clicks: answers in the sequence: the first prompt's and ``clicks - 1`` corrective clicks'.
        first: ``click`` (one click at the object's centre) or ``box`` (its tight box, no click).

    Returns:
        ``iou``, ``dice`` and ``seconds`` (of each ``predict``) after each step (an exact mask keeps its scores for
        the remaining steps, at 0 s).

    Raises:
        ValueError: unknown ``first``.
    """
    truth = np.asarray(truth, bool)
    if first == "click":
        pts, labs, box = centroid_point(truth), np.ones(1, np.int64), None
    elif first == "box":
        pts, labs, box = np.zeros((0, 2), np.float32), np.zeros(0, np.int64), tight_box(truth)
    else:
        raise ValueError(f"unknown first prompt {first!r}")
    out: Dict[str, List[float]] = {"iou": [], "dice": [], "seconds": []}
    for c in range(clicks):
        t0 = time.perf_counter()
        pred = np.asarray(predict(pts, labs, box), bool)
        out["seconds"].append(round(time.perf_counter() - t0, 4))
        out["iou"].append(iou(pred, truth))
        out["dice"].append(dice(pred, truth))
        if c == clicks - 1:
            break
        nxt = next_click(pred, truth)
        if nxt is None:
            for k in ("iou", "dice"):
                out[k] += [out[k][-1]] * (clicks - c - 1)
            out["seconds"] += [0.0] * (clicks - c - 1)
            break
        pts, labs = np.concatenate([pts, nxt[0]]).astype(np.float32), np.concatenate([labs, [nxt[1]]]).astype(np.int64)
    return out


def clicks_to(ious: Sequence[float], threshold: float) -> int:
    """Number of steps (the first prompt counts as one) until IoU first reaches ``threshold`` — NoC@threshold;
    ``len(ious) + 1`` when it never does (the cap: more than the sequence had)."""
    for k, v in enumerate(ious):
        if v >= threshold:
            return k + 1
    return len(ious) + 1


def summarise(curves: Sequence[Dict[str, List[float]]]) -> Dict[str, object]:
    """Mean IoU/Dice (and seconds) after each step over many sequences, the area under the IoU curve (mean IoU over
    the steps, in [0, 1]), whether the mean curve never drops from one step to the next, and the mean steps to IoU
    0.8 and 0.9 (``noc80``, ``noc90``: :func:`clicks_to`, capped at the steps + 1)."""
    if not curves:
        return {"iou": [], "dice": [], "auc_iou": None, "monotone": None, "n": 0}
    m_iou = np.mean([c["iou"] for c in curves], 0)
    m_dice = np.mean([c["dice"] for c in curves], 0)
    out = {"iou": [round(float(v), 4) for v in m_iou], "dice": [round(float(v), 4) for v in m_dice],
           "auc_iou": round(float(np.mean(m_iou)), 4), "monotone": bool(np.all(np.diff(m_iou) >= -1e-9)),
           "n": len(curves)}
    for t in NOC_THRESHOLDS:
        out[f"noc{round(100 * t)}"] = round(float(np.mean([clicks_to(c["iou"], t) for c in curves])), 3)
    if all("seconds" in c for c in curves):
        out["seconds"] = [round(float(v), 4) for v in np.mean([c["seconds"] for c in curves], 0)]
    return out
