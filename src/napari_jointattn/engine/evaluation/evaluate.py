"""Scoring a model against reference labels."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from ..checks import check_axis, to_array
from ..errors import BadInputError
from ..inference.segment import Callback, segment
from ..io.images import ImageFile, read_image, read_labels
from ..labels import to_classes
from ..models.model import Model, load_model
from .metrics import confusion, hd95, instance_ids, match_instances, overlap_scores


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 6)


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def evaluate(
    model: Model | str | os.PathLike,
    images: Sequence,
    labels: Sequence,
    *,
    device: str = "auto",
    tile: int = 512,
    axis: int | None = None,
    callback: Callback | None = None,
    knockout: bool = False,
) -> dict:
    """Segment each image and score it against its labels (the label rule of :mod:`.labels`).

    Returns a JSON-ready dict: per-class Dice, IoU, precision, recall and
    HD95 (pixels; mean over images), their means over the foreground
    classes, and for instance models the instance F1 at IoU >= 0.5
    (2-D slices matched separately). ``knockout``: also ``"knockout"``, the
    images segmented again with each attention module (and all of them)
    knocked out: fraction of pixels whose class changes, and the Dice change
    (:mod:`.knockout`).
    """
    model = load_model(model)
    axis = check_axis(axis)
    if len(images) != len(labels):
        raise BadInputError(f"{len(images)} images but {len(labels)} label images")
    if not images:
        raise BadInputError("nothing to evaluate: give at least one image and its labels")
    k = model.num_classes
    conf = np.zeros((k, k), dtype=np.int64)
    hd = {c: [] for c in range(1, k)}
    tp = fp = fn = 0
    seen: list[tuple] = []  # (image, truth classes, predicted classes) for the knock-out
    for image, label in zip(images, labels):
        img = read_image(image) if isinstance(image, (str, os.PathLike)) else image
        if isinstance(img, ImageFile) and img.time_axis is not None:
            raise BadInputError(f"{img.path.name} is a time series of {img.time_points} volumes; "
                                "evaluate takes 2-D images and 3-D volumes (one volume per file)")
        truth = read_labels(label) if isinstance(label, (str, os.PathLike)) else to_array(label, "labels")
        result = segment(img, model, device=device, tile=tile, axis=axis, callback=callback)
        shape = result.labels.shape
        if truth.shape != shape:
            name = getattr(img, "path", None)
            where = f" for {name.name}" if name is not None else ""
            raise BadInputError(f"labels{where} have shape {truth.shape}, the image {shape}")
        truth_cls = to_classes(truth, k)
        pred_cls = to_classes(result.labels, k) if model.instances else result.labels
        conf += confusion(pred_cls, truth_cls, k)
        if knockout:
            seen.append((img, truth_cls, pred_cls))
        for c in range(1, k):
            hd[c].append(hd95(pred_cls == c, truth_cls == c))
        if model.instances:
            if truth.ndim == 2:
                planes = [(result.labels, truth)]
            else:
                ax = (img.default_axis if isinstance(img, ImageFile) else 0) if axis is None else axis
                planes = list(zip(np.moveaxis(result.labels, ax, 0), np.moveaxis(truth, ax, 0)))
            for p, t in planes:
                a, b, c_ = match_instances(p, instance_ids(t))
                tp, fp, fn = tp + a, fp + b, fn + c_
    scores = overlap_scores(conf)
    per_class = {}
    for c in range(1, k):
        per_class[model.classes[c]] = {
            "dice": _nan_to_none(scores["dice"][c]),
            "iou": _nan_to_none(scores["iou"][c]),
            "precision": _nan_to_none(scores["precision"][c]),
            "recall": _nan_to_none(scores["recall"][c]),
            "hd95": _nan_to_none(_mean(hd[c])),
        }
    fg = range(1, k)
    out = {
        "model": model.name,
        "images": len(images),
        "per_class": per_class,
        "mean_dice": _nan_to_none(_mean(scores["dice"][c] for c in fg)),
        "mean_iou": _nan_to_none(_mean(scores["iou"][c] for c in fg)),
        "precision": _nan_to_none(_mean(scores["precision"][c] for c in fg)),
        "recall": _nan_to_none(_mean(scores["recall"][c] for c in fg)),
        "hd95": _nan_to_none(_mean(_mean(hd[c]) for c in fg)),
    }
    if model.instances:
        f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else float("nan")
        out["instance_f1"] = _nan_to_none(f1)
        out["instances"] = {"tp": tp, "fp": fp, "fn": fn, "iou_threshold": 0.5}
    if knockout:
        from .knockout import knockout_from

        def predict() -> np.ndarray:
            preds = []
            for img, _, _ in seen:
                lab = segment(img, model, device=device, tile=tile, axis=axis).labels
                preds.append((to_classes(lab, k) if model.instances else lab).ravel())
            return np.concatenate(preds)

        out["knockout"] = knockout_from(predict, model, np.concatenate([t.ravel() for _, t, _ in seen]),
                                        base=np.concatenate([p.ravel() for _, _, p in seen]))
    return out
