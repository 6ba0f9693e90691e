"""Concurrency and crash safety on a real MONAI Label server (tiny backbone, synthetic pictures).

Four clients click on different images while labels are saved and a training runs in the background: no
5xx, every label is there afterwards, and a layer appears in /info only complete (it loads, checksums pass).
Then the server and its trainer are killed with SIGKILL mid-training: after a restart the earlier layers
are served, every layer passes its checksums, and no half-written layer is left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import requests

from disk_studies import disk_studies

pytestmark = pytest.mark.slow
pytest.importorskip("monailabel")
from casam.registry.store import LayerRegistry  # noqa: E402
from mlserver import MonaiLabelServer  # noqa: E402

N_IMAGES = 10


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("casam-concurrency")
    disk_studies(work, N_IMAGES)
    return work


def _server(work, name: str) -> MonaiLabelServer:
    return MonaiLabelServer(str(work / "studies"), work / name, conf={
        "backbone": "tiny", "registry": str(work / "registry"), "cache": str(work / "cache"), "min_images": "4",
        "default_institution": "A", "max_train_epochs": "100000"}).start(timeout=600)  # a training to kill mid-way


@pytest.fixture(scope="module")
def server(work):
    srv = _server(work, "first")
    yield srv
    srv.stop()


def _save(srv, i: int) -> requests.Response:
    return requests.put(f"{srv.url}/datastore/label", params={"image": f"disk{i}", "tag": "final"},
                        data={"params": json.dumps({"institution": "A"})},
                        files={"label": ("l.png", (srv.workdir.parent / f"disk{i}_mask.png").read_bytes())},
                        timeout=300)


def _click(srv, i: int, layer: str = "auto") -> requests.Response:
    params = {"foreground": [[30 + i, 30]], "layer": layer}
    return requests.post(f"{srv.url}/infer/casam", params={"image": f"disk{i}", "output": "json"},
                         data={"params": json.dumps(params)}, timeout=300)


def _training(srv) -> bool:
    return requests.get(f"{srv.url}/train/", params={"check_if_running": "true"}, timeout=60).status_code == 200


def _wait_training(srv, timeout: float = 600) -> dict:
    t0 = time.time()
    while _training(srv):
        assert time.time() - t0 < timeout, "training did not finish"
        time.sleep(1)
    return requests.get(f"{srv.url}/train/", timeout=60).json()


def test_clicks_while_saving_and_training(server, work):
    for i in range(4):
        assert _save(server, i).status_code == 200
    r = requests.post(f"{server.url}/train/casam", json={"epochs": 2}, timeout=60)
    assert r.status_code == 200, r.text
    codes, seen, errors = [], [], []
    done = threading.Event()

    def clicker(i: int):
        for _ in range(5):
            codes.append(_click(server, i).status_code)

    def saver():
        for i in (8, 9):
            codes.append(_save(server, i).status_code)

    def watcher():  # every layer /info shows must be complete: it loads and its checksums pass
        reg = LayerRegistry(work / "registry")
        while not done.is_set():
            r = requests.get(f"{server.url}/info/", timeout=60)
            codes.append(r.status_code)
            for layer in r.json().get("layers", []):
                try:
                    reg.load(layer["name"])
                    seen.append(layer["name"])
                except Exception as e:  # noqa: BLE001 - recorded and asserted below
                    errors.append((layer["name"], repr(e)))
            time.sleep(0.3)

    t0 = time.time()
    threads = [threading.Thread(target=clicker, args=(i,)) for i in (4, 5, 6, 7)] + [threading.Thread(target=saver)]
    watch = threading.Thread(target=watcher)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    task = _wait_training(server)
    done.set()
    watch.join()
    print(f"{len(codes)} requests while training, {time.time() - t0:.1f} s; training {task.get('status')}")
    assert codes and all(c == 200 for c in codes), sorted(set(codes))
    assert not errors, errors
    assert task["status"] == "DONE", task
    info = server.info()
    assert info["datastore"]["completed"] == 6  # every label saved is there
    assert [layer["name"] for layer in info["layers"]] == ["a-v1"]
    r = _click(server, 0, layer="a-v1")
    assert r.status_code == 200 and r.json()["layer"] == "a-v1", r.text


def test_kill_9_during_training(server, work):
    registry = work / "registry"
    before = [layer["name"] for layer in server.info()["layers"]]
    assert before == ["a-v1"]
    r = requests.post(f"{server.url}/train/casam", json={"institution": "A", "force": True, "epochs": 100000},
                      timeout=60)
    assert r.status_code == 200, r.text
    t0 = time.time()
    while not any("monailabel.interfaces.utils.app" in " ".join(c.cmdline())
                  for c in psutil.Process(server.proc.pid).children(recursive=True)):
        assert time.time() - t0 < 120, "the training process did not start"
        time.sleep(0.5)
    time.sleep(8)  # into the training epochs
    assert _training(server)
    # what a writer killed mid-copy leaves: a temporary folder with part of a layer (a minute old)
    half = registry / ".tmp-killed-writer"
    half.mkdir()
    (half / "layer.safetensors").write_bytes(b"\0" * 100)
    os.utime(half, (time.time() - 120, time.time() - 120))
    group = os.getpgid(server.proc.pid)
    members = [server.proc.pid] + [c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)]
    os.killpg(group, signal.SIGKILL)
    server.proc.wait(30)
    time.sleep(1)
    assert not [p for p in members if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

    again = _server(work, "second")
    try:
        info = again.info()
        assert [layer["name"] for layer in info["layers"]] == before  # no half layer served
        reg = LayerRegistry(registry)
        for layer in reg.list():
            reg.load(layer.name)  # checksums pass
        assert not half.exists()
        assert not [d.name for d in (registry / "layers").iterdir() if d.name not in before]
        r = _click(again, 1, layer="a-v1")
        assert r.status_code == 200 and r.json()["layer"] == "a-v1", r.text
        assert again.info()["datastore"]["completed"] == 6
    finally:
        again.stop()
