"""Click latency through the real HTTP server: p50/p95 server-side ``latency_ms`` and client wall
time per scenario, the server's peak memory, machine info; ``benchmarks/results/latency.{json,md}``.

The server is started as the README does (``python -m monailabel.main start_server --app apps/casam --studies
<copy> ...``, via :class:`casam.evaluation.server.MonaiLabelServer`) on a temporary copy of brain-MRI slices
(2D PNG) and of the 38-slice volume ``TCGA_DU_5849_19950405`` (copies under other ids for the first-click
trials), and driven with
``monailabel.client.MONAILabelClient`` with 3D Slicer's request shapes (voxel ``foreground`` / ``background``
points ``[i, j, k]``, ``roi`` ``[i0, i1, j0, j1(, k0, k1)]``); a client opens an image with ``GET
/datastore/image`` as the Slicer plugin downloads it. Scenarios:

* ``2d_click``: a foreground click at the tumour's centre on an open picture (its embedding encoded in the
  background after the download); ``2d_background_click``: then a background click; ``2d_second_click``: then a
  second foreground click beside the first.
* ``volume_first_click``: a click on the tumour's largest slice ``--think`` seconds after the client opened a
  volume (a fresh copy each time), propagated through the volume (Slicer's default) within the server's
  ``click_budget_s``; ``volume_click_again``: the same click ``--think`` seconds later (the propagation reaches
  the slices encoded meanwhile). Both record the slices returned, those pending and the 3D IoU with the truth.
* ``volume_further_click``: further clicks on an open volume (background, then foreground clicks beside the first).
* ``volume_corrective_click``: click sequences on an open volume as interactive benchmarks make them: a first click
  on a tumour pixel of a slice near the largest, then clicks at the centre of the largest error region of that
  slice's mask (:func:`casam.scoring.protocol.next_click`); the clicked slice's IoU is recorded after each click.
* ``roi_volume``: a 3D ROI over the whole 38-slice volume (its box jittered by a few pixels each time), on an
  open volume whose slices were encoded in the background; ``roi_volume_cold``: the same right after opening.
* With ``--registry`` (a layer registry the server serves; copied into the temporary folder, so the benchmark never
  writes to it) also the refinement-head group, on ``--head-pictures`` test images of ``--head-task`` (a task of
  :func:`casam.data.datasets.discover_tasks`, copied as PNG), each opened as above: ``2d_head_box``: the drawn ROI
  (the truth's tight box, Slicer's ``roi`` ``[i0, i1, j0, j1, 0, 0]``) alone; then ``2d_head_corrective_click``:
  ``--head-clicks`` corrective clicks, each at the centre of the largest error of the previous answer
  (:func:`casam.scoring.protocol.next_click`), every click of the session sent again with the ROI as Slicer does.
  Each sample records the IoU with the truth and the layer that answered (``layer_used``: None for plain SAM); the
  notes hold the mean IoU after each step, ``layers`` the layers the server served (``GET /info/``).

Scenario groups (``--only``, a comma list; default all): ``2d`` (``2d_click``, ``2d_background_click``,
``2d_second_click``), ``volume`` (every ``volume_*`` and ``roi_*`` scenario) and ``head`` (the ``2d_head_*``
scenarios; needs ``--registry``). Targets are reported (met / not met) in
the result, never asserted. Run (2-core CPU: ~10 min without ``--registry``)::

    .venv/bin/python benchmarks/latency.py --out benchmarks/results/latency.json

With a registry whose layers carry refinement heads, the head group and the 2D first click only::

    .venv/bin/python benchmarks/latency.py --registry ~/.casam/registry --only 2d,head \\
        --out benchmarks/results/latency_head.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import psutil
import requests

from casam.data.clinical import read_clinical
from casam.data.datasets import discover_tasks, load_cases, spread
from casam.evaluation.server import MonaiLabelServer
from casam.paths import default_data
from casam.scoring.metrics import iou
from casam.scoring.protocol import next_click

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "casam"  # the app the server runs

VOLUME = "TCGA_DU_5849_19950405"
TARGETS = {  # scenario → (statistic, limit ms): the latency targets, judged on the server's p95
    "2d_click": ("p95", 100),
    "volume_further_click": ("p95", 300),
    "volume_corrective_click": ("p95", 300),
    "volume_first_click": ("p95", 1500),
    "roi_volume": ("p95", 10000),
    "roi_volume_cold": ("p95", 10000),
    "2d_head_corrective_click": ("p95", 300),
}
GROUPS = ("2d", "volume", "head")  # --only


class PeakRSS(threading.Thread):
    """Samples the resident memory of a process and its children (sum) every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak, self._halt = pid, period, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                proc = psutil.Process(self.pid)
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            self._halt.wait(self.period)

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        return self.peak


def vm_hwm(pid: int) -> Optional[int]:
    """The kernel's peak resident set (VmHWM) of one process in bytes, or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> Dict[str, Any]:
    """The client machine (here also the server's): :func:`casam.evaluation.provenance.machine_info`, with the allocator
    setting the server gets from this environment (``CASAM_MALLOC_KEEP_MB``, :mod:`casam.runtime`)."""
    from casam.evaluation.provenance import machine_info
    from casam.runtime import malloc_keep_mb, resolve_device

    info = machine_info(resolve_device("auto"))
    info.pop("malloc_tuned", None)  # this client process's, not the server's
    info["server_malloc_keep_mb"] = malloc_keep_mb()
    return info


def summary(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """n, p50/p95/min/max of server and client ms, cached embeddings; per ``kind`` of click where samples have one."""
    out: Dict[str, Any] = {"n": len(samples)}
    for k in ("server_ms", "client_ms"):
        v = np.array([s[k] for s in samples], float)
        out[k] = {
            "p50": round(float(np.percentile(v, 50)), 1),
            "p95": round(float(np.percentile(v, 95)), 1),
            "min": round(float(v.min()), 1),
            "max": round(float(v.max()), 1),
        }
    out["embedding_cached"] = sum(bool(s.get("embedding_cached")) for s in samples)
    for k in ("iou_3d", "iou_slice", "iou"):
        if any(s.get(k) is not None for s in samples):
            out[k] = round(float(np.mean([s[k] for s in samples if s.get(k) is not None])), 4)
    if any("layer_used" in s for s in samples):  # which layer answered (None: plain SAM)
        out["layer_used"] = dict(Counter(str(s.get("layer_used")) for s in samples))
    if any(s.get("pending") for s in samples):
        out["stopped_for_time"] = sum(bool(s.get("pending")) for s in samples)
    kinds = sorted({s["kind"] for s in samples if s.get("kind")})
    if kinds:
        out["by_kind"] = {
            kind: summary([{**s, "kind": None} for s in samples if s.get("kind") == kind]) for kind in kinds
        }
    return out


class Bench:
    """The server, its client and the samples per scenario."""

    def __init__(self, srv: MonaiLabelServer, client_dir: Path):
        from monailabel.client import MONAILabelClient

        self.srv, self.client = srv, MONAILabelClient(srv.url, tmpdir=str(client_dir))
        self.samples: Dict[str, List[Dict[str, float]]] = {}

    def open(self, image_id: str) -> None:
        """The client opens an image as the Slicer plugin downloads it."""
        r = requests.get(f"{self.srv.url}/datastore/image", params={"image": image_id}, timeout=300)
        r.raise_for_status()

    def wait_encoded(self, timeout: float = 600) -> float:
        """Waits until the background encoder is idle; returns the seconds waited."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.srv.info()["cache"]["prefetch"]["idle"]:
                break
            time.sleep(0.25)
        return time.time() - t0

    def click(
        self,
        scenario: str,
        image_id: str,
        params: Dict[str, Any],
        kind: Optional[str] = None,
        truth: Optional[np.ndarray] = None,
        extra: Optional[Dict[str, Any]] = None,
    ) -> Tuple[Dict[str, Any], Optional[np.ndarray]]:
        """One request; with ``truth`` (the volume's), the 3D IoU and the prompted slice's IoU are recorded, with a
        picture's (H×W) its IoU; with ``extra`` (stored in the sample) also the routing's reason, fallback and the
        predicted IoU.

        Returns:
            (result params, the mask read back when ``truth`` is given, else None).
        """
        t0 = time.perf_counter()
        path, result = self.client.infer("casam", image_id, params)
        wall = 1000 * (time.perf_counter() - t0)
        res = json.loads(result) if isinstance(result, str) else result
        mask = read_clinical(path).array > 0 if truth is not None else None
        os.unlink(path)
        sample = {
            "server_ms": res["latency_ms"],
            "client_ms": round(wall, 1),
            "embedding_cached": res["embedding_cached"],
            "slices": res.get("slices"),
            "pending": res.get("pending_slices"),
            "kind": kind,
            "layer": res.get("layer"),  # the router's choice
            "layer_used": res.get("layer_used"),  # the layer that decoded (None: plain SAM)
        }
        if extra is not None:
            sample.update(extra, reason=res.get("reason"), fallback=res.get("fallback"),
                          predicted_iou=res.get("predicted_iou"))
        if mask is not None and truth.ndim == 2:
            mask = mask.reshape(truth.shape)
            sample["iou"] = round(iou(mask, truth), 4)
        elif mask is not None:
            k = res["slice"]
            sample.update(iou_3d=round(iou(mask, truth), 4), iou_slice=round(iou(mask[k], truth[k]), 4))
        self.samples.setdefault(scenario, []).append(sample)
        return res, mask


def centre(mask: np.ndarray) -> Tuple[int, int]:
    """The mask pixel nearest its centroid, as (x, y)."""
    ys, xs = np.nonzero(mask)
    c = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return int(xs[c]), int(ys[c])


def datastore(data: Path, work: Path, n_pictures: int, n_volumes: int) -> Tuple[Path, List[Tuple[str, np.ndarray]]]:
    """A temporary studies folder: brain-MRI slices with a tumour (test split first) and volume copies."""
    studies = work / "studies"
    studies.mkdir(parents=True)
    if n_pictures <= 0 and n_volumes <= 0:
        return studies, []
    task = data / "brain_mri_lgg"
    with open(task / "meta.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: (r["split"] != "test", r["case"]))
    pictures = []
    for r in rows:
        if len(pictures) >= n_pictures:
            break
        mask = read_clinical(task / "masks" / f"{r['case']}.png").array > 0
        if mask.sum() >= 200:
            shutil.copy(task / "images" / f"{r['case']}.png", studies)
            pictures.append((r["case"], mask))
    for i in range(n_volumes):
        shutil.copy(task / "volumes" / f"{VOLUME}_image.nii.gz", studies / f"vol{i:02d}.nii.gz")
    return studies, pictures


def head_pictures(data: Path, studies: Path, task_name: str, n: int) -> List[Tuple[str, np.ndarray]]:
    """``n`` test images of a task (evenly spread over its test split) in the studies folder as PNG, named
    ``head_<case>``, with their truth (foreground = any class).

    Raises:
        SystemExit: no such task, or it has no test image with an object.
    """
    from PIL import Image

    tasks = {t.name: t for t in discover_tasks(data)}
    if task_name not in tasks:
        raise SystemExit(f"--head-task {task_name!r} is not a task of {data}: {', '.join(tasks)}")
    cases = spread(tasks[task_name].split("test"), n)
    images, masks, _ = load_cases(cases)
    out = []
    for case, image, mask in zip(cases, images, masks):
        if not (mask > 0).any():
            continue
        image_id = f"head_{case.case}"
        if case.image.suffix.lower() == ".png":
            shutil.copy(case.image, studies / f"{image_id}.png")
        else:
            Image.fromarray(image).save(studies / f"{image_id}.png")
        out.append((image_id, mask > 0))
    if not out:
        raise SystemExit(f"--head-task {task_name!r} has no test image with an object")
    return out


def registry_heads(root: Path) -> Dict[str, Any]:
    """Per layer folder of a registry: whether its weights hold a refinement head (``head.*``) and the gate's decisions
    stored with it (``extra["use"]``: box, click, corrections)."""
    from safetensors import safe_open

    out = {}
    for d in sorted((root / "layers").glob("*/")):
        try:
            with safe_open(str(d / "layer.safetensors"), "pt") as f:
                head = any(k.startswith("head.") for k in f.keys())
            use = json.loads((d / "meta.json").read_text()).get("extra", {}).get("use")
        except (OSError, ValueError) as e:
            out[d.name] = {"error": str(e)}
            continue
        out[d.name] = {"head": head, "use": use}
    return out


def run_pictures(b: Bench, pictures: List[Tuple[str, np.ndarray]]) -> None:
    for case, mask in pictures:
        b.open(case)
        b.wait_encoded()  # the user looks at the picture
        x, y = centre(mask)
        b.click("2d_click", case, {"foreground": [[x, y]]})
        b.click("2d_background_click", case, {"foreground": [[x, y]], "background": [[3, 3]]})
        ys, xs = np.nonzero(mask)
        j = int(np.argmax(xs))  # a second foreground click towards the tumour's edge
        x2, y2 = (x + int(xs[j])) // 2, (y + int(ys[j])) // 2
        b.click("2d_second_click", case, {"foreground": [[x, y], [x2, y2]], "background": [[3, 3]]})


def run_head(b: Bench, pictures: List[Tuple[str, np.ndarray]], n_clicks: int) -> Dict[str, Any]:
    """On each picture, opened as Slicer does: the truth's tight box alone, then ``n_clicks`` corrective clicks at the
    centre of the previous answer's largest error, each request sending the ROI and every click so far.

    Returns:
        Notes: the mean IoU after each step (box first; an exact mask keeps its IoU) and each picture's curve.
    """
    curves = {}
    for case, truth in pictures:
        b.open(case)
        b.wait_encoded()  # the user looks at the picture
        ys, xs = np.nonzero(truth)
        roi = [int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max()), 0, 0]  # Slicer's [i0, i1, j0, j1, k0, k1]
        res, mask = b.click("2d_head_box", case, {"roi": roi}, truth=truth, extra={"case": case, "step": 0})
        curve = [iou(mask, truth)]
        fg: List[List[int]] = []
        bg: List[List[int]] = []
        for step in range(1, n_clicks + 1):
            nxt = next_click(mask, truth)
            if nxt is None:
                break
            (cx, cy), label = nxt[0][0].astype(int).tolist(), nxt[1]
            kind = "foreground" if label == 1 else "background"
            (fg if label == 1 else bg).append([cx, cy])
            res, mask = b.click(
                "2d_head_corrective_click",
                case,
                {"roi": roi, "foreground": fg, "background": bg},
                kind,
                truth=truth,
                extra={"case": case, "step": step},
            )
            curve.append(iou(mask, truth))
        curves[case] = [round(float(v), 4) for v in curve + [curve[-1]] * (n_clicks + 1 - len(curve))]
    return {
        "head_iou_per_step": [round(float(v), 4) for v in np.mean(list(curves.values()), 0)],
        "head_iou_curves": curves,
    }


def run_corrective(b: Bench, truth: np.ndarray, k: int, n: int, rng: np.random.Generator, per: int = 4) -> List[float]:
    """``n`` corrective clicks on the open volume ``vol00``, in sequences of a first click + ``per`` corrections.

    Returns:
        The clicked slice's mean IoU after each click of a sequence (first click included).
    """
    curves = []
    for s in range(max(1, -(-n // per))):
        kk = int(np.clip(k + (s % 5) - 2, 0, truth.shape[0] - 1))
        if not truth[kk].any():
            kk = k
        ys, xs = np.nonzero(truth[kk])
        j = int(rng.integers(len(xs)))
        fg, bg = [[int(xs[j]), int(ys[j]), kk]], []
        res, mask = b.click("volume_corrective_first", "vol00", {"foreground": fg}, truth=truth)
        curve = [iou(mask[kk], truth[kk])]
        for _ in range(per):
            nxt = next_click(mask[kk], truth[kk])
            if nxt is None:
                break
            (cx, cy), label = nxt[0][0].astype(int).tolist(), nxt[1]
            (fg if label == 1 else bg).append([cx, cy, kk])
            res, mask = b.click(
                "volume_corrective_click",
                "vol00",
                {"foreground": fg, "background": bg},
                "foreground" if label == 1 else "background",
                truth=truth,
            )
            curve.append(iou(mask[kk], truth[kk]))
        curves.append(curve + [curve[-1]] * (per + 1 - len(curve)))
    return [round(float(v), 4) for v in np.mean(curves, 0)]


def run_volumes(
    b: Bench, truth: np.ndarray, n_first: int, think: float, n_further: int, n_roi: int, n_corrective: int = 20
) -> Dict[str, Any]:
    k = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(1)))
    x, y = centre(truth[k])
    ys, xs = np.nonzero(truth[k])
    notes: Dict[str, Any] = {"slice": k, "click": [x, y, k]}
    for i in range(1, n_first + 1):  # vol00 stays for the open-volume scenarios
        b.open(f"vol{i:02d}")
        time.sleep(think)
        b.click("volume_first_click", f"vol{i:02d}", {"foreground": [[x, y, k]]}, truth=truth)
        time.sleep(think)
        b.click("volume_click_again", f"vol{i:02d}", {"foreground": [[x, y, k]]}, truth=truth)
    b.open("vol00")
    b.click("volume_open_first_click", "vol00", {"foreground": [[x, y, k]]})
    notes["background_encode_s"] = round(b.wait_encoded(), 1)
    rng = np.random.default_rng(0)
    fg, bg = [[x, y, k]], []
    for i in range(n_further):
        kind = "background" if i % 2 == 0 else "foreground"
        if kind == "background":  # a background click outside the tumour, near its box
            bg.append(
                [int(np.clip(xs.min() - rng.integers(3, 12), 0, 255)), int(rng.integers(ys.min(), ys.max() + 1)), k]
            )
        else:  # a foreground click inside the tumour
            j = int(rng.integers(len(xs)))
            fg.append([int(xs[j]), int(ys[j]), k])
        b.click("volume_further_click", "vol00", {"foreground": fg, "background": bg}, kind)
    notes["corrective_iou_per_click"] = run_corrective(b, truth, k, n_corrective, rng)
    zs, ys3, xs3 = np.nonzero(truth)
    box = np.array([xs3.min(), xs3.max(), ys3.min(), ys3.max()])
    for i in range(n_roi):
        jit = rng.integers(-3, 4, size=4)
        roi = [int(v) for v in np.clip(box + jit, 0, 255)] + [0, truth.shape[0] - 1]
        b.click("roi_volume", "vol00", {"roi": roi})
    cold = f"vol{n_first + 1:02d}"
    b.open(cold)
    b.click("roi_volume_cold", cold, {"roi": [int(v) for v in box] + [0, truth.shape[0] - 1]})
    return notes


def verdicts(results: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for name, (stat, limit) in TARGETS.items():
        if name in results:
            value = results[name]["server_ms"][stat]
            out[name] = {"target_ms": limit, "statistic": f"server {stat}", "value_ms": value, "met": value <= limit}
    return out


def markdown(report: Dict[str, Any]) -> str:
    m = report["machine"]
    cpu = f"{m['cpu']} ({m['cpu_id']}, {'/'.join(m.get('simd', [])).upper()})" if m.get("cpu_id") else m["cpu"]
    lines = [
        "# Click latency (benchmarks/latency.py)",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {cpu}, server CASAM_MALLOC_KEEP_MB={m.get('server_malloc_keep_mb', '?')}, {m['cores']} cores, torch "
        f"{m['torch']}, GPU: {m.get('gpu') or 'none'}. Load average before / after: "
        f"{report['load_before']} / {report['load_after']}. Server peak RSS (process + children, sampled): "
        f"{report['server_peak_rss_mb']} MiB (VmHWM of the server process: {report['server_vmhwm_mb']} MiB).",
        "",
        "| scenario | n | server p50 ms | server p95 ms | client p50 ms | client p95 ms | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        (n, s)
        for name, sc in report["scenarios"].items()
        for n, s in [(name, sc)] + [(f"{name} ({k})", v) for k, v in sc.get("by_kind", {}).items()]
    ]
    for name, s in rows:
        t = report["targets"].get(name)
        lines.append(
            f"| {name} | {s['n']} | {s['server_ms']['p50']} | {s['server_ms']['p95']} | {s['client_ms']['p50']} | "
            f"{s['client_ms']['p95']} | {'≤ %d ms (%s)' % (t['target_ms'], t['statistic']) if t else ''} | "
            f"{('yes' if t['met'] else 'no') if t else ''} |"
        )
    used = {n: s["layer_used"] for n, s in report["scenarios"].items() if n.startswith("2d_head")}
    if report.get("registry"):
        heads = report["layers"].get("heads", {})
        served = [
            f"{x['name']} (active: {x['active']}, head: {heads.get(x['name'], {}).get('head')})"
            for x in (report["layers"]["served"] or [])
        ]
        lines += ["", f"Registry {report['registry']}: layers {', '.join(served) or 'none'}."]
    if used:
        lines += ["", "Layer that answered (None: plain SAM): " + json.dumps(used)]
    lines += ["", "Notes: " + json.dumps(report["notes"])]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(default_data()))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latency.json"))
    ap.add_argument("--pictures", type=int, default=20, help="2D pictures (one click of each kind on each)")
    ap.add_argument("--first-clicks", type=int, default=20, help="volumes opened and clicked once each")
    ap.add_argument("--think", type=float, default=3.0, help="seconds between opening a volume and the first click")
    ap.add_argument("--further-clicks", type=int, default=20)
    ap.add_argument("--corrective-clicks", type=int, default=20)
    ap.add_argument("--rois", type=int, default=20)
    ap.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="extra --conf for the server"
    )
    ap.add_argument("--registry", default=None, help="layer registry the server serves (a copy); adds the head group")
    ap.add_argument("--head-task", default="retina_vessels_drive", help="task of the head group's test images")
    ap.add_argument("--head-pictures", type=int, default=6, help="test images of --head-task (head group)")
    ap.add_argument("--head-clicks", type=int, default=5, help="corrective clicks after the ROI on each (head group)")
    ap.add_argument(
        "--only", default=None, help=f"comma list of scenario groups to run: {', '.join(GROUPS)} (default: all; "
        "head only with --registry)"
    )
    ap.add_argument("--workdir", default=None, help="temporary folder (default: a new one, removed afterwards)")
    args = ap.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else list(GROUPS)
    if any(g not in GROUPS for g in groups):
        ap.error(f"--only: groups are {', '.join(GROUPS)}")
    if args.registry is None:
        if args.only and "head" in groups:
            ap.error("--only head needs --registry")
        groups = [g for g in groups if g != "head"]
    elif not Path(args.registry).is_dir():
        ap.error(f"--registry {args.registry}: no such folder")
    data = Path(args.data)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="casam-latency-"))
    studies, pictures = datastore(
        data, work, args.pictures if "2d" in groups else 0, args.first_clicks + 2 if "volume" in groups else 0
    )
    truth = read_clinical(data / "brain_mri_lgg" / "volumes" / f"{VOLUME}_label.nii.gz").array > 0
    heads = head_pictures(data, studies, args.head_task, args.head_pictures) if "head" in groups else []
    if args.registry:  # the server writes to its registry (start-up clean-up): never to the user's
        shutil.copytree(args.registry, work / "registry", ignore=shutil.ignore_patterns("*.lock"))
    conf = {
        "backbone": "litemedsam",
        "registry": str(work / "registry"),
        "cache": str(work / "cache"),
        "labels": "tumour",
        **dict(args.conf),
    }
    srv = MonaiLabelServer(str(studies), work / "server", APP, conf=conf)
    (work / "server").mkdir(exist_ok=True)
    load_before = [round(v, 2) for v in os.getloadavg()]
    t0 = time.time()
    srv.start(timeout=600)
    rss = PeakRSS(srv.proc.pid)
    rss.start()
    try:
        b = Bench(srv, work / "client")
        info = srv.info()
        layers = {"served": info.get("layers"), "refused": info.get("refused_layers")}
        if args.registry:
            layers["heads"] = registry_heads(work / "registry")
        notes: Dict[str, Any] = {}
        if "2d" in groups:
            run_pictures(b, pictures)
        if "volume" in groups:
            notes.update(
                run_volumes(
                    b, truth, args.first_clicks, args.think, args.further_clicks, args.rois, args.corrective_clicks
                )
            )
        if "head" in groups:
            notes.update(run_head(b, heads, args.head_clicks))
        notes["caches"] = srv.info()["cache"]["caches"]
        hwm = vm_hwm(srv.proc.pid)
    finally:
        peak = rss.stop()
        srv.stop()
    results = {name: summary(s) for name, s in b.samples.items()}
    report = {
        "command": "python benchmarks/latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "server_command": " ".join(
            ["python -m monailabel.main start_server --app apps/casam --studies <copy>"]
            + [f"--conf {k} {v}" for k, v in conf.items() if k not in ("registry", "cache")]
        ),
        "machine": machine(),
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.time() - t0, 1),
        "server_peak_rss_mb": round(peak / 2**20, 1),
        "server_vmhwm_mb": round(hwm / 2**20, 1) if hwm else None,
        "images": {
            "pictures": [c for c, _ in pictures],
            "volume": f"brain_mri_lgg/volumes/{VOLUME}_image.nii.gz",
            "volume_shape": list(truth.shape),
            "head_task": args.head_task if heads else None,
            "head_pictures": [c for c, _ in heads],
        },
        "groups": groups,
        "registry": str(Path(args.registry).resolve()) if args.registry else None,
        "layers": layers,
        "think_s": args.think,
        "scenarios": results,
        "targets": verdicts(results),
        "notes": notes,
        "samples": b.samples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
