#!/usr/bin/env python
"""Corrective clicks after an institution's layer: the head that reads clicks against the head that ignores them.

For each task (one dataset × institution of ``../shared/data``), arms of ``train_layer`` on its training images
(``--epochs`` for the layer, ``--head-steps`` for the head, at most ``--max-images`` images), each stored in
``--registry`` and reused when the script runs again (it resumes). Every test image then gets the two interaction
sequences of the CVPR 2025 interactive challenge as the product answers them (:func:`casam.scoring.score.sequences`;
the gate decides what the layer serves, plain SAM the rest): the tight box then ``--clicks`` corrective clicks, and
one centre click then ``--clicks`` corrective clicks; the fresh install (empty registry) beside them.

    python benchmarks/click_layer.py --tasks retina_vessels_drive --out benchmarks/results/click_layer.json \\
        --registry /tmp/click-reg --cache /tmp/exp/cache
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from casam.data.datasets import discover_tasks, load_cases
from casam.evaluation.provenance import json_safe, machine_info
from casam.model.backbone import load_backbone
from casam.paths import default_data
from casam.registry.store import CORRECTIONS, LayerRegistry
from casam.scoring.protocol import summarise
from casam.scoring.samples import EmbeddingCache, make_samples
from casam.scoring.score import sequences
from casam.training.config import TrainConfig
from casam.training.layer import train_layer

FIRSTS = ("box", "click")


def arms(args):
    """(name, TrainConfig) of each arm."""
    kw = dict(epochs=args.epochs, lr=args.lr, head_steps=args.head_steps, max_images=args.max_images)
    out = [("head reads clicks", TrainConfig(**kw, head_clicks=True))]
    if args.baseline:
        out.append(("head ignores clicks", TrainConfig(**kw, head_clicks=False)))
    return out


def spread(n: int, k) -> list:
    """At most k indices spread evenly over range(n)."""
    return list(range(n)) if k is None or k >= n else sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(default_data()))
    p.add_argument("--tasks", nargs="+", required=True, help="dataset or dataset@institution names")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--head-steps", type=int, default=TrainConfig.head_steps)
    p.add_argument("--max-images", type=int, default=48)
    p.add_argument("--clicks", type=int, default=5, help="corrective clicks after the first prompt")
    p.add_argument("--test-cases", type=int, default=None, help="at most this many test images (evenly spread)")
    p.add_argument("--baseline", action="store_true", help="also train a head that ignores clicks")
    p.add_argument("--registry", required=True)
    p.add_argument("--cache", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res.update(command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), machine=machine_info("cpu"))
    res.setdefault("tasks", {})
    bb = load_backbone("litemedsam")
    cache = EmbeddingCache(bb, args.cache)
    reg = LayerRegistry(args.registry)
    for task in discover_tasks(args.data):
        if task.name not in args.tasks and task.dataset not in args.tasks:
            continue
        tr_imgs, tr_masks, tr_pats = load_cases(task.split("train"))
        te_imgs, te_masks, te_pats = load_cases(task.split("test"))
        pick = spread(len(te_imgs), args.test_cases)
        test = make_samples(bb, [te_imgs[i] for i in pick], [te_masks[i] for i in pick], [te_pats[i] for i in pick],
                            cache=cache)
        entry = res["tasks"].setdefault(task.name, {})
        if "fresh install" not in entry:
            entry["fresh install"] = {f: summarise([q for s in test for q in sequences(bb, None, s, args.clicks + 1,
                                                                                        first=f)]) for f in FIRSTS}
        train = None
        for name, cfg in arms(args):
            if name in entry:
                continue
            inst = f"{task.name} {name}"
            done = [i for i in reg.active() if i.institution == inst and i.train_config == cfg.to_dict()]
            t0 = time.time()
            if not done and train is None:
                if cfg.max_images is not None and len(tr_imgs) > cfg.max_images:  # the same images as train_layer's
                    keep = sorted(np.random.default_rng(cfg.seed).choice(len(tr_imgs), cfg.max_images, replace=False))
                    tr_imgs, tr_masks, tr_pats = ([v[i] for i in keep] for v in (tr_imgs, tr_masks, tr_pats))
                train = make_samples(bb, tr_imgs, tr_masks, tr_pats, cache=cache)
            info = done[0] if done else train_layer(bb, [], [], [], reg, inst, task.modality, cfg, progress=False,
                                                    samples=train)
            layer, _, info = reg.load(info.name, bb)
            served = {}
            for f in FIRSTS:
                lay = layer if info.serves(f) else None
                served[f] = summarise([q for s in test for q in sequences(
                    bb, lay, s, args.clicks + 1, first=f, corrections=lay is not None and info.serves(CORRECTIONS))])
            entry[name] = {**served, "use": info.extra["use"], "evidence": info.extra.get("evidence"),
                           "clicks_evidence": info.extra.get("clicks"), "head": info.extra.get("head"),
                           "timing": info.extra["timing"], "n_train": info.extra["n_train"],
                           "n_val": info.extra["n_val"], "wall_s": round(time.time() - t0, 1), "resumed": bool(done)}
            print(task.name, name, {f: served[f]["iou"] for f in FIRSTS}, info.extra["use"], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(json_safe(res), indent=2))
        print(task.name, "fresh", {f: entry["fresh install"][f]["iou"] for f in FIRSTS}, flush=True)
        out.write_text(json.dumps(json_safe(res), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
