"""The refinement head (casam.model.head) and the gate's evidence rule (casam.registry.evidence)."""

import numpy as np
import pytest
import torch

from casam.inference.predictor import CASAMPredictor
from casam.model.alignment import AlignmentLayer
from casam.model.head import HEAD_PREFIX, RefineHead, corrective_clicks, image_tensor, refine, split_head_state
from casam.model.router import FeatureVAE
from casam.registry.evidence import decide
from casam.registry.store import LayerInfo, LayerRegistry
from casam.training.head import HeadConfig, HeadExample, to_head_resolution, train_head


def _lines(rng, size=64):
    """A grey image with thin dark lines (a vessel-like convention) and their mask."""
    img = rng.normal(170, 8, (size, size))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(4):
        if rng.random() < 0.5:
            mask[int(rng.integers(4, size - 4)), :] = 1
        else:
            mask[:, int(rng.integers(4, size - 4))] = 1
    img[mask > 0] -= 90
    return np.clip(img, 0, 255).astype(np.uint8), mask


def test_a_fresh_head_is_exactly_plain_sam():
    head = RefineHead(4)
    logits = torch.randn(2, 40, 52)
    image = image_tensor(np.random.default_rng(0).integers(0, 255, (40, 52, 3)).astype(np.uint8))
    assert torch.equal(refine(head, image, logits), logits)
    assert torch.equal(refine(None, image, logits), logits)
    head.gate.fill_(1.0)
    assert refine(head, image, logits).shape == logits.shape


def test_image_tensor_caps_the_side_and_standardises():
    t = image_tensor(np.full((30, 2000), 7, np.uint8), max_side=500)
    assert t.shape == (1, 3, 8, 500) and t.abs().max() < 1e-5


def test_head_learns_thin_lines_that_the_prompt_answer_lacks():
    rng = np.random.default_rng(0)
    exs = []
    for _ in range(6):
        img, mask = _lines(rng)
        it = image_tensor(img)
        region_logits = torch.full((64, 64), 8.0)  # "plain SAM": the whole box region
        b, t = to_head_resolution(it, region_logits, mask)
        exs.append(HeadExample(it, b.half(), t, (0, 0, 63, 63)))
    val = exs[4:]

    def score(head):
        with torch.no_grad():
            return float(np.mean([((head(e.image, e.logits.float()) > 0) & (e.truth > 0)).sum().item()
                                  / ((head(e.image, e.logits.float()) > 0) | (e.truth > 0)).sum().item() for e in val]))

    report = {}
    head = train_head(exs[:4], HeadConfig(width=4, steps=60, batch_size=4, crop=48, lr=1e-2, val_every=20),
                      validate=score, report=report)
    first, best = report["val_history"][0][1], max(v for _, v in report["val_history"])
    assert first < 0.1 and best > 0.5 and float(head.gate) == 1.0 and report["best_step"] > 0


def test_a_head_that_never_beats_its_layer_stays_closed():
    exs = [HeadExample(torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 16, 16).half(), torch.zeros(1, 1, 16, 16),
                       (0, 0, 15, 15))]
    report = {}
    head = train_head(exs, HeadConfig(width=2, steps=4, batch_size=1, crop=16, val_every=2),
                      validate=lambda h: 1.0 if float(h.gate) == 0.0 else 0.5, report=report)
    assert float(head.gate) == 0.0 and report["best_step"] == 0


def test_a_layer_with_a_head_round_trips_through_the_registry(tmp_path, tiny):
    torch.manual_seed(0)
    layer = AlignmentLayer(256)
    head = RefineHead(4)
    head.gate.fill_(1.0)
    layer.attach_head(head)
    keys = list(layer.state_dict())
    assert any(k.startswith("head.") for k in keys) and not any(k.startswith("refine.") for k in keys)
    reg = LayerRegistry(tmp_path)
    info = reg.add(layer, FeatureVAE(), LayerInfo("", "A", 0, backbone_id=tiny.id, backbone_hash=tiny.hash, tau=1e9,
                                                  extra={"use": {"box": True, "click": True}, "val": {}}))
    loaded, _, _ = reg.load(info.name, tiny)
    assert loaded.head is not None and float(loaded.head.gate) == 1.0
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[k], v)
    # a layer without a head stores no head weights and loads without one
    plain = reg.add(AlignmentLayer(256), FeatureVAE(),
                    LayerInfo("", "B", 0, backbone_id=tiny.id, backbone_hash=tiny.hash))
    assert reg.load(plain.name, tiny)[0].head is None


def test_the_predictor_serves_the_head_of_the_layer_it_uses(tmp_path, tiny):
    torch.manual_seed(0)
    layer = AlignmentLayer(256)
    head = RefineHead(4)
    torch.nn.init.constant_(head.out.bias, -50.0)  # a head that erases every mask
    torch.nn.init.zeros_(head.out.weight)
    head.gate.fill_(1.0)
    reg = LayerRegistry(tmp_path)
    reg.add(layer.attach_head(head), FeatureVAE(), LayerInfo("", "A", 0, backbone_id=tiny.id, backbone_hash=tiny.hash,
                                                             tau=1e12, extra={"use": {"box": True, "click": False},
                                                                    "val": {"box": {"layer": 1.0, "plain": 0.0},
                                                                            "click": {"layer": 0.0, "plain": 1.0}}}))
    img = np.random.default_rng(0).integers(0, 255, (48, 64)).astype(np.uint8)
    pred = CASAMPredictor(tiny, reg)
    box = pred.predict(img, box=(5, 5, 40, 30))
    assert box.route.used == "a-v1" and box.mask.sum() == 0
    plain = pred.predict(img, box=(5, 5, 40, 30), layer="none")
    click = pred.predict(img, points=[[20, 20]])
    assert click.route.used is None  # the gate: this layer does not serve clicks, nor its head
    assert plain.route.used is None


def _fixed_head(bias: float) -> RefineHead:
    """A head whose answer is one constant: -50 erases every mask, +50 fills the image."""
    head = RefineHead(4)
    torch.nn.init.zeros_(head.out.weight)
    torch.nn.init.constant_(head.out.bias, bias)
    head.gate.fill_(1.0)
    return head


def test_corrective_clicks_keep_their_edits_against_a_head_only_where_validation_said_so():
    image = image_tensor(np.full((40, 60), 120, np.uint8))
    edited = torch.full((40, 60), -5.0)
    edited[5:15, 5:15] = 5.0  # the region SAM's edited answer adds around a foreground click
    edited[25:35, 40:50] = 5.0  # another one no click asked for
    eraser = _fixed_head(-50.0)
    fg = np.array([[10.0, 10.0]]), np.array([1])
    assert (refine(eraser, image, edited, *fg) > 0).sum() == 0  # click_edits 0: the head overrules the clicks
    eraser.click_edits.fill_(1.0)
    out = refine(eraser, image, edited, *fg) > 0
    assert out[5:15, 5:15].all() and out.sum() == 100  # the clicked region stands, the other stays erased
    filler = _fixed_head(50.0)
    filler.click_edits.fill_(1.0)
    out = refine(filler, image, edited, np.array([[30.0, 20.0]]), np.array([0])) > 0  # a background click
    assert not out[20, 30] and out[5:15, 5:15].all() and out[25:35, 40:50].all()
    assert out.sum() == 200  # the background SAM's answer left out there is removed, nothing else
    assert (refine(filler, image, edited) > 0).all()  # the first prompt alone: the head's answer


def test_the_first_click_chooses_the_answer_and_every_later_one_edits_it():
    pts, labs = np.array([[1, 1], [2, 2], [3, 3]]), np.array([0, 1, 1])
    kept_pts, kept_labs = corrective_clicks(pts, labs, box=False)
    assert kept_pts.tolist() == [[1, 1], [3, 3]] and kept_labs.tolist() == [0, 1]
    assert corrective_clicks(pts, labs, box=True)[0].tolist() == pts.tolist()  # after a drawn box: all of them
    assert corrective_clicks(pts[1:2], labs[1:2], box=False) == (None, None)
    assert corrective_clicks(None, None, box=True) == (None, None)


def test_a_layer_file_splits_into_layer_and_head():
    head = _fixed_head(1.0)
    state = {"gate": torch.zeros(1), **{HEAD_PREFIX + k: v for k, v in head.state_dict().items()}}
    rest, loaded = split_head_state(state)
    assert set(rest) == {"gate"} and float(loaded.gate) == 1.0 and float(loaded.click_edits) == 0.0


@pytest.mark.parametrize("layer, plain, use", [
    ([0.1339, 0.1340, 0.1338], [0.1338, 0.1339, 0.1337], False),  # a 0.0001 gain is noise
    ([0.60, 0.55, 0.58], [0.12, 0.10, 0.13], True),  # a clear gain on every mask
    ([0.90, 0.50, 0.91], [0.85, 0.70, 0.86], False),  # a mean gain of 0.0 with one mask much worse
    ([0.80], [0.70], False),  # one mask is no evidence: its spread cannot be measured
    ([0.80, 0.78], [0.70, 0.69], True),  # two masks that agree
    ([0.95, 0.96, 0.95, 0.97], [0.94, 0.95, 0.945, 0.96], True),  # small but consistent
])
def test_the_gate_serves_on_evidence_only(layer, plain, use):
    assert decide(layer, plain)["use"] is use


def test_the_evidence_rule_needs_paired_scores():
    with pytest.raises(ValueError):
        decide([0.5, 0.6], [0.5])
    assert decide([], [])["use"] is False
