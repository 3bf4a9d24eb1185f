"""From per-pixel predictions to label images (semantic or instance)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def argmax_labels(probs: np.ndarray, band: int = 512) -> np.ndarray:
    """(K, H, W) scores -> (H, W) uint8 class ids, in row bands to bound memory."""
    k, h, w = probs.shape
    out = np.empty((h, w), dtype=np.uint8)
    for r in range(0, h, band):
        out[r : r + band] = np.argmax(probs[:, r : r + band], axis=0)
    return out


def split_instances(
    mask: np.ndarray,
    min_distance: int = 3,
    min_size: int = 15,
    distance: np.ndarray | None = None,
) -> np.ndarray:
    """Split a foreground mask into instances (distance-transform watershed).

    ``distance`` may be a predicted distance map; otherwise the Euclidean
    distance to the background is used. Seeds are local maxima at least
    ``min_distance`` pixels apart; objects under ``min_size`` pixels are
    dropped. Returns int32 ids 1..n.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    if distance is None:
        distance = ndi.distance_transform_edt(mask).astype(np.float32)
        distance = ndi.gaussian_filter(distance, 1.0)
    else:
        distance = np.asarray(distance, dtype=np.float32)
    components, _ = ndi.label(mask)
    peaks = peak_local_max(
        distance, min_distance=max(1, int(min_distance)), labels=components, exclude_border=False
    )
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # components without a peak (tiny or flat) still get a seed of their own
    seeded = np.unique(components[markers > 0])
    unseeded = np.setdiff1d(np.arange(1, components.max() + 1), seeded)
    if unseeded.size:
        extra = np.isin(components, unseeded)
        markers[extra] = components[extra] + len(peaks)
    labels = watershed(-distance, markers, mask=mask)
    return relabel_sequential(remove_small(labels, min_size))


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]
