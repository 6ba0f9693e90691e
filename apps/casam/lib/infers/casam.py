"""Interactive CA-SAM inference as MONAI Label runs it (type ``deepgrow``: 3D Slicer and OHIF offer clicks).

Request params, as the clients send them: ``foreground`` / ``background`` voxel indices ``[i, j, k]`` (a
DeepEdit-style ``label`` name with its own point list counts as foreground), ``roi`` ``[i0, i1, j0, j1(, k0,
k1)]``, ``slice`` (for one slice of a volume), plus ``layer`` (``auto`` = router, ``none`` = plain SAM, or a
layer name), ``propagate`` (3D: follow the object slice by slice; default true), ``result_extension``
(default ``.nrrd`` for volumes, ``.png`` for pictures) and ``result_dtype`` (default uint8).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Dict, Tuple

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from casam.imageio import read_clinical, write_label
from casam.prompts import voxel_prompts
from casam.volume import segment_volume

log = logging.getLogger(__name__)


def _bool(v: Any, default: bool = True) -> bool:
    if v is None:
        return default
    if isinstance(v, str):
        return v.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(v)


class CASAMInfer(InferTask):
    """Points and/or a box on a 2D picture or on one slice of a volume → mask (propagated through the volume)."""

    def __init__(self, cfg):
        super().__init__(
            type=InferType.DEEPGROW,
            labels=cfg.labels,
            dimension=3,
            description="CA-SAM: frozen SAM + the Alignment Layer of the image's institution (VAE router; plain SAM "
                        "for images unlike any). Click foreground/background points or drag a box; in 3D the "
                        "clicked slice's mask is propagated slice by slice.",
            config={"layer": "auto", "propagate": True},
        )
        self.cfg = cfg

    def is_valid(self) -> bool:
        return True

    def _foreground(self, request: Dict[str, Any]) -> list:
        fg = list(request.get("foreground") or [])
        name = request.get("label")
        if name and name != "background" and isinstance(request.get(name), list):
            fg += request[name]
        for label in self.cfg.labels:  # DeepEdit clients send points under each label's name
            if label != name and isinstance(request.get(label), list):
                fg += request[label]
        return fg

    def __call__(self, request) -> Tuple[str, Dict]:
        t0 = time.time()
        path = request["image"]
        img = read_clinical(path)
        predictor = self.cfg.predictor
        p = voxel_prompts(img.array.shape, img.is_volume, self._foreground(request), request.get("background"),
                          request.get("roi"), request.get("slice"))
        layer = str(request.get("layer") or "auto")
        st = os.stat(path)
        key = f"{predictor.backbone.id}:{os.path.realpath(path)}:{st.st_mtime_ns}:{st.st_size}"
        first_key = f"{key}:{p.slice}" if img.is_volume else key
        cached = predictor.cached(first_key)
        value = self.cfg.labels.get(request.get("label"), 1) if request.get("label") else 1
        if img.is_volume:
            if _bool(request.get("propagate"), True):
                mask, info = segment_volume(predictor, img.array, p.slice, p.points, p.labels, p.box, layer=layer, key=key,
                                            slice_range=p.slice_range)
                route, slices, iou = info["route"], info["slices"], info["iou"]
            else:
                pred = predictor.predict(img.array[p.slice], p.points, p.labels, p.box, layer=layer, key=first_key)
                mask = np.zeros(img.array.shape, np.uint8)
                mask[p.slice] = pred.mask
                route, slices, iou = pred.route, [p.slice, p.slice], pred.iou
        else:
            pred = predictor.predict(img.array, p.points, p.labels, p.box, layer=layer, key=key)
            mask, route, slices, iou = pred.mask, pred.route, [0, 0], pred.iou
        ext = request.get("result_extension") or (".nrrd" if img.is_volume else ".png")
        ext = ext if ext.startswith(".") else "." + ext
        out = tempfile.NamedTemporaryFile(suffix=ext, prefix="casam-", delete=False).name
        write_label(mask * np.uint8(value), img, out, request.get("result_dtype") or "uint8")
        params = {
            "model": self.cfg.name,
            "layer": route.get("layer"),
            "institution": route.get("institution"),
            "fallback": bool(route.get("fallback")),
            "forced": bool(route.get("forced")),
            "score": route.get("score"),
            "tau": route.get("tau"),
            "scores": route.get("scores"),
            "slice": p.slice,
            "slices": slices,
            "predicted_iou": round(float(iou), 4),
            "embedding_cached": cached,
            "ignored_points": p.ignored,
            "label_names": self.cfg.labels,
            "latency_ms": round(1000 * (time.time() - t0), 1),
        }
        log.info("casam infer %s: layer=%s fallback=%s slices=%s %.0f ms", os.path.basename(path), params["layer"],
                 params["fallback"], slices, params["latency_ms"])
        return out, params
