"""The Segment dock: pick an image, a model and a device; click Segment.

:class:`SegmentController` holds the workflow state and does the layer work
(no Qt); :class:`SegmentDock` is the thin Qt front. Engine calls run in a
napari thread worker, so the viewer stays responsive.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..engine.errors import BadInputError, Cancelled
from ..engine.models import PRESET_DIR, MODEL_SUFFIX, load_model, saved_models
from ..engine.presets import PRESETS
from . import _workers
from .layers import LayerInput, current_index, labels_name, layer_input, show_attention, write_labels

DEVICES = ("auto", "cpu", "cuda", "mps")


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


class SegmentController:
    """State and logic of the Segment dock; usable without Qt widgets."""

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self.extra_models: list[str] = []
        self.current_model: str | None = None
        self.running = False
        self.cancel_event = threading.Event()
        self.last_result = None
        self.last_request: Request | None = None
        self.device_used: str | None = None
        self._cache: dict[str, tuple[float, object]] = {}

    # models -----------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        """(label, key) for presets with weights, saved models, and browsed files."""
        out = []
        for name in PRESETS:
            if (PRESET_DIR / f"{name}{MODEL_SUFFIX}").is_file():
                out.append((f"{name} (preset)", name))
        for path in saved_models():
            out.append((path.stem, str(path)))
        for path in self.extra_models:
            if path not in [k for _, k in out]:
                out.append((Path(path).name, path))
        return out

    def add_model_file(self, path: str) -> str:
        load_model(path)  # validates; raises BadInputError
        if path not in self.extra_models:
            self.extra_models.append(path)
        self.current_model = path
        return path

    def model(self, key: str):
        """Load (and cache by modification time) a model by preset name or path."""
        path = Path(key)
        stamp = path.stat().st_mtime if path.is_file() else 0.0
        cached = self._cache.get(key)
        if cached is None or cached[0] != stamp:
            self._cache[key] = (stamp, load_model(key))
        return self._cache[key][1]

    # requests -----------------------------------------------------------
    def image_layers(self) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)
                and not layer.name.startswith("attention ")]

    def make_request(
        self,
        layer_name: str,
        model_key: str,
        device: str = "auto",
        tile: int = 512,
        whole_stack: bool = False,
        attention: bool = False,
        channel_axis: int | None = None,
    ) -> Request:
        if not layer_name or layer_name not in self.viewer.layers:
            raise BadInputError("choose an image layer to segment")
        if not model_key:
            raise BadInputError("choose a model (no presets or saved models found)")
        layer = self.viewer.layers[layer_name]
        inp = layer_input(layer, channel_axis)
        slices = None
        if len(inp.spatial_shape) == 3 and not whole_stack:
            slices = [current_index(self.viewer, layer, 0 if channel_axis != 0 else 1)]
        elif len(inp.spatial_shape) > 3:
            raise BadInputError(
                f"layer {layer_name!r} has {len(inp.spatial_shape)} spatial dimensions; "
                "segment 2-D images or 3-D stacks"
            )
        return Request(layer_name, model_key, device, int(tile), attention, inp, slices, layer.unique_id)

    def run(self, request: Request, progress=None):
        """Engine call (worker thread); None when cancelled.

        ``progress(info)`` gets the engine's progress dicts.
        """
        from ..engine.inference import segment

        self.cancel_event.clear()

        def callback(info):
            if progress is not None:
                progress(info)
            return not self.cancel_event.is_set()

        model = self.model(request.model_key)
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

    def query(self, layer_name: str, model_key: str, world_position, tile: int = 512,
              channel_axis: int | None = None):
        """Where the clicked pixel's global attention looks: (QueryResult, LayerInput).

        Runs on the GUI thread: the first click in a tile costs one forward
        pass of that tile, later clicks in it a single attention row.
        """
        from ..engine.query import AttentionQuery

        if layer_name not in self.viewer.layers:
            raise BadInputError("choose an image layer first")
        layer = self.viewer.layers[layer_name]
        inp = layer_input(layer, channel_axis)
        if len(inp.spatial_shape) not in (2, 3):
            raise BadInputError("query mode works on 2-D images and 3-D stacks")
        key = (layer.unique_id, model_key, int(tile), inp.channel_axis)
        if getattr(self, "_query_key", None) != key:
            self._query = AttentionQuery(self.model(model_key), inp.data, tile=tile,
                                         channel_axis=inp.channel_axis)
            self._query_key = key
        coords = np.asarray(layer.world_to_data(world_position))
        if inp.channel_axis is not None and not getattr(layer, "rgb", False):
            coords = np.delete(coords, inp.channel_axis)
        coords = coords[-len(inp.spatial_shape):]
        z = int(round(coords[0])) if len(inp.spatial_shape) == 3 else None
        point = (int(np.floor(coords[-2] + 0.5)), int(np.floor(coords[-1] + 0.5)))
        return self._query.query(point, z), inp

    def show_query(self, result, inp: LayerInput):
        """Put a query heatmap into the ``attention query`` layer over its tile."""
        scale = inp.scale[-2:]
        translate = tuple(t + o * sc for t, o, sc in zip(inp.translate[-2:], result.origin, scale))
        name = "attention query"
        heat = result.heatmap / max(float(result.heatmap.max()), 1e-12)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = heat
            layer.translate = translate
            layer.scale = scale
        else:
            layer = self.viewer.add_image(heat, name=name, colormap="magma", blending="additive",
                                          opacity=0.8, contrast_limits=(0.0, 1.0), scale=scale,
                                          translate=translate)
        layer.metadata.update({"module": result.module, "origin": result.origin,
                               "slice": result.slice_index})
        return layer

    def apply(self, request: Request, result) -> list:
        """Put a result into layers (GUI thread). Returns the layers touched."""
        layers = self.viewer.layers
        if request.layer_name not in layers or layers[request.layer_name].unique_id != request.layer_id:
            raise BadInputError(
                f"the input layer {request.layer_name!r} was removed while segmenting; result discarded"
            )
        self.device_used = result.device
        self.last_result = result
        self.last_request = request
        layer = write_labels(self.viewer, labels_name(request.layer_name), result.labels,
                             request.input, request.slices)
        # what the model said, so the Fine-tune dock can find the user's corrections
        layer.metadata["jointattn_prediction"] = result.labels
        out = [layer]
        if request.attention:
            out += show_attention(self.viewer, request.layer_name, result.attention, request.input)
        return out


class SegmentDock(_workers.WorkerDockMixin, QWidget):
    """napari dock widget titled "Segment"."""

    #: live docks, so the Fine-tune dock can hand over a new model
    instances: "weakref.WeakSet[SegmentDock]" = weakref.WeakSet()

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        SegmentDock.instances.add(self)
        self.viewer = napari_viewer
        self.controller = SegmentController(napari_viewer)
        self.worker = None
        self._progress = None
        self._bridge = _workers.ProgressBridge()
        self._bridge.progress.connect(self._on_progress)

        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        self.browse_button = QPushButton("Browse…")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(64, 4096)
        self.tile_spin.setSingleStep(64)
        self.tile_spin.setValue(512)
        self.channel_combo = QComboBox()
        self.stack_combo = QComboBox()
        self.stack_combo.addItems(["current slice", "whole stack"])
        self.attention_check = QCheckBox("Show attention")
        self.query_check = QCheckBox("Query mode: click a pixel to see where it looks")
        self.segment_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.device_label = QLabel("Device used: –")

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.browse_button)
        form.addRow("Model", model_row)
        form.addRow("Device", self.device_combo)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("Channel axis", self.channel_combo)
        form.addRow("3-D data", self.stack_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.attention_check)
        layout.addWidget(self.query_check)
        layout.addLayout(buttons)
        layout.addWidget(self.device_label)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.segment_button.clicked.connect(self.segment)
        self.cancel_button.clicked.connect(self.cancel)
        self.browse_button.clicked.connect(self._browse)
        self.image_combo.currentTextChanged.connect(self._update_channel_choices)
        self.attention_check.toggled.connect(self._toggle_attention_layers)
        self.query_check.toggled.connect(self._toggle_query)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            ev.connect(self.refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._follow_selection)
        self.refresh_layers()
        self.refresh_models()

    # choices ----------------------------------------------------------------
    def refresh_layers(self, event=None) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in self.controller.image_layers()]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        active = self.viewer.layers.selection.active
        pick = active.name if active is not None and active.name in names else current
        if pick in names:
            self.image_combo.setCurrentText(pick)
        self.image_combo.blockSignals(False)
        self._update_channel_choices()

    def refresh_models(self, select: str | None = None) -> None:
        select = select or self.model_combo.currentData() or self.controller.current_model
        self.model_combo.clear()
        for label, key in self.controller.model_choices():
            self.model_combo.addItem(label, key)
        if select is not None:
            i = self.model_combo.findData(select)
            if i >= 0:
                self.model_combo.setCurrentIndex(i)

    def set_model(self, key: str) -> None:
        """Make ``key`` (a preset or model file) the current model."""
        if Path(key).is_file() and key not in [k for _, k in self.controller.model_choices()]:
            self.controller.add_model_file(key)
        self.controller.current_model = key
        self.refresh_models(select=key)

    def _follow_selection(self, event=None) -> None:
        active = self.viewer.layers.selection.active
        if active is not None and self.image_combo.findText(active.name) >= 0:
            self.image_combo.setCurrentText(active.name)

    def _update_channel_choices(self, *_):
        name = self.image_combo.currentText()
        self.channel_combo.clear()
        self.channel_combo.addItem("none / RGB", None)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if not getattr(layer, "rgb", False):
                for i, n in enumerate(layer.data.shape):
                    if n <= 16 and layer.data.ndim >= 3:
                        self.channel_combo.addItem(f"axis {i} ({n})", i)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open model", "", "Model files (*.safetensors)")
        if path:
            try:
                self.controller.add_model_file(path)
            except BadInputError as exc:
                self._notify_error(str(exc))
                return
            self.refresh_models(select=path)

    # run ---------------------------------------------------------------------
    def segment(self) -> None:
        if self.controller.running:
            return  # one worker at a time per dock
        try:
            request = self.controller.make_request(
                self.image_combo.currentText(),
                self.model_combo.currentData(),
                self.device_combo.currentText(),
                self.tile_spin.value(),
                self.stack_combo.currentText() == "whole stack",
                self.attention_check.isChecked(),
                self.channel_combo.currentData(),
            )
        except BadInputError as exc:
            self._notify_error(str(exc))
            return
        self.controller.running = True
        self.segment_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"Segmenting {request.layer_name}…")
        from napari.utils import progress

        self._progress = progress(total=0, desc="Segment")
        self.worker = _workers.start(
            lambda: self.controller.run(request, self._bridge.progress.emit),
            lambda result: self._done(request, result),
            self._error,
            self._finished,
        )

    def cancel(self) -> None:
        if self.controller.running:
            self.controller.cancel_event.set()
            self.status.setText("Cancelling…")

    def _on_progress(self, info: dict) -> None:
        bar = self._progress
        if bar is None:  # a late signal after the run ended
            return
        bar.total = max(1, int(info.get("total", 1)))
        bar.n = int(info.get("done", 0))
        bar.set_description(info.get("message", "Segment"))

    def _done(self, request: Request, result) -> None:
        if result is None:
            self.status.setText("Cancelled: no layer was changed.")
            return
        try:
            self.controller.apply(request, result)
        except BadInputError as exc:
            self._notify_error(str(exc))
            return
        self.device_label.setText(f"Device used: {result.device}")
        n = int(result.labels.max()) if result.instances else int(np.unique(result.labels).size - 1)
        what = "objects" if result.instances else "classes"
        self.status.setText(f"{request.layer_name}: {n} {what} in {result.seconds:.1f} s on {result.device}")
        from napari.utils.notifications import show_warning

        for note in result.notes:
            show_warning(note)

    def _error(self, exc: BaseException) -> None:
        if isinstance(exc, BadInputError):
            self._notify_error(str(exc))
            return
        self._notify_error(f"Segmentation failed: {type(exc).__name__}: {exc}")

    def _finished(self) -> None:
        self._end_run()
        self.segment_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _toggle_query(self, checked: bool) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        if checked and self._on_click not in callbacks:
            callbacks.append(self._on_click)
        elif not checked and self._on_click in callbacks:
            callbacks.remove(self._on_click)

    def _on_click(self, viewer, event) -> None:
        if event.type != "mouse_press":
            return
        self.query_at(event.position)

    def query_at(self, world_position):
        """Show where the pixel at ``world_position`` looks (query mode's click)."""
        try:
            result, inp = self.controller.query(
                self.image_combo.currentText(), self.model_combo.currentData(), world_position,
                self.tile_spin.value(), self.channel_combo.currentData(),
            )
        except BadInputError as exc:
            self._notify_error(str(exc))
            return None
        layer = self.controller.show_query(result, inp)
        self.status.setText(f"Query: where this pixel looks ({result.module}, tile at {result.origin})")
        return layer

    def _toggle_attention_layers(self, checked: bool) -> None:
        from .layers import attention_layers

        for layer in attention_layers(self.viewer):
            if not layer.name.endswith(" mix"):
                layer.visible = checked
