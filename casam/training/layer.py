"""One institution's layer end to end: split, fit, refinement head, router entry, the gate's evidence, stored.

:func:`train_layer` is what ``casam add-layer``, the app's online training, a federated site and the benchmark call.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from casam.model.alignment import fresh_layer
from casam.model.backbone import Backbone
from casam.model.router import FeatureVAE, calibrate_tau, train_vae
from casam.prompts.masks import PROMPT_TYPES
from casam.registry.evidence import decide
from casam.registry.store import LayerInfo, LayerRegistry
from casam.scoring.samples import EmbeddingCache, Sample, make_samples
from casam.scoring.score import mask_scores
from casam.training.config import TrainConfig
from casam.training.fit import fit
from casam.training.head import click_edit_evidence, click_evidence, fit_head


def split_by_patient(patients: Sequence[str], val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Splits indices into (train, validation) so that no patient is in both.

    Args:
        patients: the patient id of each image.
        val_fraction: share of the patients held out.
        seed: seed of the shuffle.

    Returns:
        (training indices, validation indices). At least one patient stays in training; validation is empty with a
        single patient or fraction 0.
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
    """Trains a layer's router VAE and calibrates its threshold τ (cross-validated by patient).

    Args:
        samples: the layer's training samples (their features).
        config: ``vae_*``, ``tau_folds``, ``tau_percentile`` and ``seed`` are used.

    Returns:
        (the VAE trained on every sample, τ).
    """
    feats = torch.stack([s.feature for s in samples])
    kw = dict(epochs=config.vae_epochs, lr=config.vae_lr, batch_size=config.vae_batch_size, beta=config.vae_beta)
    tau, _ = calibrate_tau(feats, [s.patient for s in samples], config.tau_folds, config.tau_percentile, config.seed,
                           **kw)
    return train_vae(feats, seed=config.seed, **kw), tau


def plan_split(patients: Sequence[str], config: TrainConfig) -> Tuple[List[int], List[int], str]:
    """Training and validation indices of labelled images: by patient (``config.val_fraction`` of them), by image
    when only one patient has labels (e.g. the slices of one volume), capped at ``config.max_images`` training
    images. Decided before any image is encoded, so that only the images used are.

    Args:
        patients: the patient id of each labelled image.
        config: ``val_fraction``, ``max_images`` and ``seed`` are used.

    Returns:
        (training indices, validation indices, "patient" | "image" | "none").
    """
    tr, va = split_by_patient(patients, config.val_fraction, config.seed)
    split = "patient"
    if not va and config.val_fraction > 0 and len(patients) >= 4:
        tr, va = split_by_patient([str(i) for i in range(len(patients))], config.val_fraction, config.seed)
        split = "image"
    if config.max_images is not None and len(tr) > config.max_images:
        pick = np.random.default_rng(config.seed).choice(len(tr), config.max_images, replace=False)
        tr = [tr[i] for i in sorted(pick)]
    return tr, va, split if va else "none"


def split_samples(labelled: Sequence[Sample], config: TrainConfig) -> Tuple[List[Sample], List[Sample], str]:
    """:func:`plan_split` of samples with at least one target.

    Returns:
        (train, validation, "patient" | "image" | "none").
    """
    tr, va, split = plan_split([s.patient for s in labelled], config)
    return [labelled[i] for i in tr], [labelled[i] for i in va], split


def _need_two(institution: str, n: int) -> None:
    if n < 2:
        raise ValueError(f"institution {institution!r}: need at least 2 images with a non-empty label, got {n}")


def train_layer(backbone: Backbone, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                patients: Sequence[str], registry: LayerRegistry, institution: str, modality: str = "",
                config: Optional[TrainConfig] = None,
                cache_dir: Optional[str | Path] = None, progress: bool = True, extra: Optional[dict] = None,
                samples: Optional[List[Sample]] = None) -> LayerInfo:
    """Trains a fresh Alignment Layer + router entry for one institution and appends it to the registry.

    The layer is fitted with best-epoch selection on box validation (:func:`casam.training.fit.fit`), gets a
    refinement head when one beats it (:func:`casam.training.head.fit_head`), and its router VAE and τ
    (:func:`fit_router`). Then the layer and plain SAM answer every validation mask with each prompt type, and
    the gate's rule (:func:`casam.registry.evidence.decide`) on those paired IoUs decides which prompt types the
    layer may serve (``extra["use"]``, ``extra["evidence"]``). A layer that serves one decides on validation click
    sequences whether its head answers the clicks and whether it answers corrective clicks at all
    (``extra["use"]["corrections"]``, ``extra["clicks"]``; :func:`casam.training.head.click_evidence`).

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
        ``validate`` (the click validation that decides whether the layer serves clicks) and ``clicks`` (the click
        sequences that decide how corrective clicks are answered, :func:`casam.training.head.click_evidence`).

    Raises:
        ValueError: no non-empty mask, or fewer than 2 images.
    """
    config = config or TrainConfig()
    t0 = time.time()
    torch.manual_seed(config.seed)
    if samples is None:  # split first, then encode only the images the split uses (a capped training set)
        has = [i for i, m in enumerate(masks) if np.any(np.asarray(m) > 0)]
        _need_two(institution, len(has))
        tr, va, split = plan_split([patients[i] for i in has], config)
        keep = [has[i] for i in tr + va]
        made = make_samples(backbone, [images[i] for i in keep], [masks[i] for i in keep],
                            [patients[i] for i in keep], EmbeddingCache(backbone, cache_dir), config.window,
                            progress=progress, desc=f"encode {institution}")
        train_s, val_s = [s for s in made[:len(tr)] if s.targets], [s for s in made[len(tr):] if s.targets]
        labelled = train_s + val_s
        _need_two(institution, len(labelled))
    else:
        labelled = [s for s in samples if s.targets]
        _need_two(institution, len(labelled))
        train_s, val_s, split = split_samples(labelled, config)
    t_encode = time.time() - t0
    layer = fresh_layer(backbone).cpu()
    report: Dict = {}
    t1 = time.time()
    history = fit(backbone, train_s, config, layer, progress=progress, desc=f"train {institution}",
                  val_samples=val_s, report=report)
    t2 = time.time()
    head_report: Dict = {}
    if config.head_steps > 0 and val_s:
        head = fit_head(backbone, layer, train_s, val_s, config, head_report, progress)
        if head is not None and float(head.gate) > 0:
            layer.attach_head(head)
            if not head.clicks:
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
    # how corrective clicks are answered after the layer's first answer (the head reading them; or plain SAM)
    clicks = click_evidence(backbone, layer, val_s) if any(use.values()) and not same else None
    use["corrections"] = bool(clicks and clicks["corrections"]["use"])
    t5 = time.time()
    info = LayerInfo(
        name="", institution=institution, version=0, modality=modality, backbone_id=backbone.id,
        backbone_hash=backbone.hash, n_images=len(labelled), n_patients=len(set(s.patient for s in labelled)),
        tau=tau,
        val_iou=val.get("box"), zero_shot_val_iou=plain.get("box"),
        train_config=config.to_dict(),
        extra={"n_train": len(train_s), "n_val": len(val_s), "split": split, "loss_history": history,
               "val": {p: {"layer": val.get(p), "plain": plain.get(p)} for p in PROMPT_TYPES}, "use": use,
               "evidence": evidence,
               "head": {"steps": config.head_steps, "kept": layer.head is not None,
                        "best_step": head_report.get("best_step"), "val_history": head_report.get("val_history"),
                        "seconds": head_report.get("seconds"), "click_edits": head_report.get("click_edits"),
                        "clicks": layer.head.clicks if layer.head is not None else None},
               "clicks": clicks,
               "best_epoch": report.get("best_epoch"),
               "val_history": [{k: round(v, 4) for k, v in d.items()} for d in report.get("val_history", [])],
               "gate": round(layer.gate.item(), 4),
               "seconds": round(time.time() - t0, 1),
               "timing": {"encode": round(t_encode, 1), "train": round(t2 - t1, 1), "head": round(t_head - t2, 1),
                          "calibrate": round(t3 - t_head, 1), "validate": round(t4 - t3, 1),
                          "clicks": round(t5 - t4, 1)},
               **(extra or {})},
    )
    return registry.add(layer.cpu(), vae, info)
