"""Training an institution's Alignment Layer, router entry and refinement head, offline or online."""

from __future__ import annotations

from casam.training.config import TrainConfig
from casam.training.embeddings import EmbeddingCache
from casam.training.fit import evaluate, fit, validate
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

__all__ = [
    'TrainConfig', 'EmbeddingCache', 'validate', 'fit', 'evaluate', 'click_edit_evidence',
    'fit_head', 'HeadConfig', 'HeadExample', 'to_head_resolution', 'head_loss', 'train_head',
    'split_by_patient', 'fit_router', 'split_samples', 'train_layer', 'focal_loss', 'dice_loss',
    'casam_loss', 'LabelledItem', 'Plan', 'plan', 'label_slices', 'load_items',
    'TrainingStopped', 'TrainingMonitor', 'train_institution',
]
