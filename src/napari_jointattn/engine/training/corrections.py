"""The user's corrections: where they changed the model's labels, and what a new model changes.

Both work on plain arrays (no napari): :func:`correction_weights` gives the
per-pixel loss weights of *Weight my corrections*; :func:`label_changes` is
the before/after map of *Compare before/after*.
"""

from __future__ import annotations

import numpy as np

#: values of :func:`label_changes`
UNCHANGED, ONLY_AFTER, ONLY_BEFORE = 0, 1, 2


def correction_weights(labels: np.ndarray, prediction: np.ndarray | None, extra: float) -> np.ndarray | None:
    """Loss weights: ``1 + extra`` where the labels' foreground differs from the model's prediction.

    Returns None (no weighting) when ``extra`` is not positive or there is no
    prediction of the labels' shape. Unannotated pixels are masked by the
    labels themselves, so only the foreground/background decision counts here.
    """
    if extra <= 0 or prediction is None or np.shape(prediction) != np.shape(labels):
        return None
    weights = np.ones(np.shape(labels), np.float32)
    weights[(np.asarray(prediction) > 0) != (np.asarray(labels) > 0)] = 1.0 + float(extra)
    return weights


def label_changes(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """uint8 map: :data:`ONLY_AFTER` (1) where only ``after`` has foreground,
    :data:`ONLY_BEFORE` (2) where only ``before`` has, :data:`UNCHANGED` (0) elsewhere."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} differ in shape")
    diff = np.zeros(before.shape, np.uint8)
    diff[(after > 0) & (before == 0)] = ONLY_AFTER
    diff[(after == 0) & (before > 0)] = ONLY_BEFORE
    return diff
