"""casam: Continual Alignment for SAM (CA-SAM).

A frozen SAM backbone, one small Alignment Layer per institution (data stream), and a VAE router
that picks the layer for each image or falls back to plain SAM for images unlike anything seen.
"""

__version__ = "0.1.0"
