"""Scoring a prompt on labelled images: metrics, samples, predictions and the click-sequence protocol."""

from __future__ import annotations

from casam.scoring.metrics import boundary_iou, continual_summary, dice, iou
from casam.scoring.protocol import click_sequence, next_click, summarise
from casam.scoring.samples import EmbeddingCache, Sample, Target, make_samples
from casam.scoring.score import (
    aggregate,
    click_logits,
    head_of,
    mask_metrics,
    mask_prompts,
    mask_scores,
    mean_iou,
    predict_sample,
    raw_click,
    raw_click_logits,
    sample_logits,
    score_image,
    sequences,
)
