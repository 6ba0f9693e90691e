"""A studies folder of synthetic disk pictures for app tests on the tiny backbone (no real data needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from conftest import disk_image


def png_bytes(arr: np.ndarray) -> bytes:
    """An array as PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def disk_studies(work: Path, n: int) -> Path:
    """Writes ``work/studies/disk<i>.png`` (64×96 grey pictures) and their masks ``work/disk<i>_mask.png``.

    Returns:
        The studies folder.
    """
    studies = work / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img, mask = disk_image(rng, size=(64, 96))
        (studies / f"disk{i}.png").write_bytes(png_bytes(img))
        (work / f"disk{i}_mask.png").write_bytes(png_bytes(mask))
    return studies
