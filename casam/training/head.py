"""Training an institution's refinement head, and the evidence for its click edits."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from casam.model.backbone import Backbone
from casam.model.head import RefineHead, click_maps, click_radius
from casam.model.preprocess import logits_to_image
from casam.prompts.masks import BOX, CLICK, PROMPT_TYPES, centroid_point
from casam.registry.evidence import GATE_MIN_GAIN, decide
from casam.scoring.metrics import iou as iou_metric
from casam.scoring.protocol import next_click
from casam.scoring.samples import Sample
from casam.scoring.score import sample_logits, sequences
from casam.training.config import CLICK_EDIT_CLICKS, CLICK_EVIDENCE_STEPS, HEAD_SIM_CLICKS, TrainConfig

# Answers of the click sequence a click-reading head is scored by when its best training step is chosen: the first
# prompt's and VAL_STEPS - 1 simulated corrective click's (at the head's resolution, no SAM call).
VAL_STEPS = 2
# The cross-entropy of pixels within CLICK_REACH pixels of a click weighs 1 + CLICK_LOSS_WEIGHT times as much while
# a click-reading head trains: what a click points at is a few pixels of a crop, and the answer to it is what counts.
CLICK_REACH = 12
CLICK_LOSS_WEIGHT = 4.0
# Most validation images whose click sequences decide how corrective clicks are answered (click_evidence).
CLICK_EVIDENCE_IMAGES = 12


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


def click_evidence(backbone: Backbone, layer: nn.Module, val_s: Sequence[Sample],
                   steps: int = CLICK_EVIDENCE_STEPS) -> Dict[str, object]:
    """How corrective clicks are answered after a layer, on evidence from its validation click sequences.

    Every validation mask (of at most :data:`CLICK_EVIDENCE_IMAGES` images) gets two interaction sequences as the
    product answers them
    (:func:`casam.scoring.score.sequences`): its tight box, and one click at its centre, each followed by
    ``steps - 1`` clicks at the centre of the largest error. Two decisions follow:

    * ``reads_clicks`` (a head built to read clicks): the head answers the clicks when the paired mean IoU over
      each sequence (its AUC) with the clicks read beats the head ignoring them, by the gate's rule
      (:func:`casam.registry.evidence.decide`); sets ``layer.head.reads_clicks``.
    * ``corrections``: the layer also answers requests with corrective clicks when, at every corrective step, its
      mean IoU over both protocols is at least the fresh install's (plain SAM with casam's clicks) −
      :data:`casam.registry.evidence.GATE_MIN_GAIN`; otherwise such requests go to plain SAM.

    Args:
        backbone: frozen backbone.
        layer: the institution's layer (with or without a head).
        val_s: validation samples (with :attr:`Sample.image`).
        steps: answers per sequence.

    Returns:
        ``reads_clicks`` (the evidence, or None without a click-reading head), ``corrections`` (``use``,
        ``gain_per_step``: the mean paired IoU gain over the fresh install after each corrective click, ``n``) and
        ``steps``.
    """
    val_s = [s for s in val_s if s.image is not None and s.targets]
    if len(val_s) > CLICK_EVIDENCE_IMAGES:  # bounded work per layer: images spread over the validation split
        val_s = [val_s[int(i)] for i in np.unique(np.linspace(0, len(val_s) - 1, CLICK_EVIDENCE_IMAGES).round())]

    def curves(lay) -> List[List[float]]:
        return [seq["iou"] for first in (BOX, CLICK) for s in val_s for seq in sequences(backbone, lay, s, steps,
                                                                                           first=first)]

    head = getattr(layer, "head", None)
    reads = None
    if head is not None and head.clicks:
        head.reads_clicks.fill_(1.0)
        on = curves(layer)
        head.reads_clicks.fill_(0.0)
        off = curves(layer)
        reads = decide([float(np.mean(c)) for c in on], [float(np.mean(c)) for c in off])
        head.reads_clicks.fill_(1.0 if reads["use"] else 0.0)
        chosen = on if reads["use"] else off
    else:
        chosen = curves(layer)
    fresh = curves(None)
    gains = [round(float(np.mean([a[k] - b[k] for a, b in zip(chosen, fresh)])), 5) if chosen else None
             for k in range(1, steps)]
    use = bool(chosen) and all(g is not None and g >= -GATE_MIN_GAIN for g in gains)
    return {"reads_clicks": reads, "corrections": {"use": use, "gain_per_step": gains, "n": len(chosen)},
            "steps": steps}


@torch.no_grad()
def head_examples(backbone: Backbone, layer: Optional[nn.Module], samples: Sequence[Sample],
                  prompts: Sequence[str]) -> List["HeadExample"]:
    """What a head learns from (or is scored on): the layer's answer to every mask of ``samples`` for each prompt
    type (the tight box; one click at the centroid, answered as the product answers clicks), at the head's
    resolution.

    Args:
        backbone: frozen backbone.
        layer: the institution's Alignment Layer (None: plain SAM).
        samples: samples with :attr:`Sample.image`; those without it or without a target are skipped.
        prompts: prompt types (:data:`casam.prompts.masks.PROMPT_TYPES`).

    Returns:
        One :class:`HeadExample` per mask and prompt type.
    """
    dev = backbone.device
    out = []
    for s in samples:
        if s.image is None or not s.targets:
            continue
        img = s.image.float()
        emb = s.embedding[None].to(dev)
        h = layer(emb) if layer is not None else emb
        for prompt in prompts:
            full = logits_to_image(sample_logits(backbone, h, s, prompt).cpu(), s.geom)
            for t, lg in zip(s.targets, full):
                b, truth = to_head_resolution(img, lg, t.mask)
                ys, xs = np.nonzero(truth[0, 0].numpy())
                region = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else (0, 0, 0, 0)
                pts = labs = None
                if prompt == CLICK:  # the first click, at the head's resolution
                    scale = np.array([img.shape[-1] / t.mask.shape[1], img.shape[-2] / t.mask.shape[0]])
                    pts, labs = centroid_point(t.mask) * scale, np.ones(1, np.int64)
                out.append(HeadExample(img, b.half(), truth, region, pts, labs))
    return out


def fit_head(backbone: Backbone, layer: nn.Module, train_s: Sequence[Sample], val_s: Sequence[Sample],
             config: TrainConfig, report: Optional[Dict] = None, progress: bool = False):
    """Trains an institution's refinement head (:mod:`casam.model.head`) on its layer's answers.

    The head learns from the layer's answer to each training mask's tight box and to one click at its centroid
    (answered as the product answers clicks) and, when it reads clicks, from simulated corrective clicks
    (:func:`train_head`). It keeps its best step by the mean IoU of the validation masks' box answers — for a head
    that reads clicks, the mean over the box answer and :data:`VAL_STEPS` - 1 simulated corrective clicks
    (:func:`sequence_ious`) — step 0 being the layer alone.

    Args:
        backbone: frozen backbone.
        layer: the institution's trained Alignment Layer (its answers are the head's input).
        train_s, val_s: training and validation samples (with :attr:`Sample.image`).
        config: ``head_steps``, ``head_lr``, ``head_crop``, ``head_batch_size``, ``head_clicks`` and ``seed`` are
            used.
        report: filled as :func:`casam.training.head.train_head` fills it.
        progress: show a progress bar.

    Returns:
        The head (gate 0, i.e. the layer alone, when no step beat it), or None without validation images.
    """
    val_ex = head_examples(backbone, layer, val_s, [BOX])
    if not val_ex:
        return None
    train_ex = head_examples(backbone, layer, train_s, list(PROMPT_TYPES))

    @torch.no_grad()
    def score(head) -> float:
        return float(np.mean([np.mean(sequence_ious(head, e, VAL_STEPS if head.clicks else 1)) for e in val_ex]))

    cfg = HeadConfig(steps=config.head_steps, batch_size=config.head_batch_size, crop=config.head_crop,
                     lr=config.head_lr, seed=config.seed, clicks=config.head_clicks, norm=config.head_norm)
    return train_head(train_ex, cfg, validate=score, report=report, progress=progress)


@dataclass
class HeadConfig:
    """Training settings of a refinement head; the defaults are :class:`TrainConfig`'s ``head_*`` ones.

    Attributes:
        width: channels of the U-Net's first level.
        steps: optimiser steps.
        batch_size: crops per step.
        crop: side of the training crops (pixels at the head's resolution).
        lr: Adam's peak learning rate.
        val_every: validate (and keep the best) every this many steps.
        seed: seed of crops, flips and init.
        clicks: train a head that reads clicks (:class:`casam.model.head.RefineHead`).
        sim_clicks: most corrective clicks simulated per training step (0 to this many, drawn per step).
        norm: a U-Net with GroupNorm (:class:`casam.model.head.RefineHead`).
        schedule: "cosine" (the learning rate decays to 0 over the steps) or "constant".
        warmup: steps of linear warm-up to ``lr``.
    """

    width: int = 16
    steps: int = TrainConfig.head_steps
    batch_size: int = TrainConfig.head_batch_size
    crop: int = TrainConfig.head_crop
    lr: float = TrainConfig.head_lr
    val_every: int = 25
    seed: int = TrainConfig.seed
    clicks: bool = TrainConfig.head_clicks
    sim_clicks: int = HEAD_SIM_CLICKS
    norm: bool = TrainConfig.head_norm
    schedule: str = "cosine"
    warmup: int = 5


@dataclass
class HeadExample:
    """One mask of one image for the head: its image, SAM's answer to a prompt, the truth, the prompt's box and
    clicks.

    Attributes:
        image: 1×3×h×w (:func:`image_tensor`).
        logits: 1×1×h×w SAM logits (float16 to save memory) at the head's resolution.
        truth: 1×1×h×w float 0/1 at the head's resolution.
        region: (x0, y0, x1, y1) at the head's resolution where crops are centred (the prompt's box).
        points: M×2 (x, y) clicks of the prompt at the head's resolution (None for a box).
        labels: their M labels.
    """

    image: torch.Tensor
    logits: torch.Tensor
    truth: torch.Tensor
    region: Tuple[int, int, int, int]
    points: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None

    @property
    def radius(self) -> float:
        """The click disk radius at this image's head resolution (:func:`casam.model.head.click_radius`)."""
        return click_radius(tuple(self.image.shape[-2:]))


@torch.no_grad()
def sequence_ious(head: RefineHead, ex: HeadExample, steps: int) -> List[float]:
    """IoU of a head's answers to an example's prompt and then ``steps - 1`` simulated corrective clicks (each at
    the centre of the largest error, :func:`casam.scoring.protocol.next_click`), at the head's resolution.

    SAM is not asked again: a click-reading head answers SAM's first answer with the clicks. A head that does not
    read clicks gives its one answer at every step.
    """
    truth = ex.truth[0, 0].numpy() > 0
    hw = tuple(ex.image.shape[-2:])
    pts = np.zeros((0, 2)) if ex.points is None else np.asarray(ex.points, np.float64).reshape(-1, 2)
    labs = np.zeros(0, np.int64) if ex.labels is None else np.asarray(ex.labels).reshape(-1)
    out: List[float] = []
    for k in range(steps):
        maps = click_maps(pts, labs, hw) if head.clicks else None
        pred = (head(ex.image, ex.logits.float(), maps)[0, 0] > 0).numpy()
        out.append(iou_metric(pred, truth))
        nxt = next_click(pred, truth) if head.clicks and k < steps - 1 else None
        if nxt is None:
            return out + [out[-1]] * (steps - 1 - k)
        pts, labs = np.concatenate([pts, nxt[0]]), np.concatenate([labs, [nxt[1]]])
    return out


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


def _crop(ex: HeadExample, crop: int, rng: np.random.Generator) -> Tuple[torch.Tensor, ...]:
    """A random crop around the prompt's box: (image, logits, truth, click maps, valid), flipped at random."""
    h, w = ex.image.shape[-2:]
    ch, cw = min(crop, h), min(crop, w)
    x0, y0, x1, y1 = ex.region
    cy = int(rng.integers(max(0, y0 - 16), min(h, y1 + 17)))
    cx = int(rng.integers(max(0, x0 - 16), min(w, x1 + 17)))
    top, left = int(np.clip(cy - ch // 2, 0, h - ch)), int(np.clip(cx - cw // 2, 0, w - cw))
    sl = (..., slice(top, top + ch), slice(left, left + cw))
    maps = click_maps(ex.points, ex.labels, (ch, cw), offset=(left, top), radius=ex.radius)
    parts = [ex.image[sl], ex.logits[sl].float(), ex.truth[sl], maps]
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


@torch.no_grad()
def simulate_clicks(head: RefineHead, image: torch.Tensor, logits: torch.Tensor, truth: torch.Tensor,
                    valid: torch.Tensor, maps: torch.Tensor, radii: Sequence[float], n: int) -> torch.Tensor:
    """Adds ``n`` corrective clicks to each crop's click maps, each at the centre of the largest error of the head's
    current answer (:func:`casam.scoring.protocol.next_click`), as a clinician correcting it would.

    Args:
        head: the head being trained (its current weights answer).
        image, logits, truth, valid: the batch of crops (B×…×c×c).
        maps: B×2×c×c click maps so far.
        radii: click disk radius of each crop's image.
        n: clicks to add.

    Returns:
        The new B×2×c×c maps.
    """
    maps = maps.clone()
    for _ in range(n):
        pred = (head.unet(image, logits, maps) > 0).numpy()
        for b in range(len(pred)):
            v = valid[b, 0].numpy() > 0
            nxt = next_click(pred[b, 0] & v, (truth[b, 0].numpy() > 0) & v)
            if nxt is not None:
                add = click_maps(nxt[0], [nxt[1]], tuple(maps.shape[-2:]), radius=radii[b])[0]
                maps[b] = torch.maximum(maps[b], add)
    return maps


def near_clicks(maps: torch.Tensor, reach: int = CLICK_REACH) -> torch.Tensor:
    """B×1×c×c: 1 within ``reach`` pixels of a click's disk (either label), else 0."""
    k = 2 * reach + 1
    rows = F.max_pool2d(maps.amax(1, keepdim=True), (1, k), stride=1, padding=(0, reach))
    return F.max_pool2d(rows, (k, 1), stride=1, padding=(reach, 0))  # a square's max, one side at a time


def head_loss(logits: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor,
              weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy + soft Dice over the valid pixels of each crop.

    Args:
        logits, truth, valid: B×1×c×c.
        weight: B×1×c×c weights of the cross-entropy's pixels (None: 1), e.g. more around the clicks so that the
            few pixels a click is about weigh against the whole crop.
    """
    w = valid if weight is None else valid * weight
    bce = (F.binary_cross_entropy_with_logits(logits, truth, reduction="none") * w).sum() / valid.sum().clamp(min=1)
    p = torch.sigmoid(logits) * valid
    inter, total = (p * truth).flatten(1).sum(1), (p + truth * valid).flatten(1).sum(1)
    return bce + (1 - (2 * inter + 1) / (total + 1)).mean()


def _lr_factor(step: int, config: HeadConfig) -> float:
    """Learning-rate multiplier after ``step`` optimiser steps: linear warm-up, then constant or cosine decay."""
    if config.warmup and step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "cosine":
        t = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return 1.0


def train_head(examples: Sequence[HeadExample], config: Optional[HeadConfig] = None,
               validate: Optional[Callable[[RefineHead], float]] = None,
               report: Optional[Dict] = None, progress: bool = False) -> RefineHead:
    """Trains a fresh head on examples (random crops around each prompt's box, flips), keeping its best step.

    A head that reads clicks (``config.clicks``) is trained as interactive segmenters are: each step draws 0 to
    ``config.sim_clicks`` corrective clicks and places them one after another where the head's current answer
    on the crop errs most (:func:`simulate_clicks`), then learns the answer to the crop with those clicks.

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
    head = RefineHead(config.width, clicks=config.clicks, norm=config.norm)
    if config.lr <= 0 or config.steps <= 0:  # nothing can move: an untrained U-Net is noise, not an answer
        head.eval()
        if report is not None:
            report.update(val_history=[], best_step=0, seconds=round(time.time() - t0, 1))
        return head
    fresh = {k: v.clone() for k, v in head.state_dict().items()}
    head.to(memory_format=torch.channels_last)  # trains ~1.4x faster on a CPU; handed back in the default layout
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
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
        picked, crops = [], []
        for _ in range(config.batch_size):  # draw an example, then its crop (the seed's order)
            picked.append(examples[int(rng.integers(len(examples)))])
            crops.append(_crop(picked[-1], crop, rng))
        image, logits, truth, maps, valid = (torch.cat(c).contiguous(memory_format=torch.channels_last)
                                             for c in zip(*crops))
        if head.clicks:
            n = int(rng.integers(0, config.sim_clicks + 1))
            if n:
                maps = simulate_clicks(head, image, logits, truth, valid, maps, [e.radius for e in picked], n)
        weight = 1 + CLICK_LOSS_WEIGHT * near_clicks(maps) if head.clicks else None
        loss = head_loss(head.unet(image, logits, maps if head.clicks else None), truth, valid, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if validate is not None and (step % config.val_every == 0 or step == config.steps):
            head.eval()
            with torch.no_grad():
                head.gate.fill_(1.0)
                if head.clicks:
                    head.reads_clicks.fill_(1.0)
                v = validate(head)
                head.gate.fill_(0.0)
            history.append((step, round(v, 4)))
            if v > best[0]:
                best = (v, step, {k: t.detach().clone() for k, t in head.state_dict().items()})
    if bar is not None:
        bar.close()
    head.to(memory_format=torch.contiguous_format).eval()
    if validate is not None:
        head.load_state_dict(best[2])
        head.gate.fill_(0.0 if best[1] == 0 else 1.0)
    else:
        head.gate.fill_(1.0)
    if head.clicks:  # until the click evidence decides (casam.training.head.click_evidence)
        head.reads_clicks.fill_(1.0)
    if report is not None:
        report.update(val_history=history, best_step=best[1] if validate else config.steps,
                      seconds=round(time.time() - t0, 1))
    return head
