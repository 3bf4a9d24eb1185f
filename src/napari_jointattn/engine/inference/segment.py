"""Segmenting images of any size: channels, stacks, tiling, devices, post-processing.

:func:`segment` runs these steps, each a function of its own:

1. :func:`check_settings`: tile, overlap and batch size;
2. :func:`prepare_input`: the image as 2-D planes of the model's channels
   (:func:`.channels.prepare_channels`), the slices to segment and the
   normalisation range (:class:`Planes`);
3. for each plane and row band (:func:`plane_bands`): :func:`predict_band`,
   the tiled forward pass (:func:`predict_slice`) with the CUDA
   out-of-memory fallback;
4. :func:`band_classes` and :func:`.postprocess.split_instances`:
   post-processing of the band's probabilities;
5. :class:`Assembly`: band results written into the output arrays, instance
   ids made unique across bands and slices, and the :class:`Segmentation`.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...model import AttentionKey
from ..checks import check_axis, to_array
from ..devices import autocast, describe_device, free_cache, is_out_of_memory, resolve_device
from ..errors import BadInputError, Cancelled
from ..io.channels import prepare_channels
from ..io.images import ImageFile, read_image
from ..io.normalize import normalize
from ..models.model import Model, load_model
from .placement import inference_network, release
from .postprocess import classify, split_instances
from .runtime import cpu_network

__all__ = [
    "Assembly", "Callback", "Planes", "Segmentation", "attention_map_keys", "band_classes",
    "check_settings", "count_windows", "plane_bands", "predict_band", "predict_slice",
    "prepare_channels", "prepare_input", "segment",
]

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
    instance models). ``attention`` maps display names (``key.name``, e.g.
    ``"joint 1/8 pointwise"``) to float32 arrays of the same shape;
    ``attention_keys`` maps each of those names to its :class:`AttentionKey`
    (module kind, stride, map name), so nothing needs to parse a name.
    """

    labels: np.ndarray
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    instances: bool = False
    slices: list[int] | None = None
    attention_keys: dict[str, AttentionKey] = field(default_factory=dict)
    #: what ran the network: "torch", or "onnxruntime" (CPU, no attention maps; see engine.inference.runtime)
    runtime: str = "torch"
    #: with ``attention=True`` and attention modules: the fraction of pixels whose class
    #: changes when every module is switched off (``DenseUNet.knocked_out``), on these pixels
    attention_changed: float | None = None


# ------------------------------------------------------------------- tiling
def _windows(size: int, roi: int, overlap: float) -> int:
    if size <= roi:
        return 1
    interval = max(1, int(roi * (1 - overlap)))
    return math.ceil((size - roi) / interval) + 1


def count_windows(shape: Sequence[int], tile: int, overlap: float) -> int:
    h, w = shape
    return _windows(h, min(tile, h), overlap) * _windows(w, min(tile, w), overlap)


def attention_map_keys(model: Model) -> list[AttentionKey]:
    """The keys of the attention maps ``segment(..., attention=True)`` returns, in order."""
    return model.net.map_keys()


def _upsampled_map(m: torch.Tensor, size: Sequence[int], stride: int) -> torch.Tensor:
    """(B, h, w) map at feature resolution -> (B, 1, H, W) over a tile of ``size``.

    The map covers ceil(H / stride) cells of ``stride`` pixels: upsample to
    that padded extent, then crop to the tile. (The stride comes from the
    map's key: ceil(H / cells) differs from it when H is not a multiple.)
    """
    m = m.float()[:, None]
    full = F.interpolate(m, size=(m.shape[-2] * stride, m.shape[-1] * stride), mode="bilinear",
                         align_corners=False)
    return full[..., : size[0], : size[1]]


def predict_slice(
    model: Model,
    x: np.ndarray,
    device: torch.device,
    tile: int = 512,
    overlap: float = 0.25,
    batch_size: int = 1,
    maps: bool = False,
    on_window: Callable[[int], None] | None = None,
    *,
    net: nn.Module | None = None,
    upsample: int | None = None,
) -> torch.Tensor:
    """One 2-D image (C, H, W) -> (K [+ maps], H, W) float32 on the CPU.

    ``upsample`` (default: the model's ``normalization.upsample``): the image
    is enlarged that many times before the network, and every output channel
    averaged back over each pixel's block.

    Class channels are softmax probabilities; with ``maps``, one channel per
    :func:`attention_map_keys` entry follows. Tiles of ``tile`` pixels with
    ``overlap`` are blended with Gaussian weights (MONAI's sliding window);
    blending accumulates on the CPU, so device memory holds one batch of tiles.
    ``net``: the network to run (on ``device``); ``model.net`` by default.
    """
    from monai.inferers import sliding_window_inference

    factor = model.normalization.upsample if upsample is None else upsample
    if factor > 1:
        big = predict_slice(model, model.normalization.enlarge(x, factor), device, tile, overlap, batch_size,
                            maps, on_window, net=net, upsample=1)
        return F.avg_pool2d(big[None], factor)[0]
    net = model.net if net is None else net
    k = model.num_classes
    map_keys = net.map_keys() if maps else []
    _, h, w = x.shape
    roi = (min(tile, h), min(tile, w))

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        if on_window is not None:
            on_window(batch.shape[0])  # a batch holds up to batch_size windows
        with autocast(device):
            if maps:
                logits, found = net.inspect(batch)
            else:
                logits = net(batch)
        out = [torch.softmax(logits.float()[:, :k], dim=1)]
        out += [_upsampled_map(found[key.module.name][key.map], batch.shape[-2:], key.stride)
                for key in map_keys]
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


# -------------------------------------------------------------------- bands
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


# -------------------------------------------------------------------- input
def check_settings(tile, overlap, batch_size) -> None:
    """Raise :class:`BadInputError` for a tile, overlap or batch size :func:`segment` cannot use."""
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


@dataclass
class Planes:
    """An image as 2-D planes for the network, and how results go back to its shape.

    ``data`` is (n, H, W, C): the slices of a stack along ``axis`` (``None``
    for a 2-D image, n = 1). ``todo``: the plane indices to segment.
    """

    data: np.ndarray
    axis: int | None
    todo: list[int]
    percentiles: tuple[float, float]
    volume_range: tuple[float, float] | None = None

    @property
    def is_stack(self) -> bool:
        return self.axis is not None

    @property
    def plane_shape(self) -> tuple[int, int]:
        return tuple(self.data.shape[1:3])

    def normalized(self, s: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Plane ``s`` as (C, H, W) in [0, 1] and its mask of NaN/inf pixels; None when none is finite."""
        plane = np.moveaxis(self.data[s], -1, 0)
        if plane.dtype.kind == "f" and not np.isfinite(plane).any():
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x, bad = normalize(plane, self.volume_range, self.percentiles)
        return x, (bad.any(axis=0) if bad is not None else None)

    def restore(self, a: np.ndarray) -> np.ndarray:
        """(n, H, W) per-plane results -> the image's spatial shape."""
        return np.moveaxis(a, 0, self.axis) if self.is_stack else a[0]


def prepare_input(image, model: Model, axis: int | None = None, channel_axis: int | None = None,
                  slices: Sequence[int] | None = None) -> Planes:
    """Validate an image (array, :class:`ImageFile` or path) and cut it into planes.

    Channels follow :func:`.channels.prepare_channels`; stacks are sliced
    along ``axis`` (default: the file's, else 0); ``slices`` selects planes.
    """
    arr, channel_axis, default_axis = _as_array(image, channel_axis)
    data = prepare_channels(arr, model.in_channels, channel_axis)
    if data.ndim - 1 == 3:
        ax = (default_axis if axis is None else axis) % 3
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
    if data.dtype.kind == "f" and not np.isfinite(data).any():
        raise BadInputError("the image has no finite pixel (all NaN or infinite)")
    norm = model.normalization
    return Planes(data, ax, todo, norm.percentiles, norm.volume_range(data, is_stack=ax is not None))


# ------------------------------------------------------------ forward pass
@dataclass
class Placement:
    """Where the network runs: a device and the network on it (``model.net`` is never moved).

    ``tile``: the tile size the last band ran with (:func:`predict_band` halves it on CUDA out
    of memory), so a second pass over that band can run as the first did.
    """

    device: torch.device
    net: nn.Module
    tile: int | None = None
    _off: nn.Module | None = field(default=None, repr=False)  # see knocked_out

    @classmethod
    def on(cls, model: Model, device: torch.device) -> Placement:
        return cls(device, inference_network(model.net, device))

    def knocked_out(self) -> nn.Module:
        """``net`` with every attention module passing its input through: a copy on ``device``
        (other threads may be using ``net``), made once per device."""
        if self._off is None:
            self._off = _knocked_out_copy(self.net)
        return self._off

    def fall_back_to_cpu(self, model: Model) -> None:
        """Run on the CPU from now on; the copies on the device given up are let go."""
        failed = self.device
        cpu = Placement.on(model, torch.device("cpu"))
        self.device, self.net, self._off = cpu.device, cpu.net, None
        release(model.net, failed)  # the copies' memory goes back to the device
        free_cache(failed)


def predict_band(model: Model, x: np.ndarray, place: Placement, tile: int, overlap: float,
                 batch_size: int, maps: bool, on_window: Callable[[int], None] | None,
                 notes: list[str]) -> torch.Tensor:
    """:func:`predict_slice` on one band; on CUDA out of memory halve the tile, then use the CPU.

    Each fallback step is a line in ``notes``; the move to the CPU lasts for
    the rest of the run (``place`` is updated), and ``place.tile`` is the tile
    this band ran with (each band starts from ``tile``).
    """
    tile_now = int(tile)
    while True:
        try:
            probs = predict_slice(model, x, place.device, tile_now, overlap, batch_size, maps,
                                  on_window, net=place.net)
            place.tile = tile_now
            return probs
        except Cancelled:
            raise
        except Exception as exc:
            if place.device.type != "cuda" or not is_out_of_memory(exc):
                raise
            free_cache(place.device)
            if tile_now // 2 >= MIN_TILE:
                tile_now //= 2
                notes.append(f"CUDA out of memory: retrying with {tile_now}-pixel tiles")
            else:
                place.fall_back_to_cpu(model)
                notes.append("CUDA out of memory at the smallest tile: fell back to the CPU")


# ---------------------------------------------------------- post-processing
def band_classes(model: Model, probs: np.ndarray, bad: np.ndarray | None) -> np.ndarray:
    """(K, h, w) probabilities -> (h, w) uint8 class ids; NaN/inf input pixels are background."""
    cls = classify(probs, model.postprocess)
    if bad is not None:
        cls[bad] = 0
    return cls


def band_instances(model: Model, cls: np.ndarray) -> np.ndarray:
    """Foreground classes -> instance ids 1..n (the model's watershed settings)."""
    return split_instances(
        cls > 0,
        min_distance=model.postprocess.get("min_distance", 3),
        min_size=model.postprocess.get("min_size", 15),
    )


# ---------------------------------------------------------------- assembly
class Assembly:
    """Output arrays of a run: per-plane labels and maps, filled band by band.

    Instance ids are 1..n over the whole image: each band's objects get the
    next free ids, so ids are unique across bands and slices.
    """

    def __init__(self, planes: Planes, instances: bool, map_keys: list[AttentionKey]) -> None:
        n, (h, w) = planes.data.shape[0], planes.plane_shape
        self.planes = planes
        self.instances = instances
        self.labels = np.zeros((n, h, w), dtype=np.int32)  # one dtype: users paint any id
        self.map_keys = map_keys
        self.maps = [np.zeros((n, h, w), dtype=np.float32) for _ in map_keys]
        self.next_id = 0

    def put_classes(self, s: int, band: tuple[int, int, int, int], cls: np.ndarray) -> None:
        r0, r1, e0, _ = band
        self.labels[s, r0:r1] = cls[r0 - e0 : r1 - e0]

    def put_instances(self, s: int, band: tuple[int, int, int, int], inst: np.ndarray, whole: bool) -> None:
        """``whole``: the band is the whole plane. Otherwise objects belong to the band
        holding their centroid and are written whole (margin rows included) where no
        earlier band has written yet."""
        if whole:
            inst[inst > 0] += self.next_id
            self.next_id = max(self.next_id, int(inst.max()))
            self.labels[s] = inst
            return
        r0, r1, e0, e1 = band
        owned = _owned_instances(inst, r0, r1, e0)
        lut = np.zeros(int(inst.max()) + 1, dtype=np.int32)
        lut[owned] = np.arange(self.next_id + 1, self.next_id + 1 + len(owned), dtype=np.int32)
        self.next_id += len(owned)
        new_ids = lut[inst]
        target = self.labels[s, e0:e1]
        free = (new_ids > 0) & (target == 0)
        target[free] = new_ids[free]

    def put_maps(self, s: int, band: tuple[int, int, int, int], maps: torch.Tensor) -> None:
        """``maps``: (len(map_keys), band rows, W), in the order of ``map_keys``."""
        r0, r1, e0, _ = band
        for i, out in enumerate(self.maps):
            out[s, r0:r1] = maps[i, r0 - e0 : r1 - e0].numpy()

    def result(self, device: torch.device, notes: list[str], start: float) -> Segmentation:
        restore = self.planes.restore
        return Segmentation(
            labels=restore(self.labels),
            attention={key.name: restore(m) for key, m in zip(self.map_keys, self.maps)},
            device=describe_device(device),
            notes=notes,
            seconds=time.perf_counter() - start,
            instances=self.instances,
            slices=self.planes.todo if self.planes.is_stack else None,
            attention_keys={key.name: key for key in self.map_keys},
        )


# ------------------------------------------------------------------ segment
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
        attention_keys=first.attention_keys,
    )


class _Progress:
    """Counts windows and reports them; a callback returning ``False`` cancels."""

    def __init__(self, callback: Callback | None, total: int, place: Placement) -> None:
        self.callback, self.total, self.place, self.done = callback, total, place, 0

    def report(self, message: str) -> None:
        if self.callback is not None and self.callback(
            {"stage": "segment", "done": self.done, "total": self.total, "message": message}
        ) is False:
            raise Cancelled("segmentation cancelled")

    def on_window(self, n: int = 1) -> None:
        """``n`` windows are about to run; reports count the windows finished or started."""
        first = self.done + 1
        self.done += n
        span = f"tile {first}" if n == 1 else f"tiles {first}-{self.done}"
        self.report(f"{span}/{self.total} on {self.place.device.type}")


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
    value_range: tuple[float, float] | None = None,
) -> Segmentation:
    """Segment a 2-D image or a 3-D stack (slice by slice along ``axis``).

    ``image``: an array (or tensor), an :class:`ImageFile` or a path.
    ``model``: a :class:`Model`, a preset name or a model file. ``slices``
    restricts a stack to some slice indices (others are labelled 0). A time
    series (4-D NIfTI) is segmented one time point after the other; its
    labels keep the time axis. On CUDA out of memory the tile is halved down
    to 64 px, then the CPU is used; each step is recorded in ``notes``.
    ``batch_size`` tiles go through the network at once. ``value_range``: the
    (lo, hi) intensities that map to 0 and 1, instead of the model's percentiles
    of each plane (e.g. one range for all blocks of a larger image).
    Raises :class:`BadInputError` for bad input and :class:`Cancelled` when
    ``callback`` returns ``False``.
    """
    start = time.perf_counter()
    model = load_model(model)
    check_settings(tile, overlap, batch_size)
    axis = check_axis(axis)
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, ImageFile) and image.time_axis is not None and channel_axis is None:
        return _segment_series(image, callback, model=model, device=device, tile=tile, overlap=overlap,
                               batch_size=batch_size, axis=axis, slices=slices, attention=attention)
    dev = resolve_device(device)
    planes = prepare_input(image, model, axis, channel_axis, slices)
    if value_range is not None:
        planes.volume_range = (float(value_range[0]), float(value_range[1]))
    out = Assembly(planes, model.instances, attention_map_keys(model) if attention else [])
    notes: list[str] = []
    fast = cpu_network(model, notes) if dev.type == "cpu" and not out.map_keys else None
    place = Placement(dev, fast) if fast is not None else Placement.on(model, dev)
    bands = plane_bands(*planes.plane_shape)
    width = planes.plane_shape[1]
    f = model.normalization.upsample  # the network sees planes enlarged f times
    total = len(planes.todo) * sum(count_windows(((e1 - e0) * f, width * f), tile, overlap)
                                   for _, _, e0, e1 in bands)
    # with the maps, the same pixels again with every attention module off: how much the labels
    # depend on attention here (on the device and with the tile the first pass ended with)
    compare = bool(out.map_keys and model.net.attention_keys())
    progress = _Progress(callback, total * (2 if compare else 1), place)
    changed = seen = 0
    nonfinite_pixels = flat_planes = 0
    k = model.num_classes
    progress.report("starting")
    for s in planes.todo:
        prepared = planes.normalized(s)
        if prepared is None:
            continue
        x, bad = prepared
        if bad is not None:
            nonfinite_pixels += int(bad.sum())
        if _flat(x, bad):  # nothing to see: whatever a network found there would be its bias
            flat_planes += 1
            progress.on_window(total * (2 if compare else 1) // len(planes.todo))
            continue
        for band in bands:
            _, _, e0, e1 = band
            xb = x if len(bands) == 1 else np.ascontiguousarray(x[:, e0:e1])
            pred = predict_band(model, xb, place, tile, overlap, batch_size, bool(out.map_keys),
                                progress.on_window, notes)
            cls = band_classes(model, pred[:k].numpy(), None if bad is None else bad[e0:e1])
            if compare:
                try:
                    without = predict_slice(model, xb, place.device, place.tile, overlap,
                                            batch_size, False, progress.on_window,
                                            net=place.knocked_out())
                except Cancelled:
                    raise
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    compare, seen = False, 0  # the maps and labels matter more than this figure
                    free_cache(place.device)
                    notes.append("out of memory: the labels without attention were not compared")
                else:
                    changed += int(np.count_nonzero(
                        band_classes(model, without[:k].numpy(), None if bad is None else bad[e0:e1]) != cls))
                    seen += cls.size
                    del without
            del xb
            if model.instances:
                out.put_instances(s, band, band_instances(model, cls), whole=len(bands) == 1)
            else:
                out.put_classes(s, band, cls)
            del cls
            out.put_maps(s, band, pred[k:])
            del pred
    if nonfinite_pixels:
        notes.append(f"{nonfinite_pixels} NaN/infinite pixels were labelled background")
    if flat_planes:
        what = "the image is" if not planes.is_stack else f"{flat_planes} slice(s) are"
        notes.append(f"{what} of one value after normalisation (no contrast): labelled background")
    result = out.result(place.device, notes, start)
    result.runtime = "onnxruntime" if fast is not None else "torch"
    if compare and seen:
        result.attention_changed = changed / seen
    return result


def _flat(x: np.ndarray, bad: np.ndarray | None) -> bool:
    """Whether a normalised plane (C, H, W) holds one value in every channel (finite pixels)."""
    seen = x if bad is None else x[:, ~bad]
    return seen.size == 0 or bool((np.ptp(seen.reshape(len(seen), -1), axis=1) == 0).all())


def _knocked_out_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (same device, eval mode) whose attention modules pass their input through."""
    twin = copy.deepcopy(net).eval()
    for _, module in twin.attention_keys():
        module.enabled = False
    return twin
