"""Labelled samples: images encoded once (a disk cache of embeddings) with the masks a prompt is scored against."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from casam.errors import ImageError
from casam.model.backbone import Backbone
from casam.model.head import image_tensor
from casam.model.preprocess import (
    Geometry,
    Window,
    box_to_model,
    geometry_for,
    mask_to_model,
    points_to_model,
)
from casam.model.router import (
    pool_embedding,
)
from casam.prompts.masks import binary_masks, central_pixels, tight_box


@dataclass
class Target:
    """One mask of one image, ready for training and evaluation."""

    cls: int
    lowres: torch.Tensor  # L×L float 0/1 in the padded model frame
    box: np.ndarray  # tight box, model frame
    central: np.ndarray  # central half of the pixels, model frame, nearest the centroid first
    mask: np.ndarray  # H×W bool at the original size


@dataclass
class Sample:
    """One image: embedding, geometry, pooled router feature, targets, patient."""

    embedding: torch.Tensor
    geom: Geometry
    feature: torch.Tensor
    targets: List[Target]
    patient: str
    key: str = ""
    image: Optional[torch.Tensor] = None  # the refinement head's view (casam.model.head.image_tensor), float16


def make_samples(backbone: Backbone, images: Sequence[np.ndarray], masks: Sequence[Optional[np.ndarray]],
                 patients: Optional[Sequence[str]] = None, cache: Optional[EmbeddingCache] = None,
                 window: Window = "auto", progress: bool = False, desc: str = "encode") -> List[Sample]:
    """Encodes images (through the cache) and prepares their masks.

    Args:
        backbone: frozen backbone.
        images: images (H×W or H×W×C).
        masks: label maps of the same H×W (class ids, 0 = background), or None for unlabelled images.
        patients: patient id per image (default: one patient per image).
        cache: embedding cache (default: a memory-only one).
        window: intensity window.
        progress: show a progress bar.

    Returns:
        One Sample per image.

    Raises:
        ImageError: an image and its mask differ in size.
    """
    if cache is None:
        cache = EmbeddingCache(backbone)
    patients = list(patients) if patients is not None else [str(i) for i in range(len(images))]
    L = backbone.lowres_size
    out = []
    it: Iterable = range(len(images))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=desc, unit="img")
    for i in it:
        img, lab = images[i], masks[i]
        z, geom = cache.get(img, window)
        targets = []
        if lab is not None:
            if np.asarray(lab).shape[:2] != np.asarray(img).shape[:2]:
                raise ImageError(f"image {i}: mask {np.asarray(lab).shape[:2]} and image {np.asarray(img).shape[:2]} "
                                 "differ in size")
            for c, m in binary_masks(lab):
                targets.append(Target(c, mask_to_model(m, geom, L), box_to_model(tight_box(m), geom),
                                      points_to_model(central_pixels(m), geom), m))
        out.append(Sample(z, geom, pool_embedding(z[None])[0], targets, patients[i], cache.key(img, window),
                          image_tensor(img, window).half()))
    return out


class EmbeddingCache:
    """Frozen-encoder embeddings, computed once per image.

    Args:
        backbone: the backbone (its hash is part of every key).
        folder: where to keep embeddings on disk (float16 ``.npy``); None keeps them only in memory.
    """

    def __init__(self, backbone: Backbone, folder: Optional[str | Path] = None):
        self.backbone = backbone
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._mem: Dict[str, torch.Tensor] = {}

    def key(self, image: np.ndarray, window: Window) -> str:
        """Content key of an image under this backbone and window."""
        arr = np.ascontiguousarray(image)
        h = hashlib.sha256()
        h.update(f"{self.backbone.hash}|{window}|{arr.shape}|{arr.dtype}".encode())
        h.update(arr.tobytes())
        return h.hexdigest()

    def get(self, image: np.ndarray, window: Window = "auto") -> Tuple[torch.Tensor, Geometry]:
        """Returns (embedding C×e×e float32 on CPU, geometry) of an image, encoding it on a miss."""
        geom = geometry_for(np.asarray(image).shape[:2], self.backbone.img_size)
        k = self.key(image, window)
        if k in self._mem:
            return self._mem[k].float(), geom
        path = self.folder / k[:2] / f"{k}.npy" if self.folder else None
        if path is not None and path.exists():
            try:
                z = torch.from_numpy(np.load(path))
                self._mem[k] = z
                return z.float(), geom
            except (OSError, ValueError):
                pass  # corrupt cache entry: recompute
        x, geom = self.backbone.prepare(image, window)
        z = self.backbone.encode(x)[0].cpu().half()
        self._mem[k] = z
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, z.numpy())
            os.replace(tmp, path)
        return z.float(), geom
