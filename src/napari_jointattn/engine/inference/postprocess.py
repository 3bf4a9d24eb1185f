"""From per-pixel predictions to label images (semantic or instance)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
from scipy import ndimage as ndi


def argmax_labels(probs: np.ndarray, band: int = 512) -> np.ndarray:
    """(K, H, W) scores -> (H, W) uint8 class ids, in row bands to bound memory."""
    _, h, w = probs.shape
    out = np.empty((h, w), dtype=np.uint8)
    for r in range(0, h, band):
        out[r : r + band] = np.argmax(probs[:, r : r + band], axis=0)
    return out


def classify(probs: np.ndarray, postprocess) -> np.ndarray:
    """(K, ...) class probabilities -> (...) uint8 class ids.

    Two-class models with a calibrated ``threshold`` in their post-processing
    settings: foreground where its probability exceeds it; otherwise argmax
    (in row bands for (K, H, W) planes).
    """
    thr = postprocess.get("threshold")
    if probs.shape[0] == 2 and thr is not None:
        return (probs[1] > thr).astype(np.uint8)
    if probs.ndim == 3:
        return argmax_labels(probs)
    return np.argmax(probs, axis=0).astype(np.uint8)


def split_instances(mask: np.ndarray, min_distance: int = 3, min_size: int = 15) -> np.ndarray:
    """Split a foreground mask into instances (distance-transform watershed).

    Seeds are local maxima of the smoothed Euclidean distance to the
    background at least ``min_distance`` pixels apart; objects under
    ``min_size`` pixels are dropped. Returns int32 ids 1..n.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    distance = ndi.distance_transform_edt(mask).astype(np.float32)
    distance = ndi.gaussian_filter(distance, 1.0)
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
    """Objects of fewer than ``min_size`` pixels set to 0 (scikit-image)."""
    from skimage.morphology import remove_small_objects

    if min_size <= 1 or labels.max() == 0:
        return labels
    # scikit-image 0.26 renamed min_size (removes < n) to max_size (removes <= n)
    size = {"max_size": min_size - 1} if _has_max_size() else {"min_size": min_size}
    with warnings.catch_warnings():  # "only one label": one object is a valid label image here
        warnings.filterwarnings("ignore", message="Only one label", category=UserWarning)
        return remove_small_objects(labels, **size)


@functools.cache
def _has_max_size() -> bool:
    import inspect

    from skimage.morphology import remove_small_objects

    return "max_size" in inspect.signature(remove_small_objects).parameters


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Ids 1..n in the order of the old ids, int32 (scikit-image)."""
    from skimage.segmentation import relabel_sequential as relabel

    return relabel(labels)[0].astype(np.int32, copy=False)
