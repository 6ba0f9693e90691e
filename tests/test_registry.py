import json

import pytest
import torch

import casam.registry.store as regmod
from casam.errors import RegistryError, UnknownLayerError
from casam.model.alignment import AlignmentLayer
from casam.model.router import FeatureVAE
from casam.registry.store import LayerInfo, LayerRegistry, slug


def _add(reg, inst, backbone, seed=0):
    torch.manual_seed(seed)
    return reg.add(AlignmentLayer(256), FeatureVAE(), LayerInfo("", inst, 0, backbone_id=backbone.id,
                                                                 backbone_hash=backbone.hash, tau=1.5))


def test_add_list_load_versions(tmp_path, tiny):
    reg = LayerRegistry(tmp_path)
    a1 = _add(reg, "Hospital A", tiny)
    b1 = _add(reg, "B", tiny, 1)
    a2 = _add(reg, "Hospital A", tiny, 2)
    assert (a1.name, b1.name, a2.name) == ("hospital-a-v1", "b-v1", "hospital-a-v2")
    assert [i.name for i in reg.list()] == ["hospital-a-v1", "b-v1", "hospital-a-v2"]
    assert [i.name for i in reg.active()] == ["b-v1", "hospital-a-v2"]
    layer, vae, info = reg.load("hospital-a-v1", tiny)
    assert info.tau == 1.5 and set(info.sha256) == {"layer.safetensors", "router.safetensors"}
    meta = json.loads((tmp_path / "layers" / "b-v1" / "meta.json").read_text())
    assert meta["backbone_hash"] == tiny.hash and meta["created"]
    with pytest.raises(UnknownLayerError):
        reg.load("nope")
    assert slug("Hospital Pedro Hispano") == "hospital-pedro-hispano"


def test_checksum_and_backbone_are_verified(tmp_path, tiny):
    reg = LayerRegistry(tmp_path)
    info = _add(reg, "A", tiny)
    other = type("B", (), {"hash": "other", "id": "other@x"})()
    with pytest.raises(RegistryError, match="backbone"):
        reg.load(info.name, other)
    f = tmp_path / "layers" / info.name / "layer.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="checksum"):
        reg.load(info.name, tiny)


def test_remove_and_rollback(tmp_path, tiny):
    reg = LayerRegistry(tmp_path)
    _add(reg, "A", tiny)
    _add(reg, "A", tiny)
    _add(reg, "B", tiny)
    assert reg.rollback("A").name == "a-v2"
    assert [i.name for i in reg.active()] == ["a-v1", "b-v1"]
    reg.remove("b-v1")
    assert [i.name for i in reg.list()] == ["a-v1"]
    with pytest.raises(UnknownLayerError):
        reg.rollback("B")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_write_leaves_nothing(tmp_path, tiny, monkeypatch):
    reg = LayerRegistry(tmp_path)
    first = _add(reg, "A", tiny)
    before = (tmp_path / "layers" / first.name / "layer.safetensors").read_bytes()
    calls = {"n": 0}
    real = regmod.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(regmod, "save_file", failing)
    with pytest.raises(RegistryError):
        _add(reg, "B", tiny)
    assert [i.name for i in reg.list()] == ["a-v1"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert (tmp_path / "layers" / first.name / "layer.safetensors").read_bytes() == before


def test_layer_info_serves_by_its_validation_record():
    val = {"box": {"layer": 0.70, "plain": 0.72}, "click": {"layer": 0.61, "plain": 0.55}}
    new = LayerInfo("a-v1", "a", 1, val_iou=0.9, zero_shot_val_iou=0.1,
                    extra={"use": {"box": False, "click": True}, "val": val})
    assert not new.serves("box") and new.serves("click")  # the stored decision, not the box figures
    assert new.validation("click") == {"layer": 0.61, "plain": 0.55}
    # a prompt type with a validation record but missing from "use" is not served
    partial = LayerInfo("b-v1", "b", 1, extra={"use": {"box": True}, "val": val})
    assert partial.serves("box") and not partial.serves("click")
    # a prompt type with no validation record falls back to the box rule
    unrecorded = LayerInfo("c-v1", "c", 1, val_iou=0.5, zero_shot_val_iou=0.6, extra={"use": {"box": True}, "val": {}})
    assert not unrecorded.serves("box") and unrecorded.validation("box") == {"layer": 0.5, "plain": 0.6}
    # without figures the layer is served
    assert LayerInfo("d-v1", "d", 1).serves("click") and LayerInfo("e-v1", "e", 1, val_iou=0.5).serves("box")


def test_meta_json_without_use_or_val_is_judged_by_the_box_rule(tmp_path):
    reg = LayerRegistry(tmp_path)
    for name, lay, plain in (("better-v1", 0.8, 0.7), ("worse-v1", 0.6, 0.7)):
        folder = tmp_path / "layers" / name
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({  # a layer added without a gate decision: no extra["use"]/["val"]
            "name": name, "institution": name[:-3], "version": 1, "tau": 2.0, "val_iou": lay,
            "zero_shot_val_iou": plain, "extra": {"seconds": 12.0}}))
    better, worse = reg.get("better-v1"), reg.get("worse-v1")
    assert better.serves("box") and better.serves("click")  # every prompt type by the box figures
    assert not worse.serves("box") and not worse.serves("click")
    assert worse.validation("click") == {"layer": 0.6, "plain": 0.7}


def test_meta_json_carries_the_format_tag_and_unknown_formats_are_refused(tmp_path, tiny):
    reg = LayerRegistry(tmp_path)
    info = _add(reg, "A", tiny)
    meta_path = tmp_path / "layers" / info.name / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == regmod.LAYER_FORMAT == "casam-layer/2"
    assert reg.export(info.name)[0]["format"] == regmod.LAYER_FORMAT
    meta["format"] = "casam-layer/1"  # format 1 is still read
    meta_path.write_text(json.dumps(meta))
    assert reg.load(info.name, tiny)[2].name == info.name
    del meta["format"]  # a meta.json without a tag is format 1
    meta_path.write_text(json.dumps(meta))
    assert reg.load(info.name, tiny)[2].name == info.name
    meta["format"] = "casam-layer/99"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="casam-layer/99"):
        reg.list()
    meta2, files = LayerRegistry(tmp_path / "other").export(_add(LayerRegistry(tmp_path / "other"), "B", tiny).name)
    with pytest.raises(RegistryError, match="upgrade casam"):
        LayerRegistry(tmp_path / "third").put({**meta2, "format": "casam-layer/3"}, files)
