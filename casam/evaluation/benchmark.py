"""The continual stream benchmark: CA-SAM against its baselines on every task of a data root.

Tasks come from :func:`casam.data.discover_tasks` (stream order of the data README). Each image is encoded
once by the frozen backbone (disk cache) and the samples are shared by every method:

``zero_shot``     plain LiteMedSAM (the frozen backbone), no training; a click is its raw point prompt;
``fresh_install`` what a new user gets: plain SAM with casam's click answer (:mod:`casam.clicks`), no layer;
``seq_decoder``   the mask decoder fine-tuned task after task (one copy, continued: forgets);
``seq_layer``     one Alignment Layer trained task after task (the same layer keeps training: forgets);
``casam``         CA-SAM: a fresh Alignment Layer + router VAE per task (``train_layer`` into a temporary
                  registry), chosen at test time by the VAE router with the plain-SAM fallback, and used for a
                  prompt type only where it beat plain SAM on its validation split (else: fresh_install);
``casam_oracle``  the same layers chosen by the true task id (the router's upper bound);
``joint``         one Alignment Layer trained on all tasks' training data at once (non-continual upper bound).

After each task every method is evaluated on the test split of every task (seen and not yet seen): R[k][j]
is the mean IoU (per mask) on task j after learning task k, with the tight ground-truth box per class and with
one click at the mask's centroid pixel. After the last task, click sequences (:mod:`casam.interactive`: up to 5
clicks, each next one at the centre of the largest error) score the interactive use. Results go to
``<out>/continual.json``, ``continual.md`` and ``continual_R.png`` (:mod:`casam.evaluation.report`); the JSON is
rewritten after every task.

Run ``casam benchmark --help``; ``--quick`` is a tiny smoke run (random tiny backbone), ``--full`` the recipe
of METHOD.md (24 epochs, all images; for a GPU).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import config as casam_config
from ..alignment import describe, fresh_layer
from ..backbone import Backbone, load_backbone
from ..clicks import CHOOSER_WEIGHTS, FIRST_CLICK_FIELDS, ClickConfig
from ..data import Task, discover_tasks, load_cases, spread
from ..metrics import continual_summary
from ..registry import LayerInfo, LayerRegistry
from ..router import Router
from .report import fmt, write_outputs
from ..interactive import summarise
from ..reporting import json_safe, machine_info
from ..scoring import PROMPTS, ImageScores, aggregate, score_image, sequences
from ..training import EmbeddingCache, Sample, TrainConfig, fit, make_samples, split_samples, train_layer

METHODS = ("zero_shot", "fresh_install", "seq_decoder", "seq_layer", "casam", "casam_oracle", "joint")
DEFAULT_METHODS = ("zero_shot", "fresh_install", "casam", "casam_oracle")
LABELS = {
    "zero_shot": "1. frozen backbone (zero-shot)",
    "fresh_install": "0. casam, empty registry (fresh install)",
    "seq_decoder": "2. sequential decoder fine-tuning",
    "seq_layer": "3. one shared Alignment Layer, sequential",
    "casam": "4. CA-SAM (router)",
    "casam_oracle": "5. CA-SAM (oracle task id)",
    "joint": "6. joint multi-task layer (non-continual)",
}
SEQUENCE_METHODS = ("zero_shot", "fresh_install", "casam", "casam_oracle")
FALLBACK = "fallback"
# Targets of the project (issues 3 and 11).
TARGET_BWT = -0.005
TARGET_BOX_TASK_DROP = 0.01
TARGET_CLICK = 0.80
TARGET_FRESH_CLICK = 0.70
TARGET_FRESH_BOX_DROP = 0.005
TARGET_REGRET = 0.005
TARGET_UNSEEN_FALLBACK = 0.90
TARGET_SEQUENCE = 0.85
TARGET_SERVE_SECONDS = 300
TARGET_HARD_ZERO_SHOT = 0.5  # a task plain SAM fails at (retinal vessels: 0.13) ...
TARGET_HARD_BOX = 0.55  # ... which an institution's layer must teach it
REDUCED = {"epochs": 4, "max_images": 48}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="casam benchmark",
        description="Continual stream benchmark: frozen SAM, sequential decoder fine-tuning, one shared Alignment "
                    "Layer, CA-SAM (router and oracle) and joint training, evaluated after every task on every task.",
    )
    p.add_argument("--data", default=None, help=f"data root with MANIFEST.tsv (default $CASAM_DATA or {casam_config.default_data()})")
    p.add_argument("--tasks", default=None,
                   help="comma-separated subset of tasks, by name (e.g. dermoscopy_ph2,brain_mri_lgg@TCGA_DU) or by "
                        "position in the stream (0,1); kept in stream order (default: all)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods to run (default {','.join(DEFAULT_METHODS)}; all: {','.join(METHODS)})")
    p.add_argument("--clicks", type=int, default=5, help="clicks per sequence after the last task (0 = no sequences)")
    p.add_argument("--sequence-cases", type=int, default=None,
                   help="click sequences on at most this many test images per task (evenly spaced; default all)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results of the checkout)")
    p.add_argument("--name", default="continual", help="stem of the output files (default continual)")
    p.add_argument("--cache", default=None, help="embedding cache folder (default $CASAM_CACHE or ~/.casam/cache; 'none' = memory only)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs per task (default {REDUCED['epochs']}, reduced CPU recipe; METHOD: 24)")
    p.add_argument("--max-images", type=int, default=None,
                   help=f"cap on training images per task (default {REDUCED['max_images']}; 0 = all, as in METHOD)")
    p.add_argument("--max-train-cases", type=int, default=None, help="read at most this many training cases per task (evenly spaced)")
    p.add_argument("--max-test-cases", type=int, default=None, help="read at most this many test cases per task (evenly spaced)")
    p.add_argument("--head-steps", type=int, default=None,
                   help=f"steps of each institution's refinement head (default {casam_config.HEAD_STEPS}; 0 = the Alignment "
                        f"Layer alone)")
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default=casam_config.DEFAULT_BACKBONE, help="litemedsam (default), vit_b, vit_l, vit_h or tiny")
    p.add_argument("--checkpoint", default=None, help="backbone weights (required for vit_*)")
    p.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the heatmaps")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="tiny smoke run: tiny random backbone, first 2 tasks, 6 train / 3 test cases, 1 epoch (< 1 min on CPU)")
    mode.add_argument("--full", action="store_true", help="METHOD.md recipe: 24 epochs on all training images (use a GPU)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults that depend on --quick / --full."""
    if args.quick:
        defaults = dict(epochs=1, max_images=4, max_train_cases=6, max_test_cases=3, backbone="tiny", tasks="0,1", cache="none",
                        vae_epochs=3, head_steps=20)
    elif args.full:
        defaults = dict(epochs=24, max_images=0)
    else:
        defaults = dict(REDUCED)
    for k, v in defaults.items():
        if k == "backbone":
            if args.backbone == casam_config.DEFAULT_BACKBONE:
                args.backbone = v
        elif getattr(args, k, None) is None:
            setattr(args, k, v)
    if getattr(args, "head_steps", None) is None:
        args.head_steps = casam_config.HEAD_STEPS
    if not hasattr(args, "vae_epochs"):
        args.vae_epochs = casam_config.VAE_EPOCHS
    if args.max_images is not None and args.max_images <= 0:
        args.max_images = None
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"casam benchmark: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    args.method_list = [m for m in METHODS if m in methods]
    return args


# ---------------------------------------------------------------------------------------------- data
def select_tasks(tasks: List[Task], spec: Optional[str]) -> List[Task]:
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
    """The training images ``train_layer`` uses (:func:`casam.training.split_samples`)."""
    return split_samples([s for s in samples if s.targets], cfg)[0]


# ---------------------------------------------------------------------------------------- evaluation
def encode_seconds(backbone: Backbone, images: Sequence[np.ndarray], n: int = 8) -> float:
    """Seconds to encode one image (mean over ``n`` images, uncached): what a fresh site pays per labelled image.

    One untimed encode first: a running server is warm, and the first call of a process also pays for the
    framework's start-up (on a GPU, CUDA's: 0.91 s per image measured for the first task, 0.009 s after).
    Eight images, not three: three gave 1.19 and 1.94 s on two MRI tasks of the same kind, and the seconds to
    a served layer multiply this by 80.
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


def _summary(R: List[List[Optional[float]]]) -> Dict[str, Optional[float]]:
    if not R or any(v is None for v in R[-1]):
        return {"avg": None, "bwt": None, "forgetting": None}
    return continual_summary(R)


def _unseen_delta(R_all: List[List[Optional[float]]], zs: List[Optional[float]]) -> Optional[float]:
    """Mean over k < j of R[k][j] − zero-shot[j]: the change on not-yet-learned tasks versus the frozen backbone."""
    d = [R_all[k][j] - zs[j] for k in range(len(R_all)) for j in range(k + 1, len(R_all[k]))
         if R_all[k][j] is not None and zs[j] is not None]
    return float(np.mean(d)) if d else None


# --------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace, argv: Sequence[str], prog: str = "casam benchmark") -> Dict[str, Any]:
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data) if args.data else casam_config.default_data()
    tasks = select_tasks(discover_tasks(data_root), args.tasks)
    if not tasks:
        raise SystemExit(f"casam benchmark: no task found in {data_root}")
    T = len(tasks)
    names = [t.name for t in tasks]
    methods = args.method_list
    cache_dir = None if str(args.cache).lower() == "none" else (args.cache or casam_config.default_cache())
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_images=args.max_images,
                      vae_epochs=args.vae_epochs, head_steps=args.head_steps)
    log(f"tasks ({T}): {', '.join(names)}; methods: {', '.join(methods)}; epochs {cfg.epochs}, max_images {cfg.max_images}, "
        f"device {args.device}, cache {cache_dir}")

    bb = load_backbone(args.backbone, args.checkpoint, args.device)
    torch.manual_seed(args.seed)

    # ---- encode every image once; the samples are shared by every method
    t0 = time.time()
    train_all, train_s, test_s, counts, enc_per_image = [], [], [], [], []
    for t in tasks:
        cache = EmbeddingCache(bb, cache_dir)  # one per task: its in-memory copies are dropped with it
        tr_cases = spread([c for c in t.split("train") if c.mask is not None], args.max_train_cases)
        te_cases = spread([c for c in t.split("test") if c.mask is not None], args.max_test_cases)
        imgs, masks, pats = load_cases(tr_cases)
        enc_per_image.append(encode_seconds(bb, imgs))
        tr = make_samples(bb, imgs, masks, pats, cache, cfg.window, progress=args.progress, desc=f"encode {t.name} train")
        imgs, masks, pats = load_cases(te_cases)
        te = make_samples(bb, imgs, masks, pats, cache, cfg.window, progress=args.progress, desc=f"encode {t.name} test")
        del imgs, masks, cache
        sub = train_subset(tr, cfg)
        train_all.append(tr)
        train_s.append(sub)
        test_s.append(te)
        counts.append({"task": t.name, "modality": t.modality, "train_cases": len(tr), "train_used": len(sub),
                       "train_patients": len({s.patient for s in tr}), "test_cases": len(te),
                       "test_masks": sum(len(s.targets) for s in te), "test_patients": len({s.patient for s in te})})
        log(f"encoded {t.name}: {len(tr)} train ({len(sub)} used for training), {len(te)} test  [{time.time() - t0:.0f}s]")
    encode_s = time.time() - t0

    grids = {m: Grid(T) for m in methods}
    seconds = {m: {"train": 0.0, "eval": 0.0} for m in methods}
    losses: Dict[str, List] = {m: [] for m in methods}
    state: Dict[str, Any] = {}

    # zero-shot scores per test image (also the router's fallback)
    t0 = time.time()
    zs_img = [[score_image(bb, None, s) for s in te] for te in test_s]  # plain SAM + casam's clicks = fresh install
    fresh_res = [aggregate(x) for x in zs_img]
    raw_img = [[{**f, **score_image(bb, None, s, raw_click=True, prompts=("click",))} for s, f in zip(te, fz)]
               for te, fz in zip(test_s, zs_img)] if "zero_shot" in methods else zs_img  # boxes: the same as fresh
    zs_res = [aggregate(x) for x in raw_img]  # plain LiteMedSAM: raw point prompt
    zs_time = time.time() - t0
    for m, res_ in (("zero_shot", zs_res), ("fresh_install", fresh_res)):
        if m in methods:
            seconds[m]["eval"] = zs_time
            for k in range(T):
                for j in range(T):
                    grids[m].set(k, j, res_[j])
    zs_text = ", ".join(f"{n} {r['box']['iou']:.3f}/{f['click']['iou']:.3f}" for n, r, f in zip(names, zs_res, fresh_res))
    log(f"plain SAM box / fresh-install click IoU: {zs_text}  [{zs_time:.0f}s]")

    def eval_all(method: str, k: int, layer: Optional[Callable], backbone: Backbone = bb) -> None:
        t1 = time.time()
        for j in range(T):
            grids[method].set(k, j, aggregate([score_image(backbone, layer, s) for s in test_s[j]]))
        seconds[method]["eval"] += time.time() - t1

    def timed_fit(method: str, fn: Callable[[], List[float]]) -> None:
        t1 = time.time()
        hist = fn()
        seconds[method]["train"] += time.time() - t1
        losses[method].append([round(v, 4) for v in hist])

    # CA-SAM state: per-layer per-image scores are memoised (layers are immutable once trained)
    reg_dir = tempfile.TemporaryDirectory(prefix="casam-bench-reg-")
    # layers persist beside the embedding cache, so a stopped run resumes where it stopped (same recipe and
    # single-click answer only: a layer's click validation, one click per object, decides whether it serves clicks)
    click_defaults = ClickConfig()
    first_click = {f: getattr(click_defaults, f) for f in FIRST_CLICK_FIELDS}
    key = hashlib.sha1(json.dumps([bb.hash, names, cfg.to_dict(), args.max_train_cases, first_click,
                                   CHOOSER_WEIGHTS], sort_keys=True,
                                  default=str).encode()).hexdigest()[:10]
    registry = LayerRegistry(Path(cache_dir) / "benchmark-registries" / f"{args.name}-{key}" if cache_dir else reg_dir.name)
    casam_layers: List[torch.nn.Module] = []
    casam_vaes, casam_taus, casam_infos = [], [], []
    memo: Dict[tuple, ImageScores] = {}
    route_steps: List[Dict[str, Any]] = []
    final_routes: List[List[Optional[int]]] = []

    def layer_scores(li: Optional[int], j: int, i: int) -> ImageScores:
        """Scores of the product with layer ``li`` routed: the layer for the prompt types it may serve, plain SAM else."""
        if li is None:
            return zs_img[j][i]
        key = (li, j, i)
        if key not in memo:
            memo[key] = score_image(bb, casam_layers[li], test_s[j][i])
        info = casam_infos[li]
        return {p: memo[key][p] if info.serves(p) else zs_img[j][i][p] for p in PROMPTS}

    if "seq_decoder" in methods:
        dec_bb = copy.deepcopy(bb)
        dec_params = list(dec_bb.sam.mask_decoder.parameters())
        for p in dec_params:
            p.requires_grad_(True)
        state["dec_bb"], state["dec_params"] = dec_bb, dec_params
    if "seq_layer" in methods:
        torch.manual_seed(args.seed)
        state["shared"] = fresh_layer(bb)
    need_casam = "casam" in methods or "casam_oracle" in methods

    results: Dict[str, Any] = {}
    for k, task in enumerate(tasks):
        log(f"=== task {k + 1}/{T}: {task.name} ({len(train_s[k])} training images)")
        if "seq_decoder" in methods:
            timed_fit("seq_decoder", lambda: fit(state["dec_bb"], train_s[k], cfg, layer=None, params=state["dec_params"],
                                                 progress=args.progress, desc=f"decoder {task.name}"))
            eval_all("seq_decoder", k, None, state["dec_bb"])
        if "seq_layer" in methods:
            timed_fit("seq_layer", lambda: fit(bb, train_s[k], cfg, state["shared"], progress=args.progress, desc=f"shared {task.name}"))
            eval_all("seq_layer", k, state["shared"])
        if need_casam:
            t1 = time.time()
            done = [i for i in registry.active() if i.institution == task.name]
            if done:
                info = done[0]
                log(f"resumed: layer {info.name} of an earlier run with the same recipe")
            else:
                info = train_layer(bb, [], [], [], registry, task.name, task.modality, cfg, progress=args.progress,
                                   samples=train_all[k])
            timing = serve_timing(info, enc_per_image[k])
            if info.extra.get("n_train") != len(train_s[k]):
                raise RuntimeError(f"train_layer used {info.extra.get('n_train')} images, the baselines {len(train_s[k])}")
            layer, vae, info = registry.load(info.name, bb)
            layer = layer.to(bb.device).eval()
            casam_layers.append(layer)
            casam_vaes.append(vae)
            casam_taus.append(info.tau)
            casam_infos.append(info)
            for m in ("casam", "casam_oracle"):
                if m in methods:
                    seconds[m]["train"] += time.time() - t1
                    losses[m].append(info.extra.get("loss_history"))
            router = Router(casam_vaes, casam_taus)
            t1 = time.time()
            routes = [[router.route(s.feature).index for s in te] for te in test_s]
            step = {"after": task.name, "seen_correct": 0, "seen_total": 0, "unseen_fallback": 0, "unseen_total": 0,
                    "new_modality_fallback": 0, "new_modality_total": 0, "other_modality_layer": 0,
                    "seen_modality_total": 0, "seconds_to_serve": timing,
                    "use": info.extra.get("use"), "val": info.extra.get("val"), "best_epoch": info.extra.get("best_epoch")}
            seen_modalities = {tasks[i].modality for i in range(k + 1)}
            for j in range(T):
                if "casam_oracle" in methods:
                    grids["casam_oracle"].set(k, j, aggregate([layer_scores(None if j > k else j, j, i) for i in range(len(test_s[j]))]))
                if "casam" in methods:
                    grids["casam"].set(k, j, aggregate([layer_scores(r, j, i) for i, r in enumerate(routes[j])]))
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
            route_steps.append(step)
            final_routes = routes
            dt = time.time() - t1
            for m in ("casam", "casam_oracle"):
                if m in methods:
                    seconds[m]["eval"] += dt / (2 if "casam" in methods and "casam_oracle" in methods else 1)
            log(f"CA-SAM layer {info.name}: tau {info.tau:.4g}, val {info.extra.get('val')}, use {info.extra.get('use')}, "
                f"best epoch {info.extra.get('best_epoch')}; router on seen tasks {fmt(step['seen_accuracy'])}, fallback on "
                f"unseen {fmt(step['unseen_fallback_rate'])}, on new modalities {fmt(step['new_modality_fallback_rate'])}; "
                f"labelled images to served layer {timing['total']:.0f}s")
        for m in methods:
            if m in ("zero_shot", "joint"):
                continue
            row = grids[m].matrix("box", "iou")[k]
            log(f"  {m:13s} R[{k}] = {' '.join('-' if v is None else f'{v:.3f}' for v in row)}")
        results = assemble(args, argv, tasks, counts, methods, grids, seconds, losses, route_steps, final_routes, zs_res,
                           casam_infos, encode_s, t_start, cfg, bb, partial=True, prog=prog)
        write_outputs(out_dir, args.name, results, figure=False)

    seq_res: Dict[str, Any] = {}
    if args.clicks > 0 and final_routes:
        t1 = time.time()
        seq_res = click_sequences(bb, test_s, [t.name for t in tasks], methods, final_routes, casam_layers, casam_infos,
                                  args.clicks, args.sequence_cases)
        log(f"click sequences ({args.clicks} clicks): " + ", ".join(f"{m} {v['mean']['iou']}" for m, v in seq_res.items())
            + f"  [{time.time() - t1:.0f}s]")

    if "joint" in methods:
        log(f"=== joint: one layer on {sum(len(s) for s in train_s)} training images of {T} tasks")
        torch.manual_seed(args.seed)
        joint = fresh_layer(bb)
        pooled = [s for sub in train_s for s in sub]
        timed_fit("joint", lambda: fit(bb, pooled, cfg, joint, progress=args.progress, desc="joint"))
        eval_all("joint", T - 1, joint)
        for k in range(T - 1):  # non-continual: the one final model, its row repeated
            for j in range(T):
                grids["joint"].set(k, j, grids["joint"].cells[(T - 1, j)])
        log(f"  joint         R[{T - 1}] = {' '.join(f'{v:.3f}' for v in grids['joint'].matrix('box', 'iou')[T - 1])}")

    results = assemble(args, argv, tasks, counts, methods, grids, seconds, losses, route_steps, final_routes, zs_res, casam_infos,
                       encode_s, t_start, cfg, bb, partial=False, prog=prog)
    results["click_sequences"] = json_safe(seq_res)
    results["targets"] = targets(results["methods"], results["router"], seq_res)
    write_outputs(out_dir, args.name, results, figure=not args.no_plot)
    reg_dir.cleanup()
    log(f"done in {results['seconds']:.0f}s → {out_dir / (args.name + '.json')}")
    return results


def click_sequences(bb: Backbone, test_s: List[List[Sample]], names: List[str], methods: Sequence[str],
                    final_routes: List[List[Optional[int]]], layers: List[torch.nn.Module], infos: List[LayerInfo],
                    clicks: int, max_images: Optional[int] = None) -> Dict[str, Any]:
    """Click sequences after the last task, per method and task (mean IoU/Dice after each click, AUC), on at most
    ``max_images`` test images per task."""
    memo: Dict[tuple, List[Dict]] = {}

    def run_one(li: Optional[int], j: int, i: int, raw: bool = False) -> List[Dict]:
        if li is not None and not infos[li].serves("click"):
            li = None  # the gate: this layer may not serve clicks
        key = (li, j, i, raw)
        if key not in memo:
            memo[key] = sequences(bb, None if li is None else layers[li], test_s[j][i], clicks, raw)
        return memo[key]

    out: Dict[str, Any] = {}
    for m in SEQUENCE_METHODS:
        if m not in methods:
            continue
        per_task = {}
        for j, te in enumerate(test_s):
            curves = []
            for i in spread(range(len(te)), max_images):
                li = {"zero_shot": None, "fresh_install": None, "casam": final_routes[j][i],
                      "casam_oracle": j if j < len(layers) else None}[m]
                curves += run_one(li, j, i, raw=(m == "zero_shot"))
            per_task[names[j]] = summarise(curves)
        mean_iou = np.mean([v["iou"] for v in per_task.values()], 0)
        mean_dice = np.mean([v["dice"] for v in per_task.values()], 0)
        out[m] = {"per_task": per_task, "mean": {
            "iou": [round(float(v), 4) for v in mean_iou], "dice": [round(float(v), 4) for v in mean_dice],
            "auc_iou": round(float(np.mean(mean_iou)), 4), "monotone": bool(np.all(np.diff(mean_iou) >= -1e-9))}}
    return out


# ------------------------------------------------------------------------------------------ results
def assemble(args, argv, tasks, counts, methods, grids, seconds, losses, route_steps, final_routes, zs_res, casam_infos,
             encode_s, t_start, cfg, bb, partial: bool, prog: str = "casam benchmark") -> Dict[str, Any]:
    names = [t.name for t in tasks]
    T = len(tasks)
    zs_box = [r["box"]["iou"] for r in zs_res]
    zs_pt = [r["click"]["iou"] for r in zs_res]
    out_methods: Dict[str, Any] = {}
    for m in methods:
        g = grids[m]
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
            "seconds": {k: round(v, 1) for k, v in seconds[m].items()},
            "loss_history": losses[m],
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
            entry["note"] = ("non-continual upper bound: one layer trained once on every task's training images and "
                             "evaluated once; each row of R repeats that final row, so BWT is not defined (null)")
        if m == "zero_shot":
            entry["note"] = "no training: every row of R is the same"
        if m == "casam_oracle":
            entry["note"] = ("the layer of the image's own task (layers are immutable, so row k repeats R[j][j]); on tasks "
                             "not yet learned it has no layer and uses plain SAM")
        if m == "casam":
            entry["note"] = ("the VAE router picks the layer (lowest score; plain SAM when the score is above that layer's tau); "
                             "the layer decodes only the prompt types where it beat plain SAM on its validation split; "
                             "each (layer, image) prediction is computed once and reused, since layers never change")
        if m == "fresh_install":
            entry["note"] = "the product with an empty registry: plain SAM for boxes, casam.clicks for clicks"
        out_methods[m] = entry

    router: Dict[str, Any] = {}
    if final_routes and len(route_steps) == T:
        cols = names + [FALLBACK]
        conf = {n: {c: 0 for c in cols} for n in names}
        correct = total = fb = 0
        for j, rs in enumerate(final_routes):
            for r in rs:
                conf[names[j]][FALLBACK if r is None else names[r]] += 1
                correct += int(r == j)
                fb += int(r is None)
                total += 1
        router = {"accuracy": correct / total if total else None, "fallback_rate": fb / total if total else None,
                  "confusion": conf, "confusion_columns": cols, "n_images": total,
                  "modality_confusion": modality_confusion(conf, tasks),
                  "note": "test images of every task after the last task; correct = routed to its own task's layer "
                          "(fallback counts as wrong)"}
    if route_steps:
        router["per_step"] = route_steps
        rates = [st["new_modality_fallback_rate"] for st in route_steps if st.get("new_modality_fallback_rate") is not None]
        router["new_modality_fallback_min"] = min(rates) if rates else None
        router["other_modality_layer_max"] = max((st.get("other_modality_layer", 0) for st in route_steps), default=None)
        fin = {m: out_methods.get(m, {}) for m in ("casam", "casam_oracle")}
        if all(fin[m].get("avg_iou") is not None for m in fin):
            router["regret"] = {"box": fin["casam_oracle"]["avg_iou"] - fin["casam"]["avg_iou"],
                                "click": fin["casam_oracle"]["avg_iou_click"] - fin["casam"]["avg_iou_click"]}
        router["taus"] = [i.tau for i in casam_infos]

    params, gmac = describe(bb.embed_dim, bb.embed_size)
    res: Dict[str, Any] = {
        "benchmark": "continual stream (CA-SAM issues 3 and 11)",
        "partial": partial,
        "backbone": {"name": bb.name, "id": bb.id, "img_size": bb.img_size, "embed_size": bb.embed_size},
        "tasks": names,
        "task_data": counts,
        "prompts": {"box": "tight ground-truth box per class", "click": "one click at the foreground pixel nearest the mask centroid, answered as each method answers clicks (zero_shot: the decoder's raw point prompt; the others: casam.clicks box proposals)"},
        "metrics": "IoU per mask averaged over the task's test masks; R[k][j] = after learning task k, on task j (rows "
                   "lower-triangular); R_all also has the not-yet-seen tasks; avg_iou = mean of the last row; "
                   "bwt = mean_j<T R[T][j] - R[j][j]; unseen_delta = mean over k<j of R_all[k][j] - zero-shot[j]",
        "methods": out_methods,
        "router": router,
        "layer": {"params": params, "gmac": round(gmac, 3), "note": f"one Alignment Layer at {bb.embed_size}x{bb.embed_size} (casam.alignment.describe)"},
        "machine": machine_info(args.device),
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "seconds": round(time.time() - t_start, 1),
        "encode_seconds": round(encode_s, 1),
        "recipe": recipe(args, cfg),
    }
    res["targets"] = targets(out_methods, router, {}) if not partial else {}
    return json_safe(res)


def recipe(args, cfg: TrainConfig) -> Dict[str, Any]:
    if args.quick:
        kind = "quick smoke run (tiny random backbone; numbers are meaningless)"
    elif cfg.epochs == 24 and cfg.max_images is None and not args.max_train_cases:
        kind = "METHOD.md recipe (24 epochs, all training images)"
    else:
        kind = (f"reduced CPU recipe: {cfg.epochs} epochs on at most {cfg.max_images or 'all'} training images per task "
                f"(METHOD.md: 24 epochs on all training images); the same images and steps for every trained method")
    return {"kind": kind, "epochs": cfg.epochs, "clicks": args.clicks, "sequence_cases": args.sequence_cases, "max_images": cfg.max_images, "max_train_cases": args.max_train_cases,
            "max_test_cases": args.max_test_cases, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
            "val_fraction": cfg.val_fraction, "vae_epochs": cfg.vae_epochs, "vae_beta": cfg.vae_beta, "tau_folds": cfg.tau_folds,
            "tau_percentile": cfg.tau_percentile, "prompt_mix": f"box p={cfg.box_prob} (±{cfg.jitter:g} px jitter) else central point", "gate_lr": cfg.gate_lr, "select_best": cfg.select_best,
            "joint": "one layer, the same epochs over the union of the tasks' training images"}


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


def targets(methods: Dict[str, Any], router: Dict[str, Any], seqs: Dict[str, Any]) -> Dict[str, Any]:
    """The project's targets (issue 11; BWT from issue 3), each with its value and whether it is met."""
    def get(m: str, key: str):
        return methods.get(m, {}).get(key)

    def check(target: str, value, met) -> Dict[str, Any]:
        return {"target": target, "value": value, "met": None if value is None else bool(met)}

    t: Dict[str, Any] = {}
    ca, zs = get("casam", "avg_iou"), get("zero_shot", "avg_iou")
    t["casam_box_vs_zero_shot"] = check("CA-SAM box Avg-IoU >= frozen backbone", None if ca is None or zs is None else ca - zs,
                                        ca is not None and zs is not None and ca >= zs)
    R, Z = get("casam", "R"), get("zero_shot", "R")
    worst = min(a - b for a, b in zip(R[-1], Z[-1])) if R and Z and len(R[-1]) == len(Z[-1]) else None
    t["casam_box_per_task"] = check(f"no task's final CA-SAM box IoU more than {TARGET_BOX_TASK_DROP} below the frozen backbone",
                                    worst, worst is not None and worst >= -TARGET_BOX_TASK_DROP)
    v = get("casam", "avg_iou_click")
    t["casam_click"] = check(f"CA-SAM click Avg-IoU >= {TARGET_CLICK}", v, v is not None and v >= TARGET_CLICK)
    v = get("fresh_install", "avg_iou_click")
    t["fresh_install_click"] = check(f"fresh install click Avg-IoU >= {TARGET_FRESH_CLICK}", v, v is not None and v >= TARGET_FRESH_CLICK)
    fb = get("fresh_install", "avg_iou")
    v = None if fb is None or zs is None else fb - zs
    t["fresh_install_box"] = check(f"fresh install box Avg-IoU >= zero-shot - {TARGET_FRESH_BOX_DROP}", v,
                                   v is not None and v >= -TARGET_FRESH_BOX_DROP)
    for p in PROMPTS:
        v = (router.get("regret") or {}).get(p)
        t[f"router_regret_{p}"] = check(f"router regret (oracle - router) <= {TARGET_REGRET} on {p} prompts", v,
                                        v is not None and v <= TARGET_REGRET)
    v = get("casam", "bwt")
    t["casam_bwt"] = check(f"CA-SAM BWT >= {TARGET_BWT}", v, v is not None and v >= TARGET_BWT)
    v = router.get("new_modality_fallback_min")
    t["new_modality_fallback"] = check(f"images of a modality no layer was trained on fall back >= {TARGET_UNSEEN_FALLBACK:.0%} "
                                       "at every step (the lowest step)", v, v is not None and v >= TARGET_UNSEEN_FALLBACK)
    v = router.get("other_modality_layer_max")
    t["no_cross_modality_route"] = check("an image of a modality that has a layer goes to that modality's layer or falls "
                                         "back, at every step (most images routed to another modality's layer)", v,
                                         v is not None and v == 0)
    hard = [j for j, z in enumerate(Z[-1] if Z else []) if z is not None and z < TARGET_HARD_ZERO_SHOT]
    v = min(R[-1][j] for j in hard) if hard and R else None
    t["casam_box_hard_task"] = check(f"on a task the frozen backbone fails at (box IoU < {TARGET_HARD_ZERO_SHOT}), CA-SAM's final "
                                     f"box IoU >= {TARGET_HARD_BOX} (the lowest such task)", v, v is not None and v >= TARGET_HARD_BOX)
    # encoding grows with the images; training is capped at max_images, and calibration and validation are seconds
    serve = [st["seconds_to_serve"]["encode_per_image"] * 80 + st["seconds_to_serve"]["after_encode"]
             for st in router.get("per_step", []) if st.get("seconds_to_serve")]
    v = round(max(serve), 1) if serve else None
    t["seconds_to_serve"] = check(f"labelled images to served layer <= {TARGET_SERVE_SECONDS} s for 80 images (the slowest "
                                  "task: 80 x encode seconds per image + train + calibrate + validate clicks)", v,
                                  v is not None and v <= TARGET_SERVE_SECONDS)
    cs = (seqs.get("casam") or {}).get("mean")
    v = cs["iou"][-1] if cs else None
    t["casam_sequence"] = check(f"CA-SAM IoU after the last click >= {TARGET_SEQUENCE}", v, v is not None and v >= TARGET_SEQUENCE)
    t["casam_sequence_monotone"] = check("CA-SAM mean IoU never drops from one click to the next", None if not cs else cs["monotone"],
                                         bool(cs and cs["monotone"]))
    return t


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``casam benchmark`` (and ``benchmarks/continual.py``)."""
    prog = "casam benchmark"
    if argv is None:  # run as a script
        argv = sys.argv[1:]
        script = Path(sys.argv[0])
        try:
            script = script.resolve().relative_to(Path.cwd())
        except ValueError:
            pass
        prog = f"python {script}"
    argv = list(argv)
    args = resolve(build_parser().parse_args(argv))
    run(args, argv, prog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
