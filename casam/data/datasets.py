"""Datasets on disk: task discovery from MANIFEST.tsv, the continual stream order, image/mask IO.

A data root holds one folder per dataset (``images/``, ``masks/``, ``meta.csv`` with case, patient,
institution, split) and a ``MANIFEST.tsv`` listing them. A *task* of the continual stream is one dataset at
one institution. The stream order is read from the numbered list in the root's README.md
(``N. dataset`` or ``N. dataset @ institution``); tasks it does not name follow in manifest order.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TypeVar

import numpy as np

from casam.data.formats import IMAGE_SUFFIXES
from casam.errors import ImageError


def read_image(path: str | Path) -> np.ndarray:
    """Reads a 2D image file (PNG/JPEG/TIFF/BMP) or a 2D NumPy ``.npy`` into an array.

    Raises:
        ImageError: missing, unreadable or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"no such image: {path}")
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "LA", "PA"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.array(im, dtype=np.uint16)
            return np.array(im)
    except Exception as e:
        raise ImageError(f"cannot read image {path}: {e}") from e


def read_mask(path: str | Path) -> np.ndarray:
    """Reads a label map (uint8 class ids) from an image file.

    Raises:
        ImageError: unreadable, or not a single-channel label.
    """
    m = read_image(path)
    if m.ndim == 3:
        if not (m[..., :1] == m[..., : min(3, m.shape[-1])]).all():
            raise ImageError(f"{path} is a colour image, not a label map")
        m = m[..., 0]
    return m.astype(np.uint8)


@dataclass
class Case:
    """One annotated image."""

    case: str
    patient: str
    institution: str
    split: str
    image: Path
    mask: Optional[Path]


@dataclass
class Task:
    """One task of the continual stream: a dataset at one institution."""

    name: str
    dataset: str
    institution: str
    modality: str
    root: Path
    cases: List[Case] = field(default_factory=list)

    def split(self, split: str) -> List[Case]:
        """Cases of the given split ("train" or "test")."""
        return [c for c in self.cases if c.split == split]


def _find_file(folder: Path, stem: str) -> Optional[Path]:
    for suf in IMAGE_SUFFIXES:
        p = folder / f"{stem}{suf}"
        if p.exists():
            return p
    return None


def read_meta(folder: str | Path) -> List[Case]:
    """Reads a dataset folder's cases from ``meta.csv`` (or, without it, pairs ``images/`` with ``masks/``).

    Without meta.csv every image is its own patient, institution "default", split "train".

    Raises:
        FileNotFoundError: no images/ folder.
    """
    folder = Path(folder)
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir():
        raise FileNotFoundError(f"{folder} has no images/ folder")
    meta = folder / "meta.csv"
    cases = []
    if meta.exists():
        with open(meta, newline="") as f:
            for row in csv.DictReader(f):
                img = _find_file(images, row["case"])
                if img is None:
                    continue
                cases.append(Case(row["case"], row.get("patient") or row["case"], row.get("institution") or "default",
                                  row.get("split") or "train", img, _find_file(masks, row["case"])))
    else:
        for img in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            cases.append(Case(img.stem, img.stem, "default", "train", img, _find_file(masks, img.stem)))
    return cases


def read_manifest(root: str | Path) -> List[Dict[str, str]]:
    """Reads ``MANIFEST.tsv`` of a data root (one row per dataset)."""
    with open(Path(root) / "MANIFEST.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


_ORDER_RE = re.compile(r"^\s*\d+\.\s+([A-Za-z0-9_\-]+)(?:\s*@\s*(.+?))?\s*$")


def stream_order(root: str | Path) -> List[tuple]:
    """The continual stream order from the numbered list of the root's README.md.

    Returns:
        List of (dataset, institution or None) in order; empty when the README has no such list.
    """
    readme = Path(root) / "README.md"
    if not readme.exists():
        return []
    order = []
    for line in readme.read_text().splitlines():
        m = _ORDER_RE.match(line)
        if m:
            order.append((m.group(1), m.group(2).strip() if m.group(2) else None))
    return order


def discover_tasks(root: str | Path) -> List[Task]:
    """Discovers the tasks of a data root, in stream order.

    Each dataset of MANIFEST.tsv gives one task per institution in its meta.csv (named ``dataset`` when it
    has one institution, ``dataset@institution`` otherwise). Ordered by the README's stream list, the rest
    after it in manifest order.

    Args:
        root: the data root.

    Returns:
        The tasks with their cases.
    """
    root = Path(root)
    tasks: List[Task] = []
    for row in read_manifest(root):
        ds = row["task"]
        cases = read_meta(root / ds)
        insts = list(dict.fromkeys(c.institution for c in cases))
        for inst in insts:
            name = ds if len(insts) == 1 else f"{ds}@{inst}"
            own = [c for c in cases if c.institution == inst]
            tasks.append(Task(name, ds, inst, row.get("modality", ""), root / ds, own))
    order = stream_order(root)

    def rank(t: Task) -> tuple:
        for i, (ds, inst) in enumerate(order):
            if ds == t.dataset and (inst is None or inst == t.institution):
                return (0, i)
        return (1, tasks.index(t))

    return sorted(tasks, key=rank)


T = TypeVar("T")


def spread(items: Sequence[T], n: Optional[int]) -> List[T]:
    """At most ``n`` of ``items``, evenly spaced from the first to the last (all of them when ``n`` is None).

    Args:
        items: e.g. the cases of one split, in their order.
        n: how many to keep (0 keeps none).

    Returns:
        The kept items, in their order.
    """
    if n is None or len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, n).round().astype(int).tolist()))]


def load_cases(cases: Sequence[Case]) -> tuple:
    """Reads images and masks of cases.

    Returns:
        (images, masks, patients) lists.
    """
    images = [read_image(c.image) for c in cases]
    masks = [read_mask(c.mask) for c in cases]
    return images, masks, [c.patient for c in cases]
