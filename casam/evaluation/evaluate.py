"""``casam evaluate``: judge a registry's layers on your own labelled test images.

For every task (dataset × institution) of a data folder in casam's layout (``images/``, ``masks/``,
``meta.csv``; or a root with ``MANIFEST.tsv``) it segments each labelled test mask from its tight box and from
one click at its centre, three ways:

* ``routed``: the product with the registry (router, per-prompt-type gate, plain-SAM fallback);
* ``plain``: the frozen backbone alone (box prompt; a click as the decoder's raw point prompt);
* ``fresh``: a fresh install, no layer (box prompt; the click answered by :mod:`casam.prompts.clicks`).

It reports IoU and Dice per task and prompt, which layer the router chose (counts) and the fallback rate, as
a table on stdout and as ``evaluate.json`` + ``evaluate.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from casam.data.datasets import Case, discover_tasks, load_cases, read_meta, spread
from casam.errors import CasamError
from casam.evaluation.report import fmt
from casam.inference.predictor import NONE, CASAMPredictor
from casam.prompts.masks import PROMPT_TYPES, binary_masks
from casam.scoring.score import mask_metrics, mask_prompts, raw_click

WAYS = ("routed", "plain", "fresh")


def find_tasks(data: str | Path, split: str = "test") -> Dict[str, List[Case]]:
    """The labelled cases of each task (dataset × institution) in a data folder.

    Args:
        data: a dataset folder (``images/``, ``masks/``, optional ``meta.csv``) or a root with ``MANIFEST.tsv``.
        split: the meta.csv split to use (``test``, ``train`` or ``all``).

    Returns:
        Task name → cases with a mask.

    Raises:
        CasamError: no labelled case found.
    """
    root = Path(data)
    if (root / "MANIFEST.tsv").exists():
        tasks = {t.name: t.cases for t in discover_tasks(root)}
    else:
        cases = read_meta(root)
        insts = sorted({c.institution for c in cases})
        tasks = {(root.name if len(insts) == 1 else f"{root.name}@{i}"): [c for c in cases if c.institution == i]
                 for i in insts}
    out = {n: [c for c in cs if c.mask is not None and (split == "all" or c.split == split)] for n, cs in tasks.items()}
    out = {n: cs for n, cs in out.items() if cs}
    if not out:
        raise CasamError(f"no labelled {split} images in {data}")
    return out


def evaluate_task(predictor: CASAMPredictor, cases: Sequence[Case], max_images: Optional[int] = None) -> Dict[str, Any]:
    """Scores one task (see the module docstring).

    Args:
        predictor: the product over the registry under test.
        cases: the task's labelled cases.
        max_images: at most this many cases, evenly spaced (None: all).

    Returns:
        ``scores[way][prompt] = {"iou", "dice"}`` (means over masks), ``routes`` (layer name or ``fallback`` →
        images), ``fallback_rate``, ``used`` (prompt → layer used → masks), ``images`` and ``masks``.
    """
    cases = spread(cases, max_images)
    vals: Dict[str, Dict[str, Dict[str, List[float]]]] = {w: {p: {"iou": [], "dice": []} for p in PROMPT_TYPES}
                                                          for w in WAYS}
    routes: Counter = Counter()
    used: Dict[str, Counter] = {p: Counter() for p in PROMPT_TYPES}
    n_masks = 0
    for case in cases:
        (image,), (label,), _ = load_cases([case])
        emb = predictor.embed(image)
        route = predictor.route(emb)
        routes[route.layer or "fallback"] += 1
        for _, truth in binary_masks(label):
            n_masks += 1
            box, point = mask_prompts(truth)
            preds = {
                ("routed", "box"): predictor.predict(emb, box=box, route=route),
                ("routed", "click"): predictor.predict(emb, points=point, point_labels=[1], route=route),
                ("fresh", "box"): predictor.predict(emb, box=box, layer=NONE),
                ("fresh", "click"): predictor.predict(emb, points=point, point_labels=[1], layer=NONE),
            }
            for p in PROMPT_TYPES:
                used[p][preds[("routed", p)].route.used or "plain SAM"] += 1
            masks = {k: v.mask > 0 for k, v in preds.items()}
            masks[("plain", "box")] = masks[("fresh", "box")]
            masks[("plain", "click")] = raw_click(predictor.backbone, emb.z, emb.geom, point)
            for (w, p), m in masks.items():
                for k, v in mask_metrics(m, truth, ("iou", "dice")).items():
                    vals[w][p][k].append(v)
    scores = {w: {p: {k: (float(np.mean(v)) if v else None) for k, v in d.items()} for p, d in pw.items()}
              for w, pw in vals.items()}
    n = sum(routes.values())
    return {"images": len(cases), "masks": n_masks, "scores": scores, "routes": dict(routes),
            "fallback_rate": routes.get("fallback", 0) / n if n else None,
            "used": {p: dict(c) for p, c in used.items()}}


def markdown(res: Dict[str, Any]) -> str:
    """The results of :func:`run` as a Markdown report."""
    L = [f"# casam evaluate: {res['data_name']}", "",
         f"Registry: {res['layers']} active layer(s) ({', '.join(res['layer_names']) or 'none'}); backbone "
         f"{res['backbone']}; split `{res['split']}`.", "",
         "| task | images | masks | box routed | box plain | box fresh | click routed | click plain | click fresh | "
         "fallback | routed to |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    for name, t in res["tasks"].items():
        s = t["scores"]
        routes = ", ".join(f"{k} {v}" for k, v in sorted(t["routes"].items(), key=lambda kv: -kv[1]))
        L.append(f"| {name} | {t['images']} | {t['masks']} | "
                 + " | ".join(fmt(s[w][p]["iou"]) for p in PROMPT_TYPES for w in WAYS)
                 + f" | {fmt(t['fallback_rate'])} | {routes} |")
    L += ["", "IoU per mask, averaged per task (Dice in the JSON). routed = casam with this registry (router, gate, "
          "fallback); plain = the frozen backbone alone (a click as its raw point prompt); fresh = casam with an empty "
          "registry. Box: the mask's tight box; click: the foreground pixel nearest the mask's centroid.", "",
          f"Command: `{res['command']}` ({res['seconds']:.0f} s).", ""]
    return "\n".join(L)


def table(res: Dict[str, Any]) -> str:
    """The results of :func:`run` as a plain-text table for the terminal."""
    head = f"{'task':34} {'img':>4}  " + "  ".join(f"{p}:{w:<6}" for p in PROMPT_TYPES for w in WAYS) + "  fallback"
    rows = [head, "-" * len(head)]
    for name, t in res["tasks"].items():
        s = t["scores"]
        cells = "  ".join(f"{'–' if s[w][p]['iou'] is None else format(s[w][p]['iou'], '.3f'):>{len(p) + 7}}"
                          for p in PROMPT_TYPES for w in WAYS)
        fb = "–" if t["fallback_rate"] is None else f"{t['fallback_rate']:.2f}"
        rows.append(f"{name[:34]:34} {t['images']:>4}  {cells}  {fb:>8}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Runs ``casam evaluate`` and writes ``evaluate.json`` and ``evaluate.md`` into ``args.out``.

    Args:
        args: the options of :func:`add_parser`, with the backbone and registry options of the ``casam`` command and
            ``argv`` (the command line, for the record).

    Returns:
        The results: per task its scores (:func:`evaluate_task`), with the registry, backbone, command and seconds.

    Raises:
        CasamError: no labelled image in the data folder.
    """
    from casam.model.backbone import load_backbone
    from casam.registry.store import LayerRegistry

    t0 = time.time()
    tasks = find_tasks(args.data, args.split)
    from casam.paths import default_registry

    registry = LayerRegistry(args.registry or default_registry())
    predictor = CASAMPredictor(load_backbone(args.backbone, args.checkpoint, args.device), registry, cache_size=4)
    layers = predictor.layers
    res: Dict[str, Any] = {"data_name": Path(args.data).name, "split": args.split, "backbone": predictor.backbone.id,
                           "layers": len(layers), "layer_names": [i.name for i in layers], "tasks": {}}
    for name, cases in tasks.items():
        res["tasks"][name] = evaluate_task(predictor, cases, args.max_images)
        print(f"[evaluate] {name}: {res['tasks'][name]['images']} images", flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    res["command"] = "casam evaluate " + " ".join(args.argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "evaluate.json.tmp"
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out / "evaluate.json")
    (out / "evaluate.md").write_text(markdown(res))
    print(table(res))
    print(f"[evaluate] wrote {out / 'evaluate.json'} and {out / 'evaluate.md'}")
    return res


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``evaluate`` command to the ``casam`` sub-parsers."""
    e = sub.add_parser("evaluate", help="IoU/Dice of box and click prompts on labelled test images: routed vs "
                                        "plain SAM vs fresh install, with routing counts")
    e.add_argument("data", help="a dataset folder (images/, masks/, meta.csv) or a root with MANIFEST.tsv")
    e.add_argument("--split", default="test", help="meta.csv split to evaluate (test, train or all; default test)")
    e.add_argument("--max-images", type=int, default=None, help="at most this many images per task (evenly spaced)")
    e.add_argument("--out", default="casam-evaluate", help="folder for evaluate.json and evaluate.md")
    return e
