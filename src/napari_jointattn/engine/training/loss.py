"""The training loss: over annotated pixels only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_loss(logits, target, mask, weight, num_classes: int, dice_weight: float = 1.0) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice over annotated pixels."""
    logits = logits[:, :num_classes].float()
    ce = F.cross_entropy(logits, target.clamp_max(num_classes - 1), reduction="none")
    mw = mask.float() * weight
    denom = mw.sum().clamp_min(1.0)
    ce = (ce * mw).sum() / denom
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(target.clamp_max(num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    m = mask.float()[:, None]
    inter = (prob * onehot * m).sum((0, 2, 3))
    total = ((prob + onehot) * m).sum((0, 2, 3))
    present = onehot.mul(m).sum((0, 2, 3)) > 0
    dice = (2 * inter + 1) / (total + 1)
    fg = present.clone()
    fg[0] = False
    dice_loss = (1 - dice[fg]).mean() if fg.any() else logits.new_zeros(())
    return ce + dice_weight * dice_loss
