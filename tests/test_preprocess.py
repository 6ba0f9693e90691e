import numpy as np
import pytest

from casam.errors import ImageError
from casam.model.preprocess import (
    apply_window,
    as_rgb,
    box_to_model,
    geometry_for,
    logits_to_image,
    mask_to_model,
    points_to_model,
    to_model_input,
)


def test_geometry_keeps_aspect():
    g = geometry_for((346, 512), 256)
    assert g.resized_hw == (173, 256) and g.orig_hw == (346, 512)


@pytest.mark.parametrize("shape", [(30, 40), (30, 40, 1), (30, 40, 3), (30, 40, 4)])
def test_as_rgb_accepts_grey_rgb_rgba(shape):
    assert as_rgb(np.zeros(shape, np.uint8)).shape == (30, 40, 3)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), (30, 40, 2), (1, 40)])
def test_as_rgb_rejects_non_images(shape):
    with pytest.raises(ImageError):
        as_rgb(np.zeros(shape))


def test_nan_rejected():
    a = np.zeros((8, 8), np.float32)
    a[0, 0] = np.nan
    with pytest.raises(ImageError):
        as_rgb(a)


def test_window_mr_and_ct():
    mr = np.linspace(0, 4000, 100 * 100).reshape(100, 100).astype(np.float32)
    w = apply_window(mr)
    assert w.min() == 0 and w.max() == 255
    ct = np.array([[-1000.0, -160.0, 40.0, 240.0, 2000.0]])
    assert apply_window(ct, (-160, 240)).tolist() == [[0.0, 0.0, 127.5, 255.0, 255.0]]
    u8 = np.array([[0, 10, 200]], np.float32)
    assert np.array_equal(apply_window(u8), u8)  # 8-bit images are left alone


def test_model_input_normalisations():
    img = (np.arange(20 * 30) % 256).reshape(20, 30).astype(np.uint8)
    t, g = to_model_input(img, 64, "minmax")
    assert t.shape == (3, 64, 64) and float(t.max()) <= 1.0 and float(t.min()) == 0.0
    assert float(t[:, g.resized_hw[0]:, :].abs().sum()) == 0  # padded bottom
    t2, _ = to_model_input(img, 64, "imagenet")
    assert float(t2.min()) < 0


def test_coordinates_round_trip():
    g = geometry_for((100, 200), 256)
    p = points_to_model(np.array([[0, 0], [199, 99]]), g)
    assert np.allclose(p, [[0.64, 0.64], [255.36, 127.36]])
    assert np.allclose(box_to_model([0, 0, 199, 99], g), [0, 0, 256, 128])


def test_logits_back_to_original_size_and_mask_forward():
    g = geometry_for((100, 200), 256)
    m = np.zeros((100, 200), np.uint8)
    m[20:60, 50:150] = 1
    low = mask_to_model(m, g, 256)
    assert low.shape == (256, 256) and low[128:].sum() == 0
    back = logits_to_image(low * 2 - 1, g)
    assert back.shape == (100, 200)
    assert ((back > 0).numpy() == m.astype(bool)).mean() > 0.98
