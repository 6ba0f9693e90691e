"""The app's sessions (``PUT /session``): a session's image is read before it is kept, and their number is bounded."""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

from fastapi import HTTPException

from casam.data.clinical import read_clinical
from casam.data.safety import ImageLimits
from lib.server.checks import answered, removed_if_refused


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
