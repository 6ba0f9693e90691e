"""An hour of clinicians through the real server: annotators clicking, correcting and saving labels of two
institutions while the app trains by itself.

The real MONAI Label server (``start_server --app apps/casam``, :class:`casam.evaluation.server.MonaiLabelServer`)
on a studies folder built in a temporary folder from ../shared/data: brain MRI slices of one institution
(``brain_mri_lgg``, TCGA_DU) and dermoscopy pictures of another (``dermoscopy_ph2``, Hospital Pedro Hispano).
``--annotators`` threads (default 4; half on each institution), each through MONAI Label's own client
(``monailabel.client.MONAILabelClient``), do what a clinician in 3D Slicer does: open an image
(``GET /datastore/image``), click (``POST /infer/casam`` with every click of the session so far, foreground and
background points, as Slicer sends them), correct with more clicks, and save the final label
(``PUT /datastore/label``, the reference mask, with the institution and patient). The app trains an institution's
layer by itself after ``train_after_labels`` labels (``--conf train_after_labels 5``) and retrains after
``retrain_after`` more. Clicks are placed from the reference mask (the first inside it, corrections alternately
inside and just outside it), not from the server's answers: the soak measures the server, not the clicks.

Every ``--window-minutes`` (default 10; a third of ``--minutes`` for runs under 30 minutes) the report gives the
requests by status, click latency p50/p95, the server's RSS (its process and children), trainings started and
finished, and the layers served. Targets: 0 × 5xx, click p95 of the last window within 1.5× the first, RSS growth
after the first window < 10 %, every saved label present at the end (byte for byte). Partial results are written
every ``--flush-minutes`` (default 2) to ``benchmarks/results/soak.{json,md,png}`` (``--out``).

Usage::

    python benchmarks/soak.py                       # 60 minutes, LiteMedSAM (real weights), 4 annotators
    python benchmarks/soak.py --minutes 3 --backbone tiny   # a smoke test
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]  # the checkout: its apps/casam is the app the soak serves
DATA = Path(os.environ.get("CASAM_DATA") or REPO.parent / "shared" / "data").expanduser()
SOURCES = (("brain_mri_lgg", "TCGA_DU"), ("dermoscopy_ph2", "Hospital Pedro Hispano"))


def build_studies(folder: Path, per_institution: int, seed: int) -> List[Dict[str, Any]]:
    """Copies ``per_institution`` annotated pictures of each source into ``folder``; returns one case per image."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for task, institution in SOURCES:
        with open(DATA / task / "meta.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["institution"] == institution and r.get("classes_present") != "0"]
        rng.shuffle(rows)
        for r in rows[:per_institution]:
            src = DATA / task / "images" / f"{r['case']}.png"
            mask = DATA / task / "masks" / f"{r['case']}.png"
            if not src.exists() or not mask.exists():
                continue
            image_id = f"{task.split('_')[0]}_{r['case']}"
            shutil.copy(src, folder / f"{image_id}.png")
            cases.append({"id": image_id, "mask": str(mask), "institution": institution, "patient": r["patient"]})
    return cases


class Recorder:
    """Every request's time, kind, status and latency; the server's samples; thread-safe."""

    def __init__(self):
        self.t0 = time.time()
        self.lock = threading.Lock()
        self.requests: List[Dict[str, Any]] = []
        self.samples: List[Dict[str, Any]] = []
        self.saved: Dict[str, str] = {}  # image id → sha256 of the label last saved (200)
        self.errors: List[str] = []

    def add(self, kind: str, status: int, seconds: float, note: str = "") -> None:
        with self.lock:
            self.requests.append({"t": round(time.time() - self.t0, 2), "kind": kind, "status": status,
                                  "s": round(seconds, 4)})
            if (status >= 500 or status == 0) and len(self.errors) < 50:
                self.errors.append(f"{kind} {status}: {note[:300]}")


def _status_of(e: Exception) -> int:
    code = getattr(e, "status_code", None)
    return int(code) if isinstance(code, int) else 0


def _points(mask: np.ndarray, rng: np.random.Generator, n: int):
    """``n`` clicks from the reference mask: the first inside, then alternately inside and just outside it."""
    ys, xs = np.nonzero(mask)
    fg, bg = [], []
    cy, cx = int(np.median(ys)), int(np.median(xs))
    fg.append([cx, cy] if mask[cy, cx] else [int(xs[len(xs) // 2]), int(ys[len(ys) // 2])])
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = mask.shape
    for k in range(1, n):
        if k % 2 == 1:
            i = int(rng.integers(len(ys)))
            fg.append([int(xs[i]), int(ys[i])])
        else:
            for _ in range(20):
                x = int(np.clip(rng.integers(x0 - 8, x1 + 9), 0, w - 1))
                y = int(np.clip(rng.integers(y0 - 8, y1 + 9), 0, h - 1))
                if not mask[y, x]:
                    bg.append([x, y])
                    break
        yield [list(p) for p in fg], [list(p) for p in bg]


def annotator(k: int, url: str, cases: List[Dict[str, Any]], rec: Recorder, stop: threading.Event,
              tmp: Path, think_s: float, seed: int) -> None:
    """One clinician: opens an image of their institution, clicks 3–6 times, saves the label; again until stop."""
    import requests
    from monailabel.client import MONAILabelClient
    from PIL import Image

    client = MONAILabelClient(url, tmpdir=str(tmp / f"client{k}"), client_id=f"annotator{k}")
    (tmp / f"client{k}").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + k)
    mine = [c for c in cases if c["institution"] == SOURCES[k % len(SOURCES)][1]]
    while not stop.is_set():
        case = mine[int(rng.integers(len(mine)))]
        t = time.time()
        try:
            r = requests.get(f"{url}/datastore/image", params={"image": case["id"]}, timeout=300)
            rec.add("open", r.status_code, time.time() - t, r.text[:200] if r.status_code >= 400 else "")
        except requests.RequestException as e:
            rec.add("open", 0, time.time() - t, str(e))
        mask = (np.asarray(Image.open(case["mask"]).convert("L")) > 0).astype(np.uint8)
        for fg, bg in _points(mask, rng, int(rng.integers(3, 7))):
            if stop.is_set():
                return
            stop.wait(think_s * rng.uniform(0.5, 1.5))
            t = time.time()
            try:
                out, _ = client.infer("casam", case["id"], {"foreground": fg, "background": bg})
                rec.add("click", 200, time.time() - t)
                if out and os.path.exists(out):
                    os.unlink(out)
            except Exception as e:  # MONAILabelClientException (with its HTTP status) or a connection error
                rec.add("click", _status_of(e), time.time() - t, str(e))
        label = tmp / f"client{k}" / f"{case['id']}.png"
        Image.fromarray(mask).save(label)
        digest = hashlib.sha256(label.read_bytes()).hexdigest()
        t = time.time()
        try:
            client.save_label(case["id"], str(label), tag="final",
                              params={"institution": case["institution"], "patient": case["patient"]})
            rec.add("save_label", 200, time.time() - t)
            with rec.lock:
                rec.saved[case["id"]] = digest
        except Exception as e:
            rec.add("save_label", _status_of(e), time.time() - t, str(e))


def sampler(srv: Any, rec: Recorder, stop: threading.Event, period: float = 10.0) -> None:
    """Every ``period`` s: the server's RSS (process and children), its layers and its training status."""
    import psutil
    import requests

    proc = psutil.Process(srv.proc.pid)
    seen_trainings = set()
    while not stop.wait(period):
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True)
                                               if "monailabel.interfaces.utils.app" not in " ".join(c.cmdline()))
            train_rss = sum(c.memory_info().rss for c in proc.children(recursive=True)
                            if "monailabel.interfaces.utils.app" in " ".join(c.cmdline()))
        except psutil.Error:
            rss = train_rss = 0
        sample = {"t": round(time.time() - rec.t0, 1), "rss_mb": round(rss / 2**20, 1),
                  "train_rss_mb": round(train_rss / 2**20, 1)}
        try:
            info = requests.get(f"{srv.url}/info/", timeout=60).json()
            stats = info.get("train_stats", {}).get("casam", {})
            training = stats.get("training") or {}
            sample.update(layers=len(info.get("layers", [])),
                          active=[i["name"] for i in info.get("layers", []) if i.get("active")],
                          refused=len(info.get("refused_layers", [])), training=training.get("state"),
                          stage=training.get("stage"))
            if training.get("started"):
                seen_trainings.add((training.get("started"), training.get("state") in ("done", "stopped",
                                                                                        "failed", "killed")))
        except Exception as e:  # noqa: BLE001 - recorded, the soak goes on
            sample["info_error"] = str(e)[:200]
        started = {s for s, _ in seen_trainings}
        finished = {s for s, done in seen_trainings if done}
        sample.update(trainings_started=len(started), trainings_finished=len(finished))
        with rec.lock:
            rec.samples.append(sample)


def _pct(values: List[float], q: float) -> Optional[float]:
    return round(float(np.percentile(values, q)), 3) if values else None


def summarise(rec: Recorder, window_s: float, final: bool, end_check: Optional[Dict[str, Any]] = None,
              meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    with rec.lock:
        reqs, samples = list(rec.requests), list(rec.samples)
    elapsed = time.time() - rec.t0
    # whole windows; the last one also takes what is left (the requests that end after the soak's time)
    n_windows = max(1, int(elapsed // window_s) if final else int(np.ceil(elapsed / window_s)))
    windows = []
    for w in range(n_windows):
        a, b = w * window_s, ((w + 1) * window_s if w < n_windows - 1 else float("inf"))
        rs = [r for r in reqs if a <= r["t"] < b]
        clicks = [r["s"] for r in rs if r["kind"] == "click" and r["status"] == 200]
        ss = [s for s in samples if a <= s["t"] < b]
        by_status: Dict[str, int] = {}
        for r in rs:
            by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
        windows.append({"from_min": round(a / 60, 1), "to_min": round(min(b, elapsed) / 60, 1),
                        "requests": len(rs), "by_status": by_status, "clicks": len(clicks),
                        "click_p50_s": _pct(clicks, 50), "click_p95_s": _pct(clicks, 95),
                        "labels_saved": sum(1 for r in rs if r["kind"] == "save_label" and r["status"] == 200),
                        "rss_mb_max": max((s["rss_mb"] for s in ss), default=None),
                        "rss_mb_last": ss[-1]["rss_mb"] if ss else None,
                        "layers": ss[-1].get("layers") if ss else None,
                        "trainings_started": ss[-1].get("trainings_started") if ss else None,
                        "trainings_finished": ss[-1].get("trainings_finished") if ss else None})
    by_status: Dict[str, int] = {}
    for r in reqs:
        by_status[f"{r['kind']} {r['status']}"] = by_status.get(f"{r['kind']} {r['status']}", 0) + 1
    n5xx = sum(1 for r in reqs if r["status"] >= 500 or r["status"] == 0)
    full = [w for w in windows if w["clicks"]]
    first, last = (full[0], full[-1]) if full else (None, None)
    p95_ratio = (round(last["click_p95_s"] / first["click_p95_s"], 3)
                 if first and last and first is not last and first["click_p95_s"] else None)
    after = [s["rss_mb"] for s in samples if s["t"] >= window_s and s["rss_mb"]]
    warm = [s["rss_mb"] for s in samples if s["t"] < window_s and s["rss_mb"]]
    base = warm[-1] if warm else (after[0] if after else None)
    rss_growth = round((max(after) - base) / base * 100, 2) if base and after else None
    targets = {"no_5xx": n5xx == 0,
               "p95_last_within_1.5x_first": None if p95_ratio is None else p95_ratio <= 1.5,
               "rss_growth_after_warmup_below_10pct": None if rss_growth is None else rss_growth < 10,
               "every_saved_label_present": None if end_check is None else end_check["missing"] == []}
    return {"final": final, "elapsed_min": round(elapsed / 60, 2), "window_min": round(window_s / 60, 2),
            **(meta or {}), "requests": len(reqs), "by_kind_status": by_status, "n_5xx_or_no_answer": n5xx,
            "click_p95_ratio_last_first": p95_ratio, "rss_warm_mb": base, "rss_growth_after_warmup_pct": rss_growth,
            "targets": targets, "windows": windows, "end_check": end_check, "errors": rec.errors[:20],
            "samples": samples}


def write(report: Dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out.with_suffix(".json"))
    t = report["targets"]
    yes = lambda v: "n/a" if v is None else ("yes" if v else "**NO**")  # noqa: E731
    lines = [f"# Soak: {report['elapsed_min']} min of {report.get('annotators')} annotators "
             f"({'final' if report['final'] else 'partial'})", "",
             f"Backbone `{report.get('backbone')}`, {report.get('images')} images of two institutions, server conf "
             f"`{report.get('conf')}`; started {report.get('started')}; {report.get('machine', '')}.", "",
             "| target | met |", "|---|---|",
             f"| 0 × 5xx (or no answer): {report['n_5xx_or_no_answer']} | {yes(t['no_5xx'])} |",
             f"| click p95 last window / first: {report['click_p95_ratio_last_first']} ≤ 1.5 | "
             f"{yes(t['p95_last_within_1.5x_first'])} |",
             f"| server RSS growth after warm-up: {report['rss_growth_after_warmup_pct']} % < 10 % | "
             f"{yes(t['rss_growth_after_warmup_below_10pct'])} |",
             f"| every saved label present at the end | {yes(t['every_saved_label_present'])} |", "",
             f"Requests by kind and status: {report['by_kind_status']}", "",
             "| minutes | requests | by status | clicks | click p50 s | click p95 s | labels saved | RSS MB (max) | "
             "layers | trainings started / finished |", "|---|---|---|---|---|---|---|---|---|---|"]
    for w in report["windows"]:
        lines.append(f"| {w['from_min']}–{w['to_min']} | {w['requests']} | {w['by_status']} | {w['clicks']} | "
                     f"{w['click_p50_s']} | {w['click_p95_s']} | {w['labels_saved']} | {w['rss_mb_max']} | "
                     f"{w['layers']} | {w['trainings_started']} / {w['trainings_finished']} |")
    if report["errors"]:
        lines += ["", "Errors (first ones):", ""] + [f"- `{e}`" for e in report["errors"]]
    if report.get("end_check"):
        lines += ["", f"End check: {report['end_check']['checked']} saved labels checked, missing or changed: "
                      f"{report['end_check']['missing']}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(report, out.with_suffix(".png"))


def plot(report: Dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    s = report["samples"]
    w = report["windows"]
    fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    mids = [(x["from_min"] + x["to_min"]) / 2 for x in w]
    ax[0].plot(mids, [x["click_p50_s"] for x in w], "o-", label="click p50")
    ax[0].plot(mids, [x["click_p95_s"] for x in w], "s-", label="click p95")
    ax[0].set_ylabel("seconds")
    ax[0].legend()
    ax[1].plot([x["t"] / 60 for x in s], [x["rss_mb"] for x in s], label="server RSS")
    ax[1].plot([x["t"] / 60 for x in s], [x.get("train_rss_mb", 0) for x in s], label="training process RSS")
    ax[1].set_ylabel("MB")
    ax[1].legend()
    ax[2].step([x["t"] / 60 for x in s], [x.get("layers") or 0 for x in s], where="post", label="layers")
    ax[2].step([x["t"] / 60 for x in s], [x.get("trainings_finished") or 0 for x in s], where="post",
               label="trainings finished")
    ax[2].set_xlabel("minutes")
    ax[2].legend()
    fig.suptitle(f"soak: {report['annotators']} annotators, {report['backbone']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def end_check(url: str, saved: Dict[str, str]) -> Dict[str, Any]:
    """Every label saved (200) is in the datastore, the bytes last saved."""
    import requests

    missing = []
    for image_id, digest in sorted(saved.items()):
        r = requests.get(f"{url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=120)
        if r.status_code != 200 or hashlib.sha256(r.content).hexdigest() != digest:
            missing.append(image_id)
    return {"checked": len(saved), "missing": missing}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--backbone", default="litemedsam")
    ap.add_argument("--annotators", type=int, default=4)
    ap.add_argument("--images", type=int, default=24, help="images per institution")
    ap.add_argument("--think-s", type=float, default=2.0, help="mean seconds an annotator takes between clicks")
    ap.add_argument("--window-minutes", type=float, default=None)
    ap.add_argument("--flush-minutes", type=float, default=2.0)
    ap.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                    help="more --conf options of the server (default: train_after_labels=5, retrain_after=10, "
                         "epochs=4, max_train_minutes=10, head_steps: the app's)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="kept (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    from casam.evaluation.server import MonaiLabelServer
    from casam.training.config import HEAD_STEPS

    window_s = 60 * (args.window_minutes or (10.0 if args.minutes >= 30 else max(args.minutes / 3, 0.5)))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="casam-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = build_studies(work / "studies", args.images, args.seed)
    conf = {"backbone": args.backbone, "registry": str(work / "registry"), "cache": str(work / "cache"),
            "labels": "lesion", "train_after_labels": "5", "retrain_after": "10", "epochs": "4",
            "max_train_minutes": "10", "head_steps": str(HEAD_STEPS)}
    for kv in args.conf:
        k, _, v = kv.partition("=")
        conf[k.strip()] = v.strip()
    srv = MonaiLabelServer(str(work / "studies"), work / "server", REPO / "apps" / "casam", conf=conf)
    import platform

    import psutil

    meta = {"backbone": args.backbone, "annotators": args.annotators, "images": len(cases),
            "conf": {k: v for k, v in srv.conf.items() if k not in ("registry", "cache")},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "think_s": args.think_s,
            "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs (shared), "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB"}
    print(f"soak: {len(cases)} images, server {srv.url}, workdir {work}", flush=True)
    srv.start(timeout=900)
    rec = Recorder()
    stop = threading.Event()
    threads = [threading.Thread(target=sampler, args=(srv, rec, stop), daemon=True)]
    threads += [threading.Thread(target=annotator, args=(k, srv.url, cases, rec, stop, work / "clients",
                                                         args.think_s, args.seed), daemon=True)
                for k in range(args.annotators)]
    for t in threads:
        t.start()
    end = rec.t0 + args.minutes * 60
    try:
        while time.time() < end:
            time.sleep(min(args.flush_minutes * 60, max(0.0, end - time.time())))
            report = summarise(rec, window_s, False, meta=meta)
            write(report, args.out)
            print(f"soak: {report['elapsed_min']} min, {report['requests']} requests, "
                  f"{report['n_5xx_or_no_answer']} × 5xx, {report['by_kind_status']}", flush=True)
        stop.set()
        for t in threads:
            t.join(600)
        check = end_check(srv.url, rec.saved)
        report = summarise(rec, window_s, True, check, meta=meta)
        with rec.lock:
            report["server_log_errors"] = [ln for ln in srv.log_tail(10**8).splitlines()
                                           if "Traceback" in ln or "[ERROR]" in ln][:30]
        write(report, args.out)
    finally:
        stop.set()
        srv.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report["targets"]), flush=True)
    print(f"soak: wrote {args.out.with_suffix('.md')}", flush=True)
    return 0 if all(v is not False for v in report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
