"""What travels between a site and the coordinator, and nothing else.

A site's answer to a training round is one flat dict (it becomes an NVFlare ``Shareable``):

``status``        ``"layer"`` (a new layer follows), ``"unchanged"`` (no new labels) or ``"skipped"``
``reason``        why a site sent no layer, in words (empty otherwise)
``institution``   the institution the layer serves
``meta``          the layer's provenance, reduced to :data:`META_KEYS` by :func:`sanitize_meta`
``files``         ``layer.safetensors`` and ``router.safetensors``, as bytes

:func:`sanitize_meta` keeps numbers only in ``extra`` (loss curve, validation figures, counts, seconds) and drops
every string there (a source folder, image ids, …), then adds the site's ``federated`` record: the label
fingerprint and the site name. :func:`check_outgoing` refuses anything else; the coordinator refuses it too.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Dict, Optional

from casam.registry.store import LAYER_FILE, ROUTER_FILE

FILES = (LAYER_FILE, ROUTER_FILE)
STATUSES = ("layer", "unchanged", "skipped")
PAYLOAD_KEYS = ("status", "reason", "institution", "meta", "files")
META_KEYS = ("name", "institution", "version", "modality", "backbone_id", "backbone_hash", "n_images", "n_patients",
             "tau", "val_iou", "zero_shot_val_iou", "channels", "blocks", "train_config", "sha256", "extra")
FEDERATED_KEYS = ("fingerprint", "site")


class PayloadError(ValueError):
    """A payload holds something that must not travel, or is malformed."""


def _numbers_only(x: Any) -> Any:
    """Keeps numbers, booleans and None, and dicts/lists of them; drops strings and everything else (→ None)."""
    if x is None or isinstance(x, (bool, int, float)):
        return x
    if isinstance(x, dict):
        kept = {str(k): _numbers_only(v) for k, v in x.items()}
        return {k: v for k, v in kept.items() if v is not None or x[k] is None}
    if isinstance(x, (list, tuple)):
        kept = [_numbers_only(v) for v in x]
        return kept if all(v is not None for v in kept) or all(v is None for v in x) else None
    return None


def sanitize_meta(meta: Dict[str, Any], fingerprint: str, site: str) -> Dict[str, Any]:
    """Reduces a layer's LayerInfo dict to what may leave a site.

    Args:
        meta: ``LayerInfo.to_dict()`` of the layer the site trained.
        fingerprint: the site's label fingerprint (see :func:`casam.federated.site.fingerprint`).
        site: the site's name.

    Returns:
        :data:`META_KEYS` only; ``extra`` keeps numeric values only, plus ``extra["federated"]``;
        ``train_config`` keeps scalar values only.
    """
    out = {k: meta[k] for k in META_KEYS if k in meta}
    extra = _numbers_only(meta.get("extra") or {}) or {}
    extra["federated"] = {"fingerprint": str(fingerprint), "site": str(site)}
    out["extra"] = extra
    out["train_config"] = {k: v for k, v in (meta.get("train_config") or {}).items()
                           if v is None or isinstance(v, (bool, int, float, str))}
    return out


def check_outgoing(payload: Dict[str, Any]) -> None:
    """Verifies that a site's payload holds only what this module allows.

    Raises:
        PayloadError: an unknown key anywhere, a string in ``meta.extra`` outside ``federated``, or a malformed field.
    """
    unknown = set(payload) - set(PAYLOAD_KEYS)
    if unknown:
        raise PayloadError(f"payload keys not allowed to leave a site: {sorted(unknown)}")
    if payload.get("status") not in STATUSES:
        raise PayloadError(f"payload status must be one of {STATUSES}, got {payload.get('status')!r}")
    if not isinstance(payload.get("reason", ""), str) or not isinstance(payload.get("institution", ""), str):
        raise PayloadError("reason and institution must be strings")
    files = payload.get("files") or {}
    meta = payload.get("meta") or {}
    if payload["status"] != "layer":
        if files or meta:
            raise PayloadError(f"a {payload['status']!r} payload carries no layer")
        return
    if set(files) != set(FILES) or not all(isinstance(v, (bytes, bytearray)) for v in files.values()):
        raise PayloadError(f"files must be exactly {FILES} as bytes, got {sorted(files)}")
    bad = set(meta) - set(META_KEYS)
    if bad:
        raise PayloadError(f"meta keys not allowed to leave a site: {sorted(bad)}")
    extra = dict(meta.get("extra") or {})
    fed = extra.pop("federated", {})
    if set(fed) - set(FEDERATED_KEYS):
        raise PayloadError(f"extra.federated keys not allowed: {sorted(set(fed) - set(FEDERATED_KEYS))}")
    if _numbers_only(extra) != extra:
        raise PayloadError("meta.extra may hold numbers only")
    for fname, data in files.items():
        describe_safetensors(bytes(data))  # parses: raises on anything that is not a safetensors file


def describe_safetensors(data: bytes) -> Dict[str, Dict[str, Any]]:
    """Reads the header of a safetensors file (without loading it).

    Returns:
        {tensor name: {"dtype", "shape", "bytes"}} (``__metadata__`` excluded).

    Raises:
        PayloadError: not a safetensors file.
    """
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise PayloadError(f"not a safetensors file: {e}") from e
    if not isinstance(header, dict):
        raise PayloadError("not a safetensors file: header is not a dict")
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = {"dtype": t["dtype"], "shape": list(t["shape"]), "bytes": int(end - start)}
    if len(data) != 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0):
        raise PayloadError("not a safetensors file: size does not match its header")
    return out


def describe(payload: Dict[str, Any], wire_bytes: Optional[int] = None) -> Dict[str, Any]:
    """A summary of a payload for reports and audits: keys, meta keys, tensors (name, dtype, shape, bytes), sizes.

    Args:
        payload: a site's payload (or the coordinator's view of it).
        wire_bytes: its serialised size, when measured.
    """
    files = payload.get("files") or {}
    meta = payload.get("meta") or {}
    out: Dict[str, Any] = {
        "keys": sorted(payload),
        "status": payload.get("status"),
        "meta_keys": sorted(meta),
        "extra_keys": sorted((meta.get("extra") or {})),
        "files": {f: {"bytes": len(b), "sha256": hashlib.sha256(bytes(b)).hexdigest(),
                      "tensors": describe_safetensors(bytes(b))} for f, b in files.items()},
        "file_bytes": sum(len(b) for b in files.values()),
        "meta_bytes": len(json.dumps(meta, default=str)) if meta else 0,
    }
    if wire_bytes is not None:
        out["wire_bytes"] = int(wire_bytes)
    return out

