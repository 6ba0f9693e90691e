"""Shared fixtures: the tiny backbone, synthetic annotated images, the real data root."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The data root: $CASAM_DATA, else ../shared/data beside this checkout. It is exported as CASAM_DATA, so the
# commands the tests start (casam benchmark, casam evaluate, the server) read the same root from any folder.
DATA = Path(os.environ.get("CASAM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data").expanduser()
os.environ["CASAM_DATA"] = str(DATA)


def has_data() -> bool:
    return (DATA / "MANIFEST.tsv").exists()


needs_data = pytest.mark.skipif(not has_data(), reason=f"real data not found at {DATA}")


def disk_image(rng: np.random.Generator, size=(48, 64), bright=True, texture=0.0):
    """A grey image with one disk (bright on dark, or dark on bright) and its label map."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    r = rng.uniform(0.15, 0.3) * min(h, w)
    cy, cx = rng.uniform(r + 1, h - r - 1), rng.uniform(r + 1, w - r - 1)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
    base = rng.normal(60 if bright else 190, 10, size)
    img = base + mask * (120 if bright else -120) + texture * np.sin(xx / 2.0) * 40
    return np.clip(img, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="session")
def tiny():
    from casam.model.backbone import load_backbone

    return load_backbone("tiny")


@pytest.fixture(scope="session")
def disks():
    """Two synthetic 'institutions': bright disks on dark, and dark disks on a striped bright background."""
    rng = np.random.default_rng(0)
    a = [disk_image(rng) for _ in range(12)]
    b = [disk_image(rng, bright=False, texture=1.0) for _ in range(12)]
    return {"A": a, "B": b}


TEST_TIMEOUT_S = float(os.environ.get("CASAM_TEST_TIMEOUT", "1200"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Fails a test that runs past ``CASAM_TEST_TIMEOUT`` seconds (default 1200; 0 = none) instead of letting it
    hang the suite: CI gets a failure that names the test rather than a timeout that names nothing."""
    import signal

    def expired(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past {TEST_TIMEOUT_S:.0f} s (CASAM_TEST_TIMEOUT)")

    armed = TEST_TIMEOUT_S > 0 and hasattr(signal, "SIGALRM")
    if armed:
        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT_S)
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
