"""Thin hooks on MONAI Label 0.8.5's endpoint functions (the FastAPI routes look them up at call time).

:func:`wrap_endpoint` puts a check before, and/or a callback after, one endpoint function, once per tag.
:func:`install_open_hooks` tells the app which datastore image a client has just opened: downloaded
(``GET /datastore/image``) or uploaded (``PUT /datastore/image``); a next sample (``POST /activelearning``)
is seen by the app's own ``next_sample``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Dict, Optional

log = logging.getLogger(__name__)
_on_open: Dict[str, Optional[Callable[[str], None]]] = {"callback": None}


def wrap_endpoint(module: Any, name: str, tag: str, before: Optional[Callable[..., None]] = None,
                  after: Optional[Callable[..., None]] = None) -> None:
    """Wraps ``module.name`` (idempotent per ``tag``).

    Args:
        module: a MONAI Label endpoint module.
        name: the function's name in it.
        tag: marks the wrapper, so installing the same wrapper twice does nothing.
        before: called with the call's arguments by name; may raise (e.g. an HTTPException) to refuse the call.
        after: called with the result and the arguments by name, after a call that succeeded; its errors are
            logged, never passed to the client.
    """
    orig = getattr(module, name)
    if getattr(orig, tag, False):
        return
    signature = inspect.signature(orig)

    @functools.wraps(orig)
    def wrapped(*args, **kwargs):
        named = dict(signature.bind_partial(*args, **kwargs).arguments)
        if before is not None:
            before(**named)
        result = orig(*args, **kwargs)
        if after is not None:
            try:
                after(result, **named)
            except Exception as e:  # a hook never fails the request
                log.warning("%s hook on %s failed: %s", tag, name, e)
        return result

    setattr(wrapped, tag, True)
    setattr(module, name, wrapped)


def install_open_hooks(on_open: Optional[Callable[[str], None]]) -> None:
    """Calls ``on_open(image_id)`` after a client downloaded or uploaded a datastore image.

    Args:
        on_open: the callback (the latest installed one is used), or None to stop calling it.
    """
    from monailabel.endpoints import datastore as ds_ep

    _on_open["callback"] = on_open

    def opened(image_id: Any) -> None:
        callback = _on_open["callback"]
        if callback is not None and isinstance(image_id, str):
            callback(image_id)

    def downloaded(result: Any, image: str = "", check_only: bool = False, **_) -> None:
        if not check_only:
            opened(image)

    def uploaded(result: Any, **_) -> None:
        opened(result.get("image") if isinstance(result, dict) else None)

    wrap_endpoint(ds_ep, "download_image", "casam_opened", after=downloaded)
    wrap_endpoint(ds_ep, "add_image", "casam_opened", after=uploaded)
