"""Background encoding in the real MONAI Label server (tiny backbone, synthetic images): an image a client
downloads, uploads or gets as next sample is encoded before its first click, which then finds it cached;
an unknown image or a server path is never encoded. /info shows the caches and the background encoder.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests

from conftest import disk_image
from disk_studies import disk_studies, png_bytes

pytestmark = pytest.mark.slow
pytest.importorskip("monailabel")
from mlserver import MonaiLabelServer  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("casam-prefetch")
    studies = disk_studies(work, 4)
    srv = MonaiLabelServer(str(studies), work, conf={"backbone": "tiny", "registry": str(work / "registry"),
                                                     "cache": str(work / "cache"), "cache_mb": "8"})
    srv.start(timeout=600)
    srv.work = work
    yield srv
    srv.stop()


def _prefetch(srv, timeout: float = 120) -> dict:
    """/info's background encoder state once it is idle."""
    end = time.time() + timeout
    while True:
        state = srv.info()["cache"]["prefetch"]
        if state["idle"] or time.time() > end:
            return state
        time.sleep(0.2)


def _click(srv, image: str) -> dict:
    r = requests.post(f"{srv.url}/infer/casam", params={"image": image, "output": "json"},
                      data={"params": json.dumps({"foreground": [[40, 30]]})}, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def test_opened_images_are_encoded_before_the_first_click(server):
    info = server.info()
    assert info["limits"]["cache_mb"] == 8 and info["cache"]["prefetch"]["done"] == {}
    r = requests.get(f"{server.url}/datastore/image", params={"image": "disk1"}, timeout=60)
    assert r.status_code == 200
    assert _prefetch(server)["done"] == {"disk1": 1}
    assert _click(server, "disk1")["embedding_cached"] is True
    caches = server.info()["cache"]["caches"]
    assert caches["embeddings"]["bytes"] <= 8 * 2**20 and caches["embeddings"]["entries"] >= 1

    rng = np.random.default_rng(7)
    r = requests.put(f"{server.url}/datastore/image", params={"image": "upload1"},
                     files={"file": ("upload1.png", png_bytes(disk_image(rng, size=(64, 96))[0]))}, timeout=60)
    assert r.status_code == 200, r.text
    assert "upload1" in _prefetch(server)["done"]
    assert _click(server, "upload1")["embedding_cached"] is True

    r = requests.post(f"{server.url}/activelearning/random", json={}, timeout=60)
    assert r.status_code == 200, r.text
    picked = r.json()["id"]
    assert picked in _prefetch(server)["done"]
    assert _click(server, picked)["embedding_cached"] is True


def test_nothing_outside_the_datastore_is_encoded(server):
    before = server.info()["cache"]
    outside = server.work / "disk0_mask.png"  # a file on the server, not in the datastore
    for image in (str(outside), "../disk0_mask", "nope"):
        r = requests.get(f"{server.url}/datastore/image", params={"image": image}, timeout=60)
        assert r.status_code == 404, (image, r.status_code)
    state = _prefetch(server)
    assert state["done"] == before["prefetch"]["done"] and state["errors"] == before["prefetch"]["errors"]
    assert server.info()["cache"]["caches"]["embeddings"]["entries"] == before["caches"]["embeddings"]["entries"]
