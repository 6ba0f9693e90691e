"""A full disk under the real server: the datastore (studies, labels, index) on a 2 MiB tmpfs filled to
the last byte, the registry on a 20 MiB tmpfs that holds one layer but not a second.

A label save (a new label, and one over an earlier label) is answered 507 saying the disk is full, leaves no
half-written file and the earlier label byte for byte; a training whose layer does not fit is answered 507, leaves
the registry as it was (no temporary folder); the server goes on serving clicks all along, and saves again once
there is room. Needs root (``mount -t tmpfs``); skipped otherwise.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

from test_faults_helpers import FaultServer, file_digests, make_studies, seed_layer, server_conf

pytestmark = pytest.mark.slow
pytest.importorskip("monailabel")


def _mount(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fills the file system of ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler.bin"
    for path, block in ((filler, 4096), (folder / "filler-small.bin", 1)):  # then the last bytes of a block
        with open(path, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    return filler


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults-disk")
    studies, registry = work / "studies", work / "registry"
    _mount(studies, "2m")
    try:
        _mount(registry, "20m")
    except BaseException:
        _umount(studies)
        raise
    try:
        labels = make_studies(work / "studies")
        seed_layer(registry, "A")
        s = FaultServer(str(studies), work, conf=server_conf(work))
        s.label_files = labels
        s.start(timeout=300)
        try:
            for image_id in ("a0", "a1", "a2", "a3", "a4"):
                r = s.save_label(image_id, labels[image_id])
                assert r.status_code == 200, r.text
            yield s
        finally:
            s.stop()
    finally:
        _umount(studies)
        _umount(registry)


def test_label_save_on_a_full_disk_is_507_and_keeps_the_earlier_label(srv):
    before = file_digests(srv.labels_dir())
    index = (Path(srv.studies) / ".datastore.json").read_bytes() if (Path(srv.studies) / ".datastore.json").exists() \
        else None
    filler = _fill(Path(srv.studies))
    try:
        for image_id, label in (("a5", "a5"), ("a0", "a3")):  # a new label; a label over an earlier one
            r = srv.save_label(image_id, srv.label_files[label])
            assert r.status_code == 507, r.text
            detail = r.json()["detail"]
            assert "disk is full" in detail and "not stored" in detail and srv.studies not in detail, detail
        assert file_digests(srv.labels_dir()) == before  # nothing half-written, the earlier label as it was
        assert not [p for p in srv.labels_dir().iterdir() if p.name.startswith(".casam-partial")]
        if index is not None:
            assert (Path(srv.studies) / ".datastore.json").read_bytes() == index
        r = srv.click("a0")  # clicks go on
        assert r.status_code == 200, r.text
        assert "casam: label save failed: disk full (507)" in srv.log_tail(10**6)
    finally:
        filler.unlink()
        (Path(srv.studies) / "filler-small.bin").unlink()
    r = srv.save_label("a5", srv.label_files["a5"])  # room again: saved
    assert r.status_code == 200, r.text
    assert (srv.labels_dir() / "a5.png").read_bytes() == srv.label_files["a5"].read_bytes()
    assert requests.get(f"{srv.url}/datastore/label", params={"label": "a5", "tag": "final"}, timeout=30).ok


def test_layer_write_on_a_full_disk_is_507_and_leaves_the_registry(srv):
    registry = srv.workdir / "registry"
    before = file_digests(registry)
    r = requests.post(f"{srv.url}/train/casam", params={"run_sync": "true"},
                      json={"institution": "A", "force": True, "epochs": 1}, timeout=900)
    assert r.status_code == 507, r.text
    detail = r.json()["detail"]
    assert "disk is full" in detail and "layer" in detail and str(registry) not in detail, detail
    assert file_digests(registry) == before
    assert not [p for p in registry.iterdir() if p.name.startswith(".tmp-")], list(registry.iterdir())
    assert [i["name"] for i in srv.info()["layers"]] == ["a-v1"]
    status = srv.info()["train_stats"]["casam"]["training"]
    assert status["state"] == "failed" and "disk is full" in status["error"], status
    assert "casam: training failed: disk full" in srv.log_tail(10**6)
    r = srv.click("a1")
    assert r.status_code == 200, r.text
