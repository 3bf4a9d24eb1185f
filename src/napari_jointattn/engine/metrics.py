"""Segmentation metrics: overlap per class, HD95, and instance F1."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) pixel counts, rows = truth, cols = prediction."""
    idx = truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def overlap_scores(conf: np.ndarray) -> dict[str, list[float]]:
    """Dice, IoU, precision, recall per class from a confusion matrix (NaN when undefined)."""
    tp = np.diag(conf).astype(float)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
    return {k: [float(x) for x in v] for k, v in
            {"dice": dice, "iou": iou, "precision": precision, "recall": recall}.items()}


def hd95(pred: np.ndarray, truth: np.ndarray, spacing=None) -> float:
    """95th-percentile symmetric Hausdorff distance between two masks (MONAI).

    NaN when either mask is empty.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if not pred.any() or not truth.any():
        return float("nan")
    p = torch.from_numpy(pred)[None, None]
    t = torch.from_numpy(truth)[None, None]
    value = compute_hausdorff_distance(p, t, percentile=95, spacing=spacing)
    return float(value.item())


def match_instances(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int]:
    """(TP, FP, FN) of instance matching at IoU >= threshold (>= 0.5 makes matches unique)."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    t_ids, t_inv = np.unique(truth, return_inverse=True)
    counts = np.bincount(
        t_inv.ravel() * len(p_ids) + p_inv.ravel(), minlength=len(t_ids) * len(p_ids)
    ).reshape(len(t_ids), len(p_ids))
    t_fg = t_ids != 0
    p_fg = p_ids != 0
    inter = counts[np.ix_(t_fg, p_fg)].astype(float)
    t_area = counts[t_fg].sum(1)[:, None]
    p_area = counts[:, p_fg].sum(0)[None, :]
    union = t_area + p_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    if threshold >= 0.5:
        tp = int((iou >= threshold).any(axis=1).sum()) if iou.size else 0
        # strictly greater than 0.5 guarantees uniqueness; at exactly 0.5 count once
    else:  # pragma: no cover - only >= 0.5 is used
        raise ValueError("threshold must be >= 0.5")
    n_t, n_p = int(t_fg.sum()), int(p_fg.sum())
    return tp, n_p - tp, n_t - tp


def instance_ids(labels: np.ndarray) -> np.ndarray:
    """Instance ids as given, or connected components of a binary mask."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    if len(ids) <= 2:
        return ndi.label(labels != 0)[0]
    return labels
