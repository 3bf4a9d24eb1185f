"""The training/validation split: leak-free, and always something to measure.

Rule: every foreground class present in the annotations is present on both
sides of the split. Splits are tried in this order and the first that meets
the rule is used (``Split.kind`` names it):

1. ``images``   several annotated images: whole images are held out.
2. ``slices``   one stack with several annotated slices: a block of slices is
   held out, and the ``GAP_SLICES`` slices next to it are used by neither side.
3. ``strip``    a strip of each plane is held out, with an unused margin of
   ``GAP_PIXELS`` between the sides. First the right-hand ``val_fraction`` of
   the columns; if a class is then missing on one side, the strip is cut
   through that class's annotated pixels (columns or rows, from either side)
   so that part of every object class is held out (a held-out part of a single
   object, when there is only one). The margin shrinks down to
   ``MIN_GAP_PIXELS`` for structures too small for the full margin.
4. ``training`` no split meets the rule (for example a class annotated on a
   handful of pixels): the training annotations themselves are scored, and
   ``Split.warning`` says that this selection is optimistic.

Operates in place on objects with ``target``, ``train_mask`` (the annotated
pixels on entry), ``val_mask``, ``source`` and ``index`` attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAP_SLICES = 2
GAP_PIXELS = 16
MIN_GAP_PIXELS = 2


@dataclass
class Split:
    kind: str
    description: str
    warning: str | None = None


def fg_classes(samples, side: str, num_classes: int) -> set[int]:
    """Foreground classes with at least one pixel on ``side`` ("train" or "val")."""
    found: set[int] = set()
    for s in samples:
        m = getattr(s, f"{side}_mask")
        if m.any():
            found.update(int(c) for c in np.unique(s.target[m]) if 0 < c < num_classes)
    return found


def _covers(samples, wanted: set[int], num_classes: int) -> bool:
    return (fg_classes(samples, "train", num_classes) >= wanted
            and fg_classes(samples, "val", num_classes) >= wanted)


def split_samples(samples, val_fraction: float, num_classes: int) -> Split:
    annotated = [s.train_mask.copy() for s in samples]
    wanted = fg_classes(samples, "train", num_classes)

    def reset() -> None:
        for s, a in zip(samples, annotated):
            s.train_mask, s.val_mask = a.copy(), np.zeros_like(a)

    for attempt in (_by_images, _by_slices, _by_strip):
        reset()
        split = attempt(samples, annotated, val_fraction, wanted, num_classes)
        if split is not None:
            return split
    reset()
    for s in samples:
        s.val_mask = s.train_mask.copy()
    names = "every annotated class" if len(wanted) > 1 else "the annotated class"
    return Split(
        "training",
        "none held out: the training annotations are scored",
        f"no validation split keeps {names} on both sides: the best weights are chosen by Dice on the "
        "training annotations, which is optimistic. Annotate more (another slice, image or object) "
        "for an honest validation score.",
    )


def _by_images(samples, annotated, val_fraction, wanted, k) -> Split | None:
    sources = sorted({s.source for s in samples})
    if len(sources) < 2:
        return None
    n_val = max(1, round(val_fraction * len(sources)))
    for start in range(len(sources) - n_val, -1, -1):  # the last images first
        held = set(sources[start : start + n_val])
        for s, a in zip(samples, annotated):
            val = s.source in held
            s.train_mask = np.zeros_like(a) if val else a.copy()
            s.val_mask = a.copy() if val else np.zeros_like(a)
        if _covers(samples, wanted, k):
            return Split("images", f"by image: {n_val} of {len(sources)} images for validation")
    return None


def _by_slices(samples, annotated, val_fraction, wanted, k) -> Split | None:
    if len({s.source for s in samples}) != 1 or len(samples) < 2:
        return None
    zs = sorted(s.index for s in samples)
    n_val = max(1, round(val_fraction * len(zs)))
    for start in range(len(zs) - n_val, -1, -1):  # the last block first
        block = zs[start : start + n_val]
        lo, hi = block[0], block[-1]
        for s, a in zip(samples, annotated):
            val = lo <= s.index <= hi
            train = s.index < lo - GAP_SLICES or s.index > hi + GAP_SLICES
            s.val_mask = a.copy() if val else np.zeros_like(a)
            s.train_mask = a.copy() if train else np.zeros_like(a)
        if _covers(samples, wanted, k):
            where = f"slice {lo}" if lo == hi else f"slices {lo}-{hi}"
            return Split("slices", f"by slices: {n_val} of {len(zs)} annotated slices ({where}) for "
                                   f"validation, gap {GAP_SLICES}")
    return None


def _apply_cut(samples, annotated, axis: int, cut: int, val_high: bool, gap: int) -> None:
    """Hold out coordinates >= cut (val_high) or < cut along ``axis`` (0 rows, 1 columns)."""
    for s, a in zip(samples, annotated):
        n = a.shape[axis]
        coord = np.arange(n)
        val = coord >= cut if val_high else coord < cut
        train = coord < cut - gap if val_high else coord >= cut + gap
        shape = (n, 1) if axis == 0 else (1, n)
        s.val_mask = a & val.reshape(shape)
        s.train_mask = a & train.reshape(shape)


def _by_strip(samples, annotated, val_fraction, wanted, k) -> Split | None:
    # 1. the right-hand val_fraction of the columns of each image
    for s, a in zip(samples, annotated):
        w = a.shape[1]
        cut = int(round(w * (1 - val_fraction)))
        s.val_mask = a.copy()
        s.val_mask[:, :cut] = False
        s.train_mask = a.copy()
        s.train_mask[:, max(0, cut - GAP_PIXELS):] = False
    if _covers(samples, wanted, k):
        return Split("strip", f"by columns: the right {val_fraction:.0%} of each image, gap {GAP_PIXELS} px")

    # 2. a cut through the annotated pixels of each class, the rarest class first
    counts = {c: sum(int((s.target[a] == c).sum()) for s, a in zip(samples, annotated)) for c in wanted}
    where = {c: [np.nonzero((s.target == c) & a) for s, a in zip(samples, annotated)] for c in wanted}
    gap = GAP_PIXELS
    while gap >= MIN_GAP_PIXELS:
        for c in sorted(wanted, key=counts.get):
            for axis in (1, 0):
                coords = np.concatenate([yx[axis] for yx in where[c]])
                for val_high in (True, False):
                    q = 1 - val_fraction if val_high else val_fraction
                    cut = int(np.ceil(np.quantile(coords, q))) if val_high else int(np.floor(np.quantile(coords, q))) + 1
                    _apply_cut(samples, annotated, axis, cut, val_high, gap)
                    if _covers(samples, wanted, k):
                        what = "columns" if axis == 1 else "rows"
                        rel = ">=" if val_high else "<"
                        return Split("strip", f"by a strip through the annotated objects: {what} {rel} {cut} "
                                              f"of each plane for validation, gap {gap} px")
        gap //= 2
    return None

