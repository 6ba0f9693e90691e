"""Layer files corrupted on disk: one flipped byte in a ``layer.safetensors``, a truncated ``meta.json``.

The server starts, serves the other layers (an institution whose newest version is refused falls back to its
previous one), lists each refused layer and why under ``refused_layers`` in ``/info``, logs one line for each, and
never loads it (a click asking for it by name is 404). The files are left as they were, for the operator.
"""

from __future__ import annotations

import json

import pytest
import requests

from test_faults_helpers import FaultServer, file_digests, make_studies, seed_layer, server_conf

pytestmark = pytest.mark.slow
pytest.importorskip("monailabel")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults-corrupt")
    make_studies(work / "studies", n=4)
    registry = work / "registry"
    names = [seed_layer(registry, inst).name for inst in ("A", "B", "B", "C")]
    assert names == ["a-v1", "b-v1", "b-v2", "c-v1"]
    layers = registry / "layers"
    for name in ("a-v1", "b-v2"):  # one flipped byte in the middle of the weights
        path = layers / name / "layer.safetensors"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    meta = layers / "c-v1" / "meta.json"
    meta.write_text(meta.read_text()[: len(meta.read_text()) // 2])  # truncated
    s = FaultServer(str(work / "studies"), work, conf=server_conf(work))
    s.files = file_digests(registry)
    s.start(timeout=300)
    yield s
    s.stop()


def test_server_refuses_corrupt_layers_and_serves_the_others(srv):
    info = srv.info()
    assert [(i["name"], i["active"]) for i in info["layers"]] == [("b-v1", True)]
    refused = {r["name"]: r["reason"] for r in info["refused_layers"]}
    assert set(refused) == {"a-v1", "b-v2", "c-v1"}, refused
    assert refused["a-v1"].startswith("checksum mismatch for layer.safetensors")
    assert refused["b-v2"].startswith("checksum mismatch for layer.safetensors")
    assert "meta.json is not valid JSON" in refused["c-v1"]
    assert str(srv.workdir) not in json.dumps(info["refused_layers"])  # no server path
    r = srv.click("a0")
    assert r.status_code == 200, r.text
    routed = json.loads(r.text) if r.headers.get("content-type", "").startswith("application/json") else {}
    assert set((routed.get("scores") or {})) <= {"b-v1", "sam"}, routed
    for name in ("a-v1", "b-v2", "c-v1"):  # never loaded, even when asked for by name
        r = requests.post(f"{srv.url}/infer/casam", params={"image": "a1", "output": "json"},
                          data={"params": json.dumps({"foreground": [[32, 32]], "layer": name})}, timeout=120)
        assert r.status_code == 404, (name, r.status_code, r.text)
    log = srv.log_tail(10**6)
    assert "casam: refused layer a-v1: checksum mismatch for layer.safetensors" in log
    assert "casam: refused layer c-v1: meta.json is not valid JSON" in log
    assert log.count("casam: refused layer a-v1") == 1, "one line per refused layer, not one per request"
    assert file_digests(srv.workdir / "registry") == srv.files  # left for the operator, untouched


def test_a_restored_layer_is_served_again(srv):
    """The operator restores b-v2 from a backup (here: the byte flipped back): served at the next click."""
    path = srv.workdir / "registry" / "layers" / "b-v2" / "layer.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert srv.click("a0").status_code == 200
    info = srv.info()
    assert [i["name"] for i in info["layers"] if i["active"]] == ["b-v2"], info["layers"]
    assert {r["name"] for r in info["refused_layers"]} == {"a-v1", "c-v1"}
