"""casam: Continual Alignment for SAM (CA-SAM).

A frozen SAM backbone, one small Alignment Layer (with its refinement head) per institution, and a VAE router
that picks the layer for each image or falls back to plain SAM for images unlike anything seen.

The public API, importable from here (each name is loaded on first use, so ``import casam`` stays light)::

    import casam
    from casam.paths import default_registry

    backbone = casam.load_backbone("litemedsam")
    predictor = casam.CASAMPredictor(backbone, registry=default_registry())
    answer = predictor.predict(image, box=[40, 30, 120, 110])  # answer.mask, answer.iou, answer.route

Subpackages, one concern each:

- :mod:`casam.model`: the networks (backbone, decoder, Alignment Layer, router VAE, refinement head).
- :mod:`casam.prompts`: boxes and points from masks; clicks answered through box proposals.
- :mod:`casam.registry`: the layer store and the gate's rule for serving a layer.
- :mod:`casam.data`: file formats, safe readers and label writers, DICOM attributes, datasets.
- :mod:`casam.scoring`: metrics, samples and how a prompt is scored.
- :mod:`casam.training`: an institution's layer, router entry and head; the online trainer.
- :mod:`casam.inference`: the predictor, routing, caches, volumes, background encoding.
- :mod:`casam.evaluation`: the continual benchmark and ``casam evaluate``.
- :mod:`casam.bundle`: the MONAI bundle.
- :mod:`casam.federated`: federated CA-SAM on NVFlare.
- :mod:`casam.paths` (locations from the environment), :mod:`casam.runtime` (device, process settings),
  :mod:`casam.errors`, and the ``casam`` command line (:mod:`casam.cli`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "load_backbone": "casam.model.backbone",
    "Backbone": "casam.model.backbone",
    "CASAMPredictor": "casam.inference.predictor",
    "Prediction": "casam.inference.predictor",
    "Routing": "casam.inference.routing",
    "segment_volume": "casam.inference.volume",
    "LayerRegistry": "casam.registry.store",
    "LayerInfo": "casam.registry.store",
    "ClickConfig": "casam.prompts.clicks",
    "TrainConfig": "casam.training.config",
    "train_layer": "casam.training.layer",
    "read_clinical": "casam.data.clinical",
    "write_label": "casam.data.clinical",
    "export_bundle": "casam.bundle.export",
    "resolve_device": "casam.runtime",
    "CasamError": "casam.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Loads a public name of :data:`_API` from its module on first use."""
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'casam' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_API))
