"""A real MONAI Label server running a casam app on loopback, started and driven by tests and benchmarks.

The server is ``python -m monailabel.main start_server`` in a subprocess, so this module needs MONAI Label
installed in the same environment but does not import it. The app folder is copied to a temporary folder first
(``start_server`` creates ``model/``, ``logs/`` and ``bin/`` in the app folder); the server runs from a clean
working directory (MONAI Label reads a ``.env`` from it) with training tracking off (no mlflow) and nothing
that could download.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Union

import requests

# A harness server trains only when its caller asks (by request or conf), and its layers' refinement heads take
# 20 steps rather than the app's 150: the runs measure serving, not the head's training. ``conf`` overrides both.
HARNESS_CONF = {"train_after_labels": "0", "head_steps": "20"}


def free_port(ports: Optional[range] = None) -> int:
    """Returns a free loopback port: any (the system's choice), or the first free one of ``ports``.

    Raises:
        RuntimeError: every port of ``ports`` is taken.
    """
    for port in ports or [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {ports}")


class MonaiLabelServer:
    """``python -m monailabel.main start_server`` for a casam app folder, as a context manager.

    Args:
        studies: studies folder or DICOMweb URL.
        workdir: a temporary folder (app copy, logs, caches, sessions).
        app: the app folder to copy and serve (``apps/casam`` of a casam checkout).
        conf: ``--conf`` options, over :data:`HARNESS_CONF`.
        env: extra environment variables of the server.
        ports: the ports it may take (default: any free one).
    """

    def __init__(self, studies: str, workdir: Union[str, Path], app: Union[str, Path],
                 conf: Optional[Dict[str, str]] = None, env: Optional[Dict[str, str]] = None,
                 ports: Optional[range] = None):
        self.studies, self.workdir, self.app = str(studies), Path(workdir), Path(app)
        self.conf, self.extra_env = {**HARNESS_CONF, **(conf or {})}, dict(env or {})
        self.port = free_port(ports)
        self.url = f"http://127.0.0.1:{self.port}"
        self.app_dir = self.workdir / "app"
        self.log_path = self.workdir / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 180) -> "MonaiLabelServer":
        """Starts the server and waits until ``GET /info/`` answers.

        Raises:
            RuntimeError: the server exited, or did not answer within ``timeout`` seconds (the log's tail is
                in the message).
        """
        shutil.copytree(self.app, self.app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(self.app_dir), "--studies",
               self.studies, "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in self.conf.items():
            cmd += ["--conf", k, str(v)]
        env = dict(os.environ)
        env.update({
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "MONAI_LABEL_TRACKING_ENABLED": "false",
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "MONAI_LABEL_SESSION_PATH": str(self.workdir / "sessions"),
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(self.workdir / "dicom-cache"),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        run_dir = self.workdir / "cwd"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MONAI Label server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/info/", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"MONAI Label server did not answer in {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 6000) -> str:
        """Returns the last ``n`` characters of the server's log (empty when it cannot be read)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stops the server's process group (SIGTERM, then SIGKILL after 20 s) and closes its log."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- helpers on the REST API --------------------------------------------------------------------
    def info(self) -> dict:
        """Returns ``GET /info/``."""
        r = requests.get(self.url + "/info/", timeout=30)
        r.raise_for_status()
        return r.json()

    def train_sync(self, params: Optional[dict] = None, timeout: float = 1500) -> dict:
        """Runs ``POST /train/casam?run_sync=true`` and returns the trainer's report.

        Raises:
            RuntimeError: the server did not answer 200.
        """
        r = requests.post(self.url + "/train/casam", params={"run_sync": "true"}, json=params or {}, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"POST /train/casam answered {r.status_code}: {r.text}")
        return r.json()
