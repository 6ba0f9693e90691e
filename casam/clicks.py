"""Clicks answered by a box-trained decoder: click → box proposals → the self-consistent mask.

LiteMedSAM's decoder was fine-tuned with boxes only, so a point prompt alone gives almost nothing (IoU
0.00–0.04). The same frozen decoder answers boxes well, so a click is turned into boxes:

1. **Proposals**: square boxes of several sizes around the foreground clicks (the clicks' bounding box,
   grown by each half-size), decoded in one batch.
2. **Refinement**: the best proposals' masks (by predicted IoU and the clicks) give their own tight boxes
   (grown to hold every foreground click), decoded once more. A box that fits its object reproduces it; a box
   too small or too large does not.
3. **Choice**: each refined mask is scored by the decoder's predicted IoU, its self-consistency (the IoU
   between the proposal's mask and its refined mask: a box that fits its object is a fixed point) and the
   clicks: every foreground click inside, every background click outside. (Measured on 16 brain-MRI test
   masks: predicted IoU alone 0.39, with self-consistency 0.53, the best proposal 0.64; dermoscopy 0.81 →
   0.82 of 0.86.)
4. **Background clicks** the chosen mask still covers cut away the part of the mask nearer to them than
   to any foreground click, so a background click always removes what it was put on.

Everything works in the decoder's low-resolution frame and on an embedding that may already have passed
an Alignment Layer, so the same code serves plain SAM and every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

# Half-sizes of the proposal boxes in pixels of a 256² model frame (scaled for other input sizes).
HALF_SIZES = (16, 24, 32, 44, 60, 80, 104, 128)
REFERENCE_SIZE = 256

Decode = Callable[[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ClickConfig:
    """How clicks become boxes.

    Attributes:
        half_sizes: half-sizes of the proposal boxes around the clicks (pixels of a 256² frame).
        refine: decode the best proposals' own tight boxes once more.
        refine_top: how many proposals (by predicted IoU and the clicks) are refined (measured on brain MRI: the
            best 4 of 7 sizes choose as well as refining all of them, in 11 decodes instead of 14).
        consistency: weight of a proposal's self-consistency (IoU of its mask and its refined mask).
        click_weight: weight of the clicks' consistency (foreground inside, background outside).
        with_points: also give the clicks to the decoder beside each box.
        cut_background: remove the part of the mask nearer to a covered background click than to any
            foreground click.
    """

    half_sizes: Sequence[float] = HALF_SIZES
    refine: bool = True
    refine_top: int = 4
    consistency: float = 1.0
    click_weight: float = 1.0
    with_points: bool = False
    cut_background: bool = True


def _paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of row k of ``a`` with row k of ``b`` (K×P boolean masks) → K."""
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def _tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x0, y0, x1, y1) of K boolean L×L masks (an empty mask gives a NaN box)."""
    k, L, _ = masks.shape
    out = torch.full((k, 4), float("nan"))
    rows, cols = masks.any(2), masks.any(1)
    idx = torch.arange(L, dtype=torch.float32)
    for i in range(k):
        if rows[i].any():
            ys, xs = idx[rows[i]], idx[cols[i]]
            out[i] = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()])
    return out


def _clip(boxes: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    h, w = hw
    b = boxes.clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, w - 1)
    b[:, 1::2] = b[:, 1::2].clamp(0, h - 1)
    return b


def _at(masks: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Values of K L×L masks at N (x, y) low-res points → K×N."""
    L = masks.shape[-1]
    xi = pts[:, 0].round().long().clamp(0, L - 1)
    yi = pts[:, 1].round().long().clamp(0, L - 1)
    return masks[:, yi, xi]


def cut_background(mask: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Removes from an L×L mask the pixels nearer to a covered background click than to every foreground click.

    Args:
        mask: L×L bool.
        fg, bg: N×2 and M×2 (x, y) clicks in the same frame.

    Returns:
        The edited mask (the input when no background click is covered).
    """
    if len(bg) == 0 or len(fg) == 0:
        return mask
    covered = bg[_at(mask[None], bg)[0]]
    if len(covered) == 0:
        return mask
    L = mask.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(L, dtype=torch.float32), torch.arange(L, dtype=torch.float32), indexing="ij")
    grid = torch.stack([xx, yy], -1).reshape(-1, 2)
    d_fg = torch.cdist(grid, fg.float()).min(1).values
    d_bg = torch.cdist(grid, covered.float()).min(1).values
    return mask & (d_fg <= d_bg).reshape(L, L)


@torch.no_grad()
def decode_clicks(decode: Decode, points: np.ndarray, labels: np.ndarray, frame_hw: Tuple[int, int], img_size: int,
                  lowres: int, config: Optional[ClickConfig] = None,
                  box: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Answers clicks with the box-prompted decoder.

    Args:
        decode: ``decode(points K×N×2, labels K×N, boxes K×4) → (logits K×1×L×L, iou K×1)`` on one embedding
            (model-frame coordinates), e.g. ``functools.partial(backbone.decode, z)``.
        points: N×2 (x, y) clicks in the model frame.
        labels: N labels (1 foreground, 0 background); at least one foreground.
        frame_hw: (height, width) of the image inside the model frame (the resized image, before padding).
        img_size: side of the model input.
        lowres: side L of the decoder's logits.
        config: settings (default :class:`ClickConfig`).
        box: a box the user drew as well (model frame): then the box is the prompt and the clicks only
            edit it (background cut, and the clicks go to the decoder with it).

    Returns:
        (logits 1×1×L×L with the choice's mask where logits > 0, predicted IoU 1×1, info dict with the
        chosen proposal's half-size, its box and the number of proposals).
    """
    cfg = config or ClickConfig()
    pts = torch.as_tensor(np.asarray(points, np.float32)).reshape(-1, 2)
    lab = torch.as_tensor(np.asarray(labels, np.int64)).reshape(-1)
    fg, bg = pts[lab == 1], pts[lab == 0]
    to_low = lowres / img_size
    scale = img_size / REFERENCE_SIZE
    hw = (int(frame_hw[0]), int(frame_hw[1]))

    def run(boxes: torch.Tensor):
        k = len(boxes)
        if cfg.with_points or box is not None:
            return decode(pts[None].expand(k, -1, -1), lab[None].expand(k, -1), boxes)
        return decode(None, None, boxes)

    if box is not None:
        logits, iou = run(torch.as_tensor(np.asarray(box, np.float32)).reshape(1, 4))
        choice = {"proposal": "box", "box": [round(float(v), 1) for v in np.asarray(box).reshape(-1)]}
        chosen = 0
    else:
        if len(fg) == 0:
            raise ValueError("decode_clicks needs at least one foreground click or a box")
        lo, hi = fg.min(0).values, fg.max(0).values
        half = torch.tensor([float(s) * scale for s in cfg.half_sizes])[:, None]
        boxes = _clip(torch.cat([lo[None] - half, hi[None] + half], 1), hw)
        logits, iou = run(boxes)
        low_fg, low_bg = fg * to_low, bg * to_low

        def clicks_ok(m: torch.Tensor) -> torch.Tensor:  # +1 all foreground clicks inside, -1 all background ones too
            if not cfg.click_weight:
                return torch.zeros(len(m))
            hit = _at(m, low_fg).float().mean(1)
            leak = _at(m, low_bg).float().mean(1) if len(bg) else torch.zeros(len(m))
            return cfg.click_weight * (hit - leak)

        first = (logits[:, 0] > 0).cpu()
        if cfg.refine:
            keep = torch.argsort(-(iou[:, 0].cpu().float() + clicks_ok(first)))[: max(1, cfg.refine_top)]
            first, boxes = first[keep], boxes[keep]
            tb = _tight_boxes(first) / to_low
            tb = torch.where(torch.isnan(tb), boxes, tb)
            tb = _clip(torch.cat([torch.minimum(tb[:, :2], lo), torch.maximum(tb[:, 2:], hi)], 1), hw)
            logits, iou = run(tb)
            boxes = tb
        else:
            keep = torch.arange(len(boxes))
        m = (logits[:, 0] > 0).cpu()
        flat = m.flatten(1)
        score = iou[:, 0].cpu().float().clone() + clicks_ok(m)
        if cfg.refine and cfg.consistency:
            score += cfg.consistency * _paired_iou(first.flatten(1), flat)
        score = torch.where(flat.any(1), score, torch.full_like(score, -1e9))
        chosen = int(torch.argmax(score))
        choice = {"proposal": "click", "half_size": float(cfg.half_sizes[int(keep[chosen])]),
                  "box": [round(float(v), 1) for v in boxes[chosen]], "proposals": len(half)}
    out = logits[chosen : chosen + 1].clone()
    if cfg.cut_background and len(bg):
        inside = cut_background(out[0, 0] > 0, fg * to_low, bg * to_low)
        out[0, 0] = torch.where(inside, out[0, 0], torch.minimum(out[0, 0], torch.tensor(-1.0)))
    return out, iou[chosen : chosen + 1], choice
