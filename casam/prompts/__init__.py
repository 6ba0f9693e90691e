"""Prompts: boxes and points derived from masks, and clicks answered through box proposals."""

from __future__ import annotations

from casam.prompts.clicks import (
    ClickConfig,
    Proposals,
    agreement,
    click_depth,
    cut_background,
    decode_clicks,
    edit_boxes,
    fill_missed,
    fuse_proposals,
    local_masks,
    paired_iou,
    proposal_features,
    proposal_scores,
    propose,
    rechoose,
    soft_average,
)
from casam.prompts.masks import (
    SlicePrompts,
    binary_masks,
    central_pixels,
    centroid_point,
    jittered_box,
    random_central_point,
    tight_box,
    voxel_prompts,
)

__all__ = [
    'ClickConfig', 'paired_iou', 'cut_background', 'fill_missed', 'agreement', 'proposal_features',
    'Proposals', 'propose', 'proposal_scores', 'soft_average', 'fuse_proposals', 'click_depth',
    'rechoose', 'edit_boxes', 'local_masks', 'decode_clicks', 'binary_masks', 'tight_box',
    'jittered_box', 'central_pixels', 'centroid_point', 'random_central_point', 'SlicePrompts', 'voxel_prompts',
]
