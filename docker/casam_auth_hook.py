"""Installed into the image's site-packages with a one-line ``casam_auth_hook.pth``: when any Python process
imports ``monailabel.endpoints.user.auth``, :func:`casam.monailabel_auth.install` runs right after it, so the
server accepts valid realm tokens under PyJWT 2 (see that module). Costs nothing in processes that never
import MONAI Label's auth (the health check, the stand-in realm).
"""

import importlib.abc
import importlib.util
import sys

TARGET = "monailabel.endpoints.user.auth"


class _AfterAuthImport(importlib.abc.MetaPathFinder):
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
            from casam.monailabel_auth import install

            install()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterAuthImport())
