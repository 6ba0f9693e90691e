"""The PACS (Orthanc over DICOMweb) stopped under the server and started again.

A click on a series not yet fetched while Orthanc is down is answered 502 naming the DICOMweb server (its
address, no server path), not 500 and not "unknown image"; Orthanc killed while a click fetches a series gives a
200 or that 502, never a 500; once Orthanc is back the next clicks work, without a restart of the server, on both
series (a series cut off mid-download is not served half). ``/info`` answers throughout.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from conftest import DATA, needs_data
from orthanc_fixture import OrthancServer, nifti_to_dicom_series, orthanc_unavailable_reason, upload_series
from test_faults_helpers import FaultServer, server_conf

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, needs_data]
pytest.importorskip("monailabel")
pytest.importorskip("nibabel")

VOLUMES = DATA / "brain_mri_lgg" / "volumes"


def _click(srv, uid: str, timeout: float = 300) -> requests.Response:
    return requests.post(f"{srv.url}/infer/casam", params={"image": uid, "output": "json"},
                         data={"params": json.dumps({"roi": [100, 160, 100, 160, 10, 10]})}, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    reason = orthanc_unavailable_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("faults-pacs")
    pacs = OrthancServer(workdir=work / "orthanc").start()  # its own folder: a restart keeps its studies
    try:
        uids = []
        cases = sorted(p.name[: -len("_image.nii.gz")] for p in VOLUMES.glob("TCGA_DU_*_image.nii.gz"))[:2]
        for i, case in enumerate(cases):
            _, uid, files = nifti_to_dicom_series(VOLUMES / f"{case}_image.nii.gz", work / "dcm" / case,
                                                  "Lakeside", patient_id=case, series_number=i + 1)
            upload_series(pacs, files)
            uids.append(uid)
        srv = FaultServer(pacs.dicomweb_url, work / "ml", conf=server_conf(work),
                          env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"})})
        srv.start(timeout=300)
        try:
            yield pacs, srv, uids
        finally:
            srv.stop()
    finally:
        pacs.stop()


def test_pacs_down_then_back(setup):
    pacs, srv, (first, second) = setup
    assert srv.info()["datastore"]["total"] == 2, srv.log_tail()
    pacs._terminate()  # Orthanc stopped (its database kept)
    r = _click(srv, first)
    assert r.status_code == 502, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert f"DICOMweb server (PACS) at http://127.0.0.1:{pacs.http_port}" in detail, detail
    assert str(srv.workdir) not in detail and "/tmp" not in detail, detail
    assert requests.get(f"{srv.url}/info/", timeout=60).status_code == 200
    assert "casam: the DICOMweb server (PACS) at" in srv.log_tail(10**6)
    pacs.start()  # back, same port and studies: no restart of the casam server
    r = _click(srv, first)
    assert r.status_code == 200, r.text


def test_pacs_killed_mid_request_then_back(setup):
    pacs, srv, (first, second) = setup
    out = {}
    t = threading.Thread(target=lambda: out.update(r=_click(srv, second)), daemon=True)
    t.start()
    time.sleep(0.3)  # the series' download has begun (or is about to)
    pacs.process.kill()
    pacs.process.wait(10)
    pacs._terminate()
    t.join(300)
    r = out["r"]
    assert r.status_code in (200, 502), (r.status_code, r.text)
    if r.status_code == 502:
        assert "DICOMweb server (PACS)" in r.json()["detail"]
    pacs.start()
    for uid in (second, first):  # the series cut off mid-way is fetched whole now
        r = _click(srv, uid)
        assert r.status_code == 200, (uid, r.text)
    assert requests.get(f"{srv.url}/info/", timeout=60).json()["datastore"]["total"] == 2
