"""Reports: the number format of casam's evaluation reports (:func:`fmt`, also ``casam evaluate``'s) and the
continual benchmark's Markdown tables, R heatmaps, interaction-sequence curves and atomic JSON write."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np


def fmt(v: Optional[float], nd: int = 3, signed: bool = False) -> str:
    """A number for a report: ``nd`` decimals (with its sign if ``signed``), ``–`` for a missing one."""
    if v is None:
        return "–"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def markdown(res: Dict[str, Any]) -> str:
    """The continual benchmark's results as Markdown: summary table, final rows, sequences, router, targets."""
    names = res["tasks"]
    L = [f"# Continual stream benchmark ({res['backbone']['name']})", ""]
    if res.get("partial"):
        L += ["**Partial results: the run is still going (or stopped early).**", ""]
    L += [f"Tasks in stream order: {', '.join(f'`{n}`' for n in names)}.", "",
          f"Recipe: {res['recipe']['kind']}.", "",
          "| method | Avg-IoU (box) | BWT (box) | Avg-Dice | Avg-bIoU | Avg-IoU (click) | BWT (click) | "
          "unseen Δ vs zero-shot | train s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for m, e in res["methods"].items():
        L.append(f"| {e['label']} | {fmt(e['avg_iou'])} | {fmt(e['bwt'], signed=True)} | {fmt(e.get('avg_dice'))} | "
                 f"{fmt(e.get('avg_biou'))} | {fmt(e['avg_iou_click'])} | {fmt(e['bwt_click'], signed=True)} | "
                 f"{fmt(e.get('unseen_delta'), signed=True)} | {e['seconds'].get('train', 0):.0f} |")
    L += ["", "Final row (IoU per task after the last task, box prompt):", "",
          "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m, e in res["methods"].items():
        last = e["R"][-1] if e["R"] else []
        L.append(f"| {m} | " + " | ".join(fmt(v) for v in last) + " |")
    L += ["", "Final row, one click:", "", "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m, e in res["methods"].items():
        last = e["R_click"][-1] if e.get("R_click") else []
        L.append(f"| {m} | " + " | ".join(fmt(v) for v in last) + " |")
    L += sequence_markdown(res.get("click_sequences") or {})
    r = res.get("router") or {}
    if "accuracy" in r:
        L += ["", f"Router after the last task, on the test images of every task: accuracy **{fmt(r['accuracy'])}**, "
              f"fallback rate {fmt(r['fallback_rate'])} ({r['n_images']} images).", "",
              "| true task \\ chosen | " + " | ".join(r["confusion_columns"]) + " |",
              "|---|" + "---|" * len(r["confusion_columns"])]
        for n in names:
            L.append(f"| {n} | " + " | ".join(str(r["confusion"][n][c]) for c in r["confusion_columns"]) + " |")
        mc = r.get("modality_confusion")
        if mc:
            cols = sorted({c for row in mc.values() for c in row if c != "fallback"}) + ["fallback"]
            L += ["", "The same by modality (image's modality \\ modality of the layer it went to):", "",
                  "| modality \\ chosen | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            for m, row in mc.items():
                L.append(f"| {m} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
    if r.get("per_step"):
        L += ["", "| after task | router accuracy on seen tasks | fallback on unseen tasks | "
              "fallback on new modalities | "
              "to another modality's layer | τ | "
              "val box (layer / plain) | val click (layer / plain) | layer used for | best epoch | "
              "s to serve its labelled images |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in r["per_step"]:
            val, use = s.get("val") or {}, s.get("use") or {}
            vb, vc = val.get("box") or {}, val.get("click") or {}
            serve = (s.get("seconds_to_serve") or {}).get("total")
            L.append(f"| {s['after']} | {fmt(s['seen_accuracy'])} | {fmt(s['unseen_fallback_rate'])} | "
                     f"{fmt(s.get('new_modality_fallback_rate'))} | {s.get('other_modality_layer', '–')} of "
                     f"{s.get('seen_modality_total', '–')} | {s['tau']:.4g} | {fmt(vb.get('layer'))} / "
                     f"{fmt(vb.get('plain'))} | {fmt(vc.get('layer'))} / {fmt(vc.get('plain'))} | "
                     f"{', '.join(p for p, u in use.items() if u) or 'nothing (plain SAM)'} | {s.get('best_epoch')} | "
                     f"{'–' if serve is None else f'{serve:.0f}'} |")
    if res.get("targets"):
        L += ["", "| target | value | met |", "|---|---|---|"]
        for t in res["targets"].values():
            v = t.get("value")
            v = fmt(v, 4) if isinstance(v, float) and not isinstance(v, bool) else v
            if t.get("all_tasks") is not None:  # a target stated for the tasks plain SAM does
                v = f"{v} (all tasks {fmt(t['all_tasks'], 4)})"
            if t.get("where"):
                v = f"{v} ({t['where']})"
            if t.get("tasks_falling") is not None:
                v = f"{v} (tasks whose own curve falls: {t['tasks_falling']})"
            L.append(f"| {t['target']} | {v} | "
                     f"{'yes' if t['met'] else ('no' if t['met'] is False else '–')} |")
    mach = res["machine"]
    L += ["", f"Alignment Layer: {res['layer']['params']:,} parameters, {res['layer']['gmac']} GMAC per image.", "",
          "Command:", "", "```", res["command"], "```", "",
          f"Machine: {mach['cpu']}, {mach['cores']} cores ({mach['torch_threads']} torch threads), "
          f"torch {mach['torch']}, "
          f"device {mach['device']}{', ' + mach['gpu'] if mach.get('gpu') else ' (no GPU)'}. "
          f"Wall time {res['seconds'] / 60:.1f} min (encoding {res['encode_seconds'] / 60:.1f} min).", "",
          "R[k][j] = mean IoU on task j's test split after learning task k. "
          "BWT = mean over j < T of R[T][j] − R[j][j]. "
          "Unseen Δ = mean over k < j of R[k][j] − zero-shot[j] (how a method treats tasks it has not learned yet). "
          "Full matrices (IoU, Dice, boundary IoU; box and click prompts) are in the JSON.", ""]
    return "\n".join(L)


PROTOCOL_WORDS = {"box": "tight box first", "click": "centre click first"}


def sequence_markdown(seqs: Dict[str, Any]) -> List[str]:
    """The interaction sequences as Markdown lines: per protocol, a table method × step (mean over tasks: IoU after
    the first prompt and each corrective click, AUC, NoC@80, NoC@90, seconds per answer) and a table task × method
    (first answer → last step, AUC, NoC@90).

    Args:
        seqs: protocol → method → ``per_task`` and ``mean`` (the results' ``click_sequences``).

    Returns:
        The lines (none without sequences).
    """
    L: List[str] = []
    for p, methods in seqs.items():
        if not methods:
            continue
        n = max(len(v["mean"]["iou"]) for v in methods.values())
        first = "box" if p == "box" else "click"
        steps = [first] + [f"+{i} clicks" if i > 1 else "+1 click" for i in range(1, n)]
        L += ["", f"Interaction sequences after the last task, {PROTOCOL_WORDS.get(p, p)}, then {n - 1} corrective "
              "clicks (each at the centre of the largest error region); mean IoU over tasks after each step:", "",
              "| method | " + " | ".join(steps) + " | AUC | NoC@80 | NoC@90 | s per answer |",
              "|---|" + "---|" * (n + 4)]
        for m, v in methods.items():
            mean = v["mean"]
            sec = mean.get("seconds") or []
            L.append(f"| {m} | " + " | ".join(fmt(x) for x in mean["iou"]) + f" | {fmt(mean['auc_iou'])} | "
                     f"{fmt(mean.get('noc80'), 2)} | {fmt(mean.get('noc90'), 2)} | "
                     f"{fmt(float(np.mean(sec)) if sec else None)} |")
        tasks = list(dict.fromkeys(t for v in methods.values() for t in v["per_task"]))
        L += ["", f"Per task, {PROTOCOL_WORDS.get(p, p)}: IoU of the first answer → after the last click "
              "(AUC, NoC@90):", "", "| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for task in tasks:
            cells = []
            for v in methods.values():
                s = v["per_task"].get(task) or {}
                cells.append(f"{fmt(s['iou'][0])} → {fmt(s['iou'][-1])} ({fmt(s.get('auc_iou'))}, "
                             f"{fmt(s.get('noc90'), 2)})" if s.get("iou") else "–")
            L.append(f"| {task} | " + " | ".join(cells) + " |")
    if L:
        L += ["", "NoC@80 / NoC@90: steps (the first prompt counts as one) until IoU reaches 0.8 / 0.9, the steps + 1 "
              "when it never does; AUC: mean IoU over the steps; s per answer: mean seconds of one answer (0 once a "
              "mask is exact)."]
    return L


def plot_figure(res: Dict[str, Any], path: Path) -> None:
    """Draws the R heatmap of every method (box-prompt IoU) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(res["methods"].items())
    if not methods:
        return
    names = res["tasks"]
    T = len(names)
    ncol = min(3, len(methods))
    nrow = (len(methods) + ncol - 1) // ncol
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(3.6 * ncol + 2, 3.8 * nrow), squeeze=False, layout="constrained"
    )
    short = [n.replace("brain_mri_lgg@", "lgg@").replace("dermoscopy_", "").replace("fetal_head_", "fetal_")
             for n in names]
    im = None
    for i, (ax, (m, e)) in enumerate(zip(axes.flat, methods)):
        A = np.full((T, T), np.nan)
        for k, row in enumerate(e["R"]):
            for j, v in enumerate(row):
                if v is not None:
                    A[k, j] = v
        im = ax.imshow(np.ma.masked_invalid(A), vmin=0, vmax=1, cmap="viridis")
        for k in range(T):
            for j in range(T):
                if not np.isnan(A[k, j]):
                    ax.text(j, k, f"{A[k, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if A[k, j] < 0.6 else "black")
        bwt = "–" if e["bwt"] is None else f"{e['bwt']:+.3f}"
        avg = "–" if e["avg_iou"] is None else f"{e['avg_iou']:.3f}"
        ax.set_title(f"{e['label']}\nAvg-IoU {avg}, BWT {bwt}", fontsize=8)
        ax.set_xticks(range(T), short, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(T), [f"after {s}" for s in short] if i % ncol == 0 else [], fontsize=7)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="IoU (box prompt)")
    fig.suptitle(f"Continual stream R[k][j] ({res['backbone']['name']}, {res['recipe']['epochs']} epochs, "
                 f"lr {res['recipe']['lr']:g})", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_sequences(res: Dict[str, Any], path: Path) -> bool:
    """Draws the interaction sequences per task into a PNG: one panel per task, IoU after each step, a colour per
    method, solid for the box-first protocol and dashed for the click-first one.

    Args:
        res: the results, with ``click_sequences`` (protocol → method → ``per_task``).
        path: the PNG to write.

    Returns:
        Whether a figure was written (not without sequences).
    """
    seqs = res.get("click_sequences") or {}
    tasks = list(dict.fromkeys(t for ms in seqs.values() for v in ms.values() for t in v["per_task"]))
    if not tasks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    methods = list(dict.fromkeys(m for ms in seqs.values() for m in ms))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    styles = {"box": "-", "click": "--"}
    ncol = min(3, len(tasks))
    nrow = (len(tasks) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False, layout="constrained")
    n = max(len((v["per_task"].get(t) or {}).get("iou") or []) for ms in seqs.values() for v in ms.values()
            for t in tasks)
    for ax, task in zip(axes.flat, tasks):
        for p, ms in seqs.items():
            for m, v in ms.items():
                iou = (v["per_task"].get(task) or {}).get("iou") or []
                if iou:
                    ax.plot(range(len(iou)), iou, styles.get(p, ":"), color=colours[m], marker=".", alpha=0.85)
        ax.set_title(task, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xticks(range(n), ["first"] + [f"+{i}" for i in range(1, n)], fontsize=7)
        ax.set_xlabel("step (first prompt, then corrective clicks)", fontsize=7)
        ax.set_ylabel("IoU", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colours[m], marker=".", label=m) for m in methods]
    handles += [Line2D([], [], color="grey", linestyle=styles.get(p, ":"), label=f"{p} first") for p in seqs]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7)
    fig.suptitle(f"Interaction sequences after the last task ({res['backbone']['name']}): solid = box first, "
                 "dashed = centre click first", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_outputs(out_dir: Path, name: str, res: Dict[str, Any], figure: bool = True) -> None:
    """Writes <name>.json (atomically), <name>.md and, with ``figure``, the R heatmaps <name>_R.png and, once the
    results have interaction sequences, their per-task curves <name>_clicks.png."""
    js = out_dir / f"{name}.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, js)
    (out_dir / f"{name}.md").write_text(markdown(res))
    if figure:
        plot_figure(res, out_dir / f"{name}_R.png")
        plot_sequences(res, out_dir / f"{name}_clicks.png")
