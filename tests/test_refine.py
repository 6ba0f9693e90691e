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


def test_click_maps_draw_disks_where_the_clicks_are():
    from casam.model.head import click_maps, click_radius

    maps = click_maps(np.array([[10.0, 5.0], [30.0, 20.0]]), np.array([1, 0]), (40, 60))
    assert maps.shape == (1, 2, 40, 60)
    assert maps[0, 0, 5, 10] == 1 and maps[0, 1, 20, 30] == 1
    assert maps[0, 0, 20, 30] == 0 and maps[0, 1, 5, 10] == 0
    r = click_radius((40, 60))
    assert maps[0, 0].sum() <= np.pi * (r + 1) ** 2
    # scaled to another resolution and shifted by a crop's corner
    half = click_maps(np.array([[20.0, 10.0]]), np.array([1]), (20, 30), scale=(0.5, 0.5), offset=(2, 1))
    assert half[0, 0, 4, 8] == 1
    assert click_maps(None, None, (4, 4)).sum() == 0


def test_first_prompt_is_the_box_or_the_first_foreground_click():
    from casam.model.head import first_prompt

    pts, labs = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), np.array([0, 1, 1])
    assert first_prompt(pts, labs, box=True) == (None, None)
    p, lab = first_prompt(pts, labs, box=False)
    assert p.tolist() == [[2.0, 2.0]] and lab.tolist() == [1]
    assert first_prompt(pts[:1], labs[:1], box=False) == (None, None)


def _blobs(rng, size=48):
    """Three like squares on grey; the truth is the first and one of the others, the prompt's answer the first:
    which other square is meant only a click can say."""
    img = rng.normal(90, 6, (size, size))
    truth = np.zeros((size, size), np.uint8)
    first = np.zeros((size, size), np.uint8)
    corners = [(4, 4), (4, 30), (30, 17)]
    order = rng.permutation(3)
    for k, i in enumerate(order):
        y, x = corners[i]
        img[y:y + 12, x:x + 12] += 100
        if k == 0:
            first[y:y + 12, x:x + 12] = 1
        if k < 2:
            truth[y:y + 12, x:x + 12] = 1
    return np.clip(img, 0, 255).astype(np.uint8), truth, first


def test_a_head_that_reads_clicks_learns_to_add_what_a_click_points_at():
    """Trained on simulated corrective clicks, a click on the object the first answer missed adds it."""
    from casam.model.head import refine
    from casam.training.head import sequence_ious

    rng = np.random.default_rng(0)
    exs = []
    for _ in range(12):
        img, truth, first = _blobs(rng)
        it = image_tensor(img)
        b, t = to_head_resolution(it, torch.from_numpy(np.where(first > 0, 8.0, -8.0)).float(), truth)
        exs.append(HeadExample(it, b.half(), t, (0, 0, 47, 47)))
    torch.manual_seed(0)
    head = train_head(exs[:10], HeadConfig(width=8, steps=150, batch_size=6, crop=48, lr=1e-2, clicks=True,
                                           sim_clicks=2), validate=None)
    assert head.clicks and head.uses_clicks() and float(head.gate) == 1.0
    e = exs[10]
    seq = sequence_ious(head, e, 3)
    assert seq[0] < 0.8 and seq[1] > seq[0] + 0.1  # the corrective click on the missed square is answered
    # through the product's entry point: a foreground click on either other square and a background click on the
    # third decide which one is meant
    first = e.logits[0, 0].float() > 0
    squares = [(y, x) for y, x in [(4, 4), (4, 30), (30, 17)] if not first[y + 6, x + 6]]
    for (y, x), (oy, ox) in (squares, squares[::-1]):
        clicks = np.array([[x + 6.0, y + 6.0], [ox + 6.0, oy + 6.0]])
        out = refine(head, e.image, e.logits[0, 0].float(), clicks, np.array([1, 0])) > 0
        assert out[y:y + 12, x:x + 12].float().mean() > 0.8 and out[oy:oy + 12, ox:ox + 12].float().mean() < 0.5
    plain = refine(head, e.image, e.logits[0, 0].float())
    head.reads_clicks.fill_(0.0)  # validation said no: the clicks are not read
    assert torch.equal(refine(head, e.image, e.logits[0, 0].float(), np.array([[10.0, 10.0]]), np.array([1])), plain)


def test_a_click_reading_head_round_trips_through_the_registry(tmp_path, tiny):
    layer = AlignmentLayer(256)
    torch.manual_seed(0)
    head = RefineHead(4, clicks=True, norm=True)
    head.gate.fill_(1.0)
    head.reads_clicks.fill_(1.0)
    reg = LayerRegistry(tmp_path)
    info = reg.add(layer.attach_head(head), FeatureVAE(), LayerInfo("", "A", 0, backbone_id=tiny.id,
                                                                    backbone_hash=tiny.hash))
    loaded = reg.load(info.name, tiny)[0].head
    assert loaded.clicks and loaded.uses_clicks() and loaded.norm
    x, lg, maps = torch.randn(1, 3, 20, 24), torch.randn(1, 1, 20, 24), torch.zeros(1, 2, 20, 24)
    assert torch.equal(loaded(x, lg, maps), head(x, lg, maps))


def test_a_head_stored_by_an_earlier_recipe_loads_as_it_was_trained():
    """Heads without normalisation (before GroupNorm was the recipe) keep their architecture and their answers."""
    torch.manual_seed(0)
    old = RefineHead(4)
    old.gate.fill_(1.0)
    loaded = split_head_state({f"{HEAD_PREFIX}{k}": v for k, v in old.state_dict().items()})[1]
    assert not loaded.clicks and not loaded.norm
    x, lg = torch.randn(1, 3, 20, 24), torch.randn(1, 1, 20, 24)
    assert torch.equal(loaded(x, lg), old(x, lg))


def test_every_click_holds_where_it_was_placed():
    from casam.model.head import honour_clicks

    logits = torch.full((60, 80), -8.0)
    logits[10:30, 10:30] = 6.0  # the answer: one square
    logits[40:50, 50:70] = -1.0  # a region the answer nearly took
    fg = honour_clicks(logits, np.array([[60.0, 45.0]]), np.array([1])) > 0
    assert fg[40:50, 50:70].all() and fg[10:30, 10:30].all() and fg.sum() == 400 + 200
    far = honour_clicks(logits, np.array([[5.0, 55.0]]), np.array([1])) > 0  # nothing near: the click's disk
    assert far[55, 5] and 0 < far.sum() - 400 < 60
    logits[20:30, 20:30] = 1.0  # a part the answer barely kept
    bg = honour_clicks(logits, np.array([[25.0, 25.0]]), np.array([0])) > 0
    assert not bg[20:30, 20:30].any() and bg[10:20, 10:20].all()
    same = honour_clicks(logits, np.array([[15.0, 15.0], [2.0, 2.0]]), np.array([1, 0]))  # clicks already right
    assert torch.equal(same, logits)


def _click_head_layer(tmp_path, tiny, corrections: bool):
    """A registry with one layer whose click-reading head erases everything but what the clicks say."""
    layer = AlignmentLayer(256)
    head = RefineHead(4, clicks=True)
    torch.nn.init.zeros_(head.out.weight)
    torch.nn.init.constant_(head.out.bias, -50.0)
    head.gate.fill_(1.0)
    head.reads_clicks.fill_(1.0)
    reg = LayerRegistry(tmp_path)
    val = {"layer": 1.0, "plain": 0.0}
    reg.add(layer.attach_head(head), FeatureVAE(), LayerInfo(
        "", "A", 0, backbone_id=tiny.id, backbone_hash=tiny.hash, tau=1e12,
        extra={"use": {"box": True, "click": True, "corrections": corrections}, "val": {"box": val, "click": val}}))
    return reg


def test_a_corrective_click_through_the_predictor_holds_where_it_was_placed(tmp_path, tiny):
    img = np.random.default_rng(0).integers(0, 255, (48, 64)).astype(np.uint8)
    pred = CASAMPredictor(tiny, _click_head_layer(tmp_path, tiny, corrections=True))
    box = pred.predict(img, box=(5, 5, 40, 30))
    assert box.route.used == "a-v1" and box.mask.sum() == 0  # the head's answer: nothing
    fg = pred.predict(img, points=[[20, 20]], point_labels=[1], box=(5, 5, 40, 30))
    assert fg.route.used == "a-v1" and fg.mask[20, 20] == 1 and 0 < fg.mask.sum() < 100  # the click's disc
    both = pred.predict(img, points=[[20, 20], [30, 12]], point_labels=[1, 0], box=(5, 5, 40, 30))
    assert both.mask[20, 20] == 1 and both.mask[12, 30] == 0


def test_corrective_clicks_go_to_plain_sam_where_validation_said_so(tmp_path, tiny):
    img = np.random.default_rng(0).integers(0, 255, (48, 64)).astype(np.uint8)
    pred = CASAMPredictor(tiny, _click_head_layer(tmp_path, tiny, corrections=False))
    assert pred.predict(img, box=(5, 5, 40, 30)).route.used == "a-v1"  # the first answer: the layer's
    again = pred.predict(img, points=[[20, 20]], point_labels=[1], box=(5, 5, 40, 30))
    assert again.route.used is None and "corrective clicks" in again.route.reason
    named = pred.predict(img, points=[[20, 20]], point_labels=[1], box=(5, 5, 40, 30), layer="a-v1")
    assert named.route.used == "a-v1"  # a layer the caller names always answers
