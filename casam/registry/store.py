"""The layer registry: Alignment Layers and their router entries, one folder per layer, on disk.

Layout::

    <root>/layers/<institution-slug>-v<version>/
        layer.safetensors    Alignment Layer weights
        router.safetensors   router VAE weights
        meta.json            LayerInfo (provenance, τ, checksums) and the format tag

Every meta.json carries a format tag (:data:`LAYER_FORMAT`, ``"casam-layer/2"``: a refinement head may read the
interaction's clicks, whose weights a format-1 reader cannot load); format 1 (a meta.json without a tag, too) is
still read, and a format this casam does not know is refused with a :class:`~casam.errors.RegistryError`, so a
later change of the layout can migrate explicitly.

A layer is written into a temporary folder and renamed into place, so a reader never sees half a layer and
an interrupted write leaves nothing behind. Layers are immutable once written; a new version for the
same institution is a new folder, and the newest version of each institution is the active one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from safetensors.torch import load_file, save_file

from casam.errors import RegistryError, UnknownLayerError
from casam.model.alignment import AlignmentLayer
from casam.model.backbone import Backbone, file_sha256
from casam.model.router import VAE_BETA, FeatureVAE

log = logging.getLogger(__name__)

LOCK_FILE = ".write.lock"

LAYER_FILE = "layer.safetensors"
ROUTER_FILE = "router.safetensors"
META_FILE = "meta.json"

LAYER_FORMAT = "casam-layer/2"
READABLE_FORMATS = ("casam-layer/1", LAYER_FORMAT)
# The pseudo prompt type of requests with corrective clicks after the first prompt (LayerInfo.serves).
CORRECTIONS = "corrections"


@dataclass
class LayerInfo:
    """Provenance and settings of one Alignment Layer.

    Attributes:
        name: unique folder name (``<institution-slug>-v<version>``).
        institution: institution (data stream) the layer serves.
        version: 1, 2, … per institution; the newest is active.
        modality: free text (e.g. "MR", "dermoscopy").
        backbone_id, backbone_hash: the backbone the layer was trained on; loading checks them.
        n_images, n_patients: size of the training set (train + validation).
        tau: router threshold.
        val_iou: mean IoU on the validation split with the layer; zero_shot_val_iou the same without it.
        created: ISO time of creation.
        seq: order in which layers were added.
        channels, blocks: Alignment Layer shape.
        train_config: the training settings.
        sha256: checksums of the weight files.
        extra: anything else (timings, source folder, …).
    """

    name: str
    institution: str
    version: int
    modality: str = ""
    backbone_id: str = ""
    backbone_hash: str = ""
    n_images: int = 0
    n_patients: int = 0
    tau: float = float("inf")
    val_iou: Optional[float] = None
    zero_shot_val_iou: Optional[float] = None
    created: str = ""
    seq: int = 0
    channels: int = 256
    blocks: int = 3
    train_config: Dict[str, Any] = field(default_factory=dict)
    sha256: Dict[str, str] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Returns a JSON-serialisable dict (the format tag is added where a meta.json is written)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LayerInfo":
        """Builds a LayerInfo from :meth:`to_dict`'s output or a meta.json; unknown keys are ignored.

        Args:
            d: the dict; its ``format`` tag (absent: format 1) must be one of :data:`READABLE_FORMATS`.

        Raises:
            RegistryError: the dict describes a layer of a format this casam cannot read.
        """
        fmt = d.get("format", READABLE_FORMATS[0])
        if fmt not in READABLE_FORMATS:
            raise RegistryError(f"layer {d.get('name', '?')!r} is stored in format {fmt!r}; this casam reads "
                                f"{', '.join(READABLE_FORMATS)} only (a newer casam wrote it: upgrade casam)")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def _recorded(self, prompt: str) -> Optional[Dict[str, Any]]:
        """The per-prompt validation record casam stores with a layer, or None when the gate must use the box rule."""
        extra = self.extra if isinstance(self.extra, dict) else {}
        val = extra.get("val")
        rec = val.get(prompt) if isinstance(val, dict) else None
        return rec if "use" in extra and isinstance(rec, dict) else None

    def serves(self, prompt: str) -> bool:
        """Whether the layer may serve a prompt type (the gate): only where it beat plain SAM on validation.

        Layers trained by casam (:func:`casam.training.layer.train_layer`) store ``extra["use"]`` (the gate's
        decision per prompt type, :func:`casam.registry.evidence.decide`) and ``extra["val"]`` (the validation IoU
        per prompt type). When ``"use"`` is in ``extra`` and ``extra["val"]`` has a record for ``prompt``, the
        layer serves ``prompt`` iff ``extra["use"].get(prompt, False)``. Otherwise (a layer added with a LayerInfo
        that records no per-prompt validation) the box rule decides, for every prompt type: the layer serves iff
        ``val_iou is None or zero_shot_val_iou is None or val_iou > zero_shot_val_iou``.

        ``prompt`` may also be :data:`CORRECTIONS`: whether requests with corrective clicks after the first prompt
        go to the layer (``extra["use"]["corrections"]``; a layer that records none answers them as it answers the
        first prompt).

        Args:
            prompt: one of :data:`casam.prompts.masks.PROMPT_TYPES`, or :data:`CORRECTIONS`.

        Returns:
            True when the layer decodes this prompt type, False when plain SAM does.
        """
        if prompt == CORRECTIONS:  # recorded by layers trained since corrections are decided on their own
            use = self.extra.get("use")
            return bool(use.get(CORRECTIONS, True)) if isinstance(use, dict) else True
        if self._recorded(prompt) is not None:
            use = self.extra["use"]
            return bool(use.get(prompt, False)) if isinstance(use, dict) else False
        lay, plain = self.val_iou, self.zero_shot_val_iou
        return lay is None or plain is None or lay > plain

    def validation(self, prompt: str) -> Dict[str, Optional[float]]:
        """The validation figures :meth:`serves` decides ``prompt`` by.

        Args:
            prompt: one of :data:`casam.prompts.masks.PROMPT_TYPES`.

        Returns:
            ``{"layer": IoU with the layer, "plain": IoU of plain SAM}`` on the layer's validation split: the
            stored record for ``prompt``, or ``val_iou`` / ``zero_shot_val_iou`` where the box rule applies
            (either may be None).
        """
        rec = self._recorded(prompt)
        if rec is not None:
            return {"layer": rec.get("layer"), "plain": rec.get("plain")}
        return {"layer": self.val_iou, "plain": self.zero_shot_val_iou}


def _meta_json(info: LayerInfo) -> Dict[str, Any]:
    """The content of a layer's meta.json: :meth:`LayerInfo.to_dict` with the format tag first."""
    return {"format": LAYER_FORMAT, **info.to_dict()}


def slug(text: str) -> str:
    """Makes a folder-safe lowercase name from an institution name.

    ``"Hospital Pedro Hispano"`` → ``hospital-pedro-hispano``; a name with no letter or digit → ``default``.
    """
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s or "default"


class LayerRegistry:
    """The on-disk set of Alignment Layers.

    Args:
        root: registry folder (created if missing).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.layers_dir = self.root / "layers"
        self.layers_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- reading
    def list(self, include_inactive: bool = True) -> List[LayerInfo]:
        """Lists layers in the order they were added.

        Args:
            include_inactive: also list superseded versions (default True); False = :meth:`active`.

        Returns:
            LayerInfo per layer folder (folders with unreadable metadata are skipped).

        Raises:
            RegistryError: a layer is stored in a format this casam cannot read.
        """
        infos = []
        for d in self.layers_dir.iterdir() if self.layers_dir.exists() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue
            try:
                infos.append(LayerInfo.from_dict(json.loads((d / META_FILE).read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return in_order(infos, include_inactive)

    def signature(self) -> str:
        """A short string that changes whenever a layer is added or removed (cheap: names only)."""
        names = sorted(d.name for d in self.layers_dir.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if self.layers_dir.exists() else []
        return hashlib.sha1("|".join(names).encode()).hexdigest()[:12]

    def active(self) -> List[LayerInfo]:
        """Returns the newest version of each institution's layer, in the order they were added."""
        return self.list(include_inactive=False)

    def get(self, name: str) -> LayerInfo:
        """Returns the LayerInfo of ``name``.

        Raises:
            UnknownLayerError: no such layer.
        """
        for info in self.list():
            if info.name == name:
                return info
        known = ", ".join(i.name for i in self.list()) or "none"
        raise UnknownLayerError(f"unknown layer {name!r} (the registry has: {known})")

    def load(self, name: str, backbone: Optional[Backbone] = None) -> Tuple[AlignmentLayer, FeatureVAE, LayerInfo]:
        """Loads a layer and its router VAE, verifying checksums and the backbone.

        Args:
            name: layer name.
            backbone: when given, the layer must have been trained on this backbone.

        Returns:
            (alignment layer in eval mode, VAE in eval mode, info).

        Raises:
            UnknownLayerError: no such layer.
            RegistryError: checksum mismatch, wrong backbone or corrupt weights.
        """
        info = self.get(name)
        folder = self.layers_dir / name
        if backbone is not None and info.backbone_hash != backbone.hash:
            raise RegistryError(
                f"layer {name} was trained on backbone {info.backbone_id}, not on {backbone.id}; use the same backbone"
            )
        for fname in (LAYER_FILE, ROUTER_FILE):
            digest = file_sha256(folder / fname)
            if digest != info.sha256.get(fname):
                raise RegistryError(
                    f"checksum mismatch for {fname} of layer {name}: the file was changed or is corrupt")
        try:
            layer = AlignmentLayer(info.channels, info.blocks)
            layer.load_state_dict(load_file(str(folder / LAYER_FILE)))
            router_state = load_file(str(folder / ROUTER_FILE))
            vae = FeatureVAE(in_dim=info.channels, beta=float(info.train_config.get("vae_beta", VAE_BETA)))
            vae.load_state_dict(router_state)
        except Exception as e:
            raise RegistryError(f"cannot load layer {name}: {e}") from e
        return layer.eval(), vae.eval(), info

    # ---------------------------------------------------------------- writing
    def next_version(self, institution: str) -> int:
        """Returns the version number a new layer of ``institution`` would get."""
        versions = [i.version for i in self.list() if i.institution == institution]
        # a folder whose meta.json cannot be read (truncated, corrupt) is not listed but still holds its name
        taken = re.compile(re.escape(slug(institution)) + r"-v(\d+)")
        held = [int(m.group(1)) for d in (self.layers_dir.iterdir() if self.layers_dir.exists() else [])
                if (m := taken.fullmatch(d.name))]
        return max(versions + held, default=0) + 1

    def add(self, layer: AlignmentLayer, vae: FeatureVAE, info: LayerInfo) -> LayerInfo:
        """Writes a new layer atomically; earlier layers are not touched.

        ``info.name``, ``version``, ``seq``, ``created`` and ``sha256`` are filled in here.

        Args:
            layer: the trained Alignment Layer.
            vae: its router VAE.
            info: provenance (institution, τ, backbone, …).

        Returns:
            The stored LayerInfo.

        Raises:
            RegistryError: the layer could not be written.
        """
        for attempt in range(20):
            info.version = self.next_version(info.institution)
            info.name = f"{slug(info.institution)}-v{info.version}"
            info.seq = max((i.seq for i in self.list()), default=0) + 1
            info.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            info.channels, info.blocks = layer.channels, len(layer.blocks)
            tmp = self.root / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir(parents=True)
            try:
                for module, fname in ((layer, LAYER_FILE), (vae, ROUTER_FILE)):
                    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                    save_file(state, str(tmp / fname))
                info.sha256 = {f: file_sha256(tmp / f) for f in (LAYER_FILE, ROUTER_FILE)}
                with open(tmp / META_FILE, "w") as f:
                    json.dump(_meta_json(info), f, indent=2, default=str)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, self.layers_dir / info.name)  # atomic; fails if another writer took the name
                return info
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if (self.layers_dir / info.name).exists():
                    continue  # lost a race for this version: try the next one
                raise RegistryError(f"cannot write layer to {self.root}: {e}") from e
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        raise RegistryError("could not find a free layer name after 20 attempts")

    def export(self, name: str) -> Tuple[Dict[str, Any], Dict[str, bytes]]:
        """Returns a layer as :meth:`put` takes it: (its LayerInfo as a dict, {file name: bytes}).

        Raises:
            UnknownLayerError: no such layer.
        """
        info = self.get(name)
        return _meta_json(info), {f: (self.layers_dir / name / f).read_bytes() for f in (LAYER_FILE, ROUTER_FILE)}

    def put(self, meta: Dict[str, Any], files: Dict[str, bytes]) -> bool:
        """Stores a layer exactly as another registry wrote it (same name, seq and checksums), e.g. a copy sent
        by a federated coordinator. Atomic, like :meth:`add`; a layer already present with the same checksums is
        left alone.

        Args:
            meta: the layer's LayerInfo as a dict (``name`` and ``sha256`` are required).
            files: the bytes of ``layer.safetensors`` and ``router.safetensors``.

        Returns:
            True when the layer was written, False when it was already there.

        Raises:
            RegistryError: unknown format, bad name, missing file, checksum mismatch, or another layer of that name
                is present.
        """
        info = LayerInfo.from_dict(meta)
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*-v\d+", info.name or ""):
            raise RegistryError(f"not a layer name: {info.name!r}")
        for fname in (LAYER_FILE, ROUTER_FILE):
            if fname not in files:
                raise RegistryError(f"layer {info.name}: {fname} missing")
            if hashlib.sha256(files[fname]).hexdigest() != info.sha256.get(fname):
                raise RegistryError(f"layer {info.name}: checksum mismatch for {fname}")
        dest = self.layers_dir / info.name
        if dest.exists():
            try:
                same = self.get(info.name).sha256 == info.sha256
            except UnknownLayerError:
                same = False
            if same:
                return False
            raise RegistryError(f"the registry already holds another layer named {info.name}")
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            for fname in (LAYER_FILE, ROUTER_FILE):
                (tmp / fname).write_bytes(files[fname])
            (tmp / META_FILE).write_text(json.dumps(_meta_json(info), indent=2, default=str))
            os.rename(tmp, dest)
        except OSError as e:
            raise RegistryError(f"cannot write layer {info.name} to {self.root}: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def remove(self, name: str) -> LayerInfo:
        """Removes a layer (atomically: renamed away, then deleted).

        Raises:
            UnknownLayerError: no such layer.
        """
        info = self.get(name)
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        os.rename(self.layers_dir / name, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return info

    def rollback(self, institution: str) -> LayerInfo:
        """Removes the newest version of an institution's layer, so the previous version becomes active.

        Returns:
            The removed layer's info.

        Raises:
            UnknownLayerError: the institution has no layer.
        """
        versions = [i for i in self.list() if i.institution == institution]
        if not versions:
            raise UnknownLayerError(f"institution {institution!r} has no layer to roll back")
        return self.remove(max(versions, key=lambda i: i.version).name)


@contextlib.contextmanager
def writer_lock(registry: LayerRegistry, wait: bool = True) -> Iterator[bool]:
    """Holds the registry's writer lock (an ``flock``; the kernel drops it when its process dies, even by
    ``kill -9``), so that only one online trainer writes at a time and a half-written layer of a dead one can be
    told from one being written.

    Args:
        registry: the registry.
        wait: block until the lock is free; False: yield False at once when another process holds it.

    Yields:
        Whether the lock is held.
    """
    import fcntl

    with open(registry.root / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_incomplete(registry: LayerRegistry, min_age_s: float = 60.0) -> List[str]:
    """Removes what a writer killed mid-way left in the registry (``.tmp-*`` / ``.trash-*`` folders).

    Call it holding :func:`writer_lock`. Complete layers are never touched (they are renamed into place whole);
    folders changed in the last ``min_age_s`` seconds are kept, as a writer that does not take the lock may
    still be filling them.

    Returns:
        The removed folder names.
    """
    removed = []
    now = time.time()
    for d in registry.root.iterdir():
        if d.is_dir() and d.name.startswith((".tmp-", ".trash-")) and now - d.stat().st_mtime >= min_age_s:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    if removed:
        log.warning("removed %d incomplete registry folders left by an interrupted writer: %s", len(removed), removed)
    return removed


def in_order(infos: List[LayerInfo], include_inactive: bool = True) -> List[LayerInfo]:
    """Layers in the order they were added, optionally only each institution's newest version.

    Args:
        infos: the layers read from a registry, in any order.
        include_inactive: keep superseded versions (default True); False keeps each institution's newest only.

    Returns:
        The layers sorted by the order they were added (sequence number, creation time, name).
    """
    infos = sorted(infos, key=lambda i: (i.seq, i.created, i.name))
    if include_inactive:
        return infos
    latest: Dict[str, LayerInfo] = {}
    for info in infos:
        cur = latest.get(info.institution)
        if cur is None or info.version > cur.version:
            latest[info.institution] = info
    return [i for i in infos if latest[i.institution] is i]
