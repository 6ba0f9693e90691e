"""A disk cache of frozen-encoder embeddings, so each training image is encoded once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from casam.model.backbone import Backbone
from casam.model.preprocess import (
    Geometry,
    Window,
    geometry_for,
)


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
