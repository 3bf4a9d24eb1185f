"""The Segment dock: pick an image, a model and a device; click Segment.

A thin Qt front on :class:`~napari_jointattn.controllers.segment.SegmentController`.
The model is loaded and run once in a worker thread as soon as the dock opens
or the model changes, so the first click does not pay for it; segmentation
and building the result layers run in a worker too, and the layers are added
one per event-loop turn, so the viewer never freezes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer
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

from ..controllers import gc_hold
from ..controllers.layers import attention_key, attention_layers
from ..controllers.segment import ATTENTION_LEGEND, Request, SegmentController
from ..controllers.session import DEFAULT_TILE
from ..engine.errors import BadInputError
from . import _workers

DEVICES = ("auto", "cpu", "cuda", "mps")
#: pause between adding result layers, so the canvas draws (and uploads) one layer at a time
STEP_DELAY_MS = 15


def _thaw(*_) -> None:
    gc_hold.thaw()



class SegmentDock(_workers.WorkerDockMixin, QWidget):
    """napari dock widget titled "Segment"."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.controller = SegmentController(napari_viewer)
        self.session = self.controller.session
        self.worker = None
        self.warm_worker = None
        self.fit_worker = None
        self.query_worker = None
        self._query_pending = None  # the world position of the latest click made during a query
        self._model_by_user = False  # a model the user picked is never replaced by a suggestion
        self._fit_pending: tuple | None = None
        self._warming: tuple | None = None  # (model, tile, device) being warmed
        self._progress = None
        self._steps: list = []
        self._worker_running = False
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
        self.tile_spin.setValue(self.session.tile or DEFAULT_TILE)
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
        self.fit_label = QLabel("")
        self.fit_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.browse_button)
        form.addRow("Model", model_row)
        form.addRow("", self.fit_label)
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
        self.attention_legend = QLabel(ATTENTION_LEGEND)
        self.attention_legend.setWordWrap(True)
        self.attention_legend.setVisible(False)
        layout.addWidget(self.attention_legend)
        layout.addWidget(self.query_check)
        layout.addLayout(buttons)
        layout.addWidget(self.device_label)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.segment_button.clicked.connect(self.segment)
        self.cancel_button.clicked.connect(self.cancel)
        self.browse_button.clicked.connect(self._browse)
        self.image_combo.currentTextChanged.connect(self._update_channel_choices)
        self.image_combo.currentTextChanged.connect(self.check_fit)
        self.model_combo.activated.connect(self._user_chose_model)
        self.attention_check.toggled.connect(self._toggle_attention_layers)
        self.attention_check.toggled.connect(self.attention_legend.setVisible)
        self.query_check.toggled.connect(self._toggle_query)
        self.model_combo.currentIndexChanged.connect(self._model_chosen)
        self.tile_spin.valueChanged.connect(self._tile_chosen)
        self.device_combo.currentTextChanged.connect(lambda *_: self.warm_up())
        self.session.model_changed.connect(self._session_model_changed)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            ev.connect(self.refresh_layers)
        events.removed.connect(_thaw)  # a removed layer's data may sit in frozen cycles (see gc_hold)
        self.viewer.layers.selection.events.active.connect(self._follow_selection)
        self.refresh_layers()
        self.refresh_models(select=self.session.current_model())
        # closing the dock or the viewer cancels a run (its worker thread stops by itself)
        cancel = self.controller.cancel_event.set
        self.destroyed.connect(lambda *_: cancel())
        self.warm_up()
        self.check_fit()

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
        if self.image_combo.currentText() != current:
            self.check_fit()

    def refresh_models(self, select: str | None = None) -> None:
        select = select or self.model_combo.currentData() or self.session.current_model()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for label, key in self.controller.model_choices():
            self.model_combo.addItem(label, key)
        i = self.model_combo.findData(select) if select is not None else -1
        self.model_combo.setCurrentIndex(max(i, 0) if self.model_combo.count() else -1)
        self.model_combo.blockSignals(False)
        self._model_chosen()

    def set_model(self, key: str, chosen: bool = True) -> None:
        """Make ``key`` (a preset or model file) the current model of this viewer.

        ``chosen``: the user's (or a script's) choice, never replaced by a suggestion."""
        self._model_by_user = self._model_by_user or chosen
        self.refresh_models(select=str(key))  # the combo first: the session's signal then agrees
        self.session.set_model(str(key))

    def _model_chosen(self, *_) -> None:
        key = self.model_combo.currentData()
        if key and key != self.session.model_key:
            self.session.set_model(key)  # -> _session_model_changed -> warm_up
        elif key:
            self.warm_up()

    def _session_model_changed(self, key: str) -> None:
        if self.model_combo.currentData() != key:  # handed over by fine-tuning or a rollback
            self._model_by_user = True
            self.refresh_models(select=key)
        else:
            self.warm_up()

    def _user_chose_model(self, *_) -> None:
        self._model_by_user = True
        self.check_fit()

    def check_fit(self, *_) -> None:
        """Check (in a worker thread) whether the chosen image fits the model; until the user
        picks a model, switch to the preset that fits the image. Warnings are shown in the dock."""
        query = self.controller.fit_query(self.image_combo.currentText(), self.model_combo.currentData(),
                                          may_switch=not self._model_by_user)
        if query is None:
            self.fit_label.setText("")
            return
        if self.fit_worker is not None:  # one at a time: check the latest choice when it ends
            self._fit_pending = query
            return
        from ..controllers.segment import fit_advice

        def finished():
            self.fit_worker = None
            if self._fit_pending is not None:
                self._fit_pending = None
                self.check_fit()

        self.fit_worker = _workers.start(lambda: fit_advice(query), self._show_fit,
                                         lambda exc: None, finished, owner=self)

    def _show_fit(self, advice: dict) -> None:
        if self._fit_pending is not None:
            return  # stale: a newer check follows
        key = advice["model"]
        if key and key != self.model_combo.currentData() and not self._model_by_user:
            self.set_model(key, chosen=False)
        self.fit_label.setText("\n".join(f"⚠ {w}" for w in advice["warnings"]))

    def _tile_chosen(self, value: int) -> None:
        self.session.tile = int(value)
        self.warm_up()

    def warm_up(self) -> None:
        """Load the current model and run its first forward pass in a worker thread."""
        key, tile, device = self.model_combo.currentData(), self.tile_spin.value(), self.device_combo.currentText()
        token = (key, tile, device)
        if not key or _workers.synchronous() or token == self._warming:
            return
        self._warming = token

        def finished():
            if self._warming == token:
                self._warming = None

        self.warm_worker = _workers.start(lambda: self.controller.warm(key, tile, device),
                                          lambda ok: None, lambda exc: None, finished, owner=self)

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
            self.add_model_file(path)

    def add_model_file(self, path: str) -> None:
        """Check a model file in a worker thread, then list it and make it current."""
        self.status.setText(f"Checking {Path(path).name}…")

        def done(_):
            self.status.setText("")
            self.refresh_models(select=path)

        _workers.start(lambda: self.controller.add_model_file(path), done,
                       lambda exc: self._notify_error(str(exc)), lambda: None, owner=self)

    # run ---------------------------------------------------------------------
    def segment(self) -> None:
        if self.controller.running:
            return  # one run at a time per dock
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
        self._worker_running = True
        self._steps = []
        gc_hold.settle()  # no full garbage collection freezes the window during the run (see gc_hold)
        self.segment_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"Segmenting {request.layer_name}…")
        from napari.utils import progress

        self._progress = progress(total=0, desc="Segment")
        self.worker = _workers.start(
            lambda: self.controller.run_and_prepare(request, self._bridge.progress.emit),
            lambda value: self._done(request, value),
            self._error,
            self._worker_finished,
            owner=self,
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

    def _done(self, request: Request, value) -> None:
        if value is None or self.controller.cancel_event.is_set():
            if request.store is not None:
                self.status.setText(f"Cancelled: no layer was changed; {request.store} is marked incomplete "
                                    "and Segment resumes it.")
            else:
                self.status.setText("Cancelled: no layer was changed.")
            return
        result, steps = value
        self.status.setText(f"{request.layer_name}: adding layers…")
        self._steps = list(steps)
        self._result = (request, result)
        QTimer.singleShot(0, _workers.while_alive(self, self._next_step))

    def _next_step(self) -> None:
        """Run one GUI-thread step (adds or updates one layer); the next comes on a later turn."""
        if not self._steps:
            return
        step = self._steps.pop(0)
        try:
            step.run()
        except Exception as exc:  # noqa: BLE001  (the run must end, whatever a layer raised)
            self._steps = []
            self._error(exc)
            self._maybe_end()
            return
        if self._steps:
            QTimer.singleShot(STEP_DELAY_MS, _workers.while_alive(self, self._next_step))
            return
        self._report(*self._result)
        self._maybe_end()

    def _report(self, request: Request, result) -> None:
        self.device_label.setText(f"Device used: {result.device}")
        if getattr(result, "store", None) is not None:  # block by block, into a Zarr store
            from ..engine.scale.zarrseg import describe

            self.status.setText(f"{request.layer_name}: {describe(result.report)}; labels in {result.store}")
            return
        n = int(result.labels.max()) if result.instances else int(np.unique(result.labels).size - 1)
        what = "objects" if result.instances else "classes"
        text = f"{request.layer_name}: {n} {what} in {result.seconds:.1f} s on {result.device}"
        if getattr(result, "attention_changed", None) is not None:
            from ..engine.evaluation.knockout import describe_share

            text += f". {describe_share(result.attention_changed).capitalize()}."
        self.status.setText(text)
        from napari.utils.notifications import show_warning

        for note in result.notes:
            show_warning(note)

    def _error(self, exc: BaseException) -> None:
        if isinstance(exc, BadInputError):
            self._notify_error(str(exc))
            return
        self._notify_error(f"Segmentation failed: {type(exc).__name__}: {exc}")

    def _worker_finished(self) -> None:
        self._worker_running = False
        self._maybe_end()

    def _maybe_end(self) -> None:
        """The run ends when the worker has finished and every layer step has run."""
        if self._worker_running or self._steps:
            return
        self._end_run()
        self.segment_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    # query mode -------------------------------------------------------------
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

    def query_at(self, world_position) -> None:
        """Show where the pixel at ``world_position`` looks (query mode's click).

        The attention row is computed in a worker thread (the first click in a
        tile runs that tile through the network); clicks made meanwhile are
        merged: only the latest is shown next.
        """
        if self.query_worker is not None:
            self._query_pending = world_position
            return
        try:
            request = self.controller.query_request(
                self.image_combo.currentText(), self.model_combo.currentData(), world_position,
                self.tile_spin.value(), self.channel_combo.currentData())
        except BadInputError as exc:
            self._notify_error(str(exc))
            return
        self.status.setText("Query: computing where this pixel looks…")

        def finished():
            self.query_worker = None
            if self._query_pending is not None:
                pending, self._query_pending = self._query_pending, None
                self.query_at(pending)

        self.query_worker = _workers.start(lambda: self.controller.query(request), self._show_query,
                                           self._error, finished, owner=self)

    def _show_query(self, value) -> None:
        result, inp = value
        self.controller.show_query(result, inp)
        self.status.setText(
            f"Query ({result.module}): where this pixel looks ('attention query'); its global context "
            f"enters the features with weight {result.weight:.3g} (gamma x mixing), shown in "
            "'attention query used'")

    def _toggle_attention_layers(self, checked: bool) -> None:
        for layer in attention_layers(self.viewer):
            if attention_key(layer).map == "pointwise":  # shown by default; mix and effect stay
                layer.visible = checked
