#!/usr/bin/env python
"""Compares settings of how casam answers later clicks (``casam.prompts.clicks.ClickConfig``) on click sequences.

Each object of some images per task gets a sequence of clicks as interactive benchmarks score them (the first
at its centre, each next one at the centre of the largest error region, :func:`casam.scoring.protocol.click_sequence`),
answered on plain LiteMedSAM (what a fresh install serves) with each variant of the settings. Meant for the
training splits, so the settings are chosen without the test images that ``benchmarks/continual.py`` reports.

A variant is ``NAME=FIELD=VALUE,FIELD=VALUE`` (values as Python literals; ``shipped=`` is the defaults).

Example (the committed result: benchmarks/results/click_sequences.json)::

    python benchmarks/click_sequences.py --images 12 --cache /tmp/exp/cache \\
        --variant shipped= --variant "best_edit_alone=edit_fuse=None,fill=None"
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch

from casam.prompts.clicks import ClickConfig
from casam.scoring.protocol import summarise
from casam.scoring.score import sequences
from click_chooser import run_record, split_samples


def parse_variant(text: str) -> Tuple[str, Dict[str, Any]]:
    """``NAME=FIELD=VALUE,FIELD=VALUE`` → (name, ClickConfig keyword arguments).

    Raises:
        ValueError: no name, or a field ClickConfig does not have.
    """
    name, _, rest = text.partition("=")
    if not name:
        raise ValueError(f"a variant needs a name: {text!r}")
    kwargs: Dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        field, _, value = item.partition("=")
        if field not in ClickConfig.__dataclass_fields__:
            raise ValueError(f"ClickConfig has no field {field!r}")
        kwargs[field] = ast.literal_eval(value)
    return name, kwargs


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"# Click sequences ({result['split']} splits, {result['images_per_task']} images per task, plain "
             "LiteMedSAM)", "", f"`{result['command']}` — {result['machine']['cpu']}, {result['machine']['cores']} "
             f"cores, {result['seconds']} s", "", "| variant | settings | IoU after clicks 1 → "
             f"{result['clicks']} | AUC | never drops |", "|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | `{v['settings'] or 'defaults'}` | {' / '.join(f'{x:.3f}' for x in v['mean_iou'])} "
                     f"| {v['auc_iou']:.3f} | {'yes' if v['monotone'] else 'no'} |")
    lines += ["", "Per task, IoU after each click:", ""]
    for name, v in result["variants"].items():
        for task, s in v["per_task"].items():
            lines.append(f"- {name}, {task} ({s['n']} objects): {' / '.join(f'{x:.3f}' for x in s['iou'])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--split", default="train", choices=("train", "val", "test"))
    ap.add_argument("--images", type=int, default=12, help="images per task, spread over the split")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--variant", action="append", default=None, help="NAME=FIELD=VALUE,... (repeatable)")
    ap.add_argument("--cache", default=None, help="embedding cache folder (saves re-encoding)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "click_sequences.json"))
    a = ap.parse_args(argv)
    variants = dict(parse_variant(v) for v in (a.variant or ["shipped="]))
    torch.set_num_threads(a.threads)
    t0 = time.time()
    bb, samples = split_samples(a.data, a.cache, {a.split: a.images})
    data = samples[a.split]
    out: Dict[str, Any] = {}
    for name, kwargs in variants.items():
        cfg = ClickConfig(**kwargs)
        per_task = {t: summarise([q for s in S for q in sequences(bb, None, s, a.clicks, config=cfg)])
                    for t, S in data.items()}
        mean = np.mean([v["iou"] for v in per_task.values()], 0)
        out[name] = {"settings": kwargs, "mean_iou": [round(float(x), 4) for x in mean],
                     "auc_iou": round(float(np.mean(mean)), 4), "monotone": bool(np.all(np.diff(mean) >= -1e-9)),
                     "per_task": per_task}
        print(name, out[name]["mean_iou"], f"{time.time() - t0:.0f}s", flush=True)
    result = {
        "what": "mean IoU after each click of click sequences (first click at the object's centre, each next one at "
                "the centre of the largest error region), mean over tasks; plain LiteMedSAM",
        **run_record("click_sequences.py", argv, t0),
        "split": a.split, "images_per_task": a.images, "clicks": a.clicks,
        "variants": out,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    Path(a.out).with_suffix(".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
