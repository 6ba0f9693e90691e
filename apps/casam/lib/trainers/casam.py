"""The online per-institution trainer: saved final labels → one new Alignment Layer per institution.

A train request (``POST /train/casam``) groups the datastore's final labels by institution (DICOM
InstitutionName, else an ``institution`` field of the image's or the label's info, else the configured default)
and, for each institution with at least ``min_images`` labels and no layer yet (or ``retrain_after`` new labels
since its layer), trains a fresh layer + router entry and appends it to the registry. Earlier layers are never
touched; the server picks the new layer up at the next click. Request options: ``institution`` (only this
one), ``force`` (train it even below the thresholds), ``epochs``, ``max_images``, ``min_images``,
``retrain_after``.

Each label is checked again before training (:func:`casam.imageio.read_label`: shape and geometry against its
image, integer classes, not empty); a bad one is skipped and listed in the report, never trained on. One
trainer writes at a time (the registry's writer lock), and it first removes what a killed trainer left.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from casam.online import LabelledItem, institution_of, patient_of, plan, remove_incomplete, train_institution, writer_lock

log = logging.getLogger(__name__)
REPORT = "train_report.json"


def labelled_items(datastore: Datastore, default_institution: str) -> List[LabelledItem]:
    """Every image with a final label, with its institution and patient."""
    ds: Any = datastore
    if isinstance(ds, LocalDatastore):
        ds.datalist()  # a DICOMweb datastore downloads its DICOM SEG labels into its local cache here
        base: Any = LocalDatastore
        ids = base.get_labeled_images(ds)
        image_uri = lambda i: base.get_image_uri(ds, i)  # noqa: E731
        label_uri = lambda i: base.get_label_uri(ds, i, DefaultLabelTag.FINAL)  # noqa: E731
        image_info = lambda i: base.get_image_info(ds, i)  # noqa: E731
        label_info = lambda i: base.get_label_info(ds, i, DefaultLabelTag.FINAL)  # noqa: E731
    else:
        ids = ds.get_labeled_images()
        image_uri = ds.get_image_uri
        label_uri = lambda i: ds.get_label_uri(ds.get_label_by_image_id(i, DefaultLabelTag.FINAL), DefaultLabelTag.FINAL)  # noqa: E731
        image_info = ds.get_image_info
        label_info = lambda i: ds.get_label_info(ds.get_label_by_image_id(i, DefaultLabelTag.FINAL), DefaultLabelTag.FINAL)  # noqa: E731
    items = []
    for i in ids:
        img, lab = image_uri(i), label_uri(i)
        if not img or not lab:
            continue
        infos = [image_info(i), label_info(i)]
        items.append(LabelledItem(i, img, lab, institution_of(img, infos, default_institution), patient_of(i, img, infos)))
    return items


def _write_json_atomic(path: Path, data: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


class CASAMTrainer(TrainTask):
    """Appends one Alignment Layer per institution that has enough new labels."""

    def __init__(self, cfg):
        super().__init__("CA-SAM online trainer: one new Alignment Layer + router entry per institution with enough "
                         "final labels; earlier layers are never changed")
        self.cfg = cfg
        self.report_path = Path(cfg.model_dir) / REPORT

    def config(self) -> Dict[str, Any]:
        return {"institution": "", "force": False, "epochs": self.cfg.train_config.epochs,
                "max_images": self.cfg.train_config.max_images or 0, "min_images": self.cfg.min_images,
                "retrain_after": self.cfg.retrain_after}

    def stats(self) -> Dict[str, Any]:
        try:
            last = json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            last = None
        active = self.cfg.registry.active()
        return {"layers": len(self.cfg.registry.list()), "institutions": {i.institution: i.name for i in active},
                "last_training": last}

    def __call__(self, request, datastore: Datastore):
        t0 = time.time()
        req = {**self.config(), **{k: v for k, v in request.items() if v is not None}}
        try:
            numbers = {k: int(req[k]) for k in ("epochs", "max_images", "min_images", "retrain_after")}
            if numbers["epochs"] < 1 or min(numbers.values()) < 0:
                raise ValueError("epochs must be >= 1, the others >= 0")
        except (TypeError, ValueError) as e:
            report = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "error": f"bad training request: {e}",
                      "new_layers": [], "institutions": []}
            _write_json_atomic(self.report_path, report)
            return report
        with writer_lock(self.cfg.registry):
            remove_incomplete(self.cfg.registry)
            return self._train(req, numbers, datastore, t0)

    def _train(self, req: Dict[str, Any], numbers: Dict[str, int], datastore: Datastore, t0: float) -> Dict[str, Any]:
        tc = dataclasses.replace(self.cfg.train_config, epochs=numbers["epochs"], max_images=numbers["max_images"] or None)
        only = [str(req["institution"])] if req.get("institution") else None
        items = labelled_items(datastore, self.cfg.default_institution)
        plans = plan(items, self.cfg.registry, numbers["min_images"], numbers["retrain_after"], only)
        force = str(req.get("force")).lower() in ("1", "true", "yes")
        predictor_bb = None
        results = []
        for p in plans:
            entry = {"institution": p.institution, "labelled": len(p.items), "decision": p.reason}
            if p.train or (force and only):
                if predictor_bb is None:
                    predictor_bb = self.cfg.predictor.backbone
                entry.update(train_institution(predictor_bb, self.cfg.registry, p, tc, cache_dir=self.cfg.cache_dir,
                                               max_slices_per_volume=self.cfg.max_slices_per_volume, progress=True,
                                               limits=self.cfg.limits))
            results.append(entry)
        report = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - t0, 1),
                  "labelled_images": len(items), "institutions": results,
                  "new_layers": [r["layer"] for r in results if r.get("layer")],
                  "recipe": {"epochs": tc.epochs, "max_images": tc.max_images}}
        if only and not plans:
            report["error"] = f"no final label of institution {only[0]!r}"
        _write_json_atomic(self.report_path, report)
        log.info("casam training: %s", report)
        return report
