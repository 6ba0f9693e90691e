"""One place for casam's paths and defaults (in the spirit of nnU-Net's paths module).

Environment variables:
    CASAM_HOME: root for casam's own files (default ``~/.casam``).
    CASAM_REGISTRY: default layer registry folder (default ``$CASAM_HOME/registry``; the MONAI Label app's:
        ``<app>/model/registry``).
    CASAM_CACHE: embedding cache folder (default ``$CASAM_HOME/cache``; the app's: ``<app>/model/cache``).
    CASAM_DATA: folder of task datasets with a MANIFEST.tsv (default ``../shared/data`` next to the checkout).
    CASAM_SITE_DATA, CASAM_SITE_INSTITUTION: a federated site's labelled data (a dataset folder or a MONAI Label
        studies folder) and the institution it trains a layer for (default: the NVFlare site name).
    CASAM_MALLOC_KEEP_MB: MiB of freed memory glibc keeps for reuse instead of page-faulting it in again
        (default 2047; 0 leaves glibc's defaults; see :mod:`casam.runtime`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

DEFAULT_BACKBONE = "litemedsam"
# "auto": CUDA when torch sees a GPU, else the CPU (casam.config.resolve_device), for the command line, the
# MONAI Label app, the bundle and the benchmarks alike. Layers are stored on the CPU, so a layer trained on a GPU
# serves on a CPU-only box.
DEFAULT_DEVICE = "auto"
EMBED_DIM = 256
EMBED_SIZE = 64
# Values of METHOD.md (the CA-SAM paper / its code).
ALIGN_BLOCKS = 3
VAE_BETA = 16.5
VAE_HIDDEN = 128
VAE_LATENT = 64
TAU_PERCENTILE = 97.0
TAU_FOLDS = 5
# Not METHOD's: its code trains the router VAE for 10 epochs, which leaves it barely trained (the score is then
# little more than a per-channel distance from the training mean) and lets images of a new modality through:
# on the full dermoscopy training split (128 images) 81 % of MRI and ultrasound test images fell back, 95-98 %
# after 100 epochs (4 seeds; README, "Router"). Costs a few seconds per layer on a 2-core CPU.
VAE_EPOCHS = 100
# Federated CA-SAM (casam.federated): labelled training images a site needs before it trains a layer, and how
# far below plain SAM (per prompt type, on the site's validation patients) a returned layer may be and still merge.
FED_MIN_LABELS = 5
FED_MAX_VAL_DROP = 0.02
# The gate serves a layer for a prompt type only on evidence (casam.evidence): on the layer's validation masks
# the mean paired IoU gain over plain SAM is at least GATE_MIN_GAIN and more than GATE_SE times its standard
# error, measured on at least GATE_MIN_MASKS masks. (A 0.0001 gain on three images is noise, not a reason to
# serve a layer; one mask has no spread to measure, so it is no evidence at all.)
GATE_MIN_GAIN = 0.005
GATE_SE = 2.0
GATE_MIN_MASKS = 2
# Optimiser steps of an institution's refinement head (casam.refine); 0 trains none.
HEAD_STEPS = 400
# Clicks of each validation sequence that decides whether corrective clicks' edits stand against a head
# (casam.training.click_edit_evidence: the first click and CLICK_EDIT_CLICKS - 1 corrective ones).
CLICK_EDIT_CLICKS = 3
# glibc keeps this much freed memory for reuse (casam.runtime): no page faults for every large tensor.
MALLOC_KEEP_MB = 2047


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


def default_data() -> Path:
    """Returns the folder of datasets (``$CASAM_DATA`` or ``../shared/data`` beside the checkout)."""
    env = os.environ.get("CASAM_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"
