"""The refinement head: a per-institution mask head at the image's own resolution, appended with its layer."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from casam.model.preprocess import apply_window, as_rgb

# Longest image side the head works at: larger images are downscaled for it, its answer upscaled back.
MAX_SIDE = 1024
# A layer file's head weights are stored under this prefix (a layer without a head has none).
HEAD_PREFIX = "head."
# Radius of a click's disk in the head's click maps, as a share of the head resolution's longest side (at least
# CLICK_MIN_RADIUS pixels): large enough to be seen at the U-Net's coarsest level, small enough to say where.
CLICK_RADIUS = 0.01
CLICK_MIN_RADIUS = 3
# A click is honoured (honour_clicks) on the connected pixels around it whose logit is within HONOUR_MARGIN of
# flipping, no farther than HONOUR_REACH click radii away.
HONOUR_MARGIN = 2.0
HONOUR_REACH = 4.0
# Groups of a normalised head's GroupNorm layers (fewer where a level has fewer channels).
NORM_GROUPS = 4


def _block(cin: int, cout: int, norm: bool = False) -> nn.Sequential:
    """Two 3×3 convolutions with ReLUs, each normalised (GroupNorm) when ``norm``."""
    layers: list = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=1))
        if norm:
            layers.append(nn.GroupNorm(math.gcd(NORM_GROUPS, cout), cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RefineHead(nn.Module):
    """A three-level U-Net on (image, SAM logits[, click maps]), blended into SAM's logits by a gate (0 = plain SAM).

    A head built with ``clicks=True`` also reads the interaction's clicks as two maps (foreground and background
    disks, :func:`click_maps`): it answers SAM's answer to the first prompt together with every click so far, and is
    trained on simulated click sequences (:func:`casam.training.head.train_head`) to correct its own mistakes where a
    click points at them.

    Args:
        width: channels of the first level (the others have twice as many).
        clicks: read click maps (two more input channels).
        norm: GroupNorm after every convolution (the default recipe's heads; a layer file's head without it
            loads as it was trained).

    Shapes:
        image B×3×H×W (standardised, see :func:`image_tensor`), logits B×1×H×W, maps B×2×H×W → B×1×H×W.
    """

    def __init__(self, width: int = 16, clicks: bool = False, norm: bool = False):
        super().__init__()
        w1, w2 = width, 2 * width
        self.width = width
        self.clicks = clicks
        self.norm = norm
        self.enc1, self.enc2 = _block(6 if clicks else 4, w1, norm), _block(w1, w2, norm)
        self.enc3 = _block(w2, w2, norm)
        self.dec2, self.dec1 = _block(2 * w2, w2, norm), _block(w2 + w1, w1, norm)
        self.out = nn.Conv2d(w1, 1, 1)
        self.gate = nn.Parameter(torch.zeros(1), requires_grad=False)
        # 1 once validation showed that corrective clicks' edits should stand against the head (see refine)
        self.click_edits = nn.Parameter(torch.zeros(1), requires_grad=False)
        if clicks:  # 1 once validation showed that the head's click-conditioned answers beat it ignoring the clicks
            self.reads_clicks = nn.Parameter(torch.zeros(1), requires_grad=False)

    def uses_clicks(self) -> bool:
        """Whether the head answers the clicks (built to read them, and validation said so)."""
        return self.clicks and float(self.reads_clicks) > 0

    def unet(self, image: torch.Tensor, logits: torch.Tensor, maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head's own logits (the gate left out). H and W need not be multiples of 4.

        Args:
            image, logits: as in the class description.
            maps: B×2×H×W click maps for a head that reads clicks (None: no click).
        """
        h, w = image.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        parts = [image, torch.tanh(logits / 4)]
        if self.clicks:
            parts.append(maps if maps is not None else image.new_zeros(image.shape[0], 2, h, w))
        x = torch.cat(parts, 1)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        return self.out(d1)[..., :h, :w]

    def forward(self, image: torch.Tensor, logits: torch.Tensor, maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        if float(self.gate) == 0.0:
            return logits
        return logits + self.gate * (self.unet(image, logits, maps) - logits)


def click_radius(hw: Tuple[int, int]) -> float:
    """Radius in pixels of a click's disk at a head resolution of ``hw``."""
    return max(float(CLICK_MIN_RADIUS), CLICK_RADIUS * max(hw))


def click_maps(points: Optional[np.ndarray], labels: Optional[np.ndarray], hw: Tuple[int, int],
               scale: Tuple[float, float] = (1.0, 1.0), offset: Tuple[float, float] = (0.0, 0.0),
               radius: Optional[float] = None) -> torch.Tensor:
    """The two click maps a click-reading head sees: 1 within a disk around each foreground (channel 0) or
    background (channel 1) click.

    Args:
        points: N×2 (x, y) click coordinates, or None.
        labels: N labels (1 foreground, 0 background).
        hw: (h, w) of the maps.
        scale: (sx, sy) multiplying the coordinates (original image → head resolution).
        offset: (x, y) subtracted after scaling (e.g. a crop's corner).
        radius: disk radius in pixels (default :func:`click_radius` of ``hw``; a crop passes its image's).

    Returns:
        1×2×h×w float32.
    """
    h, w = hw
    maps = torch.zeros(1, 2, h, w)
    if points is None or len(points) == 0:
        return maps
    pts = np.asarray(points, np.float64).reshape(-1, 2) * np.asarray(scale) - np.asarray(offset)
    labs = np.asarray(labels).reshape(-1)
    r = click_radius(hw) if radius is None else float(radius)
    ys, xs = torch.arange(h, dtype=torch.float32)[:, None], torch.arange(w, dtype=torch.float32)[None, :]
    for (x, y), lab in zip(pts, labs):
        if not (-r <= x < w + r and -r <= y < h + r):
            continue
        y0, y1, x0, x1 = max(0, int(y - r)), min(h, int(y + r) + 2), max(0, int(x - r)), min(w, int(x + r) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        disk = ((ys[y0:y1] - float(y)) ** 2 + (xs[:, x0:x1] - float(x)) ** 2) <= r * r
        ch = 0 if int(lab) == 1 else 1
        maps[0, ch, y0:y1, x0:x1] = torch.maximum(maps[0, ch, y0:y1, x0:x1], disk.float())
    return maps


def image_tensor(image: np.ndarray, window="auto", max_side: int = MAX_SIDE) -> torch.Tensor:
    """The head's view of an image: RGB in 0..255 (windowed as for the encoder), standardised per channel, at
    most ``max_side`` pixels on its longest side.

    Args:
        image: H×W or H×W×C image.
        window: intensity window (see :func:`casam.model.preprocess.apply_window`).
        max_side: longest side the head works at.

    Returns:
        1×3×h×w float32 tensor.
    """
    rgb = torch.from_numpy(np.ascontiguousarray(apply_window(as_rgb(image), window).transpose(2, 0, 1)))[None]
    h, w = rgb.shape[-2:]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        rgb = F.interpolate(rgb, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                            align_corners=False, antialias=True)
    mean = rgb.mean(dim=(2, 3), keepdim=True)
    std = rgb.std(dim=(2, 3), keepdim=True).clamp(min=1.0)
    return (rgb - mean) / std


def refine(head: Optional[RefineHead], image: Optional[torch.Tensor], logits: torch.Tensor,
           points: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None) -> torch.Tensor:
    """Applies a head to logits at the original image size (H×W or K×H×W); no head or gate 0 → unchanged.

    A head that reads clicks (:meth:`RefineHead.uses_clicks`) answers SAM's answer to the *first* prompt together
    with the clicks (:func:`click_maps`): the caller passes every click of the interaction and SAM's logits for the
    first prompt alone (:func:`first_prompt`). Every click a head built for clicks is given is then honoured where it
    was placed (:func:`honour_clicks`), whether or not validation let the head read them. A legacy head that does not
    read clicks rewrites SAM's answer and, left alone, undoes most of what later clicks change in it; one whose
    validation showed it (``head.click_edits`` = 1, :func:`casam.training.head.click_edit_evidence`) lets the
    corrective clicks keep their edits (:func:`keep_click_edits`): where SAM's edited answer and the head's disagree
    in a region a corrective click lies in, SAM's edited answer stands.

    Args:
        head: the institution's head, or None.
        image: :func:`image_tensor` of the image (1×3×h×w, possibly smaller than H×W).
        logits: SAM's logits at the original size: for the first prompt alone when the head reads clicks, else
            with every click's edit already made.
        points: N×2 (x = column, y = row) pixel coordinates: every click of the interaction for a head that reads
            clicks, else the corrective clicks (:func:`corrective_clicks`); or None.
        labels: their N labels (1 foreground, 0 background).

    Returns:
        Logits of the same shape.
    """
    if head is None or image is None or float(head.gate) == 0.0:
        return logits
    shape = logits.shape
    b = logits.reshape(-1, 1, *shape[-2:]).float()
    size = image.shape[-2:]
    small = b if tuple(size) == tuple(shape[-2:]) else F.interpolate(b, size=size, mode="bilinear", align_corners=False)
    maps = None
    if head.uses_clicks() and points is not None and len(points):
        scale = (size[1] / shape[-1], size[0] / shape[-2])
        maps = click_maps(points, labels, tuple(size), scale).to(b.device).expand(len(b), -1, -1, -1)
    out = head(image.to(b.device).expand(len(b), -1, -1, -1), small, maps)
    if tuple(size) != tuple(shape[-2:]):
        out = F.interpolate(out, size=shape[-2:], mode="bilinear", align_corners=False)
    out = out.reshape(shape)
    if head.clicks and points is not None and len(points) and out.dim() == 2:
        out = honour_clicks(out, points, labels)
    elif (not head.clicks and points is not None and len(points) and out.dim() == 2
            and float(head.click_edits) > 0):
        keep = keep_click_edits(out.detach().cpu().numpy() > 0, logits.detach().cpu().numpy() > 0, points, labels)
        keep = torch.from_numpy(keep).to(out.device)
        out = torch.where(keep, logits.to(out), out)
    return out


def honour_clicks(logits: torch.Tensor, points: np.ndarray, labels: np.ndarray,
                  margin: float = HONOUR_MARGIN) -> torch.Tensor:
    """Makes every click hold where it was placed: a foreground click the answer misses adds the region around it
    that the answer nearly took, a background click inside the answer removes the region around it that the answer
    nearly left out.

    The region is the connected set of pixels containing the click whose logit is within ``margin`` of flipping
    (above ``-margin`` for a foreground click, below ``+margin`` for a background one), no farther than
    :data:`HONOUR_REACH` click radii from it; where the click's own pixel is not within the margin, the click's disk
    (:func:`click_radius`). Pixels the answer already has right are untouched, so a click on a correct pixel changes
    nothing.

    Args:
        logits: H×W logits (the head's answer at the original size).
        points: N×2 (x, y) pixel coordinates of the clicks.
        labels: N labels (1 foreground, 0 background).
        margin: how far from 0 a logit may be and still flip with the click.

    Returns:
        H×W logits with the clicked regions flipped (set to ±``margin``).
    """
    lg = logits.detach().cpu().numpy()
    h, w = lg.shape
    r = click_radius((h, w))
    reach = HONOUR_REACH * r
    out = lg.copy()
    span = int(np.ceil(max(reach, r))) + 1  # everything a click may flip lies within this many pixels of it
    for (x, y), lab in zip(np.asarray(points, np.float64).reshape(-1, 2), np.asarray(labels).reshape(-1)):
        yi, xi = int(round(y)), int(round(x))
        if not (0 <= yi < h and 0 <= xi < w):
            continue
        fg = int(lab) == 1
        if (out[yi, xi] > 0) == fg:
            continue
        y0, y1, x0, x1 = max(0, yi - span), min(h, yi + span + 1), max(0, xi - span), min(w, xi + span + 1)
        win = lg[y0:y1, x0:x1]  # the click's neighbourhood: the same region as on the whole image, found faster
        yy, xx = np.ogrid[y0:y1, x0:x1]
        dist2 = (yy - y) ** 2 + (xx - x) ** 2
        near = (win > -margin) if fg else (win < margin)
        near &= dist2 <= reach * reach
        if near[yi - y0, xi - x0]:
            comp, _ = ndimage.label(near)
            region = comp == comp[yi - y0, xi - x0]
        else:
            region = dist2 <= r * r
        out[y0:y1, x0:x1][region] = margin if fg else -margin
    return torch.from_numpy(out).to(logits)


def split_interaction(head: Optional[RefineHead], image: Optional[torch.Tensor], points: Optional[np.ndarray],
                      labels: Optional[np.ndarray], box: bool) -> Tuple[Tuple, Tuple]:
    """Which clicks of a request SAM answers and which the head is given: the one decision the predictor and every
    evaluator share.

    A head that reads clicks (:func:`reads_clicks`, with the image's view at hand) gets every click, and SAM only
    the first prompt (:func:`first_prompt`); otherwise SAM answers every click (through box proposals, editing a
    box's answer) and a head gets the corrective ones (:func:`corrective_clicks`).

    Args:
        head: the layer's head, or None.
        image: the head's view of the image (:func:`image_tensor`), or None.
        points: N×2 (x, y) clicks, or None.
        labels: their N labels.
        box: whether the request has a box.

    Returns:
        ((SAM's points, labels), (the head's points, labels)); (None, None) where there are none.
    """
    has = points is not None and labels is not None and len(labels) > 0
    everything = (points, labels) if has else (None, None)
    if reads_clicks(head) and image is not None and has:
        first = first_prompt(points, labels, box)
        if first[0] is not None or box:  # a first prompt to answer (else background clicks only: SAM takes all)
            return first, everything
    return everything, corrective_clicks(points, labels, box)


def reads_clicks(head: Optional[RefineHead]) -> bool:
    """Whether a (possibly absent) head answers the clicks itself (:meth:`RefineHead.uses_clicks`)."""
    return head is not None and float(head.gate) > 0 and head.uses_clicks()


def first_prompt(points: Optional[np.ndarray], labels: Optional[np.ndarray],
                 box: bool) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """The clicks of the first prompt: none after a drawn box, else the first foreground click.

    A head that reads clicks answers SAM's answer to these with every click of the interaction.

    Returns:
        (points M×2, labels M), or (None, None) when there are none.
    """
    if box or points is None or labels is None or len(labels) == 0:
        return None, None
    pts, labs = np.asarray(points).reshape(-1, 2), np.asarray(labels).reshape(-1)
    fg = np.flatnonzero(labs == 1)
    return (pts[fg[:1]], labs[fg[:1]]) if len(fg) else (None, None)


def corrective_clicks(points: Optional[np.ndarray], labels: Optional[np.ndarray],
                      box: bool) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """The clicks that edit the first prompt's answer: all of them after a drawn box, else all but the first
    foreground click (which chose the answer; :func:`casam.prompts.clicks.decode_clicks`).

    Returns:
        (points M×2, labels M), or (None, None) when there are none.
    """
    if points is None or labels is None or len(labels) == 0:
        return None, None
    pts, labs = np.asarray(points).reshape(-1, 2), np.asarray(labels).reshape(-1)
    if not box:
        fg = np.flatnonzero(labs == 1)
        if len(fg) == 0:
            return None, None
        rest = np.ones(len(labs), bool)
        rest[fg[0]] = False
        pts, labs = pts[rest], labs[rest]
    return (pts, labs) if len(labs) else (None, None)


def keep_click_edits(refined: np.ndarray, edited: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Where the corrective clicks' edits of SAM's answer must stand against the head's answer.

    A foreground click the head's mask misses keeps the connected region that SAM's edited answer adds there
    (edited and not refined, containing the click); a background click the head's mask covers keeps the
    connected region SAM's edited answer leaves out there. Elsewhere the head's answer stands.

    Args:
        refined: H×W bool, the head's answer.
        edited: H×W bool, SAM's answer with the clicks' edits.
        points: N×2 (x, y) pixel coordinates of the corrective clicks.
        labels: N labels (1 foreground, 0 background).

    Returns:
        H×W bool: the pixels where ``edited`` replaces ``refined``.
    """
    keep = np.zeros(refined.shape, bool)
    h, w = refined.shape
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    labs = np.asarray(labels).reshape(-1)
    for region, want in ((edited & ~refined, 1), (refined & ~edited, 0)):
        clicked = [(int(round(y)), int(round(x))) for (x, y), lab in zip(pts, labs) if int(lab) == want]
        clicked = [(y, x) for y, x in clicked if 0 <= y < h and 0 <= x < w and region[y, x]]
        if not clicked:
            continue
        comp, _ = ndimage.label(region, structure=np.ones((3, 3), bool))
        keep |= np.isin(comp, sorted({int(comp[y, x]) for y, x in clicked}))
    return keep


def split_head_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[RefineHead]]:
    """Splits a layer file's tensors into (Alignment Layer weights, head or None)."""
    rest = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    sub = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if not sub:
        return rest, None
    head = RefineHead(int(sub["enc1.0.weight"].shape[0]), clicks=int(sub["enc1.0.weight"].shape[1]) == 6,
                      norm="enc1.1.weight" in sub)
    head.load_state_dict(sub)
    return rest, head.eval()
