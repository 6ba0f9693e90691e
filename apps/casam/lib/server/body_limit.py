"""An ASGI middleware in front of MONAI Label 0.8.5's FastAPI app (``monailabel.app.app``): bounded request bodies.

FastAPI parses a multipart upload into a temporary file (on disk past 1 MiB) before the endpoint's own size
check (:mod:`lib.server.endpoints`) sees it. :class:`BodyLimit` bounds the request body as it streams: a
``Content-Length`` over the bound is refused before anything is read, and a chunked (or lying) body is cut
off as soon as it passes the bound; both → 413 naming ``max_upload_mb``. The bound is ``max_upload_mb``
plus :data:`ENVELOPE` bytes for the form around the files. The middleware also refuses the paths of closed
endpoints (``/logs``: the server log names server folders) with 403.

MONAI Label builds the app's middleware stack when the server starts, before it creates the
:class:`MONAILabelApp` (in the startup event), and Starlette refuses ``add_middleware`` from then on:
:func:`install_body_limit` adds the middleware to the app's middleware list and rebuilds the stack instead.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import JSONResponse

ENVELOPE = 2**20  # bytes of a request allowed beyond max_upload_mb: form fields, part headers, boundaries
LOGS_CLOSED = "the server log is not served to clients (it names server folders); read it on the server, or " \
              "start the server with --conf expose_logs true"


class _TooLarge(Exception):
    """The body passed the bound while the app was reading it."""


class BodyLimit:
    """ASGI middleware: bounds request bodies, closes path prefixes.

    Args:
        app: the ASGI app behind the middleware.
        max_upload_bytes: ``max_upload_mb`` in bytes; bodies may have :data:`ENVELOPE` bytes more.
        closed: path prefixes answered 403 (each also closes the paths under it).
        closed_message: the 403's message.
    """

    def __init__(self, app: Any, max_upload_bytes: int, closed: Sequence[str] = (), closed_message: str = ""):
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body = max_upload_bytes + ENVELOPE
        self.closed = tuple(p.rstrip("/") for p in closed)
        self.closed_message = closed_message

    def too_large(self, n: int, more: bool) -> JSONResponse:
        """The 413 for a body of ``n`` bytes (``more``: at least ``n``, cut off there)."""
        mb = self.max_upload_bytes / 2**20
        return JSONResponse({"detail": f"request body has {'more than ' if more else ''}{n / 2**20:.2f} MB: over "
                                       f"the limit max_upload_mb = {round(mb, 3):g} (--conf max_upload_mb; "
                                       f"{ENVELOPE // 1024} KiB more allowed for the form around the files)"},
                            status_code=413)

    def is_closed(self, scope: dict) -> bool:
        """True for a request to a closed path prefix (``/logs``, ``/logs/``, ``/logs/gpu``)."""
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return any(path == p or path.startswith(p + "/") for p in self.closed)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.is_closed(scope):
            return await JSONResponse({"detail": self.closed_message}, status_code=403)(scope, receive, send)
        try:
            length: Optional[int] = int(Headers(scope=scope).get("content-length", ""))
        except ValueError:
            length = None
        if length is not None and length > self.max_body:
            return await self.too_large(length, False)(scope, receive, send)
        state = {"received": 0, "over": False, "started": False}

        async def bounded_receive() -> dict:
            if state["over"]:
                raise _TooLarge()
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    state["over"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: dict) -> None:
            if state["over"] and not state["started"]:
                return  # the app's answer to a body it could not finish reading: this middleware answers 413 instead
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await self.too_large(state["received"], True)(scope, receive, send)


def install_body_limit(max_upload_bytes: int, expose_logs: bool = False) -> bool:
    """Puts a :class:`BodyLimit` in front of MONAI Label's endpoints (replacing an earlier one).

    Args:
        max_upload_bytes: ``max_upload_mb`` in bytes.
        expose_logs: serve ``/logs`` (MONAI Label's log viewer and ``/logs/gpu``) instead of answering 403.

    Returns:
        False when MONAI Label's server app is not loaded (the app runs outside a server: nothing to bound).
    """
    server = sys.modules.get("monailabel.app")
    if server is None:
        return False
    from monailabel.config import settings

    app = server.app
    closed = () if expose_logs else (settings.MONAI_LABEL_API_STR + "/logs",)
    limit = Middleware(BodyLimit, max_upload_bytes=max_upload_bytes, closed=closed, closed_message=LOGS_CLOSED)
    # innermost user middleware: behind CORS, so a browser client (OHIF) can read the 413/403
    app.user_middleware = [m for m in app.user_middleware if m.cls is not BodyLimit] + [limit]
    if app.middleware_stack is not None:
        app.middleware_stack = app.build_middleware_stack()
    return True
