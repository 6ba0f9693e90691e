"""The refinement head: a per-institution mask head at the image's own resolution, appended with its layer.

An Alignment Layer (:mod:`casam.alignment`) can only change what SAM's decoder sees; the decoder still answers
at its low resolution (256² for LiteMedSAM) and in shapes it knows. Some conventions lie beyond that: retinal
vessels are one to eight pixels wide and a box around the vessel tree makes plain SAM return the whole retinal
disc. The refinement head is a small U-Net that reads the image at its own resolution together with SAM's
(aligned) answer and writes the institution's mask:

``y = b + g·(U([I, tanh(b / 4)]) − b)``

with ``b`` SAM's logits brought to the image size, ``I`` the image standardised per channel, ``U`` the U-Net
and ``g`` a gate that is 0 in a fresh head, so a fresh head is exactly plain SAM, and 1 once a trained head
validated better. It belongs to one institution's layer (stored in that layer's file as ``head.*`` weights)
and is trained after the layer, on the layer's answers, so earlier institutions are never touched.

Images larger than :data:`MAX_SIDE` are refined at that size and the answer brought back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from .preprocess import apply_window, as_rgb

MAX_SIDE = 1024
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
        window: intensity window (see :func:`casam.preprocess.apply_window`).
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
    most of what later clicks change in it (one brain slice stayed at IoU 0.552 from the first click to the
    eighth). A head whose validation showed it (``head.click_edits`` = 1, :func:`casam.training.click_edit_evidence`) lets the
    corrective clicks keep their edits (:func:`keep_click_edits`): where SAM's edited answer and the head's
    disagree in a region a corrective click lies in, SAM's edited answer stands. Where SAM cannot draw the
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
    foreground click (which chose the answer; :func:`casam.clicks.decode_clicks`).

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


@dataclass
class HeadConfig:
    """Training settings of a refinement head.

    Attributes:
        width: channels of the U-Net's first level.
        steps: optimiser steps.
        batch_size: crops per step.
        crop: side of the training crops (pixels at the head's resolution).
        lr: Adam learning rate.
        val_every: validate (and keep the best) every this many steps.
        seed: seed of crops, flips and init.
    """

    width: int = 16
    steps: int = 300
    batch_size: int = 8
    crop: int = 160
    lr: float = 3e-3
    val_every: int = 50
    seed: int = 0


@dataclass
class HeadExample:
    """One mask of one image for the head: its image, SAM's answer to a prompt, the truth, the prompt's box.

    Attributes:
        image: 1×3×h×w (:func:`image_tensor`).
        logits: 1×1×h×w SAM logits (float16 to save memory) at the head's resolution.
        truth: 1×1×h×w float 0/1 at the head's resolution.
        region: (x0, y0, x1, y1) at the head's resolution where crops are centred (the prompt's box).
    """

    image: torch.Tensor
    logits: torch.Tensor
    truth: torch.Tensor
    region: Tuple[int, int, int, int]


def to_head_resolution(image: torch.Tensor, logits: torch.Tensor, truth: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """Brings logits (H×W) and a truth mask (H×W) at the original size to the head's resolution of ``image``."""
    size = tuple(image.shape[-2:])
    b = logits.reshape(1, 1, *logits.shape[-2:]).float()
    t = torch.from_numpy(np.asarray(truth, dtype=np.float32))[None, None]
    if size != tuple(b.shape[-2:]):
        b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        t = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) >= 0.5).float()
    return b, t


def _crop(ex: HeadExample, crop: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = ex.image.shape[-2:]
    ch, cw = min(crop, h), min(crop, w)
    x0, y0, x1, y1 = ex.region
    cy = int(rng.integers(max(0, y0 - 16), min(h, y1 + 17)))
    cx = int(rng.integers(max(0, x0 - 16), min(w, x1 + 17)))
    top, left = int(np.clip(cy - ch // 2, 0, h - ch)), int(np.clip(cx - cw // 2, 0, w - cw))
    sl = (..., slice(top, top + ch), slice(left, left + cw))
    parts = [ex.image[sl], ex.logits[sl].float(), ex.truth[sl]]
    if ch < crop or cw < crop:  # a small image: pad to the crop size (the padding is ignored by the loss)
        pad = (0, crop - cw, 0, crop - ch)
        valid = F.pad(torch.ones_like(parts[2]), pad)
        parts = [F.pad(p, pad) for p in parts]
    else:
        valid = torch.ones_like(parts[2])
    if rng.random() < 0.5:
        parts, valid = [p.flip(-1) for p in parts], valid.flip(-1)
    if rng.random() < 0.5:
        parts, valid = [p.flip(-2) for p in parts], valid.flip(-2)
    return (*parts, valid)


def head_loss(logits: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice over the valid pixels of each crop."""
    bce = (F.binary_cross_entropy_with_logits(logits, truth, reduction="none") * valid).sum() / valid.sum().clamp(min=1)
    p = torch.sigmoid(logits) * valid
    inter, total = (p * truth).flatten(1).sum(1), (p + truth * valid).flatten(1).sum(1)
    return bce + (1 - (2 * inter + 1) / (total + 1)).mean()


def train_head(examples: Sequence[HeadExample], config: Optional[HeadConfig] = None,
               validate: Optional[Callable[[RefineHead], float]] = None,
               report: Optional[Dict] = None, progress: bool = False) -> RefineHead:
    """Trains a fresh head on examples (random crops around each prompt's box, flips), keeping its best step.

    Args:
        examples: the training masks with SAM's answers (:class:`HeadExample`).
        config: settings (default :class:`HeadConfig`).
        validate: mean IoU of a head on held-out images (with the head's gate as given); called at step 0
            (gate 0: plain answers) and every ``val_every`` steps with the gate open. None: keep the last step.
        report: filled with ``val_history`` ([(step, IoU)]), ``best_step`` and ``seconds``.
        progress: show a progress bar.

    Returns:
        The head: gate 1 with the best step's weights, or a fresh head (gate 0) when no step beat step 0 or
        nothing could be learnt (``lr`` or ``steps`` 0).

    Raises:
        ValueError: no example.
    """
    if not examples:
        raise ValueError("no example to train a refinement head on")
    config = config or HeadConfig()
    t0 = time.time()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    head = RefineHead(config.width)
    if config.lr <= 0 or config.steps <= 0:  # nothing can move: an untrained U-Net is noise, not an answer
        head.eval()
        if report is not None:
            report.update(val_history=[], best_step=0, seconds=round(time.time() - t0, 1))
        return head
    fresh = {k: v.clone() for k, v in head.state_dict().items()}
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=config.lr)
    history: List[Tuple[int, float]] = []
    best = (validate(head) if validate else -1.0, 0, fresh)
    history.append((0, round(best[0], 4)))
    crop = min(config.crop, max(max(e.image.shape[-2:]) for e in examples))  # small images: no padding to waste
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc="train head", unit="step")
    for step in range(1, config.steps + 1):
        head.train()
        crops = [_crop(examples[int(rng.integers(len(examples)))], crop, rng) for _ in range(config.batch_size)]
        image, logits, truth, valid = (torch.cat(c) for c in zip(*crops))
        loss = head_loss(head.unet(image, logits), truth, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if validate is not None and (step % config.val_every == 0 or step == config.steps):
            head.eval()
            with torch.no_grad():
                head.gate.fill_(1.0)
                v = validate(head)
                head.gate.fill_(0.0)
            history.append((step, round(v, 4)))
            if v > best[0]:
                best = (v, step, {k: t.detach().clone() for k, t in head.state_dict().items()})
    if bar is not None:
        bar.close()
    head.eval()
    if validate is not None:
        head.load_state_dict(best[2])
        head.gate.fill_(0.0 if best[1] == 0 else 1.0)
    else:
        head.gate.fill_(1.0)
    if report is not None:
        report.update(val_history=history, best_step=best[1] if validate else config.steps,
                      seconds=round(time.time() - t0, 1))
    return head


def head_state(head: Optional[RefineHead]) -> Dict[str, torch.Tensor]:
    """The head's weights under the :data:`HEAD_PREFIX` keys of a layer file (empty for no head)."""
    return {} if head is None else {HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}


def split_head_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[RefineHead]]:
    """Splits a layer file's tensors into (Alignment Layer weights, head or None)."""
    rest = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    sub = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if not sub:
        return rest, None
    head = RefineHead(int(sub["enc1.0.weight"].shape[0]))
    sub.setdefault("click_edits", torch.zeros(1))  # heads stored before it: corrective clicks do not edit them
    head.load_state_dict(sub)
    return rest, head.eval()
