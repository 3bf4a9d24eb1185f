"""The learning-rate schedule."""

from __future__ import annotations

import math

from .settings import TrainSettings


def _set_lr(opt, settings: TrainSettings, step_fraction: float, elapsed: float) -> None:
    """Short warm-up, then cosine decay over whichever budget runs out first."""
    progress = step_fraction
    if settings.max_seconds:
        progress = max(progress, elapsed / settings.max_seconds)
    progress = min(progress, 1.0)
    warm = min(1.0, step_fraction * settings.epochs * settings.steps_per_epoch / 20)
    lr = settings.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr
