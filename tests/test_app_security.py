"""The app against an untrusted client, on a real MONAI Label server (tiny backbone, synthetic images).

Only datastore images (or the request's upload) are read, never a server path; every limit answers 413 naming
itself and the value; malformed parameters are 4xx, never 5xx; messages carry no server path, temporary file
or traceback; a final label that does not fit its image is refused at save; sessions take one bounded image
(or DICOM series); /logs is closed; a request body is bounded as it streams, before FastAPI spools it to disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import tempfile
import time

import numpy as np
import psutil
import pytest
import requests
import SimpleITK as sitk

from conftest import disk_image
from disk_studies import disk_studies
from disk_studies import png_bytes as _png

pytestmark = pytest.mark.slow
pytest.importorskip("monailabel")
from mlserver import MonaiLabelServer  # noqa: E402

LIMITS = {"max_points": "8", "max_image_megapixels": "0.01", "max_image_voxels": "50000", "max_upload_mb": "0.05",
          "max_propagation_slices": "4"}


def _nifti(path, arr: np.ndarray, compress: bool = True):
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), compress)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("casam-security")
    studies = disk_studies(work, 3)
    rng = np.random.default_rng(1)
    vol = np.stack([disk_image(rng, size=(48, 48))[0] for _ in range(10)]).astype(np.int16)
    _nifti(studies / "vol.nii.gz", vol)
    (work / "outside.png").write_bytes((studies / "disk0.png").read_bytes())  # a server file, not in the datastore
    srv = MonaiLabelServer(str(studies), work, conf={"backbone": "tiny", "registry": str(work / "registry"),
                                                     "cache": str(work / "cache"), **LIMITS})
    srv.start(timeout=600)  # a busy shared box can take minutes
    srv.work, srv.studies = work, studies
    yield srv
    srv.stop()


def _infer(srv, image="disk0", params=None, files=None, **query):
    params = {"foreground": [[40, 30]]} if params is None else params
    data = {"params": params if isinstance(params, str) else json.dumps(params)}
    return requests.post(f"{srv.url}/infer/casam", params={"image": image, "output": "json", **query}, data=data,
                         files=files, timeout=900)


def _refused(r, code: int, *words: str) -> str:
    """The response is ``code`` with these words, and names no server path, temporary file or traceback."""
    assert r.status_code == code, (r.status_code, r.text)
    text = r.text
    for w in words:
        assert w in text, (w, text)
    return _no_leak(text)


def _no_leak(text: str) -> str:
    """The text names no server path, temporary file or traceback."""
    for leak in ("/tmp", "Traceback", str(os.getcwd()), "site-packages"):
        assert leak not in text, (leak, text)
    return text


def test_datastore_images_only(server):
    assert _infer(server).status_code == 200
    outside = str(server.work / "outside.png")
    _refused(_infer(server, image=outside), 404, "not in the datastore")
    _refused(_infer(server, image="../../../../etc/passwd"), 404, "not in the datastore")
    _refused(_infer(server, image=str(server.studies / "disk0.png")), 404, "not in the datastore")
    # params may not swap a server path in for the image id
    _refused(_infer(server, params={"image": outside, "foreground": [[40, 30]]}), 404, "not in the datastore")
    (server.work / "cwd" / "rel.png").write_bytes((server.studies / "disk0.png").read_bytes())
    _refused(_infer(server, image="rel.png"), 404, "not in the datastore")  # exists in the server's cwd
    _refused(_infer(server, image=""), 400, "no image")
    _refused(_infer(server, image="   "), 400, "no image")


def test_malformed_parameters_are_4xx(server):
    for params, word in [
        ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
        ({"foreground": [[40, 30]], "result_extension": ".exe"}, "result_extension"),
        ({"foreground": [[40, 30]], "result_dtype": "complex128"}, "result_dtype"),
        ({"foreground": [[40, 30]], "result_extension": ".png", "result_dtype": "float32"}, "result_dtype"),
        ({"foreground": 5}, "foreground"), ({"foreground": [["a", 1]]}, "foreground"),
        ({"foreground": [[1e308 * 10, 3]]}, "finite"), ({"roi": "abc"}, "roi"), ({"roi": [1, 2, 3]}, "roi"),
        ({"foreground": [[40, 30]], "layer": ["x"]}, "layer"), ({"foreground": [[40, 30]], "label": ["x"]}, "label"),
        ({"foreground": [[40, 30]], "slice": "x"}, "slice"), ({}, "foreground point"),
        ({"foreground": [[40, 30]], "propagate": "maybe"}, "propagate"),
    ]:
        _refused(_infer(server, params=params), 400, word)
    r = _infer(server, params={"foreground": [[40, 30]], "timeout": "soon", "result_extension": "nrrd"})
    assert r.status_code == 200, r.text  # a client's timeout is ignored; "nrrd" means ".nrrd"
    text = _refused(_infer(server, params={"foreground": [[40, 30]], "layer": "nope-v1"}), 404,
                    "unknown layer 'nope-v1'")
    assert "registry" not in text or str(server.work) not in text
    assert _infer(server, params={"foreground": [[40, 30]], "label": "object"}).status_code == 200


def test_limits_answer_413_naming_the_limit(server):
    _refused(_infer(server, params={"foreground": [[1, 1]] * 9}), 413, "max_points = 8", ": 9 is over")
    _refused(_infer(server, image="vol", params={"roi": [5, 40, 5, 40, 0, 9]}), 413, "max_propagation_slices = 4",
             "spans 10 slices")
    ok = _infer(server, image="vol", params={"foreground": [[24, 24, 5]]})
    assert ok.status_code == 200 and ok.json()["slices"][1] - ok.json()["slices"][0] <= 4, ok.text
    big = np.zeros((120, 120), np.uint8)  # 14 400 pixels > 0.01 MP
    _refused(_infer(server, image="", files={"file": ("big.png", _png(big))}), 413, "max_image_megapixels = 0.01")
    vol = np.zeros((20, 48, 64), np.int16)  # 61 440 voxels > 50 000
    _nifti(server.work / "bigvol.nii.gz", vol)
    _refused(_infer(server, image="", files={"file": ("bigvol.nii.gz", (server.work / "bigvol.nii.gz").read_bytes())},
                    params={"foreground": [[1, 1, 1]]}), 413, "max_image_voxels = 50000")
    noise = np.random.default_rng(1).integers(0, 255, (20, 40, 40)).astype(np.int16)  # raw .nii, 64 kB > 0.05 MB
    _nifti(server.work / "noise.nii", noise, compress=False)
    _refused(_infer(server, image="", files={"file": ("noise.nii", (server.work / "noise.nii").read_bytes())}), 413,
             "max_upload_mb = 0.05")
    assert server.info()["limits"]["max_points"] == 8


def test_uploads_are_read_safely(server):
    good = (server.studies / "disk1.png").read_bytes()
    assert _infer(server, image="", files={"file": ("mine.png", good)}).status_code == 200
    # a detached header could name any server file: such uploads are refused by type
    _refused(_infer(server, image="", files={"file": ("x.mhd", b"ElementDataFile = /etc/passwd\n")}), 400,
             "unsupported file type")
    _nifti(server.work / "v.nii.gz", np.ones((4, 16, 16), np.int16))
    data = (server.work / "v.nii.gz").read_bytes()
    _refused(_infer(server, image="", files={"file": ("scan.nii.gz", data[: len(data) // 2])},
                    params={"foreground": [[2, 2, 1]]}), 400, "cannot read image the uploaded image", "gzip")
    _refused(_infer(server, image="", files={"file": ("x.png", b"\x89PNG\r\n\x1a\n not a picture")}), 400,
             "the uploaded image")
    _refused(_infer(server, files={"file": ("x.png", good), "label": ("l.png", good)}), 400, "no label upload")


def test_datastore_writes_stay_inside(server):
    png = (server.studies / "disk2.png").read_bytes()
    r = requests.put(f"{server.url}/datastore/image", params={"image": "../../evil"}, files={"file": ("a.png", png)},
                     timeout=60)
    _refused(r, 400, "not a plain name")
    assert not (server.work / "evil.png").exists() and not (server.studies.parent.parent / "evil.png").exists()
    r = requests.put(f"{server.url}/datastore/image", files={"file": ("x.mhd", b"ElementDataFile = /etc/passwd")},
                     timeout=60)
    _refused(r, 400, "unsupported file type")
    r = requests.put(f"{server.url}/datastore/label", params={"image": "disk2", "tag": "../../x"},
                     files={"label": ("l.png", png)}, timeout=60)
    _refused(r, 400, "label tag")
    r = requests.put(f"{server.url}/datastore/image/info", params={"image": "disk2"}, data={"info": "{bad"}, timeout=60)
    _refused(r, 400, "not valid JSON")
    _refused(requests.delete(f"{server.url}/datastore/image", params={"id": "nope"}, timeout=60), 404, "unknown image")
    r = requests.put(f"{server.url}/datastore/label", params={"image": "nope", "tag": "original"},
                     files={"label": ("l.png", png)}, timeout=60)
    _refused(r, 404, "unknown image")
    r = requests.head(f"{server.url}/datastore/image", params={"image": "disk2", "check_sum": "CRC:1"}, timeout=60)
    assert r.status_code == 400
    r = requests.get(f"{server.url}/datastore/label", params={"label": "disk2", "tag": "../../../etc"}, timeout=60)
    _refused(r, 400, "label tag")


def test_final_labels_are_checked_at_save(server):
    def save(image, data, name="l.png"):
        return requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": "final"},
                            files={"label": (name, data)}, timeout=60)

    _refused(save("disk0", _png(np.zeros((64, 96), np.uint8))), 400, "empty")
    _refused(save("disk0", _png(np.ones((32, 32), np.uint8))), 400, "shape")
    _refused(save("disk0", b"garbage", "l.nii.gz"), 400, "cannot read image")
    frac = server.work / "frac.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((64, 96), 0.5, np.float32)), str(frac))
    _refused(save("disk0", frac.read_bytes(), "l.nrrd"), 400, "non-integer")
    _refused(save("nope", _png(np.ones((64, 96), np.uint8))), 404, "unknown image")
    assert server.info()["datastore"]["completed"] == 0  # nothing bad was stored
    assert save("disk0", (server.work / "disk0_mask.png").read_bytes()).status_code == 200
    assert server.info()["datastore"]["completed"] == 1


def test_info_names_no_server_path(server):
    text = json.dumps(server.info())
    assert str(server.work) not in text and "/tmp" not in text


def test_20000_points_leave_memory_alone(server):
    proc = psutil.Process(server.proc.pid)
    before = proc.memory_info().rss
    r = _infer(server, params={"foreground": [[40, 30]] * 20000})
    _refused(r, 413, "max_points = 8", "20000")
    grown = proc.memory_info().rss - before
    print(f"RSS {before / 2**20:.0f} MB before, grew by {grown / 2**20:.1f} MB under 20 000 points")
    assert grown < 200 * 2**20


def _session(srv, *files, **query):
    """``PUT /session/`` as the 3D Slicer plugin sends it (files under ``files``, a ``client_id`` form field)."""
    return requests.put(f"{srv.url}/session/", params=query, files=[("files", f) for f in files],
                        data={"client_id": "user-xyz"}, timeout=120)


def test_sessions_are_bounded(server):
    scan = (server.studies / "vol.nii.gz").read_bytes()
    r = _session(server, ("tmpk2j4h1x9.nii.gz", scan))  # Slicer: one volume saved to a temporary .nii.gz
    assert r.status_code == 200, r.text
    sid = _no_leak(r.text) and r.json()["session_id"]
    r = requests.get(f"{server.url}/session/{sid}", timeout=60)
    assert r.status_code == 200 and _no_leak(r.text), r.text
    ok = _infer(server, image="", session_id=sid, params={"foreground": [[24, 24, 5]]})
    assert ok.status_code == 200, ok.text
    noise = np.random.default_rng(2).integers(0, 255, (20, 40, 40)).astype(np.int16)  # raw .nii, 64 kB > 0.05 MB
    _refused(_session(server, ("big.nii", _nifti(server.work / "snoise.nii", noise, compress=False).read_bytes())),
             413, "max_upload_mb = 0.05")
    blob = os.urandom(30_000)
    _refused(_session(server, ("a.dcm", blob), ("b.dcm", blob)), 413, "2 file(s)", "max_upload_mb = 0.05")
    _refused(_session(server, ("a.png", b"x"), ("b.png", b"x")), 400, "one DICOM series")
    _refused(_session(server, ("x.mhd", b"ElementDataFile = /etc/passwd")), 400, "unsupported file type")
    _refused(_session(server, ("a.nii.gz", scan), uncompress="true"), 400, "unpacks no archives")
    assert len([d for d in (server.work / "sessions").iterdir() if d.is_dir()]) == 1  # nothing refused was stored


def test_logs_are_closed(server):
    for path in ("/logs/", "/logs", "/logs/?lines=0&text=true", "/logs/gpu"):
        _refused(requests.get(server.url + path, timeout=60), 403, "expose_logs")


def test_logs_open_when_asked():
    from lib.server.body_limit import BodyLimit
    answers = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        if message["type"] == "http.response.start":
            answers.append(message["status"])

    for closed in [("/logs",), ()]:  # the default, and --conf expose_logs true
        limit = BodyLimit(app, 100, closed=closed, closed_message="closed")
        for path in ("/logs/", "/logs/gpu", "/logsx", "/info/"):
            asyncio.run(limit({"type": "http", "path": path, "headers": []}, None, send))
    assert answers == [403, 403, 200, 200, 200, 200, 200, 200]


def _server_temp_bytes(pid: int) -> int:
    """Bytes of the files the server holds open directly in the temporary folder (named or not)."""
    tmp, total = tempfile.gettempdir(), 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if os.path.dirname(target.removesuffix(" (deleted)")) == tmp:
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            pass
    return total


def _answer(sock: socket.socket, wait: float) -> str:
    sock.settimeout(wait)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < 200:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.decode(errors="replace")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads the server's open files from /proc")
def test_request_body_is_bounded_as_it_streams(server):
    head = "PUT /session/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # a declared length over the bound: not read
        s.sendall(f"{head}Content-Length: {100 * 2**20}\r\n\r\n".encode())
        t0 = time.time()
        text = _answer(s, 30)
    assert text.startswith("HTTP/1.1 413") and "max_upload_mb = 0.05" in text and time.time() - t0 < 30, text
    _no_leak(text)
    total, chunk, peak, text = 24 * 2**20, b"\0" * 2**16, 0, ""
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.nii"\r\n\r\n'
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # chunked: cut off at the bound
        s.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n%s\r\n" % (len(part), part))
        for _ in range(total // len(chunk)):
            peak = max(peak, _server_temp_bytes(server.proc.pid))
            if select.select([s], [], [], 0)[0]:
                break  # the server answered
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break
        text = _answer(s, 30)
    print(f"server's temporary files peaked at {peak / 2**20:.2f} MB while a {total / 2**20:.0f} MB body streamed")
    assert text.startswith("HTTP/1.1 413") and "max_upload_mb = 0.05" in text, text
    assert peak < 3 * 2**20  # the bound is 0.05 MB + 1 MiB; FastAPI would have spooled all 24 MB
