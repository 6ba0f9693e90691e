"""One institution's layer end to end: split, fit, refinement head, router entry, the gate's evidence, stored.

:func:`train_layer` is what ``casam add-layer``, the app's online training, a federated site and the benchmark call.
An institution with more than :data:`casam.training.config.CV_MAX_IMAGES` labelled images holds out a share of its
patients to validate the layer it serves; one with fewer validates every label by cross-validation over patients
(:func:`cv_folds`) and serves a layer trained on all of them (the rule: :mod:`casam.registry.evidence`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from casam.model.alignment import AlignmentLayer, fresh_layer
from casam.model.backbone import Backbone
from casam.model.router import FeatureVAE, calibrate_tau, train_vae
from casam.prompts.masks import PROMPT_TYPES
from casam.registry.evidence import GATE_MIN_GAIN, decide, decide_pooled, pool_decisions
from casam.registry.store import LayerInfo, LayerRegistry
from casam.scoring.samples import EmbeddingCache, Sample, make_samples
from casam.scoring.score import mask_scores
from casam.training.config import CLICK_EDIT_CLICKS, CLICK_EVIDENCE_STEPS, CV_FOLDS, CV_MAX_IMAGES, TrainConfig
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


def uses_cv(n_images: int, config: TrainConfig) -> bool:
    """Whether a layer trained on ``n_images`` labelled images is validated by cross-validation: when validation is
    wanted (``config.val_fraction`` > 0) and there are at most :data:`casam.training.config.CV_MAX_IMAGES` images,
    too few for a hold-out to leave the gate the evidence it needs."""
    return config.val_fraction > 0 and n_images <= CV_MAX_IMAGES


def _cap(indices: List[int], config: TrainConfig) -> List[int]:
    """At most ``config.max_images`` of the indices (a seeded choice, kept in order)."""
    if config.max_images is not None and len(indices) > config.max_images:
        pick = np.random.default_rng(config.seed).choice(len(indices), config.max_images, replace=False)
        indices = [indices[i] for i in sorted(pick)]
    return indices


def plan_split(patients: Sequence[str], config: TrainConfig) -> Tuple[List[int], List[int], str]:
    """Training and validation indices of labelled images: by patient (``config.val_fraction`` of them), by image
    when only one patient has labels (e.g. the slices of one volume), capped at ``config.max_images`` training
    images. Decided before any image is encoded, so that only the images used are.

    With few images (:func:`uses_cv`) nothing is held out: the layer served trains on every image (capped) and every
    image is validated by cross-validation instead (:func:`cv_folds`, in :func:`train_layer`).

    Args:
        patients: the patient id of each labelled image.
        config: ``val_fraction``, ``max_images`` and ``seed`` are used.

    Returns:
        (training indices, validation indices, "patient" | "image" | "none" | "cv"); "cv" with no validation index.
    """
    if uses_cv(len(patients), config):
        return _cap(list(range(len(patients))), config), [], "cv"
    tr, va = split_by_patient(patients, config.val_fraction, config.seed)
    split = "patient"
    if not va and config.val_fraction > 0 and len(patients) >= 4:
        tr, va = split_by_patient([str(i) for i in range(len(patients))], config.val_fraction, config.seed)
        split = "image"
    return _cap(tr, config), va, split if va else "none"


def split_samples(labelled: Sequence[Sample], config: TrainConfig) -> Tuple[List[Sample], List[Sample], str]:
    """:func:`plan_split` of samples with at least one target: the images the served layer trains on.

    Returns:
        (train, validation, "patient" | "image" | "none" | "cv").
    """
    tr, va, split = plan_split([s.patient for s in labelled], config)
    return [labelled[i] for i in tr], [labelled[i] for i in va], split


def cv_folds(patients: Sequence[str], k: int, seed: int) -> Tuple[List[List[int]], str]:
    """The held-out images of each fold of a cross-validation over patients: no patient in two folds.

    Patients are shuffled (seeded), then taken largest first (stably) into the fold with the fewest images so far,
    so that the folds hold about as many images each. With fewer patients than folds (e.g. the slices of one
    volume) the images are the units instead.

    Args:
        patients: the patient id of each labelled image.
        k: folds wanted (fewer when there are fewer units).
        seed: seed of the shuffle.

    Returns:
        (per fold, the indices of its held-out images in order; "patient" | "image"). Every index is in exactly one
        fold; a fold's model trains on the indices of the other folds.

    Raises:
        ValueError: fewer than 2 images or folds.
    """
    if len(patients) < 2 or k < 2:
        raise ValueError(f"cross-validation needs at least 2 images and 2 folds, got {len(patients)} and {k}")
    unit = "patient" if len(set(patients)) >= k else "image"
    keys = list(patients) if unit == "patient" else [str(i) for i in range(len(patients))]
    uniq = sorted(set(keys))
    np.random.default_rng(seed).shuffle(uniq)
    size = {u: 0 for u in uniq}
    for key in keys:
        size[key] += 1
    k = min(k, len(uniq))
    members: List[List[str]] = [[] for _ in range(k)]
    counts = [0] * k
    for u in sorted(uniq, key=lambda u: -size[u]):
        f = int(np.argmin(counts))
        members[f].append(u)
        counts[f] += size[u]
    fold_of = {u: f for f, us in enumerate(members) for u in us}
    return [[i for i, key in enumerate(keys) if fold_of[key] == f] for f in range(k)], unit


@dataclass
class FittedModel:
    """An institution's model from :func:`fit_model`: the layer (with its head, if kept) and the fit's records.

    Attributes:
        layer: the Alignment Layer (on the backbone's device, in eval mode).
        history: mean loss per epoch.
        report: :func:`casam.training.fit.fit`'s report (``best_epoch``, ``val_history``).
        head_report: :func:`casam.training.head.fit_head`'s report (``best_step``, ``val_history``, ``seconds``;
            ``click_edits`` when decided on held-out images).
        seconds: ``train`` (the layer) and ``head``.
    """

    layer: AlignmentLayer
    history: List[float]
    report: Dict = field(default_factory=dict)
    head_report: Dict = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def plain(self) -> bool:
        """Whether the model is exactly plain SAM (gate 0, no head): nothing to decode twice."""
        return self.layer.gate.item() == 0.0 and self.layer.head is None


def fit_model(backbone: Backbone, train_s: Sequence[Sample], select_s: Optional[Sequence[Sample]],
              config: TrainConfig, progress: bool = True, desc: str = "train") -> FittedModel:
    """Fits a fresh Alignment Layer and then its refinement head on ``train_s``: one recipe for the layer served
    and for the fold models that validate it (:func:`train_layer`).

    With held-out images (``select_s``, the hold-out recipe) the layer keeps its best epoch by their box IoU (epoch
    0 is plain SAM; :func:`casam.training.fit.fit`), the head its best step (step 0 is the layer alone;
    :func:`casam.training.head.fit_head`), and a head that does not read clicks is told on them whether corrective
    clicks' edits stand (:func:`casam.training.head.click_edit_evidence`); an empty ``select_s`` trains no head.
    With ``select_s`` None (the cross-validation recipe) nothing is held out: the layer trains its
    ``config.epochs`` epochs and keeps the last, and the head chooses its step (and whether it beats the layer
    alone at all) on its own training images, the only ones it may look at without its model's evidence seeing
    them; click edits are then decided by the caller, on images the model did not see.

    The caller seeds torch (the layer's initialisation); the fit itself draws from ``config.seed``.

    Args:
        backbone: frozen backbone.
        train_s: training samples (with targets).
        select_s: held-out samples that choose the best epoch and step, or None (see above).
        config: training settings (``head_steps`` 0: no head).
        progress: show progress bars.
        desc: progress bar title.

    Returns:
        The fitted model.
    """
    layer = fresh_layer(backbone).cpu()
    report: Dict = {}
    t1 = time.time()
    history = fit(backbone, train_s, config, layer, progress=progress, desc=desc, val_samples=select_s,
                  report=report)
    t2 = time.time()
    head_report: Dict = {}
    if config.head_steps > 0 and (select_s is None or select_s):
        head = fit_head(backbone, layer, train_s, train_s if select_s is None else select_s, config, head_report,
                        progress)
        if head is not None and float(head.gate) > 0:
            layer.attach_head(head)
            if not head.clicks and select_s is not None:
                head_report["click_edits"] = click_edit_evidence(backbone, layer, select_s)
    return FittedModel(layer, history, report, head_report, {"train": t2 - t1, "head": time.time() - t2})


def _mean(v: Sequence[float]) -> Optional[float]:
    return float(np.mean(v)) if len(v) else None


def _pool_clicks(parts: Sequence[Dict], reads: bool) -> Dict[str, object]:
    """:func:`casam.training.head.click_evidence`'s record for the layer served, from the records of the fold
    models on their held-out images.

    ``reads_clicks``: the gate's rule on the folds' paired sequence AUCs pooled
    (:func:`casam.registry.evidence.pool_decisions`; None when the served head does not read clicks, as
    click_evidence has none then). ``corrections``: the mask-weighted mean gain over the fresh install after each
    corrective click, each fold's sequences answered as its own ``reads_clicks`` decided; used when no step loses
    more than :data:`casam.registry.evidence.GATE_MIN_GAIN`, as click_evidence decides.

    Args:
        parts: each fold's click_evidence record (all with the same ``steps``).
        reads: the served layer's head reads clicks.

    Returns:
        ``reads_clicks``, ``corrections`` (``use``, ``gain_per_step``, ``n``), ``steps`` and ``folds`` (the parts).
    """
    steps = int(parts[0]["steps"]) if parts else CLICK_EVIDENCE_STEPS
    pooled_reads = pool_decisions([p["reads_clicks"] for p in parts]) if reads else None
    corr = [p["corrections"] for p in parts if p["corrections"]["n"]]
    n = sum(int(c["n"]) for c in corr)
    gains = [round(sum(c["n"] * c["gain_per_step"][k] for c in corr) / n, 5) if n else None
             for k in range(steps - 1)]
    use = n > 0 and all(g is not None and g >= -GATE_MIN_GAIN for g in gains)
    return {"reads_clicks": pooled_reads, "corrections": {"use": bool(use), "gain_per_step": gains, "n": n},
            "steps": steps, "folds": list(parts)}


def _cross_validate(backbone: Backbone, labelled: Sequence[Sample], n_served: int, config: TrainConfig,
                    progress: bool, institution: str) -> Dict:
    """Every labelled image scored by a model that did not see it: :data:`casam.training.config.CV_FOLDS` fold
    models (:func:`cv_folds`), each fitted with the cross-validation recipe (:func:`fit_model`, nothing held out)
    on the other folds' images (capped at ``config.max_images``); it and plain SAM then answer its held-out masks
    with every prompt type.

    The fold models together cost about one training on all images: the layer's epochs cost in proportion to the
    images, and each fold's head trains ``config.head_steps`` × its share of the served layer's ``n_served``
    training images steps (the same passes over each image as the served head, whose steps do not grow with the
    images). A head that does not read clicks is told on the held-out images whether corrective clicks' edits
    stand (:func:`casam.training.head.click_edit_evidence`).

    Returns:
        ``parts`` (per prompt type, per fold (layer IoUs, plain SAM IoUs) of its held-out masks), ``models`` and
        ``held_out`` (per fold), ``unit`` (:func:`cv_folds`), ``folds`` (per fold records: images, head, mean
        IoUs, click edits, seconds) and ``seconds`` (``train``: fitting, ``validate``: scoring).
    """
    folds, unit = cv_folds([s.patient for s in labelled], CV_FOLDS, config.seed)
    out: Dict = {"parts": {p: [] for p in PROMPT_TYPES}, "models": [], "held_out": [], "unit": unit, "folds": [],
                 "seconds": {"train": 0.0, "validate": 0.0}}
    for f, held in enumerate(folds):
        inside = set(held)
        val_f = [labelled[i] for i in held]
        train_f = [labelled[i] for i in _cap([i for i in range(len(labelled)) if i not in inside], config)]
        steps = max(1, int(round(config.head_steps * len(train_f) / max(n_served, 1)))) if config.head_steps > 0 else 0
        torch.manual_seed(config.seed)
        t0 = time.time()
        model = fit_model(backbone, train_f, None, replace(config, head_steps=steps), progress,
                          f"train {institution} fold {f + 1}/{len(folds)}")
        head = model.layer.head
        edits = click_edit_evidence(backbone, model.layer, val_f) if head is not None and not head.clicks else None
        t1 = time.time()
        plain_f = {p: mask_scores(backbone, None, val_f, p) for p in PROMPT_TYPES}
        layer_f = {p: plain_f[p] if model.plain else mask_scores(backbone, model.layer, val_f, p)
                   for p in PROMPT_TYPES}
        t2 = time.time()
        for p in PROMPT_TYPES:
            out["parts"][p].append((layer_f[p], plain_f[p]))
        out["models"].append(model)
        out["held_out"].append(val_f)
        out["seconds"]["train"] += t1 - t0
        out["seconds"]["validate"] += t2 - t1
        out["folds"].append({
            "n_train": len(train_f), "n_val": len(val_f), "patients": len({s.patient for s in val_f}),
            "masks": len(plain_f["box"]), "gate": round(model.layer.gate.item(), 4),
            "head": {"steps": steps, "kept": head is not None, "best_step": model.head_report.get("best_step")},
            "click_edits": edits,
            "val": {p: {"layer": _mean(layer_f[p]), "plain": _mean(plain_f[p])} for p in PROMPT_TYPES},
            "seconds": {"train": round(model.seconds["train"], 1), "head": round(t1 - t0 - model.seconds["train"], 1),
                        "validate": round(t2 - t1, 1)}})
    return out


def _need_two(institution: str, n: int) -> None:
    if n < 2:
        raise ValueError(f"institution {institution!r}: need at least 2 images with a non-empty label, got {n}")


def train_layer(backbone: Backbone, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                patients: Sequence[str], registry: LayerRegistry, institution: str, modality: str = "",
                config: Optional[TrainConfig] = None,
                cache_dir: Optional[str | Path] = None, progress: bool = True, extra: Optional[dict] = None,
                samples: Optional[List[Sample]] = None) -> LayerInfo:
    """Trains a fresh Alignment Layer + router entry for one institution and appends it to the registry.

    The gate's evidence (:mod:`casam.registry.evidence`) comes from one of two paths:

    * **Hold-out** (more than :data:`casam.training.config.CV_MAX_IMAGES` labelled images, :func:`plan_split`): the
      layer is fitted with best-epoch selection on box validation of the held-out patients
      (:func:`casam.training.fit.fit`), gets a refinement head when one beats it
      (:func:`casam.training.head.fit_head`); then the layer and plain SAM answer every validation mask with each
      prompt type, and the gate's rule (:func:`casam.registry.evidence.decide`) on those paired IoUs decides which
      prompt types the layer may serve.
    * **Cross-validation** (fewer images, where a hold-out would leave the gate one or two masks): every labelled
      image is validated by one of :data:`casam.training.config.CV_FOLDS` fold models that did not see it, split by
      patient (:func:`cv_folds`) and trained with the same recipe as the layer served (:func:`fit_model`: the
      layer's ``config.epochs`` epochs, the head's step chosen on its own training images, as no held-out image may
      choose it without leaking into its own evidence); the rule decides on the paired IoUs of all folds pooled
      (:func:`casam.registry.evidence.decide_pooled`). The layer served is then trained with that recipe on every
      labelled image. Two folds cost about one more training (each fold model on about half the images, its head
      on a proportional share of the steps), which keeps labels-to-served-layer short on a CPU; the fold models,
      trained on half the labels, make the evidence conservative for the layer served.

    Either way the router VAE and τ are fitted on the layer's training images (:func:`fit_router`), and a layer
    that serves a prompt type decides on click sequences of images it (or its fold model) did not see whether its
    head answers the clicks and whether it answers corrective clicks at all (``extra["use"]["corrections"]``,
    ``extra["clicks"]``; :func:`casam.training.head.click_evidence`, its fold records pooled in the
    cross-validation).

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
        The stored LayerInfo. Its ``extra`` has the gate's decision (``use``) and evidence (``evidence``, ``val``:
        mean IoUs of the validated masks), ``evidence_source`` ("holdout" | "cv"), ``n_train`` (the served layer's
        training images) and ``n_val`` (images validated: every labelled one with cross-validation), ``split``
        (how images were held out, or the folds' units: "patient" | "image" | "none"), the head's and fit's
        records; with cross-validation also ``folds`` (how many) and ``cv`` (per fold: images, head, mean IoUs,
        seconds), its ``best_epoch`` is the last (``config.epochs``), ``val_history`` is empty and the head's
        ``val_history`` is on its own training images. ``extra["timing"]`` has the seconds of each stage before the
        layer is served: ``encode``, ``train`` (with the box validation after every epoch), ``head``, ``calibrate``
        (router VAE and τ), ``validate`` (the validation that decides which prompt types the layer serves) and
        ``clicks`` (the click sequences that decide how corrective clicks are answered,
        :func:`casam.training.head.click_evidence`); with cross-validation also ``cv_train`` (fitting the fold
        models).

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
        keep = has if split == "cv" else [has[i] for i in tr + va]  # cross-validation validates every image
        made = make_samples(backbone, [images[i] for i in keep], [masks[i] for i in keep],
                            [patients[i] for i in keep], EmbeddingCache(backbone, cache_dir), config.window,
                            progress=progress, desc=f"encode {institution}")
        if split == "cv":
            labelled = [s for s in made if s.targets]
            _need_two(institution, len(labelled))
            train_s, val_s, split = split_samples(labelled, config)
        else:
            train_s, val_s = [s for s in made[:len(tr)] if s.targets], [s for s in made[len(tr):] if s.targets]
            labelled = train_s + val_s
            _need_two(institution, len(labelled))
    else:
        labelled = [s for s in samples if s.targets]
        _need_two(institution, len(labelled))
        train_s, val_s, split = split_samples(labelled, config)
    t_encode = time.time() - t0
    if split == "cv":
        return _train_cv(backbone, labelled, train_s, registry, institution, modality, config, progress, extra,
                         t0, t_encode)
    t1 = time.time()
    model = fit_model(backbone, train_s, val_s, config, progress, f"train {institution}")
    layer, report, head_report = model.layer, model.report, model.head_report
    t2 = t1 + model.seconds["train"]
    t_head = time.time()
    vae, tau = fit_router(train_s, config)
    t3 = time.time()
    # the gate's evidence: paired per-mask IoUs of the institution's model (layer + head) and plain SAM
    same = model.plain  # exactly plain SAM: nothing to decode twice
    plain_s = {p: mask_scores(backbone, None, val_s, p) for p in PROMPT_TYPES}
    layer_s = {p: plain_s[p] if same else mask_scores(backbone, layer, val_s, p) for p in PROMPT_TYPES}
    val = {p: _mean(layer_s[p]) for p in PROMPT_TYPES}
    plain = {p: _mean(plain_s[p]) for p in PROMPT_TYPES}
    evidence = {p: decide(layer_s[p], plain_s[p]) for p in PROMPT_TYPES}
    t4 = time.time()
    use = {p: bool(val_s) and evidence[p]["use"] for p in PROMPT_TYPES}
    # how corrective clicks are answered after the layer's first answer (the head reading them; or plain SAM)
    clicks = click_evidence(backbone, layer, val_s) if any(use.values()) and not same else None
    use["corrections"] = bool(clicks and clicks["corrections"]["use"])
    t5 = time.time()
    return _store(backbone, registry, layer, vae, tau, institution, modality, labelled, config, val, plain, {
        "n_train": len(train_s), "n_val": len(val_s), "split": split, "evidence_source": "holdout",
        "loss_history": model.history, "use": use, "evidence": evidence,
        "head": _head_record(layer, head_report, config), "clicks": clicks, "best_epoch": report.get("best_epoch"),
        "val_history": [{k: round(v, 4) for k, v in d.items()} for d in report.get("val_history", [])],
        "seconds": round(time.time() - t0, 1),
        "timing": {"encode": round(t_encode, 1), "train": round(t2 - t1, 1), "head": round(t_head - t2, 1),
                   "calibrate": round(t3 - t_head, 1), "validate": round(t4 - t3, 1), "clicks": round(t5 - t4, 1)}},
        extra)


def _store(backbone: Backbone, registry: LayerRegistry, layer: AlignmentLayer, vae: FeatureVAE, tau: float,
           institution: str, modality: str, labelled: Sequence[Sample], config: TrainConfig,
           val: Dict[str, Optional[float]], plain: Dict[str, Optional[float]], record: Dict,
           extra: Optional[dict]) -> LayerInfo:
    """Appends a trained layer to the registry with its LayerInfo: what both evidence paths record alike (the
    validated mean IoUs per prompt type, the gate's state), then the path's ``record``, then the caller's
    ``extra``."""
    info = LayerInfo(
        name="", institution=institution, version=0, modality=modality, backbone_id=backbone.id,
        backbone_hash=backbone.hash, n_images=len(labelled), n_patients=len(set(s.patient for s in labelled)),
        tau=tau, val_iou=val.get("box"), zero_shot_val_iou=plain.get("box"), train_config=config.to_dict(),
        extra={"val": {p: {"layer": val.get(p), "plain": plain.get(p)} for p in PROMPT_TYPES},
               "gate": round(layer.gate.item(), 4), **record, **(extra or {})},
    )
    return registry.add(layer.cpu(), vae, info)


def _head_record(layer: AlignmentLayer, head_report: Dict, config: TrainConfig) -> Dict[str, object]:
    """``extra["head"]``: the served layer's head settings, whether it was kept, and its fit's records."""
    return {"steps": config.head_steps, "kept": layer.head is not None,
            "best_step": head_report.get("best_step"), "val_history": head_report.get("val_history"),
            "seconds": head_report.get("seconds"), "click_edits": head_report.get("click_edits"),
            "clicks": layer.head.clicks if layer.head is not None else None}


def _train_cv(backbone: Backbone, labelled: List[Sample], train_s: List[Sample], registry: LayerRegistry,
              institution: str, modality: str, config: TrainConfig, progress: bool, extra: Optional[dict],
              t0: float, t_encode: float) -> LayerInfo:
    """:func:`train_layer`'s cross-validation path: the evidence of the fold models (:func:`_cross_validate`),
    then the layer served trained on ``train_s`` (every labelled image, capped) with the same recipe, its head's
    click decisions taken from the folds' evidence, its router entry, stored.

    Returns:
        The stored LayerInfo (see :func:`train_layer`).
    """
    cv = _cross_validate(backbone, labelled, len(train_s), config, progress, institution)
    evidence = {p: decide_pooled(cv["parts"][p]) for p in PROMPT_TYPES}
    val = {p: _mean([x for layer, _ in cv["parts"][p] for x in layer]) for p in PROMPT_TYPES}
    plain = {p: _mean([x for _, pl in cv["parts"][p] for x in pl]) for p in PROMPT_TYPES}
    t1 = time.time()
    torch.manual_seed(config.seed)
    model = fit_model(backbone, train_s, None, config, progress, f"train {institution}")
    layer, head_report = model.layer, model.head_report
    head = layer.head
    if head is not None and not head.clicks:  # corrective clicks' edits, as the folds' held-out images decided
        edits = pool_decisions([f["click_edits"] for f in cv["folds"]])
        head.click_edits.fill_(1.0 if edits["use"] else 0.0)
        head_report["click_edits"] = {**edits, "clicks": CLICK_EDIT_CLICKS}
    t_head = time.time()
    vae, tau = fit_router(train_s, config)
    t3 = time.time()
    use = {p: evidence[p]["use"] and not model.plain for p in PROMPT_TYPES}
    clicks = None
    if any(use.values()) and not model.plain:  # click sequences of every image, each answered by its fold model
        parts = []
        for f, (fold_model, held) in enumerate(zip(cv["models"], cv["held_out"])):
            tc = time.time()
            parts.append(click_evidence(backbone, fold_model.layer, held))
            cv["folds"][f]["seconds"]["clicks"] = round(time.time() - tc, 1)
        clicks = _pool_clicks(parts, reads=head is not None and head.clicks)
        if clicks["reads_clicks"] is not None:
            head.reads_clicks.fill_(1.0 if clicks["reads_clicks"]["use"] else 0.0)
    use["corrections"] = bool(clicks and clicks["corrections"]["use"])
    t5 = time.time()
    return _store(backbone, registry, layer, vae, tau, institution, modality, labelled, config, val, plain, {
        "n_train": len(train_s), "n_val": len(labelled), "split": cv["unit"], "evidence_source": "cv",
        "folds": len(cv["folds"]), "cv": cv["folds"], "loss_history": model.history, "use": use, "evidence": evidence,
        "head": _head_record(layer, head_report, config), "clicks": clicks, "best_epoch": config.epochs,
        "val_history": [], "seconds": round(time.time() - t0, 1),
        "timing": {"encode": round(t_encode, 1), "cv_train": round(cv["seconds"]["train"], 1),
                   "validate": round(cv["seconds"]["validate"], 1), "train": round(model.seconds["train"], 1),
                   "head": round(t_head - t1 - model.seconds["train"], 1), "calibrate": round(t3 - t_head, 1),
                   "clicks": round(t5 - t3, 1)}},
        extra)
