"""The server trains by itself, one training at a time, and checks train requests before anything starts.

* :class:`AutoTrainer`, a daemon thread of the server, starts a background training of an institution once it
  has ``train_after_labels`` final labels that its newest layer has not seen (a first layer needs
  ``min_images`` labels too), as ``POST /train/casam`` does: MONAI Label's ``run_background_task`` runs the
  trainer in its task runner, a subprocess with a lower priority (:mod:`lib.trainers.casam`), so clicks keep
  the server's threads. It is woken by every saved label (and once at start-up); while a training runs,
  started by hand or by itself, it waits, so an institution that becomes due meanwhile is trained after it
  (queued, never beside it). It tries an institution once per number of its labels: a training that failed,
  was stopped or trained no layer is tried again only after the institution's next label.
* :func:`install_train_guard` checks ``POST /train/casam`` (and ``POST /train/``) in the server before MONAI
  Label starts a training: an option over its limit → 413 naming the ``--conf`` limit, a value that is not a
  whole number → 400, a training already running → 409 naming it (MONAI Label's own answer would be 429 for a
  background request and nothing for ``run_sync``, which it would start beside the running one).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional

from fastapi import HTTPException

from casam.errors import LimitError
from casam.registry.store import writer_lock
from casam.training.online import plan
from lib.configs.options import flag
from lib.server.hooks import wrap_endpoint
from lib.trainers.casam import ACTIVE, active_task, labelled_items

log = logging.getLogger(__name__)
POLL_S = 1.0


def running_training(trainer: Any) -> Optional[str]:
    """What training runs now, in words, or None.

    A background task of this server that has not ended, a training whose status says it is running (a
    ``run_sync`` one, or one of another process), or another process holding the registry's writer lock.
    """
    task = active_task()
    status = trainer.running()
    if task is None and status is None:
        with writer_lock(trainer.cfg.registry, wait=False) as free:
            return None if free else "another process is writing the layer registry (holds its writer lock)"
    words = [f"task {task['id']} started {task.get('start_ts')}" if task else None]
    if task and not status:  # its process is still loading the app
        words += ["automatic" if flag(task["request"].get("auto")) else "requested", "starting"]
    if status:
        progress = ", ".join(f"{k} {status[k]}" for k in ("institution", "stage") if status.get(k))
        training = status.get("stage") in ("train", "validate")
        epoch = f"epoch {status.get('epoch')}/{status.get('epochs')}" if training else ""
        words += ["automatic" if status.get("auto") else "requested", f"pid {status.get('pid')}", progress, epoch,
                  f"{status.get('seconds', 0):.0f} s"]
    return "a training is running (" + "; ".join(w for w in words if w) + ")"


def check_train_request(trainer: Any, params: Optional[dict]) -> None:
    """Refuses a train request before anything starts.

    Raises:
        HTTPException: 413 an option over its limit, 400 a bad value, 409 a training already running.
    """
    try:
        trainer.parse_request(params or {})
    except LimitError as e:
        raise HTTPException(413, str(e)) from None
    except ValueError as e:
        raise HTTPException(400, f"bad training request: {e}") from None
    running = running_training(trainer)
    if running:
        raise HTTPException(409, f"{running}: one training at a time; wait for it (GET /train/) or stop it "
                                 f"(DELETE /train/)")


def install_train_guard(trainers: Callable[[], Dict[str, Any]]) -> None:
    """Checks train requests with :func:`check_train_request` before MONAI Label's endpoints start them.

    Args:
        trainers: the app's trainers by model name (called per request).
    """
    from monailabel.endpoints import train as train_ep

    def one(model: str = "", params: Optional[dict] = None, **_) -> None:
        trainer = trainers().get(model)
        if trainer is None:
            raise HTTPException(404, f"unknown trainer {model!r}; available: {', '.join(trainers())}")
        check_train_request(trainer, params)

    def every(params: Optional[dict] = None, **_) -> None:  # POST /train/: every trainer, options per model
        for model in trainers():
            one(model, (params or {}).get(model))

    wrap_endpoint(train_ep, "run_model", "casam_train_guard", before=one)
    wrap_endpoint(train_ep, "run", "casam_train_guard", before=every)


class AutoTrainer:
    """Starts an institution's next layer in the background once it has enough new final labels.

    Args:
        trainer: the app's :class:`lib.trainers.casam.CASAMTrainer` (its config has ``train_after_labels``).
        datastore: the app's datastore (called when it is needed).
        model: the trainer's model name (MONAI Label's train request ``model``).
    """

    def __init__(self, trainer: Any, datastore: Callable[[], Any], model: str):
        self.trainer, self.cfg, self.datastore, self.model = trainer, trainer.cfg, datastore, model
        self.tried: Dict[str, int] = {}  # institution -> its labels when its last automatic training started
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="casam-autotrain", daemon=True)

    def start(self) -> "AutoTrainer":
        """Starts the thread (it looks for due institutions at once)."""
        self._wake.set()
        self._thread.start()
        return self

    def notify(self) -> None:
        """A label was saved: look for a due institution."""
        self._wake.set()

    def due(self) -> Optional[Dict[str, Any]]:
        """The request of the next automatic training, or None when no institution is due."""
        n = self.cfg.train_after_labels
        opts = {"min_images": max(self.cfg.min_images, n), "retrain_after": n}
        for p in plan(labelled_items(self.datastore(), self.cfg.default_institution), self.cfg.registry, **opts):
            if p.train and len(p.items) > self.tried.get(p.institution, -1):
                self.tried[p.institution] = len(p.items)
                return {"model": self.model, "institution": p.institution, "auto": True, "reason": p.reason, **opts}
        return None

    def _run(self) -> None:
        from monailabel.utils.async_tasks.utils import run_background_task

        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                while True:
                    while running_training(self.trainer):  # one at a time: a due institution waits its turn
                        time.sleep(POLL_S)
                    request = self.due()
                    if request is None:
                        break
                    log.info("%s: starting an automatic training of %s", request.pop("reason"), request["institution"])
                    task = run_background_task(request, "train")
                    while task["status"] in ACTIVE:
                        time.sleep(POLL_S)
                    log.info("automatic training of %s ended: %s", request["institution"], task["status"])
            except Exception as e:  # the thread lives on; the next label tries again
                log.exception("automatic training failed: %s", e)
