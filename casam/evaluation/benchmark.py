"""The continual stream benchmark: CA-SAM against its baselines on every task of a data root.

Tasks come from :func:`casam.data.datasets.discover_tasks` (stream order of the data README). Each image is encoded
once by the frozen backbone (disk cache) and the samples are shared by every method:

``zero_shot``     plain LiteMedSAM (the frozen backbone), no training; a click is its raw point prompt;
``fresh_install`` what a new user gets: plain SAM with casam's click answer (:mod:`casam.prompts.clicks`), no layer;
``seq_decoder``   the mask decoder fine-tuned task after task (one copy, continued: forgets);
``seq_layer``     one Alignment Layer trained task after task (the same layer keeps training: forgets);
``casam``         CA-SAM: a fresh Alignment Layer + router VAE per task (``train_layer`` into a temporary
                  registry), chosen at test time by the VAE router with the plain-SAM fallback, and used for a
                  prompt type only where it beat plain SAM on its validation split (else: fresh_install);
``casam_oracle``  the same layers chosen by the true task id (the router's upper bound);
``joint``         one Alignment Layer trained on all tasks' training data at once (non-continual upper bound).

After each task every method is evaluated on the test split of every task (seen and not yet seen): R[k][j]
is the mean IoU (per mask) on task j after learning task k, with the tight ground-truth box per class and with
one click at the mask's centroid pixel. After the last task, interaction sequences (:mod:`casam.scoring.protocol`:
the tight box or a centre click, then ``--clicks`` corrective clicks, each at the centre of the largest error) score
the interactive use.

A run is a sequence of named stages over one state (:mod:`casam.evaluation.stages`: encode, plain scores, one
step of each trained method per task, click sequences, joint); its results are read from that state
(:mod:`casam.evaluation.results`) and go to ``<out>/continual.json``, ``continual.md``, ``continual_R.png`` and
``continual_clicks.png`` (:mod:`casam.evaluation.report`); the JSON is rewritten after every task.

Run ``casam benchmark --help``. Three recipes: the default :data:`REDUCED_CPU_RECIPE` (fewer epochs and images,
so a CPU finishes), ``--quick`` (a tiny smoke run: random tiny backbone, a few images) and ``--full`` (CA-SAM's
recipe, :class:`casam.training.config.TrainConfig`'s defaults: every training image; for a GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from casam.evaluation.report import write_outputs
from casam.evaluation.results import assemble, final_results
from casam.evaluation.stages import (
    METHODS,
    RESULTS_DIR,
    casam_step,
    encode,
    joint,
    log,
    log_rows,
    plain_scores,
    prepare,
    seq_decoder_step,
    seq_layer_step,
    sequences,
    start_arms,
)
from casam.model.backbone import DEFAULT_BACKBONE
from casam.paths import default_data
from casam.runtime import DEFAULT_DEVICE, resolve_device
from casam.training.config import TrainConfig

__all__ = ["METHODS", "DEFAULT_METHODS", "REDUCED_CPU_RECIPE", "QUICK_RECIPE", "build_parser", "resolve", "run",
           "main"]

DEFAULT_METHODS = ("zero_shot", "fresh_install", "casam", "casam_oracle")
# The benchmark's default: a reduced recipe a CPU finishes, by design not CA-SAM's (TrainConfig's defaults, --full).
REDUCED_CPU_RECIPE = {"epochs": 4, "max_images": 48}
# --quick: a smoke run of the whole pipeline on a tiny random backbone; its numbers are meaningless.
QUICK_RECIPE = {"epochs": 1, "max_images": 4, "max_train_cases": 6, "max_test_cases": 3, "backbone": "tiny",
                "tasks": "0,1", "cache": "none", "vae_epochs": 3, "head_steps": 20}


# ----------------------------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    """Returns the ``casam benchmark`` argument parser (training options left None are filled by :func:`resolve`)."""
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="casam benchmark",
        description="Continual stream benchmark: frozen SAM, sequential decoder fine-tuning, one shared Alignment "
                    "Layer, CA-SAM (router and oracle) and joint training, evaluated after every task on every task.",
    )
    p.add_argument("--data", default=None,
                   help=f"data root with MANIFEST.tsv (default $CASAM_DATA or {default_data()})")
    p.add_argument("--tasks", default=None,
                   help="comma-separated subset of tasks, by name (e.g. dermoscopy_ph2,brain_mri_lgg@TCGA_DU) or by "
                        "position in the stream (0,1); kept in stream order (default: all)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods to run (default {','.join(DEFAULT_METHODS)}; "
                        f"all: {','.join(METHODS)})")
    p.add_argument("--clicks", type=int, default=5,
                   help="corrective clicks after the first prompt (the tight box, or a click at the object's centre) "
                        "of each interaction sequence after the last task (default 5; 0 = no sequences)")
    p.add_argument("--sequence-cases", type=int, default=None,
                   help="click sequences on at most this many test images per task (evenly spaced; default all)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default {RESULTS_DIR}, relative to the current directory)")
    p.add_argument("--name", default="continual", help="stem of the output files (default continual)")
    p.add_argument("--cache", default=None,
                   help="embedding cache folder (default $CASAM_CACHE or ~/.casam/cache; 'none' = memory only)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs per task (default {REDUCED_CPU_RECIPE['epochs']}, the reduced CPU recipe; "
                        f"CA-SAM's recipe: {defaults.epochs})")
    p.add_argument("--max-images", type=int, default=None,
                   help=f"cap on training images per task (default {REDUCED_CPU_RECIPE['max_images']}; 0 = all, as in "
                        "CA-SAM's recipe)")
    p.add_argument("--max-train-cases", type=int, default=None,
                   help="read at most this many training cases per task (evenly spaced)")
    p.add_argument("--max-test-cases", type=int, default=None,
                   help="read at most this many test cases per task (evenly spaced)")
    p.add_argument("--head-steps", type=int, default=None,
                   help=f"steps of each institution's refinement head (default {defaults.head_steps}; 0 = the "
                        "Alignment Layer alone)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help=f"images per optimiser step (default {defaults.batch_size})")
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"Adam learning rate (default {defaults.lr:g})")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"seed (default {defaults.seed})")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="litemedsam (default), vit_b, vit_l, vit_h or tiny")
    p.add_argument("--checkpoint", default=None, help="backbone weights (required for vit_*)")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help=f"torch device; auto = cuda when available, else cpu (default {DEFAULT_DEVICE})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the heatmaps and sequence curves")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"tiny smoke run: tiny random backbone, first 2 tasks, {QUICK_RECIPE['max_train_cases']} "
                           f"train / {QUICK_RECIPE['max_test_cases']} test cases, {QUICK_RECIPE['epochs']} epoch")
    mode.add_argument("--full", action="store_true",
                      help=f"CA-SAM's recipe: {defaults.epochs} epochs on all training images (use a GPU)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults that depend on --quick / --full, resolves the device and checks the methods.

    Args:
        args: the parsed options (:func:`build_parser`).

    Returns:
        ``args``, completed: recipe defaults (:data:`QUICK_RECIPE`, CA-SAM's recipe for ``--full``, else
        :data:`REDUCED_CPU_RECIPE`), ``max_images`` None for all, ``device`` resolved, ``method_list``.

    Raises:
        SystemExit: an unknown method.
    """
    train = TrainConfig()
    if args.quick:
        defaults = dict(QUICK_RECIPE)
    elif args.full:
        defaults = dict(epochs=train.epochs, max_images=0)
    else:
        defaults = dict(REDUCED_CPU_RECIPE)
    for k, v in defaults.items():
        if k == "backbone":
            if args.backbone == DEFAULT_BACKBONE:
                args.backbone = v
        elif getattr(args, k, None) is None:
            setattr(args, k, v)
    if getattr(args, "head_steps", None) is None:
        args.head_steps = train.head_steps
    if not hasattr(args, "vae_epochs"):
        args.vae_epochs = train.vae_epochs
    if args.max_images is not None and args.max_images <= 0:
        args.max_images = None
    args.device = resolve_device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"casam benchmark: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    args.method_list = [m for m in METHODS if m in methods]
    return args


# --------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace, argv: Sequence[str], prog: str = "casam benchmark") -> Dict[str, Any]:
    """Runs the benchmark's stages (:mod:`casam.evaluation.stages`) and writes its results.

    The JSON and Markdown are rewritten after every task (``partial``: true); CA-SAM's layers persist beside the
    embedding cache, so a stopped run started again with the same recipe resumes from its layers.

    Args:
        args: the resolved options (:func:`resolve`).
        argv: the command line, for the record.
        prog: how the command was called.

    Returns:
        The results, as written to ``<out>/<name>.json``.
    """
    state = prepare(args, argv, prog)
    encode(state)
    plain_scores(state)
    start_arms(state)
    for k, task in enumerate(state.tasks):
        log(f"=== task {k + 1}/{state.T}: {task.name} ({len(state.train_s[k])} training images)")
        if "seq_decoder" in state.methods:
            seq_decoder_step(state, k)
        if "seq_layer" in state.methods:
            seq_layer_step(state, k)
        if state.need_casam:
            casam_step(state, k)
        log_rows(state, k)
        write_outputs(state.out_dir, args.name, assemble(state, partial=True), figure=False)
    if args.clicks > 0 and state.final_routes:
        sequences(state)
    if "joint" in state.methods:
        joint(state)
    results = final_results(state)
    write_outputs(state.out_dir, args.name, results, figure=not args.no_plot)
    state.reg_dir.cleanup()
    log(f"done in {results['seconds']:.0f}s → {state.out_dir / (args.name + '.json')}")
    return results


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
