"""The MONAI Label server harness (:mod:`casam.evaluation.server`) on this checkout's ``apps/casam``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

from casam.evaluation import server

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "casam"


class MonaiLabelServer(server.MonaiLabelServer):
    """:class:`casam.evaluation.server.MonaiLabelServer` serving ``apps/casam`` (see there for the arguments)."""

    def __init__(self, studies: str, workdir: Union[str, Path], conf: Optional[Dict[str, str]] = None,
                 env: Optional[Dict[str, str]] = None, ports: Optional[range] = None):
        super().__init__(studies, workdir, APP, conf=conf, env=env, ports=ports)
