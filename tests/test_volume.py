import numpy as np

from casam.predictor import Prediction
from casam.volume import segment_volume


class OraclePredictor:
    """Stands in for CASAMPredictor: segments the ground truth inside the prompt's box (tests the propagation)."""

    def __init__(self, truth):
        self.truth = truth
        self.calls = []

    def predict(self, image, points=None, point_labels=None, box=None, layer="auto", key=None, route=None):
        i = int(image[0, 0])
        self.calls.append((i, key))
        m = self.truth[i].copy()
        if box is not None:
            x0, y0, x1, y1 = [int(round(v)) for v in box]
            keep = np.zeros_like(m)
            keep[max(0, y0 - 3):y1 + 4, max(0, x0 - 3):x1 + 4] = 1
            m = m * keep
        return Prediction(m.astype(np.uint8), 0.9 if m.any() else 0.1, route or {"layer": "x-v1"})


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
    assert info["route"] == {"layer": "x-v1"}
    assert ("vol:10" in [k for _, k in p.calls]) and all(k.startswith("vol:") for _, k in p.calls)
