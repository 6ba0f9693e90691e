"""Checks on MONAI Label's endpoint functions that parse client input, before anything is written.

MONAI Label 0.8.5 parses request ``params`` / ``info`` JSON in its endpoint functions (bad JSON → 500) and keeps
an upload of any type or size. :func:`install_endpoint_guards` wraps ``/infer``, the datastore's image and label
uploads and info updates, the image download and ``PUT /session``: bad JSON, no image, an upload that is too big
or of a type no reader takes, a label upload to ``/infer``, an archive to unpack → 4xx before anything is written
(:mod:`lib.server.body_limit` bounds the request body before FastAPI spools it). Session answers name the
session's folder and image without their server paths. The guards read the limits of the newest app
(``POST /reload`` builds a new one from the ``--conf`` options).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from fastapi import HTTPException

from casam.data.safety import ImageLimits
from casam.errors import LimitError
from lib.server.checks import check_name, http_error, shown, upload_suffix
from lib.server.hooks import wrap_endpoint

_current: dict = {"limits": ImageLimits()}  # the newest app's limits, for the endpoint guards


def _json_dict(text: Any, what: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except (TypeError, ValueError) as e:
        raise HTTPException(400, f"{what} is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(value, dict):
        raise HTTPException(400, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _check_bytes(limits: ImageLimits, what: str, n: int) -> None:
    try:
        limits.check_bytes(what, n)
    except LimitError as e:
        raise http_error(e) from None


def _check_upload(file: Any, limits: ImageLimits, what: str) -> None:
    if file is None:
        return
    upload_suffix(getattr(file, "filename", None), what)
    size = getattr(file, "size", None)
    if size is not None:
        _check_bytes(limits, f"{what} {shown(os.path.basename(file.filename or ''))}", int(size))


def _check_session_files(files: Any, limits: ImageLimits) -> None:
    """A session's upload: one image file, or the ``.dcm`` files of one series; all of them within ``max_upload_mb``.

    Raises:
        HTTPException: 400 a type no reader takes, several files that are not DICOM; 413 over ``max_upload_mb``.
    """
    files = list(files or [])
    suffixes = {upload_suffix(getattr(f, "filename", None), "session file") for f in files}
    if len(files) > 1 and suffixes != {".dcm"}:
        raise HTTPException(400, f"a session takes one image file, or the .dcm files of one DICOM series; got "
                                 f"{len(files)} files ({', '.join(sorted(suffixes))})")
    _check_bytes(limits, f"session upload of {len(files)} file(s)", sum(int(getattr(f, "size", 0) or 0) for f in files))


def _hide_session_paths(result: Any, **_) -> None:
    """Names a session's folder and image by their names only, in place (MONAI Label answers their server paths)."""
    info = result.get("session_info", result) if isinstance(result, dict) else None
    if isinstance(info, dict):
        for key in ("path", "image"):
            if isinstance(info.get(key), str):
                info[key] = os.path.basename(info[key])


def install_endpoint_guards(limits: ImageLimits) -> None:
    """Wraps MONAI Label's endpoint functions that parse client input (once; a later call only replaces the limits).

    Args:
        limits: size limits of uploads (the newest app's: ``POST /reload`` builds an app that installs its own).
    """
    from monailabel.endpoints import datastore as ds_ep
    from monailabel.endpoints import infer as infer_ep
    from monailabel.endpoints import session as session_ep

    _current["limits"] = limits

    def wrap(module: Any, name: str, check: Callable[..., None]) -> None:
        wrap_endpoint(module, name, "casam_guarded", before=check)

    def infer_check(image="", session_id="", params="{}", file=None, label=None, **_):
        _json_dict(params, "params")
        if not file and not (image or "").strip() and not session_id:
            raise HTTPException(400, "no image: give the id of a datastore image (?image=<id>) or upload a file")
        if label is not None:
            raise HTTPException(400, "this app's models take no label upload with /infer")
        _check_upload(file, _current["limits"], "uploaded image")

    def add_image_check(image=None, params="{}", file=None, **_):
        _json_dict(params, "params")
        _check_upload(file, _current["limits"], "uploaded image")
        image_id = image or os.path.basename(getattr(file, "filename", "") or "")[: -len(upload_suffix(file.filename))]
        check_name(image_id, "image id")

    def save_label_check(image="", params="{}", tag="final", label=None, **_):
        _json_dict(params, "params")
        check_name(tag or "final", "label tag")
        _check_upload(label, _current["limits"], "uploaded label")

    def info_check(info="{}", **_):
        _json_dict(info, "info")

    def checksum_check(check_sum=None, **_):
        algo = check_sum.split(":")[0] if check_sum and ":" in check_sum else "SHA256"
        if algo not in ("SHA256", "SHA512", "MD5"):
            raise HTTPException(400, f"check_sum algorithm {shown(algo)}: use SHA256, SHA512 or MD5")

    def session_check(uncompress=False, files=None, **_):
        # MONAI Label would unpack any archive (zip bomb, tar paths); the 3D Slicer plugin sends one image file
        if uncompress:
            raise HTTPException(400, "this app unpacks no archives: send the image file itself (uncompress=false)")
        _check_session_files(files, _current["limits"])

    wrap(infer_ep, "run_inference", infer_check)
    wrap(session_ep, "create_session", session_check)
    for name in ("create_session", "get_session", "remove_session"):
        wrap_endpoint(session_ep, name, "casam_no_paths", after=_hide_session_paths)
    wrap(ds_ep, "add_image", add_image_check)
    wrap(ds_ep, "save_label", save_label_check)
    wrap(ds_ep, "update_image_info", info_check)
    wrap(ds_ep, "update_label_info", info_check)
    wrap(ds_ep, "download_image", checksum_check)


