"""Robust, percentile-based intensity normalisation (the one routine used everywhere)."""

from __future__ import annotations

import warnings

import numpy as np

from .errors import BadInputError

#: Percentiles mapped to 0 and 1.
DEFAULT_PERCENTILES = (1.0, 99.8)
#: At most this many pixels are sampled to estimate the percentiles.
SAMPLE = 1 << 22


def percentile_range(
    image: np.ndarray, low: float = DEFAULT_PERCENTILES[0], high: float = DEFAULT_PERCENTILES[1]
) -> tuple[float, float]:
    """(lo, hi) intensity percentiles of the finite pixels, estimated on a strided sample."""
    flat = np.asarray(image).reshape(-1)
    step = max(1, flat.size // SAMPLE)
    sample = flat[::step].astype(np.float64, copy=False)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        finite_any = np.isfinite(flat).any() if step > 1 else False
        if not finite_any:
            raise BadInputError("the image has no finite pixel (all NaN or infinite)")
        sample = flat[np.isfinite(flat)].astype(np.float64)
    lo, hi = np.percentile(sample, [low, high])
    return float(lo), float(hi)


def normalize(
    image: np.ndarray,
    value_range: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Map intensities so the given percentiles go to 0 and 1 (float32).

    Returns ``(normalised, nonfinite)`` where ``nonfinite`` is a boolean mask
    of NaN/inf pixels (set to 0 in the output and to be labelled background),
    or None when every pixel is finite. ``value_range`` reuses a (lo, hi)
    computed elsewhere, e.g. once for a whole volume.
    """
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    lo, hi = value_range if value_range is not None else percentile_range(image, *percentiles)
    # float64 input is scaled in float64: values beyond float32's range are
    # finite data, not NaN/inf
    work = np.float64 if image.dtype == np.float64 else np.float32
    out = image.astype(work)
    nonfinite = None
    if image.dtype.kind == "f":
        bad = ~np.isfinite(out)
        if bad.any():
            if bad.all():
                raise BadInputError("the image has no finite pixel (all NaN or infinite)")
            warnings.warn(
                f"{int(bad.sum())} NaN/infinite pixels are treated as background",
                stacklevel=2,
            )
            nonfinite = bad
            out[bad] = lo
    out -= work(lo)
    scale = hi - lo
    if scale > 0 and np.isfinite(scale):
        out *= work(1.0 / scale)
    else:
        out[...] = 0.0
    # keep extreme outliers from dominating float32 arithmetic downstream
    np.clip(out, -10.0, 10.0, out=out)
    return out.astype(np.float32, copy=False), nonfinite
