"""Serving prompts: the predictor over a registry, routing, caches, volumes and background encoding."""

from __future__ import annotations

from casam.inference.cache import ByteCache, nbytes
from casam.inference.predictor import CASAMPredictor, Embedding, Prediction, check_prompts
from casam.inference.prefetch import Prefetcher, image_key, install_pause_points, middle_out
from casam.inference.routing import Routing
from casam.inference.volume import segment_volume
