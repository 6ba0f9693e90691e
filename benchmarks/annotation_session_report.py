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


def summary(r: Dict[str, Any], cap: int = 8) -> Dict[str, Any]:
    """Per-arm figures: IoU after the first prompt, corrective clicks to 0.8 (cap when never), over the last third."""
    imgs = r["images"]
    last = imgs[len(imgs) - max(1, len(imgs) // 3):]
    out: Dict[str, Any] = {"task": r["task"], "institution": r["institution"], "arm": r["arm"], "n": len(imgs)}
    for who in ("box", "click"):
        out[f"{who}_first_iou"] = _mean([x[who]["first_iou"] for x in imgs])
        out[f"{who}_first_iou_last_third"] = _mean([x[who]["first_iou"] for x in last])
        out[f"{who}_clicks_to_0.8_last_third"] = _mean([x[who]["clicks_to_0.8"] if x[who]["clicks_to_0.8"] is not None
                                                        else cap + 1 for x in last])
        out[f"{who}_server_s"] = _mean([x[who]["server_s"] for x in imgs])
    out["test_box_iou"] = (r.get("test") or {}).get("box_iou")
    out["test_click_iou"] = (r.get("test") or {}).get("click_iou")
    out["layers"] = [f"{x['layer']} after {x['after_labels']} labels" for x in r.get("layers", [])]
    return out


def markdown(rows: List[Dict[str, Any]], sources: List[str]) -> str:
    head = ("| task | arm | images | box: first IoU (last third) | box: clicks to 0.8, last third | click: first IoU "
            "(last third) | click: clicks to 0.8, last third | test box / click IoU | layers |\n" + "|---" * 9 + "|\n")
    body = "".join(
        f"| {r['task']} ({r['institution']}) | {r['arm']} | {r['n']} | {r['box_first_iou']} ({r['box_first_iou_last_third']})"
        f" | {r['box_clicks_to_0.8_last_third']} | {r['click_first_iou']} ({r['click_first_iou_last_third']}) | "
        f"{r['click_clicks_to_0.8_last_third']} | {r['test_box_iou']} / {r['test_click_iou']} | "
        f"{'; '.join(r['layers']) or 'none'} |\n" for r in rows)
    return ("# Annotation sessions through the real server\n\nClicks to 0.8: corrective clicks after the first prompt "
            "until IoU >= 0.8; 9 = not reached within 8.\n\nFrom: " + ", ".join(f"`{s}`" for s in sources) +
            "\n\n" + head + body)


def plot(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for r in (r for r in results if r["task"] == t):
            ax.plot([x["order"] for x in r["images"]], [x["box"]["first_iou"] for x in r["images"]], marker="o",
                    label=f"{r['arm']}: box")
            ax.plot([x["order"] for x in r["images"]], [x["click"]["first_iou"] for x in r["images"]], ls="--",
                    label=f"{r['arm']}: one click")
        ax.set(title=t, xlabel="image in session order", ylabel="IoU after the first prompt", ylim=(0, 1))
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
    (args.out / "summary.md").write_text(markdown(rows, [str(p) for p in args.results]))
    plot(results, args.out / "curves.png")
    print(markdown(rows, [str(p) for p in args.results]))


if __name__ == "__main__":
    main()
