"""Scoring a segmentation prompt on labelled images: one decision, used by every evaluator of casam.

Training's validation (:mod:`casam.training.layer`), ``casam benchmark``, ``casam evaluate`` and ``casam federated`` all
score a mask the same way:

* its prompts come from the ground truth (:func:`mask_prompts`): the tight box, and one click at the foreground
  pixel nearest the centroid;
* a ``click`` is answered as casam answers clicks (:func:`click_logits`, :mod:`casam.prompts.clicks`), through
  the layer and its refinement head; a ``point`` is the same click given to the decoder as a raw point prompt
  with no box proposals (:func:`raw_click`: plain LiteMedSAM's answer, never refined);
* a mask is scored by IoU, Dice and boundary IoU (:func:`mask_metrics`), and a task by the mean over its masks
  (:func:`aggregate`, :func:`mean_iou`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from casam.model.backbone import Backbone
from casam.model.head import corrective_clicks, refine, split_interaction
from casam.model.preprocess import Geometry, box_to_model, logits_to_image, points_to_model
from casam.prompts.clicks import ClickConfig, decode_clicks
from casam.prompts.masks import BOX, CLICK, PROMPT_TYPES, centroid_point, tight_box
from casam.scoring.metrics import boundary_iou, dice, iou
from casam.scoring.protocol import click_sequence

if TYPE_CHECKING:  # training imports this module
    from casam.scoring.samples import Sample

__all__ = ["METRICS", "ImageScores", "mask_prompts", "raw_click_logits", "raw_click", "click_logits",
           "head_of", "sample_logits", "predict_sample", "mask_metrics", "mask_scores", "mean_iou", "score_image",
           "sequences", "interaction_logits", "aggregate"]

METRICS = ("iou", "dice", "biou")
ImageScores = Dict[str, Dict[str, List[float]]]  # prompt -> metric -> one value per mask
_METRIC_FNS = {"iou": iou, "dice": dice, "biou": boundary_iou}


def mask_prompts(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The prompts a ground-truth mask gives an evaluation.

    Args:
        mask: H×W binary mask, not empty.

    Returns:
        (its tight (x0, y0, x1, y1) box, its centroid click as 1×2 (x, y)), both in image pixels.

    Raises:
        ImageError: the mask is empty.
    """
    return tight_box(mask), centroid_point(mask)


def raw_click_logits(backbone: Backbone, h: torch.Tensor, points: np.ndarray,
                     labels: Optional[np.ndarray] = None) -> torch.Tensor:
    """The decoder's answer to clicks given as raw point prompts (no box proposals): plain SAM's click answer.

    Args:
        backbone: the frozen backbone.
        h: the (aligned) embedding of one image, 1×C×h×w.
        points: K×N×2 clicks in the model frame (K objects, N clicks each).
        labels: K×N click labels (1 foreground, 0 background); default all foreground.

    Returns:
        The decoder's logits, K×M×L×L (model frame).
    """
    pts = torch.from_numpy(points)
    labs = torch.ones(pts.shape[:2], dtype=torch.int64) if labels is None else torch.from_numpy(labels)
    logits, _ = backbone.decode(h, pts, labs, None)
    return logits


@torch.no_grad()
def raw_click(backbone: Backbone, h: torch.Tensor, geom: Geometry, points: np.ndarray,
              labels: Optional[np.ndarray] = None) -> np.ndarray:
    """Plain SAM's mask for the clicks on one object (:func:`raw_click_logits`), at the original image size.

    Args:
        backbone: the frozen backbone.
        h: the (aligned) embedding of the image, 1×C×h×w.
        geom: the image's geometry.
        points: N×2 clicks, (x, y) image pixels.
        labels: N click labels; default all foreground.

    Returns:
        H×W bool mask.
    """
    mp = points_to_model(points, geom)
    logits = raw_click_logits(backbone, h, mp[None], None if labels is None else np.asarray(labels)[None])
    return logits_to_image(logits[0, 0].cpu(), geom).numpy() > 0


def click_logits(backbone: Backbone, h: torch.Tensor, geom: Geometry, points: np.ndarray, labels: np.ndarray,
                 box: Optional[np.ndarray] = None, config: Optional[ClickConfig] = None) -> torch.Tensor:
    """Logits (1×1×L×L) of clicks (model frame) on an (aligned) embedding ``h``.

    The clicks are answered by :func:`casam.prompts.clicks.decode_clicks`.
    """
    decode = partial(backbone.decode, h, context=backbone.decoder_context(h))  # its image-side work done once
    logits, _, _ = decode_clicks(decode, points, labels, geom.resized_hw, backbone.img_size, backbone.lowres_size,
                                 config, box)
    return logits


def head_of(layer: Optional[nn.Module]):
    """The refinement head a layer carries (:mod:`casam.model.head`), or None."""
    return getattr(layer, "head", None) if layer is not None else None


def sample_logits(backbone: Backbone, h: torch.Tensor, sample: "Sample", prompt: str = BOX) -> torch.Tensor:
    """SAM's logits for every target of a sample on an (aligned) embedding.

    Args:
        backbone: the frozen backbone.
        h: the (aligned) embedding of the sample, 1×C×h×w.
        sample: the labelled image.
        prompt: ``box`` (its tight box), ``click`` (one click at its centroid pixel answered as the product answers
            clicks) or ``point`` (that click as a raw point prompt of the decoder, :func:`raw_click_logits`).

    Returns:
        K×L×L logits, model frame, one per target.

    Raises:
        ValueError: unknown prompt.
    """
    if prompt == CLICK:
        logits = torch.cat([click_logits(backbone, h, sample.geom, points_to_model(centroid_point(t.mask), sample.geom),
                                         np.ones(1, np.int64)) for t in sample.targets])
    elif prompt == BOX:
        logits, _ = backbone.decode(h, None, None, torch.from_numpy(np.stack([t.box for t in sample.targets])))
    elif prompt == "point":
        pts = [points_to_model(centroid_point(t.mask), sample.geom) for t in sample.targets]
        logits = raw_click_logits(backbone, h, np.stack(pts))
    else:
        raise ValueError(f"unknown prompt kind {prompt!r}")
    return logits[:, 0]


@torch.no_grad()
def predict_sample(backbone: Backbone, layer: Optional[nn.Module], sample: "Sample", prompt: str = BOX,
                   aligned: Optional[torch.Tensor] = None) -> List[np.ndarray]:
    """Predicts every target of a sample (prompts as in :func:`sample_logits`), through the layer and its
    refinement head when it has one (not for the raw ``point`` prompt, which is plain LiteMedSAM's answer).

    Args:
        backbone: the frozen backbone.
        layer: the Alignment Layer (None: plain SAM).
        sample: the labelled image.
        prompt: ``box``, ``click`` or ``point``.
        aligned: the layer's output on the sample's embedding, when already computed.

    Returns:
        One H×W bool mask per target, at the original image size.
    """
    if not sample.targets:
        return []
    z = sample.embedding[None].to(backbone.device)
    h = aligned if aligned is not None else (layer(z) if layer is not None else z)
    full = logits_to_image(sample_logits(backbone, h, sample, prompt).cpu(), sample.geom)
    if prompt != "point":
        full = refine(head_of(layer), None if sample.image is None else sample.image.float(), full)
    return [m.numpy() > 0 for m in full]


def mask_metrics(pred: np.ndarray, truth: np.ndarray, metrics: Sequence[str] = METRICS) -> Dict[str, float]:
    """Scores of one predicted mask against its ground truth.

    Args:
        pred: H×W bool prediction.
        truth: H×W bool ground truth.
        metrics: which of ``iou``, ``dice``, ``biou`` (boundary IoU).

    Returns:
        Metric name → value.
    """
    return {m: _METRIC_FNS[m](pred, truth) for m in metrics}


def mask_scores(backbone: Backbone, layer: Optional[nn.Module], samples: Sequence["Sample"],
                prompt: str = BOX) -> List[float]:
    """IoU of every target of the samples, in order (see :func:`predict_sample`)."""
    return [iou(m, t.mask) for s in samples for t, m in zip(s.targets, predict_sample(backbone, layer, s, prompt))]


def mean_iou(backbone: Backbone, layer: Optional[nn.Module], samples: Sequence["Sample"], prompt: str = BOX) -> float:
    """Mean IoU over every target of the samples (per mask, then averaged). NaN when there is none."""
    scores = mask_scores(backbone, layer, samples, prompt)
    return float(np.mean(scores)) if scores else float("nan")


@torch.no_grad()
def score_image(backbone: Backbone, layer: Optional[Callable], sample: "Sample", raw_click: bool = False,
                prompts: Sequence[str] = PROMPT_TYPES) -> ImageScores:
    """IoU, Dice and boundary IoU of every mask of one test image, for the box and the click prompt.

    The layer runs once per image; both prompts decode on its output with :func:`predict_sample`.

    Args:
        backbone: the frozen backbone.
        layer: the Alignment Layer (None: plain SAM).
        sample: the test image.
        raw_click: answer the click as the decoder's raw point prompt (plain LiteMedSAM) instead of as casam does.
        prompts: which of ``box`` and ``click`` to score.

    Returns:
        prompt → metric → one value per mask.
    """
    out: ImageScores = {p: {m: [] for m in METRICS} for p in prompts}
    if not sample.targets:
        return out
    z = sample.embedding[None].to(backbone.device)
    h = layer(z) if layer is not None else z
    for prompt in prompts:
        kind = "point" if prompt == CLICK and raw_click else prompt
        preds = predict_sample(backbone, layer, sample, kind, aligned=h)
        for t, m in zip(sample.targets, preds):
            for name, v in mask_metrics(m, t.mask).items():
                out[prompt][name].append(v)
    return out


@torch.no_grad()
def sequences(backbone: Backbone, layer: Optional[Callable], sample: "Sample", clicks: int, raw: bool = False,
              config: Optional[ClickConfig] = None, first: str = CLICK, corrections: bool = True) -> List[Dict]:
    """Interaction sequences (:func:`casam.scoring.protocol.click_sequence`) on every mask of one test image, each
    request answered as the product answers it (:func:`interaction_logits`).

    Args:
        backbone: frozen backbone.
        layer: the layer that decodes this image (None: plain SAM).
        sample: the test image.
        clicks: answers per sequence (the first prompt's and ``clicks - 1`` corrective clicks').
        raw: give the clicks (and box) to the decoder as raw prompts (plain LiteMedSAM) instead of casam's answer.
        config: how casam answers clicks (default :class:`casam.prompts.clicks.ClickConfig`).
        first: the first prompt, ``click`` (at the mask's centre) or ``box`` (its tight box).
        corrections: the layer also answers requests with corrective clicks (else plain SAM does: the gate's
            ``corrections`` decision, :meth:`casam.registry.store.LayerInfo.serves`).

    Returns:
        One sequence result per mask (see :func:`casam.scoring.protocol.click_sequence`).
    """
    z = sample.embedding[None].to(backbone.device)
    aligned = {None: z}
    memo: dict = {}
    image = None if sample.image is None else sample.image.float()

    def predict(pts: np.ndarray, labs: np.ndarray, box: Optional[np.ndarray]) -> np.ndarray:
        has_box = box is not None
        lay = layer if corrections or corrective_clicks(pts, labs, has_box)[0] is None else None
        if lay not in aligned:
            aligned[lay] = lay(z)
        h = aligned[lay]
        if raw:
            mp = points_to_model(pts, sample.geom)[None] if len(pts) else None
            logits, _ = backbone.decode(h, None if mp is None else torch.from_numpy(mp),
                                        None if mp is None else torch.from_numpy(np.asarray(labs)[None]),
                                        None if box is None else torch.from_numpy(box_to_model(box, sample.geom))[None])
            return logits_to_image(logits[0, 0].cpu(), sample.geom).numpy() > 0
        full = interaction_logits(backbone, h, sample.geom, head_of(lay), image, pts, labs, box, config, memo)
        return full.numpy() > 0

    return [click_sequence(predict, t.mask, clicks, first) for t in sample.targets]


def interaction_logits(backbone: Backbone, h: torch.Tensor, geom: Geometry, head, image: Optional[torch.Tensor],
                       points: Optional[np.ndarray], labels: Optional[np.ndarray], box: Optional[np.ndarray] = None,
                       config: Optional[ClickConfig] = None, memo: Optional[dict] = None) -> torch.Tensor:
    """The product's answer to one request — clicks and/or a box — on an (aligned) embedding, through a refinement
    head when the layer has one; the decision the predictor and every evaluator share.

    A head that reads clicks (:func:`casam.model.head.reads_clicks`) gets SAM's answer to the first prompt alone
    (the box, or the first foreground click answered as casam answers clicks) and every click; otherwise SAM answers
    all prompts together (clicks through :func:`casam.prompts.clicks.decode_clicks`, which edits a box's answer)
    and a head rewrites that answer (:func:`casam.model.head.refine`).

    Args:
        backbone: frozen backbone.
        h: the (aligned) embedding, 1×C×h×w.
        geom: the image's geometry.
        head: the layer's refinement head, or None.
        image: :func:`casam.model.head.image_tensor` of the image (float), or None (then no head applies).
        points: N×2 (x, y) image pixels, or None / empty.
        labels: N labels (1 foreground, 0 background).
        box: (x0, y0, x1, y1) image pixels, or None.
        config: how casam answers clicks.
        memo: SAM's answers by prompt, kept between the requests of one interaction (a head that reads clicks asks
            SAM for the same first prompt at every step); None: none kept.

    Returns:
        H×W logits at the original image size (CPU).
    """
    (pts, labs), edits = split_interaction(head, image, points, labels, box is not None)
    tb = None if box is None else box_to_model(box, geom)
    key = (id(h), None if pts is None else np.asarray(pts).tobytes(), None if labs is None else
           np.asarray(labs).tobytes(), None if tb is None else tb.tobytes())
    if memo is not None and key in memo:
        full = memo[key]
    else:
        if pts is None:
            logits, _ = backbone.decode(h, None, None, torch.from_numpy(tb)[None])
        else:
            logits = click_logits(backbone, h, geom, points_to_model(pts, geom), np.asarray(labs), tb, config)
        full = logits_to_image(logits[0, 0].cpu(), geom)
        if memo is not None:
            memo[key] = full
    if image is None or head is None:
        return full
    return refine(head, image, full, *edits)


def aggregate(per_image: Sequence[ImageScores],
              prompts: Sequence[str] = PROMPT_TYPES) -> Dict[str, Dict[str, Optional[float]]]:
    """Mean over every mask of a task (as :func:`mean_iou`), per prompt and metric.

    Args:
        per_image: :func:`score_image` of each image of the task.
        prompts: the prompts to aggregate.

    Returns:
        prompt → metric → mean (None when there is no mask).
    """
    res: Dict[str, Dict[str, Optional[float]]] = {}
    for p in prompts:
        res[p] = {}
        for m in METRICS:
            vals = [v for s in per_image for v in s[p][m]]
            res[p][m] = float(np.mean(vals)) if vals else None
    return res
