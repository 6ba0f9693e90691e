"""What the app does about faults of the machine it runs on: a full disk, a killed process, a corrupt layer.

* :func:`disk_full` tells a full disk (``ENOSPC``, ``EDQUOT``) from other ``OSError`` s; :func:`insufficient_storage`
  is the client's answer then: 507 Insufficient Storage, saying what was not stored, without a server path.
* :func:`atomic_copy` / :func:`atomic_write_text` write a file whole or not at all (a temporary file beside it,
  renamed into place), so a kill or a full disk leaves the earlier file as it was; :func:`remove_partials`
  removes the temporary files a killed writer left.
* :func:`pause` is a test-only hook: with ``CASAM_TEST_PAUSE_DIR`` set (never in production; unset, it does
  nothing), a process that reaches the stage named in ``$CASAM_TEST_PAUSE_DIR/at`` writes
  ``reached-<stage>`` there and waits (until a ``go`` file appears, at most 10 minutes), so that a test can
  kill the server at that stage deterministically (``tests/test_faults_kill.py``). :func:`install_training_pauses`
  puts the training's stages on it: ``encode`` (after 3 images were encoded), ``train`` (in the layer's epochs),
  ``head``, ``router``, ``validate`` (the click validation) and ``write`` (the registry write, after its first
  weight file); the datastore pauses at ``label`` (a label save, its file written, before it replaces the
  earlier one).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from fastapi import HTTPException

log = logging.getLogger(__name__)

PAUSE_ENV = "CASAM_TEST_PAUSE_DIR"
PARTIAL = ".casam-partial-"  # prefix of the temporary files of atomic_copy / atomic_write_text
PREVIOUS = PARTIAL + "previous-"  # the label a save replaces, kept until the save has finished
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_full(e: BaseException) -> bool:
    """True when ``e`` (or an error it was raised from) is a full disk or an exceeded quota."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if "No space left on device" in str(e) or "os error 28" in str(e):  # e.g. safetensors' own I/O error
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def insufficient_storage(what: str, kept: str = "") -> HTTPException:
    """The 507 answer to a write that found the disk full (no server path in it)."""
    return HTTPException(507, f"{what} not stored: the server's disk is full (no space left on device)"
                              f"{'; ' + kept if kept else ''}; ask the server's operator to free disk space, "
                              f"then try again")


def _partial(path: Path) -> Path:
    return path.parent / f"{PARTIAL}{uuid.uuid4().hex[:12]}-{path.name}"


def atomic_copy(src: str, dest: str) -> None:
    """Copies ``src`` to ``dest`` whole or not at all (an earlier ``dest`` is kept on any error, a kill included).

    Raises:
        OSError: the copy failed (its temporary file is removed).
    """
    dest_p = Path(dest)
    tmp = _partial(dest_p)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        pause("label")
        os.replace(tmp, dest_p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` whole or not at all.

    Raises:
        OSError: the write failed (its temporary file is removed; ``path`` is as it was).
    """
    path_p = Path(path)
    tmp = _partial(path_p)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path_p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_partials(folder: str) -> int:
    """Removes the temporary files of :func:`atomic_copy` / :func:`atomic_write_text` that a killed writer left
    under ``folder``, and puts back a label whose save did not finish (its :data:`PREVIOUS` copy); call it before
    anything writes there. Returns how many files it removed or put back."""
    n = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.startswith(PARTIAL):
                continue
            try:
                path, label = os.path.join(root, name), os.path.join(root, name[len(PREVIOUS):])
                if name.startswith(PREVIOUS) and not (os.path.exists(label) and os.path.samefile(path, label)):
                    os.replace(path, label)  # a label save that did not finish: its earlier label back
                else:  # (a rename onto a link of the same file would do nothing)
                    os.unlink(path)
                n += 1
            except OSError:
                pass
    if n:
        log.warning("casam: removed %d half-written datastore file(s) left by an interrupted write; the files they "
                    "were to replace are unchanged", n)
    return n


# --- the test-only pause hook -------------------------------------------------------------------------------
def pause(stage: str) -> None:
    """Waits here when ``$CASAM_TEST_PAUSE_DIR/at`` names ``stage`` (test only; nothing happens otherwise)."""
    folder = os.environ.get(PAUSE_ENV)
    if not folder:
        return
    d = Path(folder)
    try:
        wanted = (d / "at").read_text().strip()
    except OSError:
        return
    if wanted != stage:
        return
    (d / f"reached-{stage}").write_text(str(os.getpid()))
    log.warning("casam test hook: paused at %s (pid %d) until %s/go appears", stage, os.getpid(), d)
    end = time.time() + 600
    while not (d / "go").exists() and time.time() < end:
        time.sleep(0.1)


def install_training_pauses(monitor: Any) -> bool:
    """Puts a training's stages on :func:`pause` (only with ``CASAM_TEST_PAUSE_DIR`` set; call it in the training's
    process). Returns whether it installed them."""
    if not os.environ.get(PAUSE_ENV):
        return False
    import casam.registry.store as store
    import casam.training.layer as layer

    encoded, decoded = monitor._encoded, monitor._decoded

    def _encoded() -> None:
        encoded()
        if monitor.progress.get("encoded", 0) >= 3:
            pause("encode")

    def _decoded() -> None:
        decoded()
        if monitor.progress.get("stage") == "train":
            pause("train")

    monitor._encoded, monitor._decoded = _encoded, _decoded

    def before(stage: str, fn: Any) -> Any:
        if getattr(fn, "_casam_pause", None):
            return fn

        def wrapped(*args, **kwargs):
            pause(stage)
            return fn(*args, **kwargs)

        wrapped._casam_pause = stage  # type: ignore[attr-defined]
        return wrapped

    def after(stage: str, fn: Any) -> Any:
        if getattr(fn, "_casam_pause", None):
            return fn

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            pause(stage)
            return out

        wrapped._casam_pause = stage  # type: ignore[attr-defined]
        return wrapped

    layer.fit_head = before("head", layer.fit_head)
    layer.fit_router = before("router", layer.fit_router)
    layer.mask_scores = before("validate", layer.mask_scores)
    store.save_file = after("write", store.save_file)  # the layer's first weight file is written, the rest not
    return True


def quiet_path(text: str, *paths: Optional[str]) -> str:
    """``text`` with the given server paths replaced by ``<server folder>``."""
    for p in paths:
        if p:
            text = text.replace(str(p), "<server folder>")
    return text


# --- the PACS (DICOMweb) not answering ------------------------------------------------------------------------
def pacs_unreachable(e: BaseException) -> bool:
    """True when ``e`` (or an error it was raised from) is the DICOMweb server not answering: refused or dropped
    connection, a timeout, a cut-off answer, or a 502/503/504 of a proxy in front of it."""
    import requests

    while e is not None:
        if isinstance(e, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
            return True
        if isinstance(e, requests.HTTPError) and getattr(e.response, "status_code", 0) in (502, 503, 504):
            return True
        if type(e).__module__.startswith("httpx") and type(e).__name__ in (
                "ConnectError", "ReadError", "RemoteProtocolError", "ReadTimeout", "ConnectTimeout", "PoolTimeout"):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def pacs_address(datastore: Any = None) -> str:
    """The DICOMweb server's address as clients may see it (scheme, host and port; no credentials, no path)."""
    from urllib.parse import urlsplit

    url = getattr(datastore, "casam_pacs", None) or os.environ.get("CASAM_PACS_URL") or ""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}" if parts.hostname \
            else "the configured address"
    except ValueError:
        return "the configured address"


def pacs_error(e: BaseException, what: str, datastore: Any = None) -> HTTPException:
    """The 502 answer (and its one log line) to a request the DICOMweb server did not answer."""
    where = pacs_address(datastore)
    log.error("casam: the DICOMweb server (PACS) at %s did not answer (%s) during %s: answered 502; the next "
              "request tries it again", where, type(e).__name__, what)
    return HTTPException(502, f"the DICOMweb server (PACS) at {where} did not answer ({type(e).__name__}) during "
                              f"{what}: nothing was changed; try again once the PACS is back (no restart needed)")


def install_pacs_errors(datastore_of: Any) -> bool:
    """Answers 502 naming the PACS (instead of MONAI Label's 500 with a traceback) for any request during which
    the DICOMweb server did not answer. ``datastore_of()`` returns the app's datastore (for the PACS address).

    Returns:
        False outside MONAI Label's server.
    """
    import sys

    server = sys.modules.get("monailabel.app")
    if server is None:
        return False
    import requests
    from fastapi.responses import JSONResponse

    def handler(request, exc):
        try:
            ds = datastore_of()
        except Exception:
            ds = None
        e = pacs_error(exc, f"{request.method} {request.url.path}", ds)
        return JSONResponse({"detail": e.detail}, status_code=e.status_code)

    app = server.app
    for cls in (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
        app.add_exception_handler(cls, handler)
    if app.middleware_stack is not None:
        app.middleware_stack = app.build_middleware_stack()
    return True
