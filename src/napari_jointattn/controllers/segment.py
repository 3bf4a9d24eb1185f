"""The Segment dock's workflow, without Qt: requests, the engine call, and putting results into layers.

Everything heavy happens in the worker thread: the engine call, and then
:meth:`SegmentController.prepare`, which builds the napari layer objects
(int32 labels, attention heatmaps downsampled for big images, contrast
limits given so napari computes none) and works out which pixels of an
existing labels layer change. What is left for the GUI thread is a list of
small :class:`Step` s, run one per event-loop turn so the window never
freezes while layers appear.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..engine.errors import BadInputError, Cancelled
from ..model import AttentionKey
from .layers import (
    ATTENTION_KEY,
    ATTENTION_PREFIX,
    LABELS_DTYPE,
    QUERY_KEY,
    LayerInput,
    attention_key,
    current_index,
    is_attention_layer,
    labels_name,
    layer_input,
    lazy_levels,
    preview_data,
)
from .session import Session, session_for

PREDICTION_KEY = "jointattn_prediction"
#: attention maps larger than this (pixels per side) are shown downsampled; they are
#: smooth upsamplings of 1/8..1/32-resolution maps, so nothing visible is lost
MAX_ATTENTION_SIDE = 2048
ATTENTION_TARGET_SIDE = 1024


@dataclass
class Request:
    """A snapshot of what to segment, taken on the GUI thread when Segment is clicked."""

    layer_name: str
    model_key: str
    device: str
    tile: int
    attention: bool
    input: LayerInput
    slices: list[int] | None = None
    layer_id: object = None
    extra: dict = field(default_factory=dict)
    #: a layer too big for memory: its levels (full resolution first), segmented block by block
    #: into the Zarr store ``store`` (``input.data`` is then an empty placeholder)
    lazy: list | None = None
    store: object = None
    source_name: str | None = None


@dataclass
class StoreSegmentation:
    """A block-by-block result: labels in a Zarr store, opened lazily."""

    labels: object  # zarr.Array
    store: object  # Path
    report: object  # engine.scale.zarrseg.ZarrReport
    device: str
    instances: bool
    seconds: float
    notes: list = field(default_factory=list)
    attention: dict = field(default_factory=dict)


@dataclass
class Step:
    """One piece of GUI-thread work: ``run()`` returns the layer it added or changed."""

    what: str
    run: Callable[[], object]


#: what the attention layers show, one line for the Segment dock (docs/usage.md says more)
ATTENTION_LEGEND = ("Attention layers, under the labels: <module> = where it amplifies local "
                    "features; mix = how much context is global, not local; effect (hidden) = how "
                    "much the module changed the features there (near 0: it barely matters).")

def store_for(layer, source_name: str):
    """Where a big layer's labels store goes: next to an OME-Zarr source when that folder is
    writable, else in the user cache folder. A complete store, or one of another source or
    model, is never reused: the next free name is taken (``..._labels-1.zarr``)."""
    import os
    import re
    from pathlib import Path

    from ..engine.scale.zarrseg import store_state

    path = getattr(getattr(layer, "source", None), "path", None)
    if path and str(path).rstrip("/").lower().endswith(".zarr") and os.access(Path(path).parent, os.W_OK):
        from ..engine.io.images import output_stem

        folder, stem = Path(path).parent, output_stem(path)
    else:
        from platformdirs import user_cache_dir

        folder = Path(user_cache_dir("napari-jointattn")) / "labels"
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", layer.name).strip("-") or "image"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        store = folder / (f"{stem}_labels.zarr" if i == 0 else f"{stem}_labels-{i}.zarr")
        if not store.exists():
            return store
        state = store_state(store)
        if state is not None and not state.get("complete") and state.get("source") == source_name:
            return store  # an interrupted run of this layer: resumed (if the model is the same)
    raise BadInputError(f"no free name for a labels store in {folder}")


def attention_factor(shape: tuple) -> int:
    """Downsampling factor for an attention map of ``shape`` (last two axes)."""
    side = max(shape[-2:])
    return 1 if side <= MAX_ATTENTION_SIDE else math.ceil(side / ATTENTION_TARGET_SIDE)


def downsample(data: np.ndarray, scale: tuple, translate: tuple, factor: int):
    """Every ``factor``-th pixel of the last two axes, with the scale and translation that
    keep each kept pixel exactly where it was."""
    if factor == 1:
        return data, tuple(scale), tuple(translate)
    off = factor // 2
    small = np.ascontiguousarray(data[..., off::factor, off::factor])
    n = len(scale)
    scale2 = tuple(s * factor if i >= n - 2 else s for i, s in enumerate(scale))
    translate2 = tuple(t + off * s if i >= n - 2 else t for i, (t, s) in enumerate(zip(translate, scale)))
    return small, scale2, translate2


def attention_layer_name(key: AttentionKey) -> str:
    """The layer name a map is first shown under: ``AttentionKey("joint", 8, "pointwise")`` ->
    ``"attention joint 1/8"`` (the module's map), other maps ``"attention joint 1/8 mix"``.
    Only for display: layers are found again by the key in their metadata."""
    shown = key.module if key.map == "pointwise" else key
    return f"{ATTENTION_PREFIX}{shown.name}"


def _colormap(key: AttentionKey) -> str:
    """Point-wise maps inferno, effect maps plasma, the others (mix) viridis."""
    return {"pointwise": "inferno", "effect": "plasma"}.get(key.map, "viridis")


def _limits(key: AttentionKey, data: np.ndarray) -> tuple[float, float]:
    """Sigmoid maps span [0, 1]; an effect map (|update| / |input|, unbounded) its own 99th percentile."""
    if key.map != "effect":
        return (0.0, 1.0)
    top = float(np.nanpercentile(data, 99)) if data.size else 0.0
    return (0.0, top if np.isfinite(top) and top > 0 else 1.0)


@dataclass
class QueryRequest:
    """A query-mode click, snapshotted on the GUI thread: :meth:`SegmentController.query`
    reads no layer, so the layer list may change meanwhile."""

    layer_id: object
    model_key: str
    tile: int
    input: LayerInput
    point: tuple[int, int]
    slice_index: int | None


@dataclass
class FitQuery:
    """What the fit check of an image layer needs, snapshotted on the GUI thread."""

    layer_name: str
    data: np.ndarray
    path: str | None
    model_key: str | None
    may_switch: bool


def fit_advice(query: FitQuery) -> dict:
    """Which model fits the layer, and warnings for the model that will be used (worker thread).

    ``{"model": key or None, "suggested": preset or None, "warnings": [...]}``:
    with ``may_switch`` the suggested preset (the one whose training data the
    image resembles) replaces the current model. Empty advice when the
    engine's fit checks are not available or the model cannot be read.
    """
    try:
        from ..engine.models.fit import check_fit, suggest_model
    except ImportError:  # an engine without fit checks
        return {"model": query.model_key, "suggested": None, "warnings": []}
    try:
        suggested = suggest_model(query.data, query.path)
    except (BadInputError, ValueError):
        suggested = None
    key = suggested if suggested and query.may_switch else query.model_key
    try:
        warnings = check_fit(key, query.data) if key else []
    except (BadInputError, ValueError):
        warnings = []
    return {"model": key, "suggested": suggested, "warnings": warnings}


class SegmentController:
    """State and logic of the Segment dock; usable without Qt (e.g. on a ``ViewerModel``)."""

    def __init__(self, viewer, session: Session | None = None) -> None:
        self.viewer = viewer
        self.session = session or session_for(viewer)
        self.running = False
        self.cancel_event = threading.Event()
        self.last_result = None
        self.last_request: Request | None = None
        self.device_used: str | None = None
        self._query = None
        self._query_key: tuple | None = None

    # models -----------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        return self.session.model_choices()

    def add_model_file(self, path: str) -> str:
        return self.session.add_model_file(path)

    def model(self, key: str):
        return self.session.model(key)

    def warm(self, key: str | None = None, tile: int | None = None, device: str = "auto") -> bool:
        """Load the model and run its first forward pass (call from a worker thread)."""
        return self.session.warm(key, tile, device)

    def fit_query(self, layer_name: str, model_key: str | None, may_switch: bool) -> FitQuery | None:
        """Snapshot an image layer for :func:`fit_advice` (GUI thread; None without a layer)."""
        if not layer_name or layer_name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[layer_name]
        path = getattr(getattr(layer, "source", None), "path", None)
        return FitQuery(layer_name, preview_data(layer), str(path) if path else None,
                        model_key or self.session.current_model(), may_switch)

    # requests -----------------------------------------------------------
    def image_layers(self) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)
                and not is_attention_layer(layer)]

    def make_request(
        self,
        layer_name: str,
        model_key: str | None = None,
        device: str = "auto",
        tile: int | None = None,
        whole_stack: bool = False,
        attention: bool = False,
        channel_axis: int | None = None,
    ) -> Request:
        """Snapshot a request; ``model_key`` and ``tile`` default to the session's.

        A Cancel from before this request is forgotten here, on the GUI thread; a Cancel
        after it counts even while the worker has not started yet.
        """
        self.cancel_event.clear()
        if not layer_name or layer_name not in self.viewer.layers:
            raise BadInputError("choose an image layer to segment")
        model_key = model_key or self.session.current_model()
        if not model_key:
            raise BadInputError("choose a model (no presets or saved models found)")
        tile = int(tile or self.session.tile)
        layer = self.viewer.layers[layer_name]
        levels = lazy_levels(layer)
        if levels is not None:
            return self._lazy_request(layer, levels, model_key, device, tile, attention, channel_axis)
        inp = layer_input(layer, channel_axis)
        slices = None
        if len(inp.spatial_shape) == 3 and not whole_stack:
            slices = [current_index(self.viewer, layer, 0 if channel_axis != 0 else 1)]
        elif len(inp.spatial_shape) > 3:
            raise BadInputError(
                f"layer {layer_name!r} has {len(inp.spatial_shape)} spatial dimensions; "
                "segment 2-D images or 3-D stacks"
            )
        return Request(layer_name, model_key, device, tile, attention, inp, slices, layer.unique_id)

    def _lazy_request(self, layer, levels, model_key, device, tile, attention, channel_axis) -> Request:
        """A layer bigger than memory: blocks into a Zarr store, labels opened lazily."""
        if getattr(layer, "rgb", False) or channel_axis is not None:
            raise BadInputError(f"layer {layer.name!r} is segmented block by block, which takes one "
                                "channel: open one channel as its own layer")
        if attention:
            raise BadInputError(f"layer {layer.name!r} is too big for attention maps "
                                f"({levels[0].shape}); untick Attention maps to segment it block by block")
        shape = tuple(levels[0].shape)
        path = getattr(getattr(layer, "source", None), "path", None)
        name = f"{path or layer.name} {shape}"
        empty = LayerInput(np.zeros((0,) * len(shape), np.uint8), None, tuple(layer.scale),
                           tuple(layer.translate), shape)
        return Request(layer.name, model_key, device, tile, False, empty, None, layer.unique_id,
                       lazy=levels, store=store_for(layer, name), source_name=name)

    def run(self, request: Request, progress=None):
        """Engine call (worker thread); None when cancelled.

        ``progress(info)`` gets the engine's progress dicts.
        """
        from ..engine.inference.segment import segment

        if self.cancel_event.is_set():  # cancelled while the worker waited for a thread
            return None

        def callback(info):
            if progress is not None:
                progress(info)
            return not self.cancel_event.is_set()

        model = self.model(request.model_key)
        if request.lazy is not None:
            return self._run_blocks(request, model, progress)
        try:
            return segment(
                request.input.data,
                model,
                device=request.device,
                tile=request.tile,
                channel_axis=request.input.channel_axis,
                slices=request.slices,
                attention=request.attention,
                callback=callback,
            )
        except Cancelled:
            return None

    def _run_blocks(self, request: Request, model, progress) -> StoreSegmentation | None:
        import zarr

        from ..engine.devices import describe_device, resolve_device
        from ..engine.scale.zarrseg import segment_zarr

        def on_block(done: int, total: int) -> bool:
            if progress is not None:
                progress({"total": total, "done": done, "message": "Segment (blocks)"})
            return not self.cancel_event.is_set()

        report = segment_zarr(request.lazy, request.store, model, tile=request.tile, device=request.device,
                              on_block=on_block, source_name=request.source_name)
        if not report.complete:
            return None  # cancelled: the store stays, marked incomplete; the same click resumes it
        labels = zarr.open_array(str(request.store / "0"), mode="r+")
        return StoreSegmentation(labels, request.store, report, describe_device(resolve_device(request.device)),
                                 bool(model.instances), report.seconds)

    def run_and_prepare(self, request: Request, progress=None):
        """:meth:`run`, then :meth:`prepare` (worker thread): (result, steps), or None when cancelled."""
        result = self.run(request, progress)
        if result is None:
            return None
        return result, self.prepare(request, result)

    # results into layers ------------------------------------------------------
    def prepare(self, request: Request, result) -> list[Step]:
        """Build the layers for ``result`` (worker thread); the returned steps add them (GUI thread).

        The first step checks that the input layer still exists and raises
        :class:`BadInputError` otherwise, before any layer is touched.
        """
        from napari.layers import Image, Labels

        steps = [Step("check", lambda: self._check_input(request, result))]
        name = labels_name(request.layer_name)
        if isinstance(result, StoreSegmentation):  # never read into memory; always a layer of its own
            layer = Labels(result.labels, name=name, scale=request.input.scale, translate=request.input.translate,
                           metadata={"jointattn_store": str(result.store)})
            steps.append(Step("labels", lambda layer=layer: self._add(layer)))
            return steps
        labels = np.asarray(result.labels)
        existing = self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401
        like = request.input
        if isinstance(existing, Labels) and existing.data.shape == labels.shape:
            steps.append(Step("labels", self._update_step(existing, labels, request.slices)))
        else:
            layer = Labels(labels.astype(LABELS_DTYPE, copy=False), name=name, scale=like.scale,
                           translate=like.translate, metadata={PREDICTION_KEY: labels})
            steps.append(Step("labels", lambda layer=layer: self._add(layer)))
        if request.attention:
            shown = {}
            for name, data in result.attention.items():
                key = result.attention_keys[name]
                lname = attention_layer_name(key)
                small, scale, translate = downsample(data, like.scale, like.translate,
                                                     attention_factor(data.shape))
                shown[name] = small
                meta = {"jointattn_source": request.layer_name, ATTENTION_KEY: key,
                        "jointattn_downsampled": attention_factor(data.shape)}
                old = self._attention_layer(key, small.shape)
                if old is not None:
                    steps.append(Step(lname, self._replace_step(old, small, scale, translate, meta)))
                else:
                    layer = Image(small, name=lname, colormap=_colormap(key), blending="additive", opacity=0.5,
                                  contrast_limits=_limits(key, small), scale=scale, translate=translate,
                                  metadata=meta, visible=key.map == "pointwise")
                    # under the labels: the heatmaps never cover the result, nor push it out of
                    # view at the top of the layer list
                    steps.append(Step(lname, lambda layer=layer: self._add(layer, below=labels_name(request.layer_name))))
            result.attention = shown  # the full-size maps of a huge image are not kept
        return steps

    def _attention_layer(self, key: AttentionKey, shape: tuple):
        """The attention layer showing map ``key`` at ``shape``, whatever it is called now; None
        when there is none (a layer that only has such a name is not one)."""
        from napari.layers import Image

        return next((layer for layer in self.viewer.layers if isinstance(layer, Image)
                     and attention_key(layer) == key and layer.data.shape == shape), None)

    def _check_input(self, request: Request, result) -> None:
        layers = self.viewer.layers
        if request.layer_name not in layers or layers[request.layer_name].unique_id != request.layer_id:
            raise BadInputError(
                f"the input layer {request.layer_name!r} was removed while segmenting; result discarded"
            )
        self.device_used = result.device
        self.last_result = result
        self.last_request = request

    def _add(self, layer, below: str | None = None):
        """Add ``layer`` on top, or just under the layer named ``below`` when there is one."""
        layers = self.viewer.layers
        if layer.name in layers:  # a layer of another kind or shape took the name
            i = 1
            while f"{layer.name} [{i}]" in layers:
                i += 1
            layer.name = f"{layer.name} [{i}]"
        if below is not None and below in layers:
            layers.insert(layers.index(below), layer)
        else:
            layers.append(layer)
        return layer

    @staticmethod
    def _update_step(layer, labels: np.ndarray, slices):
        """Where ``labels`` differ from the layer now (worked out here, in the worker thread);
        the step writes them as one undoable edit."""
        current = np.asarray(layer.data)
        if slices is not None:
            region = np.zeros(labels.shape, bool)
            region[list(slices)] = True
            changed = (current != labels) & region
        else:
            changed = current != labels
        idx = np.nonzero(changed)
        values = labels[changed]
        del changed

        def run():
            data = np.asarray(layer.data)
            if data.dtype.kind in "iu" and values.size and values.max() > np.iinfo(data.dtype).max:
                layer.data = data.astype(LABELS_DTYPE)
            if idx[0].size:
                layer.data_setitem(idx, values)
            layer.metadata[PREDICTION_KEY] = labels
            return layer

        return run

    @staticmethod
    def _replace_step(layer, data, scale, translate, meta):
        def run():
            layer.data = data
            layer.scale = scale
            layer.translate = translate
            layer.metadata.update(meta)
            return layer

        return run

    def apply(self, request: Request, result) -> list:
        """Put a result into layers all at once (GUI thread; for scripts and tests)."""
        return [layer for step in self.prepare(request, result)
                if (layer := step.run()) is not None]

    # query mode -----------------------------------------------------------------
    def query_request(self, layer_name: str, model_key: str | None, world_position,
                      tile: int | None = None, channel_axis: int | None = None) -> QueryRequest:
        """Snapshot a query-mode click at ``world_position`` (GUI thread; reads no pixels)."""
        if not layer_name or layer_name not in self.viewer.layers:
            raise BadInputError("choose an image layer first")
        model_key = model_key or self.session.current_model()
        if not model_key:
            raise BadInputError("choose a model (no presets or saved models found)")
        layer = self.viewer.layers[layer_name]
        inp = layer_input(layer, channel_axis)
        if len(inp.spatial_shape) not in (2, 3):
            raise BadInputError("query mode works on 2-D images and 3-D stacks")
        coords = np.asarray(layer.world_to_data(world_position))
        if inp.channel_axis is not None and not getattr(layer, "rgb", False):
            coords = np.delete(coords, inp.channel_axis)
        coords = coords[-len(inp.spatial_shape):]
        z = round(float(coords[0])) if len(inp.spatial_shape) == 3 else None
        point = (int(np.floor(coords[-2] + 0.5)), int(np.floor(coords[-1] + 0.5)))
        tile = int(tile or self.session.tile)
        return QueryRequest(layer.unique_id, model_key, tile, inp, point, z)

    def query(self, request: QueryRequest):
        """Where the clicked pixel's global attention looks: (QueryResult, LayerInput) (worker
        thread: only ``request`` is read).

        The first click in a tile costs one forward pass of that tile, later
        clicks in it a single attention row.
        """
        from ..engine.inference.query import AttentionQuery

        inp = request.input
        key = (request.layer_id, request.model_key, request.tile, inp.channel_axis)
        if self._query_key != key:
            self._query = AttentionQuery(self.model(request.model_key), inp.data, tile=request.tile,
                                         channel_axis=inp.channel_axis)
            self._query_key = key
        return self._query.query(request.point, request.slice_index), inp

    def show_query(self, result, inp: LayerInput):
        """Put a query heatmap into the ``attention query`` layers over its tile (GUI thread).

        The two layers are found by their metadata, so renaming them is harmless and a
        user's layer of the same name is left alone. Returns the layer of the row.
        """
        from napari.layers import Image

        scale = inp.scale[-2:]
        translate = tuple(t + o * sc for t, o, sc in zip(inp.translate[-2:], result.origin, scale))
        top = max(float(result.heatmap.max()), 1e-12)
        # where the pixel looks (the softmax row), and the row as the prediction uses it (times
        # gamma and the mixing weight), on the same scale: a faint "used" layer is a row barely used
        shown = {}
        for role, heat, visible in (("row", result.heatmap / top, False),
                                    ("used", result.used / top, True)):
            layer = next((layer for layer in self.viewer.layers
                          if layer.metadata.get(QUERY_KEY) == role), None)
            if layer is not None:
                layer.data = heat
                layer.translate = translate
                layer.scale = scale
            else:
                name = f"{ATTENTION_PREFIX}query" + ("" if role == "row" else " used")
                layer = self._add(Image(heat, name=name, colormap="magma", blending="additive",
                                        opacity=0.8, contrast_limits=(0.0, 1.0), scale=scale,
                                        translate=translate, visible=visible,
                                        metadata={QUERY_KEY: role}))
            layer.metadata.update({"module": result.module, "origin": result.origin,
                                   "slice": result.slice_index, "weight": result.weight})
            shown[role] = layer
        return shown["row"]
