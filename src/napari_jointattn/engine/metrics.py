"""Segmentation metrics: overlap per class, HD95, and instance F1."""

from __future__ import annotations

import warnings

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
    with warnings.catch_warnings():  # MONAI's deprecation notices about its own internals
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        value = compute_hausdorff_distance(p, t, percentile=95, spacing=spacing)
    return float(value.item())


def match_instances(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int]:
    """(TP, FP, FN) of instance matching at IoU >= threshold (>= 0.5 makes matches unique).

    Only pairs of objects that overlap are counted, so memory grows with the
    number of pixels, not with (truth objects x predicted objects): a million
    distinct ids cost what a million pixels cost.
    """
    if threshold < 0.5:  # pragma: no cover - only >= 0.5 is used
        raise ValueError("threshold must be >= 0.5")
    pred = np.asarray(pred).ravel()
    truth = np.asarray(truth).ravel()
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    t_ids, t_inv = np.unique(truth, return_inverse=True)
    p_inv = p_inv.ravel().astype(np.int64, copy=False)
    t_inv = t_inv.ravel().astype(np.int64, copy=False)
    p_area = np.bincount(p_inv, minlength=len(p_ids))
    t_area = np.bincount(t_inv, minlength=len(t_ids))
    t_fg = t_ids != 0
    p_fg = p_ids != 0
    both = t_fg[t_inv] & p_fg[p_inv]
    pairs, inter = np.unique(t_inv[both] * len(p_ids) + p_inv[both], return_counts=True)
    ti, pi = np.divmod(pairs, len(p_ids))
    union = t_area[ti] + p_area[pi] - inter
    iou = inter / np.maximum(union, 1)
    # strictly greater than 0.5 guarantees uniqueness; at exactly 0.5 count once
    tp = int(len(np.unique(ti[iou >= threshold])))
    n_t, n_p = int(t_fg.sum()), int(p_fg.sum())
    return tp, n_p - tp, n_t - tp


def instance_ids(labels: np.ndarray) -> np.ndarray:
    """Instance ids as given, or connected components of a binary mask."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    if len(ids) <= 2:
        return ndi.label(labels != 0)[0]
    return labels
