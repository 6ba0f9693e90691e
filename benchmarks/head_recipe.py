#!/usr/bin/env python
"""How fast a refinement head learns from a handful of labels: validation IoU per step, seconds per step.

For each task, the first ``--labels`` labelled training images of one institution (spread over its training split)
train a refinement head (``casam.training.head.train_head``) on plain SAM's answers to their tight boxes and centre
clicks, once per recipe; every ``--every`` steps the head answers the tight boxes of ``--test`` test images (at the
head's resolution, no best-step choice: the curve itself is the result). No Alignment Layer is trained (on the
SAM-weak tasks it adds nothing; the head is what learns there, ``results/ablation.md``), so the recipes differ only
in the head. Each recipe is ``name:key=value,...`` over :class:`casam.training.head.HeadConfig`'s fields.

Resumes: a task and recipe already in ``--out``.json is kept. Example (the committed results)::

    python benchmarks/head_recipe.py --tasks retina_vessels_drive,em_membranes_isbi,fetal_head_us \\
        --recipes 'before:norm=0,schedule=constant,lr=0.003,steps=400,val_every=50;now:steps=150' \\
        --out benchmarks/results/head_recipe
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from casam.data.datasets import discover_tasks, load_cases, spread
from casam.model.backbone import load_backbone
from casam.paths import default_data
from casam.prompts.masks import BOX, PROMPT_TYPES
from casam.scoring.samples import EmbeddingCache, make_samples
from casam.training.head import HeadConfig, head_examples, sequence_ious, train_head
from latency import machine


def parse_recipes(spec: str) -> Dict[str, Dict[str, Any]]:
    """``name:k=v,k=v;name2:...`` → {name: HeadConfig keyword arguments} (values typed as the field's default)."""
    types = {f.name: type(f.default) for f in fields(HeadConfig)}
    out = {}
    for part in filter(None, spec.split(";")):
        name, _, kvs = part.partition(":")
        kw: Dict[str, Any] = {}
        for kv in filter(None, kvs.split(",")):
            k, v = kv.split("=")
            kw[k] = v in ("1", "true", "True") if types[k] is bool else types[k](v)
        out[name] = kw
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True, help="comma-separated task names (MANIFEST.tsv)")
    p.add_argument("--recipes", required=True, help="name:key=value,...;name2:... over HeadConfig's fields")
    p.add_argument("--labels", type=int, default=5, help="labelled training images")
    p.add_argument("--test", type=int, default=6, help="test images scored along the way")
    p.add_argument("--every", type=int, default=25, help="score the test images every this many steps")
    p.add_argument("--data", default=None)
    p.add_argument("--cache", default=None, help="embedding cache folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/head_recipe")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = Path(args.out)
    out: Dict[str, Any] = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() \
        else {"runs": {}}
    out.update(command="python " + shlex.join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
               machine=machine(), labels=args.labels, test_images=args.test)
    bb = load_backbone("litemedsam", None, "cpu")
    tasks = {t.name: t for t in discover_tasks(Path(args.data) if args.data else default_data())}
    cache = EmbeddingCache(bb, args.cache)
    recipes = parse_recipes(args.recipes)
    for name in args.tasks.split(","):
        task = tasks[name]
        train = [c for c in task.split("train") if c.mask is not None]
        inst = sorted({c.institution for c in train})[0]
        prepared = None
        for rname, kw in recipes.items():
            key = f"{name}/{rname}"
            if key in out["runs"] and out["runs"][key]["recipe"] == kw:
                print(f"{key}: kept from an earlier run", flush=True)
                continue
            if prepared is None:
                tr = make_samples(bb, *load_cases(spread([c for c in train if c.institution == inst], args.labels)),
                                  cache)
                te = make_samples(bb, *load_cases(spread([c for c in task.split("test") if c.mask is not None],
                                                         args.test)), cache)
                prepared = head_examples(bb, None, tr, list(PROMPT_TYPES)), head_examples(bb, None, te, [BOX])
            train_ex, test_ex = prepared
            curve: List[List[float]] = []
            scoring = [0.0]

            def score(head) -> float:
                t = time.time()
                v = float(np.mean([sequence_ious(head, e, 1)[0] for e in test_ex]))
                scoring[0] += time.time() - t
                curve.append(round(v, 4))
                return v

            cfg = HeadConfig(**{"val_every": args.every, **kw})
            report: Dict[str, Any] = {}
            t0 = time.time()
            train_head(train_ex, cfg, validate=score, report=report)
            seconds = time.time() - t0 - scoring[0]
            out["runs"][key] = {"task": name, "recipe_name": rname, "recipe": kw, "steps": cfg.steps,
                                "curve": report["val_history"], "final": curve[-1], "best": max(curve),
                                "train_images": len({id(e.image) for e in train_ex}), "test_masks": len(test_ex),
                                "seconds": round(seconds, 1), "seconds_per_step": round(seconds / cfg.steps, 3)}
            print(f"{key}: test box {curve[0]:.3f} -> {curve[-1]:.3f} after {cfg.steps} steps (best {max(curve):.3f}),"
                  f" {seconds / cfg.steps:.2f} s/step", flush=True)
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    stem.with_suffix(".md").write_text(report_md(out))
    plot(out, stem.with_suffix(".png"))
    return out


def report_md(out: Dict[str, Any]) -> str:
    """The Markdown table of the runs: test box IoU at the start, at chosen steps, at the end; seconds."""
    lines = ["# How fast a refinement head learns from a handful of labels", "",
             f"{out['labels']} labelled training images per task (plain SAM's answers to their boxes and centre "
             f"clicks); test box IoU of {out['test_images']} test images at the head's resolution, no best-step "
             "choice.", "",
             "| task | recipe | steps | IoU at step 0 → 50 → 100 → 150 → last | best | s/step | s |",
             "|---|---|---|---|---|---|---|"]
    for r in out["runs"].values():
        at = dict((s, v) for s, v in r["curve"])
        pts = " → ".join(f"{at[s]:.3f}" if s in at else "–" for s in (0, 50, 100, 150)) + f" → {r['final']:.3f}"
        recipe = ", ".join(f"{k}={v}" for k, v in r["recipe"].items()) or "defaults"
        lines.append(f"| {r['task']} | {r['recipe_name']} ({recipe}) | {r['steps']} | {pts} | {r['best']:.3f} | "
                     f"{r['seconds_per_step']:.2f} | {r['seconds']:.0f} |")
    m = out["machine"]
    lines += ["", "Command:", "", "```", out["command"], "```", "",
              f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch threads {m.get('torch_threads')}, device cpu.",
              ""]
    return "\n".join(lines)


def plot(out: Dict[str, Any], path: Path) -> None:
    """One panel per task: test box IoU against training steps, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["task"] for r in out["runs"].values()))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for r in out["runs"].values():
            if r["task"] == name:
                s, v = zip(*r["curve"])
                ax.plot(s, v, marker=".", label=f"{r['recipe_name']} ({r['seconds_per_step']:.2f} s/step)")
        ax.set_title(name)
        ax.set_xlabel("head training step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test box IoU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
