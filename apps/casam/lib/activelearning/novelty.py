"""Active learning by novelty: offer the unlabelled image that no Alignment Layer fits.

The router scores an image against every layer's VAE; ``ratio = score / τ`` of the nearest layer is > 1 when
no layer fits (the image would fall back to plain SAM). :class:`NoveltyScoring` writes each unlabelled image's
ratio into the datastore (``casam_novelty``, with the registry state it was computed for);
:class:`Novelty` offers the image with the highest current ratio, scoring up to ``novelty_max_score`` images on
the spot when none has a current score, and picks at random while the registry is empty.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, List, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from casam.data.clinical import read_clinical
from casam.errors import CasamError

log = logging.getLogger(__name__)
FIELD = "casam_novelty"


def novelty_of(cfg, datastore: Datastore, image_id: str) -> Optional[Dict[str, Any]]:
    """The router's novelty of one image (the middle slice of a volume), or None if it cannot be read."""
    path = datastore.get_image_uri(image_id)
    try:
        img = read_clinical(path, name=image_id, limits=cfg.limits)
    except CasamError as e:
        log.warning("novelty: skipping %s: %s", image_id, e)
        return None
    arr = img.array[img.array.shape[0] // 2] if img.is_volume else img.array
    n = cfg.predictor.novelty(arr)
    return {**n, "registry": cfg.registry.signature()}


def _current(datastore: Datastore, image_id: str, signature: str) -> Optional[Dict[str, Any]]:
    s = datastore.get_image_info(image_id).get(FIELD)
    return s if isinstance(s, dict) and s.get("registry") == signature and s.get("ratio") is not None else None


class NoveltyScoring(ScoringMethod):
    """Writes the router novelty of every unlabelled image into the datastore (image info ``casam_novelty``)."""

    def __init__(self, cfg):
        super().__init__("CA-SAM router novelty (score / τ of the nearest layer) of each unlabelled image")
        self.cfg = cfg

    def __call__(self, request, datastore: Datastore):
        sig = self.cfg.registry.signature()
        if not self.cfg.registry.active():
            return {"scored": 0, "note": "no layer yet: nothing to compare with"}
        scored = 0
        for image_id in datastore.get_unlabeled_images():
            if _current(datastore, image_id, sig):
                continue
            s = novelty_of(self.cfg, datastore, image_id)
            if s is not None:
                datastore.update_image_info(image_id, {FIELD: s})
                scored += 1
        return {"scored": scored, "registry": sig}


class Novelty(Strategy):
    """Offers the unlabelled image the router finds most novel; random while there is no layer."""

    def __init__(self, cfg):
        super().__init__("CA-SAM novelty: the unlabelled image no Alignment Layer fits (highest score / τ); "
                         "random before the first layer")
        self.cfg = cfg

    def __call__(self, request, datastore: Datastore):
        images: List[str] = list(datastore.get_unlabeled_images())
        if not images:
            return None
        if not self.cfg.registry.active():
            image = random.choice(images)
            return {"id": image, "strategy": "random", "reason": "no Alignment Layer yet"}
        sig = self.cfg.registry.signature()
        scores = {i: s for i in images if (s := _current(datastore, i, sig))}
        if not scores:
            rng = random.Random(len(images))
            for image_id in rng.sample(images, min(len(images), self.cfg.novelty_max_score)):
                s = novelty_of(self.cfg, datastore, image_id)
                if s is not None:
                    datastore.update_image_info(image_id, {FIELD: s})
                    scores[image_id] = s
        if not scores:
            return {"id": random.choice(images), "strategy": "random", "reason": "no image could be scored"}
        best = max(scores, key=lambda i: scores[i]["ratio"])
        s = scores[best]
        return {"id": best, "strategy": "casam_novelty", "ratio": s["ratio"], "nearest_layer": s["layer"],
                "score": s["score"], "tau": s["tau"], "scored": len(scores)}
