"""Reading clinical images with their geometry, and writing labels back in that geometry.

2D pictures (PNG/JPEG/TIFF/BMP) are read as H×W(×C) arrays; volumes (NIfTI, NRRD, MHA, a DICOM series
folder) with SimpleITK as D×H×W arrays (slice, row, column), so that a voxel index ``[i, j, k]`` as 3D
Slicer and OHIF send it is ``array[k, j, i]``. A label written with :func:`write_label` carries the
image's origin, spacing and direction, so viewers overlay it exactly.

Reading is defensive (files may come from an untrusted upload): the size is checked from the header before any
pixel is read (:class:`ImageLimits`), a gzip stream must be complete and intact, a NIfTI file must hold every
voxel its header announces, DICOM files every pixel byte, a detached header may only name a data file beside
it, complex images are refused and non-finite voxels are replaced (and reported in ``ClinicalImage.notes``).
A file is read only by the reader its name says (a ``.png`` must be a PNG, a ``.nrrd`` a NRRD: never a GIF or
a DICOM file that another reader would take), and every reader's error (Pillow's decompression-bomb errors,
warnings turned into errors, decoder and ITK exceptions) becomes an :class:`ImageError` or :class:`LimitError`.
Messages name the image as the caller calls it (``name``), never its path on the server.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np

from .data import IMAGE_SUFFIXES, read_image
from .errors import ImageError, LimitError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# the only reader a file of each suffix is read with (Pillow formats; SimpleITK ImageIOs)
PICTURE_FORMATS = {".png": ("PNG",), ".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".tif": ("TIFF",),
                   ".tiff": ("TIFF",), ".bmp": ("BMP", "DIB")}
VOLUME_IOS = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
              ".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".dcm": "GDCMImageIO"}
_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")  # Pillow's DecompressionBombError/Warning: "Image size (N pixels) ..."


@dataclass
class ImageLimits:
    """Largest image :func:`read_clinical` reads (None = no limit); checked from the header, before the pixels.

    Attributes:
        max_voxels: voxels of a volume (D×H×W).
        max_pixels: pixels of a 2D picture (H×W).
        max_bytes: bytes of the file, and of its decompressed gzip stream.
    """

    max_voxels: Optional[int] = None
    max_pixels: Optional[int] = None
    max_bytes: Optional[int] = None

    def check(self, name: str, n: int, volume: bool) -> None:
        """Raises LimitError when an image of ``n`` voxels (or pixels for a 2D picture) is over the limit."""
        if volume and self.max_voxels is not None and n > self.max_voxels:
            raise LimitError(f"image {name} has {n} voxels", "max_image_voxels", n, self.max_voxels)
        if not volume and self.max_pixels is not None and n > self.max_pixels:
            raise LimitError(f"image {name} has {n / 1e6:.1f} megapixels", "max_image_megapixels",
                             round(n / 1e6, 1), self.max_pixels / 1e6)

    def check_bytes(self, name: str, n: int) -> None:
        """Raises LimitError when ``n`` bytes are over ``max_bytes``."""
        if self.max_bytes is not None and n > self.max_bytes:
            raise LimitError(f"{name} has {n / 2**20:.2f} MB", "max_upload_mb", round(n / 2**20, 2),
                             round(self.max_bytes / 2**20, 3))


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
        notes: what was changed while reading (e.g. non-finite voxels replaced), for the user.
    """

    array: np.ndarray
    is_volume: bool
    path: Path
    reference: Any = None
    dicom: Any = None
    notes: List[str] = field(default_factory=list)


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


def _clean(message: str, path: Path, name: str) -> str:
    """A reader's error message with the server path (and temporary file name) replaced by ``name``."""
    msg = str(message).strip().splitlines()
    msg = msg[-1] if msg else "unreadable"
    for p in sorted({str(path.resolve()), str(path.resolve().parent), str(path)}, key=len, reverse=True):
        if len(p) > 1:
            msg = msg.replace(p, name if p != str(path.resolve().parent) else "<folder>")
    msg = re.sub(r"(/[^\s'\"]+)+", "<path>", msg)  # any other absolute path a library put in
    return msg.replace(path.name, name)


def _gunzip_size(path: Path, name: str, max_bytes: int) -> int:
    """Decompresses a gzip file to nowhere, checking its CRC and end; returns the decompressed size.

    Raises:
        ImageError: truncated or corrupt stream, or more than ``max_bytes`` once decompressed.
    """
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
                if n > max_bytes:
                    raise ImageError(f"cannot read image {name}: it decompresses to more than its header announces")
    except (OSError, EOFError, zlib.error) as e:
        raise ImageError(f"cannot read image {name}: truncated or corrupt gzip file ({_clean(e, path, name)})") from e
    return n


def _nifti_expected(header: bytes) -> Optional[Tuple[int, int, Tuple[int, ...]]]:
    """(voxel offset, data bytes, dimensions) a NIfTI-1/2 header announces; None when it is not one."""
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0] if len(header) >= 4 else 0
        if (size == 348 and header[344:348] != b"n+1\0") or (size == 540 and header[4:8] != b"n+2\0"):
            return None  # an Analyze header, or a .hdr/.img pair's: not a single-file NIfTI
        if size == 348 and len(header) >= 348:
            dim = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif size == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dim = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        nd = int(dim[0])
        dims = tuple(int(d) for d in dim[1: nd + 1]) if 1 <= nd <= 7 else ()
        if not dims or any(d < 1 for d in dims) or bitpix <= 0 or offset < 0:
            return 0, -1, ()  # an impossible header
        return offset, int(np.prod(dims, dtype=np.float64)) * bitpix // 8, dims
    return None


def _check_nifti(path: Path, name: str, limits: ImageLimits) -> None:
    """A NIfTI file (gzip or not) must be within the limits and complete: header + every voxel it announces."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            expected = _nifti_expected(f.read(540))
    except (OSError, EOFError, zlib.error) as e:
        raise ImageError(f"cannot read image {name}: truncated or corrupt gzip file ({_clean(e, path, name)})") from e
    if expected is None:
        raise ImageError(f"cannot read image {name}: not a NIfTI file (no single-file NIfTI header, magic n+1 or n+2)")
    offset, nbytes, dims = expected
    if nbytes < 0:
        raise ImageError(f"cannot read image {name}: corrupt NIfTI header (impossible dimensions)")
    limits.check(name, int(np.prod(dims, dtype=np.float64)), volume=len(dims) > 2 and dims[2] > 1)
    size = _gunzip_size(path, name, offset + nbytes + (1 << 20)) if gz else path.stat().st_size
    if size < offset + nbytes:
        raise ImageError(f"cannot read image {name}: truncated, {size} bytes where its NIfTI header announces {offset + nbytes}")


_DATA_FILE = re.compile(rb"^\s*(data ?file|ElementDataFile)\s*[:=]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def _check_detached(path: Path, name: str) -> None:
    """A NRRD / MetaImage header may name a data file only beside it (never another path on the server)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if path.suffix.lower() in (".nrrd", ".nhdr"):
        head = head.split(b"\n\n", 1)[0]  # the NRRD header ends at the first blank line
    m = _DATA_FILE.search(head)  # MetaImage: ElementDataFile is the header's last line
    ref = m.group(2).decode(errors="replace").strip() if m else "LOCAL"
    if ref.upper() == "LOCAL":
        return
    if ref.upper().startswith("LIST") or "/" in ref or "\\" in ref or ".." in ref or "%" in ref or " " in ref:
        raise ImageError(f"cannot read image {name}: its header names a data file outside its folder ({ref!r})")


_META_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_FLOAT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_DOUBLE": 8}
_META_LOCAL = re.compile(rb"^[ \t]*ElementDataFile[ \t]*=[ \t]*LOCAL[ \t]*\r?\n", re.IGNORECASE | re.MULTILINE)


def _inflate_size(path: Path, offset: int, name: str, max_bytes: int) -> int:
    """Inflates the zlib stream from ``offset`` of a file to nowhere; returns its size (at most ``max_bytes`` + 1 MiB).

    Raises:
        ImageError: a corrupt stream.
    """
    d, n = zlib.decompressobj(), 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while n <= max_bytes and not d.eof:
                chunk = d.unconsumed_tail or f.read(1 << 20)
                if not chunk:
                    break
                n += len(d.decompress(chunk, 1 << 20))
    except zlib.error as e:
        raise ImageError(f"cannot read image {name}: corrupt compressed data ({e})") from e
    return n


def _check_meta(path: Path, name: str, limits: ImageLimits) -> None:
    """A MetaImage file holding its data (``ElementDataFile = LOCAL``) must be within the limits and hold every
    byte its header announces; compressed, as an intact zlib stream that inflates to them.

    Raises:
        ImageError: impossible dimensions, truncated data, a corrupt stream.
        LimitError: over ``limits`` (from the header).
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    end = _META_LOCAL.search(head)
    if end is None and not _DATA_FILE.search(head):
        raise ImageError(f"cannot read image {name}: not a MetaImage file (no ElementDataFile in its header)")
    if end is None:
        return  # data in a file beside it (see _check_detached)
    fields = {k.strip().lower(): v.strip() for k, eq, v in (line.partition(b"=") for line in head[:end.start()].splitlines()) if eq}
    try:
        dims = [int(d) for d in fields.get(b"dimsize", b"").split()]
        channels = int(fields.get(b"elementnumberofchannels", b"1"))
    except ValueError:
        dims, channels = [], 0
    if not dims or any(d < 1 for d in dims) or channels < 1:
        raise ImageError(f"cannot read image {name}: corrupt MetaImage header (impossible DimSize)")
    voxels = int(np.prod(dims, dtype=np.float64))
    limits.check(name, voxels, volume=len(dims) > 2 and dims[2] > 1)
    size = _META_BYTES.get(fields.get(b"elementtype", b"").decode(errors="replace").upper())
    if size is None:
        return  # an element type ITK knows better: its reader checks it
    need = voxels * channels * size
    if fields.get(b"compresseddata", b"").lower() == b"true":
        got = _inflate_size(path, end.end(), name, need)
    else:
        got = path.stat().st_size - end.end()
    if got < need:
        raise ImageError(f"cannot read image {name}: truncated, {got} bytes of data where its MetaImage header "
                         f"announces {need}")


def _check_dicom_files(files: List[Path], name: str) -> None:
    """Every DICOM file of a series must hold all the pixel bytes its header announces (uncompressed data)."""
    import pydicom

    for p in files:
        try:
            ds = pydicom.dcmread(str(p))
            data = ds.get("PixelData")
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        except Exception as e:
            raise ImageError(f"cannot read image {name}: a DICOM file is corrupt ({_clean(e, p, name)})") from e
        if data is None or (syntax is not None and syntax.is_compressed):  # compressed: its decoder checks it
            continue
        need = int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("SamplesPerPixel", 1)) * \
            int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("BitsAllocated", 8)) // 8
        if len(data) < need:
            raise ImageError(f"cannot read image {name}: a DICOM file is truncated ({len(data)} pixel bytes, {need} expected)")


def _finite(arr: np.ndarray, name: str, notes: List[str]) -> np.ndarray:
    """Refuses complex arrays; replaces non-finite voxels by the smallest finite value (noted)."""
    if np.iscomplexobj(arr):
        raise ImageError(f"cannot read image {name}: complex values (send its magnitude)")
    if arr.dtype.kind != "f":
        return arr
    bad = ~np.isfinite(arr)
    n = int(bad.sum())
    if n:
        if n == arr.size:
            raise ImageError(f"image {name} has no finite value (all NaN/Inf)")
        fill = float(arr[~bad].min())
        arr = np.where(bad, fill, arr).astype(arr.dtype)
        notes.append(f"{n} non-finite voxels (NaN/Inf) of {name} were set to {fill:g}")
    return arr


def _picture_size(path: Path) -> int:
    """Pixels of a 2D picture from its header (PIL opens lazily; a .npy is memory-mapped).

    Only the Pillow format its suffix names opens it (a GIF named ``.png`` is refused). A size Pillow refuses as
    a decompression bomb (its error above twice ``Image.MAX_IMAGE_PIXELS``, its warning above it, raised when
    warnings are errors) is still returned, for the caller's limit to name.

    Raises:
        Exception: whatever Pillow or NumPy raise for a file they cannot take.
    """
    if path.suffix.lower() == ".npy":
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        return int(np.prod(shape[:2], dtype=np.int64)) if shape else 0
    from PIL import Image

    try:
        with Image.open(path, formats=PICTURE_FORMATS.get(path.suffix.lower())) as im:
            return int(im.size[0]) * int(im.size[1])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = _BOMB_SIZE.search(str(e))
        if found is None:
            raise
        return int(found.group(1))


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
    suffix = _suffix(path)
    notes: List[str] = []
    if path.is_file():
        limits.check_bytes(f"image {name}", path.stat().st_size)
    if path.is_file() and suffix in IMAGE_SUFFIXES + (".npy",):
        try:
            limits.check(name, _picture_size(path), volume=False)
            arr = read_image(path)
        except LimitError:
            raise
        except Exception as e:  # any decoder's error (Pillow, NumPy, a warning turned into an error)
            cause = e.__cause__ if isinstance(e, ImageError) and e.__cause__ is not None else e  # read_image's own
            raise ImageError(f"cannot read image {name}: {_clean(cause, path, name)}") from e
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise ImageError(f"{name}: expected a grey or RGB picture, got shape {arr.shape}")
        return ClinicalImage(_finite(arr, name, notes), False, path, notes=notes)
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ImageError(f"{name}: no DICOM series in this folder")
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            _check_dicom_files(_dicom_files(path), name)
            first = sitk.ImageFileReader()
            first.SetFileName(files[0])
            first.ReadImageInformation()
            limits.check(name, int(np.prod(first.GetSize()[:2], dtype=np.int64)) * len(files), volume=True)
            reader.SetFileNames(files)
            img = reader.Execute()
            header = read_dicom_header(path)
        else:
            if suffix in (".nii", ".nii.gz"):
                _check_nifti(path, name, limits)
            if suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
                _check_detached(path, name)
            if suffix in (".mha", ".mhd"):
                _check_meta(path, name, limits)
            if suffix == ".dcm":
                _check_dicom_files([path], name)
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
        raise ImageError(f"cannot read image {name}: {_clean(e, path, name)}") from e
    if "complex" in img.GetPixelIDTypeAsString():
        raise ImageError(f"cannot read image {name}: complex values (send its magnitude)")
    if img.GetNumberOfComponentsPerPixel() > 1:
        if img.GetDimension() == 2:
            return ClinicalImage(_finite(sitk.GetArrayFromImage(img), name, notes), False, path, img, header, notes)
        raise ImageError(f"{name}: multi-component volumes are not supported")
    arr = _finite(sitk.GetArrayFromImage(img), name, notes)
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


def read_label(path: str | Path, like: Optional[ClinicalImage] = None, name: Optional[str] = None,
               limits: Optional[ImageLimits] = None) -> np.ndarray:
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
    expect = like.array.shape if like is not None and like.is_volume else (like.array.shape[:2] if like is not None else lab.shape)
    if like is not None and like.is_volume and src.is_volume and tuple(lab.shape) != tuple(expect) \
            and _other_grid(src.reference, like.reference):
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


def check_label(path: str | Path, like: ClinicalImage, name: Optional[str] = None,
                limits: Optional[ImageLimits] = None) -> np.ndarray:
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
    corners = [img.TransformContinuousIndexToPhysicalPoint([c * (s - 1) for c, s in zip(bits, size)])
               for bits in np.ndindex(*([2] * img.GetDimension()))]
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
