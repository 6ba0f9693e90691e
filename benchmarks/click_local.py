#!/usr/bin/env python
"""Corrective clicks with and without local edits, on the continual stream's test splits and its layers.

A corrective click on a box's (or a first click's) answer is answered by editing the box
(:func:`casam.prompts.clicks.decode_clicks`); ``ClickConfig.local`` keeps of such an edit only the connected change
that holds the click, within ``local_reach`` times the click's distance to the previous mask
(:func:`casam.prompts.clicks.confine`). This script runs the stream's interaction sequences
(:func:`casam.scoring.score.sequences`: the first prompt, then corrective clicks at the centre of the largest error
region) on the same test images the stream scores (``--sequence-cases`` per task, spread over the test split), for
the fresh install (plain SAM + casam's click path) and each task's own layer (oracle), once per setting, so the
settings are compared on the same images and layers. Nothing is trained: the layers are those a stream run left
beside its embedding cache (``--registry``).

Example (the committed results)::

    python benchmarks/click_local.py --registry /tmp/stream/cache/benchmark-registries/continual-<key> \\
        --cache /tmp/stream/cache --variants "edit:local=0;local:local=1,local_reach=none;local3:local=1,local_reach=3"
"""

from __future__ import annotations

import argparse
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
from casam.prompts.clicks import ClickConfig
from casam.registry.store import CORRECTIONS, LayerRegistry
from casam.scoring.protocol import summarise
from casam.scoring.samples import EmbeddingCache, make_samples
from casam.scoring.score import sequences
from casam.training.config import TrainConfig
from latency import machine

OUT = Path("benchmarks") / "results" / "click_local"


def parse_variants(text: str) -> Dict[str, Dict[str, Any]]:
    """``name:key=value,key=value;name2:...`` → {name: ClickConfig keyword arguments} (none / 0 / 1 understood)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, kv = part.partition(":")
        kw: Dict[str, Any] = {}
        for item in filter(None, kv.split(",")):
            k, _, v = item.partition("=")
            kw[k.strip()] = None if v.lower() == "none" else (bool(int(v)) if k.strip() == "local" else float(v))
        out[name.strip()] = kw
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--registry", required=True, help="a stream run's layer registry (one layer per task)")
    p.add_argument("--cache", default=None, help="the stream's embedding cache folder")
    p.add_argument("--data", default=None, help="data root (default: casam.paths.default_data)")
    p.add_argument("--variants", default="edit:local=0;local3:local=1,local_reach=3")
    p.add_argument("--first", default="box,click", help="first prompts (box, click)")
    p.add_argument("--methods", default="fresh_install,casam_oracle")
    p.add_argument("--clicks", type=int, default=5, help="corrective clicks after the first prompt")
    p.add_argument("--sequence-cases", type=int, default=6, help="test images per task (as the stream)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: every task)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bound", action="store_true",
                   help="also the protocol's bound: the box answer, then each click fixing exactly the connected "
                        "error region it was placed in")
    p.add_argument("--out", default=str(OUT), help="stem of the .json / .md results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bb = load_backbone("litemedsam", None, "cpu")
    tasks = discover_tasks(Path(args.data) if args.data else default_data())
    if args.tasks:
        tasks = [t for t in tasks if t.name in args.tasks.split(",")]
    window = TrainConfig().window
    test = []
    for t in tasks:
        cases = spread([c for c in t.split("test") if c.mask is not None], None)
        cases = [cases[i] for i in spread(range(len(cases)), args.sequence_cases)]
        imgs, masks, pats = load_cases(cases)
        test.append(make_samples(bb, imgs, masks, pats, EmbeddingCache(bb, args.cache), window))
    reg = LayerRegistry(args.registry)
    layers, infos = {}, {}
    for info in reg.active():
        names = [t.name for t in tasks]
        if info.institution in names:
            layer, _, info = reg.load(info.name, bb)
            layers[names.index(info.institution)] = layer.eval()
            infos[names.index(info.institution)] = info
    variants = parse_variants(args.variants)
    results: Dict[str, Any] = {}
    for vname, kw in variants.items():
        cfg = ClickConfig(**kw)
        for first in args.first.split(","):
            for method in args.methods.split(","):
                for j, (t, samples) in enumerate(zip(tasks, test)):
                    layer, corrections = None, True
                    if method == "casam_oracle":
                        if j not in layers or not infos[j].serves(first):
                            continue  # the gate: plain SAM answers, as for the fresh install
                        layer, corrections = layers[j], infos[j].serves(CORRECTIONS)
                    curves = []
                    for s in samples:
                        curves += sequences(bb, layer, s, args.clicks + 1, config=cfg, first=first,
                                            corrections=corrections)
                    summary = summarise(curves)
                    results.setdefault(vname, {}).setdefault(first, {}).setdefault(method, {})[t.name] = summary
                    print(f"{vname:8s} {first:5s} {method:14s} {t.name:24s} "
                          + " ".join(f"{v:.3f}" for v in summary["iou"]) + f"  AUC {summary['auc_iou']:.3f}",
                          flush=True)
    if args.bound:
        results["bound"] = {"box": {m: {} for m in args.methods.split(",")}}
        for method in args.methods.split(","):
            for j, (t, samples) in enumerate(zip(tasks, test)):
                layer = None
                if method == "casam_oracle":
                    if j not in layers or not infos[j].serves("box"):
                        continue
                    layer = layers[j]
                curves = [region_bound(bb, layer, s, tg.mask, args.clicks) for s in samples for tg in s.targets]
                results["bound"]["box"][method][t.name] = summarise(curves)
                print(f"bound    box   {method:14s} {t.name:24s} "
                      + " ".join(f"{v:.3f}" for v in results["bound"]["box"][method][t.name]["iou"]), flush=True)
    out = {"command": "python " + shlex.join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
           "machine": machine(), "wall_s": round(time.time() - t0, 1), "variants": variants,
           "clicks": args.clicks, "sequence_cases": args.sequence_cases, "results": results}
    for vname, by_first in results.items():
        for first, by_method in by_first.items():
            for method, per_task in by_method.items():
                if not per_task:
                    continue
                curves = np.array([v["iou"] for v in per_task.values()])
                per_task["_mean"] = {"iou": [round(float(x), 4) for x in curves.mean(0)],
                                     "auc_iou": round(float(curves.mean()), 4), "tasks": len(curves)}
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    stem.with_suffix(".md").write_text(report(out))
    return out


@torch.no_grad()
def region_bound(bb, layer, sample, truth: np.ndarray, clicks: int) -> Dict[str, List[float]]:
    """IoU after the box answer and after each of ``clicks`` corrective clicks that fix exactly the connected error
    region they are placed in (the protocol's next click; nothing else changes): what any click answer that stays
    where it was put can reach."""
    from scipy import ndimage

    from casam.prompts.masks import tight_box
    from casam.scoring.metrics import iou
    from casam.scoring.protocol import next_click
    from casam.scoring.score import head_of, interaction_logits

    z = sample.embedding[None].to(bb.device)
    h = layer(z) if layer is not None else z
    image = None if sample.image is None else sample.image.float()
    pred = interaction_logits(bb, h, sample.geom, head_of(layer), image, None, None, tight_box(truth)).numpy() > 0
    out = [iou(pred, truth)]
    for _ in range(clicks):
        nxt = next_click(pred, truth)
        if nxt is not None:
            err = (truth & ~pred) if nxt[1] == 1 else (pred & ~truth)
            comp, _ = ndimage.label(err)
            x, y = nxt[0][0].astype(int)
            pred = pred.copy()
            pred[comp == comp[y, x]] = bool(nxt[1])
        out.append(iou(pred, truth))
    return {"iou": out, "dice": out}


def report(out: Dict[str, Any]) -> str:
    """The results as Markdown: per protocol and method, IoU after each step per task and variant."""
    lines = ["# Corrective clicks: box edits taken whole vs local edits", "",
             "IoU after the first prompt and each corrective click (mean over the objects of "
             f"{out['sequence_cases']} test images per task, the stream's own), AUC = mean over the steps. `bound`: "
             "the box answer, then each click fixing exactly the connected error region it was placed in.", ""]
    variants = list(out["results"])
    for first in next(iter(out["results"].values())):
        for method in out["results"][variants[0]][first]:
            lines += [f"## {first} first, {method}", "", "| task | " + " | ".join(variants) + " |",
                      "|---|" + "---|" * len(variants)]
            for task in out["results"][variants[0]][first][method]:
                cells = []
                for v in variants:
                    s = out["results"][v].get(first, {}).get(method, {}).get(task)
                    cells.append("–" if s is None else " ".join(f"{x:.3f}" for x in s["iou"])
                                 + f" (AUC {s['auc_iou']:.3f})")
                lines.append(f"| {task} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["Variants (ClickConfig settings): " + "; ".join(f"`{k}` {v}" for k, v in out["variants"].items()), "",
              "Command:", "", "```", out["command"], "```", "",
              f"Machine: {out['machine'].get('cpu')}, {out['machine'].get('cores')} cores, torch threads "
              f"{out['machine'].get('torch_threads')}, device cpu. Wall time {out['wall_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
