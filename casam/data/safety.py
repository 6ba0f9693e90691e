"""Checks that run before any pixel of an untrusted file is read: sizes, completeness, bombs."""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from casam.data.formats import PICTURE_FORMATS
from casam.errors import ImageError, LimitError

_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")  # Pillow's DecompressionBombError/Warning: "Image size (N pixels) ..."
_DATA_FILE = re.compile(rb"^\s*(data ?file|ElementDataFile)\s*[:=]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_META_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_FLOAT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_DOUBLE": 8}
_META_LOCAL = re.compile(rb"^[ \t]*ElementDataFile[ \t]*=[ \t]*LOCAL[ \t]*\r?\n", re.IGNORECASE | re.MULTILINE)


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
        raise ImageError(
            f"cannot read image {name}: truncated or corrupt gzip file ({clean_message(e, path, name)})"
        ) from e
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
        dims = tuple(int(d) for d in dim[1 : nd + 1]) if 1 <= nd <= 7 else ()
        if not dims or any(d < 1 for d in dims) or bitpix <= 0 or offset < 0:
            return 0, -1, ()  # an impossible header
        return offset, int(np.prod(dims, dtype=np.float64)) * bitpix // 8, dims
    return None


def check_nifti(path: Path, name: str, limits: ImageLimits) -> None:
    """A NIfTI file (gzip or not) must be within the limits and complete: header + every voxel it announces."""
    gz = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            expected = _nifti_expected(f.read(540))
    except (OSError, EOFError, zlib.error) as e:
        raise ImageError(
            f"cannot read image {name}: truncated or corrupt gzip file ({clean_message(e, path, name)})"
        ) from e
    if expected is None:
        raise ImageError(f"cannot read image {name}: not a NIfTI file (no single-file NIfTI header, magic n+1 or n+2)")
    offset, nbytes, dims = expected
    if nbytes < 0:
        raise ImageError(f"cannot read image {name}: corrupt NIfTI header (impossible dimensions)")
    limits.check(name, int(np.prod(dims, dtype=np.float64)), volume=len(dims) > 2 and dims[2] > 1)
    size = _gunzip_size(path, name, offset + nbytes + (1 << 20)) if gz else path.stat().st_size
    if size < offset + nbytes:
        raise ImageError(
            f"cannot read image {name}: truncated, {size} bytes where its NIfTI header announces {offset + nbytes}"
        )


def check_detached(path: Path, name: str) -> None:
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


def check_meta(path: Path, name: str, limits: ImageLimits) -> None:
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
        return  # data in a file beside it (see check_detached)
    fields = {
        k.strip().lower(): v.strip()
        for k, eq, v in (line.partition(b"=") for line in head[: end.start()].splitlines())
        if eq
    }
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
        raise ImageError(
            f"cannot read image {name}: truncated, {got} bytes of data where its MetaImage header announces {need}"
        )


def check_dicom_files(files: List[Path], name: str) -> None:
    """Every DICOM file of a series must hold all the pixel bytes its header announces (uncompressed data)."""
    import pydicom

    for p in files:
        try:
            ds = pydicom.dcmread(str(p))
            data = ds.get("PixelData")
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        except Exception as e:
            raise ImageError(f"cannot read image {name}: a DICOM file is corrupt ({clean_message(e, p, name)})") from e
        if data is None or (syntax is not None and syntax.is_compressed):  # compressed: its decoder checks it
            continue
        need = (
            int(ds.get("Rows", 0))
            * int(ds.get("Columns", 0))
            * int(ds.get("SamplesPerPixel", 1))
            * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.get("BitsAllocated", 8))
            // 8
        )
        if len(data) < need:
            raise ImageError(
                f"cannot read image {name}: a DICOM file is truncated ({len(data)} pixel bytes, {need} expected)"
            )


def finite_voxels(arr: np.ndarray, name: str, notes: List[str]) -> np.ndarray:
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


def picture_size(path: Path) -> int:
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


def clean_message(message: str, path: Path, name: str) -> str:
    """A reader's error message with the server path (and temporary file name) replaced by ``name``."""
    msg = str(message).strip().splitlines()
    msg = msg[-1] if msg else "unreadable"
    for p in sorted({str(path.resolve()), str(path.resolve().parent), str(path)}, key=len, reverse=True):
        if len(p) > 1:
            msg = msg.replace(p, name if p != str(path.resolve().parent) else "<folder>")
    msg = re.sub(r"(/[^\s'\"]+)+", "<path>", msg)  # any other absolute path a library put in
    return msg.replace(path.name, name)
