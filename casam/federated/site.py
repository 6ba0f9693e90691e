"""A site's side of a federated round: read its own labels, train its own layer, answer with the layer only.

The site never sends images, masks, embeddings or patient ids. It trains with the same code as
``casam add-layer`` (:func:`casam.training.layer.train_layer`) into a temporary registry, and answers with
:mod:`casam.federated.payload`'s flat dict. After the coordinator merged every site's layer, the site copies the
merged registry into the registry its MONAI Label app serves (:func:`sync`); the app's predictor reloads when
the registry's signature changes, so no restart is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from casam.data.datasets import load_cases, read_meta
from casam.data.dicom import patient_of
from casam.data.formats import strip_suffix
from casam.errors import CasamError, RegistryError
from casam.federated.payload import check_outgoing, sanitize_meta
from casam.model.backbone import Backbone
from casam.registry.store import LayerRegistry, writer_lock
from casam.training.config import TrainConfig
from casam.training.layer import train_layer
from casam.training.online import LabelledItem, load_items

log = logging.getLogger(__name__)



def load_site_labels(source: str | Path, institution: str, split: str = "train") -> Tuple[list, list, list]:
    """Reads a site's labelled training images.

    Two layouts are understood: a dataset folder (``images/``, ``masks/``, optional ``meta.csv`` with case,
    patient, institution, split: the site keeps its rows of ``institution`` and ``split``), or a MONAI Label
    studies folder (images beside ``labels/final/``: every final label of that datastore, volumes as their
    labelled slices).

    Args:
        source: the folder.
        institution: the institution this site trains for.
        split: meta.csv split to use (dataset folders only).

    Returns:
        (images, masks, patients).

    Raises:
        CasamError: neither layout, or a meta.csv without this institution.
    """
    source = Path(source)
    if (source / "images").is_dir():
        cases = [c for c in read_meta(source) if c.mask is not None and (split == "all" or c.split == split)]
        insts = {c.institution for c in cases}
        if institution in insts:
            cases = [c for c in cases if c.institution == institution]
        elif insts - {"default"}:
            raise CasamError(f"institution {institution!r} not in {source}/meta.csv (has: {', '.join(sorted(insts))})")
        return load_cases(cases)
    final = source / "labels" / "final"
    if final.is_dir():
        images = {strip_suffix(p.name): p for p in source.iterdir() if p.is_file() or p.is_dir() and p.name != "labels"}
        items = []
        for lab in sorted(p for p in final.iterdir() if not p.name.startswith(".") and not p.name.endswith(".json")):
            img = images.get(strip_suffix(lab.name))
            if img is not None:
                iid = strip_suffix(img.name)
                items.append(LabelledItem(iid, str(img), str(lab), institution, patient_of(iid, img)))
        images_, masks, patients, _, skipped = load_items(items)
        if skipped:
            log.info("site labels skipped: %d (%s)", len(skipped), "; ".join(s["reason"] for s in skipped[:3]))
        return images_, masks, patients
    raise CasamError(f"{source} is neither a dataset folder (images/, masks/) nor a MONAI Label studies folder "
                     "(labels/final/)")


def fingerprint(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], backbone_hash: str,
                recipe: Dict[str, Any]) -> str:
    """A hash of what a layer would be trained from: every image and label (order-free), the backbone, the recipe.

    Equal fingerprints mean "no new labels, same recipe": a round then changes nothing.
    """
    per_image = []
    for img, lab in zip(images, masks):
        h = hashlib.sha256()
        for a in (np.ascontiguousarray(img), np.ascontiguousarray(lab)):
            h.update(f"{a.shape}|{a.dtype}|".encode())
            h.update(a.tobytes())
        per_image.append(h.hexdigest())
    h = hashlib.sha256(f"{backbone_hash}|{json.dumps(recipe, sort_keys=True, default=str)}|".encode())
    for d in sorted(per_image):
        h.update(d.encode())
    return h.hexdigest()


def train_round(request: Dict[str, Any], backbone: Backbone, source: str | Path, institution: str, site: str,
                modality: str = "", cache_dir: Optional[str | Path] = None) -> Dict[str, Any]:
    """Answers one training round.

    Args:
        request: the coordinator's task: ``round``, ``backbone_hash``, ``recipe`` (TrainConfig fields),
            ``min_labels``, ``manifest`` (LayerInfo dicts of the merged registry's active layers).
        backbone: this site's frozen backbone.
        source: this site's labelled data (see :func:`load_site_labels`).
        institution: the institution the layer serves.
        site: this site's name (stored with the layer).
        modality: free text stored with the layer.
        cache_dir: embedding cache folder (stays at the site).

    Returns:
        The payload (see :mod:`casam.federated.payload`): a layer, or ``unchanged``/``skipped`` with a reason.
    """
    def answer(status: str, reason: str = "", meta: Optional[dict] = None,
               files: Optional[dict] = None) -> Dict[str, Any]:
        payload = {"status": status, "reason": reason, "institution": institution, "meta": meta or {},
                   "files": files or {}}
        check_outgoing(payload)
        return payload

    if request.get("backbone_hash") != backbone.hash:
        return answer("skipped", f"site backbone {backbone.id} differs from the consortium's "
                                 f"({str(request.get('backbone_hash'))[:12]})")
    recipe = dict(request.get("recipe") or {})
    config = TrainConfig(**recipe)
    try:
        images, masks, patients = load_site_labels(source, institution)
    except (CasamError, FileNotFoundError) as e:
        return answer("skipped", f"cannot read labels: {e}")
    labelled = [i for i, m in enumerate(masks) if np.asarray(m).any()]
    min_labels = int(request.get("min_labels", 0))
    if len(labelled) < max(min_labels, 2):
        return answer("skipped", f"{len(labelled)} labelled images, {max(min_labels, 2)} needed")
    fp = fingerprint(images, masks, backbone.hash, config.to_dict())
    for m in request.get("manifest") or []:
        if m.get("institution") == institution and (m.get("extra") or {}).get("federated", {}).get("fingerprint") == fp:
            return answer("unchanged", f"no new labels since {m.get('name')}")
    with tempfile.TemporaryDirectory(prefix="casam-site-") as tmp:
        staging = LayerRegistry(tmp)
        try:
            info = train_layer(backbone, images, masks, patients, staging, institution, modality, config, cache_dir,
                               progress=False)
        except ValueError as e:
            return answer("skipped", str(e))
        meta, files = staging.export(info.name)
    return answer("layer", "", sanitize_meta(meta, fp, site), files)


def sync(registry: LayerRegistry, layers: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Copies the coordinator's merged registry into a site's registry (layers it already holds are left alone),
    holding the registry's writer lock (:func:`casam.registry.store.writer_lock`), so it waits for a running online
    trainer.

    Args:
        registry: the site's registry (the one its MONAI Label app serves).
        layers: ``{"meta", "files"}`` per layer of the merged registry.

    Returns:
        ``added`` (layer names written), ``present`` (already there), ``conflicts`` (a different layer under the
        same name: not overwritten), ``signature`` (the registry's signature afterwards).
    """
    added: List[str] = []
    conflicts: List[str] = []
    present = 0
    with writer_lock(registry):  # one writer at a time: the site's online trainer takes the same lock
        for entry in layers:
            try:
                if registry.put(entry["meta"], entry["files"]):
                    added.append(entry["meta"]["name"])
                else:
                    present += 1
            except RegistryError as e:
                log.warning("sync: %s", e)
                conflicts.append(str(entry["meta"].get("name")))
    return {"added": added, "present": present, "conflicts": conflicts, "signature": registry.signature()}
