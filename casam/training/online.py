"""Online continual training: from saved labels, grouped by institution, to new Alignment Layers."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from casam.data.clinical import read_clinical, read_label
from casam.data.safety import ImageLimits
from casam.errors import CasamError
from casam.model.backbone import Backbone
from casam.registry.store import LayerInfo, LayerRegistry
from casam.training.config import TrainConfig
from casam.training.layer import train_layer

log = logging.getLogger(__name__)


@dataclass
class LabelledItem:
    """One saved label.

    Attributes:
        image_id: the image's id in its datastore.
        image_path: image file or DICOM folder.
        label_path: label file.
        institution: who acquired the image.
        patient: patient id (validation is split by patient); the image id when unknown.
    """

    image_id: str
    image_path: str
    label_path: str
    institution: str
    patient: str


@dataclass
class Plan:
    """What :func:`plan` decided for one institution.

    Attributes:
        institution: the institution.
        items: its labelled images.
        train: whether a layer is trained now.
        reason: why (or why not), in words.
        new_items: labelled images that no layer of this institution has seen.
    """

    institution: str
    items: List[LabelledItem]
    train: bool
    reason: str
    new_items: List[LabelledItem] = field(default_factory=list)


def plan(items: Sequence[LabelledItem], registry: LayerRegistry, min_images: int = 5,
         retrain_after: Optional[int] = None, only: Optional[Sequence[str]] = None) -> List[Plan]:
    """Decides which institutions get a new layer.

    Args:
        items: every saved label.
        registry: the layer registry (read only).
        min_images: labelled images an institution needs for its first layer.
        retrain_after: labelled images, unseen by an institution's newest layer, that trigger a new version
            (None or 0: never retrain).
        only: restrict to these institutions.

    Returns:
        One Plan per institution, in order of first appearance.
    """
    groups: "OrderedDict[str, List[LabelledItem]]" = OrderedDict()
    for it in items:
        groups.setdefault(it.institution, []).append(it)
    latest: Dict[str, LayerInfo] = {i.institution: i for i in registry.active()}
    plans = []
    for inst, its in groups.items():
        if only and inst not in only:
            continue
        cur = latest.get(inst)
        seen = set(cur.extra.get("image_ids", [])) if cur is not None else set()
        new = [it for it in its if it.image_id not in seen]
        if cur is None:
            ok = len(its) >= min_images
            why = (f"{len(its)} labelled images, no layer yet" if ok
                   else f"{len(its)} labelled images, {min_images} needed for a first layer")
        elif retrain_after and len(new) >= retrain_after:
            ok, why = True, f"{len(new)} images labelled since {cur.name} (retrain after {retrain_after})"
        else:
            ok = False
            why = (f"has {cur.name}; {len(new)} new labelled images"
                   + (f" (retrain after {retrain_after})" if retrain_after else ""))
        plans.append(Plan(inst, its, ok, why, new))
    return plans


def label_slices(label: np.ndarray, max_slices: int) -> List[int]:
    """Slices of a D×H×W label that hold a label, at most ``max_slices`` of them, evenly spread."""
    idx = [int(k) for k in np.nonzero(label.reshape(label.shape[0], -1).any(1))[0]]
    if len(idx) <= max_slices:
        return idx
    pick = np.linspace(0, len(idx) - 1, max_slices).round().astype(int)
    return [idx[i] for i in sorted(set(pick.tolist()))]


def load_items(items: Sequence[LabelledItem], max_slices_per_volume: int = 8, limits: Optional[ImageLimits] = None):
    """Reads labelled images as 2D training pictures.

    Volumes contribute their labelled slices (at most ``max_slices_per_volume``, the patient kept). Unreadable
    images, labels that do not fit their image (:func:`casam.data.clinical.read_label`) and empty labels are skipped
    and reported, never trained on.

    Returns:
        (images, masks, patients, image_ids used, skipped: list of {"image", "reason"}).
    """
    images, masks, patients, used, skipped = [], [], [], [], []
    for it in items:
        try:
            img = read_clinical(it.image_path, name=it.image_id, limits=limits)
            lab = read_label(it.label_path, img, name=f"of image {it.image_id}", limits=limits)
        except CasamError as e:
            skipped.append({"image": it.image_id, "reason": str(e)})
            continue
        if not lab.any():
            skipped.append({"image": it.image_id, "reason": "empty label"})
            continue
        if img.is_volume:
            for k in label_slices(lab, max_slices_per_volume):
                images.append(img.array[k])
                masks.append(lab[k])
                patients.append(it.patient)
        else:
            images.append(img.array)
            masks.append(lab)
            patients.append(it.patient)
        used.append(it.image_id)
    return images, masks, patients, used, skipped


class TrainingStopped(CasamError, RuntimeError):
    """A training was stopped before its layer was stored (its wall-time limit passed, or it was asked to stop)."""


class TrainingMonitor:
    """Follows an online training through the backbone calls it makes, and stops it at a deadline.

    :func:`casam.training.layer.train_layer` encodes each image once (``backbone.encode``), decodes with gradients
    while it trains an epoch and without while it validates (boxes before training and after every epoch,
    clicks once at the end). The backbone :meth:`wrap` returns therefore tells the stage (``encode``,
    ``train``, ``validate``) and the epoch, and raises :class:`TrainingStopped` at the first call past the
    deadline (or once :meth:`stop` was called). The layer is written after the last backbone call
    (:meth:`casam.registry.store.LayerRegistry.add` makes none, and writes atomically), so a stopped training stores
    nothing; only the router's calibration (seconds, no backbone call) may run past the deadline.

    Args:
        deadline: ``time.time()`` after which the training stops; None: no limit.
        limit: the limit's name and value for messages, e.g. ``"max_train_minutes = 30"``.
        on_progress: called with :meth:`state` whenever the stage or epoch changes, else at most every
            ``period`` seconds; its errors are logged, never raised into the training.
        period: seconds between progress calls within one stage.
    """

    def __init__(self, deadline: Optional[float] = None, limit: str = "",
                 on_progress: Optional[Callable[[Dict], None]] = None, period: float = 2.0):
        self.deadline, self.limit, self.on_progress, self.period = deadline, limit, on_progress, period
        self.t0 = time.time()
        self._stop = threading.Event()
        self._last = 0.0
        self.progress: Dict[str, Any] = {"stage": "load", "epoch": 0, "encoded": 0}

    def stop(self) -> None:
        """Stops the training at its next backbone call."""
        self._stop.set()

    def check(self) -> None:
        """Raises TrainingStopped when the deadline has passed or :meth:`stop` was called."""
        if self._stop.is_set():
            raise TrainingStopped(f"training stopped after {time.time() - self.t0:.0f} s")
        if self.deadline is not None and time.time() > self.deadline:
            raise TrainingStopped(f"time limit {self.limit or 'reached'}: stopped after {time.time() - self.t0:.0f} s")

    def state(self) -> Dict[str, Any]:
        """The stage, epoch, images encoded and seconds so far.

        The epoch is the number of training epochs begun, told by the validation between them: a training
        without validation patients stays at epoch 1.
        """
        return {**self.progress, "seconds": round(time.time() - self.t0, 1)}

    def update(self, force: bool = False, **changes: Any) -> None:
        """Records progress (e.g. ``institution``, ``stage``) and reports it (on a change of stage or epoch,
        ``force``, or ``period`` seconds after the last report)."""
        moved = any(self.progress.get(k) != v for k, v in changes.items() if k in ("stage", "epoch", "institution"))
        self.progress.update(changes)
        now = time.time()
        if self.on_progress is not None and (force or moved or now - self._last >= self.period):
            self._last = now
            try:
                self.on_progress(self.state())
            except Exception as e:  # progress never fails the training
                log.warning("training progress report failed: %s", e)

    def wrap(self, backbone: Backbone) -> "_MonitoredBackbone":
        """The backbone, its ``encode`` and ``decode`` watched by this monitor (everything else passed through)."""
        return _MonitoredBackbone(backbone, self)

    def _encoded(self) -> None:
        self.check()
        self.update(stage="encode", encoded=self.progress["encoded"] + 1)

    def _decoded(self) -> None:
        self.check()
        if torch.is_grad_enabled():  # an optimisation step: a new epoch begins after a validation (or encoding)
            if self.progress["stage"] != "train":
                self.update(stage="train", epoch=self.progress["epoch"] + 1)
        elif self.progress["stage"] != "validate":
            self.update(stage="validate")


class _MonitoredBackbone:
    """A backbone whose ``encode`` / ``decode`` calls report to a :class:`TrainingMonitor` first."""

    def __init__(self, backbone: Backbone, monitor: TrainingMonitor):
        self._backbone, self._monitor = backbone, monitor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)

    def encode(self, *args, **kwargs):
        self._monitor._encoded()
        return self._backbone.encode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        self._monitor._decoded()
        return self._backbone.decode(*args, **kwargs)


def train_institution(backbone: Backbone, registry: LayerRegistry, p: Plan, config: Optional[TrainConfig] = None,
                      modality: str = "", cache_dir: Optional[str | Path] = None, max_slices_per_volume: int = 8,
                      progress: bool = False, limits: Optional[ImageLimits] = None,
                      monitor: Optional[TrainingMonitor] = None) -> Dict:
    """Trains and appends a layer for one planned institution.

    Args:
        backbone: frozen backbone.
        registry: where the layer goes.
        p: the plan (``p.items`` are used).
        config: training recipe.
        modality: free text stored with the layer.
        cache_dir: embedding cache folder.
        max_slices_per_volume: labelled slices taken from each volume.
        progress: show progress bars.
        limits: size limits for reading the images and labels.
        monitor: follows the training (stage, epoch) and stops it at its deadline.

    Returns:
        A report: institution, layer (name or None), images, skipped, val_iou, zero_shot_val_iou, seconds,
        warning (when the layer does not beat plain SAM on validation), error.

    Raises:
        TrainingStopped: the monitor stopped the training; nothing was stored.
    """
    if monitor is not None:
        monitor.update(institution=p.institution, stage="load", epoch=0, encoded=0)
    images, masks, patients, used, skipped = load_items(p.items, max_slices_per_volume, limits)
    report = {"institution": p.institution, "reason": p.reason, "images": len(used), "slices": len(images),
              "patients": len(set(patients)), "skipped": skipped, "layer": None}
    if len(images) < 2:
        report["error"] = f"{len(images)} usable labelled images (2 needed)"
        return report
    if monitor is not None:
        monitor.check()
        backbone = monitor.wrap(backbone)  # type: ignore[assignment]
    try:
        info = train_layer(backbone, images, masks, patients, registry, p.institution, modality, config, cache_dir,
                           progress=progress, extra={"image_ids": used, "source": "online"})
    except ValueError as e:
        report["error"] = str(e)
        return report
    report.update(layer=info.name, version=info.version, val_iou=info.val_iou, zero_shot_val_iou=info.zero_shot_val_iou,
                  tau=info.tau, seconds=info.extra.get("seconds"))
    if info.val_iou is not None and info.zero_shot_val_iou is not None and info.val_iou < info.zero_shot_val_iou:
        report["warning"] = (f"{info.name} is below plain SAM on its validation patients ({info.val_iou:.3f} < "
                             f"{info.zero_shot_val_iou:.3f}); consider more labels or `casam layers rollback`")
    log.info("trained %s", report)
    return report
