"""Clicks answered through box proposals (casam.prompts.clicks) and the click-sequence protocol
(casam.scoring.protocol)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from casam.prompts.clicks import (
    FEATURES,
    ClickConfig,
    Proposals,
    click_depth,
    confine,
    cut_background,
    decode_clicks,
    edit_boxes,
    fill_missed,
    fuse_proposals,
    proposal_features,
)
from casam.scoring.protocol import click_sequence, clicks_to, next_click, summarise

L = 64


def square_decoder(obj=(20, 16, 44, 40)):
    """A stand-in decoder on a 64² frame that segments a fixed square object when the box covers its centre,
    the box itself otherwise, and predicts a higher IoU the closer the box is to the object's box."""
    x0, y0, x1, y1 = obj
    calls = []

    def decode(points, labels, boxes):
        calls.append(len(boxes))
        out = torch.full((len(boxes), 1, L, L), -5.0)
        ious = torch.zeros(len(boxes), 1)
        for k, b in enumerate(boxes.tolist()):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]:
                bx = [max(b[0], x0), max(b[1], y0), min(b[2], x1), min(b[3], y1)]
            else:
                bx = b
            out[k, 0, int(bx[1]):int(bx[3]) + 1, int(bx[0]):int(bx[2]) + 1] = 5.0
            ious[k, 0] = 1.0 - sum(abs(u - v) for u, v in zip(b, obj)) / 200.0
        return out, ious

    return decode, calls


def test_one_click_finds_the_object_through_box_proposals():
    decode, calls = square_decoder()
    # half-sizes are given for a 256² frame: 4, 8, 16, 24 and 32 px in this 64² one
    logits, iou, info = decode_clicks(decode, np.array([[30.0, 30.0]]), np.array([1]), (L, L), L, L,
                                      ClickConfig(half_sizes=(16, 32, 64, 96, 128)))
    mask = logits[0, 0] > 0
    assert mask[16:41, 20:45].all() and mask.sum() == 25 * 25  # exactly the object
    assert info["proposal"] == "click" and info["proposals"] == 5 and info["half_size"] == 64
    assert calls == [5, 5]  # the proposals, then their re-decoding (at most redecode_top), each one batch


def test_fused_answer_keeps_what_proposals_that_score_alike_agree_on():
    logits = torch.full((3, 1, L, L), -5.0)
    logits[0, 0, 10:30, 10:30] = 5.0  # two proposals that score alike: a smaller and a larger square ...
    logits[1, 0, 10:40, 10:40] = 5.0
    logits[2, 0, 0:60, 0:60] = 5.0  # ... and a much worse-scored one
    p = Proposals(logits, torch.tensor([[0.9], [0.7], [0.5]]), torch.zeros(3, 4), torch.arange(3), None,
                  (logits, torch.zeros(3, 1), torch.zeros(3, 4)))
    fg = torch.tensor([[20.0, 20.0]])
    fused, iou, box = fuse_proposals(p, torch.tensor([1.0, 1.0, -1.0]), 0.05, fg, 1.0, (L, L))
    m = fused[0, 0] > 0
    assert m[10:30, 10:30].all() and m.sum() == 20 * 20  # both hold it; what only one holds is a coin toss: out
    assert abs(float(iou) - 0.8) < 1e-3 and box.tolist() == [10.0, 10.0, 29.0, 29.0]
    one, iou, _ = fuse_proposals(p, torch.tensor([1.0, 0.5, -1.0]), 0.05, fg, 1.0, (L, L))
    assert torch.equal(one[0, 0] > 0, logits[0, 0] > 0) and abs(float(iou) - 0.9) < 1e-3  # a clear winner alone
    apart = logits.clone()
    apart[1] = -5.0
    apart[1, 0, 40:50, 40:50] = 5.0  # two that share nothing: not an empty answer, the better-scored one
    p.logits = apart
    alone, _, box = fuse_proposals(p, torch.tensor([1.0, 1.0, -1.0]), 0.05, fg, 1.0, (L, L))
    assert (alone[0, 0] > 0).sum() in (20 * 20, 10 * 10) and len(box) == 4


def test_background_click_removes_what_it_was_put_on():
    decode, _ = square_decoder()
    fg, bg = np.array([[30.0, 30.0]]), np.array([[42.0, 38.0]])
    logits, _, _ = decode_clicks(decode, np.concatenate([fg, bg]), np.array([1, 0]), (L, L), L, L)
    mask = logits[0, 0] > 0
    assert mask[30, 30] and not mask[38, 42]
    m = torch.ones(8, 8, dtype=torch.bool)
    cut = cut_background(m, torch.tensor([[1.0, 1.0]]), torch.tensor([[6.0, 6.0]]))
    assert cut[1, 1] and not cut[6, 6] and cut.sum() < 64


def test_a_missed_foreground_click_adds_a_disc_reaching_the_mask():
    logits = torch.full((L, L), -5.0)
    logits[10:30, 10:30] = 5.0
    fg = torch.tensor([[20.0, 20.0], [40.0, 20.0]])  # one inside, one 11 px right of the mask
    out = fill_missed(logits, fg, torch.zeros(0, 2))
    assert out[20, 40] >= 1.0 and out[20, 30] >= 1.0 and out[20, 52] < 0 and out[10:30, 10:30].gt(0).all()
    assert out[20, 35] == 1.0 and ((out > 0) & ~(logits > 0)).sum() < np.pi * 11.5 ** 2  # raised to +1, a disc only
    near_bg = fill_missed(logits, fg, torch.tensor([[46.0, 20.0]]))  # a background click 6 px away: radius 3
    assert near_bg[20, 40] > 0 and near_bg[20, 44] < 0 and near_bg[20, 36] < 0
    capped = fill_missed(logits, fg, torch.zeros(0, 2), cap=0.25)  # at most a quarter of the mask's radius (11.3)
    assert capped[20, 40] > 0 and capped[20, 36] < 0
    assert torch.equal(fill_missed(logits, fg[:1], torch.zeros(0, 2)), logits)  # nothing missed: unchanged
    empty = torch.full((L, L), -5.0)
    assert torch.equal(fill_missed(empty, fg, torch.zeros(0, 2)), empty)  # no mask to reach


def test_a_later_click_keeps_what_its_candidate_edits_agree_on():
    def decode(points, labels, boxes):  # segments each box's own inside, trusted the more the squarer it is
        out, ious = torch.full((len(boxes), 1, L, L), -5.0), torch.zeros(len(boxes), 1)
        for k, b in enumerate(boxes.tolist()):
            out[k, 0, int(b[1]):int(b[3]) + 1, int(b[0]):int(b[2]) + 1] = 2.0
            w, h = b[2] - b[0], b[3] - b[1]
            ious[k, 0] = 0.5 + 0.4 * min(w, h) / max(w, h, 1)
        return out, ious

    # a background click in the first answer's corner: moving its right or its bottom edge score alike
    clicks, labels = np.array([[30.0, 30.0], [34.0, 34.0]]), np.array([1, 0])
    cfg = dict(half_sizes=(32,), redecode=False, cut_background=False, rechoose_depth=None, fill=None)
    one, _, info = decode_clicks(decode, clicks, labels, (L, L), L, L, ClickConfig(edit_fuse=None, **cfg))
    fused, _, info_f = decode_clicks(decode, clicks, labels, (L, L), L, L, ClickConfig(**cfg))
    assert info["edits"] == info_f["edits"] == 1 and info["box"] == info_f["box"]  # the next click edits the same box
    a, b = one[0, 0] > 0, fused[0, 0] > 0
    assert not a[34, 34] and not b[34, 34]  # both remove what the background click was put on
    assert a.sum() == 12 * 17 and b.sum() == 12 * 12 and (b & ~a).sum() == 0  # one edit alone, or what both share


def test_later_clicks_edit_the_first_answer_where_they_ask():
    decode, calls = square_decoder()
    cfg = ClickConfig(half_sizes=(16, 32, 64, 96, 128))
    first, _, info = decode_clicks(decode, np.array([[30.0, 30.0]]), np.array([1]), (L, L), L, L, cfg)
    assert info["edits"] == 0
    # a foreground click the mask already covers changes nothing
    same, _, info = decode_clicks(decode, np.array([[30.0, 30.0], [22.0, 18.0]]), np.array([1, 1]), (L, L), L, L, cfg)
    assert torch.equal(same > 0, first > 0) and info["edits"] == 0
    # a missed foreground click grows the box to hold it; a covered background click moves an edge past it
    grown, _, info = decode_clicks(decode, np.array([[30.0, 30.0], [50.0, 30.0]]), np.array([1, 1]), (L, L), L, L, cfg)
    # (the stand-in object ends at 44)
    assert info["edits"] == 1 and info["box"][2] >= 50 and info["box"][:2] == [20.0, 16.0]
    cut, _, info = decode_clicks(decode, np.array([[30.0, 30.0], [50.0, 30.0], [24.0, 30.0]]), np.array([1, 1, 0]),
                                 (L, L), L, L, cfg)
    m = cut[0, 0] > 0
    assert info["edits"] == 2 and not m[30, 24] and m[30, 30]  # (an edge moved past it, or a cut around it)


def test_a_missed_part_the_box_cannot_reach_is_joined_from_a_local_mask():
    a, b = (20, 16, 44, 40), (50, 20, 56, 28)  # the object: a large part, and a small one beside it

    def decode(points, labels, boxes):  # segments the part whose centre the box holds (the large one first)
        out, ious = torch.full((len(boxes), 1, L, L), -5.0), torch.zeros(len(boxes), 1)
        for k, bx in enumerate(boxes.tolist()):
            for part in (a, b):
                x0, y0, x1, y1 = part
                if bx[0] <= (x0 + x1) / 2 <= bx[2] and bx[1] <= (y0 + y1) / 2 <= bx[3]:
                    rows = slice(max(y0, int(bx[1])), min(y1, int(bx[3])) + 1)
                    out[k, 0, rows, max(x0, int(bx[0])):min(x1, int(bx[2])) + 1] = 5.0
                    ious[k, 0] = 1.0 - sum(abs(u - v) for u, v in zip(bx, part)) / 200.0
                    break
        return out, ious

    cfg = ClickConfig(half_sizes=(16, 32, 64, 96, 128))
    clicks, labels = np.array([[30.0, 30.0], [53.0, 24.0]]), np.array([1, 1])
    grown_only, _, _ = decode_clicks(decode, clicks, labels, (L, L), L, L,
                                     ClickConfig(half_sizes=cfg.half_sizes, add_local=(), fill=None))
    # any box holding both parts holds the large part's centre: it misses the small
    assert not grown_only[0, 0, 24, 53] > 0
    filled, _, _ = decode_clicks(decode, clicks, labels, (L, L), L, L,
                                 ClickConfig(half_sizes=cfg.half_sizes, add_local=()))
    assert filled[0, 0, 24, 53] > 0  # still missed after the edits: a disc around the click takes it in
    joined, _, info = decode_clicks(decode, clicks, labels, (L, L), L, L, cfg)
    m = joined[0, 0] > 0
    assert m[16:41, 20:45].all() and m[20:29, 50:57].all() and info["edits"] == 1


def test_a_click_far_from_what_the_first_click_took_chooses_again():
    def decode(points, labels, boxes):  # boxes of half-size ≥ 12 take the whole organ, smaller ones the lesion in it
        out, ious = torch.full((len(boxes), 1, L, L), -5.0), torch.zeros(len(boxes), 1)
        for k, b in enumerate(boxes.tolist()):
            if (b[2] - b[0]) / 2 >= 12:
                out[k, 0, 4:61, 4:61], ious[k, 0] = 5.0, 0.95
            else:
                out[k, 0, 20:31, 20:31], ious[k, 0] = 5.0, 0.8
        return out, ious

    cfg = ClickConfig(half_sizes=(16, 32, 64, 96, 128), redecode=False)
    first, _, _ = decode_clicks(decode, np.array([[25.0, 25.0]]), np.array([1]), (L, L), L, L, cfg)
    assert (first[0, 0] > 0).sum() == 57 * 57  # the first click took the organ (the decoder trusts it more)
    organ = first[0, 0] > 0
    assert click_depth(organ, torch.tensor([45.0, 45.0])) > 0.4 > click_depth(organ, torch.tensor([59.0, 59.0]))
    assert click_depth(organ, torch.tensor([62.0, 30.0])) == pytest.approx(-2 / np.sqrt(57 * 57 / np.pi))
    assert click_depth(torch.zeros(L, L, dtype=torch.bool), torch.tensor([5.0, 5.0])) == float("-inf")
    # a background click deep inside the organ: the lesion, the proposal that agrees with both clicks
    again, _, info = decode_clicks(decode, np.array([[25.0, 25.0], [45.0, 45.0]]), np.array([1, 0]), (L, L), L, L, cfg)
    m = again[0, 0] > 0
    assert info["rechosen"] == 1 and m[20:31, 20:31].all() and m.sum() == 11 * 11
    # one near the organ's border only edits it there
    edge, _, info = decode_clicks(decode, np.array([[25.0, 25.0], [59.0, 59.0]]), np.array([1, 0]), (L, L), L, L, cfg)
    m = edge[0, 0] > 0
    assert info["rechosen"] == 0 and not m[59, 59] and m.sum() > 40 * 40
    off, _, info = decode_clicks(decode, np.array([[25.0, 25.0], [45.0, 45.0]]), np.array([1, 0]), (L, L), L, L,
                                 ClickConfig(half_sizes=cfg.half_sizes, redecode=False, rechoose_depth=None))
    assert info["rechosen"] == 0 and (off[0, 0] > 0).sum() > 40 * 40
    # the other way round: the first click took the lesion, a foreground click far out in the organ takes the organ

    def prefers_lesion(points, labels, boxes):
        out, ious = decode(points, labels, boxes)
        return out, 1.75 - ious  # now the decoder trusts the lesion (0.95) more than the organ (0.8)
    first, _, _ = decode_clicks(prefers_lesion, np.array([[25.0, 25.0]]), np.array([1]), (L, L), L, L, cfg)
    assert (first[0, 0] > 0).sum() == 11 * 11
    grown, _, info = decode_clicks(prefers_lesion, np.array([[25.0, 25.0], [50.0, 50.0]]), np.array([1, 1]),
                                   (L, L), L, L, cfg)
    assert info["rechosen"] == 1 and (grown[0, 0] > 0).sum() == 57 * 57


def test_edit_boxes_keep_every_foreground_click_inside():
    box, fg = torch.tensor([10.0, 10.0, 50.0, 50.0]), torch.tensor([[30.0, 30.0]])
    right = edit_boxes(box, torch.tensor([45.0, 30.0]), 0, fg, (L, L), (0.1,), 0.5)
    assert right.tolist() == [[10.0, 10.0, 44.0, 50.0]]  # only the right edge can move past the click, keeping half
    assert len(edit_boxes(box, torch.tensor([30.0, 30.5]), 0, fg, (L, L), (0.1,), 0.5)) == 0  # no edge can move
    grown = edit_boxes(box, torch.tensor([60.0, 30.0]), 1, fg, (L, L), (0.05, 0.3), 0.5)
    assert len(grown) == 2 and (grown[:, 2] == L - 1).all() and (grown[:, 0] == 10.0).all()  # clipped to the frame


def test_chooser_features_prefer_the_object_the_click_is_centred_on():
    m = torch.full((2, L, L), -5.0)
    m[0, 20:30, 20:30] = 5.0  # small object, click at its centre
    m[1, 0:60, 0:60] = 5.0  # large region, click off its centre
    f = proposal_features(m > 0, torch.tensor([0.9, 0.9]), m, torch.tensor([0.9, 0.9]), torch.tensor([24.5, 24.5]),
                          torch.tensor([0, 1]), 2)
    assert f.shape == (2, len(FEATURES))
    off = FEATURES.index("off_centre")
    assert f[0, off] < 0.05 < f[1, off]
    assert torch.allclose(f[:, FEATURES.index("consistency")], torch.ones(2))


def test_a_drawn_box_is_the_prompt_and_clicks_only_edit_it():
    decode, calls = square_decoder()
    logits, _, info = decode_clicks(decode, np.array([[2.0, 2.0]]), np.array([0]), (L, L), L, L,
                                    box=np.array([20.0, 16.0, 44.0, 40.0]))
    assert info["proposal"] == "box" and calls == [1]
    assert (logits[0, 0] > 0).sum() == 25 * 25


def test_clicks_after_a_drawn_box_edit_its_answer_as_they_edit_a_clicks():
    """A drawn box answers as the first click's chosen box does; each click edits it where it asks (before, every
    click went to the decoder with the box, which LiteMedSAM never learnt: an MRI tumour's box answer fell from
    IoU 0.88 to 0.53 over 8 corrective clicks in the annotation session)."""
    decode, calls = square_decoder()
    box = np.array([20.0, 16.0, 44.0, 40.0])
    grown, _, info = decode_clicks(decode, np.array([[50.0, 30.0]]), np.array([1]), (L, L), L, L, box=box)
    m = grown[0, 0] > 0
    assert info["proposal"] == "box" and info["edits"] == 1 and info["box"][2] >= 50
    assert m[30, 50] and m[16:41, 20:45].all()
    cut, _, info = decode_clicks(decode, np.array([[50.0, 30.0], [24.0, 30.0]]), np.array([1, 0]), (L, L), L, L,
                                 box=box)
    m = cut[0, 0] > 0
    assert info["edits"] == 2 and not m[30, 24] and m[30, 50] and m[30, 35]
    inside, _, info = decode_clicks(decode, np.array([[30.0, 30.0]]), np.array([1]), (L, L), L, L, box=box)
    no_clicks = decode_clicks(decode, np.zeros((0, 2)), np.zeros(0), (L, L), L, L, box=box)[0]
    assert info["edits"] == 0 and torch.equal(inside > 0, no_clicks > 0)


def test_a_corrective_click_changes_the_answer_only_around_where_it_was_placed():
    """Of what a corrective click's new answer changes, only the connected change holding the click stands, and
    with a reach only within that many times the click's distance to the previous mask (a box grown to hold a
    click must not also move the mask's far side, or add an unrelated region)."""
    prev = torch.full((L, L), -5.0)
    prev[20:41, 20:41] = 5.0
    new = prev.clone()
    new[28:33, 41:47] = 5.0  # the missed part the click at (44, 30) asked for
    new[41:60, 20:41] = 5.0  # the far side moved too, touching the asked-for change only through the mask
    new[2:6, 2:6] = 5.0  # an unrelated region
    new[30, 41:64] = 5.0  # a thin spill along the row, connected to the click
    out = confine(prev, new, torch.tensor([44.0, 30.0]))
    assert bool((out[28:33, 41:47] > 0).all()) and not bool((out[41:60, 20:41] > 0).any())
    assert not bool((out[2:6, 2:6] > 0).any()) and bool(out[30, 60] > 0)
    near = confine(prev, new, torch.tensor([44.0, 30.0]), reach=3.0)  # 4 px from the mask: 12 px around the click
    assert bool((near[28:33, 41:47] > 0).all()) and bool(near[30, 55] > 0) and not bool(near[30, 60] > 0)
    assert torch.equal(confine(prev, new, torch.tensor([10.0, 50.0])), prev)  # the click's pixel did not change


def test_a_click_beside_the_mask_flips_only_its_own_side_near_the_border():
    """With a band, a foreground click only adds and a background click only removes, no deeper than that many
    times the click's distance to the previous mask's border: a click just outside an almost right mask asks for a
    sliver along its border, not a bulge around the click or a bite out of the mask."""
    prev = torch.full((L, L), -5.0)
    prev[20:41, 20:41] = 5.0
    new = prev.clone()
    new[26:35, 41:56] = 5.0  # a bulge 15 px deep for a click 2 px outside the mask
    new[28:33, 37:41] = -5.0  # and a bite out of the mask beside it
    click = torch.tensor([42.0, 30.0])
    whole = confine(prev, new, click)
    assert bool(whole[30, 54] > 0) and not bool(whole[30, 38] > 0)
    banded = confine(prev, new, click, band=2.0)  # 2 px from the mask: at most 4 px deep
    assert bool((banded[26:35, 41:45] > 0).all()) and not bool((banded[:, 45:] > 0).any())
    assert bool((banded[20:41, 20:41] > 0).all())  # the mask keeps what it had
    bg = prev.clone()
    bg[20:41, 37:41] = -5.0  # a background click 2 px inside the border: a 4 px sliver off the side
    bg[30, 41:50] = 5.0  # grown outside at the same time
    cut = confine(prev, bg, torch.tensor([38.5, 30.0]), band=2.0)
    assert not bool((cut[20:41, 37:41] > 0).any()) and not bool((cut[30, 41:50] > 0).any())


def test_needs_a_foreground_click_or_a_box():
    decode, _ = square_decoder()
    with pytest.raises(ValueError):
        decode_clicks(decode, np.array([[2.0, 2.0]]), np.array([0]), (L, L), L, L)


def test_next_click_goes_to_the_centre_of_the_largest_error():
    truth = np.zeros((40, 40), bool)
    truth[5:35, 5:35] = True
    pred = truth.copy()
    pred[5:35, 5:15] = False  # missed a 30×10 strip: a foreground click in its middle
    (xy, label) = next_click(pred, truth)
    assert label == 1 and 8 <= xy[0, 0] <= 10 and 9 <= xy[0, 1] <= 30  # 5 px from every border of the strip
    pred = truth.copy()
    pred[0:40, 35:40] = True  # spilled over: a background click
    assert next_click(pred, truth)[1] == 0
    assert next_click(truth, truth) is None


def test_click_sequence_records_each_click_and_stops_when_exact():
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    seen = []

    def predict(pts, labs, box):
        seen.append((len(pts), box))
        return truth if len(pts) >= 2 else truth & (np.arange(40)[None] < 20)

    out = click_sequence(predict, truth, clicks=4)
    assert seen == [(1, None), (2, None)] and out["iou"] == [0.5, 1.0, 1.0, 1.0]
    assert len(out["seconds"]) == 4 and out["seconds"][2:] == [0.0, 0.0]  # an exact mask is not asked again
    s = summarise([out, out])
    assert s["auc_iou"] == pytest.approx(0.875) and s["monotone"] and s["n"] == 2
    assert s["noc80"] == s["noc90"] == 2 and len(s["seconds"]) == 4


def test_a_box_first_sequence_starts_with_the_tight_box_and_keeps_it():
    truth = np.zeros((40, 40), bool)
    truth[10:30, 12:28] = True
    seen = []

    def predict(pts, labs, box):  # the box's answer spills right; the background click cuts it back
        seen.append((pts.copy(), labs.copy(), None if box is None else list(box)))
        pred = truth.copy()
        if not (labs == 0).any():
            pred[10:30, 28:34] = True
        return pred

    out = click_sequence(predict, truth, clicks=3, first="box")
    assert len(seen) == 2 and out["iou"][0] == pytest.approx(320 / 440) and out["iou"][1:] == [1.0, 1.0]
    (p0, l0, b0), (p1, l1, b1) = seen
    assert len(p0) == 0 and len(l0) == 0 and b0 == b1 and b0[:2] == [12, 10] and b0[2] in (27, 28)
    assert l1.tolist() == [0] and 28 <= p1[0, 0] <= 33 and p1.dtype == np.float32 and l1.dtype == np.int64
    with pytest.raises(ValueError):
        click_sequence(predict, truth, first="scribble")


def test_number_of_clicks_counts_the_first_prompt_and_caps_past_the_sequence():
    assert clicks_to([0.5, 0.85, 0.95], 0.8) == 2 and clicks_to([0.5, 0.85, 0.95], 0.9) == 3
    assert clicks_to([0.91], 0.9) == 1 and clicks_to([0.5, 0.6, 0.7], 0.8) == 4  # never: the steps + 1
    a = {"iou": [0.5, 0.85, 0.95], "dice": [0.6, 0.9, 0.97], "seconds": [0.2, 0.1, 0.1]}
    b = {"iou": [0.3, 0.4, 0.5], "dice": [0.4, 0.5, 0.6], "seconds": [0.4, 0.3, 0.1]}
    s = summarise([a, b])
    assert s["noc80"] == pytest.approx(3.0) and s["noc90"] == pytest.approx(3.5)  # (2 + 4) / 2, (3 + 4) / 2
    assert s["seconds"] == pytest.approx([0.3, 0.2, 0.1]) and s["iou"] == pytest.approx([0.4, 0.625, 0.725])
