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
  that are not plain names, DICOMweb ids that are not UIDs, an uploaded image that its reader cannot read, a
  label that cannot be read as class ids, a final label that does not fit its image
  (:func:`casam.data.clinical.check_label`), and an upload that would take the clients' uploads in the datastore
  over ``max_datastore_upload_mb``. It serialises every change and every walk over the datastore's index with
  one lock: uploads and label saves (request threads) and the watcher's refresh (watchdog's thread), which
  MONAI Label lets race (``dictionary changed size during iteration`` killed the watcher); the watcher's
  callbacks log an error instead of ending its thread;
* :class:`GuardedSessions` (mixed into the app's sessions by :func:`guard_sessions`) reads a session's image
  before keeping it and keeps at most ``max_sessions`` sessions.

Whatever is refused, the upload's temporary file is removed (FastAPI runs no background task, such as MONAI
Label's clean-up, after an error). The endpoint guards read the limits of the newest app (``POST /reload``
builds a new one from the ``--conf`` options).

:func:`resolve_image` turns an infer request's ``image`` into the file to read and the name messages use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

from fastapi import HTTPException

from casam.data.formats import UPLOAD_SUFFIXES
from casam.errors import CasamError, LimitError
from casam.data.clinical import check_label, read_clinical, read_label
from casam.data.safety import ImageLimits
from lib.hooks import wrap_endpoint

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+ -]{0,199}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_TEMP = re.compile(r"tmp[a-z0-9_]{8}(\.[A-Za-z0-9]+){0,2}")
UPLOAD_BYTES = "casam_upload_bytes"  # image/label info: bytes a client uploaded (counted for max_datastore_upload_mb)
_current: dict = {"limits": ImageLimits()}  # the newest app's limits, for the endpoint guards
_LOCKS: dict = {}  # datastore folder → its lock, shared by the datastores of the apps POST /reload built
_LOCKS_LOCK = threading.Lock()


def shown(value: Any, n: int = 80) -> str:
    """A client's value as messages quote it (repr, cut to ``n`` characters)."""
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def http_error(e: CasamError) -> HTTPException:
    """The HTTP answer to a casam error: 413 for a limit, 404 for an unknown layer, else 400."""
    from casam.errors import UnknownLayerError

    code = 413 if isinstance(e, LimitError) else 404 if isinstance(e, UnknownLayerError) else 400
    return HTTPException(code, str(e))


@contextlib.contextmanager
def answered() -> Iterator[None]:
    """A casam error raised in the block becomes its HTTP answer (:func:`http_error`)."""
    try:
        yield
    except CasamError as e:
        raise http_error(e) from None


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


@contextlib.contextmanager
def _not_found(image_id: Any) -> Iterator[None]:
    """MONAI Label's ImageNotFoundException (a 500 by default) as a 404 naming the image id."""
    from monailabel.interfaces.exception import ImageNotFoundException

    try:
        yield
    except ImageNotFoundException:
        raise HTTPException(404, f"unknown image {shown(image_id)}: not in the datastore") from None


def _stored_bytes(info: Any) -> int:
    """The uploaded bytes an image's or label's info records (0 for the studies' own files)."""
    value = info.get(UPLOAD_BYTES, 0) if isinstance(info, dict) else 0
    return value if isinstance(value, int) and value > 0 else 0


def _own_info(info: Any) -> dict:
    """A client's info without the keys the app keeps for itself (a client may not rewrite its upload's size)."""
    return {k: v for k, v in (info or {}).items() if k != UPLOAD_BYTES} if isinstance(info, dict) else {}


class GuardedDatastore:
    """Mixed in front of the app's datastore class: plain ids and tags only, uploads read before they are kept,
    bounded uploads, one lock around every change and walk of the index.

    Attributes (set by :func:`guard_datastore`):
        casam_limits: size limits for reading images and labels.
        casam_dicomweb: True when image ids are DICOM UIDs.
        casam_max_upload_bytes: bytes of images and labels clients may keep in a local datastore (None = no limit).
        casam_lock: the lock (re-entrant: MONAI Label's methods call each other), one per datastore folder.
    """

    casam_limits: ImageLimits = ImageLimits()
    casam_dicomweb: bool = False
    casam_max_upload_bytes: Optional[int] = None
    casam_lock: Any = None

    def _check_id(self, image_id: Any) -> Any:
        """DICOMweb ids become folder names (a UID only); a local datastore only looks ids up in its index."""
        if self.casam_dicomweb and (not isinstance(image_id, str) or len(image_id) > 64 or not _UID.fullmatch(image_id)):
            raise HTTPException(404, f"unknown image {shown(image_id)}: not a DICOM UID of the datastore")
        return image_id

    def get_image_uri(self, image_id: str) -> str:
        image_id = self._check_id(image_id)
        if not self.casam_dicomweb:
            return super().get_image_uri(image_id)  # type: ignore[misc]
        # MONAI Label's DICOMweb datastore adds a series it has just converted to its index while holding the index's
        # file lock, and the index write inside takes this lock; the watcher's refresh takes this lock, then the file
        # lock. Taking this lock first keeps one order (the two had deadlocked a first ROI on a DICOMweb volume).
        with self.casam_lock:
            return super().get_image_uri(image_id)  # type: ignore[misc]

    def get_label_uri(self, label_id: str, label_tag: str, *args, **kwargs) -> str:
        return super().get_label_uri(self._check_id(label_id), check_name(label_tag, "label tag"), *args, **kwargs)  # type: ignore[misc]

    def add_image(self, image_id: str, image_filename: str, image_info: Any) -> str:
        with removed_if_refused(image_filename):
            if image_id:
                check_name(image_id, "image id")
            name = image_id or "the uploaded image"
            with answered():
                read_clinical(image_filename, name=name, limits=self.casam_limits)
            size = os.path.getsize(image_filename)
            with self.casam_lock:
                obj = self._objects().get(image_id)
                self.check_room(f"image {name}", size, _stored_bytes(obj.image.info) if obj is not None else 0)
                return super().add_image(image_id, image_filename, {**_own_info(image_info), UPLOAD_BYTES: size})  # type: ignore[misc]

    def remove_image(self, image_id: str) -> None:
        with self.casam_lock, _not_found(image_id):
            super().remove_image(self._check_id(image_id))  # type: ignore[misc]
            self._refresh_now()

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self.casam_lock:
            super().remove_label(self._check_id(label_id), check_name(label_tag, "label tag"))  # type: ignore[misc]
            self._refresh_now()

    def _refresh_now(self) -> None:
        """With its watcher on, MONAI Label leaves a removed file in the index until the watcher's event: the
        index (and what uploads count) follows the removal at once instead."""
        if getattr(self, "_auto_reload", False) and not self.casam_dicomweb:
            self.refresh()

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Any) -> str:
        with removed_if_refused(label_filename):
            tag = check_name(label_tag or "final", "label tag")
            self.check_label_upload(image_id, label_filename, final=tag == "final")
            size = os.path.getsize(label_filename)
            with self.casam_lock, _not_found(image_id):
                obj = self._objects().get(image_id)
                label = obj.labels.get(tag) if obj is not None else None
                self.check_room(f"label {tag} of image {image_id}", size, _stored_bytes(label.info) if label else 0)
                return super().save_label(image_id, label_filename, tag, {**_own_info(label_info), UPLOAD_BYTES: size})  # type: ignore[misc]

    def update_image_info(self, image_id: str, info: Any) -> None:
        with self.casam_lock:
            return super().update_image_info(image_id, _own_info(info))  # type: ignore[misc]

    def update_label_info(self, label_id: str, label_tag: str, info: Any) -> None:
        with self.casam_lock:
            return super().update_label_info(label_id, label_tag, _own_info(info))  # type: ignore[misc]

    def check_label_upload(self, image_id: str, label_path: str, final: bool) -> None:
        """A label must be a readable map of class ids; a final one must also fit its image and not be empty.

        Raises:
            HTTPException: 404 unknown image (final labels); 400 a bad label; 413 over a size limit.
        """
        if final:
            return self.check_final_label(image_id, label_path)
        shown_id = image_id if isinstance(image_id, str) and _NAME.fullmatch(image_id) else shown(image_id, 40)
        with answered():
            read_label(label_path, name=f"of image {shown_id}", limits=self.casam_limits)

    def check_final_label(self, image_id: str, label_path: str) -> None:
        """A final label must fit its image (shape, geometry, integer classes) and not be empty.

        Raises:
            HTTPException: 404 unknown image; 400 a bad label; 413 over a size limit.
        """
        path, name = resolve_image(image_id, self)
        with answered():
            img = read_clinical(path, name=name, limits=self.casam_limits)
            check_label(label_path, img, name=f"of image {name}", limits=self.casam_limits)

    def _objects(self) -> dict:
        """The local datastore's index (image id → images and labels); empty for a DICOMweb datastore."""
        model = getattr(self, "_datastore", None)
        return {} if self.casam_dicomweb or model is None else model.objects

    def uploaded_bytes(self) -> int:
        """Bytes of the images and labels clients uploaded into this datastore, as its index records them."""
        with self.casam_lock:
            return sum(_stored_bytes(o.image.info) + sum(_stored_bytes(lab.info) for lab in o.labels.values())
                       for o in self._objects().values())

    def check_room(self, what: str, size: int, replaced: int = 0) -> None:
        """Refuses an upload of ``size`` bytes (replacing one of ``replaced``) over ``max_datastore_upload_mb``.

        Raises:
            HTTPException: 413 naming the limit.
        """
        limit = self.casam_max_upload_bytes
        if limit is None or self.casam_dicomweb:  # a DICOMweb datastore stores in the PACS, not here
            return
        total = self.uploaded_bytes() - replaced + size
        if total > limit:
            raise HTTPException(413, f"{what} ({size / 2**20:.2f} MB) would take the images and labels uploaded to "
                                     f"the datastore to {total / 2**20:.2f} MB: over the limit max_datastore_upload_mb "
                                     f"= {round(limit / 2**20, 3):g} (--conf max_datastore_upload_mb); remove images "
                                     f"or labels first (DELETE /datastore/image)")

    def casam_on_event(self, event: Any) -> None:
        """The watcher's callback for a created or deleted file: MONAI Label's refresh, errors logged."""
        self._casam_watch(self._on_any_event, event)  # type: ignore[attr-defined]

    def casam_on_modified(self, event: Any) -> None:
        """The watcher's callback for a modified file (MONAI Label re-reads its index file), errors logged."""
        self._casam_watch(self._on_modify_event, event)  # type: ignore[attr-defined]

    def _casam_watch(self, callback: Callable[[Any], None], event: Any) -> None:
        try:
            callback(event)
        except Exception as e:  # an exception would end watchdog's thread: files added later would go unseen
            log.error("datastore watcher: %s after %s failed (the watcher goes on): %s", callback.__name__,
                      getattr(event, "event_type", event), e)


# MONAI Label's methods that change the datastore's index or walk it (the watcher's refresh among them)
_SERIALISED = ("refresh", "_reconcile_datastore", "_remove_non_existing", "_add_non_existing_images",
               "_add_non_existing_labels", "_init_from_datastore_file", "_update_datastore_file", "datalist",
               "list_images", "get_labeled_images", "get_unlabeled_images", "get_dataset_archive", "status", "json")


def _serialised(name: str) -> Callable[..., Any]:
    def method(self, *args, **kwargs):
        with self.casam_lock:
            return getattr(super(GuardedDatastore, self), name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"MONAI Label's ``{name}``, holding the datastore's lock."
    return method


for _name in _SERIALISED:
    setattr(GuardedDatastore, _name, _serialised(_name))


def guard_datastore(datastore: Any, limits: ImageLimits, max_upload_bytes: Optional[int] = None) -> Any:
    """Puts :class:`GuardedDatastore` in front of a datastore's class (its isinstance checks still hold).

    Args:
        datastore: the datastore MONAI Label built (local folder or DICOMweb).
        limits: size limits for reading images and labels.
        max_upload_bytes: bytes of images and labels clients may keep in a local datastore (None = no limit).

    Returns:
        The same object, guarded; its watcher (if any) calls the guarded, serialised refresh.
    """
    from monailabel.datastore.dicom import DICOMWebDatastore

    if getattr(datastore, "casam_lock", None) is None:  # before the class changes: the watcher may refresh meanwhile
        with _LOCKS_LOCK:  # an earlier app's datastore (before POST /reload) still watches the same folder
            folder = os.path.realpath(str(getattr(datastore, "_datastore_path", "") or id(datastore)))
            datastore.casam_lock = _LOCKS.setdefault(folder, threading.RLock())
    cls = type(datastore)
    if not issubclass(cls, GuardedDatastore):
        datastore.__class__ = type(f"Guarded{cls.__name__}", (GuardedDatastore, cls), {})
    datastore.casam_limits = limits
    datastore.casam_dicomweb = isinstance(datastore, DICOMWebDatastore)
    datastore.casam_max_upload_bytes = max_upload_bytes
    handler = getattr(datastore, "_handler", None)  # MONAI Label bound its own callbacks when it started watching
    if handler is not None:
        handler.on_created = handler.on_deleted = datastore.casam_on_event
        handler.on_modified = datastore.casam_on_modified
    return datastore


class GuardedSessions:
    """Mixed in front of MONAI Label's sessions: a session's image is read before it is kept, and at most
    ``max_sessions`` sessions are kept (expired ones are removed first).

    Attributes (set by :func:`guard_sessions`):
        casam_limits: size limits for reading the session's image.
        casam_max_sessions: sessions kept at once (None = no limit).
        casam_lock: serialises counting and adding.
    """

    casam_limits: ImageLimits = ImageLimits()
    casam_max_sessions: Optional[int] = None
    casam_lock: Any = None

    def count(self) -> int:
        """Sessions in the session folder."""
        folder = getattr(self, "store_path", "")
        return sum(1 for e in os.scandir(folder) if e.is_dir()) if folder and os.path.isdir(folder) else 0

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id: Any = None):
        with removed_if_refused(data_file), self.casam_lock:
            limit = self.casam_max_sessions
            if limit is not None:
                self.remove_expired()  # type: ignore[attr-defined]
                if self.count() >= limit:
                    raise HTTPException(429, f"{self.count()} sessions are open: the limit max_sessions = {limit} "
                                             f"(--conf max_sessions); remove one (DELETE /session/<id>) or wait "
                                             f"for one to expire")
            with answered():
                read_clinical(data_file, name="the session's image", limits=self.casam_limits)
            return super().add_session(data_file, expiry, uncompress, session_id)  # type: ignore[misc]


def guard_sessions(sessions: Any, limits: ImageLimits, max_sessions: Optional[int] = None) -> Any:
    """Puts :class:`GuardedSessions` in front of MONAI Label's sessions (None when sessions are off).

    Args:
        sessions: MONAI Label's ``Sessions`` (or None).
        limits: size limits for reading a session's image.
        max_sessions: sessions kept at once (None = no limit).

    Returns:
        The same object, guarded.
    """
    if sessions is None:
        return None
    cls = type(sessions)
    if not issubclass(cls, GuardedSessions):
        sessions.__class__ = type(f"Guarded{cls.__name__}", (GuardedSessions, cls), {})
    sessions.casam_lock = sessions.casam_lock or threading.Lock()
    sessions.casam_limits, sessions.casam_max_sessions = limits, max_sessions
    return sessions
