"""CA-SAM as a MONAI bundle: export a registry, check it against the model zoo's rules, load and run it."""

from __future__ import annotations

from casam.bundle.check import check_bundle, read_bundle_manifest
from casam.bundle.export import default_template, export_bundle, fill_metadata, write_large_files
from casam.bundle.inferer import BundleInferer, BundleNetwork, parse_prompt_file, prompts_from_label
from casam.bundle.load import load_bundle_backbone, load_bundle_predictor
