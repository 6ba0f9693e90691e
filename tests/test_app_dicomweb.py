"""End to end over DICOMweb: a real Orthanc on loopback as the datastore of the casam MONAI Label app.

Two brain MRI volumes of ../shared/data become DICOM series whose InstitutionName is a name given nowhere
else; the app lists them, segments one with a box, saves the result as DICOM SEG into Orthanc, and the
trainer names the new layer after the DICOM InstitutionName.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from conftest import DATA, needs_data
from orthanc_fixture import nifti_to_dicom_series, orthanc_server, upload_series  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, needs_data]

pytest.importorskip("monailabel")
nib = pytest.importorskip("nibabel")
from monailabel.client import MONAILabelClient  # noqa: E402

from casam.data.clinical import read_clinical  # noqa: E402
from casam.prompts.masks import tight_box  # noqa: E402
from mlserver import MonaiLabelServer  # noqa: E402

VOLUMES = DATA / "brain_mri_lgg" / "volumes"
INSTITUTION = "Lakeside Teaching Hospital"


def test_dicomweb_datastore_seg_and_institution(orthanc_server, tmp_path):  # noqa: F811
    cases = sorted(p.name[: -len("_image.nii.gz")] for p in VOLUMES.glob("TCGA_DU_*_image.nii.gz"))[:2]
    series = {}
    for i, case in enumerate(cases):
        _, uid, files = nifti_to_dicom_series(VOLUMES / f"{case}_image.nii.gz", tmp_path / "dcm" / case, INSTITUTION,
                                              patient_id=case, series_number=i + 1)
        upload_series(orthanc_server, files)
        series[uid] = case

    srv = MonaiLabelServer(orthanc_server.dicomweb_url, tmp_path / "ml", conf={
        "backbone": "litemedsam", "registry": str(tmp_path / "registry"), "cache": str(tmp_path / "cache"),
        "labels": "tumour", "min_images": "2", "epochs": "2", "max_slices_per_volume": "4",
        "default_institution": "nowhere",
    }, env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"})})
    with srv:
        info = srv.info()
        assert info["datastore"]["total"] == 2, srv.log_tail()
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path / "client"))
        for uid, case in series.items():
            gt = np.asarray(nib.load(VOLUMES / f"{case}_label.nii.gz").dataobj).transpose(2, 1, 0)  # → D×H×W
            k = int(np.argmax(gt.reshape(gt.shape[0], -1).sum(1)))
            x0, y0, x1, y1 = tight_box(gt[k] > 0).astype(int).tolist()
            path, params = client.infer("casam", uid, {"roi": [x0 - 2, x1 + 2, y0 - 2, y1 + 2, k, k],
                                                       "result_extension": ".nrrd"})
            params = json.loads(params) if isinstance(params, str) else params
            mask = read_clinical(path).array
            assert mask.shape == gt.shape and mask[k].any(), params
            assert params["fallback"] is True  # no layer yet
            # the clinician accepts the result: saved as DICOM SEG into Orthanc
            client.save_label(uid, path, tag="final", params={"label_info": [{"name": "tumour", "idx": 1}]})

        segs = requests.get(f"{orthanc_server.dicomweb_url}/series", params={"Modality": "SEG"}, timeout=30).json()
        assert len(segs) == 2, segs

        r = requests.post(srv.url + "/train/casam", params={"run_sync": "true"}, json={}, timeout=1500)
        assert r.status_code == 200, r.text
        report = r.json()
        (entry,) = report["institutions"]
        assert entry["institution"] == INSTITUTION and entry["layer"], (report, srv.log_tail())
        assert entry["images"] == 2 and entry["patients"] == 2
        layers = srv.info()["layers"]
        assert [(x["institution"], x["active"]) for x in layers] == [(INSTITUTION, True)]
