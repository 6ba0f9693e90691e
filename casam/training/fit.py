"""The Alignment Layer's fit loop (CA-SAM's loss, best-epoch selection on box validation) and its validation."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from casam.model.backbone import Backbone
from casam.prompts.masks import PROMPT_TYPES, jittered_box
from casam.scoring.samples import Sample
from casam.scoring.score import mean_iou
from casam.training.config import TrainConfig
from casam.training.losses import casam_loss


def _prompt_tensors(kind: str, prompts: List[np.ndarray]):
    """The decoder's (points, labels, boxes) for a batch of box or point prompts."""
    if kind == "box":
        return None, None, torch.from_numpy(np.stack(prompts))
    pts = torch.from_numpy(np.stack(prompts))  # K×1×2
    return pts, torch.ones(pts.shape[:2], dtype=torch.int64), None


def _step(backbone: Backbone, batch: Sequence[Sample], h: torch.Tensor, config: TrainConfig,
          rng: np.random.Generator) -> torch.Tensor:
    """CA-SAM's loss on one batch: one fresh prompt per mask, decoded on the (aligned) embeddings ``h``."""
    dev = backbone.device
    total, count = 0.0, 0
    for i, s in enumerate(batch):
        groups: Dict[str, List] = {"box": [], "point": []}
        for t in s.targets:
            if rng.random() < config.box_prob:
                groups["box"].append((jittered_box(t.box, rng, s.geom.resized_hw, config.jitter), t.lowres))
            else:
                groups["point"].append((t.central[rng.integers(len(t.central))][None], t.lowres))
        for kind, items in groups.items():
            if not items:
                continue
            pts, lab, boxes = _prompt_tensors(kind, [p for p, _ in items])
            logits, iou_pred = backbone.decode(h[i : i + 1], pts, lab, boxes)
            target = torch.stack([t for _, t in items])[:, None].to(dev)
            loss = casam_loss(logits, iou_pred, target, config.focal_gamma, config.focal_alpha)
            total = total + loss * len(items)
            count += len(items)
    return total / max(count, 1)


def validate(backbone: Backbone, layer: Optional[nn.Module], samples: Sequence[Sample]) -> Dict[str, float]:
    """Mean IoU of a layer per prompt type (:func:`casam.scoring.score.mean_iou`).

    Args:
        backbone: the frozen backbone.
        layer: the Alignment Layer (None: plain SAM).
        samples: the labelled images.

    Returns:
        Prompt type → mean IoU (``box``: tight box; ``click``: one click at the centroid, answered as
        :mod:`casam.prompts.clicks` answers it); NaN where there is no target.
    """
    return {p: mean_iou(backbone, layer, samples, p) for p in PROMPT_TYPES}


def fit(backbone: Backbone, samples: Sequence[Sample], config: TrainConfig, layer: Optional[nn.Module] = None,
        params: Optional[Iterable[nn.Parameter]] = None, progress: bool = True, desc: str = "train",
        val_samples: Optional[Sequence[Sample]] = None, report: Optional[Dict] = None) -> List[float]:
    """Optimises ``layer`` (or other ``params``, e.g. the mask decoder) on samples with CA-SAM's loss.

    With ``val_samples`` (and ``config.select_best``), ``layer`` is validated with box prompts before training
    (epoch 0) and after every epoch, and ends with the weights of its best epoch. Boxes, because the layer
    trains on boxes and clicks are answered through boxes; a click costs many decodes per mask, so click
    validation runs once, on the chosen epoch, in :func:`casam.training.layer.train_layer`.

    Args:
        backbone: frozen backbone (its decoder is used).
        samples: training samples (those without targets are skipped).
        config: training settings.
        layer: module applied to embeddings before the decoder (None = identity). A layer with a ``gate``
            parameter gets ``config.gate_lr`` for it.
        params: parameters to optimise (default: ``layer``'s).
        progress: show a progress bar.
        desc: progress bar title.
        val_samples: validation samples for best-epoch selection.
        report: filled with ``val_history`` (box IoU per epoch, epoch 0 first) and ``best_epoch``.

    Returns:
        Mean loss per epoch.

    Raises:
        ValueError: no training sample has a mask.
    """
    samples = [s for s in samples if s.targets]
    if not samples:
        raise ValueError("no training image has a non-empty mask")
    params = list(params if params is not None else layer.parameters())
    gate = getattr(layer, "gate", None) if layer is not None else None
    groups = [{"params": [p for p in params if p is not gate], "lr": config.lr}]
    if gate is not None and any(p is gate for p in params):
        groups.append({"params": [gate], "lr": config.gate_lr})
    opt = torch.optim.Adam(groups)
    rng = np.random.default_rng(config.seed)
    dev = backbone.device
    val = [s for s in (val_samples or []) if s.targets] if layer is not None and config.select_best else []
    scores: List[Dict[str, float]] = []
    best = (-1.0, 0, None)

    def check(epoch: int) -> None:
        nonlocal best
        layer.eval()
        v = {"box": mean_iou(backbone, layer, val, "box")}
        scores.append(v)
        m = v["box"]
        if m > best[0]:
            best = (m, epoch, {k: t.detach().clone() for k, t in layer.state_dict().items()})
        layer.train()

    if layer is not None:
        layer.to(dev).train()
        if val:
            check(0)
    history = []
    bar = None
    if progress:
        from tqdm import tqdm

        steps = config.epochs * ((len(samples) + config.batch_size - 1) // config.batch_size)
        bar = tqdm(total=steps, desc=desc, unit="step")
    for epoch in range(config.epochs):
        order = rng.permutation(len(samples))
        losses = []
        for b in range(0, len(order), config.batch_size):
            batch = [samples[i] for i in order[b : b + config.batch_size]]
            z = torch.stack([s.embedding for s in batch]).to(dev)
            loss = _step(backbone, batch, layer(z) if layer is not None else z, config, rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(float(np.mean(losses)))
        if val:
            check(epoch + 1)
    if bar is not None:
        bar.close()
    if layer is not None:
        if val:
            layer.load_state_dict(best[2])
        layer.eval()
    if report is not None:
        report["val_history"] = scores
        report["best_epoch"] = best[1] if val else None
    return history

