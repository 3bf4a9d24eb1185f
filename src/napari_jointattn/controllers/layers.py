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


def layer_input(layer, channel_axis: int | None = None) -> LayerInput:
    """Data, channel axis and spatial geometry of an Image layer."""
    data = np.asarray(layer.data)
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
