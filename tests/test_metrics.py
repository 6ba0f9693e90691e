import numpy as np
import pytest

from casam.scoring.metrics import boundary_iou, continual_summary, dice, iou


def test_iou_dice():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:5] = True
    b[:, :5] = True
    assert iou(a, b) == pytest.approx(25 / 75)
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, a) == dice(a, a) == boundary_iou(a, a) == 1.0
    assert iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    with pytest.raises(ValueError):
        iou(a, np.zeros((3, 3)))


def test_boundary_iou_penalises_shifted_edges_more():
    a = np.zeros((100, 100), bool)
    a[20:80, 20:80] = True
    b = np.roll(a, 3, axis=1)
    assert boundary_iou(a, b) < iou(a, b)


def test_continual_summary():
    R = [[0.8], [0.7, 0.9], [0.6, 0.85, 0.7]]
    s = continual_summary(R)
    assert s["avg"] == pytest.approx((0.6 + 0.85 + 0.7) / 3)
    assert s["bwt"] == pytest.approx(((0.6 - 0.8) + (0.85 - 0.9)) / 2)
    assert s["forgetting"] == pytest.approx(((0.8 - 0.6) + (0.9 - 0.85)) / 2)
    assert continual_summary([[0.5]]) == {"avg": 0.5, "bwt": 0.0, "forgetting": 0.0}
