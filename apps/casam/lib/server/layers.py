"""The layers the server serves: every layer of the registry that passes its checks, the others refused and said.

A layer folder whose ``meta.json`` cannot be read (truncated, not JSON, an unknown format), whose weight files are
missing or fail their sha256 (recorded in ``meta.json`` when the layer was written), or that was trained on
another backbone is *refused*: the predictor never loads it (it is not listed to it), the server serves the other
layers (an institution whose newest version is refused falls back to its previous one), ``GET /info`` lists it
under ``refused_layers`` with the reason, and the log says so once, in one line. The trainer keeps using the plain
registry (a refused layer's name stays taken; its files are left for the operator to inspect or restore).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

from casam.model.backbone import file_sha256
from casam.registry.store import LAYER_FILE, META_FILE, ROUTER_FILE, LayerInfo, LayerRegistry, in_order

log = logging.getLogger(__name__)


class ServedRegistry(LayerRegistry):
    """A :class:`LayerRegistry` that lists only the layers that pass their checks (see the module's doc).

    Args:
        root: the registry folder.
        backbone_hash: returns the served backbone's hash once it is loaded (None before: not checked yet).
    """

    def __init__(self, root, backbone_hash: Optional[Callable[[], Optional[str]]] = None):
        super().__init__(root)
        self.backbone_hash = backbone_hash or (lambda: None)
        self.refused: Dict[str, str] = {}
        self._sums: Dict[Tuple[str, str], Tuple[Tuple[int, int, int], str]] = {}  # (layer, file) → (stat, sha256)

    def _sha256(self, name: str, fname: str) -> str:
        path = self.layers_dir / name / fname
        st = os.stat(path)
        key, stamp = (name, fname), (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._sums.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, file_sha256(path))
            self._sums[key] = cached
        return cached[1]

    def _check(self, name: str) -> Tuple[Optional[LayerInfo], Optional[str]]:
        """(its info, None) for a layer that passes, else (None or its info, why it is refused)."""
        try:
            text = (self.layers_dir / name / META_FILE).read_text()
        except OSError:
            return None, f"{META_FILE} missing or unreadable"
        try:
            info = LayerInfo.from_dict(json.loads(text))
        except ValueError:
            return None, f"{META_FILE} is not valid JSON (truncated or corrupt)"
        except Exception as e:  # an unknown format (RegistryError), bad fields
            return None, f"{META_FILE} not usable: {e}"
        if info.name != name:
            return info, f"{META_FILE} names another layer ({info.name!r})"
        for fname in (LAYER_FILE, ROUTER_FILE):
            try:
                digest = self._sha256(name, fname)
            except OSError:
                return info, f"{fname} missing or unreadable"
            if digest != info.sha256.get(fname):
                return info, f"checksum mismatch for {fname} (the file was changed or is corrupt)"
        hash_ = self.backbone_hash()
        if hash_ is not None and info.backbone_hash != hash_:
            return info, f"trained on another backbone ({info.backbone_id})"
        return info, None

    def list(self, include_inactive: bool = True) -> List[LayerInfo]:
        infos, refused = [], {}
        folders = sorted(d.name for d in self.layers_dir.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if self.layers_dir.exists() else []
        for name in folders:
            info, why = self._check(name)
            if why is None:
                infos.append(info)
            else:
                refused[name] = why
        served = len(infos)
        for name in sorted(set(refused) - set(self.refused)):
            log.error("casam: refused layer %s: %s; never loaded, serving the other %d layer(s)", name, refused[name],
                      served)
        for name in sorted(set(self.refused) - set(refused)):
            log.warning("casam: layer %s is no longer refused (%s)",
                        name, "it passes its checks" if name in folders else "its folder was removed")
        self.refused = refused
        return in_order(infos, include_inactive)

    def signature(self) -> str:
        """Changes when a layer is added or removed, or when one of its files changes (then it is checked again)."""
        import hashlib

        parts = []
        for d in sorted(self.layers_dir.iterdir()) if self.layers_dir.exists() else []:
            if d.is_dir() and not d.name.startswith("."):
                stamps = []
                for fname in (META_FILE, LAYER_FILE, ROUTER_FILE):
                    try:
                        st = os.stat(d / fname)
                        stamps.append(f"{st.st_size}:{st.st_mtime_ns}")
                    except OSError:
                        stamps.append("-")
                parts.append(f"{d.name}={','.join(stamps)}")
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]

    def refused_info(self) -> List[Dict[str, str]]:
        """The refused layers and why, for ``/info`` (checks the registry again)."""
        self.list()
        return [{"name": n, "reason": r} for n, r in sorted(self.refused.items())]
