"""The federated job, its simulator run, the central reference, and ``casam federated``.

``casam federated simulate`` runs the job in NVFlare's simulator with one site per institution of a dataset of
the data root (brain_mri_lgg: three hospitals), trains the same layers centrally from the same data and recipe,
and compares routed IoU on every site's test split. ``casam federated export-job`` writes the job folder a real
consortium submits (sites then read their data, institution and registry from their environment).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from casam.data.datasets import discover_tasks
from casam.errors import CasamError
from casam.evaluation.provenance import json_safe, machine_info
from casam.federated.coordinator import FED_MAX_VAL_DROP, FED_MIN_LABELS
from casam.federated.site import load_site_labels
from casam.inference.predictor import CASAMPredictor
from casam.model.backbone import DEFAULT_BACKBONE, Backbone, load_backbone
from casam.paths import default_data
from casam.prompts.masks import PROMPT_TYPES
from casam.registry.store import LayerRegistry, slug
from casam.scoring.samples import EmbeddingCache, make_samples
from casam.scoring.score import aggregate, score_image
from casam.training.config import TrainConfig
from casam.training.layer import train_layer

JOB_NAME = "casam_federated"
ALLOWED = ("casam.federated.flare",)  # the component classes a participant must allow (see allow_components)


def dataset_sites(root: str | Path, dataset: str) -> Dict[str, Dict[str, str]]:
    """One site per institution of a dataset of the data root.

    Returns:
        site name (the institution's slug) → {"data": dataset folder, "institution", "modality"}.

    Raises:
        CasamError: the dataset is not in the root's MANIFEST.tsv.
    """
    tasks = [t for t in discover_tasks(root) if t.dataset == dataset]
    if not tasks:
        raise CasamError(f"no dataset {dataset!r} in {root}/MANIFEST.tsv")
    return {slug(t.institution): {"data": str(t.root), "institution": t.institution, "modality": t.modality}
            for t in sorted(tasks, key=lambda t: slug(t.institution))}


def build_job(sites: Optional[Dict[str, Dict[str, str]]], coordinator_registry: str = "", site_registries: str = "",
              backbone: str = DEFAULT_BACKBONE, checkpoint: str = "", recipe: Optional[dict] = None,
              num_rounds: int = 1, min_labels: int = FED_MIN_LABELS, max_val_drop: float = FED_MAX_VAL_DROP,
              cache: str = "", min_clients: int = 1):
    """Builds the NVFlare job.

    Args:
        sites: site name → {"data", "institution", "modality"} (simulator: every site configured in the job), or
            None (a real consortium: one executor for all sites, each reading ``CASAM_SITE_DATA``,
            ``CASAM_SITE_INSTITUTION`` and ``CASAM_REGISTRY`` from its environment).
        coordinator_registry: the merged registry folder ("" = ``$CASAM_REGISTRY`` on the coordinator).
        site_registries: folder holding one registry per site (simulator only).
        backbone, checkpoint: the consortium's backbone.
        recipe: TrainConfig fields.
        num_rounds: rounds.
        min_labels, max_val_drop: see :class:`casam.federated.flare.CasamCoordinator`.
        cache: embedding cache folder of the sites ("" = ``$CASAM_CACHE``).
        min_clients: sites the job waits for (real consortium; the simulator uses every site).

    Returns:
        An ``nvflare.job_config.api.FedJob``.
    """
    from nvflare.job_config.api import FedJob

    from casam.federated.flare import (
        SYNC_TASK,
        TRAIN_TASK,
        CasamCoordinator,
        CasamSiteExecutor,
    )

    job = FedJob(name=JOB_NAME, min_clients=len(sites) if sites else min_clients)
    job.set_app_packages(["casam"])  # installed at every site (install.sh); not copied into the job
    job.to_server(CasamCoordinator(registry=coordinator_registry, backbone=backbone, checkpoint=checkpoint,
                                   num_rounds=num_rounds, recipe=dict(recipe or {}), min_labels=min_labels,
                                   max_val_drop=max_val_drop))
    if not sites:
        job.to_clients(CasamSiteExecutor(backbone=backbone, checkpoint=checkpoint, cache=cache),
                       tasks=[TRAIN_TASK, SYNC_TASK])
        return job
    for name, spec in sites.items():
        ex = CasamSiteExecutor(data=spec["data"], institution=spec["institution"], backbone=backbone,
                               checkpoint=checkpoint,
                               registry=str(Path(site_registries) / name) if site_registries else "", cache=cache,
                               modality=spec.get("modality", ""))
        job.to(ex, name, tasks=[TRAIN_TASK, SYNC_TASK])
    return job


def allow_components(local_dir: str | Path) -> Path:
    """Adds casam's NVFlare components to a participant's ``class_allow_list`` (NVFlare builds only allowed classes).

    Reads ``resources.json`` (else ``resources.json.default``, else NVFlare's built-in list) of an NVFlare
    ``local/`` folder and writes ``resources.json`` with :data:`ALLOWED` added. Idempotent.

    Returns:
        The resources.json written.
    """
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    resources: Dict[str, Any] = {}
    for name in ("resources.json", "resources.json.default"):
        if (local_dir / name).exists():
            resources = json.loads((local_dir / name).read_text())
            break
    allowed = list(resources.get("class_allow_list", DEFAULT_CLASS_ALLOW_LIST))
    resources["class_allow_list"] = allowed + [a for a in ALLOWED if a not in allowed]
    out = local_dir / "resources.json"
    out.write_text(json.dumps(resources, indent=2) + "\n")
    return out


def train_central(backbone: Backbone, sites: Dict[str, Dict[str, str]], registry: LayerRegistry, config_: TrainConfig,
                  cache: Optional[str] = None) -> List[str]:
    """The reference: every site's layer trained in one place, from the same data and recipe, in site order.

    Args:
        backbone: the consortium's backbone.
        sites: see :func:`build_job`.
        registry: where the layers go.
        config_: the recipe.
        cache: embedding cache folder.

    Returns:
        The names of the layers, in site order.
    """
    names = []
    for spec in sites.values():
        images, masks, patients = load_site_labels(spec["data"], spec["institution"])
        names.append(train_layer(backbone, images, masks, patients, registry, spec["institution"],
                                 spec.get("modality", ""), config_, cache, progress=False).name)
    return names


def routed_iou(backbone: Backbone, registry: LayerRegistry, spec: Dict[str, str],
               cache: Optional[str] = None) -> Dict[str, Any]:
    """Routed IoU of a registry on a site's test split, as the app serves it: the router picks a layer per image
    (plain SAM on fallback), and a layer serves only the prompt types the gate lets it serve
    (:meth:`casam.registry.store.LayerInfo.serves`).

    Args:
        backbone: the frozen backbone.
        registry: the registry under test.
        spec: the site (``data``, ``institution``).
        cache: embedding cache folder.

    Returns:
        {prompt (box, click): mean IoU over every mask, "own_layer": share of images routed to the site's own
        institution, "fallback": share routed to plain SAM, "images": count}.
    """
    images, masks, patients = load_site_labels(spec["data"], spec["institution"], split="test")
    samples = make_samples(backbone, images, masks, patients, EmbeddingCache(backbone, cache))
    pred = CASAMPredictor(backbone, registry)
    per_image, own, fallback = [], 0, 0
    for s in samples:
        r = pred.router.route(s.feature)
        info = pred.layers[r.index] if r.index is not None else None
        own += int(info is not None and info.institution == spec["institution"])
        fallback += int(info is None)
        plain = score_image(backbone, None, s)
        routed = score_image(backbone, pred.layer(info.name), s) if info is not None else plain
        per_image.append({p: routed[p] if info is not None and info.serves(p) else plain[p] for p in PROMPT_TYPES})
    res = aggregate(per_image)
    n = max(len(samples), 1)
    return {**{p: res[p]["iou"] for p in PROMPT_TYPES}, "own_layer": own / n, "fallback": fallback / n,
            "images": len(samples)}


def simulate(sites: Dict[str, Dict[str, str]], workdir: str | Path, backbone: str, recipe: Dict[str, Any],
             num_rounds: int = 1, checkpoint: str = "", min_labels: int = FED_MIN_LABELS,
             max_val_drop: float = FED_MAX_VAL_DROP, cache: str = "",
             log_config: Optional[str] = None) -> Dict[str, Any]:
    """Runs the job in NVFlare's simulator (one process per site).

    Args:
        sites: see :func:`build_job`.
        workdir: holds ``coordinator/`` (merged registry + rounds report), ``sites/<site>/`` (each site's registry and
            outbox log) and ``workspace/`` (NVFlare's).
        backbone: the consortium's backbone name.
        recipe: TrainConfig fields.
        num_rounds, checkpoint, min_labels, max_val_drop, cache: see :func:`build_job`.
        log_config: NVFlare's logging configuration (None: its default).

    Returns:
        {"returncode", "rounds" (the coordinator's report), "seconds"}.

    Raises:
        CasamError: the simulator failed.
    """
    workdir = Path(workdir)
    job = build_job(sites, str(workdir / "coordinator"), str(workdir / "sites"), backbone, checkpoint, recipe,
                    num_rounds, min_labels, max_val_drop, cache)
    allow_components(workdir / "workspace" / "local")  # copied to every simulated participant's local/
    t0 = time.time()
    rc = job.simulator_run(str(workdir / "workspace"), threads=len(sites), log_config=log_config)
    report = workdir / "coordinator" / "federated" / "rounds.json"
    if rc != 0 or not report.exists():
        raise CasamError(f"NVFlare simulator failed (return code {rc}); logs under {workdir / 'workspace'}")
    return {"returncode": rc, "rounds": json.loads(report.read_text()), "seconds": time.time() - t0}


def compare(backbone: Backbone, sites: Dict[str, Dict[str, str]], federated: LayerRegistry, central: LayerRegistry,
            cache: Optional[str] = None) -> Dict[str, Any]:
    """Routed IoU per site of the federated and the central registry, and their difference.

    Returns:
        Site name → {``institution``, ``federated`` and ``central`` (:func:`routed_iou`), ``delta`` per prompt type}.
    """
    out = {}
    for name, spec in sites.items():
        f, c = routed_iou(backbone, federated, spec, cache), routed_iou(backbone, central, spec, cache)
        out[name] = {"institution": spec["institution"], "federated": f, "central": c,
                     "delta": {p: None if f[p] is None or c[p] is None else f[p] - c[p] for p in PROMPT_TYPES}}
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``casam federated`` argument parser."""
    p = argparse.ArgumentParser(prog="casam federated",
                                description="federated CA-SAM on NVFlare: each site trains its own layer; only the "
                                            "layer travels; the coordinator checks and merges them into one registry")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("simulate", help="run the job in NVFlare's simulator, one site per institution of a dataset, "
                       "and compare with the same layers trained centrally")
    s.add_argument("--data", default=None,
                   help=f"data root with MANIFEST.tsv (default $CASAM_DATA or {default_data()})")
    s.add_argument("--dataset", default="brain_mri_lgg", help="dataset whose institutions become the sites")
    s.add_argument("--rounds", type=int, default=2,
                   help="rounds (the second one, with no new labels, must change nothing)")
    s.add_argument("--workdir", default=None, help="keep the coordinator's and sites' registries and logs here")
    s.add_argument("--out", default=None, help="write the results JSON here (e.g. benchmarks/results/federated.json)")
    s.add_argument("--no-central", action="store_true", help="skip the central reference and the IoU comparison")
    train = TrainConfig()  # CA-SAM's recipe
    export = sub.add_parser("export-job",
                            help="write the job folder a real consortium submits with `nvflare job submit`")
    for a in (s, export):
        a.add_argument("--backbone", default=DEFAULT_BACKBONE, help="litemedsam (default), vit_b, vit_l, vit_h or tiny")
        a.add_argument("--checkpoint", default="", help="backbone weights file (vit_*)")
        a.add_argument("--epochs", type=int, default=train.epochs,
                       help=f"passes over each site's training images (default {train.epochs})")
        a.add_argument("--max-images", type=int, default=train.max_images, help="cap on training images per site")
        a.add_argument("--lr", type=float, default=train.lr, help=f"Adam learning rate (default {train.lr:g})")
        a.add_argument("--seed", type=int, default=train.seed, help=f"seed (default {train.seed})")
        a.add_argument("--min-labels", type=int, default=FED_MIN_LABELS)
        a.add_argument("--max-val-drop", type=float, default=FED_MAX_VAL_DROP)
        a.add_argument("--cache", default="", help="embedding cache folder of the sites (default $CASAM_CACHE)")
    al = sub.add_parser("allow", help="let an NVFlare participant build casam's components (adds them to the "
                        "class_allow_list of its local/resources.json)")
    al.add_argument("local", help="the participant's local/ folder (in its startup kit)")
    e = sub.choices["export-job"]
    e.add_argument("--out", required=True, help="folder to write the job into")
    e.add_argument("--rounds", type=int, default=1)
    e.add_argument("--min-clients", type=int, default=1, help="sites the job waits for")
    return p


def _recipe(args) -> Dict[str, Any]:
    """The TrainConfig fields every site trains with: CA-SAM's recipe with the command's options."""
    return TrainConfig(epochs=args.epochs, max_images=args.max_images, lr=args.lr, seed=args.seed).to_dict()


def run_simulation(args, argv: Sequence[str]) -> Dict[str, Any]:
    """``casam federated simulate``: the simulator run, the central reference, the results dict."""
    root = Path(args.data) if args.data else default_data()
    sites = dataset_sites(root, args.dataset)
    recipe = _recipe(args)
    with tempfile.TemporaryDirectory(prefix="casam-fed-") as tmp:
        work = Path(args.workdir or tmp)
        cache = args.cache or str(work / "cache")
        sim = simulate(sites, work, args.backbone, recipe, args.rounds, args.checkpoint, args.min_labels,
                       args.max_val_drop, cache)
        res: Dict[str, Any] = {
            "command": "casam federated " + " ".join(shlex.quote(a) for a in argv),
            "machine": machine_info("cpu"), "nvflare": __import__("nvflare").__version__, "backbone": args.backbone,
            "recipe": recipe, "simulator_seconds": sim["seconds"],
            "sites": {n: {"institution": s["institution"]} for n, s in sites.items()},
            "rounds": [], "bytes_sent_per_site": {}, "wall_time_per_round_s": [],
        }
        for r in sim["rounds"]:
            res["wall_time_per_round_s"].append(r["seconds"])
            res["rounds"].append({
                "round": r["round"], "seconds": r["seconds"], "registry": r["registry"], "signature": r["signature"],
                "bytes_to_each_site": {"request": r["request_bytes_per_site"],
                                       "merged_registry": r["sync_bytes_per_site"],
                                       "merged_layers": r.get("layers_sent")},
                "sites": {v["site"]: {"status": v["status"], "reason": v["reason"], "layer": v["layer"],
                                      "validation": v["validation"], "bytes_sent": v["received"].get("wire_bytes"),
                                      "tensor_bytes": v["received"].get("file_bytes"),
                                      "meta_bytes": v["received"].get("meta_bytes")}
                          for v in r["verdicts"]},
            })
            for v in r["verdicts"]:
                res["bytes_sent_per_site"].setdefault(v["site"], []).append(v["received"].get("wire_bytes"))
        if not args.no_central:
            bb = load_backbone(args.backbone, args.checkpoint or None, "cpu")
            central = LayerRegistry(work / "central")
            t0 = time.time()
            train_central(bb, sites, central, TrainConfig(**recipe), cache)
            res["central_seconds"] = time.time() - t0
            res["routed_iou"] = compare(bb, sites, LayerRegistry(work / "coordinator"), central, cache)
            deltas = [abs(d) for s in res["routed_iou"].values() for d in s["delta"].values() if d is not None]
            res["max_abs_delta"] = max(deltas) if deltas else None
    return json_safe(res)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``casam federated``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.action == "allow":
        print(f"{allow_components(args.local)}: class_allow_list now includes {', '.join(ALLOWED)}")
        return 0
    if args.action == "export-job":
        job = build_job(None, backbone=args.backbone, checkpoint=args.checkpoint, recipe=_recipe(args),
                        num_rounds=args.rounds, min_labels=args.min_labels, max_val_drop=args.max_val_drop,
                        cache=args.cache, min_clients=args.min_clients)
        job.export_job(args.out)
        print(f"job written to {Path(args.out) / JOB_NAME}")
        return 0
    res = run_simulation(args, argv)
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
