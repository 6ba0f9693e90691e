"""``--conf conf_file <file.json>``: more ``--conf`` options in a JSON file, read by every app MONAI Label builds.

MONAI Label 0.8.5 keeps the command line's ``--conf`` options for the whole run; ``POST /reload`` only builds a
new app from them. Options in a ``conf_file`` are read anew by each app, at start-up and after every
``POST /reload``, so an administrator can change a limit (``max_sessions``, ``max_upload_mb``, …) without a
restart. The file's values win over the command line's. A file that cannot be read, or is not a JSON object of
options, is logged and ignored (the command line's options apply), so that a typo never takes the server down.
"""

from __future__ import annotations

import json
import logging
from typing import Dict

log = logging.getLogger(__name__)


def with_conf_file(conf: Dict[str, str]) -> Dict[str, str]:
    """The ``--conf`` options with those of the JSON file ``conf["conf_file"]`` names, if any.

    Args:
        conf: the command line's ``--conf`` options.

    Returns:
        A new dict: ``conf`` updated with the file's options (values as strings, as on the command line).
    """
    path = conf.get("conf_file")
    if not path:
        return dict(conf)
    try:
        with open(path) as f:
            extra = json.load(f)
        if not isinstance(extra, dict):
            raise ValueError(f"expected a JSON object of options, got {type(extra).__name__}")
    except (OSError, ValueError) as e:
        log.error("--conf conf_file %s ignored (the command line's options apply): %s", path, e)
        return dict(conf)
    log.info("options from --conf conf_file %s: %s", path, ", ".join(sorted(extra)))
    return {**conf, **{str(k): v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()}}
