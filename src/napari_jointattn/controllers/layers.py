"""Layer plumbing between napari layers and engine arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ATTENTION_PREFIX = "attention "


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


def write_labels(viewer, name: str, labels: np.ndarray, like: LayerInput, slices=None):
    """Create or update the Labels layer ``name``; one undo reverts the whole update.

    An existing layer of the same shape is updated through
    ``Labels.data_setitem`` so the change is a single entry in its undo
    history (hand corrections made before stay recoverable). With ``slices``
    (a stack's processed slice indices along axis 0) only those slices change.
    """
    from napari.layers import Labels

    existing = viewer.layers[name] if name in viewer.layers else None
    if isinstance(existing, Labels) and existing.data.shape == labels.shape:
        layer = existing
        current = np.asarray(layer.data)
        if current.dtype.kind in "iu" and labels.max(initial=0) > np.iinfo(current.dtype).max:
            layer.data = current.astype(np.int32)
            current = np.asarray(layer.data)
        if slices is not None:
            region = np.zeros(labels.shape, bool)
            region[list(slices)] = True
            changed = (current != labels) & region
        else:
            changed = current != labels
        idx = np.nonzero(changed)
        if idx[0].size:
            layer.data_setitem(idx, labels[changed])
        return layer
    if existing is not None:
        name = _free_name(viewer, name)
    dtype = np.int32 if labels.max(initial=0) > 255 else np.uint8
    return viewer.add_labels(
        labels.astype(dtype), name=name, scale=like.scale, translate=like.translate
    )


def _free_name(viewer, name: str) -> str:
    i = 1
    while f"{name} [{i}]" in viewer.layers:
        i += 1
    return f"{name} [{i}]"


def show_attention(viewer, image_name: str, maps: dict[str, np.ndarray], like: LayerInput) -> list:
    """One heatmap layer per module map, named ``attention <module> [mix]``."""
    layers = []
    for key, data in maps.items():
        module, _, map_name = key.rpartition(" ")
        name = f"{ATTENTION_PREFIX}{module}" + ("" if map_name == "pointwise" else f" {map_name}")
        meta = {"jointattn_source": image_name, "jointattn_map": key}
        if name in viewer.layers and viewer.layers[name].data.shape == data.shape:
            layer = viewer.layers[name]
            layer.data = data
            layer.metadata.update(meta)
        else:
            layer = viewer.add_image(
                data,
                name=name,
                colormap="inferno" if map_name == "pointwise" else "viridis",
                blending="additive",
                opacity=0.5,
                contrast_limits=(0.0, 1.0),
                scale=like.scale,
                translate=like.translate,
                metadata=meta,
                visible=map_name == "pointwise",
            )
        layers.append(layer)
    return layers


def attention_layers(viewer) -> list:
    return [layer for layer in viewer.layers if layer.name.startswith(ATTENTION_PREFIX)]
