#!/usr/bin/env python
"""Replays the continual stream's routers on cached embeddings: how often images of a new modality fall back.

Only the router is trained (no Alignment Layer), once per task in stream order, exactly as ``train_layer``
does it (patient-level validation split, 5-fold τ, the VAE on the training part), for several seeds and
router-VAE epoch counts. After each task it routes every test image among the routers seen so far and
reports the share of images of a not-yet-seen modality that fall back (the target: ≥ 90 % at every
step); after the last task, the share of seen images routed to their own task's layer and to a layer of their
own modality.

Examples::

    python benchmarks/router_seeds.py --cache /tmp/exp/cache                        # full training splits
    python benchmarks/router_seeds.py --max-train-cases 60 --name router_seeds_60   # the CPU recipe's cases
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from casam.data.datasets import discover_tasks, load_cases, spread
from casam.evaluation.provenance import machine_info
from casam.model.backbone import load_backbone
from casam.model.router import VAE_EPOCHS, Router
from casam.paths import default_cache, default_data
from casam.scoring.samples import EmbeddingCache, make_samples
from casam.training.config import TrainConfig
from casam.training.layer import fit_router, split_samples


def features(tasks, bb, cache_dir, max_train_cases):
    """Training samples and test features per task (through the embedding cache)."""
    out, cache, window = [], EmbeddingCache(bb, cache_dir), TrainConfig().window
    for t in tasks:
        tr = spread([c for c in t.split("train") if c.mask is not None], max_train_cases)
        te = [c for c in t.split("test") if c.mask is not None]
        train = make_samples(bb, *load_cases(tr), cache=cache, window=window)
        test = torch.stack([s.feature for s in make_samples(bb, *load_cases(te), cache=cache, window=window)])
        out.append((train, test))
    return out


def replay(tasks, feats, seed: int, vae_epochs: int) -> dict:
    """One stream of routers; returns the new-modality fallback per step and the final routing shares."""
    cfg = TrainConfig(seed=seed, vae_epochs=vae_epochs)
    vaes, taus, steps = [], [], []
    for k, (train, _) in enumerate(feats):
        train_s, _, _ = split_samples([s for s in train if s.targets], cfg)
        vae, tau = fit_router(train_s, cfg)
        vaes.append(vae)
        taus.append(tau)
        router = Router(vaes, taus)
        seen = {x.modality for x in tasks[: k + 1]}
        fell = [router.route(f).fallback for u, (_, test) in zip(tasks, feats) if u.modality not in seen for f in test]
        steps.append(float(np.mean(fell)) if fell else None)
    own = same_modality = n = 0
    for j, (u, (_, test)) in enumerate(zip(tasks, feats)):
        for f in test:
            r = router.route(f)
            own += r.index == j
            same_modality += r.index is not None and tasks[r.index].modality == u.modality
            n += 1
    new = [v for v in steps if v is not None]
    return {"new_modality_fallback": steps, "lowest": min(new) if new else None, "own_layer": own / n,
            "own_modality": same_modality / n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--cache", default=None, help="embedding cache folder (default $CASAM_CACHE or ~/.casam/cache)")
    p.add_argument(
        "--max-train-cases", type=int, default=None, help="training cases per task, evenly spaced (default all)"
    )
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--vae-epochs", default=f"10,{VAE_EPOCHS}")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="router_seeds")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    tasks = discover_tasks(args.data or default_data())
    bb = load_backbone("litemedsam", None, "cpu")
    feats = features(tasks, bb, args.cache or default_cache(), args.max_train_cases)
    rows = []
    for ep in [int(x) for x in args.vae_epochs.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            r = {"vae_epochs": ep, "seed": seed, **replay(tasks, feats, seed, ep)}
            rows.append(r)
            print(
                f"vae_epochs {ep:4d} seed {seed}: new-modality fallback per step "
                f"{[None if v is None else round(v, 3) for v in r['new_modality_fallback']]}, own layer "
                f"{r['own_layer']:.3f}, own modality {r['own_modality']:.3f}",
                flush=True,
            )
    res = {
        "benchmark": "router replay over seeds (benchmarks/router_seeds.py)",
        "tasks": [t.name for t in tasks],
        "train_images": [len(tr) for tr, _ in feats],
        "test_images": [len(te) for _, te in feats],
        "command": "python " + " ".join(sys.argv),
        "machine": machine_info("cpu"),
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    md = [
        "# Router replay: new-modality fallback over seeds\n",
        f"Tasks: {', '.join(res['tasks'])}; training images per task "
        f"{res['train_images']} (before the validation split), test images {res['test_images']}.\n",
        "| VAE epochs | seed | new-modality fallback per step | lowest | seen → own layer | seen → own modality |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = " / ".join("–" if v is None else f"{v:.3f}" for v in r["new_modality_fallback"])
        md.append(
            f"| {r['vae_epochs']} | {r['seed']} | {steps} | {r['lowest']:.3f} | "
            f"{r['own_layer']:.3f} | {r['own_modality']:.3f} |"
        )
    m = res["machine"]
    md += [
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}; {res['seconds']:.0f} s.",
    ]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
