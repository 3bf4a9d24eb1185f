"""Layer plumbing between napari layers and engine arrays (no Qt)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: the start of the names of the layers the Segment dock shows attention in; the names are
#: built from keys and never read back: the layers are found by their metadata
ATTENTION_PREFIX = "attention "
#: metadata key of an attention map layer: the map's ``AttentionKey``
ATTENTION_KEY = "jointattn_attention"
#: metadata key of a query-mode layer: ``"row"`` (where the pixel looks) or ``"used"``
QUERY_KEY = "jointattn_query"
#: labels layers the docks create hold int32 ids, so any object id can be painted
LABELS_DTYPE = np.int32


def labels_name(image_name: str) -> str:
    return f"{image_name} labels"


@dataclass
class LayerInput:
    """An image layer's data as the engine needs it, plus its geometry.

    ``source`` is the layer's full-resolution array as the layer holds it (numpy, dask,
    zarr): making a ``LayerInput`` reads no pixels. :attr:`data` reads them.
    """

    source: object
    channel_axis: int | None
    scale: tuple
    translate: tuple
    spatial_shape: tuple

    @cached_property
    def data(self) -> np.ndarray:
        """The pixels in memory, read on first use: for a lazy layer (dask, zarr) a read of the
        whole array, so call it in a worker thread."""
        return np.asarray(self.source)


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
    """Channel axis, spatial geometry and a reference to the data of an Image layer (level 0
    of a multiscale one). Only metadata is read: cheap on the GUI thread for any layer."""
    source = full_resolution(layer)
    shape = tuple(source.shape)
    scale = tuple(layer.scale)
    translate = tuple(layer.translate)
    if getattr(layer, "rgb", False):
        channel_axis = len(shape) - 1
        spatial = shape[:-1]
    elif channel_axis is not None:
        channel_axis %= len(shape)
        spatial = tuple(n for i, n in enumerate(shape) if i != channel_axis)
        scale = tuple(s for i, s in enumerate(scale) if i != channel_axis)
        translate = tuple(t for i, t in enumerate(translate) if i != channel_axis)
    else:
        spatial = shape
    return LayerInput(source, channel_axis, scale, translate, tuple(spatial))


def current_index(viewer, layer, axis: int = 0) -> int:
    """The slice of ``layer`` shown along its data ``axis``."""
    point = layer.world_to_data(viewer.dims.point)
    n = layer.data.shape[axis]
    return int(min(max(round(float(point[axis])), 0), n - 1))


def attention_key(layer):
    """The ``AttentionKey`` of an attention map layer the Segment dock made, else None
    (whatever the layer's name)."""
    return layer.metadata.get(ATTENTION_KEY)


def is_attention_layer(layer) -> bool:
    """Whether the Segment dock made ``layer`` to show attention (a map or a query heatmap)."""
    return ATTENTION_KEY in layer.metadata or QUERY_KEY in layer.metadata


def attention_layers(viewer) -> list:
    """The attention map layers the Segment dock made (found by their metadata, not names)."""
    return [layer for layer in viewer.layers if attention_key(layer) is not None]
