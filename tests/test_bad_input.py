"""Hostile input, round two, on a real MONAI Label server (tiny backbone, synthetic pictures).

* Crafted files (declared sizes far beyond the data, wrong magic, mismatched formats, empty files; PNG, GIF,
  TIFF, JPEG, BMP, NRRD, NIfTI, MHA, DICOM: ``crafted.py``) are answered 4xx wherever a client can send them:
  ``/infer`` with the file, ``PUT /datastore/image``, ``PUT /session``, ``PUT /datastore/label`` (final and
  other tags), and as files an administrator put in the studies folder; nothing refused is kept, no temporary
  file is left, and the server still answers.
* The datastore survives concurrent writes: uploads and label saves while files appear in the studies folder;
  the watcher stays alive (a file added afterwards is listed) and every file is listed.
* Storage is bounded: ``max_sessions`` (429) and ``max_datastore_upload_mb`` (413), and the limits follow
  ``POST /reload`` (``--conf conf_file`` is read anew).
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import threading
import time

import numpy as np
import psutil
import pytest
import requests

from crafted import corpus
from disk_studies import disk_studies, png_bytes

pytest.importorskip("monailabel")
from mlserver import MonaiLabelServer  # noqa: E402

STATS: collections.Counter = collections.Counter()  # answers by class ("2xx", "4xx", "5xx") and the server's peak RSS
_STATS_LOCK = threading.Lock()


def _rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return 0


def call(srv, method: str, path: str, **kwargs) -> requests.Response:
    """One request to the server, counted in :data:`STATS` with the server's memory after it."""
    r = requests.request(method, srv.url + path, timeout=300, **kwargs)
    with _STATS_LOCK:
        STATS[f"{r.status_code // 100}xx"] += 1
        STATS["peak_rss"] = max(STATS["peak_rss"], _rss(srv.proc.pid))
    return r


def _no_leak(text: str) -> str:
    for leak in ("/tmp", "Traceback", str(os.getcwd()), "site-packages", tempfile.gettempdir()):
        assert leak not in text, (leak, text)
    return text


def _listed(srv) -> set:
    return set(call(srv, "GET", "/datastore/", params={"output": "all"}).json()["objects"])


def _wait_listed(srv, ids, timeout: float = 90) -> set:
    t0 = time.time()
    while time.time() - t0 < timeout:
        missing = set(ids) - _listed(srv)
        if not missing:
            return set()
        time.sleep(1)
    return missing


def _temp_files(srv) -> list:
    """What is in the server's temporary folder besides what it put there at start-up (log config, torch's cache)."""
    return sorted(set(os.listdir(srv.tmpdir)) - srv.tmp_baseline - {"torchinductor_" + psutil.Process().username()})


def _suffix(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("casam-bad-input")
    studies = disk_studies(work, 3)
    conf_file = work / "conf.json"
    conf_file.write_text(json.dumps({"max_sessions": 3, "max_datastore_upload_mb": 0.5}))
    tmpdir = work / "tmp"  # the server's temporary folder: what a refused upload leaves shows here
    tmpdir.mkdir()
    srv = MonaiLabelServer(str(studies), work, conf={"backbone": "tiny", "registry": str(work / "registry"),
                                                     "cache": str(work / "cache"), "conf_file": str(conf_file)},
                           env={"TMPDIR": str(tmpdir)})
    srv.start(timeout=600)  # a busy shared box can take minutes
    srv.work, srv.studies, srv.conf_file, srv.tmpdir = work, studies, conf_file, tmpdir
    srv.tmp_baseline = set(os.listdir(tmpdir))
    yield srv
    srv.stop()
    print(f"\nbad input: {sum(v for k, v in STATS.items() if k.endswith('xx'))} requests, "
          f"{dict((k, v) for k, v in STATS.items() if k.endswith('xx'))}, server peak RSS "
          f"{STATS['peak_rss'] / 2**20:.0f} MiB")


@pytest.mark.slow
def test_crafted_files_are_4xx_wherever_they_are_sent(server):
    before = _listed(server)
    for i, (case, filename, data) in enumerate(corpus()):
        answers = {
            "infer": (call(server, "POST", "/infer/casam", params={"image": "", "output": "json"},
                           data={"params": json.dumps({"foreground": [[1, 1]]})}, files={"file": (filename, data)}),
                      "the uploaded image"),
            "datastore image": (call(server, "PUT", "/datastore/image", params={"image": f"crafted{i}"},
                                     files={"file": (filename, data)}), f"crafted{i}"),
            "session": (call(server, "PUT", "/session/", files=[("files", (filename, data))]), "the session's image"),
        }
        for tag in ("final", "draft"):
            answers[f"{tag} label"] = (call(server, "PUT", "/datastore/label", params={"image": "disk0", "tag": tag},
                                            files={"label": (filename, data)}), "of image disk0")
        for route, (r, name) in answers.items():
            assert 400 <= r.status_code < 500, (case, route, r.status_code, r.text)
            assert name in _no_leak(r.text) and filename not in r.text, (case, route, r.text)
    assert _listed(server) == before  # nothing refused was kept
    assert call(server, "GET", "/datastore/").json()["completed"] == 0
    sessions = server.work / "sessions"
    assert not sessions.exists() or not [d for d in sessions.iterdir() if d.is_dir()]
    time.sleep(1)
    assert _temp_files(server) == [], _temp_files(server)  # every refused upload's temporary file was removed
    # the same files put in the studies folder by hand: the datastore lists them, /infer refuses each with a 4xx
    placed = {}
    for i, (case, filename, data) in enumerate(corpus()):
        if _suffix(filename) in (".png", ".jpg", ".tif", ".nii", ".nii.gz", ".nrrd"):  # the datastore's extensions
            (server.studies / f"placed{i}{_suffix(filename)}").write_bytes(data)
            placed[f"placed{i}"] = case
    assert not _wait_listed(server, placed)
    for image_id, case in placed.items():
        r = call(server, "POST", "/infer/casam", params={"image": image_id, "output": "json"},
                 data={"params": json.dumps({"foreground": [[1, 1]]})})
        assert 400 <= r.status_code < 500 and image_id in _no_leak(r.text), (case, r.status_code, r.text)
    for image_id in placed:
        (server.studies / next(p.name for p in server.studies.iterdir() if p.name.startswith(image_id + "."))).unlink()
    assert call(server, "GET", "/info/").status_code == 200
    ok = call(server, "POST", "/infer/casam", params={"image": "disk0", "output": "json"},
              data={"params": json.dumps({"foreground": [[40, 30]]})})
    assert ok.status_code == 200, ok.text  # the server still segments
    answers = {k: v for k, v in STATS.items() if k.endswith("xx")}
    print(f"\ncrafted corpus: {len(corpus())} files, {sum(answers.values())} requests {answers}, "
          f"server peak RSS {STATS['peak_rss'] / 2**20:.0f} MiB")


@pytest.mark.slow
def test_datastore_survives_concurrent_writes(server):
    rng = np.random.default_rng(3)
    pictures = [png_bytes((rng.random((24, 24)) * 255).astype(np.uint8)) for _ in range(4)]
    codes: list = []

    def upload(k: int) -> None:
        for i in range(8):
            codes.append(call(server, "PUT", "/datastore/image", params={"image": f"up{k}-{i}"},
                              files={"file": ("u.png", pictures[i % 4])}).status_code)

    def label() -> None:
        for i in range(6):
            mask = (server.work / f"disk{i % 3}_mask.png").read_bytes()
            codes.append(call(server, "PUT", "/datastore/label", params={"image": f"disk{i % 3}", "tag": "final"},
                              files={"label": ("l.png", mask)}).status_code)

    threads = [threading.Thread(target=upload, args=(k,)) for k in range(3)] + [threading.Thread(target=label)]
    for t in threads:
        t.start()
    for j in range(40):  # files appear in the studies folder meanwhile: the watcher reconciles for each
        (server.studies / f"w{j}.png").write_bytes(pictures[j % 4])
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert codes == [200] * 30, codes
    expected = {f"up{k}-{i}" for k in range(3) for i in range(8)} | {f"w{j}" for j in range(40)}
    assert not _wait_listed(server, expected)
    (server.studies / "late.png").write_bytes(pictures[0])  # only the watcher can list it: it is alive
    assert not _wait_listed(server, {"late"}, timeout=60)
    log = server.log_tail(10**8)
    assert "dictionary changed size" not in log and "datastore watcher" not in log
    assert call(server, "GET", "/datastore/").json()["completed"] == 3


@pytest.mark.slow
def test_storage_is_bounded_and_limits_follow_reload(server):
    good = (server.studies / "disk1.png").read_bytes()
    open_now = len([d for d in (server.work / "sessions").iterdir() if d.is_dir()]) \
        if (server.work / "sessions").exists() else 0
    created = [call(server, "PUT", "/session/", files=[("files", ("s.png", good))]) for _ in range(3 - open_now)]
    assert all(r.status_code == 200 for r in created), [r.text for r in created]
    r = call(server, "PUT", "/session/", files=[("files", ("s.png", good))])
    assert r.status_code == 429 and "max_sessions = 3" in _no_leak(r.text), r.text
    time.sleep(1)
    assert _temp_files(server) == []
    # the datastore: images and labels clients upload, up to max_datastore_upload_mb in all
    rng = np.random.default_rng(4)
    noise = png_bytes((rng.random((160, 160)) * 255).astype(np.uint8))  # ~25 KB, incompressible
    stored, r = [], None
    for i in range(40):
        r = call(server, "PUT", "/datastore/image", params={"image": f"noise{i}"}, files={"file": ("n.png", noise)})
        if r.status_code != 200:
            break
        stored.append(f"noise{i}")
    assert stored and r.status_code == 413 and "max_datastore_upload_mb = 0.5" in _no_leak(r.text), r.text
    # a client cannot rewrite what an upload counts; removing an image makes room
    r = call(server, "PUT", "/datastore/image/info", params={"image": stored[0]},
             data={"info": json.dumps({"casam_upload_bytes": 0})})
    assert r.status_code == 200, r.text
    r = call(server, "PUT", "/datastore/image", params={"image": "more"}, files={"file": ("n.png", noise)})
    assert r.status_code == 413, r.text
    assert call(server, "DELETE", "/datastore/image", params={"id": stored[0]}).status_code == 200
    r = call(server, "PUT", "/datastore/image", params={"image": "more"}, files={"file": ("n.png", noise)})
    assert r.status_code == 200, r.text
    time.sleep(1)
    assert _temp_files(server) == []
    # new limits in the conf file, POST /reload: the new app reads them, the endpoint guards and the body limit use them
    server.conf_file.write_text(json.dumps({"max_sessions": 4, "max_datastore_upload_mb": 0.5, "max_upload_mb": 0.05}))
    assert call(server, "POST", "/reload").status_code == 200
    limits = call(server, "GET", "/info/").json()["limits"]
    assert limits["max_sessions"] == 4 and limits["max_upload_mb"] == pytest.approx(0.05, rel=1e-3), limits
    assert call(server, "PUT", "/session/", files=[("files", ("s.png", good))]).status_code == 200
    r = call(server, "PUT", "/session/", files=[("files", ("s.png", good))])
    assert r.status_code == 429 and "max_sessions = 4" in r.text, r.text
    big = png_bytes((rng.random((300, 300)) * 255).astype(np.uint8))  # ~90 KB
    r = call(server, "PUT", "/datastore/image", params={"image": "big"}, files={"file": ("b.png", big)})
    assert r.status_code == 413 and "max_upload_mb = 0.05" in r.text, r.text
    r = call(server, "PUT", "/datastore/image", params={"image": "again"}, files={"file": ("n.png", noise)})
    assert r.status_code == 413 and "max_datastore_upload_mb = 0.5" in r.text, r.text  # counted from the index
    server.conf_file.write_text("{not json")  # a broken file: logged, the command line's options apply
    assert call(server, "POST", "/reload").status_code == 200
    assert call(server, "GET", "/info/").json()["limits"]["max_sessions"] == 32


@pytest.mark.slow
def test_infer_leaves_the_server_answering(server):
    """A segmentation runs in a worker thread: /info answers while a slow one (a 25-megapixel picture) runs."""
    rng = np.random.default_rng(5)
    (server.studies / "large.png").write_bytes(png_bytes((rng.random((5000, 5000)) * 255).astype(np.uint8)))
    assert not _wait_listed(server, {"large"})
    done: dict = {}

    def click() -> None:
        t0 = time.time()
        done["answer"] = call(server, "POST", "/infer/casam", params={"image": "large", "output": "json"},
                              data={"params": json.dumps({"foreground": [[2500, 2500]]})})
        done["seconds"], done["end"] = time.time() - t0, time.time()

    worker = threading.Thread(target=click)
    worker.start()
    answered = []
    while worker.is_alive():
        t0 = time.time()
        r = requests.get(server.url + "/info/", timeout=300)
        if worker.is_alive() and r.status_code == 200:
            answered.append(time.time() - t0)
        time.sleep(0.05)
    worker.join()
    print(f"\n25 MP click: {done['seconds']:.2f} s; /info answered {len(answered)} times meanwhile "
          f"(slowest {max(answered, default=0):.2f} s)")
    assert done["answer"].status_code == 200, done["answer"].text
    assert answered, f"/info did not answer during a {done['seconds']:.2f} s segmentation"
    (server.studies / "large.png").unlink()


def test_watcher_survives_concurrent_writes_in_process(tmp_path):
    """MONAI Label's LocalDatastore, guarded: two threads add images while files appear in its folder; its
    watcher (watchdog) stays alive and lists a file added afterwards (unguarded, ``_remove_non_existing``
    raised ``dictionary changed size during iteration`` in the watcher's thread, which then ended)."""
    from monailabel.datastore.local import LocalDatastore

    from casam.data.clinical import ImageLimits
    from lib.server.datastore import guard_datastore
    studies = tmp_path / "studies"
    studies.mkdir()
    ds = guard_datastore(LocalDatastore(str(studies), extensions=["*.png"], auto_reload=True), ImageLimits(), None)
    picture = png_bytes(np.full((16, 16), 7, np.uint8))
    tmp = tempfile.mkdtemp(dir=tmp_path)
    errors: list = []

    def add(k: int) -> None:
        for i in range(40):
            src = os.path.join(tmp, f"tmp{k:04d}{i:04d}.png")  # named like MONAI Label's temporary uploads
            with open(src, "wb") as f:
                f.write(picture)
            try:
                ds.add_image(f"up{k}-{i}", src, {})
            except Exception as e:
                errors.append(repr(e))

    try:
        threads = [threading.Thread(target=add, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for j in range(40):
            (studies / f"w{j}.png").write_bytes(picture)
        for t in threads:
            t.join()
        (studies / "late.png").write_bytes(picture)
        t0 = time.time()
        while "late" not in ds.list_images() and time.time() - t0 < 30:
            time.sleep(0.2)
        assert not errors and ds._observer.is_alive()
        uploaded = {f"up{k}-{i}" for k in range(2) for i in range(40)}
        assert set(ds.list_images()) >= {"late"} | {f"w{j}" for j in range(40)} | uploaded
    finally:
        ds._observer.stop()
