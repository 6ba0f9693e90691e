"""Training an institution's refinement head, and the evidence for its click edits."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from casam.model.backbone import Backbone
from casam.model.head import RefineHead
from casam.model.preprocess import logits_to_image
from casam.prompts.masks import BOX, PROMPT_TYPES
from casam.registry.evidence import decide
from casam.scoring.metrics import iou as iou_metric
from casam.scoring.samples import Sample
from casam.scoring.score import sample_logits, sequences
from casam.training.config import CLICK_EDIT_CLICKS, TrainConfig


def click_edit_evidence(backbone: Backbone, layer: nn.Module, val_s: Sequence[Sample],
                        clicks: int = CLICK_EDIT_CLICKS) -> Dict[str, object]:
    """Whether corrective clicks' edits should stand against the layer's refinement head, on evidence.

    Every validation mask gets a click sequence (one click at its centroid, then each next one at the centre of
    the largest error) answered with the head overruling the clicks and with the clicks' edits kept
    (:func:`casam.model.head.refine`); the IoUs after the last click are the gate's paired evidence
    (:func:`casam.registry.evidence.decide`). Sets ``layer.head.click_edits`` to the decision.

    Args:
        backbone: frozen backbone.
        layer: the institution's layer with its head.
        val_s: validation samples (with :attr:`Sample.image`).
        clicks: clicks per sequence (the first one and ``clicks - 1`` corrective ones).

    Returns:
        The evidence (``use``, ``gain``, ``se``, ``n``), with ``clicks``.
    """
    head = layer.head
    finals = {}
    for on in (0.0, 1.0):
        head.click_edits.fill_(on)
        finals[on] = [seq["iou"][-1] for s in val_s if s.image is not None
                      for seq in sequences(backbone, layer, s, clicks)]
    evidence = decide(finals[1.0], finals[0.0])
    head.click_edits.fill_(1.0 if evidence["use"] else 0.0)
    return {**evidence, "clicks": clicks}


def fit_head(backbone: Backbone, layer: nn.Module, train_s: Sequence[Sample], val_s: Sequence[Sample],
             config: TrainConfig, report: Optional[Dict] = None, progress: bool = False):
    """Trains an institution's refinement head (:mod:`casam.model.head`) on its layer's answers.

    The head learns from the layer's answer to each training mask's tight box and to one click at its centroid
    (answered as the product answers clicks), and keeps its best step by box IoU on the validation masks
    (step 0: the layer alone).

    Args:
        backbone: frozen backbone.
        layer: the institution's trained Alignment Layer (its answers are the head's input).
        train_s, val_s: training and validation samples (with :attr:`Sample.image`).
        config: ``head_steps``, ``head_lr``, ``head_crop``, ``head_batch_size`` and ``seed`` are used.
        report: filled as :func:`casam.training.head.train_head` fills it.
        progress: show a progress bar.

    Returns:
        The head (gate 0, i.e. the layer alone, when no step beat it), or None without validation images.
    """
    dev = backbone.device

    @torch.no_grad()
    def examples(samples: Sequence[Sample], prompts: Sequence[str]) -> List[HeadExample]:
        out = []
        for s in samples:
            if s.image is None or not s.targets:
                continue
            img = s.image.float()
            h = layer(s.embedding[None].to(dev))
            for prompt in prompts:
                full = logits_to_image(sample_logits(backbone, h, s, prompt).cpu(), s.geom)
                for t, lg in zip(s.targets, full):
                    b, truth = to_head_resolution(img, lg, t.mask)
                    ys, xs = np.nonzero(truth[0, 0].numpy())
                    region = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else (0, 0, 0, 0)
                    out.append(HeadExample(img, b.half(), truth, region))
        return out

    val_ex = examples(val_s, [BOX])
    if not val_ex:
        return None
    train_ex = examples(train_s, list(PROMPT_TYPES))

    @torch.no_grad()
    def score(head) -> float:
        return float(np.mean([iou_metric((head(e.image, e.logits.float())[0, 0] > 0).numpy(), e.truth[0, 0].numpy() > 0)
                              for e in val_ex]))

    cfg = HeadConfig(steps=config.head_steps, batch_size=config.head_batch_size, crop=config.head_crop,
                     lr=config.head_lr, seed=config.seed)
    return train_head(train_ex, cfg, validate=score, report=report, progress=progress)


@dataclass
class HeadConfig:
    """Training settings of a refinement head; the defaults are :class:`TrainConfig`'s ``head_*`` ones.

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
    steps: int = TrainConfig.head_steps
    batch_size: int = TrainConfig.head_batch_size
    crop: int = TrainConfig.head_crop
    lr: float = TrainConfig.head_lr
    val_every: int = 50
    seed: int = TrainConfig.seed


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


def to_head_resolution(image: torch.Tensor, logits: torch.Tensor,
                       truth: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """Brings logits and a truth mask at the original size to the head's resolution of ``image``.

    Args:
        image: the image at the head's resolution (…×h×w).
        logits: H×W logits at the original size.
        truth: H×W 0/1 mask at the original size.

    Returns:
        (logits 1×1×h×w, truth 1×1×h×w float 0/1).
    """
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
