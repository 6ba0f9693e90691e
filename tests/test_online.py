"""The online trainer's pieces without a server: institutions, planning, volumes → slices, voxel prompts, IO."""

from __future__ import annotations

import time

import numpy as np
import pytest

from casam.data.clinical import read_clinical, read_label, write_label
from casam.data.dicom import institution_of, patient_of
from casam.errors import ImageError, PromptError
from casam.prompts.masks import voxel_prompts
from casam.registry.store import LayerRegistry
from casam.training.config import TrainConfig
from casam.training.online import (
    LabelledItem,
    TrainingMonitor,
    TrainingStopped,
    label_slices,
    load_items,
    plan,
    train_institution,
)

SHORT = {k: v for k, v in (("vae_epochs", 2), ("head_steps", 0)) if hasattr(TrainConfig(), k)}  # a short recipe


def _save_png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)
    return str(path)


def test_voxel_prompts_slicer_conventions():
    p = voxel_prompts((38, 256, 200), True, [[100, 120, 20]], [[10, 10, 20], [5, 5, 3]], [130, 90, 100, 140, 25, 15])
    assert p.slice == 20 and p.points.tolist() == [[100, 120], [10, 10]] and p.labels.tolist() == [1, 0]
    assert p.box.tolist() == [90, 100, 130, 140] and p.slice_range == (15, 25) and p.ignored == [[5, 5, 3]]
    q = voxel_prompts((38, 256, 200), True, roi=[10, 50, 20, 60, 4, 8])
    assert q.slice == 6 and q.points is None
    r = voxel_prompts((64, 80, 3), False, roi=[10, 50, 20, 60])  # a 2D RGB picture
    assert r.slice == 0 and r.box.tolist() == [10, 20, 50, 60]
    assert voxel_prompts((10, 20, 30), True, [[1, 2, 3]], slice_index=3).slice == 3
    with pytest.raises(PromptError, match="outside"):
        voxel_prompts((38, 256, 200), True, [[200, 5, 1]])
    with pytest.raises(PromptError, match="outside"):
        voxel_prompts((38, 256, 200), True, [[1, 5, 38]])
    with pytest.raises(PromptError, match="no foreground point"):
        voxel_prompts((38, 256, 200), True, [[1, 5, 2]], slice_index=3)
    with pytest.raises(PromptError):
        voxel_prompts((38, 256, 200), True, roi=[1, 2, 3])
    with pytest.raises(PromptError):
        voxel_prompts((38, 256, 200), True)


def test_volume_io_keeps_geometry(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    vol = np.random.default_rng(0).integers(0, 255, (5, 12, 10)).astype(np.uint8)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.5, 0.7, 3.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(img, str(tmp_path / "v.nii.gz"))
    ci = read_clinical(tmp_path / "v.nii.gz")
    assert ci.is_volume and ci.array.shape == (5, 12, 10)
    lab = (ci.array > 128).astype(np.uint8)
    out = write_label(lab, ci, tmp_path / "l.nrrd")
    back = sitk.ReadImage(str(out))
    assert back.GetSpacing() == pytest.approx((0.5, 0.7, 3.0)) and back.GetOrigin() == pytest.approx((1.0, 2.0, 3.0))
    assert (read_label(out, ci) == lab).all()
    with pytest.raises(ImageError, match="does not match"):
        write_label(lab[:2], ci, tmp_path / "x.nrrd")
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
    with pytest.raises(ImageError, match="cannot read image"):
        read_clinical(tmp_path / "bad.nii.gz")


def test_institution_and_patient_resolution(tmp_path):
    png = _save_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    assert institution_of(png, [{}, {"institution": "H2"}], "dflt") == "H2"
    assert institution_of(png, [{"institution": "H1"}, {"institution": "H2"}], "dflt") == "H1"
    assert institution_of(png, [{"InstitutionName": "UNK"}], "dflt") == "dflt"
    assert patient_of("img7", png, [{}]) == "img7" and patient_of("img7", png, [{"patient": "P1"}]) == "P1"
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    series = tmp_path / "1.2.3"
    series.mkdir()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(series / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.InstitutionName, ds.PatientID = "St Elsewhere", "PX"
    ds.save_as(str(series / "x.dcm"))
    # a converted <uid>.nii.gz beside its DICOM folder (MONAI Label's DICOMweb cache)
    assert institution_of(tmp_path / "1.2.3.nii.gz", [{"institution": "H1"}], "dflt") == "St Elsewhere"
    assert patient_of("1.2.3", tmp_path / "1.2.3.nii.gz") == "PX"
    assert pydicom is not None


def _labelled(tmp_path, pairs, institution="A", n=6):
    """Saved labels of ``n`` (image, mask) pairs, two images per patient."""
    p = institution.lower()
    return [LabelledItem(f"{p}{i}", _save_png(tmp_path / f"{p}{i}.png", img),
                         _save_png(tmp_path / f"{p}{i}_l.png", mask), institution, f"p{p}{i // 2}")
            for i, (img, mask) in enumerate(pairs[:n])]


def test_plan_first_layer_and_retraining(tmp_path, tiny, disks):
    reg = LayerRegistry(tmp_path / "reg")
    items = _labelled(tmp_path, disks["A"])
    items.append(LabelledItem("b0", _save_png(tmp_path / "b0.png", disks["B"][0][0]),
                              _save_png(tmp_path / "b0_l.png", disks["B"][0][1]), "B", "pb"))
    empty = _save_png(tmp_path / "e0_l.png", np.zeros((48, 64), np.uint8))
    items.append(LabelledItem("e0", items[0].image_path, empty, "A", "pe"))
    ps = {p.institution: p for p in plan(items, reg, min_images=4, retrain_after=3)}
    assert ps["A"].train and not ps["B"].train and "4 needed" in ps["B"].reason
    rep = train_institution(tiny, reg, ps["A"], TrainConfig(epochs=1, **SHORT))
    assert rep["layer"] == "a-v1" and rep["images"] == 6
    assert rep["skipped"] == [{"image": "e0", "reason": "empty label"}]
    assert reg.get("a-v1").extra["image_ids"] == [f"a{i}" for i in range(6)]
    # nothing new: no retraining; three new labels: a new version, the old one kept
    assert not {p.institution: p for p in plan(items, reg, 4, 3)}["A"].train
    more = items + [LabelledItem(f"n{i}", items[i].image_path, items[i].label_path, "A", f"pn{i}") for i in range(3)]
    pa = {p.institution: p for p in plan(more, reg, 4, 3)}["A"]
    assert pa.train and len(pa.new_items) == 4  # e0 (empty, skipped before) counts as unseen too
    assert {p.institution for p in plan(more, reg, 4, 3, only=["B"])} == {"B"}


def test_monitor_follows_a_training_and_stops_it_with_nothing_stored(tmp_path, tiny, disks, monkeypatch):
    import casam.training.layer as layer_mod

    monkeypatch.setattr(layer_mod, "CV_MAX_IMAGES", 0)  # the hold-out path's stages (6 images would cross-validate)
    reg = LayerRegistry(tmp_path / "reg")
    (p,) = plan(_labelled(tmp_path, disks["A"]), reg, min_images=4)
    seen = []
    monitor = TrainingMonitor(on_progress=seen.append, period=3600)
    rep = train_institution(tiny, reg, p, TrainConfig(epochs=2, **SHORT), monitor=monitor)
    assert rep["layer"] == "a-v1"
    steps = [(s["stage"], s["epoch"]) for s in seen]  # reported on every change of stage or epoch
    assert steps == [("load", 0), ("encode", 0), ("validate", 0), ("train", 1), ("validate", 1), ("train", 2),
                     ("validate", 2)], steps
    assert monitor.state()["encoded"] == 6 and seen[0]["institution"] == "A"
    # stopped in its second epoch (as a wall-time limit stops it): TrainingStopped, the registry as it was
    files = sorted(str(f.relative_to(reg.root)) for f in reg.root.rglob("*"))
    stopper = TrainingMonitor(on_progress=lambda s: s["epoch"] == 2 and stopper.stop())
    with pytest.raises(TrainingStopped, match="stopped after"):
        train_institution(tiny, reg, p, TrainConfig(epochs=3, **SHORT), monitor=stopper)
    assert stopper.state()["stage"] == "train" and stopper.state()["epoch"] == 2
    assert sorted(str(f.relative_to(reg.root)) for f in reg.root.rglob("*")) == files
    assert [i.name for i in reg.list()] == ["a-v1"]
    late = TrainingMonitor(deadline=time.time() - 1, limit="max_train_minutes = 0.5")
    with pytest.raises(TrainingStopped, match=r"time limit max_train_minutes = 0.5: stopped after \d+ s"):
        train_institution(tiny, reg, p, TrainConfig(epochs=1, **SHORT), monitor=late)


def test_volume_labels_become_slices(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    vol = np.zeros((12, 32, 32), np.uint8)
    lab = np.zeros_like(vol)
    lab[3:9, 10:20, 10:20] = 1
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "v.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "l.nii.gz"))
    assert label_slices(lab, 3) == [3, 5, 8] and label_slices(lab, 10) == list(range(3, 9))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    items = [LabelledItem("v", str(tmp_path / "v.nii.gz"), str(tmp_path / "l.nii.gz"), "H", "p1"),
             LabelledItem("bad", str(tmp_path / "bad.png"), str(tmp_path / "l.nii.gz"), "H", "p2")]
    images, masks, patients, used, skipped = load_items(items, max_slices_per_volume=4)
    assert len(images) == 4 and all(m.any() for m in masks) and patients == ["p1"] * 4 and used == ["v"]
    assert skipped[0]["image"] == "bad" and "cannot read" in skipped[0]["reason"]


def test_label_on_a_partial_grid_is_resampled(tmp_path):
    """A DICOM SEG converted to NIfTI keeps only the slices with segments: it lands on the right slices."""
    sitk = pytest.importorskip("SimpleITK")
    vol = sitk.GetImageFromArray(np.zeros((10, 16, 16), np.uint8))
    vol.SetSpacing((1.0, 1.0, 3.0))
    vol.SetOrigin((0.0, 0.0, 5.0))
    sitk.WriteImage(vol, str(tmp_path / "v.nii.gz"))
    part = np.zeros((3, 16, 16), np.uint8)
    part[:, 4:8, 4:8] = 1
    seg = sitk.GetImageFromArray(part)
    seg.SetSpacing((1.0, 1.0, 3.0))
    seg.SetOrigin((0.0, 0.0, 5.0 + 4 * 3.0))  # slices 4, 5, 6 of the volume
    sitk.WriteImage(seg, str(tmp_path / "seg.nii.gz"))
    lab = read_label(tmp_path / "seg.nii.gz", read_clinical(tmp_path / "v.nii.gz"))
    assert lab.shape == (10, 16, 16)
    assert [k for k in range(10) if lab[k].any()] == [4, 5, 6] and lab[5, 4:8, 4:8].all()
