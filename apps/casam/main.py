"""MONAI Label app of CA-SAM: interactive segmentation with per-institution Alignment Layers.

Start (fully offline)::

    python -m monailabel.main start_server --app apps/casam --studies <folder or DICOMweb URL> \\
        --conf min_images 5

See ``lib/configs/options.py`` for every ``--conf`` option and ``README.md`` for 3D Slicer and OHIF.
"""

from __future__ import annotations

import logging
import os
import shutil

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.random import Random

import casam
from casam.errors import CasamError
from casam.inference.prefetch import Prefetcher
from lib.configs.casam import CASAMConfig
from lib.server.auth import install as pin_token_algorithms
from lib.server.autotrain import AutoTrainer, install_train_guard
from lib.server.body_limit import install_body_limit
from lib.server.checks import http_error, removed_if_refused, resolve_image
from lib.server.datastore import guard_datastore
from lib.server.endpoints import install_endpoint_guards
from lib.server.faults import install_pacs_errors
from lib.server.hooks import install_open_hooks
from lib.server.routes import install_ohif_assets_fix, install_threaded_infer
from lib.server.sessions import guard_sessions

log = logging.getLogger(__name__)
MODEL = "casam"


class CASAMApp(MONAILabelApp):
    """One interactive model (``casam``), its online trainer, novelty active learning and scoring."""

    def __init__(self, app_dir, studies, conf):
        self.cfg = CASAMConfig()
        self.cfg.init(MODEL, os.path.join(app_dir, "model"), conf or {}, None)
        self.autotrainer = None  # lib.server.autotrain.AutoTrainer, started with the server (on_init_complete)
        install_endpoint_guards(self.cfg.limits)
        install_body_limit(self.cfg.limits.max_bytes, self.cfg.expose_logs)
        install_threaded_infer()  # a segmentation no longer holds up every other request (lib/server/routes.py)
        install_ohif_assets_fix()  # the bundled OHIF's assets/ files, not index.html in their place
        install_pacs_errors(lambda: self.datastore())  # the PACS not answering: 502 naming it (lib/server/faults.py)
        self.cfg.remove_incomplete_layers()
        self.cfg.refused_layers()  # checks every layer now: the log names each refused one at start-up
        # encodes what a client opens (download, upload, next sample) before its first click; datastore images only
        self.cfg.prefetcher = None
        if self.cfg.prefetch:
            self.cfg.prefetcher = Prefetcher(lambda: self.cfg.predictor, lambda i: resolve_image(i, self.datastore()),
                                             self.cfg.limits, self.cfg.max_propagation_slices)
        install_open_hooks(self.cfg.prefetcher.submit if self.cfg.prefetcher else None)
        pin_token_algorithms()  # MONAI Label 0.8.5 under PyJWT 2 refuses every token otherwise (auth on)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="CA-SAM",
            description="Continual Alignment for SAM: frozen SAM + one Alignment Layer per institution, chosen by a "
                        "VAE router (plain SAM for unfamiliar images); an online trainer appends layers as you label.",
            version=casam.__version__,
            labels=list(self.cfg.labels),
        )

    def init_datastore(self):
        return guard_datastore(super().init_datastore(), self.cfg.limits, self.cfg.max_datastore_upload_bytes)

    def _load_sessions(self, load=False):
        return guard_sessions(super()._load_sessions(load), self.cfg.limits, self.cfg.max_sessions)

    def init_infers(self):
        return self.cfg.infer()

    def init_trainers(self):
        return {MODEL: self.cfg.trainer()}

    def init_strategies(self):
        return {**self.cfg.strategy(), "random": Random()}

    def init_scoring_methods(self):
        return self.cfg.scoring_method()

    def _download_dcmqi_tools(self):
        # Never download at run time: DICOM SEG needs dcmqi's itkimage2segimage on PATH (install.sh installs it).
        if not shutil.which("itkimage2segimage"):
            log.warning("itkimage2segimage not found: saving labels as DICOM SEG will fail (pip install dcmqi)")

    def info(self):
        meta = super().info()
        bb = self.cfg
        checkpoint = os.path.basename(bb.checkpoint) if bb.checkpoint else None  # no server path to clients
        meta["backbone"] = {"name": bb.backbone_name, "checkpoint": checkpoint, "device": bb.device}
        meta["layers"] = self.cfg.layers_info()  # served (active and older versions)
        meta["refused_layers"] = self.cfg.refused_layers()  # never loaded: [{name, reason}]
        meta["limits"] = self.cfg.limits_info()
        meta["cache"] = self.cfg.cache_info()
        return meta

    # --- clear 4xx errors instead of MONAI Label's 500 for a bad request; datastore images only ------------
    def infer(self, request, datastore=None):
        with removed_if_refused(request.get("image")):  # an upload's temporary file: no clean-up runs after an error
            return self._infer(request, datastore)

    def _infer(self, request, datastore=None):
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}; available: {', '.join(self._infers)}")
        sessions = self.sessions()
        path, name = resolve_image(request.get("image"), datastore or self.datastore(),
                                   getattr(sessions, "store_path", None))
        image_id = name if name == request.get("image") else None  # a datastore image (not an upload)
        request = {**request, "image": path, "image_name": name, "image_id": image_id, "save_label": False}
        request.pop("timeout", None)  # a client's timeout would reach MONAI Label's thread pool unchecked
        try:
            return super().infer(request, datastore)
        except CasamError as e:
            raise http_error(e) from e

    def infer_wsi(self, request, datastore=None):
        raise HTTPException(400, f"{request.get('model')!r} is not a whole-slide-image model: use /infer")

    def train(self, request):
        model = request.get("model")
        if model not in self._trainers:
            raise HTTPException(404, f"unknown trainer {model!r}; available: {', '.join(self._trainers)}")
        return super().train(request)

    def next_sample(self, request):
        strategy = request.get("strategy") or "casam_novelty"
        if strategy not in self._strategies:
            raise HTTPException(404, f"unknown strategy {strategy!r}; available: {', '.join(self._strategies)}")
        result = super().next_sample({**request, "strategy": strategy})
        if result and self.cfg.prefetcher is not None:
            self.cfg.prefetcher.submit(result.get("id"))
        return result

    def scoring(self, request, datastore=None):
        method = request.get("method")
        if method not in self._scoring_methods:
            available = ", ".join(self._scoring_methods)
            raise HTTPException(404, f"unknown scoring method {method!r}; available: {available}")
        return super().scoring(request, datastore)

    def on_init_complete(self):
        super().on_init_complete()
        # in the server only (MONAI Label's task runner builds the app too, to run a training)
        install_train_guard(lambda: self._trainers)
        if self.cfg.train_after_labels > 0 and MODEL in self._trainers:
            self.autotrainer = AutoTrainer(self._trainers[MODEL], self.datastore, MODEL).start()

    def on_save_label(self, image_id, label_id):
        super().on_save_label(image_id, label_id)
        if self.autotrainer is not None:  # it counts each institution's new final labels (lib/server/autotrain.py)
            self.autotrainer.notify()
