"""The continual benchmark's results, read from a :class:`~casam.evaluation.stages.BenchmarkState`.

:func:`assemble` builds the JSON-safe results (after every task with ``partial``, and at the end), with each
method's R matrices and summaries (:func:`method_results`), the router's record (:func:`router_results`), the
recipe (:func:`recipe`) and the project's targets (:func:`targets`); :func:`final_results` adds the interaction
sequences (box or centre click first, then corrective clicks) and their targets (:func:`sequence_targets`).
"""

from __future__ import annotations

import shlex
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from casam.data.datasets import Task
from casam.evaluation.provenance import json_safe, machine_info
from casam.evaluation.stages import CASAM_METHODS, SEQUENCE_PROTOCOLS, BenchmarkState
from casam.model.alignment import describe
from casam.prompts.masks import PROMPT_TYPES
from casam.scoring.metrics import continual_summary
from casam.training.config import TrainConfig

__all__ = ["LABELS", "FALLBACK", "TARGET_BWT", "TARGET_BOX_TASK_DROP", "TARGET_CLICK", "TARGET_FRESH_CLICK",
           "TARGET_FRESH_BOX_DROP", "TARGET_REGRET", "TARGET_UNSEEN_FALLBACK", "TARGET_SEQUENCE",
           "TARGET_SEQUENCE_MARGIN", "TARGET_HARD_CLICKS_GAIN", "TARGET_SERVE_SECONDS", "TARGET_HARD_ZERO_SHOT",
           "TARGET_HARD_BOX", "method_results", "router_results", "modality_confusion", "assemble", "final_results",
           "recipe", "targets", "sequence_targets"]

LABELS = {
    "zero_shot": "1. frozen backbone (zero-shot)",
    "fresh_install": "0. casam, empty registry (fresh install)",
    "seq_decoder": "2. sequential decoder fine-tuning",
    "seq_layer": "3. one shared Alignment Layer, sequential",
    "casam": "4. CA-SAM (router)",
    "casam_oracle": "5. CA-SAM (oracle task id)",
    "joint": "6. joint multi-task layer (non-continual)",
}
FALLBACK = "fallback"
# The project's targets (checked by :func:`targets`; see benchmarks/README.md).
TARGET_BWT = -0.005
TARGET_BOX_TASK_DROP = 0.01
TARGET_CLICK = 0.80
TARGET_FRESH_CLICK = 0.70
TARGET_FRESH_BOX_DROP = 0.005
TARGET_REGRET = 0.005
TARGET_UNSEEN_FALLBACK = 0.90
TARGET_SEQUENCE = 0.90  # CA-SAM's IoU after the box and the corrective clicks, on the tasks plain SAM does
TARGET_SEQUENCE_MARGIN = 0.005  # CA-SAM below a fresh install after any step of an interaction sequence, at most
TARGET_HARD_CLICKS_GAIN = 0.05  # on a task plain SAM fails at, what the clicks after the box add, at least
TARGET_SERVE_SECONDS = 300
TARGET_HARD_ZERO_SHOT = 0.5  # a task plain SAM fails at (its zero-shot box IoU below this, e.g. retinal vessels) ...
TARGET_HARD_BOX = 0.55  # ... which an institution's layer must teach it
NOTES = {
    "joint": ("non-continual upper bound: one layer trained once on every task's training images and "
              "evaluated once; each row of R repeats that final row, so BWT is not defined (null)"),
    "zero_shot": "no training: every row of R is the same",
    "casam_oracle": ("the layer of the image's own task (layers are immutable, so row k repeats R[j][j]); on tasks "
                     "not yet learned it has no layer and uses plain SAM"),
    "casam": ("the VAE router picks the layer (lowest score; plain SAM when the score is above that layer's tau); "
              "the layer decodes only the prompt types where it beat plain SAM on its validation split; "
              "each (layer, image) prediction is computed once and reused, since layers never change"),
    "fresh_install": "the product with an empty registry: plain SAM for boxes, casam.prompts.clicks for clicks",
}


def _summary(R: List[List[Optional[float]]]) -> Dict[str, Optional[float]]:
    if not R or any(v is None for v in R[-1]):
        return {"avg": None, "bwt": None, "forgetting": None}
    return continual_summary(R)


def _unseen_delta(R_all: List[List[Optional[float]]], zs: List[Optional[float]]) -> Optional[float]:
    """Mean over k < j of R[k][j] − zero-shot[j]: the change on not-yet-learned tasks versus the frozen backbone."""
    d = [R_all[k][j] - zs[j] for k in range(len(R_all)) for j in range(k + 1, len(R_all[k]))
         if R_all[k][j] is not None and zs[j] is not None]
    return float(np.mean(d)) if d else None


def method_results(state: BenchmarkState) -> Dict[str, Any]:
    """Each method with at least one row done: its R matrices (IoU, Dice, boundary IoU; box and click; lower
    triangle and with the unseen tasks), Avg-IoU and BWT (Avg only once the last row is done), forgetting, the
    change on unseen tasks against zero-shot, seconds, loss histories and a note."""
    T = state.T
    zs_box = [r["box"]["iou"] for r in state.zs_res]
    zs_pt = [r["click"]["iou"] for r in state.zs_res]
    out_methods: Dict[str, Any] = {}
    for m in state.methods:
        g = state.grids[m]
        if g.rows_done() == 0:
            continue
        n = g.rows_done()
        R = g.matrix("box", "iou")[:n]
        Rp = g.matrix("click", "iou")[:n]
        s, sp = _summary(R), _summary(Rp)
        entry = {
            "label": LABELS[m],
            "R": R, "avg_iou": s["avg"], "bwt": s["bwt"], "forgetting": s["forgetting"],
            "R_click": Rp, "avg_iou_click": sp["avg"], "bwt_click": sp["bwt"],
            "R_dice": g.matrix("box", "dice")[:n], "R_biou": g.matrix("box", "biou")[:n],
            "R_dice_click": g.matrix("click", "dice")[:n], "R_biou_click": g.matrix("click", "biou")[:n],
            "R_all": g.matrix("box", "iou", lower=False)[:n], "R_all_click": g.matrix("click", "iou", lower=False)[:n],
            "seconds": {k: round(v, 1) for k, v in state.seconds[m].items()},
            "loss_history": state.losses[m],
        }
        last = g.matrix("box", "dice")[n - 1]
        entry["avg_dice"] = float(np.mean(last)) if n == T and None not in last else None
        last = g.matrix("box", "biou")[n - 1]
        entry["avg_biou"] = float(np.mean(last)) if n == T and None not in last else None
        if n < T:
            entry["avg_iou"] = entry["avg_iou_click"] = None  # only the final row after the last task counts
        entry["unseen_delta"] = _unseen_delta(entry["R_all"], zs_box)
        entry["unseen_delta_click"] = _unseen_delta(entry["R_all_click"], zs_pt)
        if m == "joint":
            entry["bwt"] = entry["bwt_click"] = entry["forgetting"] = None
            entry["unseen_delta"] = entry["unseen_delta_click"] = None
        if m in NOTES:
            entry["note"] = NOTES[m]
        out_methods[m] = entry
    return out_methods


def router_results(state: BenchmarkState, methods: Dict[str, Any]) -> Dict[str, Any]:
    """CA-SAM's router: after the last task, its accuracy, fallback rate and confusion (by task and by modality,
    :func:`modality_confusion`) on every task's test images; per step (:func:`casam.evaluation.stages.router_step`),
    the lowest fallback rate on new modalities and the most images routed to another modality's layer; the regret
    against the oracle (from ``methods``, :func:`method_results`) and the layers' taus."""
    names, T = state.names, state.T
    router: Dict[str, Any] = {}
    if state.final_routes and len(state.route_steps) == T:
        cols = names + [FALLBACK]
        conf = {n: {c: 0 for c in cols} for n in names}
        correct = total = fb = 0
        for j, rs in enumerate(state.final_routes):
            for r in rs:
                conf[names[j]][FALLBACK if r is None else names[r]] += 1
                correct += int(r == j)
                fb += int(r is None)
                total += 1
        router = {"accuracy": correct / total if total else None, "fallback_rate": fb / total if total else None,
                  "confusion": conf, "confusion_columns": cols, "n_images": total,
                  "modality_confusion": modality_confusion(conf, state.tasks),
                  "note": "test images of every task after the last task; correct = routed to its own task's layer "
                          "(fallback counts as wrong)"}
    if state.route_steps:
        router["per_step"] = state.route_steps
        rates = [st["new_modality_fallback_rate"] for st in state.route_steps
                 if st.get("new_modality_fallback_rate") is not None]
        router["new_modality_fallback_min"] = min(rates) if rates else None
        router["other_modality_layer_max"] = max((st.get("other_modality_layer", 0) for st in state.route_steps),
                                                 default=None)
        fin = {m: methods.get(m, {}) for m in CASAM_METHODS}
        if all(fin[m].get("avg_iou") is not None for m in fin):
            router["regret"] = {"box": fin["casam_oracle"]["avg_iou"] - fin["casam"]["avg_iou"],
                                "click": fin["casam_oracle"]["avg_iou_click"] - fin["casam"]["avg_iou_click"]}
        router["taus"] = [i.tau for i in state.infos]
    return router


def modality_confusion(conf: Dict[str, Dict[str, int]], tasks: Sequence[Task]) -> Dict[str, Dict[str, int]]:
    """The router's task confusion summed by modality: rows the image's modality, columns the modality of the
    layer it went to (or the fallback)."""
    mod = {t.name: t.modality for t in tasks}
    out: Dict[str, Dict[str, int]] = {}
    for name, row in conf.items():
        dst = out.setdefault(mod[name], {})
        for col, n in row.items():
            key = col if col == FALLBACK else mod[col]
            dst[key] = dst.get(key, 0) + n
    return out


def assemble(state: BenchmarkState, partial: bool) -> Dict[str, Any]:
    """The results of the run so far, JSON-safe.

    Args:
        state: the run.
        partial: the run is still going (written after every task); the targets are then left empty.

    Returns:
        Backbone, tasks and their data, the prompts and metrics, every method's results, the router, the layer's
        size, the machine, the command, seconds, the recipe and the targets.
    """
    args, bb = state.args, state.bb
    out_methods = method_results(state)
    router = router_results(state, out_methods)
    params, gmac = describe(bb.embed_dim, bb.embed_size)
    res: Dict[str, Any] = {
        "benchmark": "continual stream",
        "partial": partial,
        "backbone": {"name": bb.name, "id": bb.id, "img_size": bb.img_size, "embed_size": bb.embed_size},
        "tasks": state.names,
        "task_data": state.counts,
        "prompts": {"box": "tight ground-truth box per class",
                    "click": "one click at the foreground pixel nearest the mask centroid, answered as each method "
                             "answers clicks (zero_shot: the decoder's raw point prompt; the others: "
                             "casam.prompts.clicks box proposals)",
                    "sequences": f"after the last task, per object: the tight box (protocol box) or the centre click "
                                 f"(protocol click), then {args.clicks} corrective clicks, each at the centre of the "
                                 "largest error region (CVPR 2025 interactive segmentation challenge); IoU, Dice and "
                                 "seconds after each step, AUC = mean IoU over the steps, NoC@80/90 = steps to reach "
                                 "IoU 0.8/0.9 (steps + 1 when never)"},
        "metrics": "IoU per mask averaged over the task's test masks; R[k][j] = after learning task k, on task j (rows "
                   "lower-triangular); R_all also has the not-yet-seen tasks; avg_iou = mean of the last row; "
                   "bwt = mean_j<T R[T][j] - R[j][j]; unseen_delta = mean over k<j of R_all[k][j] - zero-shot[j]",
        "methods": out_methods,
        "router": router,
        "layer": {"params": params, "gmac": round(gmac, 3),
                  "note": f"one Alignment Layer at {bb.embed_size}x{bb.embed_size} (casam.model.alignment.describe)"},
        "machine": machine_info(args.device),
        "command": " ".join([state.prog] + [shlex.quote(a) for a in state.argv]),
        "seconds": round(time.time() - state.t_start, 1),
        "encode_seconds": round(state.encode_s, 1),
        "recipe": recipe(args, state.cfg),
    }
    res["targets"] = targets(out_methods, router, {}) if not partial else {}
    return json_safe(res)


def final_results(state: BenchmarkState) -> Dict[str, Any]:
    """The results after the last stage: :func:`assemble`, the interaction sequences (``click_sequences``: protocol
    → method → ``per_task`` and ``mean``, :func:`casam.evaluation.stages.sequences`) and the targets they
    complete."""
    results = assemble(state, partial=False)
    results["click_sequences"] = json_safe(state.seq_res)
    results["targets"] = targets(results["methods"], results["router"], state.seq_res)
    return results


def recipe(args, cfg: TrainConfig) -> Dict[str, Any]:
    """The recipe of the run, and which kind it is.

    Args:
        args: the resolved options (:func:`casam.evaluation.benchmark.resolve`).
        cfg: the training settings of every trained method.

    Returns:
        ``kind`` (quick smoke run, CA-SAM's recipe or the reduced CPU recipe) and the settings.
    """
    full = TrainConfig().epochs
    if args.quick:
        kind = "quick smoke run (tiny random backbone; numbers are meaningless)"
    elif cfg.epochs == full and cfg.max_images is None and not args.max_train_cases:
        kind = f"CA-SAM's recipe ({full} epochs, all training images)"
    else:
        kind = (f"reduced CPU recipe: {cfg.epochs} epochs on at most {cfg.max_images or 'all'} training images per "
                f"task (CA-SAM's recipe: {full} epochs on all training images); the same images and steps for every "
                "trained method")
    return {"kind": kind, "epochs": cfg.epochs, "clicks": args.clicks, "sequence_cases": args.sequence_cases,
            "max_images": cfg.max_images, "max_train_cases": args.max_train_cases,
            "max_test_cases": args.max_test_cases, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
            "val_fraction": cfg.val_fraction, "vae_epochs": cfg.vae_epochs, "vae_beta": cfg.vae_beta,
            "tau_folds": cfg.tau_folds, "tau_percentile": cfg.tau_percentile,
            "prompt_mix": f"box p={cfg.box_prob} (±{cfg.jitter:g} px jitter) else central point",
            "gate_lr": cfg.gate_lr, "select_best": cfg.select_best,
            "joint": "one layer, the same epochs over the union of the tasks' training images"}


def targets(methods: Dict[str, Any], router: Dict[str, Any], seqs: Dict[str, Any]) -> Dict[str, Any]:
    """The project's targets, each with its value and whether it is met.

    Args:
        methods: :func:`method_results`.
        router: :func:`router_results`.
        seqs: the interaction sequences (:func:`casam.evaluation.stages.sequences`; empty before them), whose
            targets :func:`sequence_targets` checks.

    Returns:
        Target key → {``target`` (in words), ``value``, ``met`` (None without a value)}, some with ``all_tasks``
        (the value over every task, beside a target stated for the tasks plain SAM does), ``where`` (the worst task
        and step) or ``tasks_falling``.
    """
    def get(m: str, key: str):
        return methods.get(m, {}).get(key)

    def check(target: str, value, met) -> Dict[str, Any]:
        return {"target": target, "value": value, "met": None if value is None else bool(met)}

    t: Dict[str, Any] = {}
    ca, zs = get("casam", "avg_iou"), get("zero_shot", "avg_iou")
    t["casam_box_vs_zero_shot"] = check("CA-SAM box Avg-IoU >= frozen backbone",
                                        None if ca is None or zs is None else ca - zs,
                                        ca is not None and zs is not None and ca >= zs)
    R, Z = get("casam", "R"), get("zero_shot", "R")
    worst = min(a - b for a, b in zip(R[-1], Z[-1])) if R and Z and len(R[-1]) == len(Z[-1]) else None
    t["casam_box_per_task"] = check(f"no task's final CA-SAM box IoU more than {TARGET_BOX_TASK_DROP} below the "
                                    "frozen backbone",
                                    worst, worst is not None and worst >= -TARGET_BOX_TASK_DROP)
    # The click targets promise what casam does on tasks plain SAM can do; a task it fails at (its zero-shot box
    # below TARGET_HARD_ZERO_SHOT: retinal vessels) has its own target below, and the all-task value is kept beside.
    every = list(range(len(Z[-1]))) if Z else []
    hard = [j for j in every if Z[-1][j] is not None and Z[-1][j] < TARGET_HARD_ZERO_SHOT]
    sam_tasks = [j for j in every if Z[-1][j] is not None and j not in hard] or every
    where = "" if sam_tasks == every else f" on the tasks plain SAM does (zero-shot box >= {TARGET_HARD_ZERO_SHOT})"

    def restricted(target: Dict[str, Any], all_tasks) -> Dict[str, Any]:
        """A target stated for ``sam_tasks``, with its value over every task beside when that is another set."""
        return {**target, "all_tasks": all_tasks} if where else target

    def click_avg(m: str):
        rc = get(m, "R_click")
        return round(float(np.mean([rc[-1][j] for j in sam_tasks])), 6) if rc and sam_tasks else None

    for key, m, goal in (("casam_click", "casam", TARGET_CLICK),
                         ("fresh_install_click", "fresh_install", TARGET_FRESH_CLICK)):
        v = click_avg(m)
        name = "CA-SAM" if m == "casam" else "fresh install"
        t[key] = restricted(check(f"{name} click Avg-IoU >= {goal}{where}", v, v is not None and v >= goal),
                            get(m, "avg_iou_click"))
    fb = get("fresh_install", "avg_iou")
    v = None if fb is None or zs is None else fb - zs
    t["fresh_install_box"] = check(f"fresh install box Avg-IoU >= zero-shot - {TARGET_FRESH_BOX_DROP}", v,
                                   v is not None and v >= -TARGET_FRESH_BOX_DROP)
    for p in PROMPT_TYPES:
        v = (router.get("regret") or {}).get(p)
        t[f"router_regret_{p}"] = check(f"router regret (oracle - router) <= {TARGET_REGRET} on {p} prompts", v,
                                        v is not None and v <= TARGET_REGRET)
    v = get("casam", "bwt")
    t["casam_bwt"] = check(f"CA-SAM BWT >= {TARGET_BWT}", v, v is not None and v >= TARGET_BWT)
    v = router.get("new_modality_fallback_min")
    t["new_modality_fallback"] = check(f"images of a modality no layer was trained on fall back >= "
                                       f"{TARGET_UNSEEN_FALLBACK:.0%} at every step (the lowest step)", v,
                                       v is not None and v >= TARGET_UNSEEN_FALLBACK)
    v = router.get("other_modality_layer_max")
    t["no_cross_modality_route"] = check("an image of a modality that has a layer goes to that modality's layer or "
                                         "falls "
                                         "back, at every step (most images routed to another modality's layer)", v,
                                         v is not None and v == 0)
    v = min(R[-1][j] for j in hard) if hard and R else None
    t["casam_box_hard_task"] = check(f"on a task the frozen backbone fails at (box IoU < {TARGET_HARD_ZERO_SHOT}), "
                                     f"CA-SAM's final box IoU >= {TARGET_HARD_BOX} (the lowest such task)", v,
                                     v is not None and v >= TARGET_HARD_BOX)
    # encoding grows with the images; training is capped at max_images, and calibration and validation are seconds
    serve = [st["seconds_to_serve"]["encode_per_image"] * 80 + st["seconds_to_serve"]["after_encode"]
             for st in router.get("per_step", []) if st.get("seconds_to_serve")]
    v = round(max(serve), 1) if serve else None
    t["seconds_to_serve"] = check(f"labelled images to served layer <= {TARGET_SERVE_SECONDS} s for 80 images (the "
                                  "slowest task: 80 x encode seconds per image + train the layer and its head + "
                                  "calibrate + validate clicks)", v,
                                  v is not None and v <= TARGET_SERVE_SECONDS)
    t.update(sequence_targets(seqs, hard, sam_tasks if where else None, where))
    return t


def _step_name(protocol: str, step: int) -> str:
    """A step of an interaction sequence in words: the first prompt's answer, or the n-th corrective click's."""
    return ("the box" if protocol == "box" else "the centre click") if step == 0 else f"click {step}"


def _curves(seqs: Dict[str, Any], protocol: str, method: str) -> List[tuple]:
    """(task, summary) of one method's sequences under one protocol, in stream order; tasks without a sequence
    left out."""
    per = (((seqs.get(protocol) or {}).get(method) or {}).get("per_task") or {})
    return [(task, s) for task, s in per.items() if s.get("iou")]


def sequence_targets(seqs: Dict[str, Any], hard: Sequence[int], sam_tasks: Optional[Sequence[int]],
                     where: str) -> Dict[str, Any]:
    """The targets of the interaction sequences (:func:`casam.evaluation.stages.sequences`): what a user of CA-SAM
    gets when it corrects an answer click by click, against a fresh install and against its own first answer.

    Args:
        seqs: protocol (``box``, ``click``) → method → ``per_task`` and ``mean`` (empty before the sequences).
        hard: stream positions of the tasks plain SAM fails at (zero-shot box IoU below :data:`TARGET_HARD_ZERO_SHOT`).
        sam_tasks: stream positions of the tasks plain SAM does, or None when that is every task.
        where: the words that restrict a target to ``sam_tasks`` ("" for every task).

    Returns:
        Target key → {``target``, ``value``, ``met``}, some with ``where`` (the worst task and step),
        ``tasks_falling`` or ``all_tasks``:

        - ``casam_sequence_never_worse``: CA-SAM's IoU after every step, task and protocol at least a fresh
          install's less :data:`TARGET_SEQUENCE_MARGIN` (value: the worst margin);
        - ``casam_sequence_monotone_box`` / ``_click``: CA-SAM's mean IoU over tasks never falls from one step to
          the next (value: its largest fall; ``tasks_falling``: tasks whose own curve falls somewhere);
        - ``casam_clicks_hard_task``: on tasks plain SAM fails at, the box and every click gain at least
          :data:`TARGET_HARD_CLICKS_GAIN` over the box answer (value: the smallest gain);
        - ``casam_clicks_never_lose``: on every task and protocol, CA-SAM's last step is at least its first answer
          (value: the smallest gain);
        - ``casam_sequence``: on tasks plain SAM does, CA-SAM's mean IoU after the box and every click at least
          :data:`TARGET_SEQUENCE` (value: mean over those tasks; ``all_tasks``: over every task).
    """
    def check(target: str, value, met, **extra) -> Dict[str, Any]:
        return {"target": target, "value": value, "met": None if value is None else bool(met), **extra}

    t: Dict[str, Any] = {}
    worst = None  # (margin, where)
    for p in SEQUENCE_PROTOCOLS:
        fresh = dict(_curves(seqs, p, "fresh_install"))
        for task, c in _curves(seqs, p, "casam"):
            for s, (a, b) in enumerate(zip(c["iou"], (fresh.get(task) or {}).get("iou") or [])):
                if worst is None or a - b < worst[0]:
                    worst = (a - b, f"{task}, {p} first, {_step_name(p, s)}")
    v = None if worst is None else round(worst[0], 4)
    t["casam_sequence_never_worse"] = check(
        f"with CA-SAM (router), every task's IoU after every step of both protocols (box or centre click first, "
        f"then corrective clicks) >= fresh install's - {TARGET_SEQUENCE_MARGIN} (the worst margin)", v,
        v is not None and v >= -TARGET_SEQUENCE_MARGIN, where=None if worst is None else worst[1])
    for p in SEQUENCE_PROTOCOLS:
        mean = (((seqs.get(p) or {}).get("casam") or {}).get("mean") or {}).get("iou") or []
        v = round(max(0.0, -min(np.diff(mean))), 4) if len(mean) > 1 else None
        falling = sum(bool(np.any(np.diff(c["iou"]) < -1e-9)) for _, c in _curves(seqs, p, "casam"))
        t[f"casam_sequence_monotone_{p}"] = check(
            f"CA-SAM mean IoU over tasks never falls from one step to the next, {p} first (its largest fall)", v,
            v is not None and v <= 1e-9, tasks_falling=falling if mean else None)
    box = _curves(seqs, "box", "casam")
    clicks = len(box[0][1]["iou"]) - 1 if box else None
    gains = [(c["iou"][-1] - c["iou"][0], task) for j, (task, c) in enumerate(box) if j in hard]
    low = min(gains) if gains and len(box) == len(_all_tasks(seqs)) else None
    v = None if low is None else round(low[0], 4)
    t["casam_clicks_hard_task"] = check(
        f"on a task the frozen backbone fails at (box IoU < {TARGET_HARD_ZERO_SHOT}), CA-SAM's IoU after the box and "
        f"{clicks} clicks >= its box answer + {TARGET_HARD_CLICKS_GAIN} (the smallest gain)", v,
        v is not None and v >= TARGET_HARD_CLICKS_GAIN, where=None if low is None else low[1])
    lose = [(c["iou"][-1] - c["iou"][0], f"{task}, {p} first") for p in SEQUENCE_PROTOCOLS
            for task, c in _curves(seqs, p, "casam")]
    low = min(lose) if lose else None
    v = None if low is None else round(low[0], 4)
    t["casam_clicks_never_lose"] = check(
        "on every task, CA-SAM's IoU after the last click >= its first answer, in both protocols (the smallest gain)",
        v, v is not None and v >= -1e-9, where=None if low is None else low[1])
    keep = [c["iou"][-1] for j, (_, c) in enumerate(box) if sam_tasks is None or j in sam_tasks]
    if sam_tasks is not None and len(box) != len(_all_tasks(seqs)):
        keep = []  # a task without its sequence: the stream positions no longer match
    every = round(float(np.mean([c["iou"][-1] for _, c in box])), 4) if box else None
    v = round(float(np.mean(keep)), 4) if keep else None
    target = check(f"CA-SAM mean IoU over tasks after the box and {clicks} clicks >= {TARGET_SEQUENCE}{where}", v,
                   v is not None and v >= TARGET_SEQUENCE)
    t["casam_sequence"] = {**target, "all_tasks": every} if where else target
    return t


def _all_tasks(seqs: Dict[str, Any]) -> List[str]:
    """Every task of the sequences (of CA-SAM, box first), in stream order."""
    return list((((seqs.get("box") or {}).get("casam") or {}).get("per_task") or {}))
