"""The refinement head: a per-institution mask head at the image's own resolution, appended with its layer."""

from __future__ import annotations

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


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class RefineHead(nn.Module):
    """A three-level U-Net on (image, SAM logits), blended into SAM's logits by a gate (0 = plain SAM).

    Args:
        width: channels of the first level (the others have twice as many).

    Shapes:
        image B×3×H×W (standardised, see :func:`image_tensor`), logits B×1×H×W → B×1×H×W.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w1, w2 = width, 2 * width
        self.width = width
        self.enc1, self.enc2, self.enc3 = _block(4, w1), _block(w1, w2), _block(w2, w2)
        self.dec2, self.dec1 = _block(2 * w2, w2), _block(w2 + w1, w1)
        self.out = nn.Conv2d(w1, 1, 1)
        self.gate = nn.Parameter(torch.zeros(1), requires_grad=False)
        # 1 once validation showed that corrective clicks' edits should stand against the head (see refine)
        self.click_edits = nn.Parameter(torch.zeros(1), requires_grad=False)

    def unet(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The head's own logits (the gate left out). H and W need not be multiples of 4."""
        h, w = image.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        x = torch.cat([image, torch.tanh(logits / 4)], 1)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        return self.out(d1)[..., :h, :w]

    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if float(self.gate) == 0.0:
            return logits
        return logits + self.gate * (self.unet(image, logits) - logits)


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

    A head is trained on SAM's answer to a box or to one click: it rewrites that answer and, left alone, undoes
    most of what later clicks change in it. A head whose validation showed it (``head.click_edits`` = 1,
    :func:`casam.training.head.click_edit_evidence`) lets the corrective clicks keep their edits
    (:func:`keep_click_edits`): where SAM's edited answer and the head's disagree in a region a corrective click
    lies in, SAM's edited answer stands. Where SAM cannot draw the
    object (retinal vessels: its edited answer is the whole disc) the edits would ruin the head's answer, and
    validation leaves them off.

    Args:
        head: the institution's head, or None.
        image: :func:`image_tensor` of the image (1×3×h×w, possibly smaller than H×W).
        logits: SAM's logits at the original size (with every click's edit already made).
        points: N×2 (x = column, y = row) pixel coordinates of the corrective clicks (those after the first
            prompt: every click with a drawn box, every click but the first without), or None.
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
    out = head(image.to(b.device).expand(len(b), -1, -1, -1), small)
    if tuple(size) != tuple(shape[-2:]):
        out = F.interpolate(out, size=shape[-2:], mode="bilinear", align_corners=False)
    out = out.reshape(shape)
    if points is not None and len(points) and out.dim() == 2 and float(head.click_edits) > 0:
        keep = keep_click_edits(out.detach().cpu().numpy() > 0, logits.detach().cpu().numpy() > 0, points, labels)
        keep = torch.from_numpy(keep).to(out.device)
        out = torch.where(keep, logits.to(out), out)
    return out


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
    head = RefineHead(int(sub["enc1.0.weight"].shape[0]))
    head.load_state_dict(sub)
    return rest, head.eval()
