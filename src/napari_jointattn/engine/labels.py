"""The one label rule used for training and evaluation.

* Two-class models (``[background, X]``): any nonzero label id is X, so
  instance masks work directly as labels.
* Multi-class models: label values are class indices; a value outside
  ``0 .. K-1`` is bad input.
"""

from __future__ import annotations

import numpy as np

from .errors import BadInputError


def to_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer label image -> uint8 class ids under the rule above."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biuf":
        raise BadInputError(f"unsupported label type {labels.dtype}")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
            raise BadInputError("label values must be whole numbers")
    if num_classes == 2:
        return (labels != 0).astype(np.uint8)
    if labels.size and labels.min() < 0:
        raise BadInputError(f"label values must not be negative (found {labels.min()})")
    top = labels.max() if labels.size else 0
    if top >= num_classes:
        raise BadInputError(
            f"label value {int(top)} is not a class of this {num_classes}-class model "
            f"(values must be 0..{num_classes - 1})"
        )
    return labels.astype(np.uint8)
