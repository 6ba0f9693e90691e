"""Losses of the Alignment Layer's training: focal + Dice + IoU-prediction MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Sigmoid focal loss (mean over pixels)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    a = alpha * target + (1 - alpha) * (1 - target)
    return (a * (1 - pt).pow(gamma) * ce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per mask, averaged."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def casam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float = 0.25) -> torch.Tensor:
    """CA-SAM's loss: focal + Dice + MSE(predicted IoU, actual IoU of the thresholded prediction).

    Args:
        logits: K×1×L×L mask logits.
        iou_pred: K×1 predicted IoUs.
        target: K×1×L×L 0/1 masks.
        gamma, alpha: focal loss settings.

    Returns:
        The scalar loss.
    """
    with torch.no_grad():
        pred = logits > 0
        inter = (pred & (target > 0)).flatten(1).sum(1).float()
        union = (pred | (target > 0)).flatten(1).sum(1).float()
        actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return focal_loss(logits, target, gamma, alpha) + dice_loss(logits, target) + F.mse_loss(iou_pred[:, 0], actual)
