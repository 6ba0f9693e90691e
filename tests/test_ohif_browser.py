"""OHIF in a real browser: the viewer a clinician opens, driven end to end against the casam server.

The ``monailabel`` wheel ships a prebuilt OHIF v3 with MONAI Label's extension and mode, served at ``/ohif/``;
it reads images through the server's ``/proxy/dicom`` routes from the DICOMweb ``--studies`` (Orthanc here).
Headless Debian Chromium (WebGL2 in software: ANGLE on SwiftShader), driven by Playwright, does what the
README's "Connect OHIF" section tells a clinician:

1. open ``<server>/ohif/monai-label?StudyInstanceUIDs=<study>`` (the study the server's Next Sample offered)
   and wait until the viewports have drawn the MR series;
2. type the server's address into the MONAI Label panel and connect;
3. Point Prompts: choose ``casam``, the ``tumour`` row, click the tumour on the axial slice, **Run**: the mask
   read back from the page (``window.services.segmentationService``) contains the clicked voxel and its Dice
   against the series' label on that slice is that of the same request replayed over HTTP (minus 0.02);
4. the ``background`` row, a click inside the mask but away from the object, **Run**: the mask shrinks;
5. Active Learning, **Next Sample**, OK: the other study opens; **Update Model** starts a training that
   **Stop Training** stops.

What the browser needs is installed by ``tests/browser_setup.sh`` (Debian ``chromium``, PyPI ``playwright``;
called by the fixture when something is missing, where root or passwordless sudo is available). When it
fails, the browser's console, a screenshot and the server's log are kept in a folder the failure names.
``CASAM_OHIF_PICTURES=1`` also writes the pictures of docs/images/ohif_*.png.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import DATA, needs_data
from orthanc_fixture import nifti_to_dicom_series, orthanc_server, upload_series  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, needs_data]

pytest.importorskip("monailabel")
nib = pytest.importorskip("nibabel")
from mlserver import MonaiLabelServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tests" / "browser_setup.sh"
DOCS_IMAGES = REPO / "docs" / "images"
VOLUMES = DATA / "brain_mri_lgg" / "volumes"
CASES = ("TCGA_DU_5849_19950405", "TCGA_CS_4941_19960909")
INSTITUTION = "Lakeside Teaching Hospital"
# headless Chromium draws WebGL2 in software: ANGLE on SwiftShader (no GPU, no X server); --no-sandbox for root
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1440, "height": 900}
DICE_TOLERANCE = 0.02
# console errors that are MONAI Label's own, not a failure: GET /train/?check_if_running answers 404 until a
# training has run (the panel asks when it opens and reads the 404 as "not training")
KNOWN_CONSOLE_ERRORS = ("status of 404 (Not Found)",)


# --- the browser ----------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    path = os.environ.get("CASAM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


def _playwright_ok() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright; runs tests/browser_setup.sh first when something is missing."""
    if not (_chromium() and _playwright_ok()):
        proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900,
                              env={**os.environ, "VPY": sys.executable})
        if not (_chromium() and _playwright_ok()):
            pytest.skip(f"chromium/playwright not installable here (tests/browser_setup.sh exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = b.new_page()
            gl = page.evaluate("() => { const g = document.createElement('canvas').getContext('webgl2');"
                               " if (!g) return null;"
                               " const d = g.getExtension('WEBGL_debug_renderer_info');"
                               " return d ? g.getParameter(d.UNMASKED_RENDERER_WEBGL) : g.getParameter(g.RENDERER); }")
            page.close()
            if not gl:
                pytest.fail(f"headless Chromium {b.version} has no WebGL2 with {CHROMIUM_ARGS}: OHIF cannot draw")
            b.casam_webgl = gl
            yield b
        finally:
            b.close()


# --- Orthanc with two MR studies, the casam server on it ------------------------------------------------------
def _label_slice_index(case: str):
    """The series' label (NIfTI i, j, k = DICOM column, row, file) and the slice where the tumour is largest."""
    lab = np.asarray(nib.load(VOLUMES / f"{case}_label.nii.gz").dataobj) > 0
    return lab, int(np.argmax(lab.sum((0, 1))))


@pytest.fixture(scope="module")
def stack(orthanc_server, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("ohif-browser")
    studies = {}
    for i, case in enumerate(CASES):
        study, series, files = nifti_to_dicom_series(VOLUMES / f"{case}_image.nii.gz", work / "dcm" / case, INSTITUTION,
                                                     patient_id=case, series_number=1, study_description="brain MRI")
        upload_series(orthanc_server, files)
        studies[study] = {"case": case, "series": series}
    # the README's server command, with this test's folders
    srv = MonaiLabelServer(orthanc_server.dicomweb_url, work / "ml", conf={
        "backbone": "litemedsam", "registry": str(work / "registry"), "cache": str(work / "cache"), "labels": "tumour",
    }, env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"})})
    srv.start()
    srv.studies, srv.work = studies, work
    yield srv
    srv.stop()


# --- helpers in the page ----------------------------------------------------------------------------------------
_ACTIVE_VP = """const s = window.services; const id = s.viewportGridService.getState().activeViewportId;
  const vp = s.cornerstoneViewportService.getCornerstoneViewport(id);"""

_VIEWPORT_READY = """(study) => { try { %s
  const shown = s.viewportGridService.getState().viewports.get(id).displaySetInstanceUIDs[0];
  const ds = s.displaySetService.getDisplaySetByUID(shown);
  const d = vp && vp.getImageData && vp.getImageData();
  return !!(d && d.dimensions && ds && ds.StudyInstanceUID === study); } catch (e) { return false; } }""" % _ACTIVE_VP

# brings the slice of voxel (i, j, k) into the active (axial) viewport, centred and zoomed; returns its page position
_GOTO_VOXEL = """([i, j, k, zoom]) => { %s
  const d = vp.getImageData(); const w = d.imageData.indexToWorld([i, j, k]); const cam = vp.getCamera();
  const cam2 = {focalPoint: [w[0], w[1], w[2]],
                position: [0, 1, 2].map(a => w[a] + cam.position[a] - cam.focalPoint[a])};
  if (zoom) cam2.parallelScale = cam.parallelScale / zoom;
  vp.setCamera(cam2); vp.render();
  return {dims: d.dimensions, viewportId: id}; }""" % _ACTIVE_VP

_VOXEL_ON_PAGE = """([i, j, k]) => { %s
  const w = vp.getImageData().imageData.indexToWorld([i, j, k]); const c = vp.worldToCanvas(w);
  const r = vp.canvas.getBoundingClientRect();
  return {x: r.left + c[0], y: r.top + c[1], box: [r.left, r.top, r.width, r.height]}; }""" % _ACTIVE_VP

# one slice of segmentation '1' (the panel's labelmap), base64, plus the labelled voxels of every slice
_LABELMAP = """(k) => { const v = window.services.segmentationService.getLabelmapVolume('1');
  if (!v) return null; const a = v.voxelManager.getCompleteScalarDataArray(); const [nx, ny, nz] = v.dimensions;
  const per = [];
  for (let z = 0; z < nz; z++) { let c = 0; for (let q = z * nx * ny; q < (z + 1) * nx * ny; q++) if (a[q]) c++;
                                 per.push(c); }
  let bin = ''; for (let q = k * nx * ny; q < (k + 1) * nx * ny; q++) bin += String.fromCharCode(a[q] ? 1 : 0);
  return {dims: v.dimensions, per: per, slice: btoa(bin)}; }"""


def _labelmap(page, k: int):
    r = page.evaluate(_LABELMAP, k)
    assert r is not None, "no labelmap volume '1' in the page (the panel makes it when it connects)"
    nx, ny, _ = r["dims"]
    sl = np.frombuffer(base64.b64decode(r["slice"]), np.uint8).reshape(ny, nx).T  # → [i, j]
    return sl > 0, r["per"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def _replay(srv, series: str, params: dict, k: int, tmp: Path) -> np.ndarray:
    """The request the browser sent, replayed over HTTP (as tests/test_app_e2e.py's client does): slice k, [i, j]."""
    import nrrd

    r = requests.post(f"{srv.url}/infer/casam", params={"image": series, "output": "image"},
                      files={"params": (None, json.dumps(params))}, timeout=300)
    assert r.status_code == 200, r.text[:500]
    path = tmp / f"replay-{time.time_ns()}.nrrd"
    path.write_bytes(r.content)
    data, _ = nrrd.read(str(path), index_order="F")  # the file's order, first axis fastest (what OHIF copies)
    return data[:, :, k] > 0


def _sent_params(request) -> dict:
    """The ``params`` field of the multipart form the panel posted to /infer."""
    body = request.post_data_buffer or b""
    start = body.index(b'name="params"') + len(b'name="params"')
    part = body[start:].split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    return json.loads(part)


class Artefacts:
    """Console messages, screenshots and the server's log, kept in a folder the failure message names."""

    def __init__(self, folder: Path, srv):
        self.folder, self.srv = folder, srv
        self.console, self.page_errors, self.shots = [], [], {}
        folder.mkdir(parents=True, exist_ok=True)

    def watch(self, page) -> None:
        page.on("console", lambda m: self.console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("requestfailed", lambda r: self.console.append(f"[requestfailed] {r.method} {r.url} {r.failure}"))
        page.on("response", lambda r: self.console.append(f"[http {r.status}] {r.request.method} {r.url}")
                if r.status >= 400 else None)

    def errors(self):
        return [c for c in self.console if c.startswith("[error]") and not any(k in c for k in KNOWN_CONSOLE_ERRORS)]

    def shot(self, page, name: str, clip=None) -> Path:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), clip=clip)
        self.shots[name] = path
        return path

    @contextlib.contextmanager
    def kept_on_failure(self, page):
        try:
            yield
        except BaseException as e:
            with contextlib.suppress(Exception):
                self.shot(page, "failure")
            errors = ["[pageerror] " + p for p in self.page_errors]
            (self.folder / "console.log").write_text("\n".join(self.console + errors))
            (self.folder / "server.log").write_text(self.srv.log_tail(200_000))
            raise AssertionError(f"{e}\n-- browser console, screenshot and server log kept in {self.folder}") from e


def _open_study(page, srv, study: str, navigate: bool = True) -> None:
    """Opens the study in MONAI Label's OHIF mode, waits for the drawn series, connects the panel to the server."""
    if navigate:
        page.goto(f"{srv.url}/ohif/monai-label?StudyInstanceUIDs={study}")
    page.wait_for_function(_VIEWPORT_READY, arg=study, timeout=120_000)
    for _ in range(60):  # the axial viewport has drawn the series (software WebGL2): not a black canvas
        box = page.evaluate(_VOXEL_ON_PAGE, [0, 0, 0])["box"]
        png = page.screenshot(clip={"x": box[0], "y": box[1], "width": box[2], "height": box[3]})
        if _brightness(png) > 3:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the axial viewport stayed black: WebGL2 did not draw the series")
    banner = page.get_by_role("button", name="Confirm and Hide")  # OHIF's "investigational use" banner
    if banner.count():
        banner.first.click()
    page.fill("#monailabelServerURL", srv.url + "/")
    page.locator("#monailabelServerURL").blur()
    with page.expect_response(lambda r: r.url.rstrip("/").endswith("/info") and r.request.method == "GET") as info:
        page.locator("table.settingsTable button.actionButton").click()  # the connect button beside the URL
    assert info.value.status == 200
    page.wait_for_selector("label[for=tab-3]", timeout=30_000)


def _brightness(png: bytes) -> float:
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L")).mean())


def _run_point_prompts(page, k: int):
    with page.expect_request(lambda r: "/infer/casam" in r.url and r.method == "POST") as req, \
            page.expect_response(lambda r: "/infer/casam" in r.url, timeout=240_000) as resp:
        page.click("button[title='Run PointPrompts']")
    assert resp.value.status == 200, resp.value.text()[:500]
    params = _sent_params(req.value)
    # the panel writes the answer into the labelmap after the response: wait for the slice to change
    page.wait_for_function("(k) => !!window.services.segmentationService.getLabelmapVolume('1')", arg=k)
    time.sleep(1.0)
    return params


def _near(sent, wanted) -> bool:
    """The panel sent the voxels clicked: same slice, at most one voxel off in-plane (a mouse pixel is not a voxel)."""
    return len(sent) == len(wanted) and all(
        p[2] == q[2] and abs(p[0] - q[0]) <= 1 and abs(p[1] - q[1]) <= 1 for p, q in zip(sent, wanted))


_PROBES = """() => { const st = window.cornerstoneTools.annotation.state;
  return st.getAllAnnotations().filter(a => a.metadata && a.metadata.toolName === 'ProbeMONAILabel').length; }"""


def _click_voxel(page, i: int, j: int, k: int) -> None:
    """Clicks voxel (i, j, k) in the axial viewport with the panel's probe; once more if no point was placed."""
    for _ in range(3):
        before = page.evaluate(_PROBES)
        at = page.evaluate(_VOXEL_ON_PAGE, [i, j, k])
        page.mouse.move(at["x"], at["y"])
        time.sleep(0.2)
        page.mouse.down()
        page.mouse.up()
        for _ in range(20):
            if page.evaluate(_PROBES) > before:
                return
            time.sleep(0.1)
    raise AssertionError(f"clicking voxel {(i, j, k)} placed no point (ProbeMONAILabel) in the viewport")


def _row(page, name: str):
    return page.locator("#tab-3 ~ .tab-content tr.clickable-row", has_text=name)


# --- the test ---------------------------------------------------------------------------------------------------
def test_ohif_point_prompts_next_sample_and_training(browser, stack, tmp_path):
    srv = stack
    t_start = time.time()
    # the server offers the first study (Active Learning, random before any layer), as the panel's Next Sample does
    r = requests.post(f"{srv.url}/activelearning/random", json={}, timeout=120)
    assert r.status_code == 200, r.text
    first = r.json()
    study = first["StudyInstanceUID"]
    assert study in srv.studies, first
    case, series = srv.studies[study]["case"], srv.studies[study]["series"]
    gt_vol, k = _label_slice_index(case)
    gt = gt_vol[:, :, k]
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(gt)
    fi, fj = (int(v) for v in np.unravel_index(np.argmax(inside), gt.shape))  # deepest voxel of the tumour

    art = Artefacts(tmp_path / "artefacts", srv)
    page = browser.new_page(viewport=VIEWPORT)
    art.watch(page)
    page.on("dialog", lambda d: d.accept())  # Next Sample's "This action will reload current page" confirm
    results = {"webgl": browser.casam_webgl, "chromium": browser.version, "case": case, "slice": k}
    with art.kept_on_failure(page):
        # 1. open, wait for the drawn viewports, connect
        t0 = time.time()
        _open_study(page, srv, study)
        results["open_connect_s"] = round(time.time() - t0, 1)

        # 2. Point Prompts: casam (a deepgrow model) is offered; the tumour row; a click on the tumour; Run
        page.click("label[for=tab-3]")
        select = page.locator("#tab-3 ~ .tab-content select.selectBox")
        assert [o.strip() for o in select.locator("option").all_inner_texts()] == ["casam"]
        select.select_option("casam")
        _row(page, "tumour").click()
        page.evaluate(_GOTO_VOXEL, [fi, fj, k, 1.8])
        time.sleep(0.5)
        vbox = page.evaluate(_VOXEL_ON_PAGE, [fi, fj, k])["box"]
        clip = {"x": vbox[0], "y": vbox[1], "width": vbox[2], "height": vbox[3]}
        art.shot(page, "1_slice", clip)
        _click_voxel(page, fi, fj, k)
        art.shot(page, "2_click", clip)
        t0 = time.time()
        params = _run_point_prompts(page, k)
        results["first_click_s"] = round(time.time() - t0, 1)
        # the panel sent the clicked voxel, in the volume's (i, j, k) = the series' column, row, slice
        assert _near(params["foreground"], [[fi, fj, k]]) and params["background"] == [], params
        fi, fj = params["foreground"][0][:2]  # the voxel the page chose for the mouse's pixel
        assert params["result_extension"] == ".nrrd"
        mask, per_slice = _labelmap(page, k)
        art.shot(page, "3_mask", clip)
        art.shot(page, "ohif_casam_mr")
        assert mask[fi, fj], "the clicked voxel is not in the mask OHIF shows"
        replayed = _replay(srv, series, params, k, tmp_path)
        results["dice_browser"], results["dice_replay"] = _dice(mask, gt), _dice(replayed, gt)
        results["slices_with_mask"] = int(sum(1 for c in per_slice if c))
        assert results["dice_browser"] >= results["dice_replay"] - DICE_TOLERANCE, results
        assert results["dice_browser"] > 0.5, results  # it is the tumour, not the brain

        # 3. a background click inside the mask but away from the tumour (or, where the mask holds none of that,
        #    on the mask's voxel farthest from the first click): the mask shrinks and leaves that voxel out
        spill = mask & ~gt
        if spill.any():  # the deepest voxel of the spill
            bi, bj = (int(v) for v in np.unravel_index(np.argmax(ndimage.distance_transform_edt(spill)), spill.shape))
        else:
            ii, jj = np.nonzero(mask)
            far = int(np.argmax((ii - fi) ** 2 + (jj - fj) ** 2))
            bi, bj = int(ii[far]), int(jj[far])
        _row(page, "background").click()
        time.sleep(0.5)
        _click_voxel(page, bi, bj, k)
        art.shot(page, "4_background_click", clip)
        _row(page, "tumour").click()  # back to the tumour: the panel sends both rows' clicks
        time.sleep(0.5)
        params2 = _run_point_prompts(page, k)
        assert params2["foreground"] == [[fi, fj, k]] and _near(params2["background"], [[bi, bj, k]]), params2
        bi, bj = params2["background"][0][:2]
        mask2, _ = _labelmap(page, k)
        art.shot(page, "5_shrunk", clip)
        results["area_before"], results["area_after"] = int(mask.sum()), int(mask2.sum())
        results["dice_after_background"] = _dice(mask2, gt)
        assert mask2[fi, fj] and not mask2[bi, bj], results
        assert mask2.sum() < mask.sum(), results

        # 4. Active Learning: Next Sample offers the other study (the first one was offered seconds ago), OK opens it
        page.click("label[for=tab-1]")
        with page.expect_response(lambda r: "/activelearning/random" in r.url) as nxt:
            page.get_by_role("button", name="Next Sample").click()
        offered = nxt.value.json()
        other = offered["StudyInstanceUID"]
        assert other != study and other in srv.studies, offered
        page.locator(".nextSampleForm button.actionButton").click()  # OK (then the page's confirm, accepted)
        page.wait_for_url(lambda u: u.endswith(f"StudyInstanceUIDs={other}"), timeout=60_000)
        _open_study(page, srv, other, navigate=False)

        # 5. Update Model starts a training, Stop Training stops it
        page.click("label[for=tab-1]")
        update = page.get_by_role("button", name="Update Model")
        with page.expect_response(lambda r: r.url.rstrip("/").endswith("/train") and r.request.method == "POST") as run:
            update.click()
        assert run.value.status == 200, run.value.text()
        stop = page.get_by_role("button", name="Stop Training")
        stop.wait_for(timeout=30_000)
        running = requests.get(f"{srv.url}/train/", params={"check_if_running": "true"}, timeout=30)
        assert running.status_code == 200 and running.json().get("status") == "RUNNING", running.text
        def train_delete(r):
            return r.url.rstrip("/").endswith("/train") and r.request.method == "DELETE"

        with page.expect_response(train_delete) as halt:
            stop.click()
        assert halt.value.status == 200, halt.value.text()
        page.get_by_role("button", name="Update Model").wait_for(timeout=30_000)
        deadline = time.time() + 60
        while time.time() < deadline:
            last = requests.get(f"{srv.url}/train/", timeout=30).json()
            if last.get("status") != "RUNNING":
                break
            time.sleep(1)
        assert last.get("status") == "STOPPED", last
        assert not art.page_errors, art.page_errors
        # every request to the server answered (MONAI Label's own 404 of the training status before any training aside)
        failed = [c for c in art.console if c.startswith(("[requestfailed]", "[http ")) and srv.url in c
                  and "check_if_running" not in c]
        assert not failed, failed
    results["console_errors"] = art.errors()
    results["failed_requests"] = sorted({c for c in art.console if c.startswith(("[requestfailed]", "[http "))})
    # MONAI Label 0.8.5's /ohif/ route turns "/" into os.pathsep; the app serves the viewer's nested files itself
    icon = requests.get(f"{srv.url}/ohif/assets/favicon-32x32.png", timeout=30)
    results["nested_asset_type"] = icon.headers.get("content-type")
    assert icon.status_code == 200 and "image/png" in results["nested_asset_type"], results["nested_asset_type"]
    assert icon.content.startswith(b"\x89PNG"), icon.content[:40]
    results["wall_s"] = round(time.time() - t_start, 1)
    print("\nOHIF browser:", json.dumps(results))
    (art.folder / "results.json").write_text(json.dumps(results, indent=1))
    if os.environ.get("CASAM_OHIF_PICTURES"):
        _pictures(art)


def _pictures(art: Artefacts) -> None:
    """docs/images/ohif_casam_mr.png (the viewer with casam's answer), ohif_click_to_mask.png / .gif (round trip)."""
    from PIL import Image, ImageDraw

    def small(img: Image.Image) -> Image.Image:
        return img.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)

    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    full = Image.open(art.shots["ohif_casam_mr"])
    three_quarters = full.resize((full.width * 3 // 4, full.height * 3 // 4), Image.LANCZOS)
    small(three_quarters).save(DOCS_IMAGES / "ohif_casam_mr.png", optimize=True)
    names = [("1_slice", "the slice"), ("2_click", "1 click on the tumour"), ("3_mask", "casam's mask"),
             ("4_background_click", "+ 1 background click"), ("5_shrunk", "the mask shrinks")]
    frames = []
    for key, caption in names:
        img = Image.open(art.shots[key]).convert("RGB")
        w, h = img.size
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        img = img.resize((240, 240), Image.LANCZOS)
        canvas = Image.new("RGB", (240, 262), (0, 0, 0))
        canvas.paste(img, (0, 22))
        ImageDraw.Draw(canvas).text((6, 5), caption, fill=(230, 230, 230))
        frames.append(canvas)
    strip = Image.new("RGB", (240 * len(frames) + 4 * (len(frames) - 1), 262), (40, 40, 40))
    for n, f in enumerate(frames):
        strip.paste(f, (n * 244, 0))
    small(strip).save(DOCS_IMAGES / "ohif_click_to_mask.png", optimize=True)
    gif = [small(f) for f in frames]
    gif[0].save(DOCS_IMAGES / "ohif_click_to_mask.gif", save_all=True, append_images=gif[1:], duration=1200, loop=0)
