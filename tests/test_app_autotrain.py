"""The app trains by itself, one training at a time, with bounded requests.

Without a server: the trainer's request limits, its wall-time limit and its status (``lib/trainers/casam.py``
with the tiny backbone on a local datastore). Through the real server (slow): five saved labels start a
background training whose layer the next click is routed to without a restart, a train request while it runs
is refused with 409, over-limit requests with 413, and a training killed mid-way leaves the registry as it was.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from conftest import needs_data
from mlserver import MonaiLabelServer
from test_online import SHORT

monailabel = pytest.importorskip("monailabel")
from monailabel.datastore.local import LocalDatastore  # noqa: E402

from casam.errors import LimitError  # noqa: E402
from lib.configs.casam import CASAMConfig  # noqa: E402
from lib.trainers.casam import CASAMTrainer  # noqa: E402

HOME = "TCGA_DU"


def _config(tmp_path: Path, **conf: str) -> CASAMConfig:
    """The app's config with the tiny backbone and a short recipe (a short router VAE, no refinement head)."""
    cfg = CASAMConfig()
    cfg.init("casam", str(tmp_path / "model"), {"backbone": "tiny", "registry": str(tmp_path / "registry"),
                                                 "cache": str(tmp_path / "cache"), **conf}, None)
    cfg.train_config = dataclasses.replace(cfg.train_config, **SHORT)
    return cfg


def _datastore(tmp_path: Path, disks, n: int = 6) -> LocalDatastore:
    from PIL import Image

    studies = tmp_path / "studies"
    studies.mkdir()
    ds = LocalDatastore(str(studies), extensions=("*.png",))
    for i, (img, mask) in enumerate(disks["A"][:n]):
        Image.fromarray(img).save(studies / f"a{i}.png")
        Image.fromarray(mask).save(tmp_path / f"a{i}_label.png")
    ds.refresh()
    for i in range(n):
        ds.save_label(f"a{i}", str(tmp_path / f"a{i}_label.png"), "final",
                      {"institution": "A", "patient": f"p{i // 2}"})
    return ds


def test_train_requests_are_bounded(tmp_path):
    trainer = CASAMTrainer(_config(tmp_path, max_train_epochs="3", max_train_images="20", epochs="2"))
    assert trainer.parse_request({"model": "casam", "local_rank": 0}) == {
        "epochs": 2, "max_images": 0, "min_images": 5, "retrain_after": 0, "institution": "", "force": False,
        "auto": False}
    assert trainer.parse_request({"epochs": "3", "max_images": 20.0, "force": "true"})["force"] is True
    for request, limit in (({"epochs": 1000000000, "max_images": 1000000000}, "max_train_epochs = 3"),
                           ({"max_images": 21}, "max_train_images = 20"), ({"min_images": 21}, "max_train_images"),
                           ({"retrain_after": 10**9}, "max_train_images")):
        with pytest.raises(LimitError, match=limit):
            trainer.parse_request(request)
    for request in ({"epochs": "many"}, {"epochs": 2.5}, {"epochs": 0}, {"max_images": -1}, {"epochs": True},
                    {"institution": ["A"]}, {"force": "maybe"}, {"auto": 2}):
        with pytest.raises(ValueError):
            trainer.parse_request(request)
    with pytest.raises(ValueError, match="--conf epochs 24 is over --conf max_train_epochs 3"):
        _config(tmp_path, max_train_epochs="3")  # the server's own recipe is within its limits


def test_training_reports_its_status_and_stops_at_its_time_limit(tmp_path, disks):
    ds = _datastore(tmp_path, disks)
    late = CASAMTrainer(_config(tmp_path, epochs="1", min_images="4", max_train_minutes="0.000001"))
    report = late({}, ds)
    assert report["new_layers"] == [] and "time limit max_train_minutes = 1e-06" in report["stopped"], report
    assert "nothing stored for A" in report["institutions"][0]["error"] and report["seconds"] >= 0
    status = late.stats()["training"]
    assert status["state"] == "stopped" and status["pid"] == os.getpid() and status["priority"] is None, status
    assert late.cfg.registry.list() == [] and late.running() is None
    trainer = CASAMTrainer(_config(tmp_path, epochs="1", min_images="4"))
    report = trainer({}, ds)
    assert report["new_layers"] == ["a-v1"] and "stopped" not in report and report["time_limit_minutes"] == 30
    status = trainer.stats()["training"]
    assert status["state"] == "done" and status["new_layers"] == ["a-v1"] and status["epochs"] == 1, status
    (result,) = status["results"]
    assert result["layer"] == "a-v1" and result["val_iou"] is not None and result["zero_shot_val_iou"] is not None
    assert status["institutions"] == "1/1" and status["seconds"] > 0
    # a status left 'running' by a process that died shows as killed, not as running
    trainer._status({**status, "state": "running", "pid": 2**22 + 12345})
    assert trainer.stats()["training"]["state"] == "killed" and trainer.running() is None


def test_watchdog_ends_a_background_training_that_does_not_stop_by_itself(tmp_path, monkeypatch):
    import lib.trainers.casam as trainers
    from casam.training.online import TrainingMonitor

    trainer = CASAMTrainer(_config(tmp_path, max_train_minutes="0.5"))
    status = {"state": "running", "pid": os.getpid(), "auto": True, "new_layers": []}
    ended = []
    watchdog = trainers._Watchdog(trainer, status, TrainingMonitor(), end_at=time.time(), period=0.05)
    monkeypatch.setattr(trainers.os, "_exit", lambda code: (ended.append(code), watchdog._finished.set()))
    watchdog.start()
    watchdog.join(10)
    assert ended == [3]
    status = trainer.stats()["training"]
    assert status["state"] == "stopped" and "max_train_minutes = 0.5" in status["stopped"]
    assert status["new_layers"] == []
    assert "its process was ended 60 s after the limit" in trainer.stats()["last_training"]["stopped"]


# --- through the real server ---------------------------------------------------------------------------


def _post_train(srv, params: dict, **query) -> requests.Response:
    return requests.post(f"{srv.url}/train/casam", params=query, json=params, timeout=600)


def _training(srv) -> dict:
    return srv.info()["train_stats"]["casam"]["training"] or {}


def _wait(srv, done, what: str, timeout: float = 600) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        status = _training(srv)
        if done(status):
            return status
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s; training status {_training(srv)}\n{srv.log_tail()}")


def _click(srv, case: str) -> dict:
    import json

    _, result = srv.client.infer("casam", case, {"foreground": [[128, 128]]})
    return json.loads(result) if isinstance(result, str) else result


def _registry_files(srv) -> dict:
    root = Path(srv.conf["registry"])
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and not any(q.startswith(".") for q in p.relative_to(root).parts)}


def _wait_task_end(srv, what: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while requests.get(f"{srv.url}/train/", params={"check_if_running": "true"}, timeout=30).status_code == 200:
        assert time.time() < end, f"MONAI Label did not see {what} end within {timeout:.0f} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import shutil

    from monailabel.client import MONAILabelClient

    from test_app_e2e import TASK, _cases

    work = tmp_path_factory.mktemp("casam-autotrain")
    studies = work / "studies"
    studies.mkdir()
    cases = _cases(HOME, 6)
    for r in cases:
        shutil.copy(TASK / "images" / f"{r['case']}.png", studies)
    srv = MonaiLabelServer(str(studies), work, conf={
        "backbone": "litemedsam", "registry": str(work / "registry"), "cache": str(work / "cache"), "labels": "tumour",
        "train_after_labels": "5", "epochs": "2", "max_train_epochs": "4", "max_train_images": "50"},
        ports=range(8300, 8400))
    srv.start(timeout=600)  # a busy shared box took over 180 s to start a server
    srv.cases, srv.task = cases, TASK
    srv.client = MONAILabelClient(srv.url, tmpdir=str(work / "client"))
    yield srv
    srv.stop()


@pytest.mark.slow
@needs_data
def test_over_limit_train_requests_are_4xx(server):
    r = _post_train(server, {"epochs": 1000000000, "max_images": 1000000000})
    assert r.status_code == 413 and "max_train_epochs = 4" in r.json()["detail"], r.text
    r = _post_train(server, {"max_images": 51}, run_sync="true")
    assert r.status_code == 413 and "max_train_images = 50" in r.json()["detail"], r.text
    r = _post_train(server, {"epochs": "forever"})
    assert r.status_code == 400 and "epochs must be a whole number" in r.json()["detail"], r.text
    assert _training(server) == {} and requests.get(f"{server.url}/train/", timeout=30).status_code == 404  # none ran
    assert server.info()["train_stats"]["casam"]["limits"]["max_train_minutes"] == 30


@pytest.mark.slow
@needs_data
def test_labels_start_a_training_whose_layer_is_served_without_restart(server):
    c = server.client
    for i, r in enumerate(server.cases[:5]):
        if i == 4:
            time.sleep(3)
            assert _training(server) == {}  # four labels: nothing started
        c.save_label(r["case"], str(server.task / "masks" / f"{r['case']}.png"), tag="final",
                     params={"institution": HOME, "patient": r["patient"]})
    status = _wait(server, lambda s: s.get("state") in ("starting", "running"), "an automatic training began", 60)
    assert status["auto"] is True, status  # shown as starting while its process loads the app
    status = _wait(server, lambda s: s.get("state") == "running", "the automatic training's process ran", 600)
    assert status["auto"] is True and status["request"]["institution"] == HOME
    assert status["priority"] == {"torch_threads": 1, "nice": min(19, os.nice(0) + 10)}, status
    r = _post_train(server, {})  # one training at a time
    assert r.status_code == 409 and "a training is running" in r.json()["detail"] and "automatic" in r.json()["detail"]
    status = _wait(server, lambda s: s.get("state") not in ("starting", "running"), "the automatic training ended",
                   1200)
    assert status["state"] == "done" and status["new_layers"] == ["tcga-du-v1"], status
    (result,) = status["results"]
    assert result["val_iou"] is not None and result["zero_shot_val_iou"] is not None and status["seconds"] > 0
    assert server.info()["train_stats"]["casam"]["last_training"]["auto"] is True
    routes = [_click(server, r["case"]) for r in server.cases[:3]]  # the next clicks: no restart
    assert all("tcga-du-v1" in p["scores"] for p in routes), routes
    assert any(p["layer"] == "tcga-du-v1" for p in routes), routes


@pytest.mark.slow
@needs_data
def test_killed_training_leaves_the_registry_as_it_was(server):
    before, layers = _registry_files(server), server.info()["layers"]
    assert before and [i["name"] for i in layers] == ["tcga-du-v1"]
    # the automatic training's status says done before its process has exited: MONAI Label counts the task as
    # running (a request meanwhile gets 409) until it has
    _wait_task_end(server, "the automatic training's task")
    r = _post_train(server, {"institution": HOME, "force": True, "epochs": 4})
    assert r.status_code == 200, r.text
    # a busy box may take minutes to start the training's process: kill it once it encodes or trains
    status = _wait(server, lambda s: s.get("state") == "running" and s.get("stage") in ("encode", "train", "validate"),
                   "the training began", 900)
    os.kill(status["pid"], signal.SIGKILL)  # the training subprocess, mid-way
    status = _wait(server, lambda s: s.get("state") != "running", "the killed training was seen", 60)
    assert status["state"] == "killed" and status["new_layers"] == [], status
    assert _registry_files(server) == before and server.info()["layers"] == layers
    assert "tcga-du-v1" in _click(server, server.cases[0]["case"])["scores"]
    # its writer lock died with it: the next training runs (once MONAI Label has seen its task end)
    _wait_task_end(server, "the killed task")
    assert _post_train(server, {"institution": HOME, "force": True, "epochs": 1}).status_code == 200
    status = _wait(server, lambda s: s.get("state") not in ("starting", "running", "killed"),
                   "the next training ended", 1200)
    assert status["state"] == "done" and status["new_layers"] == ["tcga-du-v2"], status
