"""The bundle's network and inferer: run CA-SAM over a folder of images with prompts."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from casam.bundle.layout import LABEL_SUFFIX, MASK_SUFFIX, SUMMARY_FILE
from casam.data.datasets import read_image, read_mask
from casam.data.formats import IMAGE_SUFFIXES
from casam.errors import CasamError, ImageError, PromptError
from casam.inference.predictor import AUTO, CASAMPredictor
from casam.inference.routing import Routing
from casam.model.router import pool_embedding
from casam.prompts.masks import binary_masks, tight_box

logger = logging.getLogger("casam.bundle.export")


# ---------------------------------------------------------------------------------------------- network
class BundleNetwork(nn.Module):
    """The bundle's network as one module: frozen encoder → routed Alignment Layer → prompt decoder.

    ``forward(image, box=None, layer="auto")`` takes prepared inputs (B×3×S×S, as
    :meth:`casam.model.backbone.Backbone.prepare` makes them) and returns B×1×S×S mask logits. Each image is routed
    on its own (the VAE router; identity fallback out of distribution). ``box`` is B×4 (x0, y0, x1, y1) in
    the S×S input frame (pixel-edge coordinates, as SAM expects); without it the whole input is the box.

    Args:
        predictor: a CASAMPredictor (e.g. from :func:`load_bundle_predictor`); its backbone and active
            layers become submodules, so ``.to(device)`` moves them all.
    """

    def __init__(self, predictor: CASAMPredictor):
        super().__init__()
        self.predictor = [predictor]  # a list keeps it out of the module tree (it is not a Module)
        self.backbone = predictor.backbone
        self.layers = nn.ModuleDict({i.name: predictor.layer(i.name) for i in predictor.layers})
        self.names = [i.name for i in predictor.layers]

    @property
    def img_size(self) -> int:
        return self.backbone.img_size

    def route(self, z: torch.Tensor) -> List[Optional[str]]:
        """The layer name (or None = plain SAM) the router picks for each embedding of a batch."""
        router = self.predictor[0].router
        names = []
        for b in range(z.shape[0]):
            r = router.route(pool_embedding(z[b: b + 1])[0].cpu())
            names.append(None if r.index is None else self.names[r.index])
        return names

    @torch.no_grad()
    def forward(self, image: torch.Tensor, box: Optional[torch.Tensor] = None, layer: str = AUTO) -> torch.Tensor:
        s = self.img_size
        if image.dim() != 4 or image.shape[1] != 3:
            raise ImageError(f"expected B×3×{s}×{s} prepared images, got {tuple(image.shape)}")
        if image.shape[-2:] != (s, s):
            image = F.interpolate(image.float(), size=(s, s), mode="bilinear", align_corners=False)
        z = self.backbone.encode(image)
        n = z.shape[0]
        if layer in (None, "", AUTO):
            names = self.route(z)
        elif layer == "none":
            names = [None] * n
        else:
            if layer not in self.layers:
                raise PromptError(f"unknown or inactive layer {layer!r} (bundle has {', '.join(self.names) or 'none'})")
            names = [layer] * n
        if box is None:
            boxes = torch.tensor([[0.0, 0.0, float(s), float(s)]], device=z.device).expand(n, 4)
        else:
            boxes = torch.as_tensor(box, dtype=torch.float32, device=z.device).reshape(-1, 4)
            if boxes.shape[0] == 1 and n > 1:
                boxes = boxes.expand(n, 4)
            if boxes.shape[0] != n:
                raise PromptError(f"{boxes.shape[0]} boxes for {n} images")
        out = []
        for b in range(n):
            zb = z[b: b + 1]
            if names[b] is not None:
                zb = self.layers[names[b]](zb)
            logits, _ = self.backbone.decode(zb, boxes=boxes[b: b + 1])
            out.append(F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False))
        return torch.cat(out, dim=0).float()


# --------------------------------------------------------------------------------------------- inferer
def _image_files(folder: Path) -> List[Path]:
    suffixes = IMAGE_SUFFIXES
    files = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in suffixes or p.name.startswith("."):
            continue
        if p.stem.endswith(LABEL_SUFFIX) or p.stem.endswith(MASK_SUFFIX):
            continue
        files.append(p)
    return files


def _find_label(image: Path) -> Optional[Path]:
    for suf in IMAGE_SUFFIXES:
        p = image.with_name(f"{image.stem}{LABEL_SUFFIX}{suf}")
        if p.is_file():
            return p
    return None


def parse_prompt_file(path: Union[str, Path]) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Reads the prompts of one image from its JSON file.

    Accepted forms (coordinates are (x = column, y = row) pixels of the image; boxes ``[x0, y0, x1, y1]``
    with inclusive corners)::

        {"box": [x0, y0, x1, y1]}                               one object, label 1
        {"boxes": [[...], [...]], "labels": [1, 2]}             one object per box (labels default 1, 2, …)
        {"points": [[x, y], ...], "point_labels": [1, 0, ...]}  one object from points (with "box": both)
        {"prompts": [{"box": ..., "points": ..., "point_labels": ..., "label": 3}, ...]}
        any of them + "layer": "auto" | "none" | "<layer name>"

    Returns:
        (list of prompts ``{"label", "box", "points", "point_labels"}``, layer or None).

    Raises:
        PromptError: unreadable or malformed file.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PromptError(f"cannot read prompts {path}: {e}") from e
    if not isinstance(d, dict):
        raise PromptError(f"{path}: expected a JSON object")
    layer = d.get("layer")
    prompts: List[Dict[str, Any]] = []
    if "prompts" in d:
        for i, p in enumerate(d["prompts"]):
            if not isinstance(p, dict):
                raise PromptError(f"{path}: prompts[{i}] must be an object")
            prompts.append({"label": int(p.get("label", i + 1)), "box": p.get("box"), "points": p.get("points"),
                            "point_labels": p.get("point_labels")})
    elif "boxes" in d:
        boxes = d["boxes"]
        labels = d.get("labels") or list(range(1, len(boxes) + 1))
        if len(labels) != len(boxes):
            raise PromptError(f"{path}: {len(boxes)} boxes but {len(labels)} labels")
        prompts = [{"label": int(k), "box": b, "points": None, "point_labels": None} for b, k in zip(boxes, labels)]
    elif "box" in d or "points" in d:
        prompts = [{"label": int(d.get("label", 1)), "box": d.get("box"), "points": d.get("points"),
                    "point_labels": d.get("point_labels")}]
    if not prompts:
        raise PromptError(f"{path}: no prompt (use 'box', 'boxes', 'points' or 'prompts')")
    for p in prompts:
        if not 1 <= p["label"] <= 255:
            raise PromptError(f"{path}: labels must be 1..255, got {p['label']}")
    return prompts, layer


def prompts_from_label(label: np.ndarray) -> List[Dict[str, Any]]:
    """One tight-box prompt per class present in a label map (the evaluation protocol of CA-SAM)."""
    return [{"label": c, "box": tight_box(m).tolist(), "points": None, "point_labels": None}
            for c, m in binary_masks(label, max_masks=255)]


class BundleInferer:
    """Segments every image of a folder with a bundle's predictor and writes one label map per image.

    For ``<input_dir>/<name>.<png|jpg|tif|bmp|npy>`` the prompts come from ``<name>.json`` (see
    :func:`parse_prompt_file`) or, without it, from the tight box of each class of ``<name>_label.<ext>``.
    The output ``<output_dir>/<name>_mask.png`` is a uint8 label map (each object's label, later prompts
    on top); ``<output_dir>/predictions.json`` lists per image the route (layer or plain-SAM fallback), the
    predicted IoU and area per object, and the images skipped or failed.

    Args:
        predictor: the bundle's predictor.
        input_dir: folder of images.
        output_dir: folder for the masks (created).
        layer: "auto" (router), "none" (plain SAM) or a layer name; a prompt file's "layer" overrides it.
        mask_value: when set (e.g. 255), write binary masks with this value instead of label maps.
        strict: raise at the end when any image failed (default: record it and go on).
    """

    def __init__(self, predictor: CASAMPredictor, input_dir: Union[str, Path], output_dir: Union[str, Path],
                 layer: str = AUTO, mask_value: Optional[int] = None, strict: bool = False):
        self.predictor = predictor
        self.input_dir = Path(input_dir)
        self.output_dir = Path(output_dir)
        self.layer = layer or AUTO
        self.mask_value = None if mask_value in (None, "", 0) else int(mask_value)
        self.strict = bool(strict)

    def prompts_for(self, image_path: Path) -> Tuple[List[Dict[str, Any]], Optional[str], str]:
        """Returns (prompts, layer override, source) for one image; source is "json", "label" or "none"."""
        js = image_path.with_suffix(".json")
        if js.is_file():
            prompts, layer = parse_prompt_file(js)
            return prompts, layer, "json"
        lab = _find_label(image_path)
        if lab is not None:
            return prompts_from_label(read_mask(lab)), None, "label"
        return [], None, "none"

    def segment(self, image: np.ndarray, prompts: Sequence[Dict[str, Any]], layer: str = AUTO,
                key: Optional[str] = None) -> Tuple[np.ndarray, Routing, List[Dict[str, Any]]]:
        """Segments the prompts of one image.

        Returns:
            (H×W uint8 label map, route, per-prompt results ``{"label", "iou", "area"}``).
        """
        emb = self.predictor.embed(image, key)
        route = self.predictor.route(emb, layer)
        out = np.zeros(emb.geom.orig_hw, np.uint8)
        results = []
        for p in prompts:
            pred = self.predictor.predict(emb, p.get("points"), p.get("point_labels"), p.get("box"), route=route)
            out[pred.mask > 0] = p["label"]
            results.append({"label": p["label"], "iou": round(pred.iou, 4), "area": int(pred.mask.sum())})
        return out, route, results

    def run(self) -> Dict[str, Any]:
        """Processes the folder.

        Returns:
            The summary written to ``predictions.json``.

        Raises:
            CasamError: the input folder is missing or holds no image; with ``strict``, any failed image.
        """
        if not self.input_dir.is_dir():
            raise CasamError(f"input folder not found: {self.input_dir} (set --dataset_dir)")
        images = _image_files(self.input_dir)
        if not images:
            raise CasamError(f"no images in {self.input_dir} (expected .png/.jpg/.tif/.bmp/.npy)")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary: Dict[str, Any] = {"bundle_layers": [i.name for i in self.predictor.layers], "images": [],
                                   "skipped": [], "errors": []}
        t0 = time.time()
        for path in images:
            try:
                prompts, layer, source = self.prompts_for(path)
                if not prompts:
                    reason = f"no {path.stem}.json and no {path.stem}{LABEL_SUFFIX}.* beside it"
                    summary["skipped"].append({"image": path.name, "reason": reason})
                    logger.warning("skipped %s: no prompts", path.name)
                    continue
                image = read_image(path)
                label_map, route, results = self.segment(image, prompts, layer or self.layer, key=str(path.resolve()))
                if self.mask_value is not None:
                    label_map = ((label_map > 0) * self.mask_value).astype(np.uint8)
                out = self.output_dir / f"{path.stem}{MASK_SUFFIX}.png"
                _save_png(label_map, out)
                summary["images"].append(
                    {
                        "image": path.name,
                        "mask": out.name,
                        "prompt_source": source,
                        "objects": results,
                        **route.to_dict(("layer", "fallback", "score", "tau")),
                    }
                )
                logger.info("%s: %d object(s), layer %s", path.name, len(results), route.layer or "none (plain SAM)")
            except (CasamError, OSError, ValueError) as e:
                summary["errors"].append({"image": path.name, "error": str(e)})
                logger.error("%s: %s", path.name, e)
        summary["seconds"] = round(time.time() - t0, 2)
        (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if summary["errors"] and (self.strict or not summary["images"]):
            raise CasamError(
                f"{len(summary['errors'])} image(s) failed, e.g. {summary['errors'][0]}; "
                f"see {self.output_dir / SUMMARY_FILE}"
            )
        return summary


def _save_png(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(mask).save(tmp, format="PNG")
    os.replace(tmp, path)
