"""The clinician's loop through the real server: annotate, the app trains by itself, the next image is easier.

One arm of the annotation-session benchmark (benchmarks/README.md). The server is started as the README does
(``python -m monailabel.main start_server --app apps/casam --studies <copy>``, via
:class:`casam.evaluation.server.MonaiLabelServer`) on a copy of one task's training images (one institution's),
with an empty registry, and driven with
``monailabel.client.MONAILabelClient``:

1. ``/activelearning/<strategy>`` gives the next image;
2. annotator *box* draws the object's tight box (Slicer's ROI ``[i0, i1, j0, j1]``), then clicks at the centre
   of the largest error region (foreground where the mask misses, background where it spills, the CVPR 2025
   interactive challenge's rule; every click of the image is sent again, as Slicer does) until IoU >= 0.9 or
   ``--clicks`` corrective clicks; annotator *click* does the same from one click at the object's centre;
3. the ground truth is saved as the image's final label with its institution and patient; the app trains its
   next layer by itself after ``train_after_labels`` labels (``--train-after``). The simulated annotator
   waits for a running training before the next image (``--no-wait`` does not), and the seconds waited are
   reported: a person takes longer per image than a training does.

After the session the task's test images (all institutions of the task, or ``--test-institution``) are
uploaded and scored with the tight box and with one centre click. Arms: ``--arm novelty`` (casam +
``casam_novelty``), ``--arm random`` (casam + ``random``), ``--arm plain`` (plain SAM: the server never
trains, ``train_after_labels 0``). Results go to ``<out>.json`` after every image, and a run given the same
``--work`` resumes where it stopped (its registry and labels are in ``--work``). Run, e.g.::

    .venv/bin/python benchmarks/annotation_session.py --task retina_vessels_drive --arm novelty \\
        --out benchmarks/results/annotation_session/vessels_novelty.json --work /tmp/session/vessels_novelty
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from casam.data.clinical import read_clinical
from casam.evaluation.server import MonaiLabelServer
from casam.paths import default_data
from casam.prompts.masks import centroid_point, tight_box
from casam.scoring.metrics import iou
from casam.scoring.protocol import next_click
from casam.training.config import HEAD_STEPS
from latency import machine

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "casam"  # the app the server runs

ARMS = {"novelty": "casam_novelty", "random": "random", "plain": "random"}
TARGETS = (0.8, 0.9)


class Session:
    """The server of one arm, its client and the task's ground truth."""

    def __init__(self, srv: MonaiLabelServer, task: Path, client_dir: Path):
        from monailabel.client import MONAILabelClient

        self.srv, self.task = srv, task
        self.client = MONAILabelClient(srv.url, tmpdir=str(client_dir))

    def truth(self, case: str) -> np.ndarray:
        return read_clinical(self.task / "masks" / f"{case}.png").array > 0

    def infer(self, case: str, params: Dict[str, Any]) -> tuple:
        path, result = self.client.infer("casam", case, params)
        res = json.loads(result) if isinstance(result, str) else result
        mask = read_clinical(path).array > 0
        os.unlink(path)
        return mask, res

    def annotate(self, case: str, first: str, clicks: int) -> Dict[str, Any]:
        """One annotator on one image: the first prompt, then corrective clicks until IoU 0.9 or ``clicks``."""
        truth = self.truth(case)
        fg: List[List[int]] = []
        bg: List[List[int]] = []
        params: Dict[str, Any] = {}
        if first == "box":
            x0, y0, x1, y1 = (int(v) for v in tight_box(truth))
            params["roi"] = [x0, x1, y0, y1]
        else:
            fg.append([int(v) for v in centroid_point(truth)[0]])
        curve, seconds, layers = [], 0.0, []
        for n in range(clicks + 1):
            mask, res = self.infer(case, {**params, "foreground": fg, "background": bg})
            curve.append(round(iou(mask, truth), 4))
            seconds += res.get("latency_ms", 0) / 1000
            layers.append(res.get("layer"))
            if curve[-1] >= TARGETS[-1] or n == clicks:
                break
            nxt = next_click(mask, truth)
            if nxt is None:
                break
            (fg if nxt[1] == 1 else bg).append([int(v) for v in nxt[0][0]])
        to = {f"clicks_to_{t:g}": next((i for i, v in enumerate(curve) if v >= t), None) for t in TARGETS}
        return {"first_iou": curve[0], "curve": curve, **to, "server_s": round(seconds, 2), "layers": layers}

    def training(self) -> Dict[str, Any]:
        return self.srv.info()["train_stats"]["casam"].get("training") or {}

    def wait_training(self, timeout: float = 3600) -> float:
        """Waits while a training starts or runs; returns the seconds waited."""
        t0 = time.time()
        time.sleep(2)  # the autotrainer is woken by the saved label
        while self.training().get("state") in ("starting", "running"):
            if time.time() - t0 > timeout:
                raise RuntimeError(f"training still running after {timeout:.0f} s: {self.training()}")
            time.sleep(2)
        return round(time.time() - t0, 1)


def task_rows(task: Path, split: str, institution: Optional[str]) -> List[Dict[str, str]]:
    with open(task / "meta.csv") as f:
        return [
            r for r in csv.DictReader(f) if r["split"] == split and (not institution or r["institution"] == institution)
        ]


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--task", default="retina_vessels_drive")
    ap.add_argument("--institution", default=None, help="the session's institution (default: the task's first)")
    ap.add_argument("--test-institution", default=None, help="test images of this institution only (default: all)")
    ap.add_argument("--arm", choices=sorted(ARMS), default="novelty")
    ap.add_argument("--max-images", type=int, default=0, help="images annotated (default: all training images)")
    ap.add_argument("--clicks", type=int, default=8, help="corrective clicks at most")
    ap.add_argument("--train-after", type=int, default=5, help="--conf train_after_labels (and min_images)")
    ap.add_argument("--epochs", type=int, default=4, help="--conf epochs (the CPU recipe)")
    ap.add_argument("--head-steps", type=int, default=HEAD_STEPS, help="--conf head_steps (default: the app's)")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a running training before the next image")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="server folder, registry and labels (kept: resumes)")
    args = ap.parse_args(argv)

    task = args.data / args.task
    rows = task_rows(task, "train", None)
    institution = args.institution or rows[0]["institution"]
    rows = [r for r in rows if r["institution"] == institution]
    rows = rows[: args.max_images] if args.max_images else rows
    patients = {r["case"]: r["patient"] for r in rows}
    studies = args.work / "studies"
    if not studies.exists():
        studies.mkdir(parents=True)
        for r in rows:
            shutil.copy(task / "images" / f"{r['case']}.png", studies)
    done: Dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    images: List[Dict[str, Any]] = done.get("images", [])
    conf = {
        "backbone": "litemedsam",
        "registry": str(args.work / "registry"),
        "cache": str(args.work / "cache"),
        "labels": "object",
        "min_images": str(args.train_after),
        "epochs": str(args.epochs),
        "train_after_labels": "0" if args.arm == "plain" else str(args.train_after),
        "train_threads": "0",
        "train_nice": "0",
        "head_steps": str(args.head_steps),
    }
    report: Dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine(),
        "server": "python -m monailabel.main start_server --app apps/casam --studies <copy> "
        + " ".join(f"--conf {k} {v}" for k, v in conf.items() if k not in ("registry", "cache")),
        "task": args.task,
        "institution": institution,
        "arm": args.arm,
        "strategy": ARMS[args.arm],
        "wait_for_training": not args.no_wait,
        "started": done.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
        "images": images,
        "layers": done.get("layers", []),
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))

    srv = MonaiLabelServer(
        str(studies), args.work / f"server-{int(time.time())}", APP, conf=conf, ports=range(8400, 8500)
    )
    with srv:
        s = Session(srv, task, args.work / "client")
        while len(images) < len(rows):
            case = s.client.next_sample(ARMS[args.arm], {}).get("id")
            if not case:
                break
            rec: Dict[str, Any] = {
                "order": len(images) + 1,
                "case": case,
                "layers_served": [i["name"] for i in srv.info().get("layers", [])],
            }
            rec["box"] = s.annotate(case, "box", args.clicks)
            rec["click"] = s.annotate(case, "click", args.clicks)
            s.client.save_label(
                case,
                str(task / "masks" / f"{case}.png"),
                tag="final",
                params={"institution": institution, "patient": patients.get(case, case)},
            )
            rec["waited_for_training_s"] = 0.0 if args.no_wait else s.wait_training()
            last = srv.info()["train_stats"]["casam"].get("last_training") or {}
            for layer in last.get("institutions") or []:  # the server's last training, one entry per institution
                if layer.get("layer") and layer["layer"] not in {x.get("layer") for x in report["layers"]}:
                    report["layers"].append(
                        {
                            "layer": layer["layer"],
                            "after_labels": rec["order"],
                            "trained_on": layer.get("images"),
                            "decision": layer.get("reason"),
                            "val_iou": layer.get("val_iou"),
                            "plain_val_iou": layer.get("zero_shot_val_iou"),
                            "seconds": layer.get("seconds"),
                            "finished": last.get("finished"),
                        }
                    )
            images.append(rec)
            save()
            print(
                f"{rec['order']:3d} {case}: box {rec['box']['first_iou']:.3f} -> {rec['box']['curve'][-1]:.3f} "
                f"({len(rec['box']['curve']) - 1} clicks), click {rec['click']['first_iou']:.3f}, layer "
                f"{rec['box']['layers'][0]}, waited {rec['waited_for_training_s']} s",
                flush=True,
            )
        s.wait_training()
        test = task_rows(task, "test", args.test_institution)
        scores = []
        for r in test:
            s.client.upload_image(str(task / "images" / f"{r['case']}.png"), image_id=r["case"])
            truth = s.truth(r["case"])
            x0, y0, x1, y1 = (int(v) for v in tight_box(truth))
            box, res = s.infer(r["case"], {"roi": [x0, x1, y0, y1]})
            click, res_c = s.infer(r["case"], {"foreground": [[int(v) for v in centroid_point(truth)[0]]]})
            scores.append(
                {
                    "case": r["case"],
                    "institution": r["institution"],
                    "box_iou": round(iou(box, truth), 4),
                    "click_iou": round(iou(click, truth), 4),
                    "layer_box": res.get("layer"),
                    "layer_click": res_c.get("layer"),
                }
            )
        report["test"] = {
            "images": scores,
            "box_iou": round(float(np.mean([x["box_iou"] for x in scores])), 4),
            "click_iou": round(float(np.mean([x["click_iou"] for x in scores])), 4),
        }
        report["final_layers"] = srv.info().get("layers", [])
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    print(json.dumps(report["test"], indent=1)[:400])
    return report


if __name__ == "__main__":
    main()
