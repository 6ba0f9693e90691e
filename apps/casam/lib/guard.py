"""What an untrusted client may ask of the app: images by datastore id (or uploaded), bounded requests, 4xx.

MONAI Label 0.8.5 takes an ``image`` that exists as a path on the server as that file, parses request
``params`` / ``info`` JSON in its endpoint functions (bad JSON → 500) and writes uploads under the id or tag
the client names. The app closes these holes in two places:

* :func:`install_endpoint_guards` wraps the endpoint functions that parse client input (``/infer``, the
  datastore's image and label uploads and info updates, and ``PUT /session``): bad JSON, no image, an upload
  that is too big or of a type no reader takes, a label upload to ``/infer``, an archive to unpack → 4xx
  before anything is written (:mod:`lib.gate` bounds the request body before FastAPI spools it); session
  answers name the session's folder and image without their server paths;
* :class:`GuardedDatastore` (mixed into the app's datastore by :func:`guard_datastore`) refuses ids and tags
  that are not plain names, DICOMweb ids that are not UIDs, and a final label that does not fit its image
  (:func:`casam.imageio.check_label`).

:func:`resolve_image` turns an infer request's ``image`` into the file to read and the name messages use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

from fastapi import HTTPException

from casam.data import IMAGE_SUFFIXES
from casam.errors import CasamError, LimitError
from casam.imageio import ImageLimits, check_label, read_clinical
from lib.hooks import wrap_endpoint

log = logging.getLogger(__name__)

UPLOAD_SUFFIXES = IMAGE_SUFFIXES + (".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+ -]{0,199}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_TEMP = re.compile(r"tmp[a-z0-9_]{8}(\.[A-Za-z0-9]+){0,2}")


def shown(value: Any, n: int = 80) -> str:
    """A client's value as messages quote it (repr, cut to ``n`` characters)."""
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def http_error(e: CasamError) -> HTTPException:
    """The HTTP answer to a casam error: 413 for a limit, 404 for an unknown layer, else 400."""
    from casam.errors import UnknownLayerError

    code = 413 if isinstance(e, LimitError) else 404 if isinstance(e, UnknownLayerError) else 400
    return HTTPException(code, str(e))


def check_name(value: Any, what: str) -> str:
    """A plain name (image id, label tag): letters, digits, ``_.+ -``, no path, not hidden.

    Raises:
        HTTPException: 400 otherwise.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
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
    if sessions_dir and os.path.isabs(image) and os.path.realpath(image).startswith(os.path.realpath(sessions_dir) + os.sep):
        return image, "the session's image"
    try:
        uri = datastore.get_image_uri(image)
    except HTTPException:
        raise
    except Exception as e:  # e.g. a DICOMweb series that cannot be fetched
        log.warning("image %r not found: %s", image, e)
        uri = ""
    if not uri or not os.path.exists(uri):
        if "/" in image or "\\" in image:
            raise HTTPException(404, "unknown image: not in the datastore (give a datastore image id, not a path)")
        raise HTTPException(404, f"unknown image {shown(image)}: not in the datastore")
    return uri, image


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
    """Wraps MONAI Label's endpoint functions that parse client input (idempotent).

    Args:
        limits: size limits of uploads.
    """
    from monailabel.endpoints import datastore as ds_ep
    from monailabel.endpoints import infer as infer_ep
    from monailabel.endpoints import session as session_ep

    def wrap(module: Any, name: str, check: Callable[..., None]) -> None:
        wrap_endpoint(module, name, "casam_guarded", before=check)

    def infer_check(image="", session_id="", params="{}", file=None, label=None, **_):
        _json_dict(params, "params")
        if not file and not (image or "").strip() and not session_id:
            raise HTTPException(400, "no image: give the id of a datastore image (?image=<id>) or upload a file")
        if label is not None:
            raise HTTPException(400, "this app's models take no label upload with /infer")
        _check_upload(file, limits, "uploaded image")

    def add_image_check(image=None, params="{}", file=None, **_):
        _json_dict(params, "params")
        _check_upload(file, limits, "uploaded image")
        image_id = image or os.path.basename(getattr(file, "filename", "") or "")[: -len(upload_suffix(file.filename))]
        check_name(image_id, "image id")

    def save_label_check(image="", params="{}", tag="final", label=None, **_):
        _json_dict(params, "params")
        check_name(tag or "final", "label tag")
        _check_upload(label, limits, "uploaded label")

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
        _check_session_files(files, limits)

    wrap(infer_ep, "run_inference", infer_check)
    wrap(session_ep, "create_session", session_check)
    for name in ("create_session", "get_session", "remove_session"):
        wrap_endpoint(session_ep, name, "casam_no_paths", after=_hide_session_paths)
    wrap(ds_ep, "add_image", add_image_check)
    wrap(ds_ep, "save_label", save_label_check)
    wrap(ds_ep, "update_image_info", info_check)
    wrap(ds_ep, "update_label_info", info_check)
    wrap(ds_ep, "download_image", checksum_check)


@contextlib.contextmanager
def _not_found(image_id: Any) -> Iterator[None]:
    """MONAI Label's ImageNotFoundException (a 500 by default) as a 404 naming the image id."""
    from monailabel.interfaces.exception import ImageNotFoundException

    try:
        yield
    except ImageNotFoundException:
        raise HTTPException(404, f"unknown image {shown(image_id)}: not in the datastore") from None


class GuardedDatastore:
    """Mixed in front of the app's datastore class: plain ids and tags only, final labels checked at save.

    Attributes (set by :func:`guard_datastore`):
        casam_limits: size limits for reading images and labels.
        casam_dicomweb: True when image ids are DICOM UIDs.
    """

    casam_limits: ImageLimits = ImageLimits()
    casam_dicomweb: bool = False

    def _check_id(self, image_id: Any) -> Any:
        """DICOMweb ids become folder names (a UID only); a local datastore only looks ids up in its index."""
        if self.casam_dicomweb and (not isinstance(image_id, str) or len(image_id) > 64 or not _UID.fullmatch(image_id)):
            raise HTTPException(404, f"unknown image {shown(image_id)}: not a DICOM UID of the datastore")
        return image_id

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(self._check_id(image_id))  # type: ignore[misc]

    def get_label_uri(self, label_id: str, label_tag: str, *args, **kwargs) -> str:
        return super().get_label_uri(self._check_id(label_id), check_name(label_tag, "label tag"), *args, **kwargs)  # type: ignore[misc]

    def add_image(self, image_id: str, image_filename: str, image_info: Any) -> str:
        if image_id:
            check_name(image_id, "image id")
        return super().add_image(image_id, image_filename, image_info)  # type: ignore[misc]

    def remove_image(self, image_id: str) -> None:
        with _not_found(image_id):
            return super().remove_image(self._check_id(image_id))  # type: ignore[misc]

    def remove_label(self, label_id: str, label_tag: str) -> None:
        return super().remove_label(self._check_id(label_id), check_name(label_tag, "label tag"))  # type: ignore[misc]

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Any) -> str:
        tag = check_name(label_tag or "final", "label tag")
        if tag == "final":
            self.check_final_label(image_id, label_filename)
        with _not_found(image_id):
            return super().save_label(image_id, label_filename, tag, label_info)  # type: ignore[misc]

    def check_final_label(self, image_id: str, label_path: str) -> None:
        """A final label must fit its image (shape, geometry, integer classes) and not be empty.

        Raises:
            HTTPException: 404 unknown image; 400 a bad label; 413 over a size limit.
        """
        path, name = resolve_image(image_id, self)
        try:
            img = read_clinical(path, name=name, limits=self.casam_limits)
            check_label(label_path, img, name=f"of image {name}", limits=self.casam_limits)
        except CasamError as e:
            raise http_error(e) from None


def guard_datastore(datastore: Any, limits: ImageLimits) -> Any:
    """Puts :class:`GuardedDatastore` in front of a datastore's class (its isinstance checks still hold).

    Args:
        datastore: the datastore MONAI Label built (local folder or DICOMweb).
        limits: size limits for reading images and labels.

    Returns:
        The same object, guarded.
    """
    from monailabel.datastore.dicom import DICOMWebDatastore

    cls = type(datastore)
    if not issubclass(cls, GuardedDatastore):
        datastore.__class__ = type(f"Guarded{cls.__name__}", (GuardedDatastore, cls), {})
    datastore.casam_limits = limits
    datastore.casam_dicomweb = isinstance(datastore, DICOMWebDatastore)
    return datastore
