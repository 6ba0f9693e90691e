from dataclasses import replace

import numpy as np
import pytest

from casam.errors import ImageError, PromptError, UnknownLayerError
from casam.inference.predictor import CASAMPredictor, check_prompts
from casam.inference.routing import Routing


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
    assert out.route.layer is None and out.route.fallback
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


def test_gate_serves_a_layer_only_for_prompt_types_it_beat_plain_sam_on(tiny):
    from casam.registry.store import LayerInfo

    info = LayerInfo("site-v1", "site", 1, extra={"use": {"box": False, "click": True},
                                                  "val": {"box": {"layer": 0.70, "plain": 0.72},
                                                          "click": {"layer": 0.61, "plain": 0.55}}})
    p = CASAMPredictor(tiny, None)
    p._infos = [info]
    routed = Routing(layer="site-v1")
    box, click = p.gate(routed, "box"), p.gate(routed, "click")
    assert box.used is None and "0.700 vs 0.720" in box.reason
    assert click.used == "site-v1" and "0.610 > 0.550" in click.reason
    assert p.gate(replace(routed, forced=True), "box").used == "site-v1"  # a layer the user names is used
    assert p.gate(Routing(fallback=True), "box").used is None
    # a layer stored without per-prompt validation records is judged by its box validation figures
    unrecorded = LayerInfo("other-v1", "other", 1, val_iou=0.6, zero_shot_val_iou=0.7)
    assert not unrecorded.serves("box") and unrecorded.validation("box") == {"layer": 0.6, "plain": 0.7}


def test_clicks_alone_are_answered_through_box_proposals(tiny, disks):
    p = CASAMPredictor(tiny, None)
    img, mask = disks["A"][0]
    ys, xs = np.nonzero(mask)
    out = p.predict(img, points=[[xs.mean(), ys.mean()]], point_labels=[1])
    assert out.route.prompt == "click" and out.route.click["proposal"] == "click"
    assert out.mask.shape == img.shape
    # a background click on the mask takes that part away
    on = np.argwhere(out.mask)
    if len(on):
        y, x = on[len(on) // 2]
        again = p.predict(img, points=[[xs.mean(), ys.mean()], [x, y]], point_labels=[1, 0])
        assert again.mask[y, x] == 0
