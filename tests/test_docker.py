"""docker/: the Dockerfile and compose.yaml, checked without a Docker engine (none on CI machines).

What is checked: the compose file is valid (``docker compose config`` / ``docker-compose config`` when one is
installed, and by parsing it), the Dockerfile runs as a non-root user, has a HEALTHCHECK on /info/, bakes
the LiteMedSAM weights in at build time and does nothing over the network at run time, and its CMD is the
command docker/README.md documents. The slow test runs that CMD (paths remapped to this checkout) and its
HEALTHCHECK command against the real server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
APP_IN_IMAGE = "/opt/casam/apps/casam"


def instructions(path: Path = DOCKERFILE):
    """Dockerfile → list of (INSTRUCTION, argument string), continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(arg: str):
    """Parses a JSON exec-form argument (CMD ["a", "b"]); fails on the shell form."""
    assert arg.startswith("["), f"use the exec form (JSON list), got: {arg}"
    return json.loads(arg)


def cmd() -> list:
    cmds = [a for i, a in instructions() if i == "CMD"]
    assert len(cmds) == 1
    return exec_form(cmds[0])


def healthcheck() -> list:
    hc = [a for i, a in instructions() if i == "HEALTHCHECK"]
    assert len(hc) == 1, "exactly one HEALTHCHECK"
    m = re.search(r"CMD\s+(\[.*\])\s*$", hc[0])
    assert m, f"HEALTHCHECK must use CMD [exec form]: {hc[0]}"
    return json.loads(m.group(1))


def compose():
    return yaml.safe_load(COMPOSE.read_text())


# ------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_and_build_args():
    ins = instructions()
    args = {a.split("=")[0]: a.split("=", 1)[1] if "=" in a else None for i, a in ins if i == "ARG"}
    assert args["BASE"] == "python:3.11-slim"  # CPU by default
    assert args["TORCH_VARIANT"] == "cpu" and "cpu" in args["TORCH_INDEX"]
    assert [a for i, a in ins if i == "FROM"] == ["${BASE}"]
    run = " ".join(a for i, a in ins if i == "RUN")
    assert "install.sh" in run and "CASAM_SKIP_APT=1" in run  # installs via the repo's installer, no Orthanc inside
    assert "--index-url \"$TORCH_INDEX\"" in run and '"$TORCH_VARIANT" = "cpu"' in run


def test_dockerfile_non_root_user():
    ins = instructions()
    users = [(k, a) for k, (i, a) in enumerate(ins) if i == "USER"]
    assert users, "no USER: the server would run as root"
    k, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert k < max(j for j, (i, _) in enumerate(ins) if i == "CMD")
    assert any(i == "RUN" and "useradd" in a and "casam" in a for i, a in ins)


def test_dockerfile_healthcheck_on_info():
    hc = healthcheck()
    assert any("/info/" in part for part in hc)
    expose = [a for i, a in instructions() if i == "EXPOSE"]
    assert expose == ["8000"] and any("127.0.0.1:8000" in part for part in hc)
    assert "--port" in cmd() and cmd()[cmd().index("--port") + 1] == "8000"


def test_dockerfile_weights_baked_in_and_offline_at_run_time():
    ins = instructions()
    run = " ".join(a for i, a in ins if i == "RUN")
    assert "load_backbone('litemedsam')" in run  # the build fails if the weights are not in the image
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "PIP_NO_INDEX=1" in env and "MONAI_LABEL_TRACKING_ENABLED=false" in env and "CASAM_REGISTRY=/registry" in env
    assert "/opt/casam/.venv/bin" in env  # itkimage2segimage (dcmqi) on PATH: MONAI Label downloads it otherwise
    runtime = " ".join(cmd() + healthcheck())
    for word in ("pip", "curl", "wget", "http://", "https://", "download"):
        assert word not in runtime.replace("http://127.0.0.1", ""), word
    assert not [a for i, a in ins if i == "ENTRYPOINT"]


def test_dockerfile_copies_exist():
    copies = [a.split()[:-1] for i, a in instructions() if i == "COPY"]
    sources = [s for c in copies for s in c if not s.startswith("--")]
    missing = [s for s in sources if not (ROOT / s).exists()]
    if missing == ["apps"]:
        pytest.skip("apps/ (the MONAI Label app) is not in this checkout yet")
    assert not missing
    assert os.access(ROOT / "install.sh", os.X_OK)
    ignore = [l.strip() for l in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    assert ignore[0] == "**"  # deny by default: .venv, .git, runs/ never reach the build context
    assert not [l for l in ignore if l.startswith("!") and (".venv" in l or ".git" in l)]


def test_cmd_is_the_documented_one():
    c = cmd()
    assert c[:4] == ["python", "-m", "monailabel.main", "start_server"]
    assert c[c.index("--app") + 1] == APP_IN_IMAGE and c[c.index("--studies") + 1] == "/data"
    readme = (DOCKER / "README.md").read_text()
    assert shlex.join(c) in readme, "docker/README.md must show the image's command"


# ---------------------------------------------------------------------------------------------- compose
def test_compose_structure():
    c = compose()
    orthanc, app = c["services"]["orthanc"], c["services"]["casam"]
    assert orthanc["image"].startswith("orthancteam/orthanc:")
    env = orthanc["environment"]
    assert env["DICOM_WEB_PLUGIN_ENABLED"] == "true" and env["ORTHANC__DICOM_WEB__ENABLE"] == "true"
    users = json.loads(env["ORTHANC__REGISTERED_USERS"])
    aenv = app["environment"]
    assert users.get(aenv["MONAI_LABEL_DICOMWEB_USERNAME"]) == aenv["MONAI_LABEL_DICOMWEB_PASSWORD"]
    assert aenv["CASAM_REGISTRY"] == "/registry"
    # the app's command is the image's, with Orthanc's DICOMweb root as the datastore
    command = app["command"]
    want = cmd()
    want[want.index("--studies") + 1] = "http://orthanc:8042/dicom-web"
    assert command == want
    assert app["depends_on"]["orthanc"]["condition"] == "service_healthy"
    assert (COMPOSE.parent / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == DOCKERFILE
    for svc in (orthanc, app):
        assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert any("/info/" in part for part in app["healthcheck"]["test"])
    assert "8000:8000" in app["ports"] and "8042:8042" in orthanc["ports"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in app["volumes"]}
    assert "/registry" in mounts and mounts["/registry"] in c["volumes"]


def test_compose_config_validates():
    for tool in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(tool[0]):
            continue
        probe = subprocess.run(tool + ["version"], capture_output=True, text=True)
        if probe.returncode != 0:
            continue
        p = subprocess.run(tool + ["-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        return
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


# ----------------------------------------------------------------------------------- the CMD, for real
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_image_cmd_starts_server_and_healthcheck_passes(tmp_path):
    """Runs the Dockerfile's CMD with this checkout's paths, then its HEALTHCHECK command, as the image would."""
    app_src = ROOT / "apps" / "casam"
    if not (app_src / "main.py").is_file():
        pytest.skip("apps/casam (the MONAI Label app) is not in this checkout yet")
    app = tmp_path / "app"
    shutil.copytree(app_src, app, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    studies = tmp_path / "data"
    studies.mkdir()
    port = _free_port()
    remap = {"python": sys.executable, APP_IN_IMAGE: str(app), "/data": str(studies), "8000": str(port)}
    argv = [remap.get(a, a) for a in cmd()]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    env = dict(os.environ, CASAM_REGISTRY=str(tmp_path / "registry"), CASAM_CACHE=str(tmp_path / "cache"),
               MONAI_LABEL_TRACKING_ENABLED="false", PIP_NO_INDEX="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    hc = [sys.executable if a == "python" else a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in healthcheck()]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 170
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            if subprocess.run(hc, capture_output=True, timeout=15).returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("server not healthy in 170 s:\n" + (tmp_path / "server.log").read_text()[-4000:])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
