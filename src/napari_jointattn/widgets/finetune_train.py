"""The Fine-tune dock's training panel: pairs, summary, settings, Train/Stop, plot, Compare.

A thin Qt view on :class:`~napari_jointattn.controllers.finetune.FinetuneController`:
training, the annotation summary (refreshed shortly after the labels are
edited) and Compare run in worker threads on copies of the layers' data, so
the user can keep painting.
"""

from __future__ import annotations

import time
from pathlib import Path

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..controllers.finetune import (
    CORRECTION_EXTRA,
    CURRENT,
    FinetuneController,
    TrainRequest,
    curves,
    progress_text,
    result_text,
    summary_text,
)
from ..controllers.live import LiveController
from ..engine.errors import BadInputError
from . import _workers
from .finetune_plot import LossPlot
from .segment import DEVICES

#: the summary is recomputed this long after the last edit of a paired labels layer
SUMMARY_DEBOUNCE_MS = 400
#: the status line reports training steps at most this often
PROGRESS_EVERY_S = 1.0
PAIR_HINT = ("Pair an image with any Labels layer of its size (Add pair); "
             "a Labels layer named '<image> labels' pairs by itself.")


def _spin(box, low, high, value, step=None):
    """``box`` (a spin box) with its range, value and step set."""
    box.setRange(low, high)
    box.setValue(value)
    if step is not None:
        box.setSingleStep(step)
    return box


class TrainPanel(_workers.WorkerDockMixin, QWidget):
    """Pairs, summary, training settings, Train/Stop, the loss / validation-Dice plot and Compare.

    ``model_saved`` is emitted with the path of every improved model it saves.
    """

    model_saved = Signal(str)

    def __init__(self, viewer, controller: FinetuneController, live: LiveController) -> None:
        super().__init__()
        self.viewer = viewer
        self.controller = controller
        self.live = live
        #: further engine settings (steps_per_epoch, crop, batch_size, ...) for scripts and tests
        self.advanced: dict = {}
        self.worker = None
        self.summary_worker = None
        self.compare_worker = None
        self.last_summary: dict | None = None
        self._progress = None
        self._last_report = 0.0
        self._summary_timer = QTimer(self)
        self._summary_timer.setSingleShot(True)
        self._summary_timer.setInterval(SUMMARY_DEBOUNCE_MS)
        self._summary_timer.timeout.connect(self.refresh_summary)
        self._summary_again = False
        self._watched: set = set()
        self._bridge = _workers.ProgressBridge()
        self._bridge.progress.connect(self._on_progress)

        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.pairs_list = QListWidget()
        self.pairs_list.setMaximumHeight(70)
        self.add_pair_button = QPushButton("Add pair")
        self.remove_pair_button = QPushButton("Remove")
        self.pair_hint = QLabel(PAIR_HINT)
        self.pair_hint.setWordWrap(True)
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        self.start_combo = QComboBox()
        self.seconds_spin = _spin(QSpinBox(), 5, 24 * 3600, 60)
        self.seconds_spin.setSuffix(" s")
        self.epochs_spin = _spin(QSpinBox(), 1, 10000, 30)
        self.lr_spin = _spin(QDoubleSpinBox(decimals=5), 1e-5, 1e-1, 2e-3, step=1e-4)
        self.val_spin = _spin(QDoubleSpinBox(), 0.05, 0.5, 0.2, step=0.05)
        self.augment_check = QCheckBox("Augmentation")
        self.augment_check.setChecked(True)
        self.weight_check = QCheckBox("Weight my corrections ×5")
        self.weight_check.setToolTip("Pixels where the labels differ from the model's own "
                                     "prediction count five times in the loss")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.train_button = QPushButton("Train")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.compare_button = QPushButton("Compare before/after")
        self.compare_button.setEnabled(False)
        self.plot = LossPlot()

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        pair_row = QHBoxLayout()
        pair_row.addWidget(self.add_pair_button)
        pair_row.addWidget(self.remove_pair_button)
        form.addRow("", pair_row)
        settings = QFormLayout()
        for label, widget in (("Pairs", self.pairs_list), ("Start model", self.start_combo),
                              ("Time budget", self.seconds_spin)):
            settings.addRow(label, widget)
        # the settings most runs leave alone, folded away so that the dock fits a laptop screen
        advanced = QWidget()
        more = QFormLayout(advanced)
        more.setContentsMargins(0, 0, 0, 0)
        for label, widget in (("Epochs", self.epochs_spin), ("Learning rate", self.lr_spin),
                              ("Validation fraction", self.val_spin), ("Device", self.device_combo)):
            more.addRow(label, widget)
        more.addRow(self.augment_check)
        more.addRow(self.weight_check)
        self.advanced_section = QCollapsible("Advanced")
        self.advanced_section.addWidget(advanced)
        self.advanced_section.collapse(animate=False)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(form)
        layout.addWidget(self.pair_hint)
        layout.addLayout(settings)
        for widget in (self.advanced_section, self.summary_label, self.train_button, self.status,
                       self.plot.canvas, self.compare_button):
            layout.addWidget(widget)

        self.train_button.clicked.connect(self.toggle)
        self.add_pair_button.clicked.connect(self.add_pair)
        self.remove_pair_button.clicked.connect(self.remove_pairs)
        self.compare_button.clicked.connect(self.compare)
        self.start_combo.currentIndexChanged.connect(self.schedule_summary)
        self.image_combo.currentTextChanged.connect(self._refresh_labels_choices)
        self.controller.session.model_changed.connect(self._session_model_changed)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed):
            ev.connect(self.refresh_layers)
        self.refresh_layers()

    def set_live(self, live: bool) -> None:
        """While live mode runs: no Train, and the pair it learns from cannot be changed
        (the image, labels, pairs and start model are locked, not just ignored)."""
        for widget in (self.train_button, self.image_combo, self.labels_combo, self.pairs_list,
                       self.add_pair_button, self.remove_pair_button, self.start_combo):
            widget.setEnabled(not live)
        self.image_combo.setToolTip("locked while live mode runs: stop it to choose another image"
                                    if live else "")

    def _redraw(self) -> None:
        self.plot.draw(curves(self.controller.history))

    # choices ----------------------------------------------------------------
    def refresh_layers(self, event=None) -> None:
        current = self.image_combo.currentText()
        names = self.controller.image_names()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        self._refresh_labels_choices()
        existing = set(self.pairs())
        for pair in self.controller.candidate_pairs():
            if pair not in existing:
                self._append_pair(pair)
        layers = self.viewer.layers
        for i in reversed(range(self.pairs_list.count())):
            image, lab = self.pairs_list.item(i).data(256)
            if image not in layers or lab not in layers:
                self.pairs_list.takeItem(i)
        self._watch_labels()
        self.refresh_start()
        self.schedule_summary()

    def _refresh_labels_choices(self, *_) -> None:
        """The Labels layers of the chosen image's size (any name)."""
        current = self.labels_combo.currentText()
        image = self.image_combo.currentText() or None
        names = self.controller.labels_names(image)
        self.labels_combo.clear()
        self.labels_combo.addItems(names)
        if current in names:
            self.labels_combo.setCurrentText(current)
        elif image and f"{image} labels" in names:
            self.labels_combo.setCurrentText(f"{image} labels")

    def _watch_labels(self) -> None:
        """Refresh the summary when a Labels layer's data are edited (paint, fill, erase, undo)."""
        from napari.layers import Labels

        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and id(layer) not in self._watched:
                self._watched.add(id(layer))
                for name in ("data", "paint", "labels_update"):
                    getattr(layer.events, name).connect(self._labels_edited)

    def _labels_edited(self, event=None) -> None:
        source = getattr(event, "source", None)
        names = {lab for _, lab in self.pairs()}
        if source is None or getattr(source, "name", None) in names:
            self.schedule_summary()

    def refresh_start(self) -> None:
        current = self.start_combo.currentData()
        self.start_combo.blockSignals(True)
        self.start_combo.clear()
        for label, key in self.controller.start_choices():
            self.start_combo.addItem(label, key)
        i = self.start_combo.findData(current)
        self.start_combo.setCurrentIndex(max(i, 0))
        self.start_combo.blockSignals(False)

    def start_key(self) -> str:
        """The chosen start model's key (the Segment dock's current model by default)."""
        return self.start_combo.currentData() or CURRENT

    def _session_model_changed(self, key: str) -> None:
        self.refresh_start()
        if self.start_key() == CURRENT:
            self.schedule_summary()

    def pairs(self) -> list[tuple[str, str]]:
        return [tuple(self.pairs_list.item(i).data(256)) for i in range(self.pairs_list.count())]

    def _append_pair(self, pair) -> None:
        item = QListWidgetItem(f"{pair[0]}  ←  {pair[1]}")
        item.setData(256, list(pair))
        self.pairs_list.addItem(item)

    def chosen_pair(self) -> tuple[str, str] | None:
        """The pair shown in Image / Labels, when its labels have the image's size."""
        pair = (self.image_combo.currentText(), self.labels_combo.currentText())
        return pair if all(pair) and pair[1] in self.controller.labels_names(pair[0]) else None

    def selected_pair(self) -> tuple[str | None, str | None]:
        """The pair selected in the list, else the first listed, else the one shown."""
        items = self.pairs_list.selectedItems()
        if items:
            return tuple(items[0].data(256))
        pairs = self.pairs()
        if pairs:
            return pairs[0]
        chosen = self.chosen_pair()
        return chosen if chosen is not None else (None, None)

    def add_pair(self) -> None:
        """List the pair shown in Image / Labels (Add pair)."""
        pair = self.chosen_pair()
        if pair is None:
            self._notify_error("choose an image and a Labels layer of its size to pair")
            return
        if pair not in self.pairs():
            self._append_pair(pair)
            self.schedule_summary()

    def remove_pairs(self) -> None:
        """Take the selected pairs off the list (Remove)."""
        for item in self.pairs_list.selectedItems():
            self.pairs_list.takeItem(self.pairs_list.row(item))
        self.schedule_summary()

    # summary (worker thread) ------------------------------------------------------
    def schedule_summary(self, *_) -> None:
        """Recompute the annotation summary soon (edits in a burst cost one computation)."""
        self._summary_timer.start()

    def refresh_summary(self, *_) -> None:
        """Snapshot the pairs and count their annotations in a worker thread."""
        if self.summary_worker is not None:  # one at a time; run again when it ends
            self._summary_again = True
            return
        snap = self.controller.summary_input(self.pairs(), self.start_key())

        def finished():
            self.summary_worker = None
            if self._summary_again:
                self._summary_again = False
                self.refresh_summary()

        self.summary_worker = _workers.start(lambda: self.controller.compute_summary(snap),
                                             self._show_summary, self._summary_error, finished, owner=self)

    def _summary_error(self, exc: BaseException) -> None:
        self.last_summary = None
        self.summary_label.setText(f"⚠ {exc}")

    def _show_summary(self, s: dict) -> None:
        self.last_summary = s
        self.summary_label.setText(summary_text(s))

    # training -------------------------------------------------------------
    def toggle(self) -> None:
        if self.controller.running:
            self.controller.stop_event.set()
            self.status.setText("Stopping… the best weights so far will be kept.")
        else:
            self.train()

    def settings(self) -> dict:
        return {"max_seconds": float(self.seconds_spin.value()), "epochs": self.epochs_spin.value(),
                "lr": self.lr_spin.value(), "val_fraction": self.val_spin.value(),
                "augment": self.augment_check.isChecked(),
                "device": self.device_combo.currentText(), **self.advanced}

    def train(self) -> None:
        if self.controller.running:
            return
        if self.live.active:
            self._notify_error("live mode is running: stop it before training")
            return
        if not self.pairs() and self.chosen_pair() is not None:
            self.add_pair()  # the pair shown in Image / Labels, as if Add pair had been clicked
        try:
            s = self.last_summary
            settled = not self._summary_timer.isActive()
            if s is not None and s["planes"] == 0 and s["warnings"] and settled:
                raise BadInputError(s["warnings"][0])
            request = self.controller.make_request(
                self.pairs(), self.start_key(), self.settings(),
                weight_corrections=CORRECTION_EXTRA if self.weight_check.isChecked() else 0.0,
            )
        except BadInputError as exc:
            self._notify_error(str(exc))
            return
        self.controller.running = True
        self.train_button.setText("Stop")
        self.compare_button.setEnabled(False)
        self.status.setText(f"Training from {Path(request.start).stem}: preparing…")
        from napari.utils import progress

        self._progress = progress(total=0, desc="Fine-tune")
        self._last_report = 0.0
        self.controller.history = []
        self._redraw()
        self.worker = _workers.start(
            lambda: self.controller.run(request, self._bridge.progress.emit),
            lambda result: self._done(request, result),
            self._error,
            self._finished,
            owner=self,
        )

    def _on_progress(self, info: dict) -> None:
        self.controller.history.append(info)
        bar = self._progress
        if bar is not None:
            budget = self.seconds_spin.value()
            bar.total = budget
            bar.n = min(int(info["seconds"]), budget)
            bar.set_description(f"Fine-tune epoch {info['epoch']}")
        now = time.monotonic()
        # every validation check is shown; the steps at most every PROGRESS_EVERY_S
        if info.get("val_dice") is not None or now - self._last_report >= PROGRESS_EVERY_S:
            self._last_report = now
            self.status.setText(progress_text(info))
            self._redraw()

    def _done(self, request: TrainRequest, result) -> None:
        from napari.utils.notifications import show_info, show_warning

        for note in self.controller.finished(request, result):
            show_warning(note)
        self.status.setText(result_text(result))
        if not result.improved:  # nothing was saved: the start model stays current, no new version
            show_warning("Fine-tune: no improvement over the start model; nothing was saved")
            self._redraw()
            return
        show_info(f"Fine-tuned model saved: {result.path}")
        self.compare_button.setEnabled(True)
        self.refresh_start()
        self._redraw()
        self.model_saved.emit(str(result.path))

    def _error(self, exc: BaseException) -> None:
        if isinstance(exc, BadInputError):
            self._notify_error(str(exc))
        else:
            self._notify_error(f"Training failed: {type(exc).__name__}: {exc}")

    def _finished(self) -> None:
        self._end_run()
        self.train_button.setText("Train")

    # after training ----------------------------------------------------------
    def compare(self) -> None:
        """Segment the first pair's image with the start and the new model (worker thread);
        a ``<image> changes`` layer shows the difference."""
        request, result = self.controller.last_request, self.controller.last_result
        if self.compare_worker is not None or result is None or result.path is None:
            return
        try:
            req = self.controller.compare_request(request.pairs[0][0], request.start,
                                                  str(result.path))
        except BadInputError as exc:
            self._notify_error(str(exc))
            return
        self.compare_button.setEnabled(False)
        self.status.setText("Comparing before/after…")

        def finished():
            self.compare_worker = None
            self.compare_button.setEnabled(True)

        self.compare_worker = _workers.start(lambda: self.controller.compare(req),
                                             lambda diff: self._show_changes(req, diff),
                                             self._error, finished, owner=self)

    def _show_changes(self, req, diff):
        name = f"{req.image_name} changes"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        layer = self.viewer.add_labels(diff, name=name, scale=req.scale, translate=req.translate)
        changed = int((diff > 0).sum())
        self.status.setText(f"Before/after: {changed:,} pixels changed "
                            "(label 1: found only after fine-tuning, 2: only before).")
        return layer
