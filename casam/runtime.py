"""Process settings: the one resolution of the ``auto`` device, and glibc's allocator kept for fast CPU work.

PyTorch's CPU allocator has no cache: every tensor is a ``malloc`` and every free a ``free``. glibc serves
requests above its mmap threshold (at most 32 MiB by default) with fresh ``mmap`` pages and gives them back
to the kernel on free, so each of LiteMedSAM's large activations and each Alignment Layer gradient is
page-faulted and zeroed again on every call, which costs a large share of an encoded image's time on a small
CPU. PyTorch's performance guide cures this by preloading jemalloc or tcmalloc; a MONAI Label server is started
by ``monailabel start_server``, so casam sets glibc itself, the same effect with nothing preloaded:

- ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``: allocations up to, and free memory at the top of the heap up
  to, ``CASAM_MALLOC_KEEP_MB`` (default :data:`MALLOC_KEEP_MB`) stay in the process for the next call;
- ``M_ARENA_MAX`` = 1: threads created afterwards (MONAI Label's request threads, the prefetcher) share that
  heap; a thread arena would still ``mmap`` every large block.

The cost: the process's resident memory stays near its peak instead of shrinking after each request.
``CASAM_MALLOC_KEEP_MB=0`` leaves glibc's defaults. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from typing import Optional

# "auto": CUDA when torch sees a GPU, else the CPU (resolve_device), for the command line, the MONAI Label app,
# the bundle and the benchmarks alike. Layers are stored on the CPU, so a layer trained on a GPU serves anywhere.
DEFAULT_DEVICE = "auto"

# glibc keeps this much freed memory for reuse (tune_allocator): no page faults for every large tensor.
MALLOC_KEEP_MB = 2047


log = logging.getLogger(__name__)

# mallopt parameters of glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MAX_KEEP_MB = (2**31 - 1) // 2**20  # mallopt takes a C int of bytes: 2047 MiB

_applied: Optional[bool] = None


def glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose allocator :func:`tune_allocator` sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tune_allocator(keep_mb: Optional[int] = None) -> bool:
    """Makes glibc keep freed memory for reuse (see the module docstring). Only the first call acts.

    Call it before the threads that do the work are started: the app does so at start-up, and
    :func:`casam.model.backbone.load_backbone` calls it too.

    Args:
        keep_mb: MiB kept (default ``CASAM_MALLOC_KEEP_MB``, 2047; 0 leaves glibc's defaults; capped at
            ``MAX_KEEP_MB``, the most ``mallopt``'s int takes).

    Returns:
        Whether glibc's settings are now changed.
    """
    global _applied
    if _applied is not None:
        return _applied
    keep = malloc_keep_mb() if keep_mb is None else keep_mb
    _applied = False
    if keep <= 0 or not glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        value = min(int(keep), MAX_KEEP_MB) * 2**20
        ok = all(libc.mallopt(p, v) == 1 for p, v in
                 ((M_MMAP_THRESHOLD, value), (M_TRIM_THRESHOLD, value), (M_ARENA_MAX, 1)))
    except (OSError, AttributeError) as e:  # no libc or no mallopt: nothing to tune
        log.debug("allocator not tuned: %s", e)
        return False
    _applied = ok
    if ok:
        log.info("glibc malloc keeps up to %d MiB of freed memory for reuse (CASAM_MALLOC_KEEP_MB)", value // 2**20)
    return ok


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` changed glibc's settings in this process."""
    return bool(_applied)


def resolve_device(device: Optional[str] = None) -> str:
    """The torch device a device option names.

    Args:
        device: ``auto`` (also ``None`` or empty: :data:`DEFAULT_DEVICE`), ``cpu``, ``cuda``, ``cuda:1``, …

    Returns:
        ``device`` itself, or for ``auto`` ``cuda`` when torch sees a GPU and ``cpu`` otherwise.
    """
    device = str(device or DEFAULT_DEVICE)
    if device != "auto":
        return device
    import torch  # only here: reading paths and defaults needs no torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def malloc_keep_mb() -> int:
    """Returns ``$CASAM_MALLOC_KEEP_MB`` (default 2047; 0 or an unreadable value: leave glibc's defaults)."""
    try:
        return int(os.environ.get("CASAM_MALLOC_KEEP_MB", MALLOC_KEEP_MB))
    except ValueError:
        return 0
