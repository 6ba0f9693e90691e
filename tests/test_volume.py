import numpy as np

from casam.inference.predictor import Prediction
from casam.inference.routing import Routing
from casam.inference.volume import segment_volume


class OraclePredictor:
    """Stands in for CASAMPredictor: segments the ground truth inside the prompt's box (tests the propagation)."""

    def __init__(self, truth, cached=()):
        self.truth = truth
        self.calls = []
        self.encoded = set(cached)  # slice keys whose embedding is cached

    def cached(self, key):
        return key in self.encoded

    def predict(self, image, points=None, point_labels=None, box=None, layer="auto", key=None, route=None):
        i = int(image[0, 0])
        self.calls.append((i, key))
        self.encoded.add(key)
        m = self.truth[i].copy()
        if box is not None:
            x0, y0, x1, y1 = [int(round(v)) for v in box]
            keep = np.zeros_like(m)
            keep[max(0, y0 - 3):y1 + 4, max(0, x0 - 3):x1 + 4] = 1
            m = m * keep
        return Prediction(m.astype(np.uint8), 0.9 if m.any() else 0.1, route or Routing(layer="x-v1"))


def test_propagates_both_ways_until_object_ends():
    d, h, w = 20, 40, 40
    zz, yy, xx = np.mgrid[:d, :h, :w]
    truth = (((zz - 10) / 5.0) ** 2 + ((yy - 20) / 10.0) ** 2 + ((xx - 20) / 10.0) ** 2 <= 1).astype(np.uint8)
    vol = np.zeros((d, h, w), np.float32)
    vol[:, 0, 0] = np.arange(d)  # slice id for the stand-in
    p = OraclePredictor(truth)
    out, info = segment_volume(p, vol, 10, points=[[20, 20]], key="vol", min_area=5)
    first, last = np.nonzero(truth.reshape(d, -1).sum(1) >= 5)[0][[0, -1]]
    assert info["slices"] == [first, last]
    assert (out[first:last + 1] == truth[first:last + 1]).all()
    assert out[:first].sum() == 0 and out[last + 1:].sum() == 0
    assert info["route"] == Routing(layer="x-v1")
    assert ("vol:10" in [k for _, k in p.calls]) and all(k.startswith("vol:") for _, k in p.calls)


def _ball(d=20, h=40, w=40):
    zz, yy, xx = np.mgrid[:d, :h, :w]
    truth = (((zz - 10) / 7.0) ** 2 + ((yy - 20) / 10.0) ** 2 + ((xx - 20) / 10.0) ** 2 <= 1).astype(np.uint8)
    vol = np.zeros((d, h, w), np.float32)
    vol[:, 0, 0] = np.arange(d)
    return truth, vol


def test_spent_time_budget_propagates_only_through_encoded_slices():
    truth, vol = _ball()
    p = OraclePredictor(truth, cached=[f"vol:{i}" for i in range(8, 13)])
    out, info = segment_volume(p, vol, 10, points=[[20, 20]], key="vol", min_area=5, budget_s=0.0)
    assert info["slices"] == [8, 12] and info["pending"] == [7, 13]
    assert (out[8:13] == truth[8:13]).all() and out[:8].sum() == 0 and out[13:].sum() == 0
    assert sorted(i for i, _ in p.calls) == [8, 9, 10, 11, 12]  # no slice encoded after the budget


def test_time_budget_leaves_the_masks_of_what_it_reaches_unchanged():
    truth, vol = _ball()
    full, info = segment_volume(OraclePredictor(truth), vol, 10, points=[[20, 20]], key="vol", min_area=5)
    assert info["pending"] == []
    p = OraclePredictor(truth, cached=[f"vol:{i}" for i in (5, 6, 7, 8, 9, 11)])  # a gap at 12: stops there
    part, info = segment_volume(p, vol, 10, points=[[20, 20]], key="vol", min_area=5, budget_s=0.0)
    assert info["slices"] == [5, 11] and info["pending"] == [4, 12]
    assert (part[5:12] == full[5:12]).all()
    again, info = segment_volume(p, vol, 10, points=[[20, 20]], key="vol", min_area=5, budget_s=60.0)
    assert info["pending"] == [] and (again == full).all()
