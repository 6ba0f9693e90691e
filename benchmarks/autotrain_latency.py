"""2D click latency through the real server, idle and while the app trains a layer by itself.

The server is started as the README does (``python -m monailabel.main start_server --app apps/casam --studies
<copy> ...``, via :mod:`casam.evaluation.server`, not niced) on a temporary copy of brain-MRI slices, and driven with
``monailabel.client.MONAILabelClient``. ``--clicks`` pictures are opened one after the other (``GET
/datastore/image``, as the Slicer plugin downloads them: the server encodes them in the background), and
each gets a foreground click at its tumour's centre once encoded (``2d_click`` of ``benchmarks/latency.py``):
first on an idle server; then ``--labels`` final labels of one institution are saved, the app starts a
background training by itself (``train_after_labels``), and the next ``--clicks`` pictures are clicked while
it runs (a click counts only if the training ran before and after it). The target: the server's p95 during
training at most twice the idle p95. The training's own seconds are reported too, and the machine's load
(``os.getloadavg``, and the CPU other processes took) so that a run on a shared box can be told. Run::

    .venv/bin/python benchmarks/autotrain_latency.py --out benchmarks/results/autotrain_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import psutil
import requests

from casam.evaluation.server import MonaiLabelServer
from casam.paths import default_data
from casam.training.config import HEAD_STEPS
from latency import Bench, centre, datastore, machine, summary

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "casam"  # the app the server runs

INSTITUTION = "BENCH"
RATIO = 2.0  # the target: p95 while training <= RATIO x idle p95


def training(srv: MonaiLabelServer) -> Dict[str, Any]:
    return srv.info()["train_stats"]["casam"]["training"] or {}


def others_cpu(server_pid: int, seconds: float = 2.0) -> float:
    """CPU (in cores) taken by processes outside the server's tree and this one, over ``seconds``."""
    try:
        ours = {server_pid, os.getpid()} | {c.pid for c in psutil.Process(server_pid).children(recursive=True)}
    except psutil.Error:
        ours = {server_pid, os.getpid()}
    procs = [p for p in psutil.process_iter() if p.pid not in ours]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    total = 0.0
    for p in procs:
        try:
            total += p.cpu_percent(None)
        except psutil.Error:
            pass
    return round(total / 100, 2)


def click_pictures(b: Bench, scenario: str, pictures, during: bool = False) -> int:
    """Opens each picture, waits for its embedding, clicks; returns the clicks not fully within a training."""
    outside = 0
    for case, mask in pictures:
        b.open(case)
        b.wait_encoded()
        before = training(b.srv).get("state") == "running"
        x, y = centre(mask)
        n = len(b.samples.get(scenario, []))
        b.click(scenario, case, {"foreground": [[x, y]]})
        if during and not (before and training(b.srv).get("state") == "running"):
            b.samples[scenario].pop(n)
            outside += 1
    return outside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--clicks", type=int, default=20, help="clicks (pictures) idle and again during training")
    ap.add_argument("--labels", type=int, default=10, help="final labels saved to start the training")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--train-threads", type=int, default=None, help="--conf train_threads (default: the app's)")
    ap.add_argument("--train-nice", type=int, default=None, help="--conf train_nice (default: the app's)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "autotrain_latency.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="casam-autotrain-"))
    studies, pictures = datastore(args.data, work, 2 * args.clicks + 1, 0)
    idle_pics, busy_pics = pictures[: args.clicks], pictures[args.clicks: 2 * args.clicks]
    conf = {"backbone": "litemedsam", "registry": str(work / "registry"), "cache": str(work / "cache"),
            "labels": "tumour", "train_after_labels": str(args.labels), "min_images": str(args.labels),
            "epochs": str(args.epochs), "head_steps": str(HEAD_STEPS)}
    if args.train_threads is not None:
        conf["train_threads"] = str(args.train_threads)
    if args.train_nice is not None:
        conf["train_nice"] = str(args.train_nice)
    srv = MonaiLabelServer(str(studies), work / "server", APP, conf=conf, ports=range(8300, 8400))
    result: Dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "server": "python -m monailabel.main start_server --app apps/casam --studies <copy> "
        + " ".join(f"--conf {k} {v}" for k, v in conf.items() if k not in ("registry", "cache")),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    load: List[Dict[str, Any]] = []
    with srv:
        b = Bench(srv, work / "client")
        b.click("warmup", pictures[-1][0], {"foreground": [list(centre(pictures[-1][1]))]})
        load.append({"phase": "idle", "loadavg": os.getloadavg(), "other_cores": others_cpu(srv.proc.pid)})
        click_pictures(b, "idle", idle_pics)
        t0 = time.time()
        for case, _ in idle_pics[: args.labels]:
            r = requests.put(
                f"{srv.url}/datastore/label",
                params={"image": case, "tag": "final"},
                data={"params": json.dumps({"institution": INSTITUTION, "patient": case.rsplit("_", 1)[0]})},
                files={"label": ("l.png", (args.data / "brain_mri_lgg" / "masks" / f"{case}.png").read_bytes())},
                timeout=300,
            )
            r.raise_for_status()
        while training(srv).get("state") != "running":
            if time.time() - t0 > 120:
                raise RuntimeError(f"no automatic training started: {training(srv)}\n{srv.log_tail()}")
            time.sleep(0.2)
        load.append({"phase": "training", "loadavg": os.getloadavg(), "other_cores": others_cpu(srv.proc.pid)})
        outside = click_pictures(b, "during_training", busy_pics, during=True)
        clicked = time.time()
        while training(srv).get("state") == "running":
            time.sleep(1)
        status = training(srv)
        load.append({"phase": "end", "loadavg": os.getloadavg(), "other_cores": others_cpu(srv.proc.pid)})
    idle, busy = (
        summary(b.samples["idle"]),
        summary(b.samples.get("during_training", []) or [{"server_ms": np.nan, "client_ms": np.nan}]),
    )
    ratio = busy["server_ms"]["p95"] / idle["server_ms"]["p95"]
    result.update(
        idle=idle,
        during_training=busy,
        clicks_outside_training=outside,
        load=load,
        p95_ratio=round(ratio, 2),
        target=f"server p95 during training <= {RATIO:g} x idle",
        met=bool(ratio <= RATIO),
        training={
            k: status.get(k)
            for k in ("state", "auto", "priority", "institution", "epochs", "epoch", "seconds", "new_layers", "results")
        },
        training_seconds_after_clicks=round(time.time() - clicked, 1),
        samples={k: v for k, v in b.samples.items() if k != "warmup"},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: Dict[str, Any]) -> str:
    m, t = r["machine"], r["training"]
    rows = "\n".join(
        f"| {name} | {s['n']} | {s['server_ms']['p50']} | {s['server_ms']['p95']} | {s['client_ms']['p50']} | "
        f"{s['client_ms']['p95']} |"
        for name, s in (("idle", r["idle"]), ("during training", r["during_training"]))
    )
    load = "; ".join(
        f"{x['phase']}: load {', '.join(f'{v:.2f}' for v in x['loadavg'])}, other processes {x['other_cores']} cores"
        for x in r["load"]
    )
    shared = any(x["other_cores"] >= 0.2 for x in r["load"])
    res = "; ".join(
        f"{x.get('layer')}: validation box IoU {x.get('val_iou') or float('nan'):.3f} vs plain SAM "
        f"{x.get('zero_shot_val_iou') or float('nan'):.3f}"
        for x in t.get("results") or []
    )
    return f"""# 2D click latency while the app trains by itself

`{r["command"]}` ({r["started"]})

Server: `{r["server"]}` (not niced). Machine: {m.get("cpu")} ({m.get("cpu_id")}; \
{", ".join(m.get("simd") or [])}), {m.get("cores")} cores,
torch {m.get("torch")}, GPU {m.get("gpu")}.

A foreground click at the tumour's centre of an opened brain-MRI picture, once the server has encoded it in
the background; the server's `latency_ms` and the client's wall time, in ms.

| clicks | n | server p50 | server p95 | client p50 | client p95 |
| --- | --- | --- | --- | --- | --- |
{rows}

Server p95 during training / idle: **{r["p95_ratio"]}** ({r["target"]}: {"met" if r["met"] else "not met"}).
{r["clicks_outside_training"]} clicks of the second set were not fully within the training and are left out.

The automatic training: state {t.get("state")}, priority {t.get("priority")}, {t.get("epochs")} epochs,
{t.get("seconds")} s in all ({r["training_seconds_after_clicks"]} s of them after the last click), new layers
{t.get("new_layers")} ({res}).

Load: {load}.
{SHARED if shared else "No other job took a noticeable share of the CPU during this run."}
"""


SHARED = """Other jobs shared the CPU during this run (other processes above 0.2 cores, load average above the 2 cores):
the server's clicks competed with them as much as with the training, so both sets are slower than on a quiet
box and their ratio says mainly that the niced, one-thread training did not add to what the other jobs took;
the training itself ran several times slower than on a quiet box."""


if __name__ == "__main__":
    main()
