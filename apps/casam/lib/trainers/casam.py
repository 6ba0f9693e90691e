"""The online per-institution trainer: saved final labels → one new Alignment Layer per institution.

A train request (``POST /train/casam``) groups the datastore's final labels by institution (DICOM
InstitutionName, else an ``institution`` field of the image's or the label's info, else the configured default)
and, for each institution with at least ``min_images`` labels and no layer yet (or ``retrain_after`` new labels
since its layer), trains a fresh layer + router entry and appends it to the registry. Earlier layers are never
touched; the server picks the new layer up at the next click. Request options: ``institution`` (only this
one), ``force`` (train it even below the thresholds), ``epochs``, ``max_images``, ``min_images``,
``retrain_after``; each number is bounded by a ``--conf`` limit (``max_train_epochs``, ``max_train_images``;
:meth:`CASAMTrainer.parse_request`), and a training stops, storing nothing more, after ``max_train_minutes``.

The server runs a background training (``POST /train/casam``, or the app's own after ``train_after_labels``
labels) in MONAI Label's task runner, a subprocess: there the trainer lowers its own priority (``train_nice``)
and its torch threads (``train_threads``), so that clicks on the server are not stalled, and writes its
progress to ``train_status.json``, which :meth:`CASAMTrainer.stats` shows in ``/info`` (``train_stats``).

Each label is checked again before training (:func:`casam.data.clinical.read_label`: shape and geometry against its
image, integer classes, not empty); a bad one is skipped and listed in the report, never trained on. One
trainer writes at a time (the registry's writer lock), and it first removes what a killed trainer left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from casam.data.dicom import institution_of, patient_of
from casam.errors import LimitError
from casam.registry.store import remove_incomplete, writer_lock
from casam.training.online import LabelledItem, TrainingMonitor, TrainingStopped, plan, train_institution
from lib.configs.options import flag
from lib.server.checks import shown
from lib.server.faults import disk_full, install_training_pauses, insufficient_storage

log = logging.getLogger(__name__)
REPORT = "train_report.json"
STATUS = "train_status.json"
TASK_RUNNER = "monailabel.interfaces.utils.app"  # the module MONAI Label runs a background training with
ACTIVE = ("SUBMITTED", "RUNNING")  # MONAI Label's states of a background task that has not ended
GRACE_S = 60  # seconds past max_train_minutes after which a background training's process is ended
# request option -> (the --conf limit bounding it, its lowest value)
BOUNDS = {"epochs": ("max_train_epochs", 1), "max_images": ("max_train_images", 0),
          "min_images": ("max_train_images", 0), "retrain_after": ("max_train_images", 0)}


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
        final = DefaultLabelTag.FINAL
        label_uri = lambda i: ds.get_label_uri(ds.get_label_by_image_id(i, final), final)  # noqa: E731
        image_info = ds.get_image_info
        label_info = lambda i: ds.get_label_info(ds.get_label_by_image_id(i, final), final)  # noqa: E731
    items = []
    for i in ids:
        img, lab = image_uri(i), label_uri(i)
        if not img or not lab:
            continue
        infos = [image_info(i), label_info(i)]
        items.append(LabelledItem(i, img, lab, institution_of(img, infos, default_institution),
                                  patient_of(i, img, infos)))
    return items


def _write_json_atomic(path: Path, data: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _whole(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{key} must be a whole number, got {shown(value)}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key} must be a whole number, got {shown(value)}") from None
    if not number.is_integer():
        raise ValueError(f"{key} must be a whole number, got {shown(value)}")
    return int(number)


def in_task_runner() -> bool:
    """True in MONAI Label's task runner (``python -m monailabel.interfaces.utils.app -m train``), the subprocess
    in which the server runs a background training."""
    return getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None) == TASK_RUNNER


def lower_priority(threads: int, nice: int) -> Dict[str, int]:
    """Gives this process ``threads`` torch threads (0: unchanged) and ``nice`` more niceness (0: unchanged).

    Returns:
        The torch threads and niceness now.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    if nice > 0:
        os.nice(nice)
    return {"torch_threads": torch.get_num_threads(), "nice": os.nice(0)}


def active_task() -> Optional[Dict[str, Any]]:
    """This server's background training task (MONAI Label's) that has not ended, else None."""
    from monailabel.utils.async_tasks.utils import tasks

    return next((t for t in tasks("train") if t.get("status") in ACTIVE), None)


def _alive(pid: Any) -> bool:
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


class _Watchdog(threading.Thread):
    """Refreshes a running training's status every ``period`` seconds (its ``seconds``, also in a stage without
    backbone calls, such as the refinement head's) and, given ``end_at``, ends the training's process then if
    the training has not stopped by itself (:class:`casam.training.online.TrainingMonitor` stops it only at a backbone
    call). Layers are written whole, so an ended process leaves none half-written.

    Args:
        trainer: the trainer (its ``_ended`` writes the report and status of an ended process).
        status: the training's status.
        monitor: the training's monitor.
        end_at: ``time.time()`` at which to end the process (only in MONAI Label's task runner); None: never.
        period: seconds between status refreshes.
    """

    def __init__(self, trainer: "CASAMTrainer", status: Dict[str, Any], monitor: TrainingMonitor,
                 end_at: Optional[float], period: float = 5.0):
        super().__init__(name="casam-train-watchdog", daemon=True)
        self.trainer, self.status, self.monitor, self.end_at, self.period = trainer, status, monitor, end_at, period
        self._lock, self._finished = threading.Lock(), threading.Event()
        self.layers_before = {i.name for i in trainer.cfg.registry.list()}

    def run(self) -> None:
        while not self._finished.wait(self.period):
            with self._lock:
                if self._finished.is_set():
                    return
                if self.end_at is not None and time.time() >= self.end_at:
                    self.trainer._ended(self)
                    os._exit(3)
                self.monitor.update(force=True)

    @contextlib.contextmanager
    def finishing(self):
        """Held while the training writes its final report and status: the watchdog does nothing after it."""
        with self._lock:
            self._finished.set()
            yield


class CASAMTrainer(TrainTask):
    """Appends one Alignment Layer per institution that has enough new labels."""

    def __init__(self, cfg):
        super().__init__("CA-SAM online trainer: one new Alignment Layer + router entry per institution with enough "
                         "final labels; earlier layers are never changed")
        self.cfg = cfg
        self.report_path = Path(cfg.model_dir) / REPORT
        self.status_path = Path(cfg.model_dir) / STATUS

    def config(self) -> Dict[str, Any]:
        return {"institution": "", "force": False, "epochs": self.cfg.train_config.epochs,
                "max_images": self.cfg.train_config.max_images or 0, "min_images": self.cfg.min_images,
                "retrain_after": self.cfg.retrain_after}

    def limits(self) -> Dict[str, Any]:
        """The training limits in force (their ``--conf`` keys)."""
        return {k: getattr(self.cfg, k) for k in ("max_train_epochs", "max_train_images", "max_train_minutes",
                                                  "train_after_labels", "train_threads", "train_nice")}

    def parse_request(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """A train request's options, checked against their limits before anything starts.

        Args:
            request: the request (options left out take :meth:`config`'s defaults; other keys are ignored).

        Returns:
            ``epochs``, ``max_images``, ``min_images``, ``retrain_after`` (ints), ``institution`` (str), ``force``
            and ``auto`` (bools: ``auto`` marks the app's own trainings).

        Raises:
            LimitError: a number over its limit (``max_train_epochs`` for ``epochs``, ``max_train_images`` for the
                image counts).
            ValueError: a value that is not a whole number, below its lowest value, a bad institution, or a
                ``force`` / ``auto`` that is neither yes nor no.
        """
        req = {**self.config(), **{k: v for k, v in request.items() if v is not None}}
        out: Dict[str, Any] = {}
        for key, (limit, lowest) in BOUNDS.items():
            n = _whole(key, req[key])
            if n < lowest:
                raise ValueError(f"{key} must be >= {lowest}, got {n}")
            if n > getattr(self.cfg, limit):
                raise LimitError(f"training request option {key}", limit, n, getattr(self.cfg, limit))
            out[key] = n
        institution = req.get("institution") or ""
        if not isinstance(institution, str) or len(institution) > 200:
            raise ValueError(f"institution must be a name of at most 200 characters, got {shown(institution)}")
        out["institution"] = institution
        for key in ("force", "auto"):
            try:
                out[key] = flag(req.get(key))
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        return out

    def status(self) -> Optional[Dict[str, Any]]:
        """The running or last training's progress (``train_status.json``), None before the first.

        A training whose process died without finishing (killed) shows ``state: killed``: it stored nothing
        (layers are written whole, :meth:`casam.registry.store.LayerRegistry.add`). A background task of this server
        whose process has not written its status yet (it is loading the app) shows ``state: starting``.
        """
        try:
            status = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            status = None
        task = active_task()
        started = str(status.get("started")).replace("T", " ") if status is not None else ""
        if task is not None and (status is None or started < task.get("start_ts", "")):
            return {"state": "starting", "task": task["id"], "submitted": task.get("start_ts"),
                    "auto": flag(task["request"].get("auto"))}
        if status is None:
            return None
        if status.get("state") == "running" and not _alive(status.get("pid")):
            status.update(state="killed", error="the training process ended before it finished (killed?); it stored "
                                                "nothing after its last layer in new_layers")
        return status

    def running(self) -> Optional[Dict[str, Any]]:
        """The status of a training running now (in any process), else None."""
        status = self.status()
        return status if status and status.get("state") == "running" else None

    def stats(self) -> Dict[str, Any]:
        try:
            last = json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            last = None
        active = self.cfg.registry.active()
        return {"layers": len(self.cfg.registry.list()), "institutions": {i.institution: i.name for i in active},
                "last_training": last, "training": self.status(), "limits": self.limits()}

    def __call__(self, request, datastore: Datastore):
        t0 = time.time()
        try:
            req = self.parse_request(request)
        except ValueError as e:
            report = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "error": f"bad training request: {e}",
                      "new_layers": [], "institutions": []}
            _write_json_atomic(self.report_path, report)
            return report
        runner = in_task_runner()
        priority = lower_priority(self.cfg.train_threads, self.cfg.train_nice) if runner else None
        minutes = self.cfg.max_train_minutes
        status = {"state": "running", "pid": os.getpid(), "auto": req["auto"],
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)), "priority": priority,
                  "request": {k: req[k]
                              for k in ("institution", "epochs", "max_images", "min_images", "retrain_after")},
                  "time_limit_s": round(minutes * 60) if minutes > 0 else None, "new_layers": []}
        monitor = TrainingMonitor(t0 + minutes * 60 if minutes > 0 else None, f"max_train_minutes = {minutes:g}",
                                  on_progress=lambda progress: self._status({**status, **progress}))
        self._status(status)
        # the process is ended past the limit only in the task runner: in the server it would end the server
        watchdog = _Watchdog(self, status, monitor, t0 + minutes * 60 + GRACE_S if runner and minutes > 0 else None)
        watchdog.start()
        install_training_pauses(monitor)  # a test-only hook, inert unless CASAM_TEST_PAUSE_DIR is set
        try:
            with writer_lock(self.cfg.registry):
                remove_incomplete(self.cfg.registry)
                report = self._train(req, datastore, t0, monitor, status)
        except Exception as e:
            full = disk_full(e)
            error = ("the registry's disk is full (no space left on device): the new layer was not stored, the "
                     "registry is as it was" if full else f"{type(e).__name__}: {e}")
            with watchdog.finishing():
                self._status({**status, **monitor.state(), "state": "failed", "error": error})
            if full:
                log.error("casam: training failed: disk full: layer of %s not stored; the registry keeps its %d "
                          "layer(s)", monitor.progress.get("institution", "?"), len(self.cfg.registry.list()))
                if not runner:  # a run_sync request: the client's answer
                    raise insufficient_storage("the new layer", "the registry is as it was") from None
            raise
        with watchdog.finishing():
            self._status({**status, **monitor.state(), "state": "stopped" if report.get("stopped") else "done",
                          "seconds": report["seconds"], "new_layers": report["new_layers"], "results": [
                              {k: r.get(k) for k in ("institution", "layer", "val_iou", "zero_shot_val_iou", "error")}
                              for r in report["institutions"] if "layer" in r], "stopped": report.get("stopped")})
        return report

    def _ended(self, watchdog: _Watchdog) -> None:
        """The report and status of a background training whose process the watchdog ends at its time limit."""
        new = sorted({i.name for i in self.cfg.registry.list()} - watchdog.layers_before)  # stored whole before it
        why = (f"time limit max_train_minutes = {self.cfg.max_train_minutes:g}: the training did not stop by itself "
               f"(a stage without backbone calls), its process was ended {GRACE_S} s after the limit")
        state = watchdog.monitor.state()
        log.warning("casam training: %s", why)
        _write_json_atomic(self.report_path, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                              "seconds": state["seconds"], "stopped": why, "new_layers": new,
                                              "institutions": [], "auto": watchdog.status.get("auto")})
        self._status({**watchdog.status, **state, "state": "stopped", "stopped": why, "new_layers": new})

    def _status(self, status: Dict[str, Any]) -> None:
        _write_json_atomic(self.status_path, status)

    def _train(self, req: Dict[str, Any], datastore: Datastore, t0: float, monitor: TrainingMonitor,
               status: Dict[str, Any]) -> Dict[str, Any]:
        max_images = req["max_images"] or self.cfg.max_train_images
        tc = dataclasses.replace(self.cfg.train_config, epochs=req["epochs"], max_images=max_images)
        status["epochs"] = tc.epochs
        only = [req["institution"]] if req["institution"] else None
        items = labelled_items(datastore, self.cfg.default_institution)
        plans = plan(items, self.cfg.registry, req["min_images"], req["retrain_after"], only)
        chosen = [p for p in plans if p.train or (req["force"] and only)]
        results, stopped = [], None
        for p in plans:
            entry = {"institution": p.institution, "labelled": len(p.items), "decision": p.reason}
            if p in chosen and stopped is None:
                status["institutions"] = f"{chosen.index(p) + 1}/{len(chosen)}"
                try:
                    entry.update(train_institution(self.cfg.predictor.backbone, self.cfg.registry, p, tc,
                                                   cache_dir=self.cfg.cache_dir, progress=True, limits=self.cfg.limits,
                                                   max_slices_per_volume=self.cfg.max_slices_per_volume,
                                                   monitor=monitor))
                except TrainingStopped as e:
                    stopped = str(e)
                    entry.update(layer=None, error=f"{e}; nothing stored for {p.institution}")
                if entry.get("layer"):
                    status["new_layers"].append(entry["layer"])
            elif p in chosen:
                entry["error"] = f"not trained: the training had stopped ({stopped})"
            results.append(entry)
        report = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - t0, 1),
                  "labelled_images": len(items), "institutions": results,
                  "new_layers": [r["layer"] for r in results if r.get("layer")], "auto": req["auto"],
                  "recipe": {"epochs": tc.epochs, "max_images": tc.max_images},
                  "time_limit_minutes": self.cfg.max_train_minutes or None}
        if stopped:
            report["stopped"] = stopped
        if only and not plans:
            report["error"] = f"no final label of institution {only[0]!r}"
        _write_json_atomic(self.report_path, report)
        log.info("casam training: %s", report)
        return report
