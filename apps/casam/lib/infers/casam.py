"""Interactive CA-SAM inference as MONAI Label runs it (type ``deepgrow``: 3D Slicer and OHIF offer clicks).

Request params, as the clients send them: ``foreground`` / ``background`` voxel indices ``[i, j, k]`` (a
DeepEdit-style ``label`` name with its own point list counts as foreground), ``roi`` ``[i0, i1, j0, j1(, k0,
k1)]``, ``slice`` (for one slice of a volume), plus ``layer`` (``auto`` = router, ``none`` = plain SAM, or a
layer name), ``propagate`` (3D: follow the object slice by slice; default true), ``result_extension``
(default ``.nrrd`` for volumes, ``.png`` for pictures; one of :data:`VOLUME_RESULTS` / :data:`PICTURE_RESULTS`)
and ``result_dtype`` (default uint8; one of :data:`RESULT_DTYPES`).

Every parameter is checked before the image is read: a malformed one, or more points than ``max_points``, is
a 4xx naming it; the image's size is checked from its header (``max_image_voxels`` / ``max_image_megapixels``);
a 3D ROI may span at most ``max_propagation_slices`` slices, and free propagation stops at half of that each
way. At most ``max_concurrent_infers`` requests are segmented at once, which bounds the server's memory.
A click on a volume encodes slices for its propagation for at most ``click_budget_s`` seconds, then follows
the object only through slices already encoded (``pending_slices`` and a warning say where it stopped).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from casam.data.clinical import read_clinical, write_label
from casam.errors import LimitError, PromptError
from casam.inference.prefetch import image_key
from casam.inference.volume import segment_volume
from casam.prompts.masks import voxel_prompts
from lib.configs.options import flag

log = logging.getLogger(__name__)
VOLUME_RESULTS = (".nrrd", ".nii.gz", ".nii", ".mha")
PICTURE_RESULTS = (".png",) + VOLUME_RESULTS
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")


def _flag(value: Any, what: str, default: bool) -> bool:
    """A yes/no parameter (:func:`lib.configs.options.flag`; ``default`` when absent).

    Raises:
        PromptError: a value that is neither yes nor no.
    """
    try:
        return flag(value, default)
    except ValueError as e:
        raise PromptError(f"{what}: {e}") from None


def _numbers(value: Any, what: str, sizes: Tuple[int, ...]) -> Optional[List[float]]:
    """A list of ``sizes`` finite numbers (None when absent).

    Raises:
        PromptError: anything else.
    """
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) in sizes
    nums = []
    for v in value if ok else []:
        ok = ok and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        nums.append(v)
    if not ok:
        raise PromptError(f"{what} {value!r:.80} must be a list of {' or '.join(map(str, sizes))} finite numbers")
    return nums


def _points(value: Any, what: str) -> List[List[float]]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"{what} must be a list of [i, j(, k)] points, got {type(value).__name__}")
    return [_numbers(p, f"{what} point", (2, 3)) for p in value]


def _choice(value: Any, what: str, choices: Tuple[str, ...], default: str) -> str:
    if value in (None, ""):
        return default
    if not isinstance(value, str) or value not in choices:
        raise PromptError(f"{what} {value!r:.40} is not supported; use one of {', '.join(choices)}")
    return value


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
        self._slots = threading.BoundedSemaphore(cfg.max_concurrent_infers)

    def is_valid(self) -> bool:
        return True

    def _foreground(self, request: Dict[str, Any]) -> list:
        fg = _points(request.get("foreground"), "foreground")
        name = request.get("label")
        if name is not None and not isinstance(name, str):
            raise PromptError(f"label must be a label name, got {type(name).__name__}")
        if name and name != "background" and name in request:
            fg += _points(request[name], f"label {name!r:.40}")
        for label in self.cfg.labels:  # DeepEdit clients send points under each label's name
            if label != name and label in request:
                fg += _points(request[label], f"label {label!r}")
        return fg

    def points(self, request: Dict[str, Any]) -> Tuple[list, list]:
        """The request's foreground and background points, checked before the image is read.

        Raises:
            PromptError: malformed points. LimitError: more points than ``max_points``.
        """
        fg, bg = self._foreground(request), _points(request.get("background"), "background")
        if len(fg) + len(bg) > self.cfg.max_points:
            raise LimitError("the request has too many points", "max_points", len(fg) + len(bg), self.cfg.max_points)
        return fg, bg

    def check(self, request: Dict[str, Any], is_volume: bool) -> Dict[str, Any]:
        """The request's parameters, checked (before the image is segmented).

        Returns:
            foreground, background (point lists), roi, layer, ext, dtype, value (class id of the mask), propagate.

        Raises:
            PromptError: a malformed parameter. LimitError: more points than ``max_points``.
        """
        fg, bg = self.points(request)
        roi = request.get("roi")
        roi = _numbers(roi, "roi", (4, 6)) if roi not in (None, []) else None
        layer = request.get("layer") or "auto"
        if not isinstance(layer, str):
            raise PromptError(f"layer must be a layer name, 'auto' or 'none', got {type(layer).__name__}")
        ext = request.get("result_extension")
        ext = f".{ext}" if isinstance(ext, str) and ext and not ext.startswith(".") else ext
        ext = _choice(ext, "result_extension",
                      VOLUME_RESULTS if is_volume else PICTURE_RESULTS, ".nrrd" if is_volume else ".png")
        dtypes = RESULT_DTYPES[:2] if ext == ".png" else RESULT_DTYPES
        dtype = _choice(request.get("result_dtype"), "result_dtype", dtypes, "uint8")
        value = self.cfg.labels.get(request.get("label"), 1) if request.get("label") else 1
        propagate = _flag(request.get("propagate"), "propagate", True)
        return {"foreground": fg, "background": bg, "roi": roi, "layer": layer, "ext": ext, "dtype": dtype,
                "value": value, "propagate": propagate}

    def _slice_range(self, p, depth: int) -> Tuple[Tuple[int, int], bool]:
        """Slices propagation may reach; whether the cap cut a free propagation short."""
        n = self.cfg.max_propagation_slices
        if p.slice_range is not None:
            span = p.slice_range[1] - p.slice_range[0] + 1
            if span > n:
                raise LimitError(f"the 3D roi spans {span} slices", "max_propagation_slices", span, n)
            return p.slice_range, False
        lo, hi = max(0, p.slice - n // 2), min(depth - 1, p.slice + n // 2)
        return (lo, hi), (hi - lo + 1) < depth

    def __call__(self, request) -> Tuple[str, Dict]:
        prefetcher = self.cfg.prefetcher
        # a request waiting for its slot already holds the background encoder back
        with prefetcher.foreground() if prefetcher is not None else contextlib.nullcontext(), self._slots:
            return self._segment(request)

    def _segment(self, request) -> Tuple[str, Dict]:
        t0 = time.time()
        path, name = request["image"], request.get("image_name") or os.path.basename(request["image"])
        self.points(request)  # refuse too many points before reading the image
        img = read_clinical(path, name=name, limits=self.cfg.limits)
        q = self.check(request, img.is_volume)
        predictor = self.cfg.predictor
        p = voxel_prompts(img.array.shape, img.is_volume, q["foreground"], q["background"], q["roi"],
                          request.get("slice"))
        layer = q["layer"]
        key = image_key(predictor.backbone.id, path)
        first_key = f"{key}:{p.slice}" if img.is_volume else key
        cached = predictor.cached(first_key)
        capped, pending = False, []
        if img.is_volume:
            if q["propagate"]:
                rng, capped = self._slice_range(p, img.array.shape[0])
                budget = self.cfg.click_budget_s if p.box is None and self.cfg.click_budget_s > 0 else None
                mask, info = segment_volume(predictor, img.array, p.slice, p.points, p.labels, p.box, layer=layer,
                                            key=key, slice_range=rng, budget_s=budget)
                route, slices, iou, pending = info["route"], info["slices"], info["iou"], info["pending"]
                capped = capped and (slices[0] == rng[0] > 0 or slices[1] == rng[1] < img.array.shape[0] - 1)
            else:
                pred = predictor.predict(img.array[p.slice], p.points, p.labels, p.box, layer=layer, key=first_key)
                mask = np.zeros(img.array.shape, np.uint8)
                mask[p.slice] = pred.mask
                route, slices, iou = pred.route, [p.slice, p.slice], pred.iou
        else:
            pred = predictor.predict(img.array, p.points, p.labels, p.box, layer=layer, key=key)
            mask, route, slices, iou = pred.mask, pred.route, [0, 0], pred.iou
        out = tempfile.NamedTemporaryFile(suffix=q["ext"], prefix="casam-", delete=False).name
        write_label(mask * np.uint8(q["value"]), img, out, q["dtype"])
        warnings = list(img.notes)
        if pending:
            warnings.append(f"slices {slices} in {self.cfg.click_budget_s:g} s (click_budget_s); the object may go on "
                            f"past slice(s) {pending}, still being encoded in the background: click again to extend")
            if self.cfg.prefetcher is not None and request.get("image_id"):  # a datastore image, not an upload
                self.cfg.prefetcher.submit(request["image_id"], centre=p.slice)
        if capped:
            warnings.append(f"propagation stopped at slices {slices} (max_propagation_slices = "
                            f"{self.cfg.max_propagation_slices}); draw a 3D roi or click further slices")
        params = {
            "model": self.cfg.name,
            # layer, institution, fallback, forced, prompt, layer_used, reason, click, score, tau, scores
            **route.as_params(),
            "slice": p.slice,
            "slices": slices,
            "pending_slices": pending,
            "predicted_iou": round(float(iou), 4),
            "embedding_cached": cached,
            "ignored_points": p.ignored,
            "label_names": self.cfg.labels,
            "warnings": warnings,
            "latency_ms": round(1000 * (time.time() - t0), 1),
        }
        log.info("casam infer %s: layer=%s fallback=%s slices=%s %.0f ms", name, params["layer"],
                 params["fallback"], slices, params["latency_ms"])
        return out, params
