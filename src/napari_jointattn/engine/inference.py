"""Segmenting images of any size: channels, stacks, tiling, devices, post-processing."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_axis, to_array
from .devices import autocast, describe_device, free_cache, is_out_of_memory, resolve_device
from .errors import BadInputError, Cancelled
from .imageio import ImageFile, read_image
from .models import Model, load_model
from .normalize import normalize, percentile_range
from .postprocess import argmax_labels, split_instances

#: Called with a progress dict ``{"stage", "done", "total", "message"}``;
#: returning ``False`` cancels the work.
Callback = Callable[[dict], "bool | None"]

MIN_TILE = 64
#: tiles overlap by at most this fraction: the work grows as 1 / (1 - overlap)**2
#: (0.9: 100 times the work of no overlap; 0.999 would be a million times)
MAX_OVERLAP = 0.9
# planes above BAND_PIXELS * 1.5 pixels are processed in row bands of about
# BAND_PIXELS, each widened by BAND_MARGIN rows of context on both sides, so
# memory stays bounded for huge images (see plane_bands)
BAND_PIXELS = 16 * 1024 * 1024
BAND_MARGIN = 64


@dataclass
class Segmentation:
    """What :func:`segment` returns.

    ``labels`` has the image's spatial shape (class ids, or instance ids for
    instance models). ``attention`` maps ``"<module> <map>"`` (e.g.
    ``"joint 1/8 pointwise"``) to float32 arrays of the same shape.
    """

    labels: np.ndarray
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    instances: bool = False
    slices: list[int] | None = None


# ------------------------------------------------------------------ channels
def prepare_channels(
    image: np.ndarray, in_channels: int, channel_axis: int | None = None
) -> np.ndarray:
    """Return the image as (spatial..., in_channels) with a documented rule.

    * ``channel_axis`` given: that axis holds channels.
    * otherwise a 3-D array whose last axis has 3 or 4 entries (and whose
      other axes are larger) is RGB(A);
    * otherwise, for a multi-channel model, a first or last axis of exactly
      ``in_channels`` entries is the channel axis;
    * otherwise there is no channel axis.

    A 1-channel model given several channels uses their mean (alpha
    dropped). Spatial dimensionality must be 2 or 3.
    """
    arr = to_array(image)
    if arr.ndim < 2:
        raise BadInputError(f"an image needs at least 2 dimensions, got shape {arr.shape}")
    if channel_axis is not None:
        if not -arr.ndim <= channel_axis < arr.ndim:
            raise BadInputError(f"channel axis {channel_axis} does not exist in shape {arr.shape}")
        arr = np.moveaxis(arr, channel_axis, -1)
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4:
        pass
    elif in_channels > 1 and arr.ndim >= 3 and arr.shape[-1] == in_channels:
        pass
    elif in_channels > 1 and arr.ndim >= 3 and arr.shape[0] == in_channels:
        arr = np.moveaxis(arr, 0, -1)
    else:
        arr = arr[..., None]
    spatial = arr.ndim - 1
    if spatial not in (2, 3):
        raise BadInputError(
            f"image of shape {np.shape(image)} has {spatial} spatial dimensions; "
            "supported are 2-D images and 3-D stacks (plus an optional channel axis)"
        )
    c = arr.shape[-1]
    if c == in_channels:
        return arr
    if in_channels == 1:
        if c == 4:
            arr = arr[..., :3]
        # accumulate in float64: three float32 values near the type's maximum overflow their sum
        out_dtype = np.float64 if arr.dtype == np.float64 else np.float32
        return arr.mean(axis=-1, keepdims=True, dtype=np.float64).astype(out_dtype)
    raise BadInputError(f"the model needs {in_channels} channels, the image has {c}")


# ------------------------------------------------------------------- tiling
def _windows(size: int, roi: int, overlap: float) -> int:
    if size <= roi:
        return 1
    interval = max(1, int(roi * (1 - overlap)))
    return math.ceil((size - roi) / interval) + 1


def count_windows(shape: Sequence[int], tile: int, overlap: float) -> int:
    h, w = shape
    return _windows(h, min(tile, h), overlap) * _windows(w, min(tile, w), overlap)


def _map_names(model: Model) -> list[str]:
    names = []
    for module_name, module in model.net.attention_modules():
        for map_name in ("pointwise", "mix"):
            if map_name == "mix" and getattr(module, "form", None) != "mix":
                continue
            names.append(f"{module_name} {map_name}")
    return names


def predict_slice(
    model: Model,
    x: np.ndarray,
    device: torch.device,
    tile: int = 512,
    overlap: float = 0.25,
    batch_size: int = 1,
    maps: bool = False,
    on_window: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One 2-D image (C, H, W) -> (K [+ aux] [+ maps], H, W) float32 on the CPU.

    Class channels are softmax probabilities. Tiles of ``tile`` pixels with
    ``overlap`` are blended with Gaussian weights (MONAI's sliding window);
    blending accumulates on the CPU, so device memory holds one batch of tiles.
    """
    from monai.inferers import sliding_window_inference

    net = model.net
    k = model.num_classes
    _, h, w = x.shape
    roi = (min(tile, h), min(tile, w))

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        if on_window is not None:
            on_window()
        with autocast(device):
            if maps:
                logits, found = net.inspect(batch)
            else:
                logits = net(batch)
        logits = logits.float()
        out = [torch.softmax(logits[:, :k], dim=1), logits[:, k:]]
        if maps:
            size = batch.shape[-2:]
            for module_maps in found.values():
                for name in ("pointwise", "mix"):
                    if name in module_maps:
                        m = module_maps[name].float()[:, None]
                        # the map covers ceil(h / stride) cells: upsample to the
                        # padded extent, then crop to the tile
                        stride = math.ceil(size[0] / m.shape[-2]), math.ceil(size[1] / m.shape[-1])
                        full = F.interpolate(
                            m, size=(m.shape[-2] * stride[0], m.shape[-1] * stride[1]),
                            mode="bilinear", align_corners=False,
                        )
                        out.append(full[..., : size[0], : size[1]])
        return torch.cat(out, dim=1)

    inputs = torch.from_numpy(np.ascontiguousarray(x))[None]
    with torch.inference_mode():
        result = sliding_window_inference(
            inputs,
            roi_size=roi,
            sw_batch_size=batch_size,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
            padding_mode="replicate",
            sw_device=device,
            device=torch.device("cpu"),
        )
    return result[0]


# ------------------------------------------------------------------ segment
def plane_bands(h: int, w: int, band_pixels: int | None = None, margin: int | None = None
                ) -> list[tuple[int, int, int, int]]:
    """Row bands ``(r0, r1, e0, e1)`` covering an h x w plane: core rows [r0, r1), read rows [e0, e1).

    One band for planes up to 1.5 x ``band_pixels``; otherwise bands of about
    ``band_pixels`` pixels, each read with ``margin`` extra rows on both sides
    (clipped to the plane) so that predictions and objects near a band's edge
    see their surroundings.
    """
    band_pixels = BAND_PIXELS if band_pixels is None else band_pixels
    margin = BAND_MARGIN if margin is None else margin
    if h * w <= 1.5 * band_pixels:
        return [(0, h, 0, h)]
    rows = max(2 * margin, band_pixels // max(1, w))
    n = math.ceil(h / rows)
    edges = [round(i * h / n) for i in range(n + 1)]
    return [(a, b, max(0, a - margin), min(h, b + margin)) for a, b in zip(edges[:-1], edges[1:])]


def _owned_instances(inst: np.ndarray, r0: int, r1: int, e0: int) -> np.ndarray:
    """Ids of objects in a band (read from row e0) whose centroid row lies in the core [r0, r1)."""
    n = int(inst.max())
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.zeros(n + 1, dtype=np.int64)
    row_sums = np.zeros(n + 1, dtype=np.float64)
    for a in range(0, inst.shape[0], 256):  # chunks: no full-band float64 row index
        chunk = inst[a : a + 256]
        counts += np.bincount(chunk.ravel(), minlength=n + 1)
        rows = np.repeat(np.arange(a, a + chunk.shape[0], dtype=np.float64), chunk.shape[1])
        row_sums += np.bincount(chunk.ravel(), weights=rows, minlength=n + 1)
    centroid = row_sums / np.maximum(counts, 1) + e0
    ids = np.arange(n + 1)
    return ids[(counts > 0) & (centroid >= r0) & (centroid < r1) & (ids > 0)]


def _as_array(image, channel_axis: int | None = None) -> tuple[np.ndarray, int | None, int]:
    """-> (array, channel_axis, default slicing axis).

    An explicit ``channel_axis`` refers to the image's own axes; otherwise a
    file's header-declared axes are used (see ``ImageFile.channels_last``).
    """
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, ImageFile):
        if channel_axis is not None:
            return image.data, channel_axis, image.default_axis
        data, ch = image.channels_last()
        return data, ch, image.default_axis
    return to_array(image), channel_axis, 0


def _segment_series(image: ImageFile, callback: Callback | None, **kwargs) -> Segmentation:
    """Each time point of a time series on its own; labels stacked on the time axis."""
    start = time.perf_counter()
    n = image.time_points
    results: list[Segmentation] = []
    for t in range(n):
        def scaled(info: dict, t=t) -> bool | None:
            total = info["total"] * n
            return callback({**info, "done": t * info["total"] + info["done"], "total": total,
                             "message": f"time point {t + 1}/{n}: {info['message']}"})

        results.append(segment(image.time_point(t), callback=scaled if callback else None, **kwargs))
    ax = image.time_axis
    if image.channel_axis is not None and image.channel_axis < ax:
        ax -= 1
    first = results[0]
    return Segmentation(
        labels=np.stack([r.labels for r in results], axis=ax),
        attention={k: np.stack([r.attention[k] for r in results], axis=ax) for k in first.attention},
        device=results[-1].device,
        notes=[f"time point {t + 1}: {note}" for t, r in enumerate(results) for note in r.notes],
        seconds=time.perf_counter() - start,
        instances=first.instances,
        slices=first.slices,
    )


def segment(
    image,
    model: Model | str | os.PathLike = "nuclei",
    *,
    device: str | torch.device = "auto",
    tile: int = 512,
    overlap: float = 0.25,
    batch_size: int = 1,
    axis: int | None = None,
    channel_axis: int | None = None,
    slices: Sequence[int] | None = None,
    attention: bool = False,
    callback: Callback | None = None,
) -> Segmentation:
    """Segment a 2-D image or a 3-D stack (slice by slice along ``axis``).

    ``image``: an array (or tensor), an :class:`ImageFile` or a path.
    ``model``: a :class:`Model`, a preset name or a model file. ``slices``
    restricts a stack to some slice indices (others are labelled 0). A time
    series (4-D NIfTI) is segmented one time point after the other; its
    labels keep the time axis. On CUDA out of memory the tile is halved down
    to 64 px, then the CPU is used; each step is recorded in ``notes``.
    Raises :class:`BadInputError` for bad input and :class:`Cancelled` when
    ``callback`` returns ``False``.
    """
    start = time.perf_counter()
    model = load_model(model)
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < MIN_TILE:
        raise BadInputError(f"tile must be an integer of at least {MIN_TILE} pixels, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float, np.floating)) \
            or not 0 <= overlap <= MAX_OVERLAP:
        raise BadInputError(
            f"overlap must be a number in [0, {MAX_OVERLAP}], got {overlap!r} "
            "(the work grows as 1 / (1 - overlap)^2)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise BadInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    axis = check_axis(axis)
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, ImageFile) and image.time_axis is not None and channel_axis is None:
        return _segment_series(image, callback, model=model, device=device, tile=tile, overlap=overlap,
                               batch_size=batch_size, axis=axis, slices=slices, attention=attention)
    dev = resolve_device(device)
    arr, channel_axis, default_axis = _as_array(image, channel_axis)
    data = prepare_channels(arr, model.in_channels, channel_axis)
    spatial_shape = data.shape[:-1]

    is_stack = len(spatial_shape) == 3
    if is_stack:
        ax = default_axis if axis is None else axis
        ax %= 3
        data = np.moveaxis(data, ax, 0)
    else:
        if axis not in (None, 0):
            raise BadInputError("axis applies to 3-D stacks only")
        ax = None
        data = data[None]
    n = data.shape[0]
    todo = list(range(n)) if slices is None else sorted({int(s) for s in slices})
    if any(not 0 <= s < n for s in todo):
        raise BadInputError(f"slice indices must be in [0, {n - 1}]")

    per_volume = model.normalization.get("per") == "volume" and is_stack
    pct = tuple(model.normalization.get("percentiles", (1.0, 99.8)))
    if data.dtype.kind == "f" and not np.isfinite(data).any():
        raise BadInputError("the image has no finite pixel (all NaN or infinite)")
    volume_range = percentile_range(data, *pct) if per_volume else None

    net = model.net.eval()
    net.to(dev)
    hw = data.shape[1:3]
    labels = np.zeros((n, *hw), dtype=np.int32 if model.instances else np.uint8)
    names = _map_names(model) if attention else []
    maps = {name: np.zeros((n, *hw), dtype=np.float32) for name in names}
    notes: list[str] = []
    bands = plane_bands(*hw)
    total = len(todo) * sum(count_windows((e1 - e0, hw[1]), tile, overlap) for _, _, e0, e1 in bands)
    done = 0
    nonfinite_pixels = 0

    def report(message: str) -> None:
        if callback is not None and callback(
            {"stage": "segment", "done": done, "total": total, "message": message}
        ) is False:
            raise Cancelled("segmentation cancelled")

    def on_window() -> None:
        nonlocal done
        report(f"tile {done + 1}/{total} on {dev.type}")
        done += 1

    next_id = 0
    report("starting")
    for s in todo:
        plane = np.moveaxis(data[s], -1, 0)  # (C, H, W)
        if plane.dtype.kind == "f" and not np.isfinite(plane).any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x, bad = normalize(plane, volume_range, pct)
        bad = bad.any(axis=0) if bad is not None else None
        if bad is not None:
            nonfinite_pixels += int(bad.sum())
        for r0, r1, e0, e1 in bands:
            xb = x if len(bands) == 1 else np.ascontiguousarray(x[:, e0:e1])
            bad_b = None if bad is None else bad[e0:e1]
            tile_now = int(tile)
            while True:
                try:
                    out = predict_slice(model, xb, dev, tile_now, overlap, batch_size, bool(names), on_window)
                    break
                except Cancelled:
                    raise
                except Exception as exc:
                    if dev.type != "cuda" or not is_out_of_memory(exc):
                        raise
                    free_cache(dev)
                    if tile_now // 2 >= MIN_TILE:
                        tile_now //= 2
                        notes.append(f"CUDA out of memory: retrying with {tile_now}-pixel tiles")
                    else:
                        dev = torch.device("cpu")
                        net.to(dev)
                        notes.append("CUDA out of memory at the smallest tile: fell back to the CPU")
            del xb
            k = model.num_classes
            probs = out[:k].numpy()
            thr = model.postprocess.get("threshold")
            if k == 2 and thr is not None:
                cls = (probs[1] > thr).astype(np.uint8)
            else:
                cls = argmax_labels(probs)
            del probs
            if bad_b is not None:
                cls[bad_b] = 0
            core = slice(r0 - e0, r1 - e0)
            if model.instances:
                distance = out[k].numpy() if model.postprocess.get("distance_channel") else None
                inst = split_instances(
                    cls > 0,
                    min_distance=model.postprocess.get("min_distance", 3),
                    min_size=model.postprocess.get("min_size", 15),
                    distance=distance,
                )
                del cls, distance
                if len(bands) == 1:
                    inst[inst > 0] += next_id
                    next_id = max(next_id, int(inst.max()))
                    labels[s] = inst
                else:
                    # objects belong to the band holding their centroid; they are written whole
                    # (margin rows included) where no earlier band has written yet
                    owned = _owned_instances(inst, r0, r1, e0)
                    lut = np.zeros(int(inst.max()) + 1, dtype=np.int32)
                    lut[owned] = np.arange(next_id + 1, next_id + 1 + len(owned), dtype=np.int32)
                    next_id += len(owned)
                    new_ids = lut[inst]
                    del inst
                    target = labels[s, e0:e1]
                    free = (new_ids > 0) & (target == 0)
                    target[free] = new_ids[free]
                    del new_ids, free
            else:
                labels[s, r0:r1] = cls[core]
            first_map = k + model.config.aux_channels
            for i, name in enumerate(names):
                maps[name][s, r0:r1] = out[first_map + i, core].numpy()
            del out
    if nonfinite_pixels:
        notes.append(f"{nonfinite_pixels} NaN/infinite pixels were labelled background")

    def restore(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, 0, ax) if is_stack else a[0]

    return Segmentation(
        labels=restore(labels),
        attention={name: restore(m) for name, m in maps.items()},
        device=describe_device(dev),
        notes=notes,
        seconds=time.perf_counter() - start,
        instances=model.instances,
        slices=todo if is_stack else None,
    )
