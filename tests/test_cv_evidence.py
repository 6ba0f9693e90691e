"""The gate's evidence with few labels: every label validated by a fold model that did not see it, pooled."""

import functools

import numpy as np
import pytest

import casam.training.layer as layer_mod
from casam.registry.evidence import decide, decide_pooled, pool_decisions
from casam.registry.store import LayerRegistry
from casam.scoring.samples import make_samples
from casam.training.config import CV_FOLDS, TrainConfig
from casam.training.layer import cv_folds, plan_split, split_by_patient, train_layer

FAST = dict(epochs=1, batch_size=4, vae_epochs=3, tau_folds=3)


# The default threshold (casam.training.config.CV_MAX_IMAGES), pinned so that these tests hold whatever it becomes.
CV_MAX_IMAGES = 9


@pytest.fixture(autouse=True)
def cross_validation_on(monkeypatch):
    monkeypatch.setattr(layer_mod, "CV_MAX_IMAGES", CV_MAX_IMAGES)


def test_folds_never_mix_patients_and_cover_every_image():
    patients = ["a", "a", "b", "c", "c", "c", "d", "e", "f"]
    folds, unit = cv_folds(patients, 2, 0)
    assert unit == "patient" and len(folds) == 2 and all(folds)
    assert sorted(i for f in folds for i in f) == list(range(len(patients)))  # each image held out exactly once
    held = [{patients[i] for i in f} for f in folds]
    assert not held[0] & held[1]  # a fold model trains on the other fold's patients only
    assert abs(len(folds[0]) - len(folds[1])) <= 3  # balanced up to the largest patient
    assert cv_folds(patients, 2, 0) == (folds, unit)  # seeded
    one, unit = cv_folds(["p"] * 5, 2, 0)  # one patient (the slices of a volume): by image
    assert unit == "image" and sorted(i for f in one for i in f) == list(range(5)) and [len(f) for f in one] in (
        [2, 3], [3, 2])
    assert [len(f) for f in cv_folds(["a", "b"], 5, 0)[0]] == [1, 1]  # never more folds than units
    with pytest.raises(ValueError):
        cv_folds(["a"], 2, 0)


def test_pooled_evidence_is_the_rule_on_every_fold_together():
    rng = np.random.default_rng(0)
    parts = [(list(rng.uniform(0.5, 0.9, n)), list(rng.uniform(0.1, 0.5, n))) for n in (2, 3)]
    pooled = decide_pooled(parts)
    assert pooled == decide(parts[0][0] + parts[1][0], parts[0][1] + parts[1][1])
    assert pooled["n"] == 5 and pooled["use"]
    assert not decide(parts[0][0][:1], parts[0][1][:1])["use"]  # one mask of a hold-out: no evidence
    with pytest.raises(ValueError, match="validation set 0"):  # lengths that only match once pooled
        decide_pooled([([0.5, 0.6], [0.1]), ([0.7], [0.2, 0.3])])
    # from decide's records alone (click sequences): the same as deciding on the pooled values
    noisy = [(list(rng.uniform(0.3, 0.6, n)), list(rng.uniform(0.3, 0.6, n))) for n in (4, 1, 6)]
    for group in (parts, noisy):
        exact = decide_pooled(group)
        summed = pool_decisions([decide(a, b) for a, b in group] + [None, {"use": False, "gain": None, "n": 0}])
        assert summed["n"] == exact["n"] and summed["use"] == exact["use"]
        assert summed["gain"] == pytest.approx(exact["gain"], abs=1e-4)
        assert summed["se"] == pytest.approx(exact["se"], abs=1e-4)
    assert pool_decisions([]) == {"use": False, "gain": None, "se": None, "n": 0}


def test_few_images_plan_no_hold_out():
    cfg = TrainConfig()
    few = [f"p{i}" for i in range(CV_MAX_IMAGES)]
    assert plan_split(few, cfg) == (list(range(CV_MAX_IMAGES)), [], "cv")
    tr, va, split = plan_split(few, TrainConfig(max_images=4))
    assert split == "cv" and va == [] and len(tr) == 4 and tr == sorted(tr)
    assert plan_split(few, TrainConfig(val_fraction=0.0))[2] == "none"  # no validation wanted: none made
    many = [f"p{i // 2}" for i in range(CV_MAX_IMAGES + 1)]  # above the threshold: the hold-out, as before
    assert plan_split(many, cfg) == (*split_by_patient(many, cfg.val_fraction, cfg.seed), "patient")


def test_five_labels_validate_every_mask_and_serve_a_layer_that_helps(tmp_path, tiny, disks, monkeypatch):
    # the folds' click sequences, shortened to the first answer and one corrective click (the test's time)
    monkeypatch.setattr(layer_mod, "click_evidence", functools.partial(layer_mod.click_evidence, steps=2))
    imgs, masks = zip(*disks["A"][:5])
    reg = LayerRegistry(tmp_path)
    cfg = TrainConfig(**FAST, head_steps=20, head_clicks=False)
    info = train_layer(tiny, list(imgs), list(masks), [f"p{i}" for i in range(5)], reg, "A", "synthetic", cfg,
                       progress=False)
    e = info.extra
    assert e["evidence_source"] == "cv" and e["folds"] == CV_FOLDS and e["split"] == "patient"
    assert e["evidence"]["box"]["n"] == 5 and e["evidence"]["click"]["n"] == 5  # every label is evidence
    assert e["n_train"] == 5 and e["n_val"] == 5 and info.n_images == 5
    assert sum(f["n_val"] for f in e["cv"]) == 5 and all(f["n_train"] + f["n_val"] == 5 for f in e["cv"])
    assert sum(f["head"]["steps"] for f in e["cv"]) == 20  # the folds' heads: about one head's training together
    assert e["use"]["box"] and e["evidence"]["box"]["gain"] > 0.1  # bright disks: a layer that clearly helps serves
    assert e["val"]["box"]["layer"] == pytest.approx(info.val_iou) and e["best_epoch"] == 1
    assert e["head"]["kept"] == (e["head"]["click_edits"] is not None)  # decided on the folds' held-out images
    assert {"encode", "cv_train", "train", "head", "calibrate", "validate", "clicks"} == set(e["timing"])
    assert all({"train", "head", "validate"} <= set(f["seconds"]) for f in e["cv"])
    assert (tmp_path / "layers" / info.name / "layer.safetensors").stat().st_size > 0
    assert reg.get(info.name).serves("box")
    assert e["clicks"]["steps"] == 2 and e["clicks"]["corrections"]["n"] == 10  # box and click first, every mask
    assert len(e["clicks"]["folds"]) == CV_FOLDS and e["clicks"]["reads_clicks"] is None  # a head without clicks


def test_five_labels_keep_out_a_layer_that_does_not_help(tmp_path, tiny, disks):
    imgs, masks = zip(*disks["A"][:5])
    samples = make_samples(tiny, imgs, masks, ["v"] * 5)  # one patient: folds over images
    frozen = TrainConfig(**FAST, lr=0.0, gate_lr=0.0, head_steps=0)  # plain SAM on every fold: no gain
    info = train_layer(tiny, [], [], [], LayerRegistry(tmp_path), "A", config=frozen, progress=False,
                       samples=samples)
    e = info.extra
    assert e["evidence_source"] == "cv" and e["split"] == "image" and e["evidence"]["box"]["n"] == 5
    assert e["use"] == {"box": False, "click": False, "corrections": False} and e["clicks"] is None


def test_more_images_keep_the_hold_out(tmp_path, tiny, disks):
    n = CV_MAX_IMAGES + 1
    imgs, masks = zip(*disks["A"][:n])
    samples = make_samples(tiny, imgs, masks, [f"p{i}" for i in range(n)])
    info = train_layer(tiny, [], [], [], LayerRegistry(tmp_path), "A", config=TrainConfig(**FAST, head_steps=0),
                       progress=False, samples=samples)
    e = info.extra
    assert e["evidence_source"] == "holdout" and "folds" not in e and e["split"] == "patient"
    assert e["n_val"] == 2 and e["n_train"] == n - 2 and e["evidence"]["box"]["n"] == 2
    assert set(e["timing"]) == {"encode", "train", "head", "calibrate", "validate", "clicks"}
