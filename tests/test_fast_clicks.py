"""Fast clicks, as behaviour: byte-bounded caches, cached layer outputs and decodes that give
the same masks as an uncached predictor, background encoding that fills the cache and is used, and reads only
what the app's ``locate`` serves. (Latency itself is measured by ``benchmarks/latency.py``, not asserted.)
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import torch

from casam.inference.cache import ByteCache, nbytes
from casam.inference.predictor import CASAMPredictor
from casam.inference.prefetch import Prefetcher, image_key, middle_out
from casam.inference.routing import Routing
from casam.inference.volume import segment_volume
from conftest import disk_image


def _count(monkeypatch, backbone, name):
    """Counts the prompts given to ``backbone.decode`` or the calls of ``backbone.encode``."""
    calls = []
    orig = getattr(backbone, name)

    def counted(*args, **kwargs):
        prompts = next((a for a in list(args[1:]) + list(kwargs.values()) if a is not None), None)
        calls.append(1 if name == "encode" else len(prompts))
        return orig(*args, **kwargs)

    monkeypatch.setattr(backbone, name, counted)
    return calls


def test_byte_cache_is_bounded_by_bytes_and_lru():
    c = ByteCache(3 * 1024)
    for i in range(5):
        c.put(i, torch.zeros(256))  # 1 KiB each
        assert c.bytes <= 3 * 1024
    assert [i in c for i in range(5)] == [False, False, True, True, True]
    c.get(2)
    c.put(5, torch.zeros(256))
    assert 2 in c and 3 not in c  # the least recently used went
    c.put("big", torch.zeros(4096))  # larger than the budget: not kept, nothing evicted for it
    assert "big" not in c and len(c) == 3 and c.stats()["evictions"] == 3
    assert nbytes((torch.zeros(2), {"a": np.zeros(3, np.uint8)})) == 8 + 3


def test_get_or_compute_runs_once_for_concurrent_callers():
    c, calls, gate = ByteCache(1 << 20), [], threading.Event()

    def slow():
        calls.append(1)
        gate.wait(5)
        return torch.ones(4)

    out = []
    threads = [threading.Thread(target=lambda: out.append(c.get_or_compute("k", slow))) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert calls == [1] and len(out) == 3 and sorted(hit for _, hit in out) == [False, True, True]


def test_embedding_cache_is_bounded_by_bytes(tiny, disks):
    one = 4 * 256 * 16 * 16  # a tiny embedding
    p = CASAMPredictor(tiny, None, cache_bytes=3 * one + 4096)
    img, _ = disks["A"][0]
    for k in "abcde":
        p.predict(img, box=[0, 0, 30, 20], key=k)
    stats = p.cache_stats()["embeddings"]
    assert stats["entries"] == 3 and stats["bytes"] <= stats["max_bytes"]
    assert [p.cached(k) for k in "abcde"] == [False, False, True, True, True]


def test_further_click_decodes_only_what_changed_and_equals_an_uncached_answer(tiny, disks, monkeypatch):
    img, mask = disks["A"][2]
    ys, xs = np.nonzero(mask)
    fg = [float(xs.mean()), float(ys.mean())]
    cached, fresh = CASAMPredictor(tiny, None), CASAMPredictor(tiny, None)
    first = cached.predict(img, points=[fg], key="img")
    on = np.argwhere(first.mask)
    y, x = on[len(on) // 3] if len(on) else (2, 2)
    for clicks, labels in (([fg, [x, y]], [1, 0]), ([fg, [x, y], [fg[0] + 3, fg[1]]], [1, 0, 1])):
        rows = _count(monkeypatch, tiny, "decode")
        again = cached.predict(img, points=clicks, point_labels=labels, key="img")
        further = sum(rows)
        rows.clear()
        uncached = fresh.predict(img, points=clicks, point_labels=labels)
        # the further click decodes only the prompts the first click did not (a background click: a few at most)
        assert further < sum(rows) and (labels[-1] == 1 or further <= sum(rows) // 4), (further, sum(rows))
        # (the same prompts, decoded in other batches: float rounding may differ in the last digits)
        assert np.array_equal(again.mask, uncached.mask) and again.iou == pytest.approx(uncached.iou, abs=1e-5)
        assert again.route.click == uncached.route.click
        monkeypatch.undo()


def test_layer_output_is_cached_per_image(tiny, disks, monkeypatch):
    p = CASAMPredictor(tiny, None)
    runs = []

    class Layer(torch.nn.Module):
        def forward(self, z):
            runs.append(1)
            return z * 1.0

    monkeypatch.setattr(p, "layer", lambda name: Layer())
    route = Routing(layer="site-v1", forced=True)
    img, _ = disks["B"][0]
    a = p.predict(img, box=[2, 2, 40, 30], key="x", route=route)
    b = p.predict(img, points=[[20, 20]], key="x", route=route)
    assert runs == [1] and a.route.used == b.route.used == "site-v1"
    assert ("aligned", "x", "site-v1") in p._cache
    p.predict(img, box=[2, 2, 40, 30], route=route)  # no key: nothing cached, the layer runs again
    assert runs == [1, 1]


def _volume(rng, d=9):
    slices = [disk_image(rng, size=(48, 48)) for _ in range(d)]
    return np.stack([s[0] for s in slices]), np.stack([s[1] for s in slices])


def test_repropagation_decodes_nothing_new_and_gives_the_same_volume(tiny, monkeypatch):
    vol, truth = _volume(np.random.default_rng(3))
    k = 4
    ys, xs = np.nonzero(truth[k])
    box = [xs.min(), ys.min(), xs.max(), ys.max()]
    p = CASAMPredictor(tiny, None)
    out1, info1 = segment_volume(p, vol, k, box=box, key="v", min_iou=0.0, min_overlap=0.0, min_area=1)
    rows, enc = _count(monkeypatch, tiny, "decode"), _count(monkeypatch, tiny, "encode")
    out2, info2 = segment_volume(p, vol, k, box=box, key="v", min_iou=0.0, min_overlap=0.0, min_area=1)
    assert rows == [] and enc == [] and np.array_equal(out1, out2) and info1["slices"] == info2["slices"]
    fresh, _ = segment_volume(CASAMPredictor(tiny, None), vol, k, box=box, min_iou=0.0, min_overlap=0.0, min_area=1)
    assert np.array_equal(out2, fresh)


def test_middle_out_order():
    assert middle_out(5, 5) == [2, 1, 3, 0, 4] and middle_out(4, 2) == [2, 1] and middle_out(3, 0) == []
    assert middle_out(7, 4, centre=5) == [5, 4, 6, 3] and middle_out(4, 2, centre=9) == [3, 2]


@pytest.fixture
def files(tmp_path):
    import SimpleITK as sitk
    from PIL import Image

    rng = np.random.default_rng(5)
    vol, _ = _volume(rng, d=7)
    sitk.WriteImage(sitk.GetImageFromArray(vol.astype(np.int16)), str(tmp_path / "vol.nii.gz"), True)
    Image.fromarray(disk_image(rng, size=(40, 56))[0]).save(tmp_path / "pic.png")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    Image.fromarray(disk_image(rng, size=(40, 56))[0]).save(outside)
    served = {"vol": tmp_path / "vol.nii.gz", "pic": tmp_path / "pic.png"}

    def locate(image_id):
        if image_id not in served:
            raise KeyError(f"unknown image {image_id!r}")
        return str(served[image_id]), image_id

    return served, locate, outside


@contextlib.contextmanager
def _encoding(tiny, files, max_slices):
    """A predictor, its background encoder and a function listing which of the volume's 7 slices are cached."""
    served, locate, _ = files
    p = CASAMPredictor(tiny, None)
    pf = Prefetcher(lambda: p, locate, max_slices=max_slices)
    key = image_key(tiny.id, str(served["vol"]))
    try:
        yield p, pf, key, lambda: [p.cached(f"{key}:{i}") for i in range(7)]
    finally:
        pf.close()


def test_background_encoding_fills_the_cache_and_the_click_uses_it(tiny, files, monkeypatch):
    from casam.data.clinical import read_clinical

    served = files[0]
    with _encoding(tiny, files, 5) as (p, pf, key, cached):
        pf.submit("vol")
        assert pf.wait_idle(60)
        assert cached() == [False, True, True, True, True, True, False]
        assert pf.status()["done"] == {"vol": 5}
        enc = _count(monkeypatch, tiny, "encode")
        vol = read_clinical(served["vol"]).array
        p.predict(vol[3], points=[[20, 20]], key=f"{key}:3")
        assert enc == []  # the click used the background's embedding
        pf.submit("pic")
        assert pf.wait_idle(60) and p.cached(image_key(tiny.id, str(served["pic"]))) and enc == [1]


def test_a_click_moves_background_encoding_to_its_slice(tiny, files):
    with _encoding(tiny, files, 3) as (p, pf, key, cached):
        pf.submit("vol")
        assert pf.wait_idle(60) and cached() == [False, False, True, True, True, False, False]
        pf.submit("vol", centre=6)  # a click on slice 6 ran out of time: encode from there next
        assert pf.wait_idle(60) and cached() == [False, False, True, True, True, True, True]


@contextlib.contextmanager
def _slow_background(tiny):
    """Makes a background encode stop 0.3 s inside the encoder (between two of its blocks); yields an Event set then."""
    inside = threading.Event()

    def slow(module, args):
        if threading.current_thread().name == "casam-prefetch":
            inside.set()
            time.sleep(0.3)

    hook = tiny.sam.image_encoder.net[0].register_forward_pre_hook(slow)
    try:
        yield inside
    finally:
        hook.remove()


def test_a_request_pauses_the_slice_being_encoded_in_the_background(tiny, files):
    served = files[0]
    with _slow_background(tiny) as inside, _encoding(tiny, files, 3) as (p, pf, key, cached):
        pf.submit("pic")
        assert inside.wait(30)
        with pf.foreground():  # a request came while that encode was running
            time.sleep(1.0)
            assert not p.cached(image_key(tiny.id, str(served["pic"])))  # it paused at the next block
        assert pf.wait_idle(60) and p.cached(image_key(tiny.id, str(served["pic"])))


def test_a_request_waiting_for_the_slice_being_encoded_gets_it(tiny, files, monkeypatch):
    from casam.data.clinical import read_clinical

    served = files[0]
    with _slow_background(tiny) as inside, _encoding(tiny, files, 3) as (p, pf, key, cached):
        pf.submit("pic")
        assert inside.wait(30)
        enc = _count(monkeypatch, tiny, "encode")
        done = threading.Event()

        def request():  # a click on the picture the background is encoding: it waits for that encode
            with pf.foreground():
                p.embed(read_clinical(served["pic"]).array, image_key(tiny.id, str(served["pic"])))
            done.set()

        threading.Thread(target=request, daemon=True).start()
        assert done.wait(20)  # the paused encode went on for the request waiting on it (no deadlock)
        assert enc == []  # and encoded once, by the background


def test_background_encoding_waits_for_requests_and_reads_only_what_locate_serves(tiny, files):
    served, locate, outside = files
    p = CASAMPredictor(tiny, None)
    pf = Prefetcher(lambda: p, locate)
    try:
        with pf.foreground():
            pf.submit("pic")
            time.sleep(0.5)
            assert p.cache_stats()["embeddings"]["entries"] == 0  # held back while a request is in flight
        assert pf.wait_idle(60) and p.cache_stats()["embeddings"]["entries"] == 1
        for bad in (str(outside), "../" + outside.name, "nope"):
            pf.submit(bad)
            assert pf.wait_idle(60)
        assert p.cache_stats()["embeddings"]["entries"] == 1  # nothing outside what locate serves was encoded
        assert set(pf.status()["errors"]) == {str(outside), "../" + outside.name, "nope"}
    finally:
        pf.close()
