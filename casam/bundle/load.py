"""Loading an exported bundle: its backbone (weights checked against the manifest) and its predictor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch

from casam.bundle.check import read_bundle_manifest
from casam.errors import CasamError, RegistryError
from casam.inference.predictor import CASAMPredictor
from casam.model.backbone import (
    Backbone,
    load_backbone,
)
from casam.registry.store import LayerRegistry
from casam.runtime import resolve_device

logger = logging.getLogger("casam.bundle.export")


def _device(device: Optional[Union[str, torch.device]]) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(resolve_device(device))


def load_bundle_backbone(bundle_root: Union[str, Path], device: Optional[Union[str, torch.device]] = None) -> Backbone:
    """Builds the bundle's frozen backbone from ``models/`` and checks its weights' hash."""
    root = Path(bundle_root)
    info = read_bundle_manifest(root)["backbone"]
    weights = root / info["weights"] if info.get("weights") else None
    if weights is not None and not weights.is_file():
        raise CasamError(f"bundle backbone weights missing: {weights}")
    bb = load_backbone(info["name"], weights, _device(device))
    if bb.hash != info["sha256"]:
        raise RegistryError(
            f"bundle backbone {bb.id} does not match the manifest ({info['id']}): weights changed or corrupt"
        )
    return bb


def load_bundle_predictor(
    bundle_root: Union[str, Path] = ".",
    device: Optional[Union[str, torch.device]] = None,
    window: Any = "auto",
    cache_size: int = 4,
) -> CASAMPredictor:
    """Loads a bundle: its backbone and every active layer with the router, as a :class:`CASAMPredictor`.

    Args:
        bundle_root: bundle folder.
        device: torch device (None/"auto": CUDA when available).
        window: intensity window (see :func:`casam.model.preprocess.apply_window`).
        cache_size: embeddings kept in the LRU cache.

    Raises:
        CasamError: not an exported bundle. RegistryError: changed weights or layer files.
    """
    root = Path(bundle_root)
    bb = load_bundle_backbone(root, device)
    if isinstance(window, list):
        window = tuple(window)
    return CASAMPredictor(bb, LayerRegistry(root / "models"), cache_size=cache_size, window=window)
