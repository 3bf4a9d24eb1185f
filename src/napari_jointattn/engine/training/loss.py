"""The training loss: over annotated pixels only."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def masked_loss(logits, target, mask, weight, num_classes: int, dice_weight: float = 1.0,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice over annotated pixels.

    Both terms are functions of sums over the batch (the weighted
    cross-entropy and its weight, and per class the soft intersection, total
    and annotated count). ``reduce``, when given, maps the vector of those
    sums before they are combined: data-parallel training passes a
    differentiable all-reduce, so every process gets the loss of the global
    batch rather than of its shard.
    """
    c = num_classes
    logits = logits[:, :c].float()
    target = target.clamp_max(c - 1)
    ce = F.cross_entropy(logits, target, reduction="none")
    mw = mask.float() * weight
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(target, c).permute(0, 3, 1, 2).float()
    m = mask.float()[:, None]
    sums = torch.cat([(ce * mw).sum()[None], mw.sum()[None],
                      (prob * onehot * m).sum((0, 2, 3)), ((prob + onehot) * m).sum((0, 2, 3)),
                      onehot.mul(m).sum((0, 2, 3))])
    if reduce is not None:
        sums = reduce(sums)
    ce = sums[0] / sums[1].clamp_min(1.0)
    inter, total, present = sums[2:2 + c], sums[2 + c:2 + 2 * c], sums[2 + 2 * c:] > 0
    dice = (2 * inter + 1) / (total + 1)
    fg = present.clone()
    fg[0] = False
    dice_loss = (1 - dice[fg]).mean() if fg.any() else logits.new_zeros(())
    return ce + dice_weight * dice_loss
