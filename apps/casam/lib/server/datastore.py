"""The app's datastore: plain ids and tags, uploads read before they are kept, bounded uploads, one lock.

:class:`GuardedDatastore` (mixed into the app's datastore by :func:`guard_datastore`) refuses ids and tags that
are not plain names, DICOMweb ids that are not UIDs, an uploaded image that its reader cannot read, a label that
cannot be read as class ids, a final label that does not fit its image (:func:`casam.data.clinical.check_label`),
and an upload that would take the clients' uploads in the datastore over ``max_datastore_upload_mb``. It
serialises every change and every walk over the datastore's index with one lock: uploads and label saves
(request threads) and the watcher's refresh (watchdog's thread), which MONAI Label 0.8.5 lets race (``dictionary
changed size during iteration`` killed the watcher); the watcher's callbacks log an error instead of ending its
thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from typing import Any, Callable, Iterator, Optional

from fastapi import HTTPException

from casam.data.clinical import check_label, read_clinical, read_label
from casam.data.safety import ImageLimits
from lib.server.checks import answered, check_name, is_plain_name, removed_if_refused, resolve_image, shown
from lib.server.faults import PREVIOUS, atomic_copy, atomic_write_text, disk_full, insufficient_storage, remove_partials

log = logging.getLogger(__name__)

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
UPLOAD_BYTES = "casam_upload_bytes"  # image/label info: bytes a client uploaded (counted for max_datastore_upload_mb)
_LOCKS: dict = {}  # datastore folder → its lock, shared by the datastores of the apps POST /reload built
_LOCKS_LOCK = threading.Lock()


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
        uid = isinstance(image_id, str) and len(image_id) <= 64 and _UID.fullmatch(image_id)
        if self.casam_dicomweb and not uid:
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
                info = {**_own_info(label_info), UPLOAD_BYTES: size}
                try:
                    if self.casam_dicomweb:  # stored in the PACS (and its local cache) by MONAI Label
                        return super().save_label(image_id, label_filename, tag, info)  # type: ignore[misc]
                    return self._save_label_whole(image_id, label_filename, tag, info)
                except OSError as e:
                    if not disk_full(e):
                        raise
                    log.error("casam: label save failed: disk full (507): label %s of image %s not stored; the "
                              "label saved before, if any, is unchanged", tag, image_id)
                    raise insufficient_storage(f"label {tag} of image {shown(image_id, 40)}",
                                               "the label saved before, if any, is unchanged") from None

    def _save_label_whole(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        """MONAI Label 0.8.5's ``LocalDatastore.save_label``, writing the label file and the index whole or not at
        all: a kill or a full disk mid-way leaves the label saved before (file and index entry) as it was."""
        from filelock import FileLock
        from monailabel.datastore.local import DataModel
        from monailabel.interfaces.exception import ImageNotFoundException

        obj = self._datastore.objects.get(image_id)  # type: ignore[attr-defined]
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))  # type: ignore[attr-defined]
        label_path = self._datastore.label_path(label_tag)  # type: ignore[attr-defined]
        name = self._filename(image_id, label_ext)  # type: ignore[attr-defined]
        dest = os.path.join(label_path, name)
        with FileLock(self._lock_file):  # type: ignore[attr-defined]
            os.makedirs(label_path, exist_ok=True)
            backup = None
            if os.path.exists(dest):  # kept (a hard link: no space) until the index says the new label
                backup = os.path.join(label_path, PREVIOUS + name)
                if os.path.exists(backup):
                    os.unlink(backup)
                os.link(dest, backup)
            previous = obj.labels.get(label_tag)
            try:
                atomic_copy(label_filename, dest)
                obj.labels[label_tag] = DataModel(info={**label_info, "ts": int(time.time()), "name": name},
                                                  ext=label_ext)
                self._update_datastore_file(lock=False)
            except BaseException:
                if previous is not None:
                    obj.labels[label_tag] = previous
                else:
                    obj.labels.pop(label_tag, None)
                if backup is not None:
                    if os.path.exists(dest) and os.path.samefile(backup, dest):
                        os.unlink(backup)  # the earlier label was never replaced
                    else:
                        os.replace(backup, dest)
                elif os.path.exists(dest) and previous is None:
                    os.unlink(dest)
                raise
            if backup is not None:
                os.unlink(backup)
        log.info("saved label %s of image %s", label_tag, image_id)
        return image_id

    def _update_datastore_file(self, lock: bool = True) -> None:
        """MONAI Label's index write, whole or not at all (a temporary file renamed into place): a kill or a full
        disk while it writes leaves the index as it was, instead of a truncated one."""
        from filelock import FileLock

        with self.casam_lock, (FileLock(self._lock_file) if lock else contextlib.nullcontext()):  # type: ignore[attr-defined]
            # (renamed into place: the watcher sees a move, not a change of the index, so there is no own event
            # to ignore, unlike MONAI Label's write in place)
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)  # type: ignore[attr-defined]
            atomic_write_text(self._datastore_config_path, text)  # type: ignore[attr-defined]
            self._config_ts = os.stat(self._datastore_config_path).st_mtime  # type: ignore[attr-defined]

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
        shown_id = image_id if is_plain_name(image_id) else shown(image_id, 40)
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
               "_add_non_existing_labels", "_init_from_datastore_file", "datalist",
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
    client = getattr(datastore, "_client", None)  # a DICOMweb datastore's client: the PACS' address for messages
    datastore.casam_pacs = getattr(client, "base_url", None) or getattr(client, "url_prefix", None)
    base = getattr(datastore, "_datastore_path", None)
    if base and not datastore.casam_dicomweb:
        with datastore.casam_lock:
            remove_partials(str(base))  # what a label save killed mid-way left (its earlier label is intact)
    handler = getattr(datastore, "_handler", None)  # MONAI Label bound its own callbacks when it started watching
    if handler is not None:
        handler.on_created = handler.on_deleted = datastore.casam_on_event
        handler.on_modified = datastore.casam_on_modified
    return datastore


