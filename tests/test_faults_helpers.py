"""Helpers of the fault tests (``tests/test_faults_*.py``; no tests here): a real server on the tiny backbone over
synthetic disk pictures, restartable on the same app folder, studies and registry after a ``kill -9``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import requests

from conftest import disk_image

try:
    from casam.evaluation.server import MonaiLabelServer as _Base  # the harness (moved from tests/mlserver.py)

    APP = Path(__file__).resolve().parents[1] / "apps" / "casam"

    class _Harness(_Base):
        def __init__(self, studies, workdir, conf=None, env=None, ports=None):
            super().__init__(studies, workdir, APP, conf=conf, env=env, ports=ports)
except ImportError:  # an older checkout
    from mlserver import MonaiLabelServer as _Harness  # type: ignore[no-redef]

PAUSE_ENV = "CASAM_TEST_PAUSE_DIR"  # apps/casam/lib/server/faults.py: a test-only pause at a named stage


def make_studies(folder: Path, n: int = 8, seed: int = 0) -> Dict[str, Path]:
    """``n`` synthetic pictures (a bright disk on dark) in ``folder`` and their label maps beside it.

    Returns:
        image id → its label file (in ``folder/../labels``).
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    labels = folder.parent / "labels"
    labels.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        img, mask = disk_image(rng, size=(64, 64))
        Image.fromarray(img).save(folder / f"a{i}.png")
        Image.fromarray(mask).save(labels / f"a{i}.png")
        out[f"a{i}"] = labels / f"a{i}.png"
    return out


class FaultServer(_Harness):
    """The harness's server, plus a SIGKILL of its process group and a restart on the same folders."""

    runs = 0

    def kill9(self) -> None:
        """SIGKILL to the server's whole process group (a background training's process with it)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def restart(self, timeout: float = 180) -> "FaultServer":
        """Starts the server again on the same app folder, studies, registry and cache (its earlier logs kept)."""
        self.stop()
        self.runs += 1
        if self.log_path.exists():
            os.replace(self.log_path, self.workdir / f"server.{self.runs}.log")
        copytree = shutil.copytree
        shutil.copytree = lambda *a, **k: None  # the app folder is there already: the same one
        try:
            return self.start(timeout)
        finally:
            shutil.copytree = copytree

    def logs(self) -> str:
        """Every run's log, oldest first."""
        parts = [p.read_text(errors="replace") for p in sorted(self.workdir.glob("server.*.log"),
                                                               key=lambda p: int(p.name.split(".")[1]))]
        return "\n".join(parts + [self.log_tail(10**7)])

    def save_label(self, image_id: str, path: Path, params: Optional[dict] = None,
                   timeout: float = 60) -> requests.Response:
        with open(path, "rb") as f:
            return requests.put(f"{self.url}/datastore/label", params={"image": image_id, "tag": "final"},
                                data={"params": json.dumps({"institution": "A", "patient": f"p{image_id[1:]}",
                                                            **(params or {})})},
                                files={"label": (Path(path).name, f)}, timeout=timeout)

    def click(self, image_id: str, timeout: float = 120) -> requests.Response:
        """A click as 3D Slicer sends it (one foreground point)."""
        return requests.post(f"{self.url}/infer/casam", params={"image": image_id, "output": "json"},
                             data={"params": json.dumps({"foreground": [[32, 32]], "background": []})},
                             timeout=timeout)

    def labels_dir(self) -> Path:
        return Path(self.studies) / "labels" / "final"


def file_digests(folder: Path) -> Dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones left out), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(q.startswith(".") for q in p.relative_to(folder).parts)}


def wait_for(what: str, check, timeout: float = 300, period: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        out = check()
        if out:
            return out
        time.sleep(period)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def server_conf(work: Path, **more: str) -> Dict[str, str]:
    """The fault tests' options: the tiny backbone, short trainings, no background training unless asked."""
    return {"backbone": "tiny", "registry": str(work / "registry"), "cache": str(work / "cache"), "labels": "disk",
            "min_images": "4", "epochs": "2", "max_train_epochs": "4", "head_steps": "4", "prefetch": "false",
            **more}


def seed_layer(registry_dir: Path, institution: str = "A"):
    """Writes one layer of the tiny backbone into a registry, as a trainer would (fresh weights, checksums): a
    registry with a layer in seconds rather than a training's minutes."""
    from casam.model.alignment import fresh_layer
    from casam.model.backbone import load_backbone
    from casam.model.router import FeatureVAE
    from casam.registry.store import LayerInfo, LayerRegistry

    bb = load_backbone("tiny")
    layer = fresh_layer(bb).cpu()
    info = LayerInfo(name="", institution=institution, version=0, backbone_id=bb.id, backbone_hash=bb.hash, tau=1e9,
                     n_images=8, n_patients=8)
    return LayerRegistry(registry_dir).add(layer, FeatureVAE(in_dim=layer.channels), info)
