"""Training one Alignment Layer (and its router entry) for one institution, as in CA-SAM.

The backbone is frozen, so each image is encoded once and its embedding cached (on disk when a cache
folder is given, keyed by backbone hash + image content + intensity window). Per epoch every mask gets a
fresh prompt: its tight box with ±5 px jitter, or with probability ``1 − box_prob`` a point among the
central half of its pixels (METHOD's coin flip is ``box_prob = 0.5``; casam trains on boxes only by default
because clicks are answered through boxes, see :mod:`casam.clicks`). Loss = Focal(γ=2, α=0.25) + Dice +
MSE(predicted IoU, actual IoU) on the decoder's low-res logits. Only the new layer's parameters are optimised
(Adam); earlier layers are never loaded for writing.

The layer starts as the identity (closed gate, see :mod:`casam.alignment`); after every epoch it is validated
on the institution's held-out patients (box prompts) and the best epoch is kept — epoch 0, plain SAM, included;
that epoch is then validated for both prompt types (box, click) against plain SAM. The layer is then used for a prompt type only where it beat plain SAM on validation
(``LayerInfo.extra["use"]``).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .alignment import fresh_layer
from .backbone import Backbone
from .config import CLICK_EDIT_CLICKS, HEAD_STEPS, TAU_FOLDS, TAU_PERCENTILE, VAE_BETA, VAE_EPOCHS
from .errors import ImageError
from .evidence import decide
from .metrics import iou as iou_metric
from .preprocess import Geometry, Window, box_to_model, geometry_for, logits_to_image, mask_to_model, points_to_model
from .prompts import binary_masks, central_pixels, jittered_box, tight_box
from .refine import HeadConfig, HeadExample, image_tensor, refine, to_head_resolution, train_head
from .registry import LayerInfo, LayerRegistry
from .scoring import mask_scores, mean_iou, sample_logits, sequences
from .router import FeatureVAE, calibrate_tau, pool_embedding, train_vae


@dataclass
class TrainConfig:
    """Settings of one layer's training. Defaults are CA-SAM's recipe (METHOD.md).

    Attributes:
        epochs: passes over the training images (24).
        batch_size: images per optimiser step (6).
        lr: Adam learning rate (1e-4).
        seed: seed of every random choice (split, prompts, init, order).
        val_fraction: share of patients held out for validation (split by patient).
        max_images: cap on training images (a reduced CPU recipe); None = all.
        box_prob: probability of a box prompt (else a point); 1.0 = boxes only (default), METHOD: 0.5.
        gate_lr: learning rate of the layer's gate (opens it fast enough for a short training).
        select_best: validate after every epoch and keep the best one (epoch 0 = plain SAM).
        jitter: box jitter in model-input pixels (±5).
        focal_gamma, focal_alpha: focal loss settings (2, 0.25).
        vae_epochs, vae_lr, vae_batch_size, vae_beta: router VAE training (100, 5e-4, 6, 16.5; METHOD's code: 10 epochs).
        tau_folds, tau_percentile: threshold calibration (5-fold CV, 97th percentile).
        window: intensity window for the images (see casam.preprocess.apply_window).
        head_steps: optimiser steps of the institution's refinement head (casam.refine), trained after the layer
            on the layer's answers; 0 trains none.
        head_lr, head_crop, head_batch_size: its Adam learning rate, crop side and crops per step.
    """

    epochs: int = 24
    batch_size: int = 6
    lr: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.2
    max_images: Optional[int] = None
    box_prob: float = 1.0
    gate_lr: float = 1e-2
    select_best: bool = True
    jitter: float = 5.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    vae_epochs: int = VAE_EPOCHS
    vae_lr: float = 5e-4
    vae_batch_size: int = 6
    vae_beta: float = VAE_BETA
    tau_folds: int = TAU_FOLDS
    tau_percentile: float = TAU_PERCENTILE
    window: Window = "auto"
    head_steps: int = HEAD_STEPS
    head_lr: float = 3e-3
    head_crop: int = 160
    head_batch_size: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


class EmbeddingCache:
    """Frozen-encoder embeddings, computed once per image.

    Args:
        backbone: the backbone (its hash is part of every key).
        folder: where to keep embeddings on disk (float16 ``.npy``); None keeps them only in memory.
    """

    def __init__(self, backbone: Backbone, folder: Optional[str | Path] = None):
        self.backbone = backbone
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._mem: Dict[str, torch.Tensor] = {}

    def key(self, image: np.ndarray, window: Window) -> str:
        """Content key of an image under this backbone and window."""
        arr = np.ascontiguousarray(image)
        h = hashlib.sha256()
        h.update(f"{self.backbone.hash}|{window}|{arr.shape}|{arr.dtype}".encode())
        h.update(arr.tobytes())
        return h.hexdigest()

    def get(self, image: np.ndarray, window: Window = "auto") -> Tuple[torch.Tensor, Geometry]:
        """Returns (embedding C×e×e float32 on CPU, geometry) of an image, encoding it on a miss."""
        geom = geometry_for(np.asarray(image).shape[:2], self.backbone.img_size)
        k = self.key(image, window)
        if k in self._mem:
            return self._mem[k].float(), geom
        path = self.folder / k[:2] / f"{k}.npy" if self.folder else None
        if path is not None and path.exists():
            try:
                z = torch.from_numpy(np.load(path))
                self._mem[k] = z
                return z.float(), geom
            except (OSError, ValueError):
                pass  # corrupt cache entry: recompute
        x, geom = self.backbone.prepare(image, window)
        z = self.backbone.encode(x)[0].cpu().half()
        self._mem[k] = z
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, z.numpy())
            os.replace(tmp, path)
        return z.float(), geom


@dataclass
class Target:
    """One mask of one image, ready for training and evaluation."""

    cls: int
    lowres: torch.Tensor  # L×L float 0/1 in the padded model frame
    box: np.ndarray  # tight box, model frame
    central: np.ndarray  # central half of the pixels, model frame, nearest the centroid first
    mask: np.ndarray  # H×W bool at the original size


@dataclass
class Sample:
    """One image: embedding, geometry, pooled router feature, targets, patient."""

    embedding: torch.Tensor
    geom: Geometry
    feature: torch.Tensor
    targets: List[Target]
    patient: str
    key: str = ""
    image: Optional[torch.Tensor] = None  # the refinement head's view (casam.refine.image_tensor), float16


def make_samples(backbone: Backbone, images: Sequence[np.ndarray], masks: Sequence[Optional[np.ndarray]],
                 patients: Optional[Sequence[str]] = None, cache: Optional[EmbeddingCache] = None,
                 window: Window = "auto", progress: bool = False, desc: str = "encode") -> List[Sample]:
    """Encodes images (through the cache) and prepares their masks.

    Args:
        backbone: frozen backbone.
        images: images (H×W or H×W×C).
        masks: label maps of the same H×W (class ids, 0 = background), or None for unlabelled images.
        patients: patient id per image (default: one patient per image).
        cache: embedding cache (default: a memory-only one).
        window: intensity window.
        progress: show a progress bar.

    Returns:
        One Sample per image.

    Raises:
        ImageError: an image and its mask differ in size.
    """
    cache = cache or EmbeddingCache(backbone)
    patients = list(patients) if patients is not None else [str(i) for i in range(len(images))]
    L = backbone.lowres_size
    out = []
    it: Iterable = range(len(images))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=desc, unit="img")
    for i in it:
        img, lab = images[i], masks[i]
        z, geom = cache.get(img, window)
        targets = []
        if lab is not None:
            if np.asarray(lab).shape[:2] != np.asarray(img).shape[:2]:
                raise ImageError(f"image {i}: mask {np.asarray(lab).shape[:2]} and image {np.asarray(img).shape[:2]} differ in size")
            for c, m in binary_masks(lab):
                targets.append(Target(c, mask_to_model(m, geom, L), box_to_model(tight_box(m), geom),
                                      points_to_model(central_pixels(m), geom), m))
        out.append(Sample(z, geom, pool_embedding(z[None])[0], targets, patients[i], cache.key(img, window),
                          image_tensor(img, window).half()))
    return out


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Sigmoid focal loss (mean over pixels)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    a = alpha * target + (1 - alpha) * (1 - target)
    return (a * (1 - pt).pow(gamma) * ce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per mask, averaged."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def casam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float = 0.25) -> torch.Tensor:
    """Focal + Dice + MSE(predicted IoU, actual IoU of the thresholded prediction).

    Args:
        logits: K×1×L×L; iou_pred: K×1; target: K×1×L×L (0/1).
    """
    with torch.no_grad():
        pred = logits > 0
        inter = (pred & (target > 0)).flatten(1).sum(1).float()
        union = (pred | (target > 0)).flatten(1).sum(1).float()
        actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return focal_loss(logits, target, gamma, alpha) + dice_loss(logits, target) + F.mse_loss(iou_pred[:, 0], actual)


def _prompt_tensors(kind: str, prompts: List[np.ndarray]):
    if kind == "box":
        return None, None, torch.from_numpy(np.stack(prompts))
    pts = torch.from_numpy(np.stack(prompts))  # K×1×2
    return pts, torch.ones(pts.shape[:2], dtype=torch.int64), None


PROMPT_TYPES = ("box", "click")


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
            total = total + casam_loss(logits, iou_pred, target, config.focal_gamma, config.focal_alpha) * len(items)
            count += len(items)
    return total / max(count, 1)


def validate(backbone: Backbone, layer: Optional[nn.Module], samples: Sequence[Sample]) -> Dict[str, float]:
    """Mean IoU per prompt type (``box``: tight box; ``click``: one click at the centroid, see :mod:`casam.clicks`)."""
    return {p: evaluate(backbone, layer, samples, p) for p in PROMPT_TYPES}


def fit(backbone: Backbone, samples: Sequence[Sample], config: TrainConfig, layer: Optional[nn.Module] = None,
        params: Optional[Iterable[nn.Parameter]] = None, progress: bool = True, desc: str = "train",
        val_samples: Optional[Sequence[Sample]] = None, report: Optional[Dict] = None) -> List[float]:
    """Optimises ``layer`` (or other ``params``, e.g. the mask decoder) on samples with CA-SAM's loss.

    With ``val_samples`` (and ``config.select_best``), ``layer`` is validated with box prompts before training
    (epoch 0) and after every epoch, and ends with the weights of its best epoch. (Boxes, because the layer
    trains on boxes and clicks are answered through boxes; click validation costs ~13 decodes per mask, so it
    runs once, on the chosen epoch, in :func:`train_layer`.)

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
        v = {"box": evaluate(backbone, layer, val, "box")}
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

        bar = tqdm(total=config.epochs * ((len(samples) + config.batch_size - 1) // config.batch_size), desc=desc, unit="step")
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


def evaluate(backbone: Backbone, layer: Optional[nn.Module], samples: Sequence[Sample], prompt: str = "box") -> float:
    """Mean IoU over every target of the samples (per mask, then averaged; :func:`casam.scoring.mean_iou`).

    Args:
        backbone: the frozen backbone.
        layer: the Alignment Layer (None: plain SAM).
        samples: the labelled images.
        prompt: ``box``, ``click`` or ``point`` (see :func:`casam.scoring.sample_logits`).

    Returns:
        The mean IoU; NaN when there is no target.
    """
    return mean_iou(backbone, layer, samples, prompt)


def split_by_patient(patients: Sequence[str], val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Splits indices into (train, validation) so that no patient is in both.

    At least one patient stays in training; validation is empty with a single patient or fraction 0.
    """
    uniq = sorted(set(patients))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    n_val = int(round(len(uniq) * val_fraction))
    n_val = min(max(n_val, 1 if val_fraction > 0 and len(uniq) > 1 else 0), len(uniq) - 1)
    val_p = set(uniq[:n_val])
    train = [i for i, p in enumerate(patients) if p not in val_p]
    val = [i for i, p in enumerate(patients) if p in val_p]
    return train, val


def fit_router(samples: Sequence[Sample], config: TrainConfig) -> Tuple[FeatureVAE, float]:
    """Trains a layer's router VAE and calibrates τ (5-fold CV by patient, 97th percentile)."""
    feats = torch.stack([s.feature for s in samples])
    kw = dict(epochs=config.vae_epochs, lr=config.vae_lr, batch_size=config.vae_batch_size, beta=config.vae_beta)
    tau, _ = calibrate_tau(feats, [s.patient for s in samples], config.tau_folds, config.tau_percentile, config.seed, **kw)
    return train_vae(feats, seed=config.seed, **kw), tau


def split_samples(labelled: Sequence[Sample], config: TrainConfig) -> Tuple[List[Sample], List[Sample], str]:
    """Training and validation samples: by patient (``config.val_fraction`` of them), by image when only one
    patient has labels (e.g. the slices of one volume), capped at ``config.max_images`` training images.

    Returns:
        (train, validation, "patient" | "image" | "none").
    """
    tr, va = split_by_patient([s.patient for s in labelled], config.val_fraction, config.seed)
    split = "patient"
    if not va and config.val_fraction > 0 and len(labelled) >= 4:
        tr, va = split_by_patient([str(i) for i in range(len(labelled))], config.val_fraction, config.seed)
        split = "image"
    train_s, val_s = [labelled[i] for i in tr], [labelled[i] for i in va]
    if config.max_images is not None and len(train_s) > config.max_images:
        pick = np.random.default_rng(config.seed).choice(len(train_s), config.max_images, replace=False)
        train_s = [train_s[i] for i in sorted(pick)]
    return train_s, val_s, split if val_s else "none"


def click_edit_evidence(backbone: Backbone, layer: nn.Module, val_s: Sequence[Sample],
                        clicks: int = CLICK_EDIT_CLICKS) -> Dict[str, object]:
    """Whether corrective clicks' edits should stand against the layer's refinement head, on evidence.

    Every validation mask gets a click sequence (one click at its centroid, then each next one at the centre of
    the largest error) answered with the head overruling the clicks and with the clicks' edits kept
    (:func:`casam.refine.refine`); the IoUs after the last click are the gate's paired evidence
    (:func:`casam.evidence.decide`). Sets ``layer.head.click_edits`` to the decision.

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
    """Trains an institution's refinement head (:mod:`casam.refine`) on its layer's answers.

    The head learns from the layer's answer to each training mask's tight box and to one click at its centroid
    (answered as the product answers clicks), and keeps its best step by box IoU on the validation masks
    (step 0: the layer alone).

    Args:
        backbone: frozen backbone.
        layer: the institution's trained Alignment Layer (its answers are the head's input).
        train_s, val_s: training and validation samples (with :attr:`Sample.image`).
        config: ``head_steps``, ``head_lr``, ``head_crop``, ``head_batch_size`` and ``seed`` are used.
        report: filled as :func:`casam.refine.train_head` fills it.
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

    val_ex = examples(val_s, ["box"])
    if not val_ex:
        return None
    train_ex = examples(train_s, ["box", "click"])

    @torch.no_grad()
    def score(head) -> float:
        return float(np.mean([iou_metric((head(e.image, e.logits.float())[0, 0] > 0).numpy(), e.truth[0, 0].numpy() > 0)
                              for e in val_ex]))

    cfg = HeadConfig(steps=config.head_steps, batch_size=config.head_batch_size, crop=config.head_crop,
                     lr=config.head_lr, seed=config.seed)
    return train_head(train_ex, cfg, validate=score, report=report, progress=progress)


def train_layer(backbone: Backbone, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], patients: Sequence[str],
                registry: LayerRegistry, institution: str, modality: str = "", config: Optional[TrainConfig] = None,
                cache_dir: Optional[str | Path] = None, progress: bool = True, extra: Optional[dict] = None,
                samples: Optional[List[Sample]] = None) -> LayerInfo:
    """Trains a fresh Alignment Layer + router entry for one institution and appends it to the registry.

    Args:
        backbone: frozen backbone.
        images, masks, patients: the institution's annotated images (label maps) and patient ids.
        registry: where the layer is added (a new version if the institution already has one).
        institution: institution name.
        modality: free text stored with the layer.
        config: training settings (default: CA-SAM's recipe).
        cache_dir: embedding cache folder (None: memory only).
        progress: show progress bars.
        extra: more provenance to store.
        samples: already prepared samples (skips encoding; images/masks/patients are then ignored).

    Returns:
        The stored LayerInfo. Its ``extra["timing"]`` has the seconds of each stage before the layer is served:
        ``encode``, ``train`` (with the box validation after every epoch), ``calibrate`` (router VAE and τ) and
        ``validate`` (the click validation that decides whether the layer serves clicks).

    Raises:
        ValueError: no non-empty mask, or fewer than 2 images.
    """
    config = config or TrainConfig()
    t0 = time.time()
    torch.manual_seed(config.seed)
    if samples is None:
        samples = make_samples(backbone, images, masks, patients, EmbeddingCache(backbone, cache_dir), config.window,
                               progress=progress, desc=f"encode {institution}")
    t_encode = time.time() - t0
    labelled = [s for s in samples if s.targets]
    if len(labelled) < 2:
        raise ValueError(f"institution {institution!r}: need at least 2 images with a non-empty label, got {len(labelled)}")
    train_s, val_s, split = split_samples(labelled, config)
    layer = fresh_layer(backbone).cpu()
    report: Dict = {}
    t1 = time.time()
    history = fit(backbone, train_s, config, layer, progress=progress, desc=f"train {institution}", val_samples=val_s,
                  report=report)
    t2 = time.time()
    head_report: Dict = {}
    if config.head_steps > 0 and val_s:
        head = fit_head(backbone, layer, train_s, val_s, config, head_report, progress)
        if head is not None and float(head.gate) > 0:
            layer.attach_head(head)
            head_report["click_edits"] = click_edit_evidence(backbone, layer, val_s)
    t_head = time.time()
    vae, tau = fit_router(train_s, config)
    t3 = time.time()
    # the gate's evidence: paired per-mask IoUs of the institution's model (layer + head) and plain SAM
    same = layer.gate.item() == 0.0 and layer.head is None  # exactly plain SAM: nothing to decode twice
    plain_s = {p: mask_scores(backbone, None, val_s, p) for p in PROMPT_TYPES}
    layer_s = {p: plain_s[p] if same else mask_scores(backbone, layer, val_s, p) for p in PROMPT_TYPES}
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    val = {p: mean(layer_s[p]) for p in PROMPT_TYPES}
    plain = {p: mean(plain_s[p]) for p in PROMPT_TYPES}
    evidence = {p: decide(layer_s[p], plain_s[p]) for p in PROMPT_TYPES}
    t4 = time.time()
    use = {p: bool(val_s) and evidence[p]["use"] for p in PROMPT_TYPES}
    info = LayerInfo(
        name="", institution=institution, version=0, modality=modality, backbone_id=backbone.id,
        backbone_hash=backbone.hash, n_images=len(labelled), n_patients=len(set(s.patient for s in labelled)), tau=tau,
        val_iou=val.get("box"), zero_shot_val_iou=plain.get("box"),
        train_config=config.to_dict(),
        extra={"n_train": len(train_s), "n_val": len(val_s), "split": split, "loss_history": history,
               "val": {p: {"layer": val.get(p), "plain": plain.get(p)} for p in PROMPT_TYPES}, "use": use,
               "evidence": evidence,
               "head": {"steps": config.head_steps, "kept": layer.head is not None,
                        "best_step": head_report.get("best_step"), "val_history": head_report.get("val_history"),
                        "seconds": head_report.get("seconds"), "click_edits": head_report.get("click_edits")},
               "best_epoch": report.get("best_epoch"),
               "val_history": [{k: round(v, 4) for k, v in d.items()} for d in report.get("val_history", [])],
               "gate": round(layer.gate.item(), 4),
               "seconds": round(time.time() - t0, 1),
               "timing": {"encode": round(t_encode, 1), "train": round(t2 - t1, 1), "head": round(t_head - t2, 1),
                          "calibrate": round(t3 - t_head, 1), "validate": round(t4 - t3, 1)},
               **(extra or {})},
    )
    return registry.add(layer.cpu(), vae, info)
