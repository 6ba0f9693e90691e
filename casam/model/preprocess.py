"""Image preprocessing for SAM backbones: one place for resizing, padding, intensity and coordinates.

An image of any size goes to the backbone as a square ``S×S`` RGB tensor: longest side resized to ``S``
(aspect kept), padded bottom/right with zeros, intensities normalised as the backbone expects. The
:class:`Geometry` of that transform maps prompts into the model frame and logits back to the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from casam.errors import ImageError

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

Window = Union[None, str, Tuple[float, float]]


@dataclass(frozen=True)
class Geometry:
    """How an image was placed into the square model input.

    Attributes:
        orig_hw: height and width of the original image.
        resized_hw: height and width after resizing (before padding).
        size: side of the square model input.
    """

    orig_hw: Tuple[int, int]
    resized_hw: Tuple[int, int]
    size: int

    @property
    def scale(self) -> Tuple[float, float]:
        """Returns (sx, sy): model pixels per original pixel along x (columns) and y (rows)."""
        return self.resized_hw[1] / self.orig_hw[1], self.resized_hw[0] / self.orig_hw[0]


def geometry_for(hw: Sequence[int], size: int) -> Geometry:
    """Computes the :class:`Geometry` of an image of shape ``hw`` resized into a ``size`` square.

    Args:
        hw: (height, width) of the image.
        size: side of the model input.

    Returns:
        The geometry.
    """
    h, w = int(hw[0]), int(hw[1])
    s = size / max(h, w)
    return Geometry((h, w), (max(1, int(round(h * s))), max(1, int(round(w * s)))), size)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Turns a 2D grey or HxWxC image into a float32 HxWx3 array.

    Args:
        image: HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped) array of any numeric dtype.

    Returns:
        float32 array HxWx3.

    Raises:
        ImageError: the array is not an image (wrong number of dimensions or channels, empty, not finite).
    """
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number):
        raise ImageError(f"image must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3] if arr.shape[-1] != 1 else arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(
            f"expected a 2D image (HxW or HxWxC with C in 1,3,4), got shape {tuple(np.asarray(image).shape)}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageError(f"image too small: {arr.shape[:2]}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ImageError("image contains NaN or infinite values")
    return arr


def apply_window(image: np.ndarray, window: Window = "auto") -> np.ndarray:
    """Maps intensities to 0..255 (a CT/MR window), leaving 8-bit images alone.

    Args:
        image: float array (any shape) holding the raw intensities.
        window: ``None``/"none" keeps values; "auto" keeps values already in 0..255 and otherwise clips to the
            0.5-99.5 percentiles (MR, arbitrary units); "percentile" always does so; a pair ``(lo, hi)`` is a
            fixed window (e.g. CT in Hounsfield units, ``(-160, 240)`` for abdomen).

    Returns:
        float32 array in 0..255 (or unchanged).

    Raises:
        ImageError: an unknown window.
    """
    if window is None or window == "none":
        return image.astype(np.float32)
    if isinstance(window, str):
        if window not in ("auto", "percentile"):
            raise ImageError(f"unknown window {window!r}: use 'auto', 'percentile', 'none' or (lo, hi)")
        if window == "auto" and image.min() >= 0 and image.max() <= 255:
            return image.astype(np.float32)
        lo, hi = np.percentile(image, [0.5, 99.5])
    else:
        lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((np.clip(image, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.float32)


def to_model_input(image: np.ndarray, size: int, normalization: str,
                   window: Window = "auto") -> Tuple[torch.Tensor, Geometry]:
    """Prepares one image for a backbone.

    Args:
        image: the image (see :func:`as_rgb`).
        size: side of the square model input.
        normalization: "minmax" (MedSAM: per-image min-max to [0, 1]) or "imagenet" (SAM: (x - mean) / std on 0..255).
        window: intensity window (see :func:`apply_window`).

    Returns:
        (tensor 3×size×size float32, geometry).

    Raises:
        ImageError: a bad image or normalization.
    """
    rgb = apply_window(as_rgb(image), window)
    geom = geometry_for(rgb.shape[:2], size)
    t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
    t = F.interpolate(t, size=geom.resized_hw, mode="bilinear", align_corners=False, antialias=True)[0]
    if normalization == "minmax":
        lo, hi = t.min(), t.max()
        t = (t - lo) / torch.clamp(hi - lo, min=1e-8)
    elif normalization == "imagenet":
        t = (t - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    else:
        raise ImageError(f"unknown normalization {normalization!r}")
    out = torch.zeros(3, size, size, dtype=torch.float32)
    out[:, : geom.resized_hw[0], : geom.resized_hw[1]] = t
    return out, geom


def points_to_model(points: np.ndarray, geom: Geometry) -> np.ndarray:
    """Maps (x, y) pixel coordinates of the original image to the model input frame.

    Pixel centres are used: pixel (x, y) covers [x, x+1) and maps to ((x + 0.5) * sx, (y + 0.5) * sy).
    """
    sx, sy = geom.scale
    p = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    return np.stack([(p[:, 0] + 0.5) * sx, (p[:, 1] + 0.5) * sy], axis=1)


def box_to_model(box: Sequence[float], geom: Geometry) -> np.ndarray:
    """Maps an (x0, y0, x1, y1) box with inclusive pixel corners to the model input frame."""
    sx, sy = geom.scale
    x0, y0, x1, y1 = [float(v) for v in box]
    return np.array([x0 * sx, y0 * sy, (x1 + 1) * sx, (y1 + 1) * sy], dtype=np.float32)


def logits_to_image(logits: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Maps low-resolution mask logits (…×L×L, model frame) back to the original image size.

    Args:
        logits: tensor whose last two dims are the square low-res mask of the padded model input.
        geom: the image's geometry.

    Returns:
        Logits of shape …×H×W.
    """
    lead = logits.shape[:-2]
    x = logits.reshape(-1, 1, *logits.shape[-2:])
    x = F.interpolate(x, size=(geom.size, geom.size), mode="bilinear", align_corners=False)
    x = x[..., : geom.resized_hw[0], : geom.resized_hw[1]]
    x = F.interpolate(x, size=geom.orig_hw, mode="bilinear", align_corners=False)
    return x.reshape(*lead, *geom.orig_hw)


def mask_to_model(mask: np.ndarray, geom: Geometry, out_size: int) -> torch.Tensor:
    """Maps a binary mask of the original image to the padded model frame at ``out_size`` (nearest).

    Args:
        mask: HxW array, nonzero = foreground.
        geom: the image's geometry.
        out_size: side of the output (the decoder's low-res mask side).

    Returns:
        float32 tensor out_size×out_size of 0/1.
    """
    m = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None, None]
    r = out_size / geom.size
    hw = (max(1, int(round(geom.resized_hw[0] * r))), max(1, int(round(geom.resized_hw[1] * r))))
    m = F.interpolate(m, size=hw, mode="nearest")[0, 0]
    out = torch.zeros(out_size, out_size)
    out[: hw[0], : hw[1]] = m
    return out
