"""Interactive CA-SAM inference: embed once, route, decode many prompts.

:class:`CASAMPredictor` serves a backbone with the active layers of a registry. For each image it computes
the frozen embedding once, routes it with the VAE router (or uses a layer the caller names), and decodes
points and/or a box into a mask at the image's original size.

Under a caller-given key (one image, or one slice of a volume) it keeps, bounded by bytes
(:class:`casam.inference.cache.ByteCache`): the frozen embedding and what each Alignment Layer makes of it
(``cache_bytes``), and every decoder answer per prompt (``decode_cache_bytes``), so a further click decodes
only the prompts it changes and a re-propagation through a volume decodes only the slices whose prompt
changed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from casam.errors import PromptError, UnknownLayerError
from casam.inference.cache import ByteCache, MiB
from casam.inference.routing import Routing
from casam.model.alignment import AlignmentLayer
from casam.model.backbone import Backbone
from casam.model.decoder import DecoderContext
from casam.model.head import corrective_clicks, image_tensor, refine, split_interaction
from casam.model.preprocess import (
    Geometry,
    Window,
    box_to_model,
    logits_to_image,
    points_to_model,
)
from casam.model.router import Router, pool_embedding
from casam.prompts.clicks import ClickConfig, decode_clicks
from casam.prompts.masks import BOX, CLICK
from casam.registry.store import CORRECTIONS, LayerInfo, LayerRegistry

# ``layer`` arguments: route with the VAE router, or plain SAM.
AUTO, NONE = "auto", "none"
# Prompts decoded per batch on a CPU: SAM's decoder costs more per prompt in larger batches there (same masks).
CPU_DECODE_BATCH = 1
# Default budgets of the two ByteCaches: embeddings and aligned embeddings, and decoder answers.
CACHE_MB, DECODE_CACHE_MB = 512, 64


@dataclass
class Embedding:
    """A frozen-encoder embedding with what is needed to decode on it.

    Attributes:
        z: 1×C×e×e embedding.
        geom: geometry of the image in the model input.
        feature: pooled router feature (C).
        key: the cache key it was stored under (or None).
        image: the image as a refinement head reads it (:func:`casam.model.head.image_tensor`, float16), or None.
    """

    z: torch.Tensor
    geom: Geometry
    feature: torch.Tensor
    key: Optional[str] = None
    image: Optional[torch.Tensor] = None


@dataclass
class Prediction:
    """Result of one prompt.

    Attributes:
        mask: H×W uint8 mask (0/1) at the original image size.
        iou: the decoder's predicted IoU.
        route: the layer chosen for the image and the one that decoded this prompt (``used``, None for plain
            SAM), gated for the prompt type (:class:`casam.inference.routing.Routing`).
    """

    mask: np.ndarray
    iou: float
    route: Routing = field(default_factory=Routing)


def check_prompts(hw: Sequence[int], points=None, point_labels=None, box=None):
    """Validates and normalises prompts for an image of size ``hw``.

    Args:
        hw: (height, width).
        points: N×2 (x, y) pixel coordinates, or None.
        point_labels: N labels (1 foreground, 0 background); default all 1.
        box: (x0, y0, x1, y1) inclusive pixel corners (a reversed pair is swapped), or None.

    Returns:
        (points N×2 float32 or None, labels N int64 or None, box (4,) float32 or None), the box clipped to the image.

    Raises:
        PromptError: no prompt, malformed prompt, point outside the image, box entirely outside it.
    """
    h, w = int(hw[0]), int(hw[1])
    pts = lab = bx = None
    if points is not None and len(points) > 0:
        try:
            pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        except ValueError as e:
            raise PromptError(f"points must be a list of (x, y) pairs, got {points!r}") from e
        lab = np.ones(len(pts), np.int64) if point_labels is None else np.asarray(point_labels, np.int64).reshape(-1)
        if len(lab) != len(pts):
            raise PromptError(f"{len(pts)} points but {len(lab)} point labels")
        if not set(np.unique(lab)) <= {0, 1}:
            raise PromptError("point labels must be 1 (foreground) or 0 (background)")
        bad = [(float(x), float(y)) for x, y in pts
               if not (0 <= x <= w - 1 and 0 <= y <= h - 1) or not np.isfinite([x, y]).all()]
        if bad:
            raise PromptError(f"point(s) {bad} outside the image (x in 0..{w - 1}, y in 0..{h - 1})")
    if box is not None and len(box) > 0:
        try:
            x0, y0, x1, y1 = [float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)]
        except ValueError as e:
            raise PromptError(f"box must be (x0, y0, x1, y1), got {box!r}") from e
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1 or not np.isfinite([x0, y0, x1, y1]).all():
            raise PromptError(f"box {(x0, y0, x1, y1)} lies outside the image ({w}×{h})")
        bx = np.array([max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)], np.float32)
    if bx is None and (lab is None or not (lab == 1).any()):
        raise PromptError("give a box or at least one foreground point")
    return pts, lab, bx


class CASAMPredictor:
    """Serves a frozen backbone with a registry's Alignment Layers and router.

    Args:
        backbone: frozen backbone.
        registry: a LayerRegistry, a registry folder, or None (plain SAM only).
        cache_size: at most this many embeddings and aligned embeddings are kept (None: bounded by bytes only).
        window: intensity window for images (see casam.model.preprocess.apply_window).
        clicks: how clicks become box prompts (see :mod:`casam.prompts.clicks`).
        cache_bytes: bytes of embeddings and aligned embeddings kept (4 MiB each for LiteMedSAM).
        decode_cache_bytes: bytes of decoder answers kept (256 KiB per prompt for LiteMedSAM).
    """

    def __init__(self, backbone: Backbone, registry: Union[LayerRegistry, str, Path, None] = None,
                 cache_size: Optional[int] = None, window: Window = "auto", clicks: Optional[ClickConfig] = None,
                 cache_bytes: int = CACHE_MB * MiB, decode_cache_bytes: int = DECODE_CACHE_MB * MiB):
        self.backbone = backbone
        self.clicks = clicks or ClickConfig()
        self.registry = LayerRegistry(registry) if isinstance(registry, (str, Path)) else registry
        self.window = window
        self._cache = ByteCache(cache_bytes, cache_size)
        self._decodes = ByteCache(decode_cache_bytes)
        self._lock = threading.RLock()
        self._layers: Dict[str, AlignmentLayer] = {}
        self._infos: List[LayerInfo] = []
        self._heads = False  # whether a served layer has a refinement head (then embeddings keep the image's view)
        self.router = Router()
        self.reload()

    # ------------------------------------------------------------------ layers
    def reload(self) -> List[LayerInfo]:
        """Re-reads the registry: new layers are served from now on, removed ones no longer.

        Returns:
            The active layers.

        Raises:
            RegistryError: a layer fails its checksum or was trained on another backbone.
        """
        with self._lock:
            if self.registry is None:
                self._infos, self.router = [], Router()
                return []
            infos = self.registry.active()
            vaes, layers = [], {}
            for info in infos:
                layer, vae, _ = self.registry.load(info.name, self.backbone)
                layers[info.name] = layer.to(self.backbone.device)
                vaes.append(vae)
            self._infos, self._layers = infos, layers
            self._heads = any(getattr(m, "head", None) is not None for m in layers.values())
            self.router = Router(vaes, [i.tau for i in infos])
            self._cache.discard(lambda k: k[0] == "aligned")  # a layer name may now hold other weights
            self._decodes.clear()
            self._signature = self.registry.signature()
            return list(infos)

    def refresh(self) -> bool:
        """Reloads the registry if a layer was added or removed since the last load (e.g. by a trainer process).

        Returns:
            True when the layers were reloaded.
        """
        if self.registry is None:
            return False
        with self._lock:
            if self.registry.signature() == getattr(self, "_signature", None):
                return False
            self.reload()
            return True

    @property
    def layers(self) -> List[LayerInfo]:
        """The active layers, in the order they were added."""
        return list(self._infos)

    def layer(self, name: str) -> AlignmentLayer:
        """Returns a layer by name (active or an older version), loading it if needed.

        Raises:
            UnknownLayerError: no such layer.
        """
        with self._lock:
            if name not in self._layers:
                if self.registry is None:
                    raise UnknownLayerError(f"unknown layer {name!r}: no registry")
                layer, _, _ = self.registry.load(name, self.backbone)
                self._layers[name] = layer.to(self.backbone.device)
            return self._layers[name]

    # --------------------------------------------------------------- embedding
    def embed(self, image: Union[np.ndarray, Embedding], key: Optional[str] = None) -> Embedding:
        """Embeds an image (or returns the cached embedding stored under ``key``).

        A thread asking for a key another thread is encoding waits for that embedding instead of encoding twice.

        Args:
            image: H×W or H×W×C image, or an Embedding (returned as is).
            key: cache key (e.g. image id + slice + backbone); None = no caching.

        Returns:
            The embedding.

        Raises:
            ImageError: not an image.
        """
        if isinstance(image, Embedding):
            return image

        def compute() -> Embedding:
            x, geom = self.backbone.prepare(image, self.window)
            z = self.backbone.encode(x)
            view = image_tensor(image, self.window).half() if self._heads else None  # only a head reads it
            return Embedding(z, geom, pool_embedding(z)[0].cpu(), key, view)

        if key is None:
            return compute()
        return self._cache.get_or_compute(("emb", key), compute)[0]

    def cached(self, key: str) -> bool:
        """True when an embedding is cached under ``key``."""
        return ("emb", key) in self._cache

    def awaited(self, key: str) -> bool:
        """True while a thread waits for another thread's embedding of ``key`` (e.g. a click for the background's)."""
        return self._cache.awaited(("emb", key))

    def cache_stats(self) -> Dict[str, Dict[str, int]]:
        """Entries, bytes, budget, hits, misses and evictions of the embedding and the decode caches."""
        return {"embeddings": self._cache.stats(), "decodes": self._decodes.stats()}

    def aligned(self, emb: Embedding, layer: Optional[str]) -> torch.Tensor:
        """The embedding as a layer makes it (cached per image key and layer); plain SAM's for ``layer=None``.

        Raises:
            UnknownLayerError: unknown layer.
        """
        if layer is None:
            return emb.z
        if emb.key is None:
            return self.layer(layer)(emb.z)
        return self._cache.get_or_compute(("aligned", emb.key, layer), lambda: self.layer(layer)(emb.z))[0]

    def _decode_batches(self, z: torch.Tensor, points=None, labels=None, boxes=None,
                        context: Optional[DecoderContext] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`casam.model.backbone.Backbone.decode`, in batches of at most :data:`CPU_DECODE_BATCH` prompts on
        a CPU, on one decoder context of ``z`` (made here when not given)."""
        rows = [t for t in (points, labels, boxes) if t is not None]
        ctx = context if context is not None else self.backbone.decoder_context(z)
        n, step = len(rows[0]), CPU_DECODE_BATCH if z.device.type == "cpu" else len(rows[0])
        parts = [self.backbone.decode(None, *[None if t is None else t[i : i + step] for t in (points, labels, boxes)],
                                      context=ctx) for i in range(0, n, step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def decoder(self, z: torch.Tensor, key: Optional[Tuple]) -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
        """``decode(points, labels, boxes)`` on ``z`` that answers prompts it has seen on ``key`` from the cache.

        Prompts not seen yet are decoded in batches of :data:`CPU_DECODE_BATCH` on a CPU (all at once on a GPU);
        each prompt's answer (logits 1×L×L and predicted IoU) is stored under ``key`` + the prompt's exact
        coordinates.

        Args:
            z: the (possibly aligned) embedding.
            key: what ``z`` is (image key, layer), or None (no caching).

        Returns:
            A function with the signature of :meth:`casam.model.backbone.Backbone.decode` minus the embedding.
        """
        if key is None:
            return partial(self._decode_batches, z)
        ctx: List[DecoderContext] = []  # the decoder's image-side work, done at the first prompt not cached

        def decode(points=None, labels=None, boxes=None):
            rows = [t for t in (points, labels, boxes) if t is not None]
            n = len(rows[0])
            keys = [key + tuple(np.asarray(t[i].detach().cpu(), np.float32).tobytes() for t in rows) for i in range(n)]
            out = [self._decodes.get(k) for k in keys]
            todo = [i for i, o in enumerate(out) if o is None]
            if todo:
                pick = torch.tensor(todo)
                sel = [None if t is None else t[pick] for t in (points, labels, boxes)]
                if not ctx:
                    ctx.append(self.backbone.decoder_context(z))
                logits, iou = self._decode_batches(z, *sel, context=ctx[0])
                for j, i in enumerate(todo):
                    out[i] = (logits[j : j + 1].clone(), iou[j : j + 1].clone())
                    self._decodes.put(keys[i], out[i])
            return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

        return decode

    # ----------------------------------------------------------------- routing
    def route(self, emb: Embedding, layer: str = AUTO) -> Routing:
        """Chooses the layer for an embedding.

        Args:
            emb: the embedding.
            layer: "auto" (router), "none" (plain SAM) or a layer name (forced; inactive versions too).

        Returns:
            The routing, not yet gated for a prompt type.

        Raises:
            UnknownLayerError: an unknown layer name.
        """
        with self._lock:
            infos, router = list(self._infos), self.router
        raw = router.route(emb.feature)
        if layer in (None, "", AUTO, NONE):
            return Routing.decide(raw, infos, plain=layer == NONE)
        if self.registry is None:
            raise UnknownLayerError(f"unknown layer {layer!r}: no registry")
        return Routing.decide(raw, infos, forced=self.registry.get(layer))

    # --------------------------------------------------------------- predicting
    @torch.no_grad()
    def predict(self, image: Union[np.ndarray, Embedding], points=None, point_labels=None, box=None, layer: str = AUTO,
                key: Optional[str] = None, route: Optional[Routing] = None) -> Prediction:
        """Segments one object from points and/or a box.

        Args:
            image: H×W or H×W×C image, or its Embedding.
            points: N×2 (x = column, y = row) pixel coordinates.
            point_labels: N labels (1 foreground, 0 background).
            box: (x0, y0, x1, y1) inclusive pixel corners.
            layer: "auto", "none" or a layer name.
            key: embedding cache key.
            route: a routing to reuse (skips routing; e.g. for every slice of a volume); it is gated again.

        Clicks without a box are answered through box proposals (:func:`casam.prompts.clicks.decode_clicks`); with a
        box, the box is the prompt and clicks edit it. The routed layer decodes only for the prompt types
        where it beat plain SAM on validation (:meth:`gate`); the Prediction's ``route`` tells ``prompt``,
        ``used`` and ``reason``.

        Returns:
            The Prediction.

        Raises:
            PromptError: bad prompts. UnknownLayerError: unknown layer. ImageError: bad image.
        """
        emb = self.embed(image, key)
        pts, lab, bx = check_prompts(emb.geom.orig_hw, points, point_labels, box)
        kind = BOX if bx is not None else CLICK
        r = self.gate(route if route is not None else self.route(emb, layer), kind)
        if corrective_clicks(pts, lab, bx is not None)[0] is not None:
            r = self.gate_corrections(r)
        decode = self.decoder(self.aligned(emb, r.used), None if emb.key is None else ("dec", emb.key, r.used))
        tb = torch.from_numpy(box_to_model(bx, emb.geom)) if bx is not None else None
        head = getattr(self.layer(r.used), "head", None) if r.used is not None else None
        view = None
        if head is not None:  # the institution's refinement head reads the image at its own resolution
            view = emb.image if emb.image is not None else (
                image_tensor(image, self.window).half() if isinstance(image, np.ndarray) else None)
        # a head that reads clicks answers SAM's answer to the first prompt together with every click
        (dpts, dlab), edits = split_interaction(head, view, pts, lab, bx is not None)
        if dpts is None:
            logits, iou = decode(None, None, tb[None])
        else:
            logits, iou, click = decode_clicks(decode, points_to_model(dpts, emb.geom), dlab,
                                               emb.geom.resized_hw, self.backbone.img_size,
                                               self.backbone.lowres_size, self.clicks,
                                               None if tb is None else tb.numpy())
            r = replace(r, click=click)
        full = logits_to_image(logits[0, 0].cpu(), emb.geom)
        if head is not None:
            full = refine(head, None if view is None else view.float(), full, *edits)
        return Prediction((full > 0).numpy().astype(np.uint8), float(iou[0, 0]), r)

    def gate_corrections(self, route: Routing) -> Routing:
        """Whether the layer chosen for a request's first prompt also answers its corrective clicks: only where its
        validation click sequences were at least plain SAM's at every step
        (:meth:`casam.registry.store.LayerInfo.serves` with :data:`casam.registry.store.CORRECTIONS`). A named layer
        always answers.

        Args:
            route: the routing gated for the first prompt (:meth:`gate`).

        Returns:
            The routing, with ``used`` None and the reason when plain SAM answers.
        """
        if route.used is None or route.forced:
            return route
        info = self._info(route.used)
        if info is None or info.serves(CORRECTIONS):
            return route
        why = f"{route.used} did not answer corrective clicks as well as plain SAM in validation: plain SAM"
        return replace(route, used=None, reason=why)

    def gate(self, route: Routing, prompt: str) -> Routing:
        """Whether the routed layer is used for a prompt type: only where it beat plain SAM on its validation split
        (:meth:`casam.inference.routing.Routing.gated`). A layer the caller named (``forced``) is always used.

        Args:
            route: a routing (see :meth:`route`).
            prompt: ``box`` or ``click``.

        Returns:
            The routing with ``prompt``, ``used`` (the layer that decodes, or None for plain SAM) and ``reason``.
        """
        return route.gated(prompt, self._info(route.layer))

    def _info(self, name: Optional[str]) -> Optional[LayerInfo]:
        """The served LayerInfo of a layer name, or None when it is not served."""
        with self._lock:
            return next((i for i in self._infos if i.name == name), None)

    def novelty(self, image: Union[np.ndarray, Embedding], key: Optional[str] = None) -> Dict[str, Any]:
        """How unlike every known institution an image is (for active learning).

        Returns:
            dict with ``layer`` (nearest layer or None), ``score``, ``tau`` and ``ratio`` = score / τ of the
            nearest layer (> 1: no layer fits; None when the registry is empty).
        """
        emb = self.embed(image, key)
        with self._lock:
            infos, router = list(self._infos), self.router
        if not infos:
            return {"layer": None, "score": None, "tau": None, "ratio": None}
        r = router.route(emb.feature)
        info, s = infos[r.best], r.scores[r.best]
        return {"layer": info.name, "score": float(s), "tau": info.tau,
                "ratio": float(s / info.tau) if info.tau > 0 else float("inf")}
