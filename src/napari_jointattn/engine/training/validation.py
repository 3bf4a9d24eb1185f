"""Scoring the held-out pixels, and the two-class threshold."""

from __future__ import annotations

import numpy as np
import torch

from ..models.model import Model
from .data import Sample

MAX_VAL_PLANES = 24


def _held_out_predictions(model: Model, samples: list[Sample], device, side: str = "val"):
    """(class probabilities, reference classes) at the pixels of ``side``, plane by plane.

    At most ``MAX_VAL_PLANES`` planes, evenly spaced, so a validation stack of
    hundreds of slices does not eat the training time. Each plane is cropped
    to the bounding box of its ``side`` pixels before prediction.
    """
    from ..inference.segment import predict_slice

    k = model.num_classes
    planes = [s for s in samples if getattr(s, f"{side}_mask").any()]
    if len(planes) > MAX_VAL_PLANES:
        planes = [planes[i] for i in np.linspace(0, len(planes) - 1, MAX_VAL_PLANES).round().astype(int)]
    was_training = model.net.training
    model.net.eval()
    try:
        for s in planes:
            mask = getattr(s, f"{side}_mask")
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            with torch.no_grad():
                out = predict_slice(model, np.ascontiguousarray(s.image[:, y0:y1, x0:x1]), device, tile=512)
            m = mask[y0:y1, x0:x1]
            yield out[:k][:, torch.from_numpy(m)], s.target[y0:y1, x0:x1][m]
    finally:
        model.net.train(was_training)


def validation_dice(model: Model, samples: list[Sample], device: torch.device, side: str = "val") -> float:
    """Mean Dice over the foreground classes present in the reference pixels of ``side``.

    ``side`` is "val" (the validation pixels) or "train". Classes absent from
    the reference are not averaged (a prediction cannot score on them), so an
    empty reference gives NaN, never a Dice of 0.
    """
    from ..evaluation.metrics import confusion, overlap_scores

    k = model.num_classes
    conf = np.zeros((k, k), np.int64)
    for probs, truth in _held_out_predictions(model, samples, device, side):
        conf += confusion(classes_from_probs(model, probs), truth, k)
    dice = overlap_scores(conf)["dice"]
    present = [c for c in range(1, k) if conf[c].sum() > 0]  # rows: reference classes
    return float(np.mean([dice[c] for c in present])) if present else float("nan")


def classes_from_probs(model: Model, probs: torch.Tensor) -> np.ndarray:
    """Class per pixel (probs: classes first) as segment() decides it: argmax, or a threshold."""
    from ..inference.postprocess import classify

    return classify(probs.numpy(), model.postprocess).astype(np.int64)


THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(2, 20))  # 0.10 ... 0.95


def calibrate_threshold(model: Model, samples: list[Sample], device) -> tuple[float, float, float] | None:
    """The foreground probability threshold of a two-class model that maximises validation Dice.

    Returns (threshold, Dice at 0.5, Dice at the threshold), or None when the
    model has more than two classes or the validation pixels hold no
    foreground. Ties go to the threshold nearest 0.5.
    """
    if model.num_classes != 2:
        return None
    pairs = list(_held_out_predictions(model, samples, device))
    if not pairs:
        return None
    p = np.concatenate([probs[1].numpy() for probs, _ in pairs])
    t = np.concatenate([truth == 1 for _, truth in pairs])
    if not t.any():
        return None

    def dice(th: float) -> float:
        pred = p > th
        return float(2 * (pred & t).sum() / max(1, pred.sum() + t.sum()))

    scores = {th: dice(th) for th in THRESHOLDS}
    best = max(scores, key=lambda th: (round(scores[th], 6), -abs(th - 0.5)))
    return best, dice(0.5), scores[best]
