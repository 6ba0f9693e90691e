#!/usr/bin/env python
"""Fits the click chooser's weights (``casam.prompts.clicks.CHOOSER_WEIGHTS``) and measures them.

One click at each training object's centre is answered with box proposals of every half-size, all refined
(:func:`casam.prompts.clicks.propose`); the weights of the linear score over
:data:`casam.prompts.clicks.FEATURES` maximise the expected IoU of a softmax choice (L2-regularised). The fit
uses the training splits only; the result file
reports the held-out test splits, leave-one-task-out fits (each task chosen by weights fitted on the
others) to show how the weights carry to data they never saw, and ``shipped_fused``: the product's answer,
the refined proposals averaged by a softmax of the shipped scores (:func:`casam.prompts.clicks.fuse_proposals`).

Example (the committed result: benchmarks/results/click_chooser.json)::

    python benchmarks/click_chooser.py --train-images 40 --test-images 10 --cache /tmp/exp/cache
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from casam.data.datasets import discover_tasks, load_cases, spread
from casam.evaluation.provenance import machine_info
from casam.model.backbone import load_backbone
from casam.model.preprocess import points_to_model
from casam.prompts.clicks import (
    CHOOSER_WEIGHTS,
    FEATURES,
    HALF_SIZES,
    REFERENCE_SIZE,
    ClickConfig,
    agreement,
    fuse_proposals,
    paired_iou,
    proposal_scores,
    propose,
)
from casam.prompts.masks import centroid_point
from casam.scoring.samples import EmbeddingCache, make_samples


def split_samples(data: str, cache: Optional[str], images: Dict[str, int]):
    """LiteMedSAM and, per split and task, the samples of at most ``images[split]`` annotated images spread over
    that split → (backbone, {split: {task name: samples}})."""
    bb = load_backbone("litemedsam")
    emb = EmbeddingCache(bb, cache)
    out: Dict[str, Dict[str, list]] = {split: {} for split in images}
    for task in discover_tasks(data):
        for split, n in images.items():
            ims, ms, ps = load_cases(spread([c for c in task.split(split) if c.mask is not None], n))
            out[split][task.name] = make_samples(bb, ims, ms, ps, emb)
    return bb, out


def run_record(script: str, argv, t0: float) -> dict:
    """What a result file says of the run that made it: its command, machine and seconds since ``t0``."""
    return {
        "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info("cpu"),
        "seconds": round(time.time() - t0, 1),
    }


@torch.no_grad()
def candidates(backbone, samples):
    """Per object: (features K×F, IoU of each refined proposal with the truth K, IoU of the shipped chooser's
    fused answer, :func:`casam.prompts.clicks.fuse_proposals` at ``ClickConfig().fuse``)."""
    half = torch.tensor([float(s) * backbone.img_size / REFERENCE_SIZE for s in HALF_SIZES])[:, None]
    to_low = backbone.lowres_size / backbone.img_size
    temperature = ClickConfig().fuse
    out = []
    for s in samples:
        run = partial(backbone.decode, s.embedding[None], None, None)
        for t in s.targets:
            fg = torch.tensor(points_to_model(centroid_point(t.mask), s.geom), dtype=torch.float32)
            p = propose(run, fg, s.geom.resized_hw, to_low, half, len(HALF_SIZES), lambda m: torch.zeros(len(m)))
            m = (p.logits[:, 0] > 0).flatten(1)
            truth = (t.lowres > 0.5).flatten()[None].expand_as(m)
            score = proposal_scores(p, None, lambda masks: agreement(masks, fg * to_low, fg[:0]))  # as the product
            fused = fuse_proposals(p, score, temperature, fg, to_low, s.geom.resized_hw)[0][0, 0] > 0
            out.append((p.features, paired_iou(m, truth), float(paired_iou(fused.flatten()[None], truth[:1])[0])))
    return out


def choose(w, cands):
    """Mean IoU of the argmax choice of ``w`` over the objects."""
    return float(np.mean([float(g[int(torch.argmax(f @ w))]) for f, g, _ in cands])) if cands else float("nan")


def fit(cands, reg=1e-2, temp=0.1, steps=400, lr=0.05):
    """Weights maximising the mean expected IoU of a softmax (temperature ``temp``) over each object's proposals."""
    w = torch.zeros(len(FEATURES), requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        loss = -sum((torch.softmax((f @ w) / temp, 0) * g).sum() for f, g, _ in cands) / len(cands) + reg * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--train-images", type=int, default=16, help="training images per task")
    ap.add_argument("--test-images", type=int, default=10, help="test images per task")
    ap.add_argument("--cache", default=None, help="embedding cache folder (saves re-encoding)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "click_chooser.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    bb, samples = split_samples(a.data, a.cache, {"train": a.train_images, "test": a.test_images})
    data = {t: {split: candidates(bb, samples[split][t]) for split in samples} for t in samples["train"]}
    tasks = list(data)
    print({t: {k: len(v) for k, v in data[t].items()} for t in tasks}, flush=True)
    w = fit([c for t in tasks for c in data[t]["train"]])
    shipped = torch.tensor([CHOOSER_WEIGHTS[f] for f in FEATURES])
    refined_iou = torch.tensor([1.0 if f == "refined_iou" else 0.0 for f in FEATURES])
    rows = {}
    for t in tasks:
        loto = fit([c for u in tasks if u != t for c in data[u]["train"]])
        rows[t] = {
            split: {
                "objects": len(data[t][split]),
                "predicted_iou_only": round(choose(refined_iou, data[t][split]), 4),
                "fitted": round(choose(w, data[t][split]), 4),
                "shipped": round(choose(shipped, data[t][split]), 4),
                "shipped_fused": round(float(np.mean([v for _, _, v in data[t][split]])), 4),
                "fitted_without_this_task": round(choose(loto, data[t][split]), 4),
                "best_proposal": round(float(np.mean([float(g.max()) for _, g, _ in data[t][split]])), 4),
            }
            for split in ("train", "test")
        }
    mean = {
        split: {
            k: round(float(np.mean([rows[t][split][k] for t in tasks])), 4)
            for k in rows[tasks[0]][split]
            if k != "objects"
        }
        for split in ("train", "test")
    }
    result = {
        "what": "first-click IoU (low-res frame) of the proposal chosen by each weighting; one click at the object's "
        "centre, plain LiteMedSAM, all proposals refined",
        **run_record("click_chooser.py", argv, t0),
        "features": list(FEATURES),
        "fitted_weights": {f: round(float(v), 4) for f, v in zip(FEATURES, w)},
        "shipped_weights": dict(CHOOSER_WEIGHTS),
        "tasks": rows,
        "mean_over_tasks": mean,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"fitted_weights": result["fitted_weights"], "mean_over_tasks": mean}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
