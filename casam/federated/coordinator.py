"""The coordinator's side: check every returned layer, append the good ones to one registry, report the rest.

This is not FedAvg: nothing is averaged. Each site's layer is checked on its own (:func:`check_layer`) and, when it
passes, appended to the coordinator's :class:`~casam.registry.store.LayerRegistry` as a new layer (or a new version of
that institution's layer). The merged registry then goes back to every site (:func:`registry_layers`).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from casam.errors import RegistryError
from casam.federated.payload import PayloadError, check_outgoing, describe
from casam.registry.store import LayerInfo, LayerRegistry

# Federated CA-SAM (casam.federated): labelled training images a site needs before it trains a layer, and how
# far below plain SAM (per prompt type, on the site's validation patients) a returned layer may be and still merge.
FED_MIN_LABELS = 5

FED_MAX_VAL_DROP = 0.02

log = logging.getLogger(__name__)

# Names under which a per-prompt validation record may hold the layer's and plain SAM's IoU.
_LAYER_KEYS = ("layer", "iou", "val_iou", "casam")
_ZERO_SHOT_KEYS = ("zero_shot", "zero_shot_iou", "zero_shot_val_iou", "plain", "sam")


class Rejected(Exception):
    """A returned layer failed a check; the message says which."""


@dataclass
class Verdict:
    """What the coordinator did with one site's answer in one round.

    Attributes:
        site: the site.
        institution: the institution it trained for.
        status: ``merged``, ``rejected``, ``unchanged`` or ``skipped``.
        reason: why (empty for merged).
        layer: the merged layer's name.
        validation: per prompt type, the layer's and plain SAM's validation IoU.
        received: what the site sent (see :func:`casam.federated.payload.describe`).
    """

    site: str
    institution: str
    status: str
    reason: str = ""
    layer: Optional[str] = None
    validation: Dict[str, Dict[str, float]] = field(default_factory=dict)
    received: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _first_number(d: Dict[str, Any], keys) -> Optional[float]:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def validation_figures(meta: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """The site's validation IoU of the layer and of plain SAM, per prompt type.

    Read from ``extra["val"]`` (``{prompt: {layer-IoU, zero-shot-IoU}}``) when the training code stored it, else
    from ``val_iou`` / ``zero_shot_val_iou`` (box prompts).

    Returns:
        {prompt: {"layer": IoU, "zero_shot": IoU}}; empty when the layer has no validation figures.
    """
    out: Dict[str, Dict[str, float]] = {}
    val = (meta.get("extra") or {}).get("val")
    if isinstance(val, dict):
        for prompt, rec in val.items():
            if isinstance(rec, dict):
                lay, zs = _first_number(rec, _LAYER_KEYS), _first_number(rec, _ZERO_SHOT_KEYS)
                if lay is not None and zs is not None:
                    out[str(prompt)] = {"layer": lay, "zero_shot": zs}
    if not out:
        lay, zs = _first_number(meta, ("val_iou",)), _first_number(meta, ("zero_shot_val_iou",))
        if lay is not None and zs is not None:
            out["box"] = {"layer": lay, "zero_shot": zs}
    return out


def check_layer(payload: Dict[str, Any], backbone_hash: str, max_val_drop: float) -> Tuple[Any, Any, LayerInfo]:
    """Checks one returned layer and loads it.

    Checks: only allowed fields (:func:`~casam.federated.payload.check_outgoing`), checksums of both files, the
    backbone hash, that the weights load into an Alignment Layer and a router VAE of the declared shape and are
    finite, a finite τ, and validation no worse than plain SAM by more than ``max_val_drop`` on every prompt type
    the layer serves (:meth:`~casam.registry.store.LayerInfo.serves`, as the predictor decides; it serves plain SAM for
    the others).

    Args:
        payload: the site's payload (status ``layer``).
        backbone_hash: the consortium's backbone.
        max_val_drop: tolerated validation IoU below plain SAM, per prompt type.

    Returns:
        (alignment layer, router VAE, LayerInfo), loaded.

    Raises:
        Rejected: a check failed.
    """
    try:
        check_outgoing(payload)
    except PayloadError as e:
        raise Rejected(str(e)) from e
    meta = payload["meta"]
    if meta.get("backbone_hash") != backbone_hash:
        raise Rejected(f"trained on backbone {meta.get('backbone_id')!r}, not the consortium's ({backbone_hash[:12]})")
    if meta.get("institution") != payload.get("institution"):
        raise Rejected("meta.institution differs from the payload's institution")
    tau = meta.get("tau")
    if not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise Rejected(f"router threshold tau is not a finite number: {tau!r}")
    figures = validation_figures(meta)
    if not figures:
        raise Rejected("no validation figures (the site needs validation patients)")
    try:
        declared = LayerInfo.from_dict(meta)
        serves = {p: declared.serves(p) for p in figures}
    except TypeError as e:  # e.g. a val_iou that is not a number
        raise Rejected(f"malformed validation figures: {e}") from e
    worse = {p: f for p, f in figures.items() if serves[p] and f["layer"] < f["zero_shot"] - max_val_drop}
    if worse:
        raise Rejected("below plain SAM on validation for a prompt type it serves: " + ", ".join(
            f"{p} {f['layer']:.3f} < {f['zero_shot']:.3f}" for p, f in worse.items()) + f" (tolerance {max_val_drop})")
    with tempfile.TemporaryDirectory(prefix="casam-check-") as tmp:
        staging = LayerRegistry(tmp)
        try:
            staging.put(meta, payload["files"])  # verifies both checksums
            layer, vae, info = staging.load(meta["name"])  # strict load: declared shape must match
        except RegistryError as e:
            raise Rejected(str(e)) from e
    for module in (layer, vae):
        if not all(torch.isfinite(t).all() for t in module.state_dict().values()):
            raise Rejected(f"non-finite weights in the {type(module).__name__}")
    return layer, vae, info


def _fingerprint(info: Dict[str, Any]) -> Optional[str]:
    return ((info.get("extra") or {}).get("federated") or {}).get("fingerprint")


def merge(registry: LayerRegistry, answers: Dict[str, Dict[str, Any]], backbone_hash: str, max_val_drop: float,
          round_index: int = 0, wire_bytes: Optional[Dict[str, int]] = None) -> List[Verdict]:
    """Checks each site's answer and appends the layers that pass, in site-name order.

    A layer whose label fingerprint equals its institution's active layer is not appended (``unchanged``); an
    institution already claimed by another site, or sent twice in one round, is rejected.

    Args:
        registry: the coordinator's registry.
        answers: site name → payload.
        backbone_hash: the consortium's backbone.
        max_val_drop: see :func:`check_layer`.
        round_index: stored with merged layers.
        wire_bytes: site name → serialised size of its answer (for the report).

    Returns:
        One Verdict per site.
    """
    verdicts = []
    seen: Dict[str, str] = {}
    for site in sorted(answers):
        payload = answers[site]
        inst = str(payload.get("institution", ""))
        v = Verdict(site, inst, str(payload.get("status")), str(payload.get("reason", "")))
        try:
            v.received = describe(payload, (wire_bytes or {}).get(site))
        except PayloadError as e:
            v.status, v.reason = "rejected", str(e)
            verdicts.append(v)
            continue
        if v.status != "layer":
            if v.status not in ("unchanged", "skipped"):
                v.status, v.reason = "rejected", f"unknown status {payload.get('status')!r}"
            verdicts.append(v)
            continue
        active = {i.institution: i for i in registry.active()}
        owner = (active[inst].extra.get("federated") or {}).get("site") if inst in active else None
        try:
            if inst in seen:
                raise Rejected(f"institution {inst!r} already sent by site {seen[inst]} this round")
            if owner not in (None, site):
                raise Rejected(f"institution {inst!r} belongs to site {owner}")
            layer, vae, info = check_layer(payload, backbone_hash, max_val_drop)
        except Rejected as e:
            v.status, v.reason = "rejected", str(e)
            log.warning("round %d: rejected the layer of %s (%s): %s", round_index, site, inst, e)
            verdicts.append(v)
            continue
        seen[inst] = site
        v.validation = validation_figures(payload["meta"])
        if inst in active and _fingerprint(active[inst].to_dict()) == _fingerprint(payload["meta"]):
            v.status, v.reason, v.layer = "unchanged", f"same labels as {active[inst].name}", active[inst].name
            verdicts.append(v)
            continue
        # site: NVFlare's identity, not the claim
        info.extra.setdefault("federated", {}).update(site=site, round=int(round_index))
        info.extra["federated"]["received_sha256"] = dict(info.sha256)
        v.status, v.layer = "merged", registry.add(layer, vae, info).name
        log.info("round %d: merged %s from %s", round_index, v.layer, site)
        verdicts.append(v)
    return verdicts


def manifest(registry: LayerRegistry) -> List[Dict[str, Any]]:
    """The active layers' LayerInfo dicts (what the sites see of the merged registry before a round)."""
    return [i.to_dict() for i in registry.active()]


def registry_layers(registry: LayerRegistry) -> List[Dict[str, Any]]:
    """Every layer of the registry as ``{"meta", "files"}`` (what goes back to the sites)."""
    out = []
    for info in registry.list():
        meta, files = registry.export(info.name)
        out.append({"meta": meta, "files": files})
    return out
