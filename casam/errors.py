"""Exceptions raised by casam. Every error a user can cause derives from :class:`CasamError`."""


class CasamError(Exception):
    """Base class of casam's errors."""


class PromptError(CasamError, ValueError):
    """A prompt is missing, malformed, or lies outside the image."""


class ImageError(CasamError, ValueError):
    """An image (or mask) has the wrong shape, dtype, or could not be read."""


class UnknownLayerError(CasamError, KeyError):
    """A layer name that the registry does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown layer"


class RegistryError(CasamError, RuntimeError):
    """The layer registry is inconsistent: checksum mismatch, wrong backbone, corrupt metadata."""


class BackboneError(CasamError, RuntimeError):
    """A backbone cannot be built or its checkpoint cannot be loaded."""
