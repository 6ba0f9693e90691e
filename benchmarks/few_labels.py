#!/usr/bin/env python
"""A first layer from a handful of labels: is it served, how well does it answer, how long does it take?

For each task, the first ``--labels`` labelled training images of one institution (spread over its training split,
patients as in meta.csv) train a layer with ``casam.training.layer.train_layer`` as the app's online trainer does
(with so few labels the gate's evidence comes from cross-validation over patients, :mod:`casam.registry.evidence`);
the layer's record says what it serves and why, and the task's test images are answered with the tight box and one
centre click by the served layer (through the gate, as the product answers) and by plain SAM.

Example (the committed results)::

    python benchmarks/few_labels.py --tasks retina_vessels_drive,dermoscopy_ph2 --labels 5 --epochs 4 \\
        --cv-max-images 9 --out benchmarks/results/few_labels
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from casam.data.datasets import discover_tasks, load_cases, spread
from casam.model.backbone import load_backbone
from casam.paths import default_data
from casam.prompts.masks import PROMPT_TYPES
from casam.registry.store import LayerRegistry
from casam.scoring.samples import EmbeddingCache, make_samples
from casam.scoring.score import mask_scores
from casam.training.config import TrainConfig
from casam.training.layer import train_layer
from latency import machine


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True, help="comma-separated task names (MANIFEST.tsv)")
    p.add_argument("--labels", type=int, default=5, help="labelled images of the first layer")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--head-steps", type=int, default=TrainConfig.head_steps)
    p.add_argument("--max-test", type=int, default=None, help="test images per task (default: all)")
    p.add_argument("--data", default=None)
    p.add_argument("--cache", default=None, help="embedding cache folder (speeds up the test images)")
    p.add_argument("--cv-max-images", type=int, default=None,
                   help="validate up to this many labelled images by cross-validation (default: "
                        "casam.training.config.CV_MAX_IMAGES; 0: the hold-out alone)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/few_labels")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cv_max_images is not None:
        import casam.training.layer as layer_mod

        layer_mod.CV_MAX_IMAGES = args.cv_max_images
    t_start = time.time()
    bb = load_backbone("litemedsam", None, "cpu")
    tasks = {t.name: t for t in discover_tasks(Path(args.data) if args.data else default_data())}
    cfg = TrainConfig(epochs=args.epochs, head_steps=args.head_steps)
    stem = Path(args.out)
    done: Dict[str, Any] = json.loads(stem.with_suffix(".json").read_text())["tasks"] \
        if stem.with_suffix(".json").exists() else {}
    for name in args.tasks.split(","):
        if name in done and done[name].get("labels") == args.labels and done[name].get("epochs") == args.epochs \
                and done[name].get("cv_max_images") == args.cv_max_images:
            print(f"{name}: kept from an earlier run", flush=True)
            continue
        task = tasks[name]
        train = [c for c in task.split("train") if c.mask is not None]
        inst = sorted({c.institution for c in train})[0]
        cases = spread([c for c in train if c.institution == inst], args.labels)
        images, masks, patients = load_cases(cases)
        with tempfile.TemporaryDirectory() as tmp:
            reg = LayerRegistry(tmp)
            t0 = time.time()
            info = train_layer(bb, images, masks, patients, reg, inst, task.modality, cfg, progress=False)
            seconds = time.time() - t0
            layer, _, info = reg.load(info.name, bb)
        test_cases = spread([c for c in task.split("test") if c.mask is not None], args.max_test)
        timg, tmask, tpat = load_cases(test_cases)
        test = make_samples(bb, timg, tmask, tpat, EmbeddingCache(bb, args.cache), cfg.window)
        scores = {}
        for prompt in PROMPT_TYPES:
            plain = mask_scores(bb, None, test, prompt)
            served = mask_scores(bb, layer, test, prompt) if info.serves(prompt) else plain
            scores[prompt] = {"plain": round(float(np.mean(plain)), 4), "casam": round(float(np.mean(served)), 4),
                              "layer_ungated": round(float(np.mean(mask_scores(bb, layer, test, prompt))), 4)}
        ex = info.extra
        done[name] = {"institution": inst, "labels": len(images), "patients": len(set(patients)),
                      "epochs": args.epochs, "head_steps": args.head_steps,
                      "cv_max_images": args.cv_max_images, "seconds": round(seconds, 1),
                      "timing": ex.get("timing"), "evidence_source": ex.get("evidence_source"),
                      "use": ex.get("use"), "evidence": ex.get("evidence"), "val": ex.get("val"),
                      "test_images": len(test), "test": scores}
        print(f"{name}: {len(images)} labels, served {ex.get('use')} ({ex.get('evidence_source')}), {seconds:.0f} s; "
              f"test box {scores['box']}, click {scores['click']}", flush=True)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(
            {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
             "machine": machine(), "tasks": done}, indent=1))
    out = json.loads(stem.with_suffix(".json").read_text())
    stem.with_suffix(".md").write_text(report(out))
    print(f"[{time.time() - t_start:.0f} s]")
    return out


def report(out: Dict[str, Any]) -> str:
    lines = ["# A first layer from a handful of labels", "",
             "| task | labels (patients) | evidence | served | box: plain → casam (layer ungated) | "
             "click: plain → casam (layer ungated) | seconds (encode / folds / train / head / validate / clicks) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in out["tasks"].items():
        use = ", ".join(k for k, v in (r["use"] or {}).items() if v) or "nothing"
        ev = r["evidence"]["box"]
        t = r["timing"] or {}
        lines.append(f"| {name} | {r['labels']} ({r['patients']}) | {r['evidence_source']}: box gain {ev['gain']} ± "
                     f"{ev['se']} on {ev['n']} masks | {use} | {r['test']['box']['plain']:.3f} → "
                     f"{r['test']['box']['casam']:.3f} ({r['test']['box']['layer_ungated']:.3f}) | "
                     f"{r['test']['click']['plain']:.3f} → {r['test']['click']['casam']:.3f} "
                     f"({r['test']['click']['layer_ungated']:.3f}) | {r['seconds']:.0f} ("
                     + " / ".join(str(t.get(k, "–")) for k in ("encode", "cv_train", "train", "head", "validate",
                                                                 "clicks")) + ") |")
    m = out["machine"]
    lines += ["", "Command:", "", "```", out["command"], "```", "",
              f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch threads {m.get('torch_threads')}, device cpu.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
