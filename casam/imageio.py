"""Reading clinical images with their geometry, and writing labels back in that geometry.

2D pictures (PNG/JPEG/TIFF/BMP) are read as H×W(×C) arrays; volumes (NIfTI, NRRD, MHA, a DICOM series
folder) with SimpleITK as D×H×W arrays (slice, row, column), so that a voxel index ``[i, j, k]`` as 3D
Slicer and OHIF send it is ``array[k, j, i]``. A label written with :func:`write_label` carries the
image's origin, spacing and direction, so viewers overlay it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .data import IMAGE_SUFFIXES, read_image
from .errors import ImageError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@dataclass
class ClinicalImage:
    """An image array with what is needed to write a label in its geometry.

    Attributes:
        array: H×W(×C) for a 2D picture, D×H×W for a volume.
        is_volume: True for a 3D volume.
        path: where it was read from.
        reference: the SimpleITK image it came from (volumes), for geometry; None for 2D pictures.
        dicom: the first DICOM dataset of a series folder (header only), else None.
    """

    array: np.ndarray
    is_volume: bool
    path: Path
    reference: Any = None
    dicom: Any = None


def _dicom_files(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_dicom_header(folder: str | Path) -> Any:
    """Returns the header of the first readable DICOM file in a folder (None if there is none)."""
    import pydicom

    for p in _dicom_files(Path(folder)):
        try:
            return pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception:
            continue
    return None


def read_clinical(path: str | Path) -> ClinicalImage:
    """Reads a 2D picture, a volume file or a DICOM series folder.

    Args:
        path: file or DICOM folder.

    Returns:
        The ClinicalImage. Volumes with a single slice stay volumes (1×H×W).

    Raises:
        ImageError: missing, corrupt or unsupported file.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"no such image: {path}")
    suffix = _suffix(path)
    if path.is_file() and suffix in IMAGE_SUFFIXES + (".npy",):
        arr = read_image(path)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise ImageError(f"{path}: expected a grey or RGB picture, got shape {arr.shape}")
        return ClinicalImage(arr, False, path)
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ImageError(f"{path}: no DICOM series in this folder")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            img = reader.Execute()
            header = read_dicom_header(path)
        else:
            img = sitk.ReadImage(str(path))
            header = None
    except ImageError:
        raise
    except Exception as e:  # SimpleITK raises RuntimeError with a long ITK trace
        first = str(e).strip().splitlines()
        raise ImageError(f"cannot read image {path.name}: {first[-1] if first else e}") from e
    if img.GetNumberOfComponentsPerPixel() > 1:
        if img.GetDimension() == 2:
            return ClinicalImage(sitk.GetArrayFromImage(img), False, path, img, header)
        raise ImageError(f"{path.name}: multi-component volumes are not supported")
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 2:
        return ClinicalImage(arr, False, path, img, header)
    if arr.ndim != 3:
        raise ImageError(f"{path.name}: expected a 2D or 3D image, got {arr.ndim}D")
    return ClinicalImage(arr, True, path, img, header)


def write_label(label: np.ndarray, like: ClinicalImage, out: str | Path, dtype: str = "uint8") -> Path:
    """Writes a label array in the geometry of ``like``.

    Args:
        label: H×W (2D picture) or D×H×W (volume) class ids.
        like: the image it belongs to.
        out: output file; its suffix picks the format (.nrrd, .nii.gz, .png, …).
        dtype: numpy dtype of the stored values.

    Returns:
        The written path.

    Raises:
        ImageError: the label's shape does not match the image.
    """
    import SimpleITK as sitk

    out = Path(out)
    expect = like.array.shape if like.is_volume else like.array.shape[:2]
    if tuple(label.shape) != tuple(expect):
        raise ImageError(f"label shape {label.shape} does not match the image {tuple(expect)}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(label.astype(dtype)))
    ref = like.reference
    if ref is not None and ref.GetDimension() == img.GetDimension():
        img.SetOrigin(ref.GetOrigin())
        img.SetSpacing(ref.GetSpacing())
        img.SetDirection(ref.GetDirection())
    sitk.WriteImage(img, str(out), True)
    return out


def read_label(path: str | Path, like: Optional[ClinicalImage] = None) -> np.ndarray:
    """Reads a label file (any format :func:`read_clinical` reads) as uint8 class ids.

    Args:
        path: the label file.
        like: when given, the label must match this image's shape (a 1-slice volume label of a 2D picture is
            squeezed). A volume label on another voxel grid (e.g. a DICOM SEG that stores only the slices
            with segments, converted to NIfTI) is resampled onto the image's grid by physical position.

    Raises:
        ImageError: unreadable, not a label, or the wrong shape.
    """
    src = read_clinical(path)
    lab = src.array
    if like is not None and like.is_volume and src.is_volume and _other_grid(src.reference, like.reference):
        lab = _resample_onto(src.reference, like.reference)
    if like is not None and not like.is_volume:
        if lab.ndim == 3 and lab.shape[0] == 1:
            lab = lab[0]
        if lab.ndim == 3 and lab.shape[-1] in (3, 4):
            lab = lab[..., 0]
    expect = like.array.shape if like is not None and like.is_volume else (like.array.shape[:2] if like is not None else lab.shape)
    if tuple(lab.shape) != tuple(expect):
        raise ImageError(f"label {Path(path).name} has shape {lab.shape}, its image {tuple(expect)}")
    if not np.isfinite(lab).all() or lab.min() < 0 or lab.max() > 255:
        raise ImageError(f"label {Path(path).name} is not a map of class ids 0..255")
    return lab.astype(np.uint8)


def _other_grid(a: Any, b: Any, tol: float = 1e-3) -> bool:
    """True when two SimpleITK images do not share one voxel grid (size, origin, spacing, direction)."""
    if a is None or b is None:
        return False
    if a.GetSize() != b.GetSize():
        return True
    pairs = [(a.GetOrigin(), b.GetOrigin()), (a.GetSpacing(), b.GetSpacing()), (a.GetDirection(), b.GetDirection())]
    return any(not np.allclose(x, y, atol=tol) for x, y in pairs)


def _resample_onto(label: Any, reference: Any) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto a reference grid; outside the label → 0."""
    import SimpleITK as sitk

    out = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return sitk.GetArrayFromImage(out)
