"""Clicks answered through box proposals (casam.clicks) and the click-sequence protocol (casam.interactive)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from casam.clicks import ClickConfig, cut_background, decode_clicks
from casam.interactive import click_sequence, next_click, summarise

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
    assert calls == [5, 4]  # the proposals, then the refinement of the best 4, each one batch


def test_background_click_removes_what_it_was_put_on():
    decode, _ = square_decoder()
    fg, bg = np.array([[30.0, 30.0]]), np.array([[42.0, 38.0]])
    logits, _, _ = decode_clicks(decode, np.concatenate([fg, bg]), np.array([1, 0]), (L, L), L, L)
    mask = logits[0, 0] > 0
    assert mask[30, 30] and not mask[38, 42]
    m = torch.ones(8, 8, dtype=torch.bool)
    cut = cut_background(m, torch.tensor([[1.0, 1.0]]), torch.tensor([[6.0, 6.0]]))
    assert cut[1, 1] and not cut[6, 6] and cut.sum() < 64


def test_a_drawn_box_is_the_prompt_and_clicks_only_edit_it():
    decode, calls = square_decoder()
    logits, _, info = decode_clicks(decode, np.array([[2.0, 2.0]]), np.array([0]), (L, L), L, L,
                                    box=np.array([20.0, 16.0, 44.0, 40.0]))
    assert info["proposal"] == "box" and calls == [1]
    assert (logits[0, 0] > 0).sum() == 25 * 25


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

    def predict(pts, labs):
        seen.append(len(pts))
        return truth if len(pts) >= 2 else truth & (np.arange(40)[None] < 20)

    out = click_sequence(predict, truth, clicks=4)
    assert seen == [1, 2] and out["iou"] == [0.5, 1.0, 1.0, 1.0]
    s = summarise([out, out])
    assert s["auc_iou"] == pytest.approx(0.875) and s["monotone"] and s["n"] == 2
