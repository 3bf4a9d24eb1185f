"""The training/validation split: leak-free, and always something to measure.

Rule: every foreground class present in the annotations is present on both
sides of the split. Splits are tried in this order and the first that meets
the rule is used (``Split.kind`` names it):

1. ``images``   several annotated images: whole images are held out.
2. ``slices``   one stack with several annotated slices: a block of slices is
   held out, and the ``GAP_SLICES`` slices next to it are used by neither side.
   The last block first; with at most ``FEW_SLICES`` annotated slices an interior
   one (whose gap drops no annotated slice), so that the first and the last
   annotated slices train.
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
FEW_SLICES = 4
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


SPLITS = ("auto", "images", "slices", "objects", "strip")


def split_samples(samples, val_fraction: float, num_classes: int, kind: str = "auto") -> Split:
    """Split in place; ``kind`` "auto" tries the splits in the order above, another
    name tries only that one (and falls back to ``training`` with its warning)."""
    if kind not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {kind!r}")
    annotated = [s.train_mask.copy() for s in samples]
    wanted = fg_classes(samples, "train", num_classes)

    def reset() -> None:
        for s, a in zip(samples, annotated):
            s.train_mask, s.val_mask = a.copy(), np.zeros_like(a)

    attempts = {"images": _by_images, "slices": _by_slices, "objects": _by_objects, "strip": _by_strip}
    for name, attempt in attempts.items():
        if kind not in ("auto", name) or (kind == "auto" and name == "objects"):
            continue
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
    last = len(zs) - n_val
    starts = list(range(last, -1, -1))  # the last block first
    if len(zs) <= FEW_SLICES:
        # a few slices: an interior one first, the most central first, so that the first and
        # the last annotated slices train and the slices beyond them are predicted from an
        # annotated neighbour (blocks whose gap would drop an annotated slice come last)
        def lost(i: int) -> int:
            lo, hi = zs[i], zs[i + n_val - 1]
            return sum(1 for z in zs if lo - GAP_SLICES <= z < lo or hi < z <= hi + GAP_SLICES)

        starts.sort(key=lambda i: (lost(i), i in (0, last), abs(i - last / 2)))
    for start in starts:
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


def _by_objects(samples, annotated, val_fraction, wanted, k) -> Split | None:
    """Hold out whole objects from planes that keep another object of the class for training.

    Objects are the connected components (8-neighbourhood) of each class in each
    plane. Each plane is cut into cells, a pixel belonging to its nearest object;
    the cells of held-out objects validate (their background too, so that false
    positives count), the others train, and a band ``GAP_PIXELS`` wide along the
    border between the two is used by neither. Object pixels are never dropped.
    Objects are taken in turns from the planes (the last plane first), the largest
    remaining first, until ``val_fraction`` of the class's pixels is held out.
    """
    from scipy import ndimage as ndi

    if len(samples) < 2 or len({s.source for s in samples}) != 1:
        return None
    eight = np.ones((3, 3), bool)
    # per plane and class: the component label image and each component's size (index 0 unused)
    comps = []
    for s, a in zip(samples, annotated):
        plane = {}
        for c in wanted:
            lab, n = ndi.label((s.target == c) & a, eight)
            plane[c] = (lab, np.bincount(lab.ravel(), minlength=n + 1))
        comps.append(plane)
    held = [{c: set() for c in wanted} for _ in samples]  # component ids held out
    order = sorted(range(len(samples)), key=lambda i: samples[i].index, reverse=True)
    for c in sorted(wanted):
        goal = val_fraction * sum(int(plane[c][1][1:].sum()) for plane in comps)
        got, took = 0, True
        while got < goal and took:
            took = False
            for p in order:
                sizes = comps[p][c][1]
                left = [i for i in range(1, len(sizes)) if i not in held[p][c]]
                if len(left) < 2 or got >= goal:
                    continue  # a plane keeps at least one object of the class for training
                i = max(left, key=lambda j: sizes[j])
                held[p][c].add(i)
                got += int(sizes[i])
                took = True
        if got == 0:
            return None
    for s, a, plane, h in zip(samples, annotated, comps, held):
        if not any(h.values()):
            s.train_mask, s.val_mask = a.copy(), np.zeros_like(a)
            continue
        val_obj, train_obj = np.zeros_like(a), np.zeros_like(a)
        for c, (lab, _) in plane.items():
            out = np.isin(lab, list(h[c]))
            val_obj |= out
            train_obj |= (lab > 0) & ~out
        val_cell = ndi.distance_transform_edt(~val_obj) < (
            ndi.distance_transform_edt(~train_obj) if train_obj.any() else np.inf)
        half = GAP_PIXELS / 2  # each side keeps this far from the other's cell
        s.val_mask = a & ((val_cell & (ndi.distance_transform_edt(val_cell) > half)) | val_obj)
        s.train_mask = a & ((~val_cell & (ndi.distance_transform_edt(~val_cell) > half)) | train_obj)
        s.train_mask &= ~s.val_mask
    if not _covers(samples, wanted, k):
        return None
    n_obj = sum(len(ids) for h in held for ids in h.values())
    planes = [s.index for s, h in zip(samples, held) if any(h.values())]
    return Split("objects", f"by objects: {n_obj} whole objects on slice{'s' if len(planes) > 1 else ''} "
                            f"{', '.join(map(str, planes))} for validation (with their surroundings), gap "
                            f"{GAP_PIXELS} px")


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

