"""The continual stream benchmark: CA-SAM against its baselines on every task of a data root.

Tasks come from :func:`casam.data.discover_tasks` (stream order of the data README). Each image is encoded
once by the frozen backbone (disk cache) and the samples are shared by every method:

``zero_shot``     the frozen backbone, no training;
``seq_decoder``   the mask decoder fine-tuned task after task (one copy, continued: forgets);
``seq_layer``     one Alignment Layer trained task after task (the same layer keeps training: forgets);
``casam``         CA-SAM: a fresh Alignment Layer + router VAE per task (``train_layer`` into a temporary
                  registry), chosen at test time by the VAE router with the plain-SAM fallback;
``casam_oracle``  the same layers chosen by the true task id (the router's upper bound);
``joint``         one Alignment Layer trained on all tasks' training data at once (non-continual upper bound).

After each task every method is evaluated on the test split of every task (seen and not yet seen): R[k][j]
is the mean IoU (per mask) on task j after learning task k, with the tight ground-truth box per class (and,
reported beside it, one point at the mask's centroid pixel). Results go to ``<out>/continual.json``,
``continual.md`` and ``continual_R.png``.

Run ``casam benchmark --help``; ``--quick`` is a tiny smoke run (random tiny backbone), ``--full`` the recipe
of METHOD.md (24 epochs, all images; for a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import config as casam_config
from .alignment import describe, fresh_layer
from .backbone import Backbone, load_backbone
from .data import Case, Task, discover_tasks, load_cases
from .metrics import boundary_iou, continual_summary, dice, iou
from .registry import LayerRegistry
from .router import Router
from .training import EmbeddingCache, Sample, TrainConfig, fit, make_samples, predict_sample, split_by_patient, train_layer

METHODS = ("zero_shot", "seq_decoder", "seq_layer", "casam", "casam_oracle", "joint")
LABELS = {
    "zero_shot": "1. frozen backbone (zero-shot)",
    "seq_decoder": "2. sequential decoder fine-tuning",
    "seq_layer": "3. one shared Alignment Layer, sequential",
    "casam": "4. CA-SAM (router)",
    "casam_oracle": "5. CA-SAM (oracle task id)",
    "joint": "6. joint multi-task layer (non-continual)",
}
PROMPTS = ("box", "point")
METRICS = ("iou", "dice", "biou")
FALLBACK = "fallback"
# Targets of the project (issue 3).
TARGET_BWT = -0.005
TARGET_ROUTER = 0.95
TARGET_ORACLE_GAP = 0.02
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
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods to run (default all: {','.join(METHODS)})")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results of the checkout)")
    p.add_argument("--name", default="continual", help="stem of the output files (default continual)")
    p.add_argument("--cache", default=None, help="embedding cache folder (default $CASAM_CACHE or ~/.casam/cache; 'none' = memory only)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs per task (default {REDUCED['epochs']}, reduced CPU recipe; METHOD: 24)")
    p.add_argument("--max-images", type=int, default=None,
                   help=f"cap on training images per task (default {REDUCED['max_images']}; 0 = all, as in METHOD)")
    p.add_argument("--max-train-cases", type=int, default=None, help="read at most this many training cases per task (evenly spaced)")
    p.add_argument("--max-test-cases", type=int, default=None, help="read at most this many test cases per task (evenly spaced)")
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
                        vae_epochs=3)
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
    if not hasattr(args, "vae_epochs"):
        args.vae_epochs = 10
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
def _spread(cases: List[Case], n: Optional[int]) -> List[Case]:
    if n is None or len(cases) <= n:
        return cases
    idx = sorted(set(np.linspace(0, len(cases) - 1, n).round().astype(int).tolist()))
    return [cases[i] for i in idx]


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
    """The training images ``train_layer`` uses: labelled, minus the validation patients, capped at max_images."""
    labelled = [s for s in samples if s.targets]
    tr, _ = split_by_patient([s.patient for s in labelled], cfg.val_fraction, cfg.seed)
    train_s = [labelled[i] for i in tr]
    if cfg.max_images is not None and len(train_s) > cfg.max_images:
        pick = np.random.default_rng(cfg.seed).choice(len(train_s), cfg.max_images, replace=False)
        train_s = [train_s[i] for i in sorted(pick)]
    return train_s


# ---------------------------------------------------------------------------------------- evaluation
ImageScores = Dict[str, Dict[str, List[float]]]  # prompt -> metric -> one value per mask


@torch.no_grad()
def score_image(backbone: Backbone, layer: Optional[Callable], sample: Sample) -> ImageScores:
    """IoU, Dice and boundary IoU of every mask of one test image, for the box and the point prompt.

    The layer runs once per image; both prompts decode on its output with ``casam.training.predict_sample``.
    """
    out: ImageScores = {p: {m: [] for m in METRICS} for p in PROMPTS}
    if not sample.targets:
        return out
    z = sample.embedding[None].to(backbone.device)
    h = layer(z) if layer is not None else z
    for prompt in PROMPTS:
        preds = predict_sample(backbone, lambda _z, h=h: h, sample, prompt)
        for t, m in zip(sample.targets, preds):
            out[prompt]["iou"].append(iou(m, t.mask))
            out[prompt]["dice"].append(dice(m, t.mask))
            out[prompt]["biou"].append(boundary_iou(m, t.mask))
    return out


def aggregate(per_image: Sequence[ImageScores]) -> Dict[str, Dict[str, Optional[float]]]:
    """Mean over every mask of a task (as ``casam.training.evaluate``), per prompt and metric."""
    res: Dict[str, Dict[str, Optional[float]]] = {}
    for p in PROMPTS:
        res[p] = {}
        for m in METRICS:
            vals = [v for s in per_image for v in s[p][m]]
            res[p][m] = float(np.mean(vals)) if vals else None
    return res


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


# ------------------------------------------------------------------------------------------- machine
def machine_info(device: str) -> Dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None}
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, numpy scalars → Python, floats rounded to 6 digits."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if not math.isfinite(x) else round(x, 6)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# --------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace, argv: Sequence[str], prog: str = "casam benchmark") -> Dict[str, Any]:
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parents[1] / "benchmarks" / "results"
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
                      vae_epochs=args.vae_epochs)
    log(f"tasks ({T}): {', '.join(names)}; methods: {', '.join(methods)}; epochs {cfg.epochs}, max_images {cfg.max_images}, "
        f"device {args.device}, cache {cache_dir}")

    bb = load_backbone(args.backbone, args.checkpoint, args.device)
    torch.manual_seed(args.seed)

    # ---- encode every image once; the samples are shared by every method
    t0 = time.time()
    train_all, train_s, test_s, counts = [], [], [], []
    for t in tasks:
        cache = EmbeddingCache(bb, cache_dir)  # one per task: its in-memory copies are dropped with it
        tr_cases = _spread([c for c in t.split("train") if c.mask is not None], args.max_train_cases)
        te_cases = _spread([c for c in t.split("test") if c.mask is not None], args.max_test_cases)
        imgs, masks, pats = load_cases(tr_cases)
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
    zs_img = [[score_image(bb, None, s) for s in te] for te in test_s]
    zs_res = [aggregate(x) for x in zs_img]
    zs_time = time.time() - t0
    if "zero_shot" in methods:
        seconds["zero_shot"]["eval"] = zs_time
        for k in range(T):
            for j in range(T):
                grids["zero_shot"].set(k, j, zs_res[j])
    zs_text = ", ".join(f"{n} {r['box']['iou']:.3f}" for n, r in zip(names, zs_res))
    log(f"zero-shot box IoU: {zs_text}  [{zs_time:.0f}s]")

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
    registry = LayerRegistry(reg_dir.name)
    casam_layers: List[torch.nn.Module] = []
    casam_vaes, casam_taus, casam_infos = [], [], []
    memo: Dict[tuple, ImageScores] = {}
    route_steps: List[Dict[str, Any]] = []
    final_routes: List[List[Optional[int]]] = []

    def layer_scores(li: Optional[int], j: int, i: int) -> ImageScores:
        if li is None:
            return zs_img[j][i]
        key = (li, j, i)
        if key not in memo:
            memo[key] = score_image(bb, casam_layers[li], test_s[j][i])
        return memo[key]

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
            info = train_layer(bb, [], [], [], registry, task.name, task.modality, cfg, progress=args.progress, samples=train_all[k])
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
            step = {"after": task.name, "seen_correct": 0, "seen_total": 0, "unseen_fallback": 0, "unseen_total": 0}
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
            step["seen_accuracy"] = step["seen_correct"] / step["seen_total"] if step["seen_total"] else None
            step["unseen_fallback_rate"] = step["unseen_fallback"] / step["unseen_total"] if step["unseen_total"] else None
            step["tau"] = info.tau
            step["val_iou"], step["zero_shot_val_iou"] = info.val_iou, info.zero_shot_val_iou
            route_steps.append(step)
            final_routes = routes
            dt = time.time() - t1
            for m in ("casam", "casam_oracle"):
                if m in methods:
                    seconds[m]["eval"] += dt / (2 if "casam" in methods and "casam_oracle" in methods else 1)
            log(f"CA-SAM layer {info.name}: tau {info.tau:.4g}, val IoU {_fmt(info.val_iou)} (zero-shot "
                f"{_fmt(info.zero_shot_val_iou)}); router on seen tasks {_fmt(step['seen_accuracy'])}, fallback on unseen "
                f"{_fmt(step['unseen_fallback_rate'])}")
        for m in methods:
            if m in ("zero_shot", "joint"):
                continue
            row = grids[m].matrix("box", "iou")[k]
            log(f"  {m:13s} R[{k}] = {' '.join('-' if v is None else f'{v:.3f}' for v in row)}")
        results = assemble(args, argv, tasks, counts, methods, grids, seconds, losses, route_steps, final_routes, zs_res,
                           casam_infos, encode_s, t_start, cfg, bb, partial=True, prog=prog)
        write_outputs(out_dir, args.name, results, figure=False)

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
    write_outputs(out_dir, args.name, results, figure=not args.no_plot)
    reg_dir.cleanup()
    log(f"done in {results['seconds']:.0f}s → {out_dir / (args.name + '.json')}")
    return results


# ------------------------------------------------------------------------------------------ results
def assemble(args, argv, tasks, counts, methods, grids, seconds, losses, route_steps, final_routes, zs_res, casam_infos,
             encode_s, t_start, cfg, bb, partial: bool, prog: str = "casam benchmark") -> Dict[str, Any]:
    names = [t.name for t in tasks]
    T = len(tasks)
    zs_box = [r["box"]["iou"] for r in zs_res]
    zs_pt = [r["point"]["iou"] for r in zs_res]
    out_methods: Dict[str, Any] = {}
    for m in methods:
        g = grids[m]
        if g.rows_done() == 0:
            continue
        n = g.rows_done()
        R = g.matrix("box", "iou")[:n]
        Rp = g.matrix("point", "iou")[:n]
        s, sp = _summary(R), _summary(Rp)
        entry = {
            "label": LABELS[m],
            "R": R, "avg_iou": s["avg"], "bwt": s["bwt"], "forgetting": s["forgetting"],
            "R_point": Rp, "avg_iou_point": sp["avg"], "bwt_point": sp["bwt"],
            "R_dice": g.matrix("box", "dice")[:n], "R_biou": g.matrix("box", "biou")[:n],
            "R_dice_point": g.matrix("point", "dice")[:n], "R_biou_point": g.matrix("point", "biou")[:n],
            "R_all": g.matrix("box", "iou", lower=False)[:n], "R_all_point": g.matrix("point", "iou", lower=False)[:n],
            "seconds": {k: round(v, 1) for k, v in seconds[m].items()},
            "loss_history": losses[m],
        }
        last = g.matrix("box", "dice")[n - 1]
        entry["avg_dice"] = float(np.mean(last)) if n == T and None not in last else None
        last = g.matrix("box", "biou")[n - 1]
        entry["avg_biou"] = float(np.mean(last)) if n == T and None not in last else None
        if n < T:
            entry["avg_iou"] = entry["avg_iou_point"] = None  # only the final row after the last task counts
        entry["unseen_delta"] = _unseen_delta(entry["R_all"], zs_box)
        entry["unseen_delta_point"] = _unseen_delta(entry["R_all_point"], zs_pt)
        if m == "joint":
            entry["bwt"] = entry["bwt_point"] = entry["forgetting"] = None
            entry["unseen_delta"] = entry["unseen_delta_point"] = None
            entry["note"] = ("non-continual upper bound: one layer trained once on every task's training images and "
                             "evaluated once; each row of R repeats that final row, so BWT is not defined (null)")
        if m == "zero_shot":
            entry["note"] = "no training: every row of R is the same"
        if m == "casam_oracle":
            entry["note"] = ("the layer of the image's own task (layers are immutable, so row k repeats R[j][j]); on tasks "
                             "not yet learned it has no layer and uses plain SAM")
        if m == "casam":
            entry["note"] = ("the VAE router picks the layer (lowest score; plain SAM when the score is above that layer's tau); "
                             "each (layer, image) prediction is computed once and reused, since layers never change")
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
                  "note": "test images of every task after the last task; correct = routed to its own task's layer "
                          "(fallback counts as wrong)"}
    if route_steps:
        router["per_step"] = route_steps
        router["taus"] = [i.tau for i in casam_infos]

    params, gmac = describe(bb.embed_dim, bb.embed_size)
    res: Dict[str, Any] = {
        "benchmark": "continual stream (CA-SAM issue 3)",
        "partial": partial,
        "backbone": {"name": bb.name, "id": bb.id, "img_size": bb.img_size, "embed_size": bb.embed_size},
        "tasks": names,
        "task_data": counts,
        "prompts": {"box": "tight ground-truth box per class (headline)", "point": "one point: the foreground pixel nearest the mask centroid"},
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
    res["targets"] = targets(out_methods, router) if not partial else {}
    return _clean(res)


def recipe(args, cfg: TrainConfig) -> Dict[str, Any]:
    if args.quick:
        kind = "quick smoke run (tiny random backbone; numbers are meaningless)"
    elif cfg.epochs == 24 and cfg.max_images is None and not args.max_train_cases:
        kind = "METHOD.md recipe (24 epochs, all training images)"
    else:
        kind = (f"reduced CPU recipe: {cfg.epochs} epochs on at most {cfg.max_images or 'all'} training images per task "
                f"(METHOD.md: 24 epochs on all training images); the same images and steps for every trained method")
    return {"kind": kind, "epochs": cfg.epochs, "max_images": cfg.max_images, "max_train_cases": args.max_train_cases,
            "max_test_cases": args.max_test_cases, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
            "val_fraction": cfg.val_fraction, "vae_epochs": cfg.vae_epochs, "vae_beta": cfg.vae_beta, "tau_folds": cfg.tau_folds,
            "tau_percentile": cfg.tau_percentile, "prompt_mix": f"box p={cfg.box_prob} (±{cfg.jitter:g} px jitter) else central point",
            "joint": "one layer, the same epochs over the union of the tasks' training images"}


def targets(methods: Dict[str, Any], router: Dict[str, Any]) -> Dict[str, Any]:
    def avg(m):
        return methods.get(m, {}).get("avg_iou")

    t: Dict[str, Any] = {}
    bwt = methods.get("casam", {}).get("bwt")
    t["casam_bwt"] = {"target": f"CA-SAM BWT >= {TARGET_BWT}", "value": bwt, "met": None if bwt is None else bwt >= TARGET_BWT}
    acc = router.get("accuracy")
    t["router_accuracy"] = {"target": f"router accuracy >= {TARGET_ROUTER}", "value": acc, "met": None if acc is None else acc >= TARGET_ROUTER}
    ca = avg("casam")
    base = {m: avg(m) for m in ("zero_shot", "seq_decoder", "seq_layer")}
    known = {m: v for m, v in base.items() if v is not None}
    t["casam_above_baselines"] = {"target": "CA-SAM Avg-IoU above methods 1-3 (zero-shot, sequential decoder, shared layer)",
                                  "value": ca, "baselines": base,
                                  "met": None if ca is None or not known else all(ca > v for v in known.values()) and len(known) == 3}
    orc = avg("casam_oracle")
    t["casam_near_oracle"] = {"target": f"CA-SAM Avg-IoU within {TARGET_ORACLE_GAP} of the oracle", "value": ca, "oracle": orc,
                              "gap": None if ca is None or orc is None else orc - ca,
                              "met": None if ca is None or orc is None else ca >= orc - TARGET_ORACLE_GAP}
    return t


def _fmt(v: Optional[float], nd: int = 3, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def markdown(res: Dict[str, Any]) -> str:
    names = res["tasks"]
    L = [f"# Continual stream benchmark ({res['backbone']['name']})", ""]
    if res.get("partial"):
        L += ["**Partial results: the run is still going (or stopped early).**", ""]
    L += [f"Tasks in stream order: {', '.join(f'`{n}`' for n in names)}.", "",
          f"Recipe: {res['recipe']['kind']}.", "",
          "| method | Avg-IoU (box) | BWT (box) | Avg-Dice | Avg-bIoU | Avg-IoU (point) | BWT (point) | unseen Δ vs zero-shot | train s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for m, e in res["methods"].items():
        L.append(f"| {e['label']} | {_fmt(e['avg_iou'])} | {_fmt(e['bwt'], signed=True)} | {_fmt(e.get('avg_dice'))} | "
                 f"{_fmt(e.get('avg_biou'))} | {_fmt(e['avg_iou_point'])} | {_fmt(e['bwt_point'], signed=True)} | "
                 f"{_fmt(e.get('unseen_delta'), signed=True)} | {e['seconds'].get('train', 0):.0f} |")
    L += ["", "Final row (IoU per task after the last task, box prompt):", "",
          "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m, e in res["methods"].items():
        last = e["R"][-1] if e["R"] else []
        L.append(f"| {m} | " + " | ".join(_fmt(v) for v in last) + " |")
    r = res.get("router") or {}
    if "accuracy" in r:
        L += ["", f"Router after the last task, on the test images of every task: accuracy **{_fmt(r['accuracy'])}**, "
              f"fallback rate {_fmt(r['fallback_rate'])} ({r['n_images']} images).", "",
              "| true task \\ chosen | " + " | ".join(r["confusion_columns"]) + " |", "|---|" + "---|" * len(r["confusion_columns"])]
        for n in names:
            L.append(f"| {n} | " + " | ".join(str(r["confusion"][n][c]) for c in r["confusion_columns"]) + " |")
    if r.get("per_step"):
        L += ["", "| after task | router accuracy on seen tasks | fallback on unseen tasks | τ | val IoU (layer / zero-shot) |", "|---|---|---|---|---|"]
        for s in r["per_step"]:
            L.append(f"| {s['after']} | {_fmt(s['seen_accuracy'])} | {_fmt(s['unseen_fallback_rate'])} | {s['tau']:.4g} | "
                     f"{_fmt(s['val_iou'])} / {_fmt(s['zero_shot_val_iou'])} |")
    if res.get("targets"):
        L += ["", "| target | value | met |", "|---|---|---|"]
        for t in res["targets"].values():
            v = t.get("value")
            L.append(f"| {t['target']} | {_fmt(v, 4) if isinstance(v, float) else v} | {'yes' if t['met'] else ('no' if t['met'] is False else '–')} |")
    mach = res["machine"]
    L += ["", f"Alignment Layer: {res['layer']['params']:,} parameters, {res['layer']['gmac']} GMAC per image.", "",
          "Command:", "", "```", res["command"], "```", "",
          f"Machine: {mach['cpu']}, {mach['cores']} cores ({mach['torch_threads']} torch threads), torch {mach['torch']}, "
          f"device {mach['device']}{', ' + mach['gpu'] if mach.get('gpu') else ' (no GPU)'}. "
          f"Wall time {res['seconds'] / 60:.1f} min (encoding {res['encode_seconds'] / 60:.1f} min).", "",
          "R[k][j] = mean IoU on task j's test split after learning task k. BWT = mean over j < T of R[T][j] − R[j][j]. "
          "Unseen Δ = mean over k < j of R[k][j] − zero-shot[j] (how a method treats tasks it has not learned yet). "
          "Full matrices (IoU, Dice, boundary IoU; box and point prompts) are in the JSON.", ""]
    return "\n".join(L)


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
    short = [n.replace("brain_mri_lgg@", "lgg@").replace("dermoscopy_", "").replace("fetal_head_", "fetal_") for n in names]
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
                    ax.text(j, k, f"{A[k, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if A[k, j] < 0.6 else "black")
        bwt = "–" if e["bwt"] is None else f"{e['bwt']:+.3f}"
        avg = "–" if e["avg_iou"] is None else f"{e['avg_iou']:.3f}"
        ax.set_title(f"{e['label']}\nAvg-IoU {avg}, BWT {bwt}", fontsize=8)
        ax.set_xticks(range(T), short, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(T), [f"after {s}" for s in short] if i % ncol == 0 else [], fontsize=7)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="IoU (box prompt)")
    fig.suptitle(f"Continual stream R[k][j] ({res['backbone']['name']}, {res['recipe']['epochs']} epochs, lr {res['recipe']['lr']:g})", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_outputs(out_dir: Path, name: str, res: Dict[str, Any], figure: bool = True) -> None:
    """Writes <name>.json (atomically), <name>.md and, with ``figure``, <name>_R.png."""
    js = out_dir / f"{name}.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, js)
    (out_dir / f"{name}.md").write_text(markdown(res))
    if figure:
        plot_figure(res, out_dir / f"{name}_R.png")


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
