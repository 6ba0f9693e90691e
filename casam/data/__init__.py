"""Files in and out: the format table, safe readers of untrusted images, labels, DICOM attributes, datasets."""

from __future__ import annotations

from casam.data.clinical import ClinicalImage, check_label, read_clinical, read_label, write_label
from casam.data.datasets import (
    Case,
    Task,
    discover_tasks,
    load_cases,
    read_image,
    read_manifest,
    read_mask,
    read_meta,
    spread,
    stream_order,
)
from casam.data.dicom import dicom_attribute, dicom_files, institution_of, patient_of, read_dicom_header
from casam.data.formats import FileFormat, strip_suffix, suffix_of
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
