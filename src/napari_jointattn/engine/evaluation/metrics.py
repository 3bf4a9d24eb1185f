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
    """95th-percentile symmetric Hausdorff distance between two masks (MONAI's definition).

    The larger of the two directed 95th percentiles of edge-to-edge distances,
    as ``monai.metrics.compute_hausdorff_distance(..., percentile=95)`` gives,
    computed with MONAI's edge and surface-distance functions called without
    deprecated arguments. NaN when either mask is empty.
    """
    import torch
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if not pred.any() or not truth.any():
        return float("nan")
    edges_pred, edges_truth = get_mask_edges(torch.from_numpy(pred), torch.from_numpy(truth), crop=True)
    directed = [
        torch.as_tensor(get_surface_distance(a, b, "euclidean", spacing), dtype=torch.float)
        for a, b in ((edges_pred, edges_truth), (edges_truth, edges_pred))
    ]
    return float(max(torch.quantile(d, 0.95) for d in directed))


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids as 1..n in id order (0 stays background), and n: any id range costs what n costs."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.ravel().astype(np.int64, copy=False)
    if ids[0] != 0:  # no background pixel
        inverse += 1
    return inverse, int(np.count_nonzero(ids))


#: tie components larger than this (objects per side) use a sparse maximum matching
#: (the same count as the Hungarian method) instead of a dense cost matrix
_DENSE_LIMIT = 2048


def _max_matching(rows: np.ndarray, cols: np.ndarray) -> int:
    """Size of a maximum one-to-one matching among candidate pairs (Hungarian, per component)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components, maximum_bipartite_matching

    r_ids, r = np.unique(rows, return_inverse=True)
    c_ids, c = np.unique(cols, return_inverse=True)
    nr, nc = len(r_ids), len(c_ids)
    graph = coo_array((np.ones(len(r)), (r, nr + c)), shape=(nr + nc, nr + nc))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[r]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    matched = 0
    for edges in np.split(order, bounds):
        er, ec = r[edges], c[edges]
        ur, rr = np.unique(er, return_inverse=True)
        uc, cc = np.unique(ec, return_inverse=True)
        if len(edges) == 1:
            matched += 1
        elif max(len(ur), len(uc)) <= _DENSE_LIMIT:
            gain = np.zeros((len(ur), len(uc)))
            gain[rr, cc] = 1.0
            i, j = linear_sum_assignment(gain, maximize=True)
            matched += int(gain[i, j].sum())
        else:
            sub = coo_array((np.ones(len(edges)), (rr, cc)), shape=(len(ur), len(uc))).tocsr()
            matched += int((maximum_bipartite_matching(sub, perm_type="column") >= 0).sum())
    return matched


def match_instances(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int]:
    """(TP, FP, FN) of one-to-one instance matching at IoU >= threshold.

    Pairs come from scikit-image's contingency table (only objects that
    overlap, so memory grows with the number of pixels, not with truth x
    predicted objects: a million distinct ids cost what a million pixels
    cost). Above 0.5 each object has at most one partner; at exactly 0.5 an
    object can tie with two, and the Hungarian method
    (``scipy.optimize.linear_sum_assignment``) picks the largest set of
    pairs in which every object is used once.
    """
    from skimage.metrics import contingency_table

    if threshold < 0.5:  # pragma: no cover - only >= 0.5 is used
        raise ValueError("threshold must be >= 0.5")
    p_lab, n_p = _compact(np.asarray(pred).ravel())
    t_lab, n_t = _compact(np.asarray(truth).ravel())
    table = contingency_table(t_lab, p_lab, ignore_labels=[0], sparse_type="array").tocoo()
    ti, pi, inter = table.row, table.col, table.data
    keep = (pi > 0) & (inter > 0)
    ti, pi, inter = ti[keep], pi[keep], inter[keep]
    t_area = np.bincount(t_lab, minlength=n_t + 1)
    p_area = np.bincount(p_lab, minlength=n_p + 1)
    iou = inter / (t_area[ti] + p_area[pi] - inter)
    ti, pi = ti[iou >= threshold], pi[iou >= threshold]
    # pairs whose two objects have no other candidate match directly
    alone = (np.bincount(ti)[ti] == 1) & (np.bincount(pi)[pi] == 1)
    tp = int(alone.sum())
    if not alone.all():
        tp += _max_matching(ti[~alone], pi[~alone])
    return tp, n_p - tp, n_t - tp


def instance_ids(labels: np.ndarray) -> np.ndarray:
    """Instance ids as given, or connected components of a binary mask."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    if len(ids) <= 2:
        return ndi.label(labels != 0)[0]
    return labels
