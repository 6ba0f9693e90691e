#!/usr/bin/env python
"""Ablation on the task plain SAM fails at (retinal vessels): the Alignment Layer alone vs the layer with its
refinement head, by training images, scored on the test split as casam scores it.

Each arm is one ``train_layer`` on the task's training images (the product's recipe, ``--epochs`` for the layer,
``--head-steps`` for the head); every layer is stored in ``--registry`` and reused when the script runs again
(it resumes). Scores: tight box and one click at the centroid (answered as the product answers clicks) on
every test image; "served" is what the gate lets through (plain SAM where the layer did not validate better).
Writes ``vessel_layer.json``, ``vessel_layer.md`` and ``vessel_layer.png`` (truth, plain SAM, CA-SAM for a
box and a click, two test images) to ``--out``.

    python benchmarks/vessel_layer.py --out benchmarks/results --registry /tmp/vessel-reg --cache /tmp/exp/cache
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
from casam.registry.store import LayerRegistry
from casam.scoring.samples import EmbeddingCache, make_samples
from casam.scoring.score import mask_scores, predict_sample
from casam.training.config import TrainConfig
from casam.training.layer import train_layer

PROMPTS = ("box", "click")


def arms(args):
    """(name, TrainConfig) of each arm."""
    out = [("layer alone", TrainConfig(epochs=args.epochs, lr=args.lr, head_steps=0))]
    for n in args.images:
        out.append((f"layer + head, {n} images", TrainConfig(epochs=args.epochs, lr=args.lr, head_steps=args.head_steps,
                                                             max_images=n)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(default_data()))
    p.add_argument("--task", default="retina_vessels_drive")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-steps", type=int, default=TrainConfig.head_steps)
    p.add_argument("--images", type=int, nargs="+", default=[5, 11], help="training images per head arm (11 = all "
                   "but the validation patients)")
    p.add_argument("--registry", required=True)
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = next(t for t in discover_tasks(args.data) if t.dataset == args.task)
    bb = load_backbone("litemedsam")
    cache = EmbeddingCache(bb, args.cache)
    train = make_samples(bb, *load_cases(task.split("train")), cache=cache)
    test_imgs, test_masks, test_pats = load_cases(task.split("test"))
    test = make_samples(bb, test_imgs, test_masks, test_pats, cache=cache)
    reg = LayerRegistry(args.registry)
    plain = {q: mask_scores(bb, None, test, q) for q in PROMPTS}
    results = {"plain SAM": {q: float(np.mean(plain[q])) for q in PROMPTS}}
    layers = {}
    for name, cfg in arms(args):
        inst = f"{args.task} {name}"
        done = [i for i in reg.active() if i.institution == inst and i.train_config == cfg.to_dict()]
        t0 = time.time()
        info = done[0] if done else train_layer(bb, [], [], [], reg, inst, task.modality, cfg, progress=False,
                                                samples=train)
        layer, _, info = reg.load(info.name, bb)
        layers[name] = (layer, info)
        own = {q: float(np.mean(mask_scores(bb, layer, test, q))) for q in PROMPTS}
        use = info.extra["use"]
        results[name] = {**own, "served": {q: own[q] if use[q] else results["plain SAM"][q] for q in PROMPTS},
                         "use": use, "evidence": info.extra.get("evidence"), "val": info.extra["val"],
                         "n_train": info.extra["n_train"], "head": info.extra.get("head"),
                         "seconds_after_encode": round(info.extra["seconds"] - info.extra["timing"]["encode"], 1),
                         "timing": info.extra["timing"], "resumed": bool(done),
                         "wall_s": round(time.time() - t0, 1)}
        print(f"{name}: box {own['box']:.3f} click {own['click']:.3f} use {use}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = json_safe(
        {
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "machine": machine_info("cpu"),
            "task": args.task,
            "n_test": len(test),
            "results": results,
            "note": "IoU per test image (one mask each), mean; 'served' = what the gate lets through",
        }
    )
    (out / "vessel_layer.json").write_text(json.dumps(res, indent=2))
    lines = [
        f"# Retinal vessels: Alignment Layer alone vs layer + refinement head ({len(test)} test images)",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores",
        "",
        "| arm | training images | box IoU | click IoU | served box / click | validation box gain ± SE "
        "| s after encoding |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name == "plain SAM":
            lines.append(f"| plain SAM | 0 | {r['box']:.3f} | {r['click']:.3f} | | | |")
            continue
        ev = r["evidence"]["box"]
        lines.append(
            f"| {name} | {r['n_train']} | {r['box']:.3f} | {r['click']:.3f} | {r['served']['box']:.3f} / "
            f"{r['served']['click']:.3f} | {ev['gain']:+.3f} ± {ev['se']:.3f} | {r['seconds_after_encode']} |"
        )
    (out / "vessel_layer.md").write_text("\n".join(lines) + "\n")
    picture(bb, test, test_imgs, layers[max(layers, key=lambda k: results[k]["box"])][0], out / "vessel_layer.png")
    print("\n".join(lines))
    return 0


def picture(bb, test, images, layer, path: Path, n: int = 2) -> None:
    """Truth, plain SAM and CA-SAM (box, click) on ``n`` test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["image", "truth", "plain SAM, box", "CA-SAM, box", "plain SAM, click", "CA-SAM, click"]
    fig, ax = plt.subplots(n, len(cols), figsize=(3 * len(cols), 3.1 * n))
    for r in range(n):
        s = test[r]
        truth = s.targets[0].mask
        masks = [predict_sample(bb, lay, s, q)[0] for q in PROMPTS for lay in (None, layer)]
        panels = [images[r], truth, masks[0], masks[1], masks[2], masks[3]]
        for c, (title, img) in enumerate(zip(cols, panels)):
            a = ax[r, c]
            a.imshow(img, cmap=None if img.ndim == 3 else "gray")
            if c >= 2:
                inter, union = (img & truth).sum(), (img | truth).sum()
                title = f"{title}\nIoU {inter / max(union, 1):.2f}"
            a.set_title(title, fontsize=9)
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    sys.exit(main())
