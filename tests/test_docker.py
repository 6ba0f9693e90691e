"""docker/: the Dockerfiles and compose.yaml, checked without a Docker engine (none on CI machines), and the
deployment itself where one answers.

What is checked without an engine: the compose file is valid (``docker compose config`` / ``docker-compose
config`` when one is installed, and by parsing it) and keeps the server on an internal network with auth on;
the Dockerfile runs as a non-root user, has a HEALTHCHECK on /info/, bakes the LiteMedSAM weights in at build
time, keeps pip's CA bundle in its build stage and does nothing over the network at run time, and its CMD is
the command docker/README.md documents. The slow test runs that CMD (paths remapped to this checkout) and its
HEALTHCHECK command against the real server. The ``docker`` test runs docker/smoke.py on images already built
(compose up, auth, containment, one click per DICOM series from Orthanc, DICOM SEG back, a layer trained in
the container surviving down/up); it skips, saying why, where no Docker engine answers or the images are absent.
"""

from __future__ import annotations

import importlib.util
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
def stages():
    """Dockerfile → list of stages, each a list of (INSTRUCTION, argument) from its FROM on."""
    out = []
    for i, a in instructions():
        if i == "FROM":
            out.append([])
        if out:
            out[-1].append((i, a))
    return out


def test_dockerfile_base_and_build_args():
    ins = instructions()
    args = {a.split("=")[0]: a.split("=", 1)[1] if "=" in a else None for i, a in ins if i == "ARG"}
    assert args["BASE"] == "python:3.11-slim"  # any Debian/Ubuntu image with Python >= 3.10; an imported Debian works
    assert args["TORCH_INDEX"] == "" and args["TORCH_VERSION"] == "2.14.1" and args["TORCHVISION_VERSION"] == "0.29.1"
    assert [a for i, a in ins if i == "FROM"] == ["${BASE} AS build", "${BASE}"]
    run = " ".join(a for i, a in ins if i == "RUN")
    assert "install.sh" in run and "CASAM_SKIP_APT=1" in run  # installs via the repo's installer, no Orthanc inside
    assert '--index-url "$TORCH_INDEX"' in run and '[ -n "$TORCH_INDEX" ]' in run


def test_dockerfile_pip_ca_stays_in_the_build_stage():
    """pip's CA bundle (docker/ca/pip-ca.crt) reaches the build stage only; the final stage copies /opt/casam."""
    build, final = stages()
    assert any(i == "COPY" and a.startswith("docker/ca ") for i, a in build)
    run = " ".join(a for i, a in build if i == "RUN")
    assert "PIP_CERT=/tmp/pip-ca/pip-ca.crt" in run and "rm -rf /tmp/pip-ca" in run
    assert not any("pip-ca" in a or "PIP_CERT" in a or a.split()[0] == "docker/ca" for _, a in final)
    copied = [a for i, a in final if i == "COPY" and a.startswith("--from")]
    assert copied == ["--from=build /opt/casam/.venv /opt/casam/.venv"]
    assert (DOCKER / "ca" / ".gitignore").read_text().split() == ["*.crt"]  # never committed


def test_dockerignore_for_both_builders():
    """BuildKit reads docker/Dockerfile.dockerignore, the classic builder and docker-compose the root .dockerignore."""
    def rules(p):
        return [r.strip() for r in p.read_text().splitlines() if r.strip() and not r.startswith("#")]

    assert rules(ROOT / ".dockerignore") == rules(DOCKER / "Dockerfile.dockerignore")


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
    final = stages()[-1]
    assert "load_backbone('litemedsam')" in run  # the build fails if the weights are not in the image
    env = " ".join(a for i, a in final if i == "ENV")
    assert "PIP_NO_INDEX=1" in env and "MONAI_LABEL_TRACKING_ENABLED=false" in env and "CASAM_REGISTRY=/registry" in env
    assert "/opt/casam/.venv/bin" in env  # itkimage2segimage (dcmqi) on PATH: MONAI Label downloads it otherwise
    runtime = " ".join(cmd() + healthcheck())
    for word in ("pip", "curl", "wget", "http://", "https://", "download"):
        assert word not in runtime.replace("http://127.0.0.1", ""), word
    assert not [a for i, a in ins if i == "ENTRYPOINT"]


def test_dockerfile_copies_exist():
    copies = [a.split()[:-1] for i, a in instructions() if i == "COPY" and not a.startswith("--from")]
    sources = [s for c in copies for s in c if not s.startswith("--")]
    missing = [s for s in sources if not (ROOT / s).exists()]
    if missing == ["apps"]:
        pytest.skip("apps/ (the MONAI Label app) is not in this checkout yet")
    assert not missing
    assert os.access(ROOT / "install.sh", os.X_OK)
    ignore = [r.strip() for r in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if r.strip() and not r.startswith("#")]
    assert ignore[0] == "**"  # deny by default: .venv, .git, runs/ never reach the build context
    assert not [r for r in ignore if r.startswith("!") and (".venv" in r or ".git" in r)]


def test_cmd_is_the_documented_one():
    c = cmd()
    assert c[:4] == ["python", "-m", "monailabel.main", "start_server"]
    assert c[c.index("--app") + 1] == APP_IN_IMAGE and c[c.index("--studies") + 1] == "/data"
    readme = (DOCKER / "README.md").read_text()
    assert shlex.join(c) in readme, "docker/README.md must show the image's command"


def _auth_hook():
    """docker/casam_auth_hook.py as a module (it installs nothing on import without CASAM_APP_DIR)."""
    spec = importlib.util.spec_from_file_location("casam_auth_hook_under_test", DOCKER / "casam_auth_hook.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    return hook


def test_dockerfile_installs_the_auth_hook():
    """The image runs the app's lib/server/auth.py install() whenever MONAI Label's auth module is imported."""
    final = stages()[-1]
    run = " ".join(a for i, a in final if i == "RUN")
    assert ["docker/casam_auth_hook.py /tmp/casam_auth_hook.py"] == [a for i, a in final if i == "COPY" and "hook" in a]
    assert 'echo "import casam_auth_hook" > "$SITE/casam_auth_hook.pth"' in run and "a.jwt.casam_pinned" in run
    env = [a for i, a in final if i == "ENV" and a.startswith(_auth_hook().APP_DIR_ENV + "=")]
    assert env == [f"CASAM_APP_DIR={APP_IN_IMAGE}"]  # the app the CMD serves
    assert (ROOT / "apps" / "casam" / "lib" / "server" / "auth.py").is_file()
    assert not (ROOT / "casam" / "monailabel_auth.py").exists()  # the library never imports MONAI Label


def test_auth_hook_pins_the_check_on_import(tmp_path):
    """With CASAM_APP_DIR set, importing MONAI Label's auth module installs the app's fix (as in the image)."""
    pytest.importorskip("monailabel")
    code = ("import casam_auth_hook, monailabel.endpoints.user.auth as a; assert a.jwt.casam_pinned, a.jwt; "
            "import sys; sys.path.insert(0, sys.argv[1]); from lib.server.auth import install; "
            "assert install() is False  # the app's own install() sees the hook's")
    env = dict(os.environ, CASAM_APP_DIR=str(ROOT / "apps" / "casam"), PYTHONPATH=str(DOCKER))
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "apps" / "casam")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_monailabel_auth_accepts_realm_tokens_only(monkeypatch):
    """MONAI Label 0.8.5 + PyJWT 2 refuse every token; after install() a token of the realm's key passes, others not."""
    pytest.importorskip("monailabel")
    jwt = pytest.importorskip("jwt")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt import InvalidTokenError
    from monailabel.config import settings
    from monailabel.endpoints.user import auth

    mlauth = _auth_hook().load_auth(str(ROOT / "apps" / "casam"))  # as the image's hook loads it

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(auth, "get_public_key", lambda uri: pem.decode())
    monkeypatch.setattr(auth, "jwt", auth.jwt)  # restored after the test
    claims = {"preferred_username": "ann", "realm_access": {"roles": ["monailabel-user"]}, "exp": int(time.time()) + 60}
    good = jwt.encode(claims, key, algorithm="RS256")
    if not getattr(auth.jwt, "casam_pinned", False):
        with pytest.raises(InvalidTokenError):  # what the server does without it: 401 for a valid token
            auth.from_token(good)
    mlauth.install()
    assert mlauth.install() is False  # idempotent
    user = auth.from_token(good)
    assert user.username == "ann" and user.roles == ["monailabel-user"]
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bad in (jwt.encode(claims, other, algorithm="RS256"),                                 # another key
                jwt.encode(dict(claims, exp=int(time.time()) - 10), key, algorithm="RS256")):  # expired
        with pytest.raises(InvalidTokenError):
            auth.from_token(bad)
    monkeypatch.setenv(mlauth.ALGORITHMS_ENV, "RS256, RS512")
    assert mlauth.algorithms_from_env() == ["RS256", "RS512"]


# ---------------------------------------------------------------------------------------------- compose
def test_compose_structure():
    c = compose()
    orthanc, app, gateway = (c["services"][k] for k in ("orthanc", "casam", "gateway"))
    # every image is built from this repository and Debian's packages (no Docker Hub image is pulled)
    builds = {k: (COMPOSE.parent / v["build"]["context"] / v["build"]["dockerfile"]).resolve()
              for k, v in c["services"].items()}
    assert builds == {"orthanc": DOCKER / "Dockerfile.orthanc", "casam": DOCKERFILE,
                      "gateway": DOCKER / "Dockerfile.gateway"}
    assert all(v["build"]["args"]["BASE"] == "${CASAM_BASE:-debian:bookworm-slim}" for v in c["services"].values())
    env, aenv = orthanc["environment"], app["environment"]
    assert (env["ORTHANC_USERNAME"], env["ORTHANC_PASSWORD"]) == (aenv["MONAI_LABEL_DICOMWEB_USERNAME"],
                                                                  aenv["MONAI_LABEL_DICOMWEB_PASSWORD"])
    assert aenv["CASAM_REGISTRY"] == "/registry"
    assert aenv["MONAI_LABEL_DICOMWEB_CACHE_EXPIRY"] == "${CASAM_DICOMWEB_LIST_SECONDS:-60}"  # MONAI Label's is 2 h
    # the app's command is the image's, with Orthanc's DICOMweb root as the datastore
    command = app["command"]
    want = cmd()
    want[want.index("--studies") + 1] = "http://orthanc:8042/dicom-web"
    assert command == want
    assert app["depends_on"]["orthanc"]["condition"] == "service_healthy"
    for svc in (orthanc, app):
        assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert any("/info/" in part for part in app["healthcheck"]["test"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in app["volumes"]}
    assert "/registry" in mounts and mounts["/registry"] in c["volumes"]


def test_compose_network_and_auth():
    """casam reaches Orthanc and nothing else; the published port is the gateway's; authentication is on."""
    c = compose()
    orthanc, app, gateway = (c["services"][k] for k in ("orthanc", "casam", "gateway"))
    assert c["networks"]["pacs"]["internal"] is True and not c["networks"]["front"]
    assert app["networks"] == ["pacs"] and "ports" not in app
    assert set(orthanc["networks"]) == set(gateway["networks"]) == {"pacs", "front"}
    assert gateway["environment"]["TARGET"] == "casam:8000"
    assert gateway["ports"] == ["${CASAM_BIND:-127.0.0.1}:${CASAM_PORT:-8000}:8000"]
    assert "${CASAM_BIND:-127.0.0.1}:${CASAM_ORTHANC_PORT:-8042}:8042" in orthanc["ports"]
    for svc in (app, gateway):
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
    aenv = app["environment"]
    assert aenv["MONAI_LABEL_AUTH_ENABLE"] == "true" and aenv["MONAI_LABEL_TRACKING_ENABLED"] == "false"
    assert aenv["MONAI_LABEL_AUTH_REALM_URI"].startswith("${CASAM_AUTH_REALM_URI:-")
    assert "USER orthanc" in (DOCKER / "Dockerfile.orthanc").read_text()
    assert "USER nobody" in (DOCKER / "Dockerfile.gateway").read_text()


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


# ------------------------------------------------------------------------------ the deployment, for real
@pytest.mark.slow
@pytest.mark.docker
def test_compose_deployment_end_to_end(tmp_path):
    """docker/smoke.py on images already built: up, auth, containment, click + DICOM SEG, train, down/up."""
    import smoke

    why = smoke.engine_problem()
    if why:
        pytest.skip(why)
    if smoke.compose_tool() is None:
        pytest.skip("no compose tool (`docker compose` or Debian's docker-compose)")
    tag = os.environ.get("CASAM_SMOKE_TAG", "smoke")
    for img in (f"casam:{tag}", f"casam-orthanc:{tag}", f"casam-gateway:{tag}"):
        if not smoke.image_exists(img):
            pytest.skip(f"image {img} not built: run `python docker/smoke.py` first (it builds them)")
    r = smoke.run(tag=tag, port=int(os.environ.get("CASAM_SMOKE_PORT", "8240")), do_build=False, out=tmp_path)
    assert r["ok"] and r["steps"]["dicom_seg_series_in_orthanc"] == 2
    assert set(r["steps"]["auth_refused"].values()) == {401}
    assert r["steps"]["layer_after_down_up"]["layers"] == [(smoke.INSTITUTION, True)]
