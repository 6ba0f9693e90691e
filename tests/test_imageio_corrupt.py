"""Readers refuse corrupt, truncated, complex or oversized data; labels must fit their image (casam.data.clinical)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from casam.data.clinical import check_label, read_clinical, read_label
from casam.data.safety import ImageLimits
from casam.errors import ImageError, LimitError


def _volume(path, arr=None, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), compress=True):
    arr = (np.random.default_rng(0).random((12, 32, 32)) * 100).astype(np.int16) if arr is None else arr
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path), compress)
    return path


def _cut(src, dst, keep=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.nrrd", "v.mha"])
def test_truncated_volumes_are_refused(tmp_path, name):
    src = _volume(tmp_path / name, compress=name != "v.nii")
    assert read_clinical(src).array.shape == (12, 32, 32)
    with pytest.raises(ImageError, match="cannot read image cut"):
        read_clinical(_cut(src, tmp_path / f"cut{name[1:]}"))


def test_corrupt_gzip_and_nifti_header(tmp_path):
    src = _volume(tmp_path / "v.nii.gz")
    raw = bytearray(src.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte mid-stream: CRC or inflate error
    (tmp_path / "flip.nii.gz").write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="corrupt gzip"):
        read_clinical(tmp_path / "flip.nii.gz")
    header = bytearray(gzip.decompress(src.read_bytes()))
    header[40:42] = (9).to_bytes(2, "little")  # dim[0] = 9: impossible
    (tmp_path / "hdr.nii").write_bytes(bytes(header))
    with pytest.raises(ImageError, match="corrupt NIfTI header"):
        read_clinical(tmp_path / "hdr.nii")


def test_corrupt_dicom_is_refused(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    arr = (np.random.default_rng(0).random((3, 32, 32)) * 100).astype(np.int16)
    for k in range(3):
        s = sitk.GetImageFromArray(arr[k])
        s.SetMetaData("0020|000e", "1.2.3")
        s.SetMetaData("0020|0013", str(k))
        sitk.WriteImage(s, str(folder / f"{k}.dcm"))
    read_clinical(folder)
    _cut(folder / "1.dcm", folder / "1.dcm", keep=0.8)
    with pytest.raises(ImageError, match="DICOM file is truncated"):
        read_clinical(folder)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    with pytest.raises(ImageError, match="cannot read image junk.dcm"):
        read_clinical(tmp_path / "junk.dcm")


def test_complex_refused_and_non_finite_sanitised(tmp_path):
    c = sitk.GetImageFromArray((np.ones((4, 8, 8)) * (1 + 2j)).astype(np.complex64))
    sitk.WriteImage(c, str(tmp_path / "c.nrrd"))
    with pytest.raises(ImageError, match="complex"):
        read_clinical(tmp_path / "c.nrrd")
    np.save(tmp_path / "c.npy", np.ones((8, 8), np.complex64))
    with pytest.raises(ImageError, match="complex"):
        read_clinical(tmp_path / "c.npy")
    a = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    a[0, 0, 0], a[1, 2, 3] = np.nan, np.inf
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "nan.nrrd"))
    img = read_clinical(tmp_path / "nan.nrrd", name="scan-7")
    assert np.isfinite(img.array).all() and img.array[0, 0, 0] == pytest.approx(a[np.isfinite(a)].min())
    assert img.notes == [f"2 non-finite voxels (NaN/Inf) of scan-7 were set to {a[np.isfinite(a)].min():g}"]


def test_detached_header_may_not_name_other_files(tmp_path):
    (tmp_path / "x.nhdr").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                                     "data file: /etc/passwd\n\n")
    (tmp_path / "x.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
                                    "ElementDataFile = ../../etc/passwd\n")
    for name in ("x.nhdr", "x.mha"):
        with pytest.raises(ImageError, match="outside its folder"):
            read_clinical(tmp_path / name)


def test_limits_are_checked_from_the_header(tmp_path):
    src = _volume(tmp_path / "v.nii.gz")
    with pytest.raises(
        LimitError, match=r"image scan has 12288 voxels: 12288 is over the limit max_image_voxels = 1000"
    ):
        read_clinical(src, name="scan", limits=ImageLimits(max_voxels=1000))
    with pytest.raises(LimitError, match="max_upload_mb"):
        read_clinical(src, limits=ImageLimits(max_bytes=1000))
    header = gzip.decompress(src.read_bytes())[:352]
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(header + bytes(8 << 20)))  # 8 MB of zeros in a few kB
    with pytest.raises(ImageError, match="more than its header announces"):
        read_clinical(tmp_path / "bomb.nii.gz")
    huge = bytearray(header)
    huge[42:48] = b"\xd0\x07" * 3  # 2000 × 2000 × 2000 voxels announced, refused before decompressing
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(bytes(huge)))
    with pytest.raises(LimitError, match="8000000000 voxels"):
        read_clinical(tmp_path / "huge.nii.gz", limits=ImageLimits(max_voxels=10**8))
    from PIL import Image

    Image.fromarray(np.zeros((300, 400), np.uint8)).save(tmp_path / "p.png")
    with pytest.raises(LimitError, match="0.1 megapixels: 0.1 is over the limit max_image_megapixels = 0.05"):
        read_clinical(tmp_path / "p.png", limits=ImageLimits(max_pixels=50_000))


def test_messages_carry_no_server_path(tmp_path):
    (tmp_path / "tmpabc123.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    with pytest.raises(ImageError) as e:
        read_clinical(tmp_path / "tmpabc123.png", name="the uploaded image")
    assert str(tmp_path) not in str(e.value) and "tmpabc123" not in str(e.value)
    assert "the uploaded image" in str(e.value)


def test_labels_are_checked_against_their_image(tmp_path):
    img = read_clinical(_volume(tmp_path / "img.nii.gz", spacing=(0.9, 0.9, 3.0), origin=(10.0, 20.0, 30.0)))
    lab = np.zeros((12, 32, 32), np.uint8)
    lab[4:7, 10:20, 10:20] = 1
    # the image's shape with a plain header (no spacing/origin): voxel for voxel
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "plain.nrrd"))
    assert (check_label(tmp_path / "plain.nrrd", img) == lab).all()
    # fewer slices on the image's grid (a DICOM SEG): resampled into place
    part = sitk.GetImageFromArray(lab[3:8])
    part.SetSpacing((0.9, 0.9, 3.0))
    part.SetOrigin((10.0, 20.0, 30.0 + 3 * 3.0))
    sitk.WriteImage(part, str(tmp_path / "seg.nrrd"))
    assert (read_label(tmp_path / "seg.nrrd", img) == lab).all()
    # another grid that does not overlap the image: refused
    part.SetOrigin((10.0, 20.0, 500.0))
    sitk.WriteImage(part, str(tmp_path / "far.nrrd"))
    with pytest.raises(ImageError, match="outside its image"):
        read_label(tmp_path / "far.nrrd", img)
    # wrong 2D shape, fractional classes, negative values, empty
    sitk.WriteImage(sitk.GetImageFromArray(lab[:, :16]), str(tmp_path / "shape.nrrd"))
    with pytest.raises(ImageError):
        read_label(tmp_path / "shape.nrrd", img)
    sitk.WriteImage(sitk.GetImageFromArray(lab * np.float32(0.5)), str(tmp_path / "frac.nrrd"))
    with pytest.raises(ImageError, match="non-integer"):
        read_label(tmp_path / "frac.nrrd", img)
    sitk.WriteImage(sitk.GetImageFromArray(-lab.astype(np.int16)), str(tmp_path / "neg.nrrd"))
    with pytest.raises(ImageError, match="class ids"):
        read_label(tmp_path / "neg.nrrd", img)
    sitk.WriteImage(sitk.GetImageFromArray(lab * 0), str(tmp_path / "empty.nrrd"))
    with pytest.raises(ImageError, match="empty"):
        check_label(tmp_path / "empty.nrrd", img, name="of image brain-1")


def test_training_skips_labels_that_do_not_fit(tmp_path):
    from PIL import Image

    from casam.training.online import LabelledItem, load_items

    items = []
    for name, label in [
        ("good", np.pad(np.ones((8, 8), np.uint8), 12)),
        ("shape", np.ones((16, 16), np.uint8)),
        ("empty", np.zeros((32, 32), np.uint8)),
    ]:
        Image.fromarray(np.full((32, 32), 90, np.uint8)).save(tmp_path / f"{name}.png")
        Image.fromarray(label).save(tmp_path / f"{name}_l.png")
        items.append(LabelledItem(name, str(tmp_path / f"{name}.png"), str(tmp_path / f"{name}_l.png"), "A", name))
    frac = sitk.GetImageFromArray(np.full((32, 32), 0.5, np.float32))
    sitk.WriteImage(frac, str(tmp_path / "frac_l.nrrd"))
    items.append(LabelledItem("frac", str(tmp_path / "good.png"), str(tmp_path / "frac_l.nrrd"), "A", "frac"))
    images, masks, patients, used, skipped = load_items(items)
    assert used == ["good"] and len(images) == 1
    reasons = {s["image"]: s["reason"] for s in skipped}
    assert "shape" in reasons["shape"] and "empty" in reasons["empty"] and "non-integer" in reasons["frac"]
    assert str(tmp_path) not in " ".join(reasons.values())


def test_crafted_files_raise_casam_errors_only(tmp_path):
    """Every crafted header (declared sizes far beyond the data, wrong magic, mismatched formats) is an
    ImageError (400) or a LimitError (413) naming the image, never another exception (a 500 in the app)."""
    from crafted import corpus

    limits = ImageLimits(max_voxels=64 * 2**20, max_pixels=50_000_000, max_bytes=512 * 2**20)
    for case, filename, data in corpus():
        (tmp_path / filename).write_bytes(data)
        with pytest.raises((ImageError, LimitError), match="image crafted") as e:
            read_clinical(tmp_path / filename, name="crafted", limits=limits)
        assert str(tmp_path) not in str(e.value) and filename not in str(e.value), (case, str(e.value))


def test_decompression_bombs_name_the_limit(tmp_path):
    """Pillow raises DecompressionBombError above twice its pixel limit: the size is still read and refused by
    max_image_megapixels; a GIF named .png is not read as a GIF."""
    from crafted import gif_header, png

    (tmp_path / "bomb.png").write_bytes(png(60000, 60000))
    with pytest.raises(LimitError, match="3600.0 megapixels: 3600.0 is over the limit max_image_megapixels = 50"):
        read_clinical(tmp_path / "bomb.png", limits=ImageLimits(max_pixels=50_000_000))
    with pytest.raises(ImageError, match="cannot read image bomb.png: Image size .3600000000 pixels."):
        read_clinical(tmp_path / "bomb.png")  # no limit of ours: Pillow's refusal, as an ImageError
    (tmp_path / "gif.png").write_bytes(gif_header() + png(8, 8, b"\0" * 72))
    with pytest.raises(ImageError, match="cannot identify image file 'gif.png'"):
        read_clinical(tmp_path / "gif.png")
