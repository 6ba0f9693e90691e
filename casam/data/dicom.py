"""DICOM attributes of an image: the series header, its institution and its patient."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)
INSTITUTION_KEYS = ("institution", "InstitutionName", "institution_name")
PATIENT_KEYS = ("patient", "PatientID", "patient_id")


def _first(infos: Sequence[Optional[dict]], keys: Sequence[str]) -> Optional[str]:
    for info in infos:
        for k in keys:
            v = (info or {}).get(k)
            if v not in (None, "", "UNK"):
                return str(v).strip()
    return None


def dicom_attribute(image_path: str | Path, keyword: str) -> Optional[str]:
    """A DICOM attribute of an image's series folder: the path itself, or a folder beside a converted
    ``<id>.nii.gz`` with the same stem (MONAI Label's DICOMweb cache); None when absent or not DICOM."""
    path = Path(image_path)
    name = path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem
    for folder in (path, path.with_name(stem)):
        if folder.is_dir():
            ds = read_dicom_header(folder)
            value = str(getattr(ds, keyword, "") or "").strip() if ds is not None else ""
            if value:
                return value
    return None


def institution_of(image_path: str | Path, infos: Sequence[Optional[dict]] = (), default: str = "default") -> str:
    """The institution an image belongs to.

    Order: DICOM InstitutionName (0008,0080) of the image's series (see :func:`dicom_attribute`); then an
    ``institution`` field in the given info dicts (e.g. the datastore's image info, then the label's info);
    then ``default``.
    """
    return dicom_attribute(image_path, "InstitutionName") or _first(infos, INSTITUTION_KEYS) or default


def patient_of(image_id: str, image_path: str | Path, infos: Sequence[Optional[dict]] = ()) -> str:
    """The patient an image belongs to: DICOM PatientID, else a ``patient`` info field, else the image id."""
    return dicom_attribute(image_path, "PatientID") or _first(infos, PATIENT_KEYS) or image_id


def dicom_files(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_dicom_header(folder: str | Path) -> Any:
    """Returns the header of the first readable DICOM file in a folder (None if there is none)."""
    import pydicom

    for p in dicom_files(Path(folder)):
        try:
            return pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception:
            continue
    return None
