"""Synthetic benchmark images."""

from __future__ import annotations

import numpy as np


def blobs(size: int, seed: int = 0) -> np.ndarray:
    """size x size float32: nucleus-like blobs on a noisy background, built in row bands."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size), np.float32)
    xx = np.arange(size, dtype=np.float32)
    for r in range(0, size, 512):
        yy = np.arange(r, min(size, r + 512), dtype=np.float32)[:, None]
        band = ((np.sin(yy / 9.0) * np.cos(xx / 11.0)) > 0.6).astype(np.float32) * 200
        image[r : r + len(yy)] = band + rng.normal(20, 5, band.shape).astype(np.float32)
    return image
