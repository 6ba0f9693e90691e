"""MONAI Label's bearer-token check, made to accept valid tokens under PyJWT 2 (and only the realm's algorithm).

MONAI Label 0.8.5 (``monailabel.endpoints.user.auth.from_token``) verifies a token with
``jwt.decode(token, key, options=...)`` and no ``algorithms``. PyJWT 2 refuses that call for every token
("It is required that you pass in a value for the "algorithms" argument"), so with
``MONAI_LABEL_AUTH_ENABLE=true`` every request, a valid Keycloak token included, is answered 401; PyJWT 1
would have accepted whatever algorithm the token's header names. :func:`install` gives that module a
``jwt`` whose ``decode`` passes the algorithms a realm signs with (``CASAM_AUTH_ALGORITHMS``, default
``RS256``, Keycloak's default), so valid tokens pass and a token signed any other way (e.g. HS256 with the
public key as the secret) is refused. Nothing else of the check changes.

The app calls it when it starts (``CASAMApp.__init__``); ``docker/casam_auth_hook.py`` calls it in the image
as soon as MONAI Label's auth module is imported, loading this file from the app's folder. The two (and every
app ``POST /reload`` builds, which imports this module anew) install it once: the installed ``jwt`` is
recognised by its :attr:`PinnedJWT.casam_pinned` mark, not by its class.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

ALGORITHMS_ENV = "CASAM_AUTH_ALGORITHMS"
DEFAULT_ALGORITHMS = ("RS256",)


def algorithms_from_env() -> list:
    """The algorithms of ``CASAM_AUTH_ALGORITHMS`` (comma-separated), default ``RS256``."""
    value = os.environ.get(ALGORITHMS_ENV, "")
    algs = [a.strip() for a in value.split(",") if a.strip()]
    return algs or list(DEFAULT_ALGORITHMS)


class PinnedJWT:
    """``jwt`` as MONAI Label's auth module uses it, with ``decode`` pinned to the given algorithms.

    Args:
        jwt_module: PyJWT's ``jwt`` module.
        algorithms: the algorithms a token may be signed with.
    """

    casam_pinned = True  # how install() recognises it, whichever copy of this module made it

    def __init__(self, jwt_module: Any, algorithms: Sequence[str]):
        self._jwt = jwt_module
        self.algorithms = list(algorithms)

    def decode(self, token, key="", *args, **kwargs):
        kwargs["algorithms"] = self.algorithms  # never what the token's header asks for
        return self._jwt.decode(token, key, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._jwt, name)


def install(algorithms: Optional[Sequence[str]] = None) -> bool:
    """Pins MONAI Label's token check to ``algorithms`` (default: :func:`algorithms_from_env`).

    Args:
        algorithms: the algorithms a token may be signed with; None or empty: ``CASAM_AUTH_ALGORITHMS``.

    Returns:
        True when installed now, False when it already was (the algorithms are then updated).
    """
    from monailabel.endpoints.user import auth

    algs = list(algorithms) if algorithms else algorithms_from_env()
    if getattr(auth.jwt, "casam_pinned", False):
        auth.jwt.algorithms = algs
        return False
    auth.jwt = PinnedJWT(auth.jwt, algs)
    return True
