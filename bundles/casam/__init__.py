"""The MONAI bundle template that ``casam export-bundle`` fills in, installed as ``casam.bundle.template``.

This file only makes the folder an importable package, so that an installed casam finds its template
(:func:`casam.bundle.export.default_template`); it is not copied into a bundle.
"""
