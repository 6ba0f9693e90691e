"""Background encoding: embed an image's slices as soon as a client opens it, before the first click.

:class:`Prefetcher` runs one daemon thread that encodes one job at a time into the predictor's in-memory
embedding cache (a :class:`casam.inference.cache.ByteCache`), under the same keys a click uses
(:func:`image_key`), so the click finds them there (or waits for the slice being encoded instead of encoding
it twice). It never competes with a click: before each slice it
waits until no request is in flight (:meth:`Prefetcher.foreground`), and a slice being encoded when a request
comes pauses between the encoder's blocks until the request ends (:func:`install_pause_points`). A newer job
replaces a queued one and stops the job being encoded after its current slice (the client has moved on). A
volume's slices are encoded from the middle outwards (where a viewer opens it) — or, once a click came,
outwards from the clicked slice (:meth:`Prefetcher.submit` with ``centre``: a click whose propagation ran
out of time finds them next time) — at most ``max_slices`` of them and at most half of the embedding cache,
so it never evicts what a click needs. The caller decides which files a job may read (``locate``): the app
gives datastore images only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from casam.data.clinical import read_clinical
from casam.data.safety import ImageLimits

log = logging.getLogger(__name__)
_worker = threading.local()  # ``pause``: set in a background encoder's thread only


def _pause_point(module: Any, args: Any) -> None:
    pause = getattr(_worker, "pause", None)
    if pause is not None:
        pause()


def install_pause_points(encoder: Any) -> int:
    """Lets a background thread's encode pause between an encoder's blocks (idempotent; other threads never pause).

    A forward pre-hook on every element of the encoder's ``ModuleList`` / ``Sequential`` containers calls the
    calling thread's pause function, if it has one (:class:`Prefetcher` sets it in its worker).

    Args:
        encoder: the image encoder (an ``nn.Module``).

    Returns:
        The number of pause points (0 when they were installed before).
    """
    import torch.nn as nn

    if getattr(encoder, "_casam_pause_points", False):
        return 0
    n = 0
    for m in encoder.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            for child in m:
                child.register_forward_pre_hook(_pause_point)
                n += 1
    encoder._casam_pause_points = True
    return n


def image_key(backbone_id: str, path: str) -> str:
    """The cache key of an image file: backbone, real path, modification time and size (a changed file is new).

    Args:
        backbone_id: :attr:`casam.model.backbone.Backbone.id`.
        path: the image file (or DICOM folder).

    Returns:
        The key; a volume's slice ``i`` is cached under ``f"{key}:{i}"``.
    """
    st = os.stat(path)
    return f"{backbone_id}:{os.path.realpath(path)}:{st.st_mtime_ns}:{st.st_size}"


def middle_out(depth: int, n: int, centre: Optional[int] = None) -> List[int]:
    """The ``n`` slices nearest ``centre`` (default: the middle) of a volume of ``depth`` slices, centre first, then
    alternately outwards."""
    mid = depth // 2 if centre is None else min(max(0, int(centre)), depth - 1)
    order = [mid]
    for step in range(1, depth):
        order += [i for i in (mid - step, mid + step) if 0 <= i < depth]
    return order[: max(0, n)]


class Prefetcher:
    """Encodes opened images in one background thread.

    Args:
        predictor: returns the CA-SAM predictor (called in the worker thread; it may load the backbone).
        locate: image id → (path, name); raises for an id it does not serve (never called for other files).
        limits: size limits for reading an image.
        max_slices: at most this many slices of a volume are encoded per job.
    """

    def __init__(self, predictor: Callable[[], Any], locate: Callable[[str], Tuple[str, str]],
                 limits: Optional[ImageLimits] = None, max_slices: int = 64):
        self._predictor, self._locate = predictor, locate
        self.limits, self.max_slices = limits or ImageLimits(), int(max_slices)
        self._cond = threading.Condition()
        self._next: Optional[str] = None  # the one queued job (image id): a newer one replaces it
        self._centre: Dict[str, int] = {}  # image id → slice to encode outwards from (the latest click's)
        self._encoding: Tuple[Optional[str], Any] = (None, None)  # (cache key, predictor) of the slice being encoded
        self._busy = 0  # requests in flight
        self._current: Optional[str] = None
        self._closed = False
        self.done: Dict[str, int] = {}  # image id → slices encoded (the last 32 jobs)
        self.errors: Dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="casam-prefetch", daemon=True)
        self._thread.start()

    def submit(self, image_id: str, centre: Optional[int] = None) -> None:
        """Queues an image for encoding (it replaces a queued one and stops the current one after its slice).

        Args:
            image_id: a datastore image id.
            centre: a volume's slice to encode outwards from (a clicked slice); the image's job, queued or
                running, follows it from its next slice on. None: the middle, or the centre given before.
        """
        if not isinstance(image_id, str) or not image_id:
            return
        with self._cond:
            if centre is not None:
                self._centre = {image_id: int(centre)}  # one image at a time: an older image's centre is dropped
            if image_id != self._current:
                self._next = image_id
            self._cond.notify_all()

    @contextlib.contextmanager
    def foreground(self) -> Iterator[None]:
        """Marks a request in flight: the worker starts no slice until it ends."""
        with self._cond:
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def status(self) -> Dict[str, Any]:
        """What the worker does: ``current`` and ``queued`` image ids, ``idle``, and ``done`` (slices per image)."""
        with self._cond:
            return {"current": self._current, "queued": self._next,
                    "idle": self._current is None and self._next is None,
                    "done": dict(self.done), "errors": dict(self.errors)}

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Waits until no job is queued or running.

        Returns:
            True when idle, False after ``timeout`` seconds.
        """
        end = time.monotonic() + timeout
        with self._cond:
            while self._current is not None or self._next is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Stops the worker after its current slice."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _take(self) -> Optional[str]:
        with self._cond:
            while self._next is None and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self._current, self._next = self._next, None
            return self._current

    def _may_continue(self, image_id: str) -> bool:
        """Waits while requests are in flight; False when a newer job or close() came."""
        with self._cond:
            while self._busy and not self._closed and self._next is None:
                self._cond.wait()
            return not self._closed and self._next is None and self._current == image_id

    def _wait_requests(self) -> None:
        """Blocks the worker while requests are in flight (called between the encoder's blocks), unless a request
        waits for the very slice being encoded (it then finishes it for them)."""
        with self._cond:
            slice_key, predictor = self._encoding
            while self._busy and not self._closed and not (slice_key and predictor.awaited(slice_key)):
                self._cond.wait(0.05)  # a request starting to wait for this slice does not notify: look again soon

    def _run(self) -> None:
        _worker.pause = self._wait_requests
        while True:
            image_id = self._take()
            if image_id is None:
                return
            n, err = 0, None
            try:
                n = self._encode(image_id)
                log.info("prefetch: %d slice(s) of %s encoded", n, image_id)
            except Exception as e:  # never let a client's image stop the worker
                err = f"{type(e).__name__}: {e}"
                log.warning("prefetch: %s not encoded: %s", image_id, e)
            with self._cond:
                if err is None:
                    self.done[image_id] = n
                else:
                    self.errors[image_id] = err
                for d in (self.done, self.errors):
                    while len(d) > 32:
                        d.pop(next(iter(d)))
                self._current = None
                self._cond.notify_all()

    def _embed(self, predictor: Any, image: Any, key: str) -> None:
        with self._cond:
            self._encoding = (key, predictor)
        try:
            predictor.embed(image, key)
        finally:
            with self._cond:
                self._encoding = (None, None)

    def _encode(self, image_id: str) -> int:
        if not self._may_continue(image_id):
            return 0
        path, name = self._locate(image_id)
        predictor = self._predictor()
        install_pause_points(predictor.backbone.sam.image_encoder)
        img = read_clinical(path, name=name, limits=self.limits)
        key = image_key(predictor.backbone.id, path)
        if not img.is_volume:
            self._embed(predictor, img.array, key)
            return 1
        per = 4 * predictor.backbone.embed_dim * predictor.backbone.embed_size ** 2
        fit = predictor.cache_stats()["embeddings"]["max_bytes"] // (2 * per)
        n, depth, window = 0, img.array.shape[0], min(self.max_slices, fit)
        while n < 2 * window and self._may_continue(image_id):  # 2×: a moved centre; never a loop on evictions
            with self._cond:
                centre = self._centre.get(image_id)
            todo = [i for i in middle_out(depth, window, centre) if not predictor.cached(f"{key}:{i}")]
            if not todo:
                break
            self._embed(predictor, img.array[todo[0]], f"{key}:{todo[0]}")
            n += 1
        return n
