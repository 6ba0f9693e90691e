"""Changes to MONAI Label 0.8.5's routes: ``POST /infer`` off the event loop, the bundled OHIF's nested files.

MONAI Label's endpoints are ``async`` functions that call its blocking code, so a segmentation ran on the
server's event loop, which answered nothing else meanwhile (not ``/info``, not an upload, not another
click). :func:`install_threaded_infer` serves ``POST /infer/{model}`` from Starlette's thread pool instead;
``max_concurrent_infers`` still bounds how many are segmented at once.

MONAI Label's ``GET /ohif/{path}`` (``monailabel.endpoints.ohif.get_ohif``) turns every ``/`` of the path into
``os.pathsep`` (``:`` on Linux), so a file in a folder of the bundled OHIF viewer (``assets/favicon-32x32.png``)
is never found and ``index.html`` comes back in its place. :func:`install_ohif_assets_fix` serves such files.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Callable

OHIF_FIX = "casam_ohif_assets"  # marks the installed get_ohif (its module outlives the app's, POST /reload)


def ohif_files(original: Callable[[str], Any], root: str) -> Callable[[str], Any]:
    """``get_ohif`` that serves the file ``path`` names under ``root`` itself, in any subfolder.

    Args:
        original: MONAI Label's ``get_ohif``, called for anything else (``index.html`` for a viewer route, 404).
        root: the bundled OHIF's folder.

    Returns:
        The function to put in place of ``get_ohif``. It raises ``HTTPException`` 404 for a path that leaves
        ``root`` (``../``, an absolute path, a link out of it).
    """
    from fastapi import HTTPException
    from fastapi.responses import FileResponse
    from monailabel.utils.others.generic import get_mime_type

    root = os.path.realpath(root)

    def get_ohif(path: str):
        if path:
            file = os.path.realpath(os.path.join(root, path))
            if file != root and not file.startswith(root + os.sep):
                raise HTTPException(status_code=404, detail="Resource NOT Found")
            if os.path.isfile(file):
                return FileResponse(file, media_type=get_mime_type(file))
        return original(path)

    setattr(get_ohif, OHIF_FIX, True)
    get_ohif.__wrapped__ = original  # type: ignore[attr-defined]
    return get_ohif


def install_ohif_assets_fix() -> bool:
    """Serves the bundled OHIF's files in subfolders (``/ohif/assets/...``) as themselves (idempotent).

    ``api_get_ohif``, the route's endpoint, looks ``get_ohif`` up in its module at call time, so replacing the
    module's function is enough.

    Returns:
        True when installed now, False when it already was.
    """
    from monailabel.endpoints import ohif as ohif_ep

    if getattr(ohif_ep.get_ohif, OHIF_FIX, False):
        return False
    root = os.path.join(os.path.dirname(os.path.realpath(ohif_ep.__file__)), "static", "ohif")
    ohif_ep.get_ohif = ohif_files(ohif_ep.get_ohif, root)
    return True


def install_threaded_infer() -> bool:
    """Serves MONAI Label's ``POST /infer/{model}`` from Starlette's thread pool, not the event loop (idempotent).

    The route's endpoint (``api_run_inference``) is replaced by a plain function with the same parameters (so
    the same form fields, query and authentication) that calls ``monailabel.endpoints.infer.run_inference``
    as MONAI Label's ``async`` one does: FastAPI runs plain functions in its thread pool. The route is replaced
    in the infer router (FastAPI >= 0.16x reads included routers' routes from them) and in the app's routes
    (older FastAPI copied them there).

    Returns:
        False when MONAI Label's server app is not loaded or no route was found.
    """
    server = sys.modules.get("monailabel.app")
    if server is None:
        return False
    from fastapi.routing import APIRoute
    from monailabel.endpoints import infer as infer_ep

    def threaded(background_tasks, model, image="", session_id="", params="{}", file=None, label=None,
                 output=None, user=None):
        return infer_ep.run_inference(background_tasks, model, image, session_id, params, file, label, output)

    threaded.__signature__ = inspect.signature(infer_ep.api_run_inference)  # FastAPI reads the parameters here
    threaded.casam_threaded = True
    found = False
    for router in (infer_ep.router, server.app.router):
        for i, route in enumerate(router.routes):
            if isinstance(route, APIRoute) and getattr(route.endpoint, "casam_threaded", False):
                found = True
            elif isinstance(route, APIRoute) and route.endpoint is infer_ep.api_run_inference:
                router.routes[i] = APIRoute(route.path, threaded, methods=list(route.methods), name=route.name,
                                            summary=route.summary, tags=route.tags, dependencies=route.dependencies,
                                            responses=route.responses, response_class=route.response_class,
                                            include_in_schema=route.include_in_schema)
                found = True
                if hasattr(router, "_mark_routes_changed"):  # FastAPI caches what it derived from the routes
                    router._mark_routes_changed()
    return found
