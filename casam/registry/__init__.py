"""The layer store: one folder per institution's layer, and the gate's rule for serving a layer."""

from __future__ import annotations

from casam.registry.evidence import decide
from casam.registry.store import (
    CORRECTIONS,
    LAYER_FORMAT,
    LayerInfo,
    LayerRegistry,
    in_order,
    remove_incomplete,
    slug,
    writer_lock,
)
