#!/usr/bin/env python
"""What the layer and its refinement head each add, per task, on the stream's test splits and layers.

For every layer a stream run left in its registry (one per task, ``benchmarks/continual.py``), the task's test
images are answered with the tight box and with one centre click by plain SAM (casam's click path, the fresh
install), by the Alignment Layer alone (its head taken off), by the layer with its head (what the layer learned,
whatever the gate decided) and as the product answers (the gate's decision: the layer only for the prompt types its
validation let it serve). The layer's own records say how its training stopped: the best epoch of the layer and the
best step of the head, both chosen on the institution's held-out images. A PNG shows, for every task plain SAM
fails at (zero-shot box IoU < 0.5), one test image: the image, the truth, plain SAM and CA-SAM (box prompt).

Nothing is trained. Example (the committed results)::

    python benchmarks/ablation.py --registry /tmp/stream/cache/benchmark-registries/continual-<key> \\
        --cache /tmp/stream/cache --max-test 40 --out benchmarks/results/ablation
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
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
from casam.scoring.score import mask_scores, predict_sample
from casam.training.config import TrainConfig
from latency import machine

ARMS = ("plain", "layer", "layer_head", "served")
WEAK = 0.5  # a task plain SAM fails at: zero-shot box IoU below this


def _mean(v: List[float]) -> Optional[float]:
    return round(float(np.mean(v)), 4) if len(v) else None


def training_record(extra: Dict[str, Any]) -> Dict[str, Any]:
    """How the layer's and the head's training stopped, from the layer's stored records."""
    head = extra.get("head") or {}
    vh = extra.get("val_history") or []
    return {"best_epoch": extra.get("best_epoch"), "epochs_validated": max(len(vh) - 1, 0),
            "layer_val_box": [v.get("box") for v in vh], "head_kept": head.get("kept"),
            "head_best_step": head.get("best_step"), "head_steps": head.get("steps"),
            "head_val": head.get("val_history"), "use": extra.get("use"), "n_train": extra.get("n_train"),
            "timing": extra.get("timing")}


def figure(rows: List[Dict[str, Any]], path: Path) -> None:
    """One row per task plain SAM fails at: image, truth, plain SAM, CA-SAM (box prompt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 3.3 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows):
        panels = [(r["image"], "image"), (r["truth"], "truth"),
                  (r["plain"], f"plain SAM (box) IoU {r['iou_plain']:.2f}"),
                  (r["casam"], f"CA-SAM (box) IoU {r['iou_casam']:.2f}")]
        for ax, (im, title) in zip(ax_row, panels):
            ax.imshow(im, cmap=None if im.ndim == 3 else "gray")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        ax_row[0].set_title(f"{r['task']}: {r['case']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(res: Dict[str, Any]) -> str:
    mach = res["machine"]
    lines = ["# What the layer and the head each add", "",
             "Mean IoU on each task's test images (" + str(res["max_test"]) + " at most, spread over the split) "
             "answered by plain SAM (the fresh install), the Alignment Layer alone, the layer with its refinement "
             "head, and as the product serves them (the gate's decision per prompt type). Best epoch / step: chosen "
             "on the institution's held-out images (epoch 0 / step 0 = before training).", ""]
    for p in PROMPT_TYPES:
        lines += [f"## {p}", "", "| task | plain | layer alone | layer + head | served | layer adds | head adds |",
                  "|---|---|---|---|---|---|---|"]
        for name, t in res["tasks"].items():
            m = t["iou"][p]
            lines.append(f"| {name} | {m['plain']:.3f} | {m['layer']:.3f} | {m['layer_head']:.3f} | "
                         f"{m['served']:.3f} | {m['layer'] - m['plain']:+.3f} | {m['layer_head'] - m['layer']:+.3f} |")
        lines.append("")
    lines += ["## How training stopped", "",
              "| task | training images | layer: best epoch of validated | head: best step of steps | served |",
              "|---|---|---|---|---|"]
    for name, t in res["tasks"].items():
        tr = t["training"]
        use = ", ".join(k for k, v in (tr["use"] or {}).items() if v) or "nothing"
        lines.append(f"| {name} | {tr['n_train']} | {tr['best_epoch']} of {tr['epochs_validated']} | "
                     f"{tr['head_best_step']} of {tr['head_steps']} | {use} |")
    lines += ["", f"![masks]({Path(res['figure']).name})", "", "Command:", "", "```", res["command"], "```", "",
              f"Machine: {mach.get('cpu')}, {mach.get('cores')} cores, torch threads {mach.get('torch_threads')}, "
              "device cpu. "
              f"Wall time {res['wall_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--registry", required=True, help="a stream run's layer registry (one layer per task)")
    p.add_argument("--cache", default=None, help="the stream's embedding cache folder")
    p.add_argument("--data", default=None, help="data root (default: casam.paths.default_data)")
    p.add_argument("--max-test", type=int, default=40, help="test images per task, spread over the split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ablation", help="stem of the .json / .md / .png results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bb = load_backbone("litemedsam", None, "cpu")
    tasks = {t.name: t for t in discover_tasks(Path(args.data) if args.data else default_data())}
    reg = LayerRegistry(args.registry)
    cache = EmbeddingCache(bb, args.cache)
    window = TrainConfig().window
    res: Dict[str, Any] = {"command": "python benchmarks/ablation.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                   else argv),
                           "machine": machine(), "max_test": args.max_test, "tasks": {}}
    pictures = []
    for info in reg.active():
        task = tasks.get(info.institution)
        if task is None:
            continue
        cases = spread([c for c in task.split("test") if c.mask is not None], args.max_test)
        images, masks, patients = load_cases(cases)
        samples = make_samples(bb, images, masks, patients, cache, window)
        layer, _, info = reg.load(info.name, bb)
        layer.eval()
        bare = copy.deepcopy(layer).attach_head(None)
        models = {"plain": None, "layer": bare, "layer_head": layer}
        scores: Dict[str, Dict[str, List[float]]] = {}
        with torch.no_grad():
            for prompt in PROMPT_TYPES:
                scores[prompt] = {arm: mask_scores(bb, m, samples, prompt) for arm, m in models.items()}
                scores[prompt]["served"] = scores[prompt]["layer_head" if info.serves(prompt) else "plain"]
        iou = {pr: {arm: _mean(v) for arm, v in s.items()} for pr, s in scores.items()}
        res["tasks"][task.name] = {"layer": info.name, "n_test": len(samples), "iou": iou,
                                   "training": training_record(info.extra)}
        print(f"{task.name:24s} " + "  ".join(f"{pr}: " + " ".join(f"{arm} {iou[pr][arm]:.3f}" for arm in ARMS)
                                              for pr in PROMPT_TYPES), flush=True)
        if iou["box"]["plain"] < WEAK:  # the picture: the test image whose CA-SAM box IoU is the median
            per = scores["box"]["served"]
            k = int(np.argsort(per)[len(per) // 2])
            s = samples[k]
            with torch.no_grad():
                plain_m = predict_sample(bb, None, s, "box")[0]
                casam_m = predict_sample(bb, layer if info.serves("box") else None, s, "box")[0]
            img = np.asarray(images[k])
            pictures.append({"task": task.name, "case": cases[k].case, "image": img, "truth": s.targets[0].mask,
                             "plain": plain_m, "casam": casam_m, "iou_plain": scores["box"]["plain"][k],
                             "iou_casam": per[k]})
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    res["figure"] = str(stem.with_suffix(".png"))
    if pictures:
        figure(pictures, stem.with_suffix(".png"))
    res["wall_s"] = round(time.time() - t0, 1)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2))
    stem.with_suffix(".md").write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
