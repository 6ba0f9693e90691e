import numpy as np
import pytest
import torch

from casam.inference.predictor import CASAMPredictor
from casam.model.alignment import AlignmentLayer, fresh_layer
from casam.registry.store import LayerRegistry
from casam.scoring.samples import make_samples
from casam.scoring.score import mean_iou
from casam.training.config import TrainConfig
from casam.training.fit import fit
from casam.training.layer import split_by_patient, train_layer
from casam.training.losses import casam_loss

CFG = TrainConfig(epochs=2, batch_size=4, vae_epochs=3, tau_folds=3)


def _train(reg, tiny, data, inst, cfg=CFG, cache=None):
    imgs, masks = zip(*data)
    return train_layer(tiny, list(imgs), list(masks), [f"p{i // 2}" for i in range(len(imgs))], reg, inst,
                       "synthetic", cfg, cache_dir=cache, progress=False)


def test_split_by_patient_never_mixes():
    patients = ["a", "a", "b", "c", "c", "d", "e"]
    tr, va = split_by_patient(patients, 0.4, 0)
    assert set(tr) | set(va) == set(range(7)) and va
    assert not {patients[i] for i in tr} & {patients[i] for i in va}
    assert split_by_patient(["x", "x"], 0.2, 0) == ([0, 1], [])


def test_loss_is_low_for_a_perfect_prediction():
    t = torch.zeros(1, 1, 8, 8)
    t[..., 2:6, 2:6] = 1
    good = casam_loss(t * 20 - 10, torch.ones(1, 1), t)
    bad = casam_loss(-(t * 20 - 10), torch.ones(1, 1), t)
    assert good < 0.05 < bad


def test_training_is_deterministic_and_learns(tmp_path, tiny, disks):
    r1 = _train(LayerRegistry(tmp_path / "r1"), tiny, disks["A"], "A", cache=tmp_path / "cache")
    r2 = _train(LayerRegistry(tmp_path / "r2"), tiny, disks["A"], "A", cache=tmp_path / "cache")
    assert r1.sha256 == r2.sha256  # same seed, same bytes
    assert r1.n_images == 12 and r1.n_patients == 6 and r1.extra["n_val"] > 0
    hist = r1.extra["loss_history"]
    assert len(hist) == 2 and all(np.isfinite(hist))
    assert np.isfinite(r1.tau) and r1.tau > 0
    assert any((tmp_path / "cache").rglob("*.npy"))


def test_fit_reduces_loss(tiny, disks):
    imgs, masks = zip(*disks["A"])
    samples = make_samples(tiny, imgs, masks)
    layer = AlignmentLayer(256)
    hist = fit(tiny, samples, TrainConfig(epochs=8, batch_size=6, lr=1e-3), layer, progress=False)
    assert hist[-1] < hist[0]


def test_earlier_layers_bit_identical_after_adding_a_layer(tmp_path, tiny, disks):
    reg = LayerRegistry(tmp_path)
    a = _train(reg, tiny, disks["A"], "A")
    pred = CASAMPredictor(tiny, reg)
    img, mask = disks["A"][0]
    ys, xs = np.nonzero(mask)
    box = [xs.min(), ys.min(), xs.max(), ys.max()]
    before = pred.predict(img, box=box, layer=a.name)
    files = {p.name: p.read_bytes() for p in (tmp_path / "layers" / a.name).iterdir()}
    _train(reg, tiny, disks["B"], "B")
    pred2 = CASAMPredictor(tiny, reg)
    after = pred2.predict(img, box=box, layer=a.name)
    assert np.array_equal(before.mask, after.mask) and before.iou == after.iou
    assert {p.name: p.read_bytes() for p in (tmp_path / "layers" / a.name).iterdir()} == files
    assert [i.name for i in reg.active()] == ["a-v1", "b-v1"]


def test_a_layer_that_never_beats_plain_sam_is_plain_sam(tmp_path, tiny, disks):
    """Epoch 0 (gate 0) is kept when no epoch beats it; its click validation is then plain SAM's, not run again."""
    imgs, masks = zip(*disks["A"])
    samples = make_samples(tiny, imgs, masks)
    fresh = fresh_layer(tiny)
    for b in fresh.blocks:  # blocks that would change the embedding, were the gate open
        torch.nn.init.normal_(b.conv2.weight, std=0.1)
    for prompt in ("box", "click"):
        assert mean_iou(tiny, fresh, samples, prompt) == mean_iou(tiny, None, samples, prompt)
    frozen = TrainConfig(epochs=1, batch_size=4, lr=0.0, gate_lr=0.0, vae_epochs=3, tau_folds=3, head_lr=0.0)
    info = _train(LayerRegistry(tmp_path), tiny, disks["A"], "A", frozen)
    assert info.extra["best_epoch"] == 0 and info.extra["gate"] == 0.0
    assert info.extra["head"]["best_step"] == 0 and not info.extra["head"]["kept"]  # an unmoved head stays out
    assert info.extra["val"]["click"]["layer"] == info.extra["val"]["click"]["plain"]
    assert info.extra["use"] == {"box": False, "click": False, "corrections": False}
    assert info.extra["clicks"] is None  # a layer that serves nothing: no click sequences run
    assert set(info.extra["timing"]) == {"encode", "train", "head", "calibrate", "validate", "clicks"}


def test_needs_labels(tmp_path, tiny, disks):
    img, _ = disks["A"][0]
    with pytest.raises(ValueError, match="non-empty"):
        train_layer(tiny, [img, img], [np.zeros(img.shape, np.uint8)] * 2, ["a", "b"], LayerRegistry(tmp_path), "X",
                    config=CFG, progress=False)
