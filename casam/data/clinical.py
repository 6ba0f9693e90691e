"""Reading clinical images with their geometry, and writing labels back in that geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np

from casam.data.datasets import read_image
from casam.data.dicom import dicom_files, read_dicom_header
from casam.data.formats import IMAGE_SUFFIXES, VOLUME_IOS, suffix_of
from casam.data.safety import (
    ImageLimits,
    check_detached,
    check_dicom_files,
    check_meta,
    check_nifti,
    clean_message,
    finite_voxels,
    picture_size,
)
from casam.errors import ImageError, LimitError


@dataclass
class ClinicalImage:
    """An image array with what is needed to write a label in its geometry.

    Attributes:
        array: H×W(×C) for a 2D picture, D×H×W for a volume.
        is_volume: True for a 3D volume.
        path: where it was read from.
        reference: the SimpleITK image it came from (volumes), for geometry; None for 2D pictures.
        dicom: the first DICOM dataset of a series folder (header only), else None.
        notes: what was changed while reading (e.g. non-finite voxels replaced), for the user.
    """

    array: np.ndarray
    is_volume: bool
    path: Path
    reference: Any = None
    dicom: Any = None
    notes: List[str] = field(default_factory=list)




def read_clinical(path: str | Path, name: Optional[str] = None, limits: Optional[ImageLimits] = None) -> ClinicalImage:
    """Reads a 2D picture, a volume file or a DICOM series folder.

    Args:
        path: file or DICOM folder.
        name: how messages call the image (e.g. its datastore id); default the file name.
        limits: size limits, checked from the header before the pixels are read.

    Returns:
        The ClinicalImage. Volumes with a single slice stay volumes (1×H×W).

    Raises:
        ImageError: missing, corrupt, truncated, complex or unsupported file.
        LimitError: over one of ``limits``.
    """
    path = Path(path)
    name = name or path.name
    limits = limits or ImageLimits()
    if not path.exists():
        raise ImageError(f"no such image: {name}")
    suffix = suffix_of(path)
    notes: List[str] = []
    if path.is_file():
        limits.check_bytes(f"image {name}", path.stat().st_size)
    if path.is_file() and suffix in IMAGE_SUFFIXES:
        try:
            limits.check(name, picture_size(path), volume=False)
            arr = read_image(path)
        except LimitError:
            raise
        except Exception as e:  # any decoder's error (Pillow, NumPy, a warning turned into an error)
            cause = e.__cause__ if isinstance(e, ImageError) and e.__cause__ is not None else e  # read_image's own
            raise ImageError(f"cannot read image {name}: {clean_message(cause, path, name)}") from e
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise ImageError(f"{name}: expected a grey or RGB picture, got shape {arr.shape}")
        return ClinicalImage(finite_voxels(arr, name, notes), False, path, notes=notes)
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ImageError(f"{name}: no DICOM series in this folder")
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            check_dicom_files(dicom_files(path), name)
            first = sitk.ImageFileReader()
            first.SetFileName(files[0])
            first.ReadImageInformation()
            limits.check(name, int(np.prod(first.GetSize()[:2], dtype=np.int64)) * len(files), volume=True)
            reader.SetFileNames(files)
            img = reader.Execute()
            header = read_dicom_header(path)
        else:
            if suffix in (".nii", ".nii.gz"):
                check_nifti(path, name, limits)
            if suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
                check_detached(path, name)
            if suffix in (".mha", ".mhd"):
                check_meta(path, name, limits)
            if suffix == ".dcm":
                check_dicom_files([path], name)
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            if suffix in VOLUME_IOS:
                reader.SetImageIO(VOLUME_IOS[suffix])  # the reader its name says, not whichever takes the bytes
            reader.ReadImageInformation()
            size = reader.GetSize()
            limits.check(name, int(np.prod(size, dtype=np.int64)), volume=len(size) > 2 and size[2] > 1)
            img = reader.Execute()
            header = None
    except (ImageError, LimitError):
        raise
    except Exception as e:  # SimpleITK raises RuntimeError with a long ITK trace
        raise ImageError(f"cannot read image {name}: {clean_message(e, path, name)}") from e
    if "complex" in img.GetPixelIDTypeAsString():
        raise ImageError(f"cannot read image {name}: complex values (send its magnitude)")
    if img.GetNumberOfComponentsPerPixel() > 1:
        if img.GetDimension() == 2:
            arr = finite_voxels(sitk.GetArrayFromImage(img), name, notes)
            return ClinicalImage(arr, False, path, img, header, notes)
        raise ImageError(f"{name}: multi-component volumes are not supported")
    arr = finite_voxels(sitk.GetArrayFromImage(img), name, notes)
    if arr.ndim == 2:
        return ClinicalImage(arr, False, path, img, header, notes)
    if arr.ndim != 3:
        raise ImageError(f"{name}: expected a 2D or 3D image, got {arr.ndim}D")
    return ClinicalImage(arr, True, path, img, header, notes)


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


def read_label(
    path: str | Path,
    like: Optional[ClinicalImage] = None,
    name: Optional[str] = None,
    limits: Optional[ImageLimits] = None,
) -> np.ndarray:
    """Reads a label file (any format :func:`read_clinical` reads) as uint8 class ids.

    Args:
        path: the label file.
        like: when given, the label must fit this image. A label with the image's shape is taken voxel for
            voxel (whatever its header says: scripts often write none); a 1-slice volume label of a 2D picture
            is squeezed. A volume label on another voxel grid (e.g. a DICOM SEG that stores only the slices
            with segments, converted to NIfTI) is resampled onto the image's grid by physical position, only
            when its extent overlaps the image's.
        name: how messages call the label (default the file name).
        limits: size limits for reading it.

    Raises:
        ImageError: unreadable, not integer class ids 0..255, the wrong shape, or on a grid that does not
            overlap the image.
    """
    name = name or Path(path).name
    src = read_clinical(path, name=f"label {name}", limits=limits)
    lab = src.array
    expect = (
        like.array.shape
        if like is not None and like.is_volume
        else (like.array.shape[:2] if like is not None else lab.shape)
    )
    if (
        like is not None
        and like.is_volume
        and src.is_volume
        and tuple(lab.shape) != tuple(expect)
        and _other_grid(src.reference, like.reference)
    ):
        if not _overlaps(src.reference, like.reference):
            raise ImageError(f"label {name} ({lab.shape}) lies outside its image's extent: refused")
        lab = _resample_onto(src.reference, like.reference)
    if like is not None and not like.is_volume:
        if lab.ndim == 3 and lab.shape[0] == 1:
            lab = lab[0]
        if lab.ndim == 3 and lab.shape[-1] in (3, 4):
            lab = lab[..., 0]
    if tuple(lab.shape) != tuple(expect):
        raise ImageError(f"label {name} has shape {lab.shape}, its image {tuple(expect)}")
    if src.notes or not np.isfinite(lab).all() or lab.min() < 0 or lab.max() > 255:
        raise ImageError(f"label {name} is not a map of class ids 0..255")
    if lab.dtype.kind == "f" and not np.array_equal(lab, np.round(lab)):
        raise ImageError(f"label {name} has non-integer values: class ids must be integers")
    return lab.astype(np.uint8)


def check_label(
    path: str | Path, like: ClinicalImage, name: Optional[str] = None, limits: Optional[ImageLimits] = None
) -> np.ndarray:
    """A final label as it may be saved and trained on: :func:`read_label` against its image, and not empty.

    Raises:
        ImageError: see :func:`read_label`; or the label has no labelled voxel.
    """
    lab = read_label(path, like, name, limits)
    if not lab.any():
        raise ImageError(f"label {name or Path(path).name} is empty (no labelled voxel)")
    return lab


def _extent(img: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Physical bounding box (min corner, max corner) of a SimpleITK image's voxel centres."""
    size = img.GetSize()
    corners = [
        img.TransformContinuousIndexToPhysicalPoint([c * (s - 1) for c, s in zip(bits, size)])
        for bits in np.ndindex(*([2] * img.GetDimension()))
    ]
    pts = np.array(corners, dtype=np.float64)
    return pts.min(0), pts.max(0)


def _overlaps(a: Any, b: Any) -> bool:
    """True when the physical extents of two images overlap (by at least half a voxel of ``b``)."""
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    tol = np.asarray(b.GetSpacing(), np.float64) / 2
    return bool(np.all(a0 <= b1 + tol) and np.all(b0 <= a1 + tol))


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
