"""The ``casam`` command line: add layers, predict, manage the registry, benchmark, export, demo.

Run ``casam --help`` or ``casam <command> --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from casam.errors import CasamError
from casam.model.backbone import DEFAULT_BACKBONE
from casam.paths import default_cache, default_registry
from casam.runtime import DEFAULT_DEVICE
from casam.training.config import TrainConfig


def _backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"litemedsam, vit_b, vit_l, vit_h or tiny (default {DEFAULT_BACKBONE})")
    p.add_argument("--checkpoint", default=None, help="weights file (required for vit_*; optional for litemedsam)")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help=f"torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, … "
                        f"(default {DEFAULT_DEVICE})")


def _registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None,
                   help=f"layer registry folder (default $CASAM_REGISTRY or {default_registry()})")


def _registry(args):
    """The layer registry the options name."""
    from casam.registry.store import LayerRegistry

    return LayerRegistry(args.registry or default_registry())


def _backbone(args):
    """The backbone the options name."""
    from casam.model.backbone import load_backbone

    return load_backbone(args.backbone, args.checkpoint, args.device)


def cmd_add_layer(args) -> int:
    from casam.data.datasets import load_cases, read_meta
    from casam.registry.store import writer_lock
    from casam.training.layer import train_layer

    cases = [c for c in read_meta(args.data) if c.mask is not None and (args.split == "all" or c.split == args.split)]
    institutions = sorted({c.institution for c in cases})
    if args.institution:
        if args.institution in institutions:
            cases = [c for c in cases if c.institution == args.institution]
        elif institutions == ["default"]:
            pass  # no meta.csv: the whole folder is this institution
        else:
            raise CasamError(f"institution {args.institution!r} not in {args.data}/meta.csv "
                             f"(has: {', '.join(institutions)})")
        groups = {args.institution: cases}
    else:
        groups = {i: [c for c in cases if c.institution == i] for i in institutions}
    if not cases:
        raise CasamError(f"no labelled images in {args.data} (split {args.split})")
    bb = _backbone(args)
    reg = _registry(args)
    cfg = TrainConfig(epochs=args.epochs, max_images=args.max_images, seed=args.seed, batch_size=args.batch_size,
                      lr=args.lr, head_steps=args.head_steps)
    for inst, cs in groups.items():
        images, masks, patients = load_cases(cs)
        with writer_lock(reg):  # the app's online trainer and a federated sync take the same lock
            info = train_layer(bb, images, masks, patients, reg, inst, args.modality, cfg,
                               cache_dir=args.cache or default_cache(),
                               extra={"source": str(Path(args.data).resolve())})
        keys = ("name", "institution", "n_images", "n_patients", "tau", "val_iou", "zero_shot_val_iou")
        print(json.dumps({k: info.to_dict()[k] for k in keys}))
    return 0


def cmd_predict(args) -> int:
    import numpy as np
    from PIL import Image

    from casam.data.datasets import read_image
    from casam.inference.predictor import CASAMPredictor

    image = read_image(args.image)
    points = [p for p in (args.point or [])] + [p for p in (args.neg_point or [])]
    labels = [1] * len(args.point or []) + [0] * len(args.neg_point or [])
    pred = CASAMPredictor(_backbone(args), _registry(args)).predict(image, points or None, labels or None, args.box,
                                                                    layer=args.layer)
    out = Path(args.out or Path(args.image).with_suffix("").as_posix() + "_mask.png")
    Image.fromarray(pred.mask * np.uint8(args.value)).save(out)
    print(json.dumps({"mask": str(out), "area": int(pred.mask.sum()), "predicted_iou": round(pred.iou, 4),
                      "route": pred.route.to_dict()}))
    return 0


def cmd_layers(args) -> int:
    reg = _registry(args)
    if args.action == "list":
        active = {i.name for i in reg.active()}
        rows = [dict(i.to_dict(), active=i.name in active) for i in reg.list()]
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
        else:
            print(f"{'name':28} {'institution':28} {'active':6} {'images':6} {'tau':>9} {'val_iou':>7}  created")
            for r in rows:
                v = "" if r["val_iou"] is None else f"{r['val_iou']:.3f}"
                print(f"{r['name']:28} {r['institution'][:28]:28} {str(r['active']):6} {r['n_images']:6} "
                      f"{r['tau']:9.4g} {v:>7}  {r['created']}")
    elif args.action == "remove":
        print(f"removed {reg.remove(args.target).name}")
    elif args.action == "rollback":
        removed = reg.rollback(args.target).name
        print(f"removed {removed}; active now: {[i.name for i in reg.active() if i.institution == args.target]}")
    return 0


def cmd_benchmark(args) -> int:
    from casam.evaluation.benchmark import main as bench_main

    rest = list(args.rest)
    return bench_main(rest[1:] if rest[:1] == ["--"] else rest)


def cmd_federated(args) -> int:
    from casam.federated.job import main as federated_main

    return federated_main(args.rest)


def cmd_export_bundle(args) -> int:
    from casam.bundle.export import export_bundle

    out = export_bundle(args.registry or default_registry(), args.out, backbone=args.backbone,
                        checkpoint=args.checkpoint, template=args.template)
    print(f"bundle written to {out}")
    return 0


def cmd_evaluate(args) -> int:
    from casam.evaluation.evaluate import run

    run(args)
    return 0


def cmd_demo(args) -> int:
    from casam.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    """Returns the ``casam`` argument parser."""
    p = argparse.ArgumentParser(prog="casam", description="Continual Alignment for SAM: frozen SAM + per-institution "
                                                          "Alignment Layers + VAE router")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("add-layer", help="train a new Alignment Layer from an images/ + masks/ (+ meta.csv) folder")
    a.add_argument("data", help="folder with images/, masks/ (uint8 class ids) and optionally meta.csv (case, patient, "
                                "institution, split)")
    a.add_argument("--institution", default=None,
                   help="institution the layer serves (default: one layer per institution in meta.csv)")
    a.add_argument("--modality", default="", help="free text stored with the layer (e.g. MR, CT, dermoscopy)")
    a.add_argument("--split", default="train", help="meta.csv split to train on (train, test or all)")
    train = TrainConfig()  # CA-SAM's recipe
    a.add_argument("--epochs", type=int, default=train.epochs,
                   help=f"passes over the training images (default {train.epochs})")
    a.add_argument("--batch-size", type=int, default=train.batch_size,
                   help=f"images per optimiser step (default {train.batch_size})")
    a.add_argument("--lr", type=float, default=train.lr, help=f"Adam learning rate (default {train.lr:g})")
    a.add_argument("--max-images", type=int, default=train.max_images, help="cap on training images (faster on CPU)")
    a.add_argument("--head-steps", type=int, default=train.head_steps,
                   help=f"steps of the institution's refinement head at the image's resolution (default "
                        f"{train.head_steps}; 0: the Alignment Layer alone)")
    a.add_argument("--seed", type=int, default=train.seed, help=f"seed of every random choice (default {train.seed})")
    a.add_argument("--cache", default=None, help="embedding cache folder (default $CASAM_CACHE)")
    _backbone_args(a)
    _registry_arg(a)
    a.set_defaults(func=cmd_add_layer)

    pr = sub.add_parser("predict", help="segment one object in a 2D image from a box and/or points")
    pr.add_argument("image")
    pr.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="box, pixel corners")
    pr.add_argument("--point", type=float, nargs=2, action="append", metavar=("X", "Y"),
                    help="foreground point (repeatable)")
    pr.add_argument("--neg-point", type=float, nargs=2, action="append", metavar=("X", "Y"),
                    help="background point (repeatable)")
    pr.add_argument("--layer", default="auto", help="auto (router), none (plain SAM) or a layer name")
    pr.add_argument("--out", default=None, help="output mask PNG (default <image>_mask.png)")
    pr.add_argument("--value", type=int, default=255, help="pixel value of the mask in the PNG (default 255)")
    _backbone_args(pr)
    _registry_arg(pr)
    pr.set_defaults(func=cmd_predict)

    ly = sub.add_parser("layers", help="list, remove or roll back layers")
    ly.add_argument("action", choices=["list", "remove", "rollback"])
    ly.add_argument("target", nargs="?", help="layer name (remove) or institution (rollback)")
    ly.add_argument("--json", action="store_true", help="list as JSON")
    _registry_arg(ly)
    ly.set_defaults(func=cmd_layers)

    b = sub.add_parser("benchmark", help="run the continual stream benchmark (see casam benchmark -- --help)",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_benchmark)

    f = sub.add_parser("federated", help="federated CA-SAM on NVFlare (see casam federated --help)", add_help=False)
    f.add_argument("rest", nargs=argparse.REMAINDER)
    f.set_defaults(func=cmd_federated)

    from casam.demo import DEMO_EPOCHS
    from casam.evaluation.evaluate import add_parser as add_evaluate

    ev = add_evaluate(sub)
    _backbone_args(ev)
    _registry_arg(ev)
    ev.set_defaults(func=cmd_evaluate)

    e = sub.add_parser("export-bundle", help="write a MONAI bundle (configs + models/) from a trained registry")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--template", default=None,
                   help="bundle template folder (default: the template installed with casam, from bundles/casam)")
    _backbone_args(e)
    _registry_arg(e)
    e.set_defaults(func=cmd_export_bundle)

    d = sub.add_parser("demo", help="train a layer on a public brain MRI template and segment with it (no data needed)")
    d.add_argument("--out", default="casam-demo", help="output folder")
    d.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                   help=f"training epochs of the demo's layer (default {DEMO_EPOCHS}, the demo's short recipe)")
    _backbone_args(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``casam`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["benchmark"], ["federated"]):
        # argparse.REMAINDER does not take options ("casam benchmark --help" would be refused): pass them on as they are
        args = argparse.Namespace(command=argv[0], rest=argv[1:],
                                  func=cmd_benchmark if argv[0] == "benchmark" else cmd_federated)
    else:
        args = build_parser().parse_args(argv)
        args.argv = argv[1:]
    if args.command == "layers" and args.action in ("remove", "rollback") and not args.target:
        build_parser().error(f"layers {args.action} needs a target")
    try:
        return int(args.func(args) or 0)
    except CasamError as e:
        print(f"casam: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"casam: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
