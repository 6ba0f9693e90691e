"""Pins MONAI Label's bearer-token check to the realm's algorithms in every process of the image.

Installed into the image's site-packages with a one-line ``casam_auth_hook.pth``: when any Python process
imports ``monailabel.endpoints.user.auth``, ``install()`` of the app's ``lib/server/auth.py`` runs right after
it, so the server accepts valid realm tokens under PyJWT 2 (see that module). The app's folder comes from
``CASAM_APP_DIR`` (the Dockerfile sets it); without it the hook does nothing and the app installs the fix
itself when it starts. Costs nothing in processes that never import MONAI Label's auth (the health check,
the stand-in realm).
"""

import importlib.abc
import importlib.util
import os
import sys

TARGET = "monailabel.endpoints.user.auth"
APP_DIR_ENV = "CASAM_APP_DIR"
MODULE = "casam_app_auth"  # the app's lib/server/auth.py, loaded under this name (the app's lib is not on sys.path)


def load_auth(app_dir: str):
    """The app's ``lib/server/auth.py`` as a module.

    Args:
        app_dir: the app's folder (``apps/casam``).

    Returns:
        The module (kept in ``sys.modules`` as ``casam_app_auth``).
    """
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    spec = importlib.util.spec_from_file_location(MODULE, os.path.join(app_dir, "lib", "server", "auth.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    return module


class _AfterAuthImport(importlib.abc.MetaPathFinder):
    """Finds MONAI Label's auth module as usual, and runs the app's ``install()`` once it is loaded."""

    def __init__(self, app_dir: str):
        self.app_dir = app_dir

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # find the real spec, once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            load_auth(self.app_dir).install()

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(APP_DIR_ENV):
    sys.meta_path.insert(0, _AfterAuthImport(os.environ[APP_DIR_ENV]))
