"""Where casam keeps its files: every location read from the environment, in one place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


def casam_home() -> Path:
    """Returns the root folder for casam's own files (``$CASAM_HOME`` or ``~/.casam``)."""
    return Path(os.environ.get("CASAM_HOME", Path.home() / ".casam")).expanduser()


def default_registry(root: Optional[Union[str, Path]] = None) -> Path:
    """Returns the default layer registry folder.

    Args:
        root: folder whose ``registry`` subfolder is the default when ``$CASAM_REGISTRY`` is unset or empty
            (default: :func:`casam_home`; the MONAI Label app passes its model folder).

    Returns:
        ``$CASAM_REGISTRY``, else ``<root>/registry``.
    """
    return Path(os.environ.get("CASAM_REGISTRY") or Path(root or casam_home()) / "registry").expanduser()


def default_cache(root: Optional[Union[str, Path]] = None) -> Path:
    """Returns the default embedding cache folder.

    Args:
        root: folder whose ``cache`` subfolder is the default when ``$CASAM_CACHE`` is unset or empty
            (default: :func:`casam_home`; the MONAI Label app passes its model folder).

    Returns:
        ``$CASAM_CACHE``, else ``<root>/cache``.
    """
    return Path(os.environ.get("CASAM_CACHE") or Path(root or casam_home()) / "cache").expanduser()


def default_data() -> Path:
    """Returns the data root: the folder of datasets with a ``MANIFEST.tsv``.

    The default is relative to the working directory, not to where casam is installed: run from a casam
    checkout, ``../shared/data`` is the data folder beside it.

    Returns:
        ``$CASAM_DATA``, else ``../shared/data`` from the working directory.
    """
    env = os.environ.get("CASAM_DATA")
    if env:
        return Path(env).expanduser()
    return Path.cwd().parent / "shared" / "data"
