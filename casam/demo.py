"""``casam demo``: the whole CA-SAM loop on a public brain MRI template, no data of your own needed.

Data: the MNI152 2009 T1 template and its white-matter probability map, shipped as package data by the PyPI
package ``nilearn`` (BSD-3; only the files are read, nilearn is not imported). Axial slices become one
"institution" whose annotation convention is *white matter*: plain SAM, given a box around the brain,
segments the whole brain; a new Alignment Layer learns the convention. The demo

1. trains that layer (slices grouped into blocks, split by block so no neighbour leaks into the test set),
2. compares zero-shot and aligned IoU on held-out slices, with the router choosing the layer,
3. shows the router falling back to plain SAM on an out-of-domain photo (matplotlib's sample image),
4. writes ``summary.json``, a registry with the layer, and ``demo.png`` (image | truth | plain SAM | CA-SAM).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from casam.errors import CasamError
from casam.inference.predictor import CASAMPredictor
from casam.model.backbone import load_backbone
from casam.prompts.masks import PROMPT_TYPES, centroid_point, tight_box
from casam.registry.store import LayerRegistry
from casam.scoring.metrics import iou
from casam.training.config import TrainConfig
from casam.training.layer import split_by_patient, train_layer

# The demo's own short recipe (not CA-SAM's, TrainConfig's defaults): a few epochs at a higher learning rate, so
# the demo finishes in minutes on a CPU.
DEMO_EPOCHS = 3
DEMO_LR = 3e-4


def mni_files() -> dict:
    """Paths of the MNI152 2009 template files inside the installed nilearn package.

    Raises:
        CasamError: nilearn is not installed.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise CasamError("the demo reads the MNI152 template shipped in the PyPI package nilearn: "
                         "pip install --no-deps nilearn")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    files = {k: d / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "wm")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise CasamError(f"nilearn lacks the template files: {missing}")
    return files


def template_slices(step: int = 2, lo: int = 50, hi: int = 130):
    """Axial slices of the MNI152 T1 template with white-matter masks (probability > 0.5).

    Returns:
        (images uint8 list, masks uint8 list, block ids list, slice indices list).
    """
    import nibabel as nib

    f = mni_files()
    t1 = np.asarray(nib.load(f["t1"]).dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(f["wm"]).dataobj, dtype=np.float32)
    wm = wm / wm.max()
    images, masks, blocks, zs = [], [], [], []
    for z in range(lo, hi, step):
        img = np.rot90(t1[:, :, z])  # radiological display: anterior up
        m = np.rot90(wm[:, :, z] > 0.5).astype(np.uint8)
        if m.sum() < 200:
            continue
        images.append(np.clip(img / t1.max() * 255, 0, 255).astype(np.uint8))
        masks.append(m)
        blocks.append(f"block{z // 10}")
        zs.append(z)
    return images, masks, blocks, zs


def _figure(path: Path, image, truth, rows) -> None:
    """Draws truth, plain SAM and CA-SAM side by side, one row per prompt (a click, a box)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(len(rows), 3, figsize=(9.6, 3.3 * len(rows)), squeeze=False)
    for r, (prompt, draw, plain, aligned, ious) in enumerate(rows):
        panels = [(f"white matter (truth), {prompt}", truth), (f"plain SAM IoU {ious[0]:.2f}", plain),
                  (f"CA-SAM IoU {ious[1]:.2f}", aligned)]
        for a, (title, m) in zip(ax[r], panels):
            a.imshow(image, cmap="gray")
            a.imshow(np.ma.masked_where(m == 0, m), cmap="autumn", alpha=0.5, interpolation="nearest")
            draw(a)
            a.set_title(title, fontsize=9)
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _draw_box(box):
    def draw(a):
        import matplotlib.patches as patches

        a.add_patch(patches.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, color="cyan",
                                      lw=1.2))
    return draw


def _draw_click(point):
    return lambda a: a.plot(point[0, 0], point[0, 1], "c+", markersize=12, mew=2)


def run_demo(args) -> int:
    """Runs the demo (see the module docstring).

    Args:
        args: ``out``, ``epochs``, ``backbone``, ``checkpoint`` and ``device`` (``casam demo``'s options).

    Returns:
        0.

    Raises:
        CasamError: nilearn (the template's files) is not installed.
    """
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] backbone {args.backbone}; output {out.resolve()}")
    bb = load_backbone(args.backbone, args.checkpoint, args.device)
    images, masks, blocks, zs = template_slices()
    train_idx, test_idx = split_by_patient(blocks, 0.25, seed=1)
    print(f"[demo] MNI152 template: {len(images)} axial slices, {len(train_idx)} to train, {len(test_idx)} held out")
    reg = LayerRegistry(out / "registry")
    for info in reg.list():  # re-running the demo starts from an empty registry
        reg.remove(info.name)
    cfg = TrainConfig(epochs=args.epochs, lr=DEMO_LR, seed=0)
    info = train_layer(bb, [images[i] for i in train_idx], [masks[i] for i in train_idx],
                       [blocks[i] for i in train_idx], reg, "MNI152 template (demo)", "MR T1", cfg,
                       cache_dir=out / "cache",
                       extra={"source": "nilearn MNI152 2009 template, white matter > 0.5"})
    print(f"[demo] trained layer {info.name}: tau={info.tau:.4g}, {info.extra['seconds']} s")
    pred = CASAMPredictor(bb, reg)
    rows = []
    for i in test_idx:
        box = tight_box(masks[i] | (images[i] > 20))  # a box around the brain, as a user would drag it
        click = centroid_point(masks[i] > 0)  # one click on the white matter
        row = {"slice": zs[i], "routed_to": None}
        for prompt, kw in (("box", {"box": box}), ("click", {"points": click, "point_labels": [1]})):
            plain = pred.predict(images[i], layer="none", key=f"z{zs[i]}", **kw)
            auto = pred.predict(images[i], key=f"z{zs[i]}", **kw)
            row[f"plain_sam_{prompt}_iou"] = iou(plain.mask, masks[i])
            row[f"casam_{prompt}_iou"] = iou(auto.mask, masks[i])
            row["routed_to"], row[f"{prompt}_served_by"] = auto.route.layer, auto.route.used
        rows.append(row)
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        from PIL import Image

        photo = np.array(Image.open(fh).convert("RGB"))
    ood = pred.predict(photo, box=[100, 100, 400, 400])
    summary = {
        "layer": info.to_dict(),
        "test_slices": len(rows),
        **{f"{w}_{p}_iou": float(np.mean([r[f"{w}_{p}_iou"] for r in rows])) for w in ("plain_sam", "casam")
           for p in PROMPT_TYPES},
        "layer_used_for": {p: info.serves(p) for p in PROMPT_TYPES},
        "routed_to_layer": float(np.mean([r["routed_to"] == info.name for r in rows])),
        "out_of_domain_photo": ood.route.to_dict(("fallback", "score", "tau")),
        "per_slice": rows,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    k = int(np.argmax([r["casam_box_iou"] - r["plain_sam_box_iou"] for r in rows]))
    i = test_idx[k]
    box = tight_box(masks[i] | (images[i] > 20))
    click = centroid_point(masks[i] > 0)
    fig_rows = []
    for prompt, kw, draw in (("one click", {"points": click, "point_labels": [1]}, _draw_click(click)),
                             ("box", {"box": box}, _draw_box(box))):
        plain, auto = pred.predict(images[i], layer="none", **kw).mask, pred.predict(images[i], **kw).mask
        fig_rows.append((prompt, draw, plain, auto, (iou(plain, masks[i]), iou(auto, masks[i]))))
    _figure(out / "demo.png", images[i], masks[i], fig_rows)
    print(f"[demo] held-out slices, box around the brain: plain SAM IoU {summary['plain_sam_box_iou']:.3f} -> CA-SAM "
          f"{summary['casam_box_iou']:.3f}; one click: plain SAM {summary['plain_sam_click_iou']:.3f} -> CA-SAM "
          f"{summary['casam_click_iou']:.3f}; router chose the layer for {summary['routed_to_layer']:.0%}; the layer "
          f"serves {', '.join(p for p in PROMPT_TYPES if info.serves(p)) or 'no prompt type'}")
    where = "fell back to plain SAM" if ood.route.fallback else "routed to " + str(ood.route.layer)
    print(f"[demo] out-of-domain photo: {where} "
          f"(score {ood.route.score:.4g} vs tau {ood.route.tau:.4g})")
    print(f"[demo] wrote {out / 'summary.json'}, {out / 'demo.png'} and the registry {out / 'registry'} "
          f"({summary['seconds']} s)")
    return 0
