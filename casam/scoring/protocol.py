"""Click sequences as interactive-segmentation benchmarks score them.

The first click goes to the object's centre (the foreground pixel nearest its centroid); every next click
goes to the centre of the largest error region of the current mask — a foreground click where the mask
misses the object, a background click where it spills over — the point of that region farthest from its
border (the protocol of the CVPR 2025 interactive 3D segmentation challenge). IoU and Dice are recorded
after each click, and the area under the IoU curve summarises a sequence.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from casam.prompts.masks import centroid_point
from casam.scoring.metrics import dice, iou

# predict(points N×2 (x, y), labels N) -> H×W bool mask
PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


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


def click_sequence(predict: PredictFn, truth: np.ndarray, clicks: int = 5) -> Dict[str, List[float]]:
    """Runs one click sequence on one object.

    Args:
        predict: maps all clicks so far (N×2 (x, y), N labels) to a mask, as a client resending its clicks does.
        truth: H×W bool ground truth.
        clicks: number of clicks.

    Returns:
        ``iou`` and ``dice`` after each click (an exact mask keeps its score for the remaining clicks).
    """
    truth = np.asarray(truth, bool)
    pts, labs = centroid_point(truth), np.ones(1, np.int64)
    out: Dict[str, List[float]] = {"iou": [], "dice": []}
    for c in range(clicks):
        pred = np.asarray(predict(pts, labs), bool)
        out["iou"].append(iou(pred, truth))
        out["dice"].append(dice(pred, truth))
        if c == clicks - 1:
            break
        nxt = next_click(pred, truth)
        if nxt is None:
            for k in out:
                out[k] += [out[k][-1]] * (clicks - c - 1)
            break
        pts, labs = np.concatenate([pts, nxt[0]]), np.concatenate([labs, [nxt[1]]])
    return out


def summarise(curves: Sequence[Dict[str, List[float]]]) -> Dict[str, object]:
    """Mean IoU/Dice after each click over many sequences, the area under the IoU curve (mean IoU over the
    clicks, in [0, 1]) and whether the mean curve never drops from one click to the next."""
    if not curves:
        return {"iou": [], "dice": [], "auc_iou": None, "monotone": None, "n": 0}
    m_iou = np.mean([c["iou"] for c in curves], 0)
    m_dice = np.mean([c["dice"] for c in curves], 0)
    return {"iou": [round(float(v), 4) for v in m_iou], "dice": [round(float(v), 4) for v in m_dice],
            "auc_iou": round(float(np.mean(m_iou)), 4), "monotone": bool(np.all(np.diff(m_iou) >= -1e-9)),
            "n": len(curves)}
