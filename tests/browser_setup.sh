#!/usr/bin/env bash
# tests/browser_setup.sh -- what tests/test_ohif_browser.py needs to drive OHIF in a real browser:
#   * Debian's `chromium` (headless; WebGL2 in software through ANGLE/SwiftShader, no GPU, no X server)
#   * PyPI's `playwright` in .venv, which drives that chromium (executable_path=/usr/bin/chromium).
#     Playwright's own browser downloads (`playwright install`) are never used.
#
#   bash tests/browser_setup.sh          # idempotent; ~0.3 s when everything is there
#
# Environment: VPY (python of the venv; default ./.venv/bin/python), CASAM_SKIP_APT=1 (no apt-get).
# Exit status 0 when chromium and playwright are usable afterwards, else 1 (with the reason on stderr).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="${VPY:-$ROOT/.venv/bin/python}"
say()  { printf '[browser-setup] %s\n' "$*"; }
fail() { printf '[browser-setup] ERROR: %s\n' "$*" >&2; exit 1; }

# 1. chromium (Debian). fonts-liberation: metric-compatible Arial/Helvetica, so text in screenshots renders.
APT_PKGS=(chromium fonts-liberation)
if command -v chromium >/dev/null || [[ -n "${CASAM_CHROMIUM:-}" ]]; then
    say "apt: chromium already installed"
elif [[ "${CASAM_SKIP_APT:-0}" == "1" ]]; then
    say "apt: skipped (CASAM_SKIP_APT=1); chromium is missing"
elif ! command -v apt-get >/dev/null; then
    say "apt: no apt-get on this system; install chromium yourself"
else
    SUDO=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
            fail "not root and no passwordless sudo: cannot apt-get install ${APT_PKGS[*]}"; fi
    fi
    say "apt: installing ${APT_PKGS[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq -o DPkg::Lock::Timeout=300 || fail "apt-get update failed"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${APT_PKGS[@]}" \
        || fail "apt-get install ${APT_PKGS[*]} failed"
fi
CHROMIUM="${CASAM_CHROMIUM:-$(command -v chromium || true)}"
[[ -n "$CHROMIUM" && -x "$CHROMIUM" ]] || fail "chromium not found (apt-get install chromium, or set CASAM_CHROMIUM)"

# 2. playwright (PyPI) in the venv
[[ -x "$VPY" ]] || fail "$VPY not found (run install.sh first)"
if PW_VERSION="$("$VPY" -c 'import playwright.sync_api, importlib.metadata as m; print(m.version("playwright"))' 2>/dev/null)"; then
    say "pip: playwright $PW_VERSION already installed"
else
    say "pip: installing playwright"
    "$VPY" -m pip install --no-input --disable-pip-version-check -q "playwright>=1.40" || fail "pip install playwright failed"
fi
say "ok: $("$CHROMIUM" --version 2>/dev/null | head -1), playwright in $VPY"
