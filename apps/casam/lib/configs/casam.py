"""The one config class of the CA-SAM model: reads ``--conf`` options and builds its tasks.

Every option (``monailabel start_server ... --conf <key> <value>``) has a default, and nothing is downloaded. The
options, their defaults and what they do are listed once, in ``lib/configs/options.py``; ``README.md`` shows them
as a table generated from that list. A request over one of the limits (``max_points``, ``max_image_voxels``, …)
is answered 413 naming the limit and the value (see ``README.md`` for the memory bound they give).

A train request (``POST /train/casam``) over a training limit is answered 413 naming the limit, one with a value
that is not a whole number 400, and one that comes while a training runs 409 naming the running one
(``lib/server/autotrain.py``), before anything starts.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Dict, Optional

from monailabel.interfaces.config import TaskConfig

from casam.data.safety import ImageLimits
from casam.inference.predictor import CASAMPredictor
from casam.model.backbone import load_backbone
from casam.paths import default_cache, default_registry
from casam.prompts.masks import PROMPT_TYPES
from casam.registry.store import LayerRegistry, remove_incomplete, writer_lock
from casam.runtime import resolve_device, tune_allocator
from casam.training.config import TrainConfig
from lib.configs.options import read_options
from lib.server.conffile import with_conf_file
from lib.server.layers import ServedRegistry

log = logging.getLogger(__name__)


class CASAMConfig(TaskConfig):
    """Backbone, registry and predictor shared by the infer, train, strategy and scoring tasks."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        conf = with_conf_file(conf)  # read anew at every POST /reload (lib/server/conffile.py)
        super().init(name, model_dir, conf, planner, **kwargs)
        tune_allocator()  # at start-up, before the request and prefetch threads exist (casam.runtime)
        opts = read_options(conf)  # every option, its default and its type: lib/configs/options.py
        self.backbone_name = opts["backbone"]
        self.checkpoint = opts["checkpoint"] or None
        self.device = resolve_device(opts["device"])
        self.registry_dir = Path(opts["registry"] or default_registry(model_dir))
        self.cache_dir = Path(opts["cache"] or default_cache(model_dir))
        self.labels = {n.strip(): i + 1 for i, n in enumerate(opts["labels"].split(",")) if n.strip()}
        self.default_institution = opts["default_institution"]
        self.min_images = opts["min_images"]
        self.retrain_after = opts["retrain_after"]
        self.train_after_labels = opts["train_after_labels"]
        self.train_threads = opts["train_threads"]
        self.train_nice = opts["train_nice"]
        self.max_train_epochs = opts["max_train_epochs"]
        self.max_train_images = opts["max_train_images"]
        self.max_train_minutes = opts["max_train_minutes"]
        self.max_slices_per_volume = opts["max_slices_per_volume"]
        self.cache_mb = opts["cache_mb"]
        self.decode_cache_mb = opts["decode_cache_mb"]
        self.prefetch = opts["prefetch"]
        self.novelty_max_score = opts["novelty_max_score"]
        self.click_budget_s = opts["click_budget_s"]
        self.expose_logs = opts["expose_logs"]
        self.max_points = opts["max_points"]
        self.max_propagation_slices = opts["max_propagation_slices"]
        self.max_concurrent_infers = opts["max_concurrent_infers"]
        self.cache_size = opts["cache_size"] or None
        self.max_sessions = opts["max_sessions"] or None
        self.max_datastore_upload_bytes = int(opts["max_datastore_upload_mb"] * 2**20) or None
        self.limits = ImageLimits(max_voxels=opts["max_image_voxels"],
                                  max_pixels=int(opts["max_image_megapixels"] * 1e6),
                                  max_bytes=int(opts["max_upload_mb"] * 2**20))
        max_images = opts["max_images"]
        self.train_config = TrainConfig(epochs=opts["epochs"], max_images=max_images or None, seed=opts["seed"],
                                        head_steps=opts["head_steps"])
        bounded = {"epochs": (self.train_config.epochs, "max_train_epochs"),
                   "max_images": (max_images, "max_train_images"),
                   **{k: (getattr(self, k), "max_train_images")
                      for k in ("min_images", "retrain_after", "train_after_labels")}}
        for key, (value, limit) in bounded.items():  # the server's own defaults stay within its request limits
            if value > getattr(self, limit):
                raise ValueError(f"--conf {key} {value} is over --conf {limit} {getattr(self, limit)}")
        self.registry = LayerRegistry(self.registry_dir)  # the trainer's (every layer folder counts)
        # the predictor's: the layers that pass their checks; the others refused, said in /info and the log
        self.served = ServedRegistry(self.registry_dir,
                                     lambda: self._predictor.backbone.hash if self._predictor is not None else None)
        self._predictor: Optional[CASAMPredictor] = None
        self.prefetcher: Optional[Any] = None  # casam.inference.prefetch.Prefetcher, set by the app
        self._lock = threading.Lock()

    @property
    def predictor(self) -> CASAMPredictor:
        """The backbone + layers, loaded on first use (and refreshed when a trainer added a layer)."""
        with self._lock:
            if self._predictor is None:
                log.info("loading backbone %s on %s", self.backbone_name, self.device)
                bb = load_backbone(self.backbone_name, self.checkpoint, self.device)
                self.served.backbone_hash = lambda: bb.hash
                self._predictor = CASAMPredictor(bb, self.served, cache_size=self.cache_size,
                                                 cache_bytes=int(self.cache_mb * 2**20),
                                                 decode_cache_bytes=int(self.decode_cache_mb * 2**20))
            self._predictor.refresh()
            return self._predictor

    def layers_info(self) -> list:
        """Provenance of every layer in the registry (active and older versions), for /info."""
        active = {i.name for i in self.served.active()}
        out = []
        for i in self.served.list():
            out.append({"name": i.name, "institution": i.institution, "version": i.version, "active": i.name in active,
                        "modality": i.modality, "backbone": i.backbone_id, "images": i.n_images,
                        "patients": i.n_patients, "tau": i.tau, "val_iou": i.val_iou,
                        "zero_shot_val_iou": i.zero_shot_val_iou, "created": i.created,
                        # per prompt type: validation IoU with the layer and with plain SAM, and whether it is used
                        "validation": i.extra.get("val"), "used_for": {p: i.serves(p) for p in PROMPT_TYPES},
                        "best_epoch": i.extra.get("best_epoch")})
        return out

    def refused_layers(self) -> list:
        """The layer folders the server refused to load and why (:mod:`lib.server.layers`), for /info."""
        return self.served.refused_info()

    def remove_incomplete_layers(self) -> None:
        """Removes half-written layers of a trainer that died (kill -9, power loss), unless one is writing now."""
        with writer_lock(self.registry, wait=False) as held:
            if held:
                remove_incomplete(self.registry)

    def cache_info(self) -> Dict[str, Any]:
        """The caches' use (once the backbone is loaded) and the background encoder's state, for /info."""
        prefetcher = getattr(self, "prefetcher", None)
        return {"caches": self._predictor.cache_stats() if self._predictor is not None else None,
                "prefetch": prefetcher.status() if prefetcher is not None else None}

    def limits_info(self) -> Dict[str, Any]:
        """The request limits in force, for /info (their ``--conf`` keys)."""
        lim = self.limits
        return {"max_points": self.max_points, "max_image_voxels": lim.max_voxels,
                "max_image_megapixels": lim.max_pixels / 1e6, "max_upload_mb": lim.max_bytes / 2**20,
                "max_propagation_slices": self.max_propagation_slices,
                "max_concurrent_infers": self.max_concurrent_infers, "cache_mb": self.cache_mb,
                "decode_cache_mb": self.decode_cache_mb, "click_budget_s": self.click_budget_s,
                "max_sessions": self.max_sessions, "max_datastore_upload_mb":
                    self.max_datastore_upload_bytes / 2**20 if self.max_datastore_upload_bytes else None}

    def infer(self):
        from lib.infers.casam import CASAMInfer

        return {self.name: CASAMInfer(self)}

    def trainer(self):
        from lib.trainers.casam import CASAMTrainer

        return CASAMTrainer(self)

    def strategy(self):
        from lib.activelearning.novelty import Novelty

        return {"casam_novelty": Novelty(self)}

    def scoring_method(self):
        from lib.activelearning.novelty import NoveltyScoring

        return {"casam_novelty": NoveltyScoring(self)}
