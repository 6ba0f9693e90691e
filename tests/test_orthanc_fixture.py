"""Tests of the Orthanc/DICOMweb test helpers (tests/orthanc_fixture.py).

The geometry tests need pydicom + nibabel and the real brain MRI volumes; the server tests need
the Debian ``orthanc`` and ``orthanc-dicomweb`` packages and skip cleanly without them.
"""

from __future__ import annotations

import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from orthanc_fixture import (
    MR_IMAGE_STORAGE,
    OrthancServer,
    loopback_shim_path,
    nifti_to_dicom_series,
    orthanc_server,  # noqa: F401  (pytest fixture)
    orthanc_unavailable_reason,
    read_dicom_series,
    split_multipart,
    upload_series,
)

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

VOLUMES = DATA / "brain_mri_lgg" / "volumes"
CASE = "TCGA_DU_5849_19950405"
IMAGE = VOLUMES / f"{CASE}_image.nii.gz"
needs_volume = pytest.mark.skipif(not IMAGE.exists(), reason=f"{IMAGE} not found")
needs_orthanc = pytest.mark.skipif(
    orthanc_unavailable_reason() is not None, reason=str(orthanc_unavailable_reason())
)

pytestmark = pytest.mark.slow


def _institution(case: str) -> str:
    """TCGA_<SITE>_<id>_<date> -> TCGA_<SITE> (the acquiring institution)."""
    return "_".join(case.split("_")[:2])


def _canonical(data: np.ndarray, affine: np.ndarray):
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), affine))
    return np.asarray(img.dataobj), img.affine


# ------------------------------------------------------------------ NIfTI -> DICOM geometry


@needs_volume
def test_series_round_trips_real_volume(tmp_path):
    study, series, files = nifti_to_dicom_series(
        IMAGE, tmp_path, institution_name=_institution(CASE), patient_id=CASE
    )
    img = nib.load(str(IMAGE))
    data = np.asanyarray(img.dataobj)
    assert len(files) == data.shape[2]

    ds = pydicom.dcmread(str(files[0]))
    assert ds.SOPClassUID == MR_IMAGE_STORAGE
    assert ds.file_meta.MediaStorageSOPClassUID == MR_IMAGE_STORAGE
    assert ds.Modality == "MR"
    assert ds.InstitutionName == "TCGA_DU"
    assert ds.PatientID == CASE
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study, series)
    assert (ds.Rows, ds.Columns) == (data.shape[1], data.shape[0])
    assert ds.BitsAllocated == 8 and ds.PhotometricInterpretation == "MONOCHROME2"
    assert float(ds.SliceThickness) == pytest.approx(3.0, abs=1e-3)
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.9375, 0.9375], abs=1e-4)
    uids = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in files}
    assert len(uids) == len(files)

    # read back in shuffled order, sorted by position along the normal
    shuffled = list(files)
    np.random.default_rng(0).shuffle(shuffled)
    volume, affine = read_dicom_series(shuffled)
    # RAS volume: k points along row x column, so the voxel order is identical
    np.testing.assert_array_equal(volume, data)
    np.testing.assert_allclose(affine, img.affine, atol=1e-4)


@needs_volume
def test_series_matches_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    _, _, files = nifti_to_dicom_series(IMAGE, tmp_path, "TCGA_DU", CASE, bits_allocated=16)
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(tmp_path))
    reader.SetFileNames(names)
    dicom = reader.Execute()
    nifti = sitk.ReadImage(str(IMAGE))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(dicom), sitk.GetArrayFromImage(nifti))
    np.testing.assert_allclose(dicom.GetOrigin(), nifti.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(dicom.GetSpacing(), nifti.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(dicom.GetDirection(), nifti.GetDirection(), atol=1e-4)


@pytest.mark.parametrize("kind", ["flipped_k", "oblique", "float"])
def test_series_round_trips_synthetic_geometry(tmp_path, kind):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 1000, size=(7, 5, 4)).astype(np.int16)
    data[0, 0, 0] = -20  # signed
    affine = np.diag([0.8, 1.1, 2.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    if kind == "flipped_k":  # k against row x column: read back with k reversed
        affine[2, 2] = -2.5
    elif kind == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array(
            [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]]
        )
        affine[:3, :3] = rot @ np.diag([0.8, 1.1, -2.5])
    elif kind == "float":
        data = rng.normal(0, 1, size=(7, 5, 4)).astype(np.float32)
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    _, _, files = nifti_to_dicom_series(path, tmp_path / "dcm", "SITE", "P1")
    volume, got_affine = read_dicom_series(files)

    want_data, want_affine = _canonical(data, affine)
    got_data, got_aff = _canonical(volume, got_affine)
    np.testing.assert_allclose(got_aff, want_affine, atol=1e-4)
    if kind == "float":
        np.testing.assert_allclose(got_data, want_data, atol=(data.max() - data.min()) / 65535 + 1e-6)
    else:
        np.testing.assert_array_equal(got_data, want_data)
    if kind == "flipped_k":
        np.testing.assert_array_equal(volume, data[:, :, ::-1])


# ------------------------------------------------------------------ Orthanc server


@pytest.mark.orthanc
@needs_orthanc
def test_loopback_shim_rewrites_wildcard_bind():
    code = (
        "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
        "print(s.getsockname()[0])"
    )
    env = {"LD_PRELOAD": str(loopback_shim_path()), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "127.0.0.1"


@pytest.mark.orthanc
@needs_orthanc
def test_server_starts_on_loopback_and_cleans_up():
    with OrthancServer() as server:
        workdir = server.workdir
        system = server.get("/system").json()
        assert system["HttpPort"] == server.http_port
        assert "dicom-web" in server.get("/plugins").json()
        listening = server.listening()
        assert listening and all(ip.startswith("127.") for ip, _ in listening)
        assert {port for _, port in listening} == {server.http_port}  # DICOM server is off
        assert server.get("/dicom-web/studies").status_code in (200, 204)
    assert server.process is None
    assert not workdir.exists()


@pytest.mark.orthanc
@needs_orthanc
@needs_volume
def test_upload_and_dicomweb_query_retrieve(orthanc_server, tmp_path):  # noqa: F811
    server = orthanc_server
    study, series, files = nifti_to_dicom_series(
        IMAGE, tmp_path, institution_name=_institution(CASE), patient_id=CASE
    )
    answers = upload_series(server, files)
    assert len(answers) == len(files)
    assert {a["Status"] for a in answers} == {"Success"}
    assert len({a["ParentSeries"] for a in answers}) == 1

    qido = {"Accept": "application/dicom+json"}
    studies = server.get("/dicom-web/studies", headers=qido).json()
    assert study in [s["0020000D"]["Value"][0] for s in studies]

    found = server.get(
        f"/dicom-web/studies/{study}/series",
        params={"includefield": "00080080"},
        headers=qido,
    ).json()
    assert [s["0020000E"]["Value"][0] for s in found] == [series]
    assert found[0]["00080060"]["Value"] == ["MR"]
    assert found[0]["00080080"]["Value"] == ["TCGA_DU"]

    metadata = server.get(f"/dicom-web/studies/{study}/series/{series}/metadata", headers=qido)
    assert metadata.status_code == 200
    metadata = metadata.json()
    assert len(metadata) == len(files)
    assert {m["00080080"]["Value"][0] for m in metadata} == {"TCGA_DU"}
    assert {m["00080016"]["Value"][0] for m in metadata} == {MR_IMAGE_STORAGE}

    instances = server.get(f"/dicom-web/studies/{study}/series/{series}/instances", headers=qido)
    sop_uids = [i["00080018"]["Value"][0] for i in instances.json()]
    assert len(sop_uids) == len(files)

    # WADO-RS: retrieve one instance as a multipart/related DICOM part and compare pixels
    first = pydicom.dcmread(str(files[0]))
    resp = server.get(
        f"/dicom-web/studies/{study}/series/{series}/instances/{first.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("multipart/related")
    parts = split_multipart(resp.headers["Content-Type"], resp.content)
    assert len(parts) == 1
    retrieved = pydicom.dcmread(BytesIO(parts[0]))
    assert retrieved.SOPInstanceUID == first.SOPInstanceUID
    assert retrieved.InstitutionName == "TCGA_DU"
    np.testing.assert_array_equal(retrieved.pixel_array, first.pixel_array)


def test_fixture_reports_reason_string():
    reason = orthanc_unavailable_reason()
    assert reason is None or isinstance(reason, str)
    assert Path(__file__).with_name("orthanc_fixture.py").exists()
