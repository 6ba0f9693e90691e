"""The continual benchmark's stages, over one :class:`BenchmarkState`.

:func:`prepare` opens the state from the resolved options (:func:`casam.evaluation.benchmark.resolve`); the
stages fill it in the order :func:`casam.evaluation.benchmark.run` calls them:

1. :func:`encode`: every image encoded once (disk cache); the samples are shared by every method;
2. :func:`plain_scores`: plain SAM per test image (``zero_shot``, ``fresh_install`` and CA-SAM's fallback);
3. :func:`start_arms`: CA-SAM's registry (kept beside the embedding cache, so a stopped run resumes),
   ``seq_decoder``'s copy of the backbone, ``seq_layer``'s shared layer;
4. for each task ``k`` of the stream: :func:`seq_decoder_step`, :func:`seq_layer_step`, :func:`casam_step`
   (``casam`` and ``casam_oracle``), then :func:`log_rows`;
5. :func:`sequences`: interaction sequences (box or click first, then corrective clicks) after the last task;
6. :func:`joint`: one layer on every task's training images at once.

The results are read from the state by :mod:`casam.evaluation.results`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from casam.data.datasets import Task, discover_tasks, load_cases, spread
from casam.evaluation.report import fmt
from casam.model.alignment import fresh_layer
from casam.model.backbone import Backbone, load_backbone
from casam.model.router import Router
from casam.paths import default_cache, default_data
from casam.prompts.clicks import CHOOSER_WEIGHTS, FIRST_CLICK_FIELDS, ClickConfig
from casam.prompts.masks import PROMPT_TYPES
from casam.registry.store import CORRECTIONS, LayerInfo, LayerRegistry
from casam.scoring import score as scoring
from casam.scoring.protocol import summarise
from casam.scoring.samples import EmbeddingCache, Sample, make_samples
from casam.scoring.score import ImageScores, aggregate, score_image
from casam.training.config import TrainConfig
from casam.training.fit import fit
from casam.training.layer import split_samples, train_layer

__all__ = ["METHODS", "CASAM_METHODS", "SEQUENCE_METHODS", "SEQUENCE_PROTOCOLS", "RESULTS_DIR", "BenchmarkState",
           "Grid", "log", "select_tasks", "train_subset", "encode_seconds", "serve_timing", "layer_scores",
           "router_step", "prepare", "encode", "plain_scores", "start_arms", "seq_decoder_step", "seq_layer_step",
           "casam_step", "log_rows", "sequences", "joint"]

METHODS = ("zero_shot", "fresh_install", "seq_decoder", "seq_layer", "casam", "casam_oracle", "joint")
CASAM_METHODS = ("casam", "casam_oracle")  # the two arms over the same layers (router / true task id)
SEQUENCE_METHODS = ("zero_shot", "fresh_install", "casam", "casam_oracle")
SEQUENCE_PROTOCOLS = ("box", "click")  # the first prompt of an interaction sequence: a tight box or a centre click
# Where results go without --out: relative to the current directory (the checkout's benchmarks/results when run
# from its root, as documented); the library itself knows no checkout.
RESULTS_DIR = Path("benchmarks") / "results"


def log(msg: str) -> None:
    """Prints a benchmark log line with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Grid:
    """R matrices of one method: after task k (row) on task j (column), every prompt × metric, seen and unseen."""

    def __init__(self, T: int):
        self.T = T
        self.cells: Dict[tuple, Dict[str, Dict[str, Optional[float]]]] = {}

    def set(self, k: int, j: int, res: Dict[str, Dict[str, Optional[float]]]) -> None:
        self.cells[(k, j)] = res

    def matrix(self, prompt: str = "box", metric: str = "iou", lower: bool = True) -> List[List[Optional[float]]]:
        rows = []
        for k in range(self.T):
            cols = range(k + 1) if lower else range(self.T)
            rows.append([self.cells.get((k, j), {}).get(prompt, {}).get(metric) for j in cols])
        return rows

    def rows_done(self) -> int:
        return sum(1 for k in range(self.T) if all((k, j) in self.cells for j in range(k + 1)))


@dataclass
class BenchmarkState:
    """One benchmark run: what it was asked, what it encoded and everything each stage has measured so far.

    Opened by :func:`prepare`; each stage reads what the stages before it filled.

    Attributes:
        args: the resolved options (:func:`casam.evaluation.benchmark.resolve`).
        argv: the command line, for the record.
        prog: how the command was called (``casam benchmark`` or ``python benchmarks/continual.py``).
        t_start: when the run started (``time.time()``).
        out_dir: where the results go.
        tasks: the stream, in order.
        cfg: the training recipe of every trained method.
        cache_dir: the embedding cache folder (None: memory only).
        bb: the frozen backbone.
        train_all, train_s, test_s: per task, the labelled training samples, the ones training uses
            (:func:`train_subset`) and the test samples (:func:`encode`).
        counts: per task, its cases, patients and masks (``task_data`` of the results).
        enc_per_image: per task, seconds to encode one image (:func:`encode_seconds`).
        encode_s: seconds :func:`encode` took.
        grids, seconds, losses: per method, its R matrices, its train / eval seconds and its loss histories.
        zs_img: per task and test image, plain SAM's scores with casam's click answer (fresh install).
        zs_res, fresh_res: per task, the aggregated scores of ``zero_shot`` (raw point prompt) and ``fresh_install``.
        dec_bb, dec_params: ``seq_decoder``'s backbone copy and the decoder parameters it trains.
        shared: ``seq_layer``'s one Alignment Layer.
        reg_dir, registry: CA-SAM's temporary folder and its layer registry (:func:`start_arms`).
        layers, vaes, taus, infos: CA-SAM's layers so far, with their router VAEs, thresholds and records.
        memo: (layer, task, image) → scores; layers never change once trained.
        route_steps: per task learned, how the router treated every task's test images (:func:`router_step`).
        final_routes: per task and test image, the layer index the router chose last (None = plain SAM).
        seq_res: the interaction sequences, per protocol and method (:func:`sequences`).
    """

    args: argparse.Namespace
    argv: List[str]
    prog: str
    t_start: float
    out_dir: Path
    tasks: List[Task]
    cfg: TrainConfig
    cache_dir: Optional[Union[str, Path]]
    bb: Backbone
    train_all: List[List[Sample]] = field(default_factory=list)
    train_s: List[List[Sample]] = field(default_factory=list)
    test_s: List[List[Sample]] = field(default_factory=list)
    counts: List[Dict[str, Any]] = field(default_factory=list)
    enc_per_image: List[float] = field(default_factory=list)
    encode_s: float = 0.0
    grids: Dict[str, Grid] = field(init=False)
    seconds: Dict[str, Dict[str, float]] = field(init=False)
    losses: Dict[str, List] = field(init=False)
    zs_img: List[List[ImageScores]] = field(default_factory=list)
    zs_res: List[Dict[str, Dict[str, Optional[float]]]] = field(default_factory=list)
    fresh_res: List[Dict[str, Dict[str, Optional[float]]]] = field(default_factory=list)
    dec_bb: Optional[Backbone] = None
    dec_params: List[torch.nn.Parameter] = field(default_factory=list)
    shared: Optional[torch.nn.Module] = None
    reg_dir: Optional[tempfile.TemporaryDirectory] = None
    registry: Optional[LayerRegistry] = None
    layers: List[torch.nn.Module] = field(default_factory=list)
    vaes: List[Any] = field(default_factory=list)
    taus: List[float] = field(default_factory=list)
    infos: List[LayerInfo] = field(default_factory=list)
    memo: Dict[tuple, ImageScores] = field(default_factory=dict)
    route_steps: List[Dict[str, Any]] = field(default_factory=list)
    final_routes: List[List[Optional[int]]] = field(default_factory=list)
    seq_res: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grids = {m: Grid(self.T) for m in self.methods}
        self.seconds = {m: {"train": 0.0, "eval": 0.0} for m in self.methods}
        self.losses = {m: [] for m in self.methods}

    @property
    def T(self) -> int:
        return len(self.tasks)

    @property
    def names(self) -> List[str]:
        return [t.name for t in self.tasks]

    @property
    def methods(self) -> List[str]:
        return self.args.method_list

    @property
    def need_casam(self) -> bool:
        return any(m in self.methods for m in CASAM_METHODS)


# ------------------------------------------------------------------------------------------- helpers
def select_tasks(tasks: List[Task], spec: Optional[str]) -> List[Task]:
    """The tasks named by ``--tasks`` (names or stream positions, comma-separated), in stream order.

    Raises:
        SystemExit: a name that is no task.
    """
    if not spec:
        return tasks
    want = [s.strip() for s in spec.split(",") if s.strip()]
    picked = set()
    for w in want:
        if w.isdigit() and int(w) < len(tasks):
            picked.add(int(w))
        else:
            hits = [i for i, t in enumerate(tasks) if t.name == w]
            if not hits:
                raise SystemExit(f"casam benchmark: unknown task {w!r}; tasks: {', '.join(t.name for t in tasks)}")
            picked.update(hits)
    return [t for i, t in enumerate(tasks) if i in picked]


def train_subset(samples: Sequence[Sample], cfg: TrainConfig) -> List[Sample]:
    """The training images ``train_layer`` uses (:func:`casam.training.layer.split_samples`)."""
    return split_samples([s for s in samples if s.targets], cfg)[0]


def encode_seconds(backbone: Backbone, images: Sequence[np.ndarray], n: int = 8) -> float:
    """Seconds to encode one image (mean over ``n`` images, uncached): what a fresh site pays per labelled image.

    One untimed encode first: a running server is warm, and the first call of a process also pays for the
    framework's start-up (on a GPU, CUDA's). Several images, because a few vary too much and the seconds to a
    served layer multiply this figure by the labelled images.

    Args:
        backbone: the frozen backbone.
        images: the task's training images.
        n: images timed.

    Returns:
        Mean seconds per image.
    """
    if images:
        backbone.encode(backbone.prepare(images[0])[0])
    t0 = time.time()
    for img in images[:n]:
        backbone.encode(backbone.prepare(img)[0])
    return (time.time() - t0) / max(1, min(n, len(images)))


def serve_timing(info: Any, encode_per_image: float) -> Dict[str, Any]:
    """Seconds from an institution's labelled images to its served layer, by stage.

    ``train_layer`` gets the benchmark's already encoded samples, so encoding is counted as ``encode_per_image``
    (:func:`encode_seconds`) times the labelled images; everything else is the layer's own record: training with
    its per-epoch box validation, the router's calibration, the click validation of the gate, and whatever runs
    between them (``after_encode``, the wall time of ``train_layer`` less its encoding).

    Args:
        info: the layer's LayerInfo (``extra["timing"]`` and ``extra["seconds"]`` as ``train_layer`` stores them).
        encode_per_image: seconds to encode one image.

    Returns:
        The stages (``encode``, ``train``, ``calibrate``, ``validate`` where recorded), ``after_encode``,
        ``encode_per_image``, ``labelled_images`` and ``total``.
    """
    timing = dict(info.extra.get("timing", {}))
    after = float(info.extra.get("seconds", 0.0)) - float(timing.get("encode", 0.0))
    timing["encode"] = round(encode_per_image * info.n_images, 1)
    timing["encode_per_image"] = round(encode_per_image, 3)
    timing["after_encode"] = round(after, 1)
    timing["total"] = round(timing["encode"] + after, 1)
    timing["labelled_images"] = info.n_images
    return timing


def layer_scores(state: BenchmarkState, li: Optional[int], j: int, i: int) -> ImageScores:
    """Scores of the product with CA-SAM layer ``li`` routed, on test image ``i`` of task ``j``: the layer for
    the prompt types it may serve, plain SAM else (``li`` None: plain SAM). Memoised: layers never change."""
    if li is None:
        return state.zs_img[j][i]
    key = (li, j, i)
    if key not in state.memo:
        state.memo[key] = score_image(state.bb, state.layers[li], state.test_s[j][i])
    info = state.infos[li]
    return {p: state.memo[key][p] if info.serves(p) else state.zs_img[j][i][p] for p in PROMPT_TYPES}


def router_step(tasks: Sequence[Task], k: int, routes: List[List[Optional[int]]], info: LayerInfo,
                timing: Dict[str, Any]) -> Dict[str, Any]:
    """How the router treats every task's test images once task ``k`` is learned, with that task's layer record.

    Args:
        tasks: the stream.
        k: the task just learned.
        routes: per task and test image, the chosen layer index (None = plain SAM).
        info: the layer of task ``k``.
        timing: its seconds to serve (:func:`serve_timing`).

    Returns:
        Counts and rates: routed to their own layer on seen tasks, fallback on unseen tasks and on modalities no
        layer was trained on, images of a modality that has a layer routed to another modality's layer; the
        layer's timing, gate (``use``), validation, best epoch, tau and validation IoU.
    """
    step = {"after": tasks[k].name, "seen_correct": 0, "seen_total": 0, "unseen_fallback": 0, "unseen_total": 0,
            "new_modality_fallback": 0, "new_modality_total": 0, "other_modality_layer": 0,
            "seen_modality_total": 0, "seconds_to_serve": timing,
            "use": info.extra.get("use"), "val": info.extra.get("val"), "best_epoch": info.extra.get("best_epoch")}
    seen_modalities = {tasks[i].modality for i in range(k + 1)}
    for j in range(len(tasks)):
        if j <= k:
            step["seen_correct"] += sum(r == j for r in routes[j])
            step["seen_total"] += len(routes[j])
        else:
            step["unseen_fallback"] += sum(r is None for r in routes[j])
            step["unseen_total"] += len(routes[j])
        if tasks[j].modality not in seen_modalities:
            step["new_modality_fallback"] += sum(r is None for r in routes[j])
            step["new_modality_total"] += len(routes[j])
        else:  # a modality with a layer: its own modality's layer or the fallback, never another's
            step["other_modality_layer"] += sum(r is not None and tasks[r].modality != tasks[j].modality
                                                for r in routes[j])
            step["seen_modality_total"] += len(routes[j])
    step["seen_accuracy"] = step["seen_correct"] / step["seen_total"] if step["seen_total"] else None
    step["unseen_fallback_rate"] = step["unseen_fallback"] / step["unseen_total"] if step["unseen_total"] else None
    step["new_modality_fallback_rate"] = (step["new_modality_fallback"] / step["new_modality_total"]
                                          if step["new_modality_total"] else None)
    step["tau"] = info.tau
    step["val_iou"], step["zero_shot_val_iou"] = info.val_iou, info.zero_shot_val_iou
    return step


def _score_all(state: BenchmarkState, method: str, k: int, layer: Optional[Callable],
               backbone: Optional[Backbone] = None) -> None:
    """Row ``k`` of ``method``: every task's test split scored with ``layer`` (on ``backbone``, default the frozen
    one)."""
    backbone = state.bb if backbone is None else backbone
    t1 = time.time()
    for j in range(state.T):
        state.grids[method].set(k, j, aggregate([score_image(backbone, layer, s) for s in state.test_s[j]]))
    state.seconds[method]["eval"] += time.time() - t1


def _timed_fit(state: BenchmarkState, method: str, fn: Callable[[], List[float]]) -> None:
    """Runs one training of ``method`` (``fn`` returns its loss history), counting its seconds and losses."""
    t1 = time.time()
    hist = fn()
    state.seconds[method]["train"] += time.time() - t1
    state.losses[method].append([round(v, 4) for v in hist])


# -------------------------------------------------------------------------------------------- stages
def prepare(args: argparse.Namespace, argv: Sequence[str], prog: str) -> BenchmarkState:
    """Opens a run: the output folder, the tasks, the recipe and the backbone.

    Args:
        args: the resolved options.
        argv: the command line, for the record.
        prog: how the command was called.

    Returns:
        The state, nothing encoded yet.

    Raises:
        SystemExit: no task found (or an unknown one asked for).
    """
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data) if args.data else default_data()
    tasks = select_tasks(discover_tasks(data_root), args.tasks)
    if not tasks:
        raise SystemExit(f"casam benchmark: no task found in {data_root}")
    cache_dir = None if str(args.cache).lower() == "none" else (args.cache or default_cache())
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      max_images=args.max_images, vae_epochs=args.vae_epochs, head_steps=args.head_steps)
    log(f"tasks ({len(tasks)}): {', '.join(t.name for t in tasks)}; methods: {', '.join(args.method_list)}; epochs "
        f"{cfg.epochs}, max_images {cfg.max_images}, device {args.device}, cache {cache_dir}")
    bb = load_backbone(args.backbone, args.checkpoint, args.device)
    torch.manual_seed(args.seed)
    return BenchmarkState(args=args, argv=list(argv), prog=prog, t_start=t_start, out_dir=out_dir, tasks=tasks, cfg=cfg,
                          cache_dir=cache_dir, bb=bb)


def encode(state: BenchmarkState) -> None:
    """Encodes every image once (one embedding cache per task: its in-memory copies go with it); fills the
    samples, ``counts``, ``enc_per_image`` and ``encode_s``."""
    args, bb, cfg = state.args, state.bb, state.cfg
    t0 = time.time()
    for t in state.tasks:
        cache = EmbeddingCache(bb, state.cache_dir)
        tr_cases = spread([c for c in t.split("train") if c.mask is not None], args.max_train_cases)
        te_cases = spread([c for c in t.split("test") if c.mask is not None], args.max_test_cases)
        imgs, masks, pats = load_cases(tr_cases)
        state.enc_per_image.append(encode_seconds(bb, imgs))
        tr = make_samples(bb, imgs, masks, pats, cache, cfg.window, progress=args.progress,
                          desc=f"encode {t.name} train")
        imgs, masks, pats = load_cases(te_cases)
        te = make_samples(bb, imgs, masks, pats, cache, cfg.window, progress=args.progress,
                          desc=f"encode {t.name} test")
        del imgs, masks, cache
        sub = train_subset(tr, cfg)
        state.train_all.append(tr)
        state.train_s.append(sub)
        state.test_s.append(te)
        state.counts.append({"task": t.name, "modality": t.modality, "train_cases": len(tr), "train_used": len(sub),
                             "train_patients": len({s.patient for s in tr}), "test_cases": len(te),
                             "test_masks": sum(len(s.targets) for s in te),
                             "test_patients": len({s.patient for s in te})})
        log(f"encoded {t.name}: {len(tr)} train ({len(sub)} used for training), {len(te)} test  "
            f"[{time.time() - t0:.0f}s]")
    state.encode_s = time.time() - t0


def plain_scores(state: BenchmarkState) -> None:
    """Plain SAM on every test image: with casam's click answer (``fresh_install``, and CA-SAM's fallback) and,
    where ``zero_shot`` runs, with the decoder's raw point prompt; their rows are the same after every task."""
    bb, methods = state.bb, state.methods
    t0 = time.time()
    state.zs_img = [[score_image(bb, None, s) for s in te] for te in state.test_s]  # plain SAM + casam's clicks
    state.fresh_res = [aggregate(x) for x in state.zs_img]
    raw_img = [[{**f, **score_image(bb, None, s, raw_click=True, prompts=("click",))} for s, f in zip(te, fz)]
               for te, fz in zip(state.test_s, state.zs_img)] if "zero_shot" in methods else state.zs_img
    # (boxes: as fresh_install)
    state.zs_res = [aggregate(x) for x in raw_img]  # plain LiteMedSAM: raw point prompt
    zs_time = time.time() - t0
    for m, res_ in (("zero_shot", state.zs_res), ("fresh_install", state.fresh_res)):
        if m in methods:
            state.seconds[m]["eval"] = zs_time
            for k in range(state.T):
                for j in range(state.T):
                    state.grids[m].set(k, j, res_[j])
    zs_text = ", ".join(f"{n} {r['box']['iou']:.3f}/{f['click']['iou']:.3f}"
                        for n, r, f in zip(state.names, state.zs_res, state.fresh_res))
    log(f"plain SAM box / fresh-install click IoU: {zs_text}  [{zs_time:.0f}s]")


def start_arms(state: BenchmarkState) -> None:
    """The trained arms' starting points: CA-SAM's registry, ``seq_decoder``'s trainable decoder copy and
    ``seq_layer``'s fresh shared layer.

    CA-SAM's layers persist beside the embedding cache (a temporary folder without one), keyed by the backbone,
    the tasks, the recipe and the single-click answer (a layer's click validation, one click per object, decides
    whether it serves clicks), so a stopped run resumes where it stopped.
    """
    args, bb = state.args, state.bb
    state.reg_dir = tempfile.TemporaryDirectory(prefix="casam-bench-reg-")
    click_defaults = ClickConfig()
    first_click = {f: getattr(click_defaults, f) for f in FIRST_CLICK_FIELDS}
    key = hashlib.sha1(json.dumps([bb.hash, state.names, state.cfg.to_dict(), args.max_train_cases, first_click,
                                   CHOOSER_WEIGHTS], sort_keys=True,
                                  default=str).encode()).hexdigest()[:10]
    state.registry = LayerRegistry(Path(state.cache_dir) / "benchmark-registries" / f"{args.name}-{key}"
                                   if state.cache_dir else state.reg_dir.name)
    if "seq_decoder" in state.methods:
        state.dec_bb = copy.deepcopy(bb)
        state.dec_params = list(state.dec_bb.sam.mask_decoder.parameters())
        for p in state.dec_params:
            p.requires_grad_(True)
    if "seq_layer" in state.methods:
        torch.manual_seed(args.seed)
        state.shared = fresh_layer(bb)


def seq_decoder_step(state: BenchmarkState, k: int) -> None:
    """``seq_decoder`` on task ``k``: the one decoder copy trained further, then row ``k`` scored."""
    task = state.tasks[k]
    _timed_fit(state, "seq_decoder", lambda: fit(state.dec_bb, state.train_s[k], state.cfg, layer=None,
                                                 params=state.dec_params, progress=state.args.progress,
                                                 desc=f"decoder {task.name}"))
    _score_all(state, "seq_decoder", k, None, state.dec_bb)


def seq_layer_step(state: BenchmarkState, k: int) -> None:
    """``seq_layer`` on task ``k``: the one shared layer trained further, then row ``k`` scored."""
    task = state.tasks[k]
    _timed_fit(state, "seq_layer", lambda: fit(state.bb, state.train_s[k], state.cfg, state.shared,
                                               progress=state.args.progress, desc=f"shared {task.name}"))
    _score_all(state, "seq_layer", k, state.shared)


def casam_step(state: BenchmarkState, k: int) -> None:
    """CA-SAM on task ``k`` (``casam`` and ``casam_oracle``): a fresh layer + router VAE for the task (or the
    one an earlier run of the same recipe left in the registry), then row ``k`` of both arms and the router's step.

    Raises:
        RuntimeError: ``train_layer`` trained on other images than the baselines.
    """
    args, bb, methods, task = state.args, state.bb, state.methods, state.tasks[k]
    t1 = time.time()
    done = [i for i in state.registry.active() if i.institution == task.name]
    if done:
        info = done[0]
        log(f"resumed: layer {info.name} of an earlier run with the same recipe")
    else:
        info = train_layer(bb, [], [], [], state.registry, task.name, task.modality, state.cfg, progress=args.progress,
                           samples=state.train_all[k])
    timing = serve_timing(info, state.enc_per_image[k])
    if info.extra.get("n_train") != len(state.train_s[k]):
        raise RuntimeError(f"train_layer used {info.extra.get('n_train')} images, "
                           f"the baselines {len(state.train_s[k])}")
    layer, vae, info = state.registry.load(info.name, bb)
    layer = layer.to(bb.device).eval()
    state.layers.append(layer)
    state.vaes.append(vae)
    state.taus.append(info.tau)
    state.infos.append(info)
    for m in CASAM_METHODS:
        if m in methods:
            state.seconds[m]["train"] += time.time() - t1
            state.losses[m].append(info.extra.get("loss_history"))
    router = Router(state.vaes, state.taus)
    t1 = time.time()
    routes = [[router.route(s.feature).index for s in te] for te in state.test_s]
    for j in range(state.T):
        if "casam_oracle" in methods:
            state.grids["casam_oracle"].set(k, j, aggregate([layer_scores(state, None if j > k else j, j, i)
                                                             for i in range(len(state.test_s[j]))]))
        if "casam" in methods:
            state.grids["casam"].set(k, j, aggregate([layer_scores(state, r, j, i) for i, r in enumerate(routes[j])]))
    step = router_step(state.tasks, k, routes, info, timing)
    state.route_steps.append(step)
    state.final_routes = routes
    dt = time.time() - t1
    for m in CASAM_METHODS:
        if m in methods:
            state.seconds[m]["eval"] += dt / (2 if all(c in methods for c in CASAM_METHODS) else 1)
    log(f"CA-SAM layer {info.name}: tau {info.tau:.4g}, val {info.extra.get('val')}, use {info.extra.get('use')}, "
        f"best epoch {info.extra.get('best_epoch')}; router on seen tasks {fmt(step['seen_accuracy'])}, fallback on "
        f"unseen {fmt(step['unseen_fallback_rate'])}, on new modalities {fmt(step['new_modality_fallback_rate'])}; "
        f"labelled images to served layer {timing['total']:.0f}s")


def log_rows(state: BenchmarkState, k: int) -> None:
    """Logs row ``k`` (box IoU) of every method that trains task after task."""
    for m in state.methods:
        if m in ("zero_shot", "joint"):
            continue
        row = state.grids[m].matrix("box", "iou")[k]
        log(f"  {m:13s} R[{k}] = {' '.join('-' if v is None else f'{v:.3f}' for v in row)}")


def _mean_summary(per_task: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The mean over tasks of one method's sequence summaries, each task counting once whatever its objects.

    Args:
        per_task: task → :func:`casam.scoring.protocol.summarise` of its sequences (a task without any left out).

    Returns:
        IoU, Dice and seconds after each step, the AUC of the mean IoU curve, whether that curve never falls, NoC@80
        and NoC@90 (means of the tasks'), and ``n``, the objects over all tasks.
    """
    done = [v for v in per_task.values() if v.get("n")]
    if not done:
        return {"iou": [], "dice": [], "auc_iou": None, "monotone": None, "noc80": None, "noc90": None,
                "seconds": [], "n": 0}
    mean_iou = np.mean([v["iou"] for v in done], 0)
    out: Dict[str, Any] = {
        "iou": [round(float(v), 4) for v in mean_iou],
        "dice": [round(float(v), 4) for v in np.mean([v["dice"] for v in done], 0)],
        "auc_iou": round(float(np.mean(mean_iou)), 4), "monotone": bool(np.all(np.diff(mean_iou) >= -1e-9))}
    for key in ("noc80", "noc90"):
        out[key] = round(float(np.mean([v[key] for v in done])), 3)
    out["seconds"] = ([round(float(v), 4) for v in np.mean([v["seconds"] for v in done], 0)]
                      if all("seconds" in v for v in done) else [])
    out["n"] = sum(v["n"] for v in done)
    return out


def sequences(state: BenchmarkState) -> None:
    """Interaction sequences after the last task, as the CVPR 2025 interactive segmentation challenge scores them:
    per method and task, on at most ``--sequence-cases`` test images, every object gets a first prompt — its tight
    box (protocol ``box``) or a click at its centre (``click``) — then ``--clicks`` corrective clicks, each at the
    centre of the largest error region (:func:`casam.scoring.score.sequences`).

    A routed (``casam``) or oracle (``casam_oracle``) layer answers a protocol only where its gate lets it serve the
    first prompt's type (else plain SAM answers the whole sequence, as the product does), and answers the requests
    with corrective clicks only where it may serve those too (``corrections``). Each (layer, task, image, protocol)
    sequence is computed once: layers never change and both CA-SAM arms share them.

    Fills ``seq_res``: protocol (``box``, ``click``) → method → ``per_task`` (task → :func:`summarise`) and ``mean``
    (over tasks: IoU, Dice and seconds after each step, AUC, monotone, NoC@80, NoC@90).
    """
    args, test_s, layers, infos = state.args, state.test_s, state.layers, state.infos
    steps = args.clicks + 1  # the first prompt's answer, then one per corrective click
    t1 = time.time()
    memo: Dict[tuple, List[Dict]] = {}

    def run_one(li: Optional[int], j: int, i: int, first: str, raw: bool = False) -> List[Dict]:
        corrections = True
        if li is not None:
            if infos[li].serves(first):
                corrections = infos[li].serves(CORRECTIONS)
            else:
                li = None  # the gate: this layer may not serve the first prompt's type
        key = (li, j, i, first, raw, corrections)
        if key not in memo:
            memo[key] = scoring.sequences(state.bb, None if li is None else layers[li], test_s[j][i], steps, raw,
                                          first=first, corrections=corrections)
        return memo[key]

    out: Dict[str, Any] = {}
    for first in SEQUENCE_PROTOCOLS:
        by_method: Dict[str, Any] = {}
        for m in SEQUENCE_METHODS:
            if m not in state.methods:
                continue
            per_task = {}
            for j, te in enumerate(test_s):
                curves = []
                for i in spread(range(len(te)), args.sequence_cases):
                    li = {"zero_shot": None, "fresh_install": None, "casam": state.final_routes[j][i],
                          "casam_oracle": j if j < len(layers) else None}[m]
                    curves += run_one(li, j, i, first, raw=(m == "zero_shot"))
                per_task[state.names[j]] = summarise(curves)
            by_method[m] = {"per_task": per_task, "mean": _mean_summary(per_task)}
        out[first] = by_method
    state.seq_res = out
    log(f"interaction sequences (first prompt + {args.clicks} clicks), mean IoU per step: "
        + "; ".join(f"{p} first: " + ", ".join(f"{m} {v['mean']['iou']}" for m, v in ms.items())
                    for p, ms in out.items()) + f"  [{time.time() - t1:.0f}s]")


def joint(state: BenchmarkState) -> None:
    """``joint``: one layer trained once on every task's training images, scored once; every row of its R is that
    final row (non-continual upper bound)."""
    T, grid = state.T, state.grids["joint"]
    log(f"=== joint: one layer on {sum(len(s) for s in state.train_s)} training images of {T} tasks")
    torch.manual_seed(state.args.seed)
    layer = fresh_layer(state.bb)
    pooled = [s for sub in state.train_s for s in sub]
    _timed_fit(state, "joint", lambda: fit(state.bb, pooled, state.cfg, layer, progress=state.args.progress,
                                           desc="joint"))
    _score_all(state, "joint", T - 1, layer)
    for k in range(T - 1):  # non-continual: the one final model, its row repeated
        for j in range(T):
            grid.set(k, j, grid.cells[(T - 1, j)])
    log(f"  joint         R[{T - 1}] = {' '.join(f'{v:.3f}' for v in grid.matrix('box', 'iou')[T - 1])}")
