"""Clicks answered by a box-trained decoder: click → box proposals → the self-consistent mask.

LiteMedSAM's decoder was fine-tuned with boxes only, so a point prompt alone gives almost nothing. The same
frozen decoder answers boxes well, so a click is turned into boxes:

1. **Proposals**: square boxes of several sizes around the first foreground click, decoded in one batch.
2. **Re-decoding**: the best proposals' masks (by predicted IoU and the click) give their own tight boxes,
   decoded once more. A box that fits its object reproduces it; a box too small or too large does not.
3. **Choice**: a linear score of each re-decoded mask's features (:data:`FEATURES`: both predicted IoUs,
   self-consistency, stability, how central the click is, size, agreement between sizes), with weights
   fitted once on the training splits of the project's public data (``benchmarks/click_chooser.py``), plus
   the clicks (foreground inside, background outside). The answer averages the re-decoded masks' probabilities,
   weighted by a sharp softmax of these scores (:func:`fuse_proposals`): one clear winner is kept as it is,
   two sizes that score alike give what both hold.
4. **Later clicks edit the chosen box**: a foreground click the mask missed grows the box to hold it (three
   margins) or joins the mask of a small box around it (a missed part inside the box); a background click
   the mask covers moves one of the box's edges past it, or keeps the box and cuts around the click. Each
   candidate is scored by the decoder's trust, its agreement with the clicks and how little it changes the
   mask; the answer averages the candidates' probabilities by a softmax of these scores
   (:attr:`ClickConfig.edit_fuse`: what edits that score alike agree on), and the best one's box is the one
   the next click edits.
   So a new click changes the answer only where it asks to, and the answer to the first click never changes:
   of an edit's answer only the connected change that holds the click, within a few times the click's distance to
   the previous mask, is taken (:func:`confine`).
   A background click deep inside the mask (:attr:`ClickConfig.rechoose_depth`) says the first choice took a
   larger object than meant, a foreground click far from it (:attr:`ClickConfig.rechoose_far`) a smaller one:
   the answer is then chosen again among the first click's square proposals that agree with every click so
   far (:func:`rechoose`).
5. **Background clicks** the final mask still covers (no edge could move past them) cut away the part of
   the mask around them that is nearer to them than to any foreground click, so a background click always
   removes what it was put on; **foreground clicks** it still misses add a disc towards the mask
   (:func:`fill_missed`), so a foreground click always adds what it was put on.
6. **A drawn box** (3D Slicer's ROI, OHIF's rectangle) takes the first click's place: its answer is the first
   choice and every click edits it the same way (LiteMedSAM never saw points beside a box: given to the decoder
   with it, corrective clicks made a tumour's mask worse with each click).

Everything works in the decoder's low-resolution frame and on an embedding that may already have passed
an Alignment Layer, so the same code serves plain SAM and every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

# Half-sizes of the proposal boxes in pixels of a 256² model frame (scaled for other input sizes).
HALF_SIZES = (16, 24, 32, 44, 60, 80, 104, 128)
REFERENCE_SIZE = 256

# decode(points, labels, boxes) -> (logits, predicted IoU), the decoder on one embedding
Decode = Callable[[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]],
                  Tuple[torch.Tensor, torch.Tensor]]


# The chooser's features of a re-decoded proposal (see :func:`proposal_features`) and their weights, fitted by
# ``benchmarks/click_chooser.py`` on the training splits of the project's public data (one centred click per
# object, LiteMedSAM; results and command in benchmarks/results/click_chooser.json).
FEATURES = ("predicted_iou", "refined_iou", "consistency", "stability", "off_centre", "log_area", "support", "size")
CHOOSER_WEIGHTS = {"predicted_iou": 0.37, "refined_iou": 0.49, "consistency": 0.70, "stability": 0.57,
                   "off_centre": -1.17, "log_area": -0.11, "support": 0.97, "size": 0.04}


@dataclass
class ClickConfig:
    """How clicks become boxes.

    Attributes:
        half_sizes: half-sizes of the proposal boxes around the first click (pixels of a 256² frame).
        redecode: decode the best proposals' own tight boxes once more (and choose with :data:`FEATURES`).
        redecode_top: how many proposals (by predicted IoU and the clicks) are re-decoded.
        weights: the chooser's weight per feature (None: :data:`CHOOSER_WEIGHTS`).
        click_weight: weight of the clicks' consistency (foreground inside, background outside).
        with_points: also give the clicks to the decoder beside each box.
        edit: later clicks edit the first click's box (a missed foreground click grows it, a covered background
            click moves its nearest edge past the click) instead of choosing among proposals again.
        edit_margins: a foreground click's margins inside the grown box (fractions of the box's longer side),
            one candidate edit each.
        max_edge_cut: a background click moves an edge only when that keeps at least this fraction of the box.
        stay: weight of a candidate edit's (and a re-chosen proposal's) IoU with the previous mask (the answer
            that changes least, among those the decoder trusts and that agree with the clicks).
        cut_background: remove, around a background click the final mask still covers, the part nearer to it
            than to any foreground click (a local cut, see :func:`cut_background`).
        cut_reach: how far such a cut reaches, as a fraction of the click's distance to the nearest foreground
            click.
        add_local: a foreground click the mask missed may also add a local mask: square boxes of these
            half-sizes (multiples of the click's distance to the mask, at least 4 px) around the click, each
            decoded and joined to the current mask (a missed part inside the box, which growing the box cannot
            reach); the join's predicted IoU is the lower of the mask's and the local mask's.
        rechoose_depth: a covered background click at least this deep inside the mask (its distance to the mask's
            border over the mask's radius √(area/π), :func:`click_depth`) chooses again among the first click's
            proposals (:func:`rechoose`); None: never.
        rechoose_far: so does a missed foreground click at least this many mask radii away from the mask (the
            first choice took a smaller object than meant); None: never.
        fuse: answer the first click with the re-decoded proposals' probabilities averaged, weighted by a softmax of
            their chooser scores at this temperature (None: the best-scored proposal alone). Where two sizes
            score alike, the answer keeps what both agree on instead of staking all on one.
        edit_fuse: answer a later click with its candidate edits' probabilities averaged, weighted by a softmax of
            their scores (predicted IoU + the clicks' agreement + ``stay`` × IoU with the previous mask) at this
            temperature (None: the best candidate alone). The box the next click edits stays the best candidate's.
        fill: foreground clicks the final mask still misses (no edit could take them in) add a disc around them of
            this many times their distance to the mask (:func:`fill_missed`); None: never.
        fill_cap: such a disc's largest radius, in mask radii √(area/π) (at 0.5, a click far from the mask adds
            at most a quarter of the mask's area; None: no cap).
        local: a box edit's answer to a corrective click changes the mask only in the connected change that holds
            the click (:func:`confine`): a box grown towards a missed part must not also move the mask's far side.
        local_reach: and only within this many times the click's distance to the previous mask's border (the click
            sits in the middle of what it marks as wrong, so that distance says how large a change it asks for);
            None: the whole connected change. Measured on the stream's test splits (box, then 5 corrective clicks;
            benchmarks/results/click_local.md): the mean over tasks rises at every step at 3.
        local_band: and only on the click's side of the previous mask's border (a foreground click adds, a
            background click removes), no farther from that border than this many times the click's own distance
            to it (at least one pixel of the frame, and 1.5 pixels past the click): a click just outside an almost
            right mask marks a sliver along its border, not a bulge around the click. None: either side, any depth.
            Measured on the same sequences (benchmarks/results/click_band.md): at 2 every task's box-then-clicks
            curve ends at or above the box answer (polyps 0.959 → 0.957 without, → 0.965 with it) and the mean over
            tasks ends 0.714 (0.708).
    """

    half_sizes: Sequence[float] = HALF_SIZES
    redecode: bool = True
    redecode_top: int = 8
    weights: Optional[Dict[str, float]] = None
    click_weight: float = 1.0
    with_points: bool = False
    edit: bool = True
    edit_margins: Sequence[float] = (0.05, 0.15, 0.3)
    max_edge_cut: float = 0.5
    stay: float = 0.5
    cut_background: bool = True
    cut_reach: float = 0.25
    add_local: Sequence[float] = (1.0, 2.0)
    rechoose_depth: Optional[float] = 0.4
    rechoose_far: Optional[float] = 1.0
    fuse: Optional[float] = 0.05
    edit_fuse: Optional[float] = 0.2
    fill: Optional[float] = 1.0
    fill_cap: Optional[float] = 0.5
    local: bool = True
    local_reach: Optional[float] = 3.0
    local_band: Optional[float] = 2.0


# The settings that decide the answer to a single click (what a layer's click validation sees); the others only
# act on later clicks. ``fill`` belongs here: the disc also applies when the first answer misses its own click.
FIRST_CLICK_FIELDS = ("half_sizes", "redecode", "redecode_top", "weights", "click_weight", "with_points", "fuse",
                      "fill", "fill_cap")


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of row k of ``a`` with row k of ``b`` (K×P boolean masks) → K."""
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def _iou_with(masks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IoU of each of K L×L boolean masks with one L×L boolean mask → K."""
    return paired_iou(masks.flatten(1), mask.flatten()[None].expand(len(masks), -1))


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


def _hull(boxes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """K×4 boxes grown to hold the corners ``lo`` = (x0, y0) and ``hi`` = (x1, y1)."""
    return torch.cat([torch.minimum(boxes[:, :2], lo), torch.maximum(boxes[:, 2:], hi)], 1)


def _clip(boxes: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    h, w = hw
    b = boxes.clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, w - 1)
    b[:, 1::2] = b[:, 1::2].clamp(0, h - 1)
    return b


def _own_boxes(masks: torch.Tensor, fallback: torch.Tensor, fg: torch.Tensor, to_low: float,
               hw: Tuple[int, int]) -> torch.Tensor:
    """The tight boxes (model frame) of K L×L masks, grown to hold the foreground clicks ``fg`` (N×2) and clipped
    to ``hw``; an empty mask keeps its ``fallback`` box (K×4)."""
    tb = _tight_boxes(masks) / to_low
    tb = torch.where(torch.isnan(tb), fallback, tb)
    return _clip(_hull(tb, fg.min(0).values, fg.max(0).values), hw)


def _at(masks: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Values of K L×L masks at N (x, y) low-res points → K×N."""
    L = masks.shape[-1]
    xi = pts[:, 0].round().long().clamp(0, L - 1)
    yi = pts[:, 1].round().long().clamp(0, L - 1)
    return masks[:, yi, xi]


def _pixel_grid(L: int) -> torch.Tensor:
    """The (x, y) of every pixel of an L×L frame, row by row → L²×2 float32."""
    yy, xx = torch.meshgrid(torch.arange(L, dtype=torch.float32), torch.arange(L, dtype=torch.float32), indexing="ij")
    return torch.stack([xx, yy], -1).reshape(-1, 2)


def cut_background(mask: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, reach: float = 0.5) -> torch.Tensor:
    """Removes from an L×L mask, around each covered background click, the pixels nearer to it than to every
    foreground click and within ``reach`` × its distance to the nearest foreground click.

    Args:
        mask: L×L bool.
        fg, bg: N×2 and M×2 (x, y) clicks in the same frame.
        reach: how far a cut reaches, as a fraction of the click's distance to the nearest foreground click
            (a cut stays local: a background click just outside the object does not halve it).

    Returns:
        The edited mask (the input when no background click is covered).
    """
    if len(bg) == 0 or len(fg) == 0:
        return mask
    covered = bg[_at(mask[None], bg)[0]].float()
    if len(covered) == 0:
        return mask
    L = mask.shape[-1]
    grid = _pixel_grid(L)
    d_fg = torch.cdist(grid, fg.float()).min(1).values
    d_bg = torch.cdist(grid, covered)  # P×M
    radius = reach * torch.cdist(covered, fg.float()).min(1).values.clamp(min=1.0)  # M
    cut = ((d_bg < d_fg[:, None]) & (d_bg <= radius[None])).any(1)
    return mask & ~cut.reshape(L, L)


def fill_missed(logits: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, scale: float = 1.0,
                cap: Optional[float] = None) -> torch.Tensor:
    """Raises to at least +1, around each foreground click an L×L answer misses, a disc of ``scale`` × the click's
    distance to the answer's mask (at most half its distance to the nearest background click, and at most ``cap``
    × the mask's radius √(area/π)), so a foreground click always adds what it was put on.

    Args:
        logits: L×L logits (the mask is where they are > 0).
        fg, bg: N×2 and M×2 (x, y) clicks in the same frame.
        scale: the disc's radius over the click's distance to the mask (1: it reaches the mask).
        cap: the largest radius, in mask radii (None: no cap).

    Returns:
        The edited logits (the input when the mask is empty or holds every foreground click).
    """
    mask = (logits > 0).cpu()
    if len(fg) == 0 or not bool(mask.any()):
        return logits
    missed = fg[~_at(mask[None], fg)[0]].float()
    if len(missed) == 0:
        return logits
    L = mask.shape[-1]
    d_mask = torch.as_tensor(ndimage.distance_transform_edt(~mask.numpy()), dtype=torch.float32)
    radius = scale * _at(d_mask[None], missed)[0]  # N
    if len(bg):
        radius = torch.minimum(radius, 0.5 * torch.cdist(missed, bg.float()).min(1).values)
    if cap is not None:
        radius = radius.clamp(max=cap * float(np.sqrt(float(mask.sum()) / np.pi)))
    disc = (torch.cdist(_pixel_grid(L), missed) <= radius[None]).any(1).reshape(L, L).to(logits.device)
    return torch.where(disc, logits.clamp(min=1.0), logits)


def confine(prev: torch.Tensor, new: torch.Tensor, click: torch.Tensor, reach: Optional[float] = None,
            band: Optional[float] = None) -> torch.Tensor:
    """Keeps, of what a corrective click's answer changed, the connected change that holds the click.

    Args:
        prev: L×L logits before the click.
        new: L×L logits after it.
        click: (x, y) in the logits' frame.
        reach: keep changes only within this many times the click's distance to the previous mask's border
            (at least 2 px); None: the whole connected change.
        band: keep only changes on the click's side of the previous mask's border (what the click asks to flip),
            at most this many times the click's distance to that border away from it (at least 1 px, and at least
            1.5 px deeper than the click); None: both sides, any distance.

    Returns:
        L×L logits: ``new`` inside the connected region of changed pixels that holds the click, ``prev`` elsewhere
        (``prev`` itself when the click's pixel did not change).
    """
    pm = (prev > 0).cpu().numpy()
    changed = (new > 0).cpu().numpy() != pm
    L = changed.shape[-1]
    x, y = (int(v) for v in click.round().long().clamp(0, L - 1))
    if not changed[y, x]:
        return prev
    if reach is not None or band is not None:
        same = pm == pm[y, x]
        depth = ndimage.distance_transform_edt(same) if not same.all() else np.full(same.shape, float(L))
        d = float(depth[y, x])
        if reach is not None:
            yy, xx = np.ogrid[:L, :L]
            changed &= (yy - y) ** 2 + (xx - x) ** 2 <= (reach * max(d, 2.0)) ** 2
        if band is not None:  # the margin d + 1.5 keeps the pixel behind the click (its low-res cell may be offset)
            changed &= same & (depth <= max(band * max(d, 1.0), d + 1.5))
    comp, _ = ndimage.label(changed)
    keep = torch.from_numpy(comp == comp[y, x]).to(new.device)
    return torch.where(keep, new, prev)


def agreement(masks: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Share of the foreground clicks inside each of K masks minus the share of background clicks inside → K."""
    hit = _at(masks, fg).float().mean(1) if len(fg) else torch.zeros(len(masks))
    leak = _at(masks, bg).float().mean(1) if len(bg) else torch.zeros(len(masks))
    return hit - leak


def _cut_logits(logits: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, reach: float) -> torch.Tensor:
    """L×L logits with the pixels :func:`cut_background` removes lowered to at most −1 (on the logits' device)."""
    keep = cut_background((logits > 0).cpu(), fg.cpu(), bg.cpu(), reach).to(logits.device)
    return torch.where(keep, logits, torch.minimum(logits, torch.tensor(-1.0, device=logits.device)))


def proposal_features(first: torch.Tensor, first_iou: torch.Tensor, logits: torch.Tensor, iou: torch.Tensor,
                      centre: torch.Tensor, sizes: torch.Tensor, n_sizes: int) -> torch.Tensor:
    """The chooser's features of K re-decoded proposals (columns in the order of :data:`FEATURES`).

    Args:
        first: K×L×L boolean masks of the square proposals, before re-decoding.
        first_iou: K predicted IoUs of the square proposals.
        logits: K×L×L logits of the re-decoded proposals (decoded from their own tight boxes).
        iou: K predicted IoUs of the re-decoded proposals.
        centre: (x, y) of the foreground clicks' mean in the logits' frame.
        sizes: K indices of the proposals' half-sizes.
        n_sizes: number of half-sizes.

    Returns:
        K×F float32 features: both predicted IoUs, self-consistency (IoU of the proposal's and the re-decoded
        mask), stability (area above logit 1 over area above −1), how far the mask's centroid is from the
        clicks in mask radii (capped at 2), log of the area fraction, support (share of the re-decoded masks with
        IoU > 0.8 with this one) and the relative half-size.
    """
    L = logits.shape[-1]
    m = logits > 0
    flat = m.flatten(1).float()
    area = flat.sum(1)
    grid = torch.arange(L, dtype=torch.float32)
    cx = (m.sum(1).float() * grid).sum(1) / area.clamp(min=1)  # column sums weight x, row sums weight y
    cy = (m.sum(2).float() * grid).sum(1) / area.clamp(min=1)
    off = torch.sqrt((cx - centre[0]) ** 2 + (cy - centre[1]) ** 2) / torch.sqrt(area.clamp(min=1) / np.pi)
    stable = (logits > 1).flatten(1).sum(1).float() / (logits > -1).flatten(1).sum(1).clamp(min=1).float()
    inter = flat @ flat.T
    pair = inter / (area[:, None] + area[None] - inter).clamp(min=1)
    return torch.stack([
        first_iou.float(), iou.float(), paired_iou(first.flatten(1), m.flatten(1)), stable, off.clamp(max=2.0),
        torch.log((area / (L * L)).clamp(min=1e-4)), (pair > 0.8).float().mean(1),
        sizes.float() / max(1, n_sizes - 1)], 1)


@dataclass
class Proposals:
    """Box proposals around a click, decoded and re-decoded from their own tight boxes.

    Attributes:
        logits: K×1×L×L logits of the re-decoded proposals (of the square ones when not re-decoded).
        iou: K×1 predicted IoUs.
        boxes: K×4 boxes (model frame) that gave ``logits``.
        sizes: K indices into the half-sizes.
        features: K×F chooser features (None when not re-decoded).
        squares: (logits S×1×L×L, iou S×1, boxes S×4) of every square box, before re-decoding.
    """

    logits: torch.Tensor
    iou: torch.Tensor
    boxes: torch.Tensor
    sizes: torch.Tensor
    features: Optional[torch.Tensor]
    squares: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def propose(run: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]], fg: torch.Tensor, hw: Tuple[int, int],
            to_low: float, half: torch.Tensor, redecode_top: Optional[int],
            rank: Callable[[torch.Tensor], torch.Tensor]) -> Proposals:
    """Square boxes around the foreground clicks, decoded, the best decoded again from their own tight boxes.

    Args:
        run: decodes K boxes (K×4, model frame) → (logits K×1×L×L, iou K×1).
        fg: N×2 foreground clicks (model frame).
        hw: the image's (height, width) inside the model frame.
        to_low: logits-frame pixels per model-frame pixel.
        half: S×1 half-sizes in model-frame pixels.
        redecode_top: how many proposals to re-decode (None: none).
        rank: extra score of K masks (the clicks' consistency) added to the predicted IoU to pick which to re-decode.

    Returns:
        The proposals.
    """
    boxes = _clip(torch.cat([fg.min(0).values[None] - half, fg.max(0).values[None] + half], 1), hw)
    logits, iou = run(boxes)
    sizes, squares = torch.arange(len(boxes)), (logits, iou, boxes)
    if not redecode_top:
        return Proposals(logits, iou, boxes, sizes, None, squares)
    first, first_iou = (logits[:, 0] > 0).cpu(), iou[:, 0].cpu().float()
    keep = torch.argsort(-(first_iou + rank(first)))[: max(1, redecode_top)]
    tb = _own_boxes(first[keep], boxes[keep], fg, to_low, hw)
    logits, iou = run(tb)
    feats = proposal_features(first[keep], first_iou[keep], logits[:, 0].cpu().float(), iou[:, 0].cpu(),
                              fg.float().mean(0) * to_low, keep, len(half))
    return Proposals(logits, iou, tb, keep, feats, squares)


def proposal_scores(p: Proposals, weights: Optional[Dict[str, float]],
                    clicks_ok: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The chooser's score of each proposal.

    Args:
        p: proposals (K).
        weights: weight per feature (None: :data:`CHOOSER_WEIGHTS`); proposals not re-decoded score their predicted IoU.
        clicks_ok: the clicks' agreement with K L×L boolean masks → K, added to the score.

    Returns:
        K scores; −1e9 for an empty mask.
    """
    score = p.iou[:, 0].cpu().float().clone() if p.features is None else p.features @ torch.tensor(
        [float((weights or CHOOSER_WEIGHTS).get(f, 0.0)) for f in FEATURES])
    m = (p.logits[:, 0] > 0).cpu()
    return torch.where(m.flatten(1).any(1), score + clicks_ok(m), torch.full_like(score, -1e9))


def soft_average(logits: torch.Tensor, iou: torch.Tensor, score: torch.Tensor,
                 temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """K candidates' probabilities and predicted IoUs averaged, weighted by a softmax of their scores.

    Args:
        logits: K×1×L×L logits.
        iou: K×1 predicted IoUs.
        score: K scores (−1e9: weight 0).
        temperature: softmax temperature (small: the best-scored candidate alone).

    Returns:
        (logits 1×1×L×L of the weighted mean probability, the weighted predicted IoU 1×1).
    """
    w = torch.softmax(score.float() / temperature, 0).to(logits.device)
    prob = (w[:, None, None, None] * torch.sigmoid(logits.float())).sum(0, keepdim=True)
    out = torch.logit(prob.clamp(1e-6, 1 - 1e-6)).to(logits.dtype)
    return out, (w[:, None] * iou.float().to(w.device)).sum(0, keepdim=True).to(iou.dtype)


def fuse_proposals(p: Proposals, score: torch.Tensor, temperature: float, fg: torch.Tensor, to_low: float,
                   hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The re-decoded proposals' answer averaged over their chooser scores.

    Args:
        p: re-decoded proposals (K).
        score: K chooser scores (−1e9 for an empty mask: weight 0).
        temperature: softmax temperature of the weights.
        fg: N×2 foreground clicks (model frame).
        to_low: logits-frame pixels per model-frame pixel.
        hw: the image's (height, width) inside the model frame.

    Returns:
        (logits 1×1×L×L of the weighted mean probability, its weighted predicted IoU 1×1, the fused mask's own
        tight box held to the clicks, 4) — the box later clicks edit; the best proposal's own where the average
        keeps nothing.
    """
    logits, iou = soft_average(p.logits, p.iou, score, temperature)
    k = int(torch.argmax(score))
    mask = (logits[:, 0] > 0).cpu()
    if not bool(mask.any()):  # proposals that share nothing: the best one alone
        return p.logits[k : k + 1], p.iou[k : k + 1], p.boxes[k]
    box = _own_boxes(mask, p.boxes[k : k + 1].cpu().float(), fg, to_low, hw)[0]
    return logits, iou, box


def click_depth(mask: torch.Tensor, click: torch.Tensor) -> float:
    """How deep a click lies inside a mask, in the mask's radii √(area/π): inside, its distance to the mask's
    border; outside, minus its distance to the mask.

    Args:
        mask: L×L bool.
        click: (x, y) in the mask's frame.

    Returns:
        About 1 at the centre of a disc, 0 on its border, −1 one radius away from it; −inf for an empty mask.
    """
    L = mask.shape[-1]
    x, y = (int(v) for v in click.round().long().clamp(0, L - 1))
    m = mask.cpu().numpy().astype(bool)
    if not m.any():
        return float("-inf")
    radius = max(1.0, float(np.sqrt(m.sum() / np.pi)))
    if m[y, x]:  # the frame's edge counts as the border
        return float(ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1][y, x]) / radius
    return -float(ndimage.distance_transform_edt(~m)[y, x]) / radius


def rechoose(run: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]], p: Proposals, fg: torch.Tensor,
             bg: torch.Tensor, to_low: float, hw: Tuple[int, int], prev: torch.Tensor,
             stay: float) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first click's answer chosen again after a click showed it took a larger (or smaller) object than meant.

    Among the first click's square proposals whose masks agree with every click (foreground inside, background
    outside), the one the decoder trusts most and that changes the previous answer least (predicted IoU +
    ``stay`` × IoU with ``prev``: the next larger or smaller object, not the whole organ around it) is decoded
    once more with its own tight box (held to the foreground clicks); the re-decoded mask is kept if it still
    agrees with the clicks, the square one otherwise.

    Args:
        run: decodes K boxes (K×4, model frame) → (logits K×1×L×L, iou K×1).
        p: the first click's proposals (with their squares).
        fg, bg: N×2 and M×2 clicks so far (model frame).
        to_low: logits-frame pixels per model-frame pixel.
        hw: the image's (height, width) inside the model frame.
        prev: L×L bool previous answer.
        stay: weight of a proposal's IoU with ``prev`` (0: the decoder's trust alone).

    Returns:
        (box 4, logits 1×1×L×L, predicted IoU 1×1), or None when no proposal agrees with the clicks.
    """
    def agrees(masks: torch.Tensor) -> torch.Tensor:  # every foreground click inside, every background one outside
        return agreement(masks, fg * to_low, bg * to_low) >= 1.0 - 1e-6

    logits, iou, boxes = p.squares
    m = (logits[:, 0] > 0).cpu()
    ok = agrees(m) & m.flatten(1).any(1)
    if not bool(ok.any()):
        return None
    score = iou[:, 0].cpu().float() + stay * _iou_with(m, prev)
    i = int(torch.nonzero(ok)[:, 0][torch.argmax(score[ok])])
    tb = _own_boxes(m[i : i + 1], boxes[i : i + 1], fg, to_low, hw)
    lg, io = run(tb)
    if bool(agrees((lg[:, 0] > 0).cpu())[0]):
        return tb[0], lg, io
    return boxes[i], logits[i : i + 1], iou[i : i + 1]


def edit_boxes(box: torch.Tensor, click: torch.Tensor, label: int, fg: torch.Tensor, hw: Tuple[int, int],
               margins: Sequence[float], max_edge_cut: float) -> torch.Tensor:
    """Candidate edits of a box by one corrective click: grown to hold a foreground click, or one edge moved
    past a background click.

    Args:
        box: (x0, y0, x1, y1) current box.
        click: (x, y) of the click, same frame.
        label: 1 foreground (the mask missed it), 0 background (the mask covers it).
        fg: N×2 every foreground click (a background edit keeps them all inside).
        hw: (height, width) to clip to.
        margins: a foreground click's margins inside the grown box, as fractions of the box's longer side (one
            candidate each; at least 4 px).
        max_edge_cut: a background edit keeps at least this fraction of the box's area.

    Returns:
        K×4 candidate boxes (K = 0 when no edge can move past a background click).
    """
    x, y = float(click[0]), float(click[1])
    b = box.clone().float()
    out = []
    if label == 1:
        side = float(max(b[2] - b[0], b[3] - b[1]))
        for margin in margins:
            m = max(4.0, margin * side)
            out.append(torch.tensor([min(float(b[0]), x - m), min(float(b[1]), y - m),
                                     max(float(b[2]), x + m), max(float(b[3]), y + m)]))
    else:
        area = float((b[2] - b[0]) * (b[3] - b[1]))
        for k, v, ok in ((0, x + 1, bool((fg[:, 0] >= x + 1).all())), (1, y + 1, bool((fg[:, 1] >= y + 1).all())),
                         (2, x - 1, bool((fg[:, 0] <= x - 1).all())), (3, y - 1, bool((fg[:, 1] <= y - 1).all()))):
            nb = b.clone()
            nb[k] = v
            if ok and nb[2] > nb[0] and nb[3] > nb[1] \
                    and float((nb[2] - nb[0]) * (nb[3] - nb[1])) >= max_edge_cut * area:
                out.append(nb)
    return _clip(torch.stack(out), hw) if out else torch.zeros(0, 4)


def local_masks(run: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]], click: torch.Tensor,
                mask: torch.Tensor, to_low: float, hw: Tuple[int, int],
                scales: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks of square boxes around a foreground click the mask missed, sized by the click's distance to the mask.

    Args:
        run: decodes K boxes (K×4, model frame) → (logits K×1×L×L, iou K×1).
        click: (x, y) in the model frame.
        mask: L×L bool current mask (empty: the distance is taken as 8 px).
        to_low: logits-frame pixels per model-frame pixel.
        hw: (height, width) to clip to.
        scales: half-sizes as multiples of the distance (at least 4 px each).

    Returns:
        (K×4 boxes, K×1×L×L logits, K×1 predicted IoUs).
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs):
        dist = torch.sqrt((xs.float() - click[0] * to_low) ** 2 + (ys.float() - click[1] * to_low) ** 2)
        d = float(dist.min()) / to_low
    else:
        d = 8.0
    half = torch.tensor([max(4.0, s * d) for s in scales])[:, None]
    boxes = _clip(torch.cat([click[None] - half, click[None] + half], 1), hw)
    return (boxes,) + tuple(run(boxes))


@torch.no_grad()
def decode_clicks(decode: Decode, points: np.ndarray, labels: np.ndarray, frame_hw: Tuple[int, int], img_size: int,
                  lowres: int, config: Optional[ClickConfig] = None,
                  box: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Answers clicks with the box-prompted decoder.

    The first foreground click chooses among box proposals (:func:`propose`, :data:`FEATURES`). With
    ``config.edit``, each later click, in the order given, edits the chosen box (:func:`edit_boxes`: the
    candidate the decoder trusts most, that agrees with the clicks so far and changes the mask least), so the
    answer to a click sequence only changes where a new click asks for it (3D Slicer sends its foreground and
    background clicks as two lists: they are then taken in that order). Background clicks the final mask still
    covers cut it locally (:func:`cut_background`).

    Args:
        decode: ``decode(points K×N×2, labels K×N, boxes K×4) → (logits K×1×L×L, iou K×1)`` on one embedding
            (model-frame coordinates), e.g. ``functools.partial(backbone.decode, z)``.
        points: N×2 (x, y) clicks in the model frame.
        labels: N labels (1 foreground, 0 background); at least one foreground.
        frame_hw: (height, width) of the image inside the model frame (the resized image, before padding).
        img_size: side of the model input.
        lowres: side L of the decoder's logits.
        config: settings (default :class:`ClickConfig`).
        box: a box the user drew as well (model frame): then the box's answer is the first choice and every
            click edits it as later clicks edit the first click's box (grown, an edge moved, a local mask joined,
            a local cut; clicks the answer still misses or covers then add a disc or are cut around).

    Returns:
        (logits 1×1×L×L with the choice's mask where logits > 0, predicted IoU 1×1, info dict with the
        chosen proposal's half-size, its final box, the number of proposals and of box edits).

    Raises:
        ValueError: neither a foreground click nor a box.
    """
    cfg = config or ClickConfig()
    pts = torch.as_tensor(np.asarray(points, np.float32)).reshape(-1, 2)
    lab = torch.as_tensor(np.asarray(labels, np.int64)).reshape(-1)
    fg, bg = pts[lab == 1], pts[lab == 0]
    to_low = lowres / img_size
    hw = (int(frame_hw[0]), int(frame_hw[1]))

    def run(boxes: torch.Tensor):
        k = len(boxes)
        if cfg.with_points:
            return decode(pts[None].expand(k, -1, -1), lab[None].expand(k, -1), boxes)
        return decode(None, None, boxes)

    p = None
    if box is not None:  # the drawn box is the first choice; every click edits it
        cur = torch.as_tensor(np.asarray(box, np.float32)).reshape(4)
        logits, iou = run(cur[None])
        info = {"proposal": "box"}
        later = list(range(len(lab)))
        seen_fg, seen_bg = fg[:0], bg[:0]
        anchor = ((cur[:2] + cur[2:]) / 2)[None]  # where the box says the object is, for local background cuts
    else:
        if len(fg) == 0:
            raise ValueError("decode_clicks needs at least one foreground click or a box")
        first = fg[:1] if cfg.edit else fg
        low_fg, low_bg = first * to_low, (bg if not cfg.edit else bg[:0]) * to_low

        def clicks_ok(m: torch.Tensor) -> torch.Tensor:  # +1 all foreground clicks inside, -1 all background ones too
            return cfg.click_weight * agreement(m, low_fg, low_bg)

        half = torch.tensor([float(s) * img_size / REFERENCE_SIZE for s in cfg.half_sizes])[:, None]
        p = propose(run, first, hw, to_low, half, cfg.redecode_top if cfg.redecode else None, clicks_ok)
        score = proposal_scores(p, cfg.weights, clicks_ok)
        k = int(torch.argmax(score))
        logits, iou, cur = p.logits[k : k + 1], p.iou[k : k + 1], p.boxes[k]
        if cfg.fuse and p.features is not None and len(score) > 1:
            logits, iou, cur = fuse_proposals(p, score, cfg.fuse, first, to_low, hw)
        info = {"proposal": "click", "half_size": float(cfg.half_sizes[int(p.sizes[k])]), "proposals": len(half)}
        f0 = int(torch.nonzero(lab == 1)[0, 0])
        later = [i for i in range(len(lab)) if i != f0] if cfg.edit else []
        seen_fg, seen_bg = fg[:1], bg[:0]
        anchor = fg[:0]
    edits = rechosen = 0
    for c, label in [(pts[i], int(lab[i])) for i in later]:
        if label:
            seen_fg = torch.cat([seen_fg, c[None]])
        else:
            seen_bg = torch.cat([seen_bg, c[None]])
        prev = (logits[0, 0] > 0).cpu()
        if bool(_at(prev[None], c[None] * to_low)[0, 0]) == bool(label):
            continue  # the mask already agrees with this click
        limit = cfg.rechoose_far if label else cfg.rechoose_depth
        if p is not None and limit is not None and (1 - 2 * label) * click_depth(prev, c * to_low) >= limit:
            again = rechoose(run, p, seen_fg, seen_bg, to_low, hw, prev, cfg.stay)
            if again is not None:  # the first choice took too large (too small) an object
                (cur, logits, iou), edits, rechosen = again, edits + 1, rechosen + 1
                continue
        cands = edit_boxes(cur, c, label, seen_fg, hw, cfg.edit_margins, cfg.max_edge_cut)
        if not len(cands):
            continue  # no edge can move past it: the final cut below removes what it was put on
        lg, io = run(cands)
        if label == 1 and len(cfg.add_local):  # or join a local mask around the click to the current one
            lb, ll, li = local_masks(run, c, prev, to_low, hw, cfg.add_local)
            lg = torch.cat([lg, torch.maximum(logits[:1].expand(len(ll), -1, -1, -1), ll)])
            io = torch.cat([io, torch.minimum(iou[:1].expand(len(ll), -1), li)])  # trusted as the less sure part
            cands = torch.cat([cands, _hull(lb, cur[:2], cur[2:])])
        if label == 0 and cfg.cut_background:  # or keep the box and cut around the click
            cut = _cut_logits(logits[0, 0], torch.cat([seen_fg, anchor]) * to_low, c[None] * to_low, cfg.cut_reach)
            lg = torch.cat([lg, cut[None, None]])
            io, cands = torch.cat([io, iou[:1]]), torch.cat([cands, cur[None].float()])
        m = (lg[:, 0] > 0).cpu()
        sc = io[:, 0].cpu().float() + cfg.click_weight * agreement(m, seen_fg * to_low, seen_bg * to_low) \
            + cfg.stay * _iou_with(m, prev)
        j = int(torch.argmax(sc))
        prev_logits = logits
        cur, logits, iou, edits = cands[j], lg[j : j + 1], io[j : j + 1], edits + 1
        if cfg.edit_fuse and len(sc) > 1:  # what the candidates that score alike agree on
            fused, fused_iou = soft_average(lg, io, sc, cfg.edit_fuse)
            if bool((fused[0, 0] > 0).any()):
                logits, iou = fused, fused_iou
        if cfg.local:
            logits = confine(prev_logits[0, 0], logits[0, 0], c * to_low, cfg.local_reach, cfg.local_band)[None, None]
    info.update(box=[round(float(v), 1) for v in cur], edits=edits, rechosen=rechosen)
    out = logits[:1].clone()
    if cfg.fill:
        out[0, 0] = fill_missed(out[0, 0], fg * to_low, bg * to_low, cfg.fill, cfg.fill_cap)
    if cfg.cut_background and len(bg):
        out[0, 0] = _cut_logits(out[0, 0], torch.cat([fg, anchor]) * to_low, bg * to_low, cfg.cut_reach)
    return out, iou[:1], info
