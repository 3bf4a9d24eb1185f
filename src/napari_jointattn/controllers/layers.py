"""Layer plumbing between napari layers and engine arrays (no Qt)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ATTENTION_PREFIX = "attention "
#: labels layers the docks create hold int32 ids, so any object id can be painted
LABELS_DTYPE = np.int32


def labels_name(image_name: str) -> str:
    return f"{image_name} labels"


@dataclass
class LayerInput:
    """An image layer's data as the engine needs it, plus its geometry."""

    data: np.ndarray
    channel_axis: int | None
    scale: tuple
    translate: tuple
    spatial_shape: tuple


#: an image layer whose data is not in memory (multiscale, dask, zarr) and has more pixels than
#: this at full resolution is segmented block by block into a Zarr store (engine.scale.zarrseg)
LAZY_PIXELS = 64 * 1024 * 1024


def full_resolution(layer):
    """The layer's full-resolution data: level 0 of a multiscale layer, else its data (not read)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def lazy_levels(layer) -> list | None:
    """The levels of a layer too big to read into memory (full resolution first), or None."""
    data = full_resolution(layer)
    if isinstance(data, np.ndarray) or int(np.prod(data.shape, dtype=np.int64)) <= LAZY_PIXELS:
        return None
    return list(layer.data) if getattr(layer, "multiscale", False) else [data]


def preview_data(layer, side: int = 1024) -> np.ndarray:
    """A small in-memory view of any image layer (for fit checks): the data, or for
    big lazy layers its smallest level, or a central crop of ``side`` pixels."""
    levels = lazy_levels(layer)
    if levels is None:
        return np.asarray(full_resolution(layer))
    small = levels[-1]
    if int(np.prod(small.shape[-2:])) <= side * side * 4:
        return np.asarray(small)
    data = levels[0]
    h, w = data.shape[-2:]
    lead = tuple(n // 2 for n in data.shape[:-2])
    y, x = max(0, h // 2 - side // 2), max(0, w // 2 - side // 2)
    return np.asarray(data[lead + (slice(y, y + side), slice(x, x + side))])


def layer_input(layer, channel_axis: int | None = None) -> LayerInput:
    """Data, channel axis and spatial geometry of an Image layer (level 0 of a multiscale one)."""
    data = np.asarray(full_resolution(layer))
    scale = tuple(layer.scale)
    translate = tuple(layer.translate)
    if getattr(layer, "rgb", False):
        channel_axis = data.ndim - 1
        spatial = data.shape[:-1]
    elif channel_axis is not None:
        channel_axis %= data.ndim
        spatial = tuple(n for i, n in enumerate(data.shape) if i != channel_axis)
        scale = tuple(s for i, s in enumerate(scale) if i != channel_axis)
        translate = tuple(t for i, t in enumerate(translate) if i != channel_axis)
    else:
        spatial = data.shape
    return LayerInput(data, channel_axis, scale, translate, tuple(spatial))


def current_index(viewer, layer, axis: int = 0) -> int:
    """The slice of ``layer`` shown along its data ``axis``."""
    point = layer.world_to_data(viewer.dims.point)
    n = layer.data.shape[axis]
    return int(min(max(round(float(point[axis])), 0), n - 1))


def attention_layers(viewer) -> list:
    return [layer for layer in viewer.layers if layer.name.startswith(ATTENTION_PREFIX)]
