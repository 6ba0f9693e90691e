"""Checks of what a client sends, shared by the endpoint guards, the datastore, the sessions and the infer.

MONAI Label 0.8.5 takes an ``image`` that exists as a path on the server as that file and writes uploads under
the id or tag the client names. These functions accept plain names only, uploads of a type a reader takes,
images of the datastore (or this request's upload, or a session's image) and never a server path; they turn a
casam error into its HTTP answer, and remove a refused upload's temporary file (FastAPI runs no background task,
such as MONAI Label's clean-up, after an error).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

from fastapi import HTTPException

from casam.data.formats import UPLOAD_SUFFIXES
from casam.errors import CasamError, LimitError, UnknownLayerError

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+ -]{0,199}")
_TEMP = re.compile(r"tmp[a-z0-9_]{8}(\.[A-Za-z0-9]+){0,2}")


def shown(value: Any, n: int = 80) -> str:
    """A client's value as messages quote it (repr, cut to ``n`` characters)."""
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def http_error(e: CasamError) -> HTTPException:
    """The HTTP answer to a casam error: 413 for a limit, 404 for an unknown layer, else 400."""
    code = 413 if isinstance(e, LimitError) else 404 if isinstance(e, UnknownLayerError) else 400
    return HTTPException(code, str(e))


@contextlib.contextmanager
def answered() -> Iterator[None]:
    """A casam error raised in the block becomes its HTTP answer (:func:`http_error`)."""
    try:
        yield
    except CasamError as e:
        raise http_error(e) from None


def is_plain_name(value: Any) -> bool:
    """True for a plain name (image id, label tag): letters, digits, ``_.+ -``, no path, not hidden."""
    return isinstance(value, str) and bool(_NAME.fullmatch(value)) and ".." not in value


def check_name(value: Any, what: str) -> str:
    """A plain name (image id, label tag): letters, digits, ``_.+ -``, no path, not hidden.

    Raises:
        HTTPException: 400 otherwise.
    """
    if not is_plain_name(value):
        raise HTTPException(400, f"{what} {shown(value)} is not a plain name (letters, digits, '_.+ -'; no path)")
    return value


def upload_suffix(filename: Optional[str], what: str = "upload") -> str:
    """The suffix of an uploaded file's name, if a reader takes it.

    Raises:
        HTTPException: 400 for any other type (detached headers such as .mhd/.nhdr could name server files).
    """
    name = (filename or "").lower()
    for s in sorted(UPLOAD_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    raise HTTPException(400, f"{what} {shown(os.path.basename(filename or ''))}: unsupported file type; "
                             f"send one of {', '.join(UPLOAD_SUFFIXES)}")


def is_upload(path: str) -> bool:
    """True for a file MONAI Label has just written from this request's upload (``<tmp>/tmpXXXXXXXX.ext``)."""
    p = Path(path)
    return (p.is_absolute() and str(p.parent) == tempfile.gettempdir() and bool(_TEMP.fullmatch(p.name))
            and p.is_file() and not p.is_symlink())


def remove_upload(path: Any) -> None:
    """Removes a file (or the folder of a session's files) MONAI Label wrote for this request's upload, if it is one."""
    if not isinstance(path, str) or not path:
        return
    if is_upload(path):
        os.remove(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.dirname(folder) == tempfile.gettempdir() and _TEMP.fullmatch(os.path.basename(folder)) \
            and not os.path.islink(folder) and os.path.isdir(folder):
        shutil.rmtree(folder, ignore_errors=True)  # create_session's folder of received files


@contextlib.contextmanager
def removed_if_refused(path: Any) -> Iterator[None]:
    """Removes the upload at ``path`` (:func:`remove_upload`) when the block raises."""
    try:
        yield
    except BaseException:
        remove_upload(path)
        raise


def resolve_image(image: Any, datastore: Any, sessions_dir: Optional[str] = None) -> Tuple[str, str]:
    """The file an infer request may read, and how messages name it.

    Args:
        image: the request's ``image``: a datastore image id; or, set by MONAI Label, the temporary file of an
            upload or the image of a session.
        datastore: the app's (guarded) datastore.
        sessions_dir: MONAI Label's session folder, if sessions are on.

    Returns:
        (path on the server, name for messages: the image id, or "the uploaded image").

    Raises:
        HTTPException: 400 no image; 404 not an image of the datastore. A server path is never accepted.
    """
    if not isinstance(image, str) or not image.strip():
        raise HTTPException(400, "no image: give the id of a datastore image (?image=<id>) or upload a file")
    if is_upload(image):
        return image, "the uploaded image"
    if (sessions_dir and os.path.isabs(image)
            and os.path.realpath(image).startswith(os.path.realpath(sessions_dir) + os.sep)):
        return image, "the session's image"
    try:
        uri = datastore.get_image_uri(image)
    except HTTPException:
        raise
    except Exception as e:  # e.g. a DICOMweb series that cannot be fetched
        from lib.server.faults import pacs_error, pacs_unreachable

        if pacs_unreachable(e):  # not an unknown image: the PACS is down (502 naming it)
            raise pacs_error(e, f"fetching image {shown(image, 70)}", datastore) from None
        log.warning("image %r not found: %s", image, e)
        uri = ""
    if not uri or not os.path.exists(uri):
        if "/" in image or "\\" in image:
            raise HTTPException(404, "unknown image: not in the datastore (give a datastore image id, not a path)")
        raise HTTPException(404, f"unknown image {shown(image)}: not in the datastore")
    return uri, image


