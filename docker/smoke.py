"""Deploys casam as a hospital would, end to end, and measures it: docker/compose.yaml with real images.

    sudo .venv/bin/python docker/smoke.py                 # build, up, segment, train, down/up, measure, down -v
    .venv/bin/python docker/smoke.py --no-build --keep    # reuse built images, leave the stack running

Needs a Docker engine (``docker info`` answers), a compose tool (``docker compose`` or Debian's
``docker-compose``) and a base image (``--base``, default ``debian-local:bookworm``: where Docker Hub cannot
be reached, make one with ``debootstrap --variant=minbase bookworm DIR`` and ``tar -C DIR -c . | docker import
- debian-local:bookworm``; ``--make-base`` does that when debootstrap is installed and this runs as root).

What it does, in order (every step asserts; the first failure stops the run):

1. builds the three images with the classic builder (``DOCKER_BUILDKIT=0``): ``casam`` (docker/Dockerfile, pip
   trusting ``--pip-ca`` through docker/ca/pip-ca.crt, removed again afterwards), ``casam-orthanc``
   (docker/Dockerfile.orthanc: Debian's orthanc + orthanc-dicomweb) and ``casam-gateway`` (socat), timing each;
   checks that the CA bundle is in neither the image's files nor its history;
2. ``compose up`` with a test override (``compose.smoke.yaml``, written to the work folder): a stand-in
   Keycloak realm (``keycloak``: Python's http.server in the casam image serving the realm's public key) on the
   internal ``pacs`` network, the app's ``--conf`` for a quick layer, host ports from ``--port`` on; cold start =
   ``up`` → casam healthy and ``/info/`` answering with a token;
3. authentication: ``/info/`` without a token and with a token signed by another key are refused (401);
4. containment: casam runs as a non-root user, with all capabilities dropped, on the internal network only;
   from inside it Orthanc answers and an address outside the host does not;
5. two brain MRI volumes of ../shared/data (or synthetic spheres when the data are absent) become DICOM series
   stored in Orthanc (REST, basic auth); each is segmented with one click through
   ``monailabel.client.MONAILabelClient`` and the label saved back; Orthanc then holds two DICOM SEG series;
6. ``POST /train/casam`` trains an Alignment Layer in the container (named after the series' InstitutionName);
7. ``compose down`` (volumes kept) and ``up`` again: the layer is still listed and active (the casam-registry
   volume), and a click is routed through it;
8. ``compose down -v`` unless ``--keep``.

Writes ``<out>/smoke.json`` and ``<out>/smoke.md`` (default out: docker/results/). tests/test_docker.py runs
steps 2-8 on images already built (``-m docker``); CI has no Docker engine and skips it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
CA_IN_CONTEXT = DOCKER / "ca" / "pip-ca.crt"
PROJECT = "casam-smoke"
INSTITUTION = "Lakeside Teaching Hospital"
ORTHANC_USER, ORTHANC_PASSWORD = "smoke", "smoke-orthanc-pw"
VOLUMES = Path(os.environ.get("CASAM_DATA", ROOT.parent / "shared" / "data")) / "brain_mri_lgg" / "volumes"


class SmokeError(RuntimeError):
    """A step of the smoke run failed."""


class Skip(RuntimeError):
    """The run cannot start here (no engine, no compose tool, no base image); the message says why."""


def log(msg: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(argv: List[str], *, check: bool = True, env: Optional[Dict[str, str]] = None, timeout: float = 1800,
       capture: bool = True, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=capture, text=True, env=env, timeout=timeout, cwd=cwd or ROOT)
    if check and p.returncode != 0:
        out = ((p.stdout or "") + (p.stderr or ""))[-4000:]
        raise SmokeError(f"{' '.join(argv[:6])} … exited {p.returncode}:\n{out}")
    return p


# ----------------------------------------------------------------------------------------- preconditions
def engine_problem() -> Optional[str]:
    """None when a Docker engine answers, else why not (for skips)."""
    if not shutil.which("docker"):
        return "no `docker` CLI on PATH (Debian: apt-get install docker.io)"
    p = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        said = (p.stderr or p.stdout).strip()[-300:]
        return f"no Docker engine answers (`docker info`: {said}); start dockerd as root"
    return None


def compose_tool() -> Optional[List[str]]:
    for tool in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(tool[0]) and subprocess.run(tool + ["version"], capture_output=True).returncode == 0:
            return tool
    return None


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def make_base(name: str, workdir: Path) -> float:
    """debootstrap (minbase, bookworm) + docker import; returns seconds."""
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        raise Skip(f"base image {name} is missing and cannot be made here (needs root and debootstrap)")
    t0 = time.time()
    rootfs = workdir / "rootfs"
    sh(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"], timeout=1800)
    (rootfs / "etc/apt/sources.list").write_text(
        "deb http://deb.debian.org/debian bookworm main\n"
        "deb http://deb.debian.org/debian bookworm-updates main\n"
        "deb http://deb.debian.org/debian-security bookworm-security main\n")
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for f in (rootfs / d).glob("*"):
            if f.is_file():
                f.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-c", 'CMD ["/bin/bash"]', "-", name], stdin=tar.stdout, check=True,
                   capture_output=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    return time.time() - t0


# -------------------------------------------------------------------------------------------------- build
def build(tag: str, base: str, pip_ca: Optional[Path]) -> Dict:
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    res: Dict = {}
    placed = False
    if pip_ca is not None and not CA_IN_CONTEXT.exists():
        shutil.copyfile(pip_ca, CA_IN_CONTEXT)
        placed = True
    try:
        for key, dockerfile, context, image in (
                ("casam", "docker/Dockerfile", ".", f"casam:{tag}"),
                ("orthanc", "docker/Dockerfile.orthanc", "docker", f"casam-orthanc:{tag}"),
                ("gateway", "docker/Dockerfile.gateway", "docker", f"casam-gateway:{tag}")):
            log(f"docker build {dockerfile} → {image}")
            t0 = time.time()
            p = sh(["docker", "build", "-f", dockerfile, "--build-arg", f"BASE={base}", "-t", image, context], env=env,
                   timeout=3600)
            res[key] = {"image": image, "build_s": round(time.time() - t0, 1),
                        "cached_steps": p.stdout.count("Using cache")}
    finally:
        if placed:
            CA_IN_CONTEXT.unlink()
    return res


def image_facts(image: str) -> Dict:
    size = int(sh(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout.strip())
    user = sh(["docker", "image", "inspect", "-f", "{{.Config.User}}", image]).stdout.strip()
    history = sh(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image]).stdout
    return {"size_bytes": size, "size_gb": round(size / 1e9, 2), "user": user,
            "history_mentions_ca": "pip-ca" in history}


# -------------------------------------------------------------------------------------------- the realm
def make_realm(workdir: Path):
    """An RSA key pair: the public half served as a Keycloak realm document, the private half signs tokens."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    realm_dir = workdir / "realm"
    (realm_dir / "realms").mkdir(parents=True, exist_ok=True)
    (realm_dir / "realms" / "monailabel").write_text(json.dumps({"realm": "monailabel",
                                                                  "public_key": base64.b64encode(der).decode()}))
    for p in (realm_dir, realm_dir / "realms"):
        p.chmod(0o755)
    (realm_dir / "realms" / "monailabel").chmod(0o644)
    return key, realm_dir


def token(key, roles=("monailabel-admin", "monailabel-annotator", "monailabel-reviewer", "monailabel-user")) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"preferred_username": "smoke", "email": "smoke@example.org", "name": "Smoke Test",
                       "realm_access": {"roles": list(roles)}, "iat": now, "exp": now + 3600}, key, algorithm="RS256")


def write_override(workdir: Path, realm_dir: Path, tag: str) -> Path:
    # a quick layer (2 volumes, 2 epochs); click_budget_s 0: a click follows the tumour through the whole volume,
    # so the saved label has the slices a layer trains on (with the 1.5 s default it stops where encoding has got to)
    conf = {"min_images": "2", "epochs": "2", "max_slices_per_volume": "4", "labels": "tumour", "click_budget_s": "0"}
    cmd = ["python", "-m", "monailabel.main", "start_server", "--app", "/opt/casam/apps/casam", "--studies",
           "http://orthanc:8042/dicom-web", "--host", "0.0.0.0", "--port", "8000"]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    override = {
        "services": {
            "casam": {"command": cmd,
                      "environment": {"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"})}},
            # stand-in for Keycloak: serves http://keycloak:8080/realms/monailabel (the compose file's default)
            "keycloak": {"image": f"casam:{tag}", "networks": ["pacs"], "user": "casam",
                         "command": ["python", "-m", "http.server", "8080", "--directory", "/realm"],
                         "volumes": [f"{realm_dir}:/realm:ro"], "cap_drop": ["ALL"],
                         "healthcheck": {"disable": True}},
        }
    }
    path = workdir / "compose.smoke.yaml"
    path.write_text(json.dumps(override, indent=2))  # JSON is YAML
    return path


# ------------------------------------------------------------------------------------------------- stack
class Stack:
    def __init__(self, tool: List[str], override: Path, tag: str, base: str, port: int):
        self.tool, self.override, self.port = tool, override, port
        self.env = dict(os.environ, CASAM_TAG=tag, CASAM_BASE=base, CASAM_BIND="127.0.0.1", CASAM_PORT=str(port),
                        CASAM_ORTHANC_PORT=str(port + 1), CASAM_DICOM_PORT=str(port + 2),
                        CASAM_ORTHANC_USER=ORTHANC_USER, CASAM_ORTHANC_PASSWORD=ORTHANC_PASSWORD)
        self.url = f"http://127.0.0.1:{port}"
        self.orthanc = f"http://127.0.0.1:{port + 1}"

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return sh(self.tool + ["-f", str(COMPOSE), "-f", str(self.override), "-p", PROJECT, *args], env=self.env,
                  timeout=timeout, check=check)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        cid = self.container(service)
        if not cid:
            return "absent"
        state = "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
        return sh(["docker", "inspect", "-f", state, cid]).stdout.strip()

    def logs(self, service: str, tail: int = 60) -> str:
        return self.compose("logs", "--tail", str(tail), service, check=False).stdout[-6000:]

    def up(self, tok: str, timeout: float = 600) -> float:
        t0 = time.time()
        self.compose("up", "-d", "--no-build")
        while time.time() - t0 < timeout:
            if self.health("casam") == "healthy" and self.http("/info/", tok)[0] == 200:
                return time.time() - t0
            if self.health("casam") in ("exited", "dead"):
                break
            time.sleep(2)
        raise SmokeError(f"casam not healthy in {timeout:.0f} s:\n{self.logs('casam')}")

    def http(self, path: str, tok: Optional[str] = None, method: str = "GET", timeout: float = 30):
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": f"Bearer {tok}"} if tok else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, socket.timeout, OSError) as e:
            return None, str(e).encode()

    def orthanc_get(self, path: str):
        auth = base64.b64encode(f"{ORTHANC_USER}:{ORTHANC_PASSWORD}".encode()).decode()
        req = urllib.request.Request(self.orthanc + path, headers={"Authorization": f"Basic {auth}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def orthanc_upload(self, files) -> None:
        auth = base64.b64encode(f"{ORTHANC_USER}:{ORTHANC_PASSWORD}".encode()).decode()
        for f in files:
            headers = {"Authorization": f"Basic {auth}", "Content-Type": "application/dicom"}
            req = urllib.request.Request(self.orthanc + "/instances", data=Path(f).read_bytes(), method="POST",
                                         headers=headers)
            with urllib.request.urlopen(req, timeout=60) as r:
                status = json.loads(r.read()).get("Status")
                if status not in ("Success", "AlreadyStored"):
                    raise SmokeError(f"Orthanc refused {f}: {status}")

    def exec(self, service: str, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        return sh(["docker", "exec", self.container(service), *argv], check=check, timeout=120)


# --------------------------------------------------------------------------------------------- the data
def make_series(workdir: Path):
    """Two MR DICOM series (InstitutionName = INSTITUTION) and, per series, a click voxel [i, j, k] in the object."""
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from orthanc_fixture import nifti_to_dicom_series

    cases = sorted(VOLUMES.glob("TCGA_DU_*_image.nii.gz"))[:2] if VOLUMES.is_dir() else []
    source = "brain_mri_lgg (../shared/data)" if len(cases) == 2 else "synthetic spheres"
    if len(cases) < 2:
        cases = []
        for n in range(2):
            zz, yy, xx = np.mgrid[:24, :96, :96]
            vol = (((xx - 48 - 5 * n) ** 2 + (yy - 44) ** 2 + ((zz - 12) * 3) ** 2) < 18 ** 2) * 150 + 40
            lab = (vol > 100).astype(np.uint8)
            img = workdir / f"synthetic{n}_image.nii.gz"
            nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).astype(np.uint8), np.eye(4)), img)
            nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0), np.eye(4)), workdir / f"synthetic{n}_label.nii.gz")
            cases.append(img)
    series = []
    for i, img in enumerate(cases):
        case = img.name[: -len("_image.nii.gz")]
        _, uid, files = nifti_to_dicom_series(img, workdir / "dcm" / case, INSTITUTION, patient_id=case,
                                              series_number=i + 1)
        gt = np.asarray(nib.load(img.with_name(f"{case}_label.nii.gz")).dataobj)  # i, j, k
        k = int(np.argmax((gt > 0).reshape(-1, gt.shape[2]).sum(0)))
        ii, jj = np.nonzero(gt[:, :, k] > 0)
        c = int(np.argmin((ii - ii.mean()) ** 2 + (jj - jj.mean()) ** 2))  # the object's voxel nearest its centre
        series.append({"case": case, "uid": uid, "files": files, "click": [int(ii[c]), int(jj[c]), k],
                       "gt": (gt > 0).transpose(2, 1, 0)})
    return series, source


def iou(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float((a & b).sum() / max(1, (a | b).sum()))


# ---------------------------------------------------------------------------------------------- the run
def run(tag: str = "smoke", base: str = "debian-local:bookworm", port: int = 8210, do_build: bool = True,
        pip_ca: Optional[Path] = Path("/etc/ssl/certs/ca-certificates.crt"), keep: bool = False,
        make_base_image: bool = False, out: Optional[Path] = None) -> Dict:
    why = engine_problem()
    if why:
        raise Skip(why)
    tool = compose_tool()
    if tool is None:
        raise Skip("no compose tool (`docker compose` or Debian's docker-compose)")
    engine = sh(["docker", "info", "--format", "{{.ServerVersion}} {{.Driver}} {{.CgroupDriver}}"]).stdout.strip()
    results: Dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "compose_tool": " ".join(tool),
                     "engine": engine,
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "base": base, "steps": {}}
    workdir = Path(tempfile.mkdtemp(prefix="casam-smoke-"))
    workdir.chmod(0o755)
    if not image_exists(base):
        if not make_base_image:
            raise Skip(f"base image {base} not found (make it with --make-base, or debootstrap + docker import)")
        results["base_image_s"] = round(make_base(base, workdir), 1)
    if do_build:
        results["build"] = build(tag, base, pip_ca if pip_ca and pip_ca.is_file() else None)
    for img in (f"casam:{tag}", f"casam-orthanc:{tag}", f"casam-gateway:{tag}"):
        if not image_exists(img):
            raise Skip(f"image {img} not built (run docker/smoke.py without --no-build)")
    facts = {k: image_facts(f"{k}:{tag}") for k in ("casam", "casam-orthanc", "casam-gateway")}
    results["images"] = facts
    ca = sh(["docker", "run", "--rm", "--entrypoint", "sh", f"casam:{tag}", "-c",
             "ls /tmp/pip-ca /opt/casam/docker 2>/dev/null; "
             "grep -rl 'BEGIN CERTIFICATE' /opt/casam /tmp /root 2>/dev/null "
             "| grep -v -e site-packages -e '/\\.venv/' | head"], check=False).stdout.strip()
    if facts["casam"]["history_mentions_ca"] or ca:
        history = facts["casam"]["history_mentions_ca"]
        raise SmokeError(f"pip's CA bundle left in the image: history={history} files={ca!r}")
    if facts["casam"]["user"] in ("", "root", "0"):
        raise SmokeError("the casam image runs as root")
    results["steps"]["ca_not_in_image"] = True

    key, realm_dir = make_realm(workdir)
    stack = Stack(tool, write_override(workdir, realm_dir, tag), tag, base, port)
    tok = token(key)
    stack.compose("down", "-v", check=False)  # a clean start
    try:
        log("compose up (cold)")
        results["cold_start_s"] = round(stack.up(tok), 1)
        log(f"healthy after {results['cold_start_s']} s")

        # ---- authentication
        from cryptography.hazmat.primitives.asymmetric import rsa

        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        refused = {"no_token": stack.http("/info/")[0], "foreign_key": stack.http("/info/", token(other))[0],
                   "garbage": stack.http("/info/", "not-a-token")[0]}
        if set(refused.values()) != {401}:
            raise SmokeError(f"unauthenticated requests not refused: {refused}")
        results["steps"]["auth_refused"] = refused

        # ---- containment
        uid = stack.exec("casam", "id", "-u", check=True).stdout.strip()
        cid = stack.container("casam")
        nets = json.loads(sh(["docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", cid]).stdout)
        internal = {n: sh(["docker", "network", "inspect", "-f", "{{.Internal}}", n]).stdout.strip() == "true"
                    for n in nets}
        caps = sh(["docker", "inspect", "-f", "{{json .HostConfig.CapDrop}}", cid]).stdout.strip()
        probe = ("import socket, sys\n"
                 "def ok(h, p):\n"
                 "    try:\n"
                 "        socket.create_connection((h, p), timeout=5).close(); return True\n"
                 "    except OSError:\n"
                 "        return False\n"
                 "print(ok('orthanc', 8042), ok('1.1.1.1', 80), ok('deb.debian.org', 80), ok('pypi.org', 443))")
        reach = stack.exec("casam", "python", "-c", probe, check=True).stdout.split()
        contain = {"uid": uid, "networks": internal, "cap_drop": caps, "orthanc": reach[0] == "True",
                   "outside": {"1.1.1.1:80": reach[1] == "True", "deb.debian.org:80": reach[2] == "True",
                               "pypi.org:443": reach[3] == "True"}}
        if uid == "0" or not all(internal.values()) or not contain["orthanc"] or any(contain["outside"].values()):
            raise SmokeError(f"containment: {contain}")
        results["steps"]["containment"] = contain

        # ---- a DICOM series in Orthanc, one click each, labels back as DICOM SEG
        from monailabel.client import MONAILabelClient

        from casam.data.clinical import read_clinical

        series, source = make_series(workdir)
        for s in series:
            stack.orthanc_upload(s["files"])
        results["data"] = {"source": source, "series": [s["case"] for s in series]}
        client = MONAILabelClient(stack.url, tmpdir=str(workdir / "client"))
        client.update_auth({"token_type": "Bearer", "access_token": tok})
        t0 = time.time()  # MONAI Label lists Orthanc's series anew after MONAI_LABEL_DICOMWEB_CACHE_EXPIRY (60 s)
        while client.info()["datastore"]["total"] != len(series):
            if time.time() - t0 > 150:
                total = client.info()["datastore"]["total"]
                raise SmokeError(f"datastore lists {total} images, expected {len(series)}")
            time.sleep(5)
        results["steps"]["series_listed_after_s"] = round(time.time() - t0, 1)
        clicks = []
        for s in series:
            t0 = time.time()
            path, params = client.infer("casam", s["uid"], {"foreground": [s["click"]], "background": [],
                                                            "result_extension": ".nrrd"})
            params = json.loads(params) if isinstance(params, str) else params
            mask = read_clinical(path).array
            if mask.shape != s["gt"].shape or not mask.any():
                raise SmokeError(f"click on {s['case']}: empty or misshapen mask {mask.shape} vs {s['gt'].shape}")
            k = s["click"][2]
            clicks.append({"case": s["case"], "seconds": round(time.time() - t0, 1),
                           "iou_3d": round(iou(mask, s["gt"]), 3),
                           "iou_clicked_slice": round(iou(mask[k], s["gt"][k]), 3),
                           "slices": int(mask.any(axis=(1, 2)).sum()),
                           "layer": params.get("layer"), "fallback": params.get("fallback")})
            client.save_label(s["uid"], path, tag="final", params={"label_info": [{"name": "tumour", "idx": 1}]})
        segs = stack.orthanc_get("/dicom-web/series?Modality=SEG")
        if len(segs) != len(series):
            raise SmokeError(f"Orthanc holds {len(segs)} DICOM SEG series, expected {len(series)}")
        results["steps"]["clicks"] = clicks
        results["steps"]["dicom_seg_series_in_orthanc"] = len(segs)

        # ---- a layer trained in the container
        log("POST /train/casam (sync)")
        t0 = time.time()
        code, body = stack.http("/train/casam?run_sync=true", tok, method="POST", timeout=3000)
        if code != 200:
            raise SmokeError(f"train: HTTP {code}: {body[-2000:]!r}\n{stack.logs('casam')}")
        report = json.loads(body)
        layers = [(x["institution"], x["active"]) for x in client.info()["layers"]]
        if layers != [(INSTITUTION, True)]:
            raise SmokeError(f"after training the server lists {layers}: {report}")
        results["steps"]["train"] = {"seconds": round(time.time() - t0, 1),
                                     "institutions": [{k: e.get(k)
                                                       for k in ("institution", "layer", "images", "patients")}
                                                      for e in report.get("institutions", [])]}

        # ---- the layer survives compose down / up
        log("compose down (volumes kept), up again")
        stack.compose("down")
        results["warm_restart_s"] = round(stack.up(tok), 1)
        client = MONAILabelClient(stack.url, tmpdir=str(workdir / "client2"))
        client.update_auth({"token_type": "Bearer", "access_token": tok})
        after = [(x["institution"], x["active"]) for x in client.info()["layers"]]
        s = series[0]
        _, params = client.infer("casam", s["uid"], {"foreground": [s["click"]], "background": [],
                                                      "result_extension": ".nrrd"})
        params = json.loads(params) if isinstance(params, str) else params
        if after != [(INSTITUTION, True)]:
            raise SmokeError(f"after down/up the server lists {after}")
        results["steps"]["layer_after_down_up"] = {"layers": after, "click_layer": params.get("layer"),
                                                   "fallback": params.get("fallback")}
        results["ok"] = True
    except BaseException as e:
        results["ok"] = False
        results["error"] = str(e)[-3000:]
        results["casam_log"] = stack.logs("casam", 40)
        raise
    finally:
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if not keep:
            stack.compose("down", "-v", check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        if out is not None:
            write_results(results, out)
    return results


def write_results(r: Dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    st = r.get("steps", {})
    lines = [f"# docker/smoke.py — {r['started']}", "",
             f"Engine {r['engine']}, {r['compose_tool']}, {r['machine']}, base image `{r['base']}`. Result: "
             f"**{'passed' if r.get('ok') else 'FAILED'}**.", ""]
    if r.get("build"):
        lines += ["| image | build (s) | steps from cache | size (GB) | user |", "| --- | --- | --- | --- | --- |"]
        for k, b in r["build"].items():
            f = r["images"][b["image"].split(":")[0]]
            lines.append(f"| `{b['image']}` | {b['build_s']} | {b['cached_steps']} | {f['size_gb']} "
                         f"| {f['user'] or 'root'} |")
        lines.append("")
    elif r.get("images"):
        lines += ["| image | size (GB) | user |", "| --- | --- | --- |"]
        lines += [f"| `{k}` | {f['size_gb']} | {f['user'] or 'root'} |" for k, f in r["images"].items()]
        lines.append("")
    if "cold_start_s" in r:
        lines.append(f"* cold start (`compose up` → casam healthy, `/info/` answering): {r['cold_start_s']} s; "
                     f"after `down`/`up` with the volumes: {r.get('warm_restart_s', '—')} s")
    if "auth_refused" in st:
        lines.append(f"* refused without a valid token: {st['auth_refused']}")
    if "containment" in st:
        c = st["containment"]
        lines.append(f"* casam runs as uid {c['uid']}, capabilities dropped {c['cap_drop']}, networks {c['networks']} "
                     f"(internal); reaches Orthanc: {c['orthanc']}; reaches outside: {c['outside']}")
    if "clicks" in st:
        lines.append(f"* data: {r['data']['source']}; one click per series through MONAILabelClient: "
                     + "; ".join(f"{c['case']} {c['seconds']} s, {c['slices']} slices, IoU {c['iou_3d']} (3D) / "
                                 f"{c['iou_clicked_slice']} (clicked slice), layer {c['layer'] or 'none'}"
                                 for c in st["clicks"]))
        lines.append(f"* DICOM SEG series in Orthanc after saving: {st['dicom_seg_series_in_orthanc']}")
    if "series_listed_after_s" in st:
        lines.append(f"* the series stored in Orthanc were listed by the server {st['series_listed_after_s']} s after "
                     f"the upload (`MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`)")
    if "train" in st:
        lines.append(f"* layer trained in the container in {st['train']['seconds']} s: {st['train']['institutions']}")
    if "layer_after_down_up" in st:
        a = st["layer_after_down_up"]
        lines.append(f"* after `compose down` / `up`: layers {a['layers']}; a click is routed to {a['click_layer']}")
    if not r.get("ok"):
        lines += ["", "Error:", "", "```", r.get("error", ""), "```"]
    (out / "smoke.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", default="smoke")
    ap.add_argument("--base", default="debian-local:bookworm")
    ap.add_argument("--make-base", action="store_true", help="debootstrap + import the base image when it is missing")
    ap.add_argument("--port", type=int, default=8210, help="first of three host ports (casam, Orthanc, DICOM)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--pip-ca", type=Path, default=Path("/etc/ssl/certs/ca-certificates.crt"),
                    help="CA bundle pip trusts during the build ('' for none)")
    ap.add_argument("--keep", action="store_true", help="leave the stack running (and its volumes)")
    ap.add_argument("--out", type=Path, default=DOCKER / "results")
    a = ap.parse_args(argv)
    try:
        r = run(a.tag, a.base, a.port, not a.no_build, a.pip_ca if str(a.pip_ca) else None, a.keep, a.make_base, a.out)
    except Skip as e:
        log(f"skipped: {e}")
        return 2
    log(f"passed: {json.dumps({k: r[k] for k in ('cold_start_s', 'warm_restart_s') if k in r})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
