import numpy as np
import pytest

from casam.errors import ImageError, PromptError, UnknownLayerError
from casam.predictor import CASAMPredictor, check_prompts


def test_check_prompts():
    pts, lab, box = check_prompts((10, 20), [[0, 0], [19, 9]], [1, 0], [15, 8, 2, 1])
    assert lab.tolist() == [1, 0] and box.tolist() == [2, 1, 15, 8]  # reversed pairs are swapped
    _, _, box = check_prompts((10, 20), box=[-5, -5, 5, 5])
    assert box.tolist() == [0, 0, 5, 5]  # clipped to the image
    with pytest.raises(PromptError, match="outside"):
        check_prompts((10, 20), [[20, 3]])
    with pytest.raises(PromptError, match="outside"):
        check_prompts((10, 20), box=[30, 30, 40, 40])
    with pytest.raises(PromptError, match="foreground"):
        check_prompts((10, 20))
    with pytest.raises(PromptError, match="foreground"):
        check_prompts((10, 20), [[1, 1]], [0])
    with pytest.raises(PromptError, match="labels"):
        check_prompts((10, 20), [[1, 1]], [1, 1])
    with pytest.raises(PromptError):
        check_prompts((10, 20), [[1, 1]], [2])
    with pytest.raises(PromptError):
        check_prompts((10, 20), box=[1, 2, 3])


def test_predict_plain_sam(tiny, disks):
    p = CASAMPredictor(tiny, None, cache_size=2)
    img, mask = disks["A"][0]
    out = p.predict(img, points=[[10, 10]], box=[0, 0, 30, 20], key="a")
    assert out.mask.shape == img.shape and out.mask.dtype == np.uint8 and set(np.unique(out.mask)) <= {0, 1}
    assert out.route["layer"] is None and out.route["fallback"]
    assert p.cached("a")
    p.predict(img, box=[0, 0, 30, 20], key="b")
    p.predict(img, box=[0, 0, 30, 20], key="c")
    assert not p.cached("a") and p.cached("c")  # bounded LRU
    assert p.novelty(img)["ratio"] is None
    with pytest.raises(UnknownLayerError):
        p.predict(img, box=[0, 0, 30, 20], layer="nope")
    with pytest.raises(ImageError):
        p.predict(np.zeros((4, 4, 4, 4)), box=[0, 0, 1, 1])
    with pytest.raises(PromptError):
        p.predict(img, points=[[1000, 1]])


def test_cached_embedding_reused(tiny, disks, monkeypatch):
    p = CASAMPredictor(tiny, None)
    img, _ = disks["A"][1]
    p.predict(img, box=[1, 1, 20, 20], key="k")
    calls = []
    monkeypatch.setattr(tiny, "encode", lambda x: calls.append(1))
    p.predict(img, points=[[5, 5]], key="k")
    assert calls == []
