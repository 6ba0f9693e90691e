"""Checks a bundle against the MONAI model zoo's rules, and reads its manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from casam.bundle.layout import MANIFEST, MANIFEST_FORMAT, MODEL_FILE
from casam.errors import CasamError

logger = logging.getLogger("casam.bundle.export")
# MONAI Model Zoo's requirements (its CONTRIBUTING.md and ci/verify_bundle.py, read at model-zoo dev, Oct 2024):
# files every bundle must have, files it should have (the inference config may be .json/.yaml/.yml), the size
# above which a file must be hosted elsewhere and listed in large_files.yml, the hash types its downloader
# accepts, and the keys an inference config must define.
ZOO_NECESSARY_FILES = ("configs/metadata.json", "LICENSE")
ZOO_CONFIG_SUFFIXES = ("json", "yaml", "yml")
ZOO_MAX_FILE_BYTES = 25_000_000
ZOO_HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
ZOO_INFERENCE_KEYS = ("bundle_root", "device", "network_def", "inferer", "output_dir")


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






# ------------------------------------------------------------------------------------------------- load
def read_bundle_manifest(bundle_root: Union[str, Path]) -> Dict[str, Any]:
    """Reads ``models/manifest.json`` of a bundle.

    Raises:
        CasamError: no manifest (the template was not exported) or an unknown format.
    """
    path = Path(bundle_root) / "models" / MANIFEST
    if not path.is_file():
        raise CasamError(
            f"{path} not found: run from the bundle folder or pass --bundle_root <bundle>; a bundle template "
            f"has no models until `casam export-bundle --registry … --out …` fills them"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise CasamError(f"corrupt bundle manifest {path}: {e}") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CasamError(f"{path}: unknown bundle format {manifest.get('format')!r} (expected {MANIFEST_FORMAT})")
    return manifest
