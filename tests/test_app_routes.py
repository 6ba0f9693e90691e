"""The app's changes to MONAI Label's routes, without a server: the bundled OHIF's nested files.

MONAI Label 0.8.5's ``GET /ohif/{path}`` turns ``/`` into ``os.pathsep``, so ``assets/favicon-32x32.png`` came
back as ``index.html``; :func:`lib.server.routes.install_ohif_assets_fix` serves it as itself, and never a file
outside the viewer's folder.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("monailabel")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from monailabel.endpoints import ohif as ohif_ep  # noqa: E402

from lib.server.routes import install_ohif_assets_fix  # noqa: E402

OHIF = os.path.join(os.path.dirname(os.path.realpath(ohif_ep.__file__)), "static", "ohif")


@pytest.fixture
def client(monkeypatch):
    if not os.path.isfile(os.path.join(OHIF, "assets", "favicon-32x32.png")):
        pytest.skip("this monailabel wheel bundles no OHIF viewer")
    monkeypatch.setattr(ohif_ep, "get_ohif", ohif_ep.get_ohif)  # restored after the test
    app = FastAPI()
    app.include_router(ohif_ep.router)
    return TestClient(app)


def test_nested_assets_are_served_and_traversal_refused(client):
    index = open(os.path.join(OHIF, "index.html"), "rb").read()
    assert install_ohif_assets_fix() is True
    assert install_ohif_assets_fix() is False  # idempotent: one wrapper, whatever calls it again (POST /reload)
    assert getattr(ohif_ep.get_ohif.__wrapped__, "casam_ohif_assets", False) is False
    r = client.get("/ohif/assets/favicon-32x32.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    assert r.content == open(os.path.join(OHIF, "assets", "favicon-32x32.png"), "rb").read()
    for route in ("/ohif/", "/ohif/viewer", "/ohif/monai-label/1.2.3", "/ohif/assets/no-such-file.png"):
        r = client.get(route)  # a viewer route (or a missing file): index.html, as MONAI Label answers
        assert r.status_code == 200 and r.content == index, route
    for route in ("/ohif/%2e%2e/%2e%2e/config.py", "/ohif/assets/%2e%2e/%2e%2e/%2e%2e/ohif.py",
                  "/ohif/..%2F..%2Fohif.py", "/ohif/%2Fetc%2Fpasswd", "/ohif/%2e%2e"):
        r = client.get(route)
        assert r.status_code == 404 and b"import" not in r.content and b"root:" not in r.content, (route, r.text)
