"""The image and label file formats casam reads: one table of suffix → reader, dimensionality, upload rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple, Union


@dataclass(frozen=True)
class FileFormat:
    """One file suffix and how casam reads it.

    Attributes:
        suffix: lower-case suffix with its dot (``.nii.gz`` is one suffix).
        kind: ``picture`` (2D, read with Pillow), ``array`` (2D NumPy ``.npy``) or ``volume`` (3D, SimpleITK).
        reader: the only reader a file of this suffix is read with: Pillow format names, or a SimpleITK ImageIO.
            A ``.png`` must be a PNG and a ``.nrrd`` a NRRD, never whatever another reader would take.
        uploadable: whether a client may upload it to the server. Detached headers (``.nhdr``, ``.mhd``) are
            not: they name another file, which could be any file of the server.
    """

    suffix: str
    kind: str
    reader: Tuple[str, ...]
    uploadable: bool


FORMATS: Dict[str, FileFormat] = {f.suffix: f for f in (
    FileFormat(".png", "picture", ("PNG",), True),
    FileFormat(".jpg", "picture", ("JPEG",), True),
    FileFormat(".jpeg", "picture", ("JPEG",), True),
    FileFormat(".tif", "picture", ("TIFF",), True),
    FileFormat(".tiff", "picture", ("TIFF",), True),
    FileFormat(".bmp", "picture", ("BMP", "DIB"), True),
    FileFormat(".npy", "array", (), False),
    FileFormat(".nii", "volume", ("NiftiImageIO",), True),
    FileFormat(".nii.gz", "volume", ("NiftiImageIO",), True),
    FileFormat(".nrrd", "volume", ("NrrdImageIO",), True),
    FileFormat(".nhdr", "volume", ("NrrdImageIO",), False),
    FileFormat(".mha", "volume", ("MetaImageIO",), True),
    FileFormat(".mhd", "volume", ("MetaImageIO",), False),
    FileFormat(".dcm", "volume", ("GDCMImageIO",), True),
)}

# 2D pictures, Pillow's format names for each, and the SimpleITK ImageIO of each volume suffix
PICTURE_SUFFIXES: Tuple[str, ...] = tuple(s for s, f in FORMATS.items() if f.kind == "picture")
PICTURE_FORMATS: Dict[str, Tuple[str, ...]] = {s: f.reader for s, f in FORMATS.items() if f.kind == "picture"}
VOLUME_IOS: Dict[str, str] = {s: f.reader[0] for s, f in FORMATS.items() if f.kind == "volume"}
# 2D images of a dataset folder: pictures and .npy arrays
IMAGE_SUFFIXES: Tuple[str, ...] = PICTURE_SUFFIXES + (".npy",)
UPLOAD_SUFFIXES: Tuple[str, ...] = tuple(s for s, f in FORMATS.items() if f.uploadable)


def suffix_of(path: Union[str, Path]) -> str:
    """The lower-case suffix of a file name, ``.nii.gz`` counted as one.

    Args:
        path: a file name or path.

    Returns:
        The suffix with its dot, ``""`` for none.
    """
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def strip_suffix(name: str) -> str:
    """A file name without the suffix of any format in :data:`FORMATS` (``a.nii.gz`` → ``a``)."""
    for s in sorted(FORMATS, key=len, reverse=True):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return Path(name).stem
