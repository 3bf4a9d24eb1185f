"""Annotated planes with leak-free training/validation masks (see ``..split``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..checks import check_axis, check_classes, to_array
from ..errors import BadInputError
from ..io.channels import prepare_channels
from ..io.images import ImageFile, read_image, read_labels
from ..io.normalize import normalize
from ..labels import to_classes
from ..models.model import Model
from .split import Split, split_samples


@dataclass
class Sample:
    """One 2-D training plane: normalised image (C, H, W), classes, masks, weights."""

    image: np.ndarray
    target: np.ndarray
    train_mask: np.ndarray
    val_mask: np.ndarray
    weight: np.ndarray | None
    source: int
    index: int


def _load(image, labels) -> tuple[np.ndarray, int | None, int, np.ndarray]:
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, ImageFile):
        if image.time_axis is not None:
            raise BadInputError(f"{image.path.name} is a time series of {image.time_points} volumes; "
                                "training takes 2-D images and 3-D volumes")
        (arr, ch), ax = image.channels_last(), image.default_axis
    else:
        arr, ch, ax = to_array(image), None, 0
    lab = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else to_array(labels, "labels")
    return arr, ch, ax, lab


def build_samples(
    model: Model,
    images: Sequence,
    labels: Sequence,
    masks: Sequence | None = None,
    weights: Sequence | None = None,
    axis: int | None = None,
    channel_axis: int | None = None,
    val_fraction: float | None = 0.2,
    split: str = "auto",
) -> tuple[list[Sample], dict]:
    """Annotated 2-D planes with leak-free train/validation masks, and a summary.

    ``val_fraction=None``: no validation part, every annotated pixel trains.
    ``split``: which split to make (``engine.training.split``; "auto" picks the first that works).
    """
    if len(images) != len(labels):
        raise BadInputError(f"{len(images)} images but {len(labels)} label images")
    if not images:
        raise BadInputError("no training data: give at least one image with labels")
    for name, extra in (("masks", masks), ("weights", weights)):
        if extra is not None and len(extra) != len(images):
            raise BadInputError(f"{len(extra)} {name} for {len(images)} images")
    axis = check_axis(axis)
    check_classes(model.classes)
    if masks is not None:
        masks = [None if m is None else to_array(m, f"mask {i + 1}") for i, m in enumerate(masks)]
    if weights is not None:
        checked = []
        for i, w in enumerate(weights):
            if w is not None:
                w = to_array(w, f"weight map {i + 1}")
                if w.dtype.kind == "f" and not np.isfinite(w).all():
                    raise BadInputError(f"weight map {i + 1} holds NaN or infinite values")
                if w.size and w.min() < 0:
                    raise BadInputError(f"weight map {i + 1} holds negative weights")
            checked.append(w)
        weights = checked
    k = model.num_classes
    pct = model.normalization.percentiles
    planes: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
    for i, (image, label) in enumerate(zip(images, labels)):
        arr, ch, default_ax, lab = _load(image, label)
        data = prepare_channels(arr, model.in_channels, channel_axis if channel_axis is not None else ch)
        spatial = data.shape[:-1]
        if lab.shape != spatial:
            raise BadInputError(f"labels of image {i + 1} have shape {lab.shape}, the image {spatial}")
        cls = to_classes(lab, k)
        mask = None if masks is None or masks[i] is None else np.asarray(masks[i], bool)
        wmap = None if weights is None or weights[i] is None else np.asarray(weights[i], np.float32)
        for name, extra in (("mask", mask), ("weight map", wmap)):
            if extra is not None and extra.shape != spatial:
                raise BadInputError(f"{name} of image {i + 1} has shape {extra.shape}, the image {spatial}")
        if len(spatial) == 3:
            ax = (default_ax if axis is None else axis) % 3
            data, cls = np.moveaxis(data, ax, 0), np.moveaxis(cls, ax, 0)
            lab = np.moveaxis(lab, ax, 0)
            mask = None if mask is None else np.moveaxis(mask, ax, 0)
            wmap = None if wmap is None else np.moveaxis(wmap, ax, 0)
            rng_ = model.normalization.volume_range(data)
        else:
            data, cls, lab = data[None], cls[None], lab[None]
            mask = None if mask is None else mask[None]
            wmap = None if wmap is None else wmap[None]
            rng_ = None
        for z in range(data.shape[0]):
            annotated = mask[z] if mask is not None else np.full(lab[z].shape, bool(lab[z].any()))
            if not annotated.any():
                continue
            plane = np.moveaxis(data[z], -1, 0)
            if plane.dtype.kind == "f" and not np.isfinite(plane).any():
                continue
            x, bad = normalize(plane, rng_, pct)
            if bad is not None:
                annotated = annotated & ~bad.any(0)
            planes.append((i, z, x, cls[z], annotated, None if wmap is None else wmap[z]))
    if not planes:
        raise BadInputError("no annotated pixels: paint some labels (0 everywhere counts as unannotated)")
    counts = np.zeros(k, dtype=np.int64)
    for *_, t, m, _w in planes:
        counts += np.bincount(t[m], minlength=k)[:k]
    if (counts[1:] == 0).all():
        raise BadInputError("the annotations contain no foreground class: label some objects first")
    if np.count_nonzero(counts) < 2:
        # a score on pixels of one class says nothing (predicting that class everywhere is perfect)
        only = model.classes[int(np.flatnonzero(counts)[0])]
        raise BadInputError(f"the annotations hold only one class ({only}): mark some background too "
                            "(erase, or paint label 0, where there is no object)")

    samples = [Sample(x, t, m.copy(), np.zeros_like(m), w, i, z) for i, z, x, t, m, w in planes]
    if val_fraction is None:  # every annotated pixel trains (the live loop)
        split = Split("none", "none: every annotated pixel trains", None)
    else:
        split = split_samples(samples, val_fraction, k, split)
    samples = [s for s in samples if s.train_mask.any() or s.val_mask.any()]
    n_train = int(sum(s.train_mask.sum() for s in samples))
    n_val = int(sum(s.val_mask.sum() for s in samples))
    if n_train == 0 or (n_val == 0 and val_fraction is not None):
        raise BadInputError("too little annotation to split into training and validation parts")
    summary = {
        "images": len({s.source for s in samples}),
        "planes": len(samples),
        "annotated_pixels": int(counts.sum()),
        "pixels_per_class": {model.classes[c]: int(counts[c]) for c in range(k)},
        "train_pixels": n_train,
        "val_pixels": n_val,
        "split": split.description,
        "split_kind": split.kind,
        "warnings": [split.warning] if split.warning else [],
    }
    return samples, summary


def annotation_summary(labels: Sequence[np.ndarray], num_classes: int, classes: Sequence[str],
                       spatial_dims: Sequence[int] | None = None) -> dict:
    """What the annotations contain, cheaply (no image data needed): for the docks.

    Returns annotated images and planes (2-D images, or slices along axis 0 of
    stacks), pixels per class, and a list of warnings (empty when training
    can go ahead).
    """
    counts = np.zeros(num_classes, np.int64)
    planes = images = 0
    warnings_: list[str] = []
    for i, lab in enumerate(labels):
        lab = np.asarray(lab)
        cls = to_classes(lab, num_classes)
        stack = lab.ndim == 3 if spatial_dims is None else spatial_dims[i] == 3
        per_plane = lab.reshape(lab.shape[0], -1).any(1) if stack else np.array([lab.any()])
        n = int(per_plane.sum())
        if n:
            images += 1
            planes += n
            sel = cls[per_plane] if stack else cls
            counts += np.bincount(sel.ravel(), minlength=num_classes)[:num_classes]
    if planes == 0:
        warnings_.append("no annotated pixels: paint some labels first")
    elif (counts[1:] == 0).all():
        warnings_.append("only background is annotated: label some objects")
    elif np.count_nonzero(counts) < 2:
        warnings_.append(f"only one class is annotated ({classes[int(np.flatnonzero(counts)[0])]}): "
                         "mark some background too")
    elif counts[1:].sum() < 200:
        warnings_.append(f"very little foreground ({int(counts[1:].sum())} pixels): results will be poor")
    elif planes < 2 and counts.sum() < 4096:
        warnings_.append("a single small annotated region: add more for a reliable validation split")
    return {
        "images": images,
        "planes": planes,
        "pixels_per_class": {classes[c]: int(counts[c]) for c in range(num_classes)},
        "warnings": warnings_,
    }
