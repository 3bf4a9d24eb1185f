"""The learning-rate schedule."""

from __future__ import annotations

import math

from .settings import TrainSettings

#: parameters never decayed: attention's residual scale and mixing weights start at (or near) the
#: identity and must be free to grow; weight decay would pull every module back to "off"
NO_DECAY = ("gamma", ".mix.")


def optimizer(net, settings: TrainSettings):
    """AdamW with ``settings.weight_decay`` on every parameter except :data:`NO_DECAY` ones."""
    import torch

    def free(name: str) -> bool:
        return any(part in f".{name}." for part in (".gamma.", *NO_DECAY[1:]))

    named = list(net.named_parameters())
    decayed = [p for n, p in named if not free(n)]
    free = [p for n, p in named if free(n)]
    groups = [{"params": decayed, "weight_decay": settings.weight_decay}]
    if free:
        groups.append({"params": free, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=settings.lr)


def learning_rate(settings: TrainSettings, step_fraction: float, elapsed: float) -> float:
    """The rate of the step ``step_fraction`` of the way through the run, ``elapsed`` seconds in.

    A warm-up over the first 20 steps, then cosine decay to 5 % of ``settings.lr`` over
    whichever budget runs out first: the steps, or ``settings.max_seconds``.
    """
    progress = step_fraction
    if settings.max_seconds:
        progress = max(progress, elapsed / settings.max_seconds)
    progress = min(progress, 1.0)
    warm = min(1.0, step_fraction * settings.epochs * settings.steps_per_epoch / 20)
    return settings.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
