"""The settings of one layer's training (:class:`TrainConfig`), whose defaults are CA-SAM's recipe.

Every entry point that trains (``casam add-layer``, ``casam federated``, the MONAI Label app, the benchmark) reads
its defaults from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from casam.model.preprocess import Window
from casam.model.router import TAU_FOLDS, TAU_PERCENTILE, VAE_BETA, VAE_EPOCHS

# Optimiser steps of an institution's refinement head (casam.model.head); 0 trains none. TrainConfig.head_steps.
# A normalised head on a warm-up + cosine schedule reaches in 150 steps what the plain one reached in 300-400
# (benchmarks/results/head_recipe.md: vessels, membranes, fetal head from 5 labels).
HEAD_STEPS = 150
# Clicks of each validation sequence that decides whether corrective clicks' edits stand against a head that does
# not read clicks (casam.training.head.click_edit_evidence: the first click and CLICK_EDIT_CLICKS - 1 corrective ones).
CLICK_EDIT_CLICKS = 3
# Answers of each validation sequence that decides how corrective clicks are answered after a layer whose head reads
# them (casam.training.head.click_evidence: the first prompt's and CLICK_EVIDENCE_STEPS - 1 corrective clicks').
CLICK_EVIDENCE_STEPS = 4
# Most corrective clicks simulated on a training crop of a click-reading head (each at the centre of its current
# answer's largest error, casam.training.head.train_head): the head learns to answer its own mistakes.
HEAD_SIM_CLICKS = 3
# Most labelled images whose layer is validated by cross-validation instead of a hold-out
# (casam.training.layer.train_layer; the rule: casam.registry.evidence). Up to 9 images a 20 % hold-out validates
# one of them (up to 7) or two, so the gate sees one or two masks while 78 % or more of the labels give no evidence;
# from 10 images on it validates at least two images and trains on 80 %, and larger sets (the continual
# benchmark's tasks) keep the hold-out path unchanged. Cross-validation's extra training is spent where evidence is
# scarcest and a training is cheapest (benchmarks/results/few_labels.md: a 5-label vessel layer served from the
# 5th label, the SAM-friendly tasks' 5-label layers kept out where their gain is noise). 0 turns it off.
CV_MAX_IMAGES = 9
# Folds of that cross-validation. Each fold model trains on the other folds' images, so K folds cost about K - 1
# trainings on all the images: 2 folds (each model on about half) add about one training to the time from labels to
# a served layer; more folds would validate models closer to the served one at K - 1 times the cost.
CV_FOLDS = 2


@dataclass
class TrainConfig:
    """Settings of one layer's training. The defaults are CA-SAM's recipe (see docs/method.md).

    Attributes:
        epochs: passes over the training images (24).
        batch_size: images per optimiser step (6).
        lr: Adam learning rate (1e-4).
        seed: seed of every random choice (split, prompts, init, order).
        val_fraction: share of patients held out for validation (split by patient).
        max_images: cap on training images (a reduced CPU recipe); None = all.
        box_prob: probability of a box prompt (else a point); 1.0 = boxes only (default; the paper mixes 0.5).
        gate_lr: learning rate of the layer's gate g (opens it fast enough for a short training).
        select_best: validate after every epoch and keep the best one (epoch 0 = plain SAM).
        jitter: box jitter in model-input pixels (±5).
        focal_gamma, focal_alpha: focal loss settings (2, 0.25).
        vae_epochs, vae_lr, vae_batch_size, vae_beta: router VAE training (:data:`casam.model.router.VAE_EPOCHS`,
            5e-4, 6, :data:`casam.model.router.VAE_BETA`).
        tau_folds, tau_percentile: threshold calibration (5-fold CV, 97th percentile).
        window: intensity window for the images (see casam.model.preprocess.apply_window).
        head_steps: optimiser steps of the institution's refinement head (casam.model.head), trained after the layer
            on the layer's answers (:data:`HEAD_STEPS`); 0 trains none.
        head_lr, head_crop, head_batch_size: its Adam learning rate (peak, after a short warm-up, decaying on a
            cosine), crop side and crops per step.
        head_norm: the head's U-Net normalises its features (GroupNorm; :class:`casam.model.head.RefineHead`): it
            learns in fewer steps and does not stall on an all-background answer early in training.
        head_clicks: the head reads the interaction's clicks (:class:`casam.model.head.RefineHead`), trained on
            simulated click sequences of up to :data:`HEAD_SIM_CLICKS` corrective clicks; False: a head that answers
            the first prompt alone (corrective clicks edit SAM's answer, :func:`casam.model.head.keep_click_edits`).
    """

    epochs: int = 24
    batch_size: int = 6
    lr: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.2
    max_images: Optional[int] = None
    box_prob: float = 1.0
    gate_lr: float = 1e-2
    select_best: bool = True
    jitter: float = 5.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    vae_epochs: int = VAE_EPOCHS
    vae_lr: float = 5e-4
    vae_batch_size: int = 6
    vae_beta: float = VAE_BETA
    tau_folds: int = TAU_FOLDS
    tau_percentile: float = TAU_PERCENTILE
    window: Window = "auto"
    head_steps: int = HEAD_STEPS
    head_lr: float = 1.5e-3
    head_crop: int = 160
    head_batch_size: int = 8
    head_clicks: bool = True
    head_norm: bool = True

    def to_dict(self) -> dict:
        """Returns the settings as a plain dict (stored with every layer as its ``train_config``)."""
        return asdict(self)
