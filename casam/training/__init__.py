"""Training an institution's Alignment Layer, router entry and refinement head, offline or online.

Modules:
    config: :class:`TrainConfig`, the settings of one layer's training (defaults: CA-SAM's recipe).
    losses: the layer's loss (focal + Dice + IoU-prediction MSE).
    fit: the fit loop with best-epoch selection, and validation per prompt type.
    head: the refinement head's training and the evidence for its click edits.
    layer: :func:`train_layer`, one institution's layer, head and router entry into a registry, with the gate's
        evidence.
    online: the app's continual training from saved labels (plan, load, monitor, train).
"""

from __future__ import annotations

from casam.training.config import TrainConfig
from casam.training.fit import fit, validate
from casam.training.head import (
    HeadConfig,
    HeadExample,
    click_edit_evidence,
    fit_head,
    head_loss,
    to_head_resolution,
    train_head,
)
from casam.training.layer import fit_router, split_by_patient, split_samples, train_layer
from casam.training.losses import casam_loss, dice_loss, focal_loss
from casam.training.online import (
    LabelledItem,
    Plan,
    TrainingMonitor,
    TrainingStopped,
    label_slices,
    load_items,
    plan,
    train_institution,
)
