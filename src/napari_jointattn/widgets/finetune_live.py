"""The Fine-tune dock's live panel: *Learn while I paint*.

A thin Qt view on :class:`~napari_jointattn.controllers.live.LiveController`:
it connects the labels layer's events to the controller's recording methods,
hands the annotations over after a pause in painting (debounced), runs the
live loop on a thread of its own and shows what the loop reports with the
controller's methods (the live prediction and uncertainty layers, *Next*).
"""

from __future__ import annotations

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
)

from ..controllers import gc_hold
from ..controllers.finetune import FinetuneController
from ..controllers.live import (
    ANNOTATED_CHOICES,
    GUIDES,
    PAINTED,
    LiveController,
    LiveOutcome,
    Target,
)
from ..engine.errors import BadInputError
from . import _workers
from .finetune_train import TrainPanel

#: live mode hands the annotations over this long after the last stroke
LIVE_DEBOUNCE_MS = 500
#: pause between adding the live layers one by one (the event loop runs in between)
LAYER_STEP_MS = 30
LIVE_HINT = ("Paint on the labels layer: what you paint since Start trains the model. "
             "Erase (or paint label 0) to mark background; erase strokes count even over "
             "unlabelled pixels.")


def next_text(target: Target | None) -> str:
    """The status line's words for a *Next* answer."""
    if target is None:
        return "\nNext: every region is annotated or was shown already."
    where = "" if target.z is None else f"slice {target.z}, "
    return (f"\nNext: {where}around row {target.y}, column {target.x} "
            f"({target.guide} {target.score:.2f})")


class LivePanel(QGroupBox):
    """The "Learn while I paint" box: Start/Stop live, what counts as annotated, *Next*.

    It takes the pair, the start model and the device from the training
    panel ``train``. ``running_changed`` says when live mode starts (True)
    and ends (False); ``model_saved`` gives the path of an improved live model.
    """

    running_changed = Signal(bool)
    model_saved = Signal(str)

    def __init__(self, viewer, controller: FinetuneController, live: LiveController,
                 train: TrainPanel) -> None:
        super().__init__("Learn while I paint")
        self.viewer = viewer
        self.controller = controller
        self.live = live
        self.train = train
        #: further live-mode engine settings (batch_size, crop, lr, ...) for scripts and tests
        self.settings: dict = {}
        self.worker = None
        self._layer = None  # the labels layer live mode listens to
        self._erase_capture = None  # its mouse-drag callback, from the controller
        self._submit_timer = QTimer(self)
        self._submit_timer.setSingleShot(True)
        self._submit_timer.setInterval(LIVE_DEBOUNCE_MS)
        self._submit_timer.timeout.connect(self._submit)

        self.live_button = QPushButton("Start live")
        self.live_button.setCheckable(True)
        self.annotated_combo = QComboBox()
        self.annotated_combo.addItems(list(ANNOTATED_CHOICES))
        self.annotated_combo.setCurrentText(PAINTED)
        self.guide_combo = QComboBox()
        self.guide_combo.addItems(list(GUIDES))
        self.guide_combo.setToolTip(
            "What Next ranks regions by: the entropy of the prediction (the uncertainty layer), "
            "or where the joint modules' point-wise and self-attention branches disagree "
            "(models with joint attention)")
        self.next_button = QPushButton("Next")
        self.next_button.setToolTip("Go to the most uncertain region not annotated yet")
        self.next_button.setEnabled(False)
        self.hint = QLabel(LIVE_HINT)
        self.hint.setWordWrap(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Annotated", self.annotated_combo)
        form.addRow("Next by", self.guide_combo)
        row = QHBoxLayout()
        row.addWidget(self.live_button)
        row.addWidget(self.next_button)
        inner = QVBoxLayout(self)
        inner.addLayout(form)
        inner.addWidget(self.hint)
        inner.addLayout(row)
        inner.addWidget(self.status)
        self.live_button.clicked.connect(self.toggle)
        self.next_button.clicked.connect(self.next_region)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self.viewer.dims.events.current_step.connect(self.live.follow_view)

    def toggle(self) -> None:
        if self.live.active:
            self.stop()
        else:
            self.start()

    def start(self) -> None:
        """Check the pair, listen to its labels layer and start the live loop on its own thread."""
        if self.worker is not None:  # the last loop is still ending
            self.live_button.setChecked(True)
            return
        self.live_button.setChecked(False)
        if self.controller.running:
            self._error(BadInputError("a training run is going on: wait for it or stop it first"))
            return
        image, labels = self.train.selected_pair()
        try:
            self.live.start(image, labels, self.train.start_key(),
                            annotated=self.annotated_combo.currentText(),
                            guide=self.guide_combo.currentText(),
                            device=self.train.device_combo.currentText(), **self.settings)
        except BadInputError as exc:
            self._error(exc)
            return
        layer = self.viewer.layers[labels]
        layer.events.paint.connect(self._painted)
        layer.events.data.connect(self._data_replaced)
        self._erase_capture = self.live.erase_capture(self._submit_timer.start)
        layer.mouse_drag_callbacks.append(self._erase_capture)
        self._layer = layer
        self.live.follow_view()
        self.live_button.setChecked(True)
        self.live_button.setText("Stop live")
        self.next_button.setEnabled(True)
        self.annotated_combo.setEnabled(False)
        self.guide_combo.setEnabled(False)
        self.running_changed.emit(True)
        self.status.setText(f"Live on {image} ← {labels}: loading the start model…")
        # napari runs a full garbage collection whenever a layer comes or goes (the live layers
        # do): keep what exists now out of its walk, as the Segment dock does (see gc_hold)
        gc_hold.settle()
        self.worker = _workers.start_loop(self.live.run, self._report, self._done, self._error,
                                          self._finished, owner=self)

    def stop(self, reason: str | None = None) -> None:
        """End the loop; the worker scores the live model and saves it if it improved."""
        if not self.live.active:
            return
        self._submit_timer.stop()
        if self.live.painted is not None:
            try:
                self.live.submit()  # the last strokes count in the scores
            except BadInputError:
                pass
        self.live.stop()
        self.live_button.setEnabled(False)
        self.next_button.setEnabled(False)
        self.status.setText((reason + " " if reason else "") + "Stopping: scoring the live model…")

    def next_region(self) -> None:
        if self.live.active:
            self.live.request_next()
            self.status.setText("Looking for the most uncertain region not annotated yet…")

    # events on the GUI thread
    def _painted(self, event) -> None:
        if self.live.active and self.live.record_paint(getattr(event, "value", None)) >= 0:
            self._submit_timer.start()

    def _data_replaced(self, event=None) -> None:
        if not self.live.active:
            return
        reason = self.live.data_replaced()
        if reason:
            self.stop(reason)
        else:
            self._submit_timer.start()  # undo, redo, a script's edit: hand the labels over again

    def _submit(self) -> None:
        if not self.live.active or self.live.stop_event.is_set():
            return
        try:
            self.live.submit()
        except BadInputError as exc:
            self.stop(str(exc))

    def _layer_removed(self, event=None) -> None:
        if self.live.active and not self.live.stop_event.is_set() and not self.live.pair_present():
            self.stop("A layer of the live pair was removed.")

    # results of the worker
    def _report(self, report: dict) -> None:
        if self.live.pair is None:
            return
        if report.get("prediction") is not None:
            self._show_prediction(report["prediction"])
        if "next" in report:
            self.live.go_to(report["next"])
        loss = "–" if report["loss"] is None else f"{report['loss']:.3f}"
        text = (f"Live: {report['total_steps']} steps, loss {loss}, "
                f"{report['snapshots']} snapshot(s) of {self.live.strokes} stroke(s)")
        if report["waiting"] and self.live.strokes:
            text += f"\nWaiting: {report['waiting']}"
        elif not self.live.strokes:
            text += "\nWaiting: paint some objects and some background"
        if "next" in report:
            self.status.setText(text + next_text(report["next"]))
        elif not self.status.text().startswith("Looking"):
            self.status.setText(text)

    def _show_prediction(self, pred) -> None:
        if self.live.stop_event.is_set():  # stopping (or the window closing): no new layers
            return
        if self.live.show_prediction(pred):  # a layer was added: the rest on a later turn
            later = _workers.while_alive(self, lambda: self._show_prediction(self.live.latest))
            QTimer.singleShot(LAYER_STEP_MS, later)

    def _done(self, outcome: LiveOutcome) -> None:
        from napari.utils.notifications import show_info, show_warning

        warning = self.live.finished(outcome)
        try:
            if warning:
                self.status.setText(warning)
                show_warning(warning)
                return
            self.status.setText(
                f"Saved {outcome.path.name}: Dice on the painted pixels "
                f"{outcome.scores['live']:.3f} "
                f"(start model {outcome.scores['start']:.3f}), {outcome.steps} steps. "
                "The Segment dock now uses it.")
            show_info(f"Live model saved: {outcome.path}")
            self.model_saved.emit(str(outcome.path))
        except RuntimeError:  # the dock was closed meanwhile; the session has the new model
            pass

    def _error(self, exc: BaseException) -> None:
        self.live.reset()
        message = (str(exc) if isinstance(exc, BadInputError)
                   else f"Live mode failed: {type(exc).__name__}: {exc}")
        try:
            self.status.setText(message)
        except RuntimeError:
            pass
        from napari.utils.notifications import show_error

        show_error(message)

    def _finished(self) -> None:
        self.worker = None
        layer, self._layer = self._layer, None
        if layer is not None:
            layer.events.paint.disconnect(self._painted)
            layer.events.data.disconnect(self._data_replaced)
            if self._erase_capture in layer.mouse_drag_callbacks:
                layer.mouse_drag_callbacks.remove(self._erase_capture)
        self._erase_capture = None
        if self.live.active:  # ended without an outcome
            self.live.reset()
        try:
            self.live_button.setEnabled(True)
            self.live_button.setChecked(False)
            self.live_button.setText("Start live")
            self.next_button.setEnabled(False)
            self.annotated_combo.setEnabled(True)
            self.guide_combo.setEnabled(True)
            self.running_changed.emit(False)
        except RuntimeError:
            pass
