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


class LimitError(CasamError, ValueError):
    """A request or an image exceeds a configured limit (too many points, voxels, bytes, slices).

    Args:
        what: what was measured, in words (e.g. ``"image brain.nii.gz has 2.1e8 voxels"``).
        limit: the limit's name (its ``--conf`` key).
        value: the measured value.
        maximum: the limit's value.
    """

    def __init__(self, what: str, limit: str, value, maximum):
        super().__init__(f"{what}: {value} is over the limit {limit} = {maximum} (--conf {limit})")
        self.limit, self.value, self.maximum = limit, value, maximum
