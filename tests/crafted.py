"""Crafted image and label files for the readers: declared sizes far beyond the data, wrong magic, formats
that do not match their file name, truncated or empty files (PNG/GIF/TIFF/JPEG/BMP/NRRD/NIfTI/MHA/DICOM).

Each is a few kB at most; none may make a reader allocate what its header declares. :func:`corpus` lists them
as ``(case, file name, bytes)``.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from typing import List, Tuple

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, data: bytes = b"\0" * 64, mode: int = 0, depth: int = 8) -> bytes:
    """A PNG whose (valid, CRC-checked) header declares ``width`` × ``height`` and whose data is ``data``."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, mode, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b"")


def gif_header(width: int = 65535, height: int = 50000) -> bytes:
    """A GIF logical screen descriptor declaring ``width`` × ``height`` (Pillow reads the size from it)."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b",\0\0\0\0"
            + struct.pack("<HH", width, height) + b"\0\x08")


def tiff(width: int, height: int, strip_offset: int = 8 + 2 + 9 * 12 + 4, strip_bytes: int = 16,
         bits: int = 8) -> bytes:
    """A little-endian baseline TIFF of ``width`` × ``height``, one strip of ``strip_bytes`` at ``strip_offset``."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, 1), (262, 3, 1), (273, 4, strip_offset),
            (277, 3, 1), (278, 4, height), (279, 4, strip_bytes)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags) + b"\0" * 4
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\x80" * 16


def jpeg(width: int, height: int, truncate: bool = False) -> bytes:
    """A real JPEG (from Pillow) whose SOF0 frame header is rewritten to ``width`` × ``height``; optionally cut."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data[: len(data) * 2 // 3] if truncate else data)


def bmp(width: int, height: int, bits: int = 8, offset: int = 54 + 1024) -> bytes:
    """A BMP (BITMAPINFOHEADER) declaring ``width`` × ``height`` with a few bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
    body = info + b"\0" * 1024 + b"\x7f" * 64
    return b"BM" + struct.pack("<IHHI", 14 + len(body), 0, 0, offset) + body


def nrrd(sizes: str, kind: str = "short", encoding: str = "raw", data: bytes = b"\0" * 64, dimension: int = 3) -> bytes:
    """An attached NRRD header (``sizes`` as written in it) followed by ``data``."""
    head = f"NRRD0004\ntype: {kind}\ndimension: {dimension}\nsizes: {sizes}\nendian: little\nencoding: {encoding}\n\n"
    return head.encode() + data


def nifti(dims: Tuple[int, ...], datatype: int = 4, bitpix: int = 16, data: bytes = b"\0" * 64,
          offset: float = 352.0, magic: bytes = b"n+1\0", compress: bool = True) -> bytes:
    """A NIfTI-1 single file declaring ``dims`` (e.g. (2000, 2000, 2000)) followed by ``data``."""
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    dim = [len(dims), *dims] + [1] * (7 - len(dims))
    struct.pack_into("<8h", h, 40, *dim)
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1, *([1.0] * 7))
    struct.pack_into("<f", h, 108, offset)
    struct.pack_into("<f", h, 112, 1.0)
    h[344:348] = magic
    raw = bytes(h) + b"\0" * 4 + data
    return gzip.compress(raw) if compress else raw


def mha(dims: str, element: str = "MET_SHORT", data: bytes = b"\0" * 64, extra: str = "") -> bytes:
    """A MetaImage single file (``ElementDataFile = LOCAL``) declaring ``dims``."""
    head = f"ObjectType = Image\nNDims = {len(dims.split())}\nDimSize = {dims}\nElementType = {element}\n{extra}" \
           f"ElementDataFile = LOCAL\n"
    return head.encode() + data


def dicom(rows: int = 64, columns: int = 64, pixel_bytes: int = 64, bits: int = 16, syntax: str = "1.2.840.10008.1.2.1",
          frames: int = 0) -> bytes:
    """A DICOM file (preamble, DICM, file meta) whose header declares ``rows`` × ``columns`` (× ``frames``)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "crafted"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, max(bits - 1, 0), 0
    if frames:
        ds.NumberOfFrames = frames
    compressed = UID(syntax).is_compressed
    if compressed:  # an encapsulated fragment of garbage
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8\xff\xc0garbage" + b"\0" * 32])
    else:
        ds.PixelData = b"\x01" * pixel_bytes
    ds["PixelData"].VR = "OB" if compressed else "OW"
    ds.is_little_endian, ds.is_implicit_VR = True, False  # pydicom 2.x
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def corpus() -> List[Tuple[str, str, bytes]]:
    """Every crafted file as ``(case, file name, bytes)``; each must be refused with a 4xx by the server."""
    good_png = png(32, 32, b"\0" * (33 * 32))
    cases = [
        # declared sizes far beyond the data (decompression bombs for Pillow, huge volumes for ITK)
        ("png 60000x60000", "bomb.png", png(60000, 60000)),
        ("png 10000x10000", "big.png", png(10000, 10000)),
        ("png 4000x4000 with 64 bytes", "short.png", png(4000, 4000)),
        ("png 16-bit rgba 3000x3000", "deep.png", png(3000, 3000, mode=6, depth=16)),
        ("gif header before png data", "gif.png", gif_header() + good_png),
        ("gif 4000x4000", "small-gif.png", gif_header(4000, 4000) + b"\0" * 64),
        ("tiff 60000x60000", "bomb.tif", tiff(60000, 60000)),
        ("tiff 4000x4000, strip past the end", "strip.tiff",
         tiff(4000, 4000, strip_offset=1 << 30, strip_bytes=1 << 24)),
        ("tiff with 0 bits per sample", "bits.tif", tiff(64, 64, bits=0)),
        ("jpeg 65000x65000", "bomb.jpg", jpeg(65000, 65000)),
        ("jpeg truncated", "cut.jpg", jpeg(32, 32, truncate=True)),
        ("bmp 60000x60000", "bomb.bmp", bmp(60000, 60000)),
        ("bmp 4000x-4000", "neg.bmp", bmp(4000, -4000)),
        ("bmp 0 bits", "zero.bmp", bmp(64, 64, bits=0)),
        ("bmp pixel offset past the end", "offset.bmp", bmp(64, 64, offset=1 << 30)),
        ("nrrd 100000^3", "huge.nrrd", nrrd("100000 100000 100000")),
        ("nrrd 200^3 with 64 bytes", "short.nrrd", nrrd("200 200 200")),
        ("nrrd gzip of garbage", "gz.nrrd", nrrd("16 16 16", encoding="gzip", data=b"\x1f\x8b" + b"\xff" * 62)),
        ("nrrd negative size", "neg.nrrd", nrrd("-5 16 16")),
        ("nrrd dimension 99", "dim.nrrd", nrrd("4 4 4", dimension=99)),
        ("nrrd unknown type", "type.nrrd", nrrd("4 4 4", kind="quaternion")),
        ("nifti 2000^3", "huge.nii.gz", nifti((2000, 2000, 2000))),
        ("nifti 256^3 with 64 bytes", "short.nii", nifti((256, 256, 256), compress=False)),
        ("nifti wrong magic", "magic.nii.gz", nifti((16, 16, 16), magic=b"xx1\0", data=b"\0" * 8192)),
        ("nifti unknown datatype", "dtype.nii.gz", nifti((16, 16, 16), datatype=999, data=b"\0" * 8192)),
        ("nifti voxel offset past the end", "offset.nii.gz", nifti((16, 16, 16), offset=1e9, data=b"\0" * 8192)),
        ("mha 100000^3", "huge.mha", mha("100000 100000 100000")),
        ("mha 200^3 with 64 bytes", "short.mha", mha("200 200 200")),
        ("mha compressed garbage", "zip.mha", mha("16 16 16", extra="CompressedData = True\nCompressedDataSize = 64\n",
                                                   data=b"\xff" * 64)),
        ("dicom 60000x60000", "bomb.dcm", dicom(60000, 60000)),
        ("dicom 4000 frames", "frames.dcm", dicom(512, 512, frames=4000)),
        ("dicom jpeg of garbage", "jpeg.dcm", dicom(64, 64, syntax="1.2.840.10008.1.2.4.50")),
        ("dicom 0 bits allocated", "bits.dcm", dicom(64, 64, bits=0, pixel_bytes=0)),
        ("dicom without DICM", "nomagic.dcm", b"\0" * 200 + b"\x01" * 300),
    ]
    # formats that do not match the name, and empty or one-byte files
    mismatched = [("png bytes as nifti", "p.nii.gz", good_png), ("png bytes as raw nifti", "p.nii", good_png),
                  ("nifti bytes as png", "n.png", nifti((16, 16, 16), data=b"\0" * 8192, compress=False)),
                  ("jpeg bytes as tiff", "j.tif", jpeg(32, 32)), ("dicom bytes as nrrd", "d.nrrd", dicom()),
                  ("gzip of a png as nifti", "g.nii.gz", gzip.compress(good_png)), ("bmp as mha", "b.mha", bmp(8, 8)),
                  ("pdf as jpeg", "doc.jpg", b"%PDF-1.4\n" + b"\0" * 100)]
    empty = [(f"empty {s}", f"e{s}", b"")
             for s in (".png", ".jpg", ".tif", ".bmp", ".nrrd", ".nii", ".nii.gz", ".mha", ".dcm")]
    return cases + mismatched + empty + [("one byte .png", "one.png", b"\x89")]
