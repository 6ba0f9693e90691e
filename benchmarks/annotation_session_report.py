"""Markdown table and PNG of curves from the arms of ``benchmarks/annotation_session.py``.

Run::

    .venv/bin/python benchmarks/annotation_session_report.py benchmarks/results/annotation_session/*.json \\
        --out benchmarks/results/annotation_session
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np


def _mean(values: List[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return round(float(np.mean(v)), 3) if v else None


def _f(v: Optional[float]) -> str:
    return "?" if v is None else f"{v:.3f}"


def summary(r: Dict[str, Any], cap: int = 8) -> Dict[str, Any]:
    """Per-arm figures: IoU after the first prompt, corrective clicks to 0.8 (cap when never), over the last third."""
    imgs = r["images"]
    last = imgs[len(imgs) - max(1, len(imgs) // 3):]
    out: Dict[str, Any] = {"task": r["task"], "institution": r["institution"], "arm": r["arm"], "n": len(imgs)}
    for who in ("box", "click"):
        out[f"{who}_first_iou"] = _mean([x[who]["first_iou"] for x in imgs])
        out[f"{who}_first_iou_last_third"] = _mean([x[who]["first_iou"] for x in last])
        for t in ("0.8", "0.9"):  # NoC@80 / NoC@90 over the last third
            out[f"{who}_clicks_to_{t}_last_third"] = _mean([x[who][f"clicks_to_{t}"] if x[who][f"clicks_to_{t}"]
                                                            is not None else cap + 1 for x in last])
        out[f"{who}_last_iou_last_third"] = _mean([x[who]["curve"][-1] for x in last])  # after the corrective clicks
        out[f"{who}_clicks_to_0.5_last_third"] = _mean(
            [next((i for i, v in enumerate(x[who]["curve"]) if v >= 0.5), cap + 1) for x in last]
        )
        out[f"{who}_server_s"] = _mean([x[who]["server_s"] for x in imgs])
    out["test_box_iou"] = (r.get("test") or {}).get("box_iou")
    out["test_click_iou"] = (r.get("test") or {}).get("click_iou")
    out["layers"] = [f"{x['layer']} after {x['after_labels']} labels" for x in r.get("layers", [])]
    return out


def markdown(rows: List[Dict[str, Any]], sources: List[str]) -> str:
    head = (
        "| task | arm | images | box: first IoU (last third) | box: clicks to 0.8 / 0.9, last third | click: first "
        "IoU (last third) | click: clicks to 0.8 / 0.9, last third | test box / click IoU | layers |\n" + "|---" * 9
        + "|\n"
    )
    body = "".join(
        f"| {r['task']} ({r['institution']}) | {r['arm']} | {r['n']} | "
        f"{r['box_first_iou']} ({r['box_first_iou_last_third']})"
        f" | {r['box_clicks_to_0.8_last_third']} / {r.get('box_clicks_to_0.9_last_third')} | {r['click_first_iou']} "
        f"({r['click_first_iou_last_third']}) | {r['click_clicks_to_0.8_last_third']} / "
        f"{r.get('click_clicks_to_0.9_last_third')} | {r['test_box_iou']} / {r['test_click_iou']} | "
        f"{'; '.join(r['layers']) or 'none'} |\n"
        for r in rows
    )
    return (
        "# Annotation sessions through the real server\n\nClicks to 0.8 / 0.9 (NoC@80 / NoC@90): corrective clicks "
        "after the first prompt until IoU >= 0.8 / 0.9; 9 = not reached within 8.\n\nFrom: "
        + ", ".join(f"`{s}`" for s in sources)
        + "\n\n"
        + head
        + body
    )


def per_image(r: Dict[str, Any]) -> str:
    """One arm's images in session order: IoU after the first prompt, clicks to 0.8 / 0.9, server seconds."""

    def cell(x: Dict[str, Any]) -> str:
        c8, c9 = (x[f"clicks_to_{t}"] for t in ("0.8", "0.9"))
        return (
            f"{x['first_iou']:.3f} → {x['curve'][-1]:.3f} | {'–' if c8 is None else c8} | "
            f"{'–' if c9 is None else c9} | {x['server_s']:.1f}"
        )

    head = (
        "| # | image | layers served | box: first → last IoU | to 0.8 | to 0.9 | s | one click: first → last IoU"
        " | to 0.8 | to 0.9 | s | waited for training, s |\n" + "|---" * 12 + "|\n"
    )
    rows = "".join(
        f"| {x['order']} | {x['case']} | {', '.join(x['layers_served']) or 'none'} | {cell(x['box'])} | "
        f"{cell(x['click'])} | {x['waited_for_training_s']} |\n"
        for x in r["images"]
    )
    layers = (
        "".join(
            f"- `{x['layer']}` seen after image {x['after_labels']}, trained on {x.get('trained_on')} labelled "
            f"images in {x.get('seconds')} s "
            f"(validation box {_f(x.get('val_iou'))} vs plain {_f(x.get('plain_val_iou'))})\n"
            for x in r.get("layers", [])
        )
        or "- none\n"
    )
    m = r.get("machine") or {}
    machine = (
        f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('torch_threads')} torch threads" if isinstance(m, dict) else m
    )
    return (
        f"## {r['task']} ({r['institution']}), arm {r['arm']}\n\nCommand: `{r.get('command')}`  \nServer: "
        f"`{r.get('server')}`  \nMachine: {machine}\n\nLayers as they appeared:\n{layers}\n"
        f"Test split: box {(r.get('test') or {}).get('box_iou')}, one click {(r.get('test') or {}).get('click_iou')}"
        f"\n\n"
        + (f"Note: {r['note']}.\n\n" if r.get("note") else "")
        + f"– = not reached within the corrective clicks.\n\n{head}{rows}\n"
    )


def targets(rows: List[Dict[str, Any]]) -> str:
    """The session benchmark's targets, checked.

    Vessels: box IoU (last third) >= plain + 0.3 and fewer clicks to 0.8; MRI: >= plain.
    """
    out = []
    for task in sorted({r["task"] for r in rows}):
        arms = {r["arm"]: r for r in rows if r["task"] == task}
        plain = arms.get("plain")
        if plain is None:
            continue
        for arm in ("novelty", "random"):
            r = arms.get(arm)
            if r is None:
                continue
            gain = round(r["box_first_iou_last_third"] - plain["box_first_iou_last_third"], 3)
            clicks = (r["box_clicks_to_0.8_last_third"], plain["box_clicks_to_0.8_last_third"])
            noc90 = {w: (r.get(f"{w}_clicks_to_0.9_last_third"), plain.get(f"{w}_clicks_to_0.9_last_third"))
                     for w in ("box", "click")}
            test = (r["test_box_iou"], plain["test_box_iou"])
            out.append(
                f"- {task}, {arm}: box IoU over the last third {r['box_first_iou_last_third']} vs plain SAM "
                f"{plain['box_first_iou_last_third']} ({gain:+.3f}); corrective clicks to 0.8 {clicks[0]} vs "
                f"{clicks[1]} (9 = never), to 0.9 {noc90['box'][0]} vs {noc90['box'][1]} (one click first: "
                f"{noc90['click'][0]} vs {noc90['click'][1]}), to 0.5 {r['box_clicks_to_0.5_last_third']} vs "
                f"{plain['box_clicks_to_0.5_last_third']}; IoU after the last click {r['box_last_iou_last_third']} "
                f"vs {plain['box_last_iou_last_third']}; test box {test[0]} vs {test[1]}"
            )
    return "## Targets\n\n" + ("\n".join(out) or "- no plain-SAM arm to compare with") + "\n"


def plot(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        colours = {"novelty": "tab:blue", "random": "tab:purple", "plain": "tab:green"}
        for r in (r for r in results if r["task"] == t):
            c = colours.get(r["arm"])
            for prompt, style, name in (("box", dict(marker="o"), "box"), ("click", dict(ls="--"), "one click")):
                ax.plot([x["order"] for x in r["images"]], [x[prompt]["first_iou"] for x in r["images"]],
                        color=c, label=f"{r['arm']}: {name}", **style)
            for layer in r.get("layers", []):  # the first image annotated with the new layer served
                ax.axvline(layer["after_labels"] + 0.5, color=c, lw=0.8, ls=":")
        ax.set(
            title=f"{t}: dotted lines = a new layer served",
            xlabel="image in session order",
            ylabel="IoU after the first prompt",
            ylim=(0, 1),
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="folder for summary.md / summary.json / curves.png")
    args = ap.parse_args()
    results = [json.loads(p.read_text()) for p in args.results]
    rows = [summary(r) for r in results]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    md = (
        markdown(rows, [str(p) for p in args.results])
        + "\n"
        + targets(rows)
        + "\n"
        + "".join(per_image(r) for r in results)
    )
    (args.out / "summary.md").write_text(md)
    plot(results, args.out / "curves.png")
    print(md)


if __name__ == "__main__":
    main()
