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
    BOX,
    CLICK,
    PROMPT_TYPES,
    SlicePrompts,
    binary_masks,
    central_pixels,
    centroid_point,
    jittered_box,
    tight_box,
    voxel_prompts,
)
