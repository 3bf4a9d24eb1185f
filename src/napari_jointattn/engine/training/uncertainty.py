"""Where to annotate next: how unsure the model is, pixel by pixel and region by region.

:func:`entropy` turns class probabilities into an uncertainty map in [0, 1]
(the softmax entropy divided by its maximum, log K); :func:`disagreement`
compares two predictions of the same pixels (the joint modules' point-wise
and self-attention branches run alone: ``LiveTrainer.disagreement``), also in
[0, 1]. docs/results.md compares the two as guides. :func:`rank_regions`
ranks square windows of a 2-D map or a stack by their mean uncertainty,
skipping windows that are already annotated, without overlaps: the first is
where the *Next* button of the Fine-tune dock goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError


def entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """Normalised softmax entropy: 0 where one class has all the probability, 1 where all are equal."""
    p = np.clip(np.asarray(probs, np.float32), 1e-7, 1.0)
    k = p.shape[axis]
    if k < 2:
        raise BadInputError("uncertainty needs probabilities of at least two classes")
    return (-(p * np.log(p)).sum(axis) / np.log(k)).astype(np.float32)


def disagreement(probs_a: np.ndarray, probs_b: np.ndarray, axis: int = 0) -> np.ndarray:
    """Total variation between two class-probability maps: 0 where they agree, 1 where disjoint."""
    a = np.asarray(probs_a, np.float32)
    b = np.asarray(probs_b, np.float32)
    if a.shape != b.shape:
        raise BadInputError(f"the two probability maps differ in shape: {a.shape} and {b.shape}")
    if a.shape[axis] < 2:
        raise BadInputError("disagreement needs probabilities of at least two classes")
    return (0.5 * np.abs(a - b).sum(axis)).astype(np.float32)


@dataclass(frozen=True)
class Region:
    """A square window: plane ``z`` (0 for a 2-D map), rows ``y0:y1``, columns ``x0:x1``."""

    z: int
    y0: int
    x0: int
    y1: int
    x1: int
    score: float

    @property
    def centre(self) -> tuple[int, int, int]:
        return self.z, (self.y0 + self.y1) // 2, (self.x0 + self.x1) // 2


def _box_means(a: np.ndarray, size: int) -> np.ndarray:
    """Mean of ``a`` (H, W) over every size x size window, indexed by the window's top-left corner."""
    c = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.float64)
    c[1:, 1:] = np.cumsum(np.cumsum(a, 0), 1)
    return (c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]) / (size * size)


def rank_regions(uncertainty: np.ndarray, annotated: np.ndarray | None = None, window: int = 64,
                 count: int = 5, max_annotated: float = 0.1) -> list[Region]:
    """The ``count`` most uncertain windows, best first, not overlapping one another.

    ``uncertainty``: (H, W) or a stack (Z, H, W). ``annotated``: the same
    shape, True where labels exist; windows whose annotated fraction exceeds
    ``max_annotated`` are skipped (annotating there again teaches little).
    A plane smaller than ``window`` is one window.
    """
    u = np.asarray(uncertainty, np.float32)
    if u.ndim not in (2, 3):
        raise BadInputError(f"uncertainty must be 2-D or a stack of 2-D maps, got shape {u.shape}")
    stack = u if u.ndim == 3 else u[None]
    if annotated is None:
        ann = np.zeros(stack.shape, bool)
    else:
        ann = np.asarray(annotated, bool)
        if ann.shape != u.shape:
            raise BadInputError(f"annotated mask has shape {ann.shape}, the uncertainty {u.shape}")
        ann = ann if ann.ndim == 3 else ann[None]
    if window < 1 or count < 1:
        raise BadInputError("window and count must be positive")
    size = max(1, min(window, *stack.shape[1:]))
    candidates = []
    for z in range(stack.shape[0]):
        plane = np.nan_to_num(stack[z], nan=0.0)
        means = _box_means(plane, size)
        taken = _box_means(ann[z].astype(np.float32), size) > max_annotated
        means[taken] = -1.0
        candidates.append(means)
    regions: list[Region] = []
    blocked = [np.zeros(m.shape, bool) for m in candidates]
    while len(regions) < count:
        best = None
        for z, m in enumerate(candidates):
            masked = np.where(blocked[z], -1.0, m)
            i = int(np.argmax(masked))
            y, x = divmod(i, masked.shape[1])
            if masked[y, x] >= 0 and (best is None or masked[y, x] > best[0]):
                best = (float(masked[y, x]), z, y, x)
        if best is None:
            break
        score, z, y, x = best
        regions.append(Region(z, y, x, y + size, x + size, score))
        # no later window may overlap this one
        blocked[z][max(0, y - size + 1): y + size, max(0, x - size + 1): x + size] = True
    return regions
