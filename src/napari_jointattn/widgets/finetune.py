"""The Fine-tune dock: train on corrected labels without leaving napari.

A thin Qt front on :class:`~napari_jointattn.controllers.finetune.FinetuneController`
with a live loss / validation-Dice plot. Training, the annotation summary
(refreshed shortly after the labels are edited) and Compare run in worker
threads on copies of the layers' data, so the user can keep painting.

*Learn while I paint* (:class:`~napari_jointattn.controllers.live.LiveController`)
trains in a worker thread while the user paints: strokes are collected
(debounced) and handed over as copies, the model's view of the slice in view
is shown in a ``<image> live prediction`` Labels layer and a ``<image>
uncertainty`` Image layer, and *Next* moves the view to the most uncertain
region not annotated yet.
"""

from __future__ import annotations

import time
from pathlib import Path

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..controllers import gc_hold
from ..controllers.finetune import (
    CORRECTION_EXTRA,
    CURRENT,
    FinetuneController,
    TrainRequest,
)
from ..controllers.layers import current_index
from ..controllers.live import (
    ANNOTATED_CHOICES,
    GUIDES,
    PAINTED,
    LiveController,
    LiveOutcome,
    LivePrediction,
    Target,
    prediction_name,
    uncertainty_name,
)
from ..controllers.segment import PREDICTION_KEY
from ..engine.errors import BadInputError
from ..engine.models.versions import describe_version
from . import _workers
from .segment import DEVICES

__all__ = ["CURRENT", "PREDICTION_KEY", "FinetuneController", "FinetuneDock"]  # scripts import these here

#: the summary is recomputed this long after the last edit of a paired labels layer
SUMMARY_DEBOUNCE_MS = 400
#: the status line reports training steps at most this often
PROGRESS_EVERY_S = 1.0
#: live mode hands the annotations over this long after the last stroke
LIVE_DEBOUNCE_MS = 500
#: pause between adding the live layers one by one (the event loop runs in between)
LAYER_STEP_MS = 30
LIVE_HINT = ("Paint on the labels layer: what you paint since Start trains the model. "
             "Erase (or paint label 0) to mark background; erase strokes count even over "
             "unlabelled pixels.")
PAIR_HINT = ("Pair an image with any Labels layer of its size (Add pair); "
             "a Labels layer named '<image> labels' pairs by itself.")


def _import_training_engine() -> None:
    import importlib

    for name in ("napari_jointattn.engine.training.live", "napari_jointattn.engine.training",
                 "napari_jointattn.engine.training.uncertainty", "napari_jointattn.engine.inference.postprocess"):
        importlib.import_module(name)
    from ..controllers.session import _warm_layers

    _warm_layers()  # napari's first Labels layer imports its features table (pandas): not at Start


class FinetuneDock(_workers.WorkerDockMixin, QWidget):
    """napari dock widget titled "Fine-tune"."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.controller = FinetuneController(napari_viewer)
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
        self.last_export: Path | None = None
        self._bridge.progress.connect(self._on_progress)
        self.live = LiveController(napari_viewer, session=self.controller.session)
        #: further live-mode engine settings (batch_size, crop, lr, ...) for scripts and tests
        self.live_settings: dict = {}
        self.live_worker = None
        self._live_layer = None  # the labels layer live mode listens to
        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.setInterval(LIVE_DEBOUNCE_MS)
        self._live_timer.timeout.connect(self._live_submit)

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
        self.seconds_spin = QSpinBox()
        self.seconds_spin.setRange(5, 24 * 3600)
        self.seconds_spin.setValue(60)
        self.seconds_spin.setSuffix(" s")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 10000)
        self.epochs_spin.setValue(30)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1e-1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(2e-3)
        self.val_spin = QDoubleSpinBox()
        self.val_spin.setRange(0.05, 0.5)
        self.val_spin.setSingleStep(0.05)
        self.val_spin.setValue(0.2)
        self.augment_check = QCheckBox("Augmentation")
        self.augment_check.setChecked(True)
        self.weight_check = QCheckBox("Weight my corrections ×5 (where I changed the model's labels)")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.train_button = QPushButton("Train")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.compare_button = QPushButton("Compare before/after")
        self.compare_button.setEnabled(False)
        self.versions_list = QListWidget()
        self.use_button = QPushButton("Use selected")
        self.export_button = QPushButton("Export…")
        self.canvas, self.axes = self._make_plot()
        self.live_box = self._make_live_box()

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        pair_row = QHBoxLayout()
        pair_row.addWidget(self.add_pair_button)
        pair_row.addWidget(self.remove_pair_button)
        form.addRow("", pair_row)
        settings = QFormLayout()
        settings.addRow("Pairs", self.pairs_list)
        settings.addRow("Start model", self.start_combo)
        settings.addRow("Time budget", self.seconds_spin)
        settings.addRow("Epochs", self.epochs_spin)
        settings.addRow("Learning rate", self.lr_spin)
        settings.addRow("Validation fraction", self.val_spin)
        settings.addRow("Device", self.device_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.pair_hint)
        layout.addLayout(settings)
        layout.addWidget(self.summary_label)
        layout.addWidget(self.augment_check)
        layout.addWidget(self.weight_check)
        layout.addWidget(self.train_button)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas)
        layout.addWidget(self.compare_button)
        layout.addWidget(self.live_box)
        layout.addWidget(QLabel("Model versions"))
        layout.addWidget(self.versions_list)
        vrow = QHBoxLayout()
        vrow.addWidget(self.use_button)
        vrow.addWidget(self.export_button)
        layout.addLayout(vrow)

        self.train_button.clicked.connect(self.toggle)
        self.add_pair_button.clicked.connect(self._add_pair)
        self.remove_pair_button.clicked.connect(self._remove_pair)
        self.compare_button.clicked.connect(self.compare)
        self.use_button.clicked.connect(self.use_selected)
        self.export_button.clicked.connect(self._export)
        self.start_combo.currentIndexChanged.connect(self.schedule_summary)
        self.image_combo.currentTextChanged.connect(self._refresh_labels_choices)
        self.controller.session.model_changed.connect(self._session_model_changed)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed):
            ev.connect(self.refresh_layers)
        events.removed.connect(self._live_layer_removed)
        events.removed.connect(lambda *_: gc_hold.thaw())  # a removed layer's data may sit in frozen cycles
        self.viewer.dims.events.current_step.connect(self._live_view_moved)
        # closing the dock or the viewer ends the live loop (its worker thread stops by itself)
        stop = self.live.stop_event.set
        self.destroyed.connect(lambda *_: stop())
        self.refresh_layers()
        self.refresh_versions()
        self.preload()

    def preload(self) -> None:
        """Import the training and live-loop engine in a worker thread while the dock is read,
        so that Train and Start live do not pay for the imports (a pause of the window at
        the start of the live loop otherwise: docs/performance.md)."""
        if _workers.synchronous():
            return
        self.preload_worker = _workers.start(_import_training_engine, lambda _: None, lambda _: None,
                                             lambda: None)

    def _make_live_box(self) -> QGroupBox:
        box = QGroupBox("Learn while I paint")
        self.live_button = QPushButton("Start live")
        self.live_button.setCheckable(True)
        self.annotated_combo = QComboBox()
        self.annotated_combo.addItems(list(ANNOTATED_CHOICES))
        self.annotated_combo.setCurrentText(PAINTED)
        self.guide_combo = QComboBox()
        self.guide_combo.addItems(list(GUIDES))
        self.guide_combo.setToolTip(
            "What Next ranks regions by: the entropy of the prediction (the uncertainty layer), or where the "
            "joint modules' point-wise and self-attention branches disagree (models with joint attention)")
        self.next_button = QPushButton("Next")
        self.next_button.setToolTip("Go to the most uncertain region not annotated yet")
        self.next_button.setEnabled(False)
        self.live_hint = QLabel(LIVE_HINT)
        self.live_hint.setWordWrap(True)
        self.live_status = QLabel("")
        self.live_status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Annotated", self.annotated_combo)
        form.addRow("Next by", self.guide_combo)
        row = QHBoxLayout()
        row.addWidget(self.live_button)
        row.addWidget(self.next_button)
        inner = QVBoxLayout(box)
        inner.addLayout(form)
        inner.addWidget(self.live_hint)
        inner.addLayout(row)
        inner.addWidget(self.live_status)
        self.live_button.clicked.connect(self.toggle_live)
        self.next_button.clicked.connect(self.next_region)
        return box

    # plot -------------------------------------------------------------------
    def _make_plot(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2, 2.0), tight_layout=True)
        canvas = FigureCanvasQTAgg(fig)
        canvas.setMinimumHeight(160)
        ax = fig.add_subplot(111)
        return canvas, ax

    def _redraw(self) -> None:
        ax = self.axes
        ax.clear()
        hist = self.controller.history
        steps = [h for h in hist if h.get("val_dice") is None]
        checks = [h for h in hist if h.get("val_dice") is not None]

        def x(h):  # in epochs; the start model's score sits at 0
            return max(0.0, (h["epoch"] - 1) + h["step"] / h["steps"])

        if steps:
            ax.plot([x(h) for h in steps], [h["loss"] for h in steps], color="tab:blue", lw=1,
                    label="training loss")
        if checks:
            ax.plot([x(h) for h in checks], [h["val_dice"] for h in checks], "o-",
                    color="tab:orange", ms=3, label="validation Dice")
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if steps or checks:
            ax.legend(fontsize=7, loc="best")
        self.canvas.draw_idle()

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
        """Refresh the summary when a Labels layer's data are edited (painting, fill, erase, undo)."""
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

    def _session_model_changed(self, key: str) -> None:
        self.refresh_start()
        if (self.start_combo.currentData() or CURRENT) == CURRENT:
            self.schedule_summary()

    def pairs(self) -> list[tuple[str, str]]:
        return [tuple(self.pairs_list.item(i).data(256)) for i in range(self.pairs_list.count())]

    def _append_pair(self, pair) -> None:
        item = QListWidgetItem(f"{pair[0]}  ←  {pair[1]}")
        item.setData(256, list(pair))
        self.pairs_list.addItem(item)

    def _chosen_pair(self) -> tuple[str, str] | None:
        pair = (self.image_combo.currentText(), self.labels_combo.currentText())
        return pair if all(pair) and pair[1] in self.controller.labels_names(pair[0]) else None

    def _add_pair(self) -> None:
        pair = self._chosen_pair()
        if pair is None:
            self._notify_error("choose an image and a Labels layer of its size to pair")
            return
        if pair not in self.pairs():
            self._append_pair(pair)
            self.schedule_summary()

    def _remove_pair(self) -> None:
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
        snap = self.controller.summary_input(self.pairs(), self.start_combo.currentData() or CURRENT)

        def finished():
            self.summary_worker = None
            if self._summary_again:
                self._summary_again = False
                self.refresh_summary()

        self.summary_worker = _workers.start(lambda: self.controller.compute_summary(snap),
                                             self._show_summary, self._summary_error, finished)

    def _summary_error(self, exc: BaseException) -> None:
        self.last_summary = None
        self.summary_label.setText(f"⚠ {exc}")

    def _show_summary(self, s: dict) -> None:
        self.last_summary = s
        per_class = ", ".join(f"{k}: {v:,}" for k, v in s["pixels_per_class"].items())
        text = f"Annotated: {s['images']} image(s), {s['planes']} image(s)/slice(s); pixels: {per_class}"
        if s["warnings"]:
            text += "\n⚠ " + "\n⚠ ".join(s["warnings"])
        self.summary_label.setText(text)

    def refresh_versions(self) -> None:
        self.versions_list.clear()
        for path, meta in self.controller.versions():
            item = QListWidgetItem(describe_version(path, meta))
            item.setData(256, str(path))
            self.versions_list.addItem(item)

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
                "augment": self.augment_check.isChecked(), "device": self.device_combo.currentText(),
                **self.advanced}

    def train(self) -> None:
        if self.controller.running:
            return
        if self.live.active:
            self._notify_error("live mode is running: stop it before training")
            return
        pairs = self.pairs()
        if not pairs and self._chosen_pair() is not None:
            self._add_pair()  # the pair shown in Image / Labels, as if Add pair had been clicked
            pairs = self.pairs()
        try:
            s = self.last_summary
            if s is not None and s["planes"] == 0 and s["warnings"] and not self._summary_timer.isActive():
                raise BadInputError(s["warnings"][0])
            request = self.controller.make_request(
                pairs, self.start_combo.currentData() or CURRENT, self.settings(),
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
        )

    def _on_progress(self, info: dict) -> None:
        self.controller.history.append(info)
        bar = self._progress
        if bar is not None:
            budget = self.seconds_spin.value()
            bar.total = budget
            bar.n = min(int(info["seconds"]), budget)
            bar.set_description(f"Fine-tune epoch {info['epoch']}")
        if info.get("val_dice") is not None:
            where = ("Start model" if info["epoch"] == 0
                     else f"Epoch {info['epoch']}, step {info['step']}/{info['steps']}")
            self.status.setText(f"{where}: validation Dice {info['val_dice']:.3f} (best {info['best_dice']:.3f})")
            self._last_report = time.monotonic()
            self._redraw()
            return
        now = time.monotonic()
        if now - self._last_report >= PROGRESS_EVERY_S:
            self._last_report = now
            best = info.get("best_dice")
            self.status.setText(
                f"Epoch {info['epoch']}/{info.get('epochs', '?')}, step {info['step']}/{info['steps']}: "
                f"loss {info['loss']:.3f}, {info['seconds']:.0f} s"
                + (f" (best validation Dice {best:.3f})" if isinstance(best, float) else ""))
            self._redraw()

    def _done(self, request: TrainRequest, result) -> None:
        from napari.utils.notifications import show_info, show_warning

        for note in self.controller.finished(request, result):
            show_warning(note)
        if not result.improved:
            # nothing was saved: the start model stays current, no new version is listed
            self.status.setText(
                f"No improvement over the start model (validation Dice {result.start_dice:.3f} was never "
                f"beaten in {result.seconds:.0f} s): nothing saved. Train longer or annotate more. "
                f"Split {result.summary['split']}."
            )
            show_warning("Fine-tune: no improvement over the start model; nothing was saved")
            self._redraw()
            return
        self.status.setText(
            f"Saved {result.path.name}: best validation Dice {result.best_dice:.3f} (start model "
            f"{result.start_dice:.3f}; epoch {result.best_epoch}), stopped by {result.stopped}, "
            f"{result.seconds:.0f} s on {result.device}. The Segment dock now uses it. "
            f"Split {result.summary['split']}."
        )
        show_info(f"Fine-tuned model saved: {result.path}")
        self.compare_button.setEnabled(True)
        self.refresh_versions()
        self.refresh_start()
        self._redraw()

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
        if request is None or result is None or result.path is None or self.compare_worker is not None:
            return
        try:
            req = self.controller.compare_request(request.pairs[0][0], request.start, str(result.path))
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
                                             self._error, finished)

    def _show_changes(self, req, diff):
        name = f"{req.image_name} changes"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        layer = self.viewer.add_labels(diff, name=name, scale=req.scale, translate=req.translate)
        changed = int((diff > 0).sum())
        self.status.setText(f"Before/after: {changed:,} pixels changed "
                            "(label 1: found only after fine-tuning, 2: only before).")
        return layer

    def use_selected(self) -> None:
        """Roll back (or forward) to the selected version: the next Segment uses it."""
        items = self.versions_list.selectedItems()
        if not items:
            return
        try:
            path = self.controller.use_version(items[0].data(256))
        except BadInputError as exc:
            self._notify_error(str(exc))
            self.refresh_versions()
            return
        self.status.setText(f"Current model: {Path(path).stem} (the next Segment uses it)")

    def _export(self) -> None:
        items = self.versions_list.selectedItems()
        if not items:
            return
        source = Path(items[0].data(256))
        filters = {"Model file (*.safetensors)": "safetensors",
                   "bioimage.io model package (*.zip)": "bioimageio",
                   "ONNX (*.onnx)": "onnx",
                   "TorchScript (*.pt)": "torchscript"}
        target, chosen = QFileDialog.getSaveFileName(self, "Export model", str(source.with_suffix("")),
                                                     ";;".join(filters))
        if not target:
            return
        fmt = filters.get(chosen)
        self.export_button.setEnabled(False)
        self.status.setText(f"Exporting {source.stem} ({fmt or 'safetensors'})…")

        def done(path) -> None:
            self.status.setText(f"Exported {source.stem} to {path}")
            self.last_export = Path(path)

        def failed(exc: BaseException) -> None:
            self.status.setText("Export failed: nothing was written.")
            self._notify_error(str(exc) if isinstance(exc, BadInputError) else f"{type(exc).__name__}: {exc}")

        # checked exports run the model (and bioimage.io's own test run): never on the GUI thread
        _workers.start(lambda: self.controller.export(source, target, fmt), done, failed,
                       lambda: self.export_button.setEnabled(True))

    # learn while I paint -------------------------------------------------------------------
    def _live_pair(self) -> tuple[str | None, str | None]:
        """The pair live mode uses: the selected pair, else the first, else the one shown."""
        items = self.pairs_list.selectedItems()
        if items:
            return tuple(items[0].data(256))
        pairs = self.pairs()
        if pairs:
            return pairs[0]
        chosen = self._chosen_pair()
        return chosen if chosen is not None else (None, None)

    def toggle_live(self) -> None:
        if self.live.active:
            self.stop_live()
        else:
            self.start_live()

    def start_live(self) -> None:
        """Check the pair, listen to its labels layer and start the live loop in a worker thread."""
        if self.live_worker is not None:  # the last loop is still ending
            self.live_button.setChecked(True)
            return
        self.live_button.setChecked(False)
        if self.controller.running:
            self._live_error(BadInputError("a training run is going on: wait for it or stop it first"))
            return
        image, labels = self._live_pair()
        try:
            self.live.start(image, labels, self.start_combo.currentData() or CURRENT,
                            annotated=self.annotated_combo.currentText(),
                            guide=self.guide_combo.currentText(),
                            device=self.device_combo.currentText(), **self.live_settings)
        except BadInputError as exc:
            self._live_error(exc)
            return
        layer = self.viewer.layers[labels]
        layer.events.paint.connect(self._live_painted)
        layer.events.data.connect(self._live_data_replaced)
        layer.mouse_drag_callbacks.append(self._erase_capture)
        self._live_layer = layer
        self._live_view_moved()
        self.live_button.setChecked(True)
        self.live_button.setText("Stop live")
        self.next_button.setEnabled(True)
        self.annotated_combo.setEnabled(False)
        self.guide_combo.setEnabled(False)
        self.train_button.setEnabled(False)
        self.live_status.setText(f"Live on {image} ← {labels}: loading the start model…")
        # napari runs a full garbage collection whenever a layer comes or goes (the live layers
        # do): keep what exists now out of its walk, as the Segment dock does (see gc_hold)
        gc_hold.settle()
        self.live_worker = _workers.start_loop(self.live.run, self._live_report, self._live_done,
                                               self._live_error, self._live_finished)

    def stop_live(self, reason: str | None = None) -> None:
        """End the loop; the worker scores the live model and saves it if it improved."""
        if not self.live.active:
            return
        self._live_timer.stop()
        if self.live.painted is not None:
            try:
                self.live.submit()  # the last strokes count in the scores
            except BadInputError:
                pass
        self.live.stop()
        self.live_button.setEnabled(False)
        self.next_button.setEnabled(False)
        self.live_status.setText((reason + " " if reason else "") + "Stopping: scoring the live model…")

    def next_region(self) -> None:
        if self.live.active:
            self.live.request_next()
            self.live_status.setText("Looking for the most uncertain region not annotated yet…")

    # events on the GUI thread
    def _live_painted(self, event) -> None:
        if self.live.active and self.live.record_paint(getattr(event, "value", None)) >= 0:
            self._live_timer.start()

    def _erase_capture(self, layer, event):
        """Record erase strokes (also over unlabelled pixels, which napari does not report)."""
        erasing = layer.mode == "erase" or (layer.mode == "paint" and
                                            layer.selected_label == layer.colormap.background_value)
        displayed = tuple(getattr(event, "dims_displayed", ()) or ())
        if not (self.live.active and erasing and displayed == (layer.ndim - 2, layer.ndim - 1)):
            return
        points = [layer.world_to_data(event.position)]
        yield
        while event.type == "mouse_move":
            points.append(layer.world_to_data(event.position))
            yield
        if self.live.active and self.live.record_erase(points, layer.brush_size):
            self._live_timer.start()

    def _live_data_replaced(self, event=None) -> None:
        layer = self._live_layer
        if self.live.active and layer is not None and self.live.pair and layer.data.shape != self.live.pair.shape:
            self.stop_live(f"The data of {layer.name!r} were replaced by data of another shape.")
        elif self.live.active:
            self._live_timer.start()  # undo, redo, a script's edit: hand the labels over again

    def _live_submit(self) -> None:
        if not self.live.active or self.live.stop_event.is_set():
            return
        try:
            self.live.submit()
        except BadInputError as exc:
            self.stop_live(str(exc))

    def _live_layer_removed(self, event=None) -> None:
        if self.live.active and not self.live.stop_event.is_set() and not self.live.pair_present():
            self.stop_live("A layer of the live pair was removed.")

    def _live_view_moved(self, event=None) -> None:
        pair = self.live.pair
        if pair is None or not pair.stack or pair.image_name not in self.viewer.layers:
            return
        self.live.view_slice = current_index(self.viewer, self.viewer.layers[pair.image_name])

    # results of the worker
    def _live_report(self, report: dict) -> None:
        pair = self.live.pair
        if pair is None:
            return
        if report.get("prediction") is not None:
            self._show_live_prediction(report["prediction"])
        if "next" in report:
            self._go_to(report["next"])
        loss = "–" if report["loss"] is None else f"{report['loss']:.3f}"
        text = (f"Live: {report['total_steps']} steps, loss {loss}, {report['snapshots']} snapshot(s) of "
                f"{self.live.strokes} stroke(s)")
        if report["waiting"] and self.live.strokes:
            text += f"\nWaiting: {report['waiting']}"
        elif not self.live.strokes:
            text += "\nWaiting: paint some objects and some background"
        if not ("next" in report or self.live_status.text().startswith("Looking")):
            self.live_status.setText(text)
        elif "next" in report:
            self.live_status.setText(text + self._next_text(report["next"]))

    @staticmethod
    def _next_text(target: Target | None) -> str:
        if target is None:
            return "\nNext: every region is annotated or was shown already."
        where = "" if target.z is None else f"slice {target.z}, "
        return f"\nNext: {where}around row {target.y}, column {target.x} ({target.guide} {target.score:.2f})"

    def _show_live_prediction(self, pred: LivePrediction) -> None:
        """Update the live prediction and uncertainty layers in place (created on first use).

        A missing layer is added alone in one turn of the event loop and the
        latest prediction is shown on a later turn: adding a 512² layer takes
        napari about 0.1 s, and two at once made the loop's worst pause.
        """
        pair = self.live.pair
        self._live_latest = pred
        if pair is None:
            return
        names = (prediction_name(pair.image_name), uncertainty_name(pair.image_name))
        layers = self.viewer.layers
        geometry = {"scale": pair.scale, "translate": pair.translate}
        import numpy as np

        def filled(values, dtype):  # a new layer shows the prediction from its first frame
            data = np.zeros(pair.shape, dtype)
            plane = data if pred.z is None else data[pred.z]
            if plane.shape == values.shape:
                plane[...] = values
            return data

        if names[1] not in layers or names[0] not in layers:
            if names[1] not in layers:  # below the prediction: the classes stay readable
                self.viewer.add_image(filled(pred.uncertainty, np.float32), name=names[1], colormap="magma",
                                      blending="additive", opacity=0.5, contrast_limits=(0.0, 1.0), **geometry)
            else:
                self.viewer.add_labels(filled(pred.classes, np.uint8), name=names[0], opacity=0.45, **geometry)
            QTimer.singleShot(LAYER_STEP_MS, lambda: self._show_live_prediction(self._live_latest))
            return
        for name, values in zip(names, (pred.classes, pred.uncertainty)):
            layer = layers[name]
            if layer.data.shape != pair.shape:
                continue
            target = layer.data if pred.z is None else layer.data[pred.z]
            target[...] = values
            layer.refresh()

    def _go_to(self, target: Target | None) -> None:
        """Centre the view on ``target`` (and show its slice)."""
        pair = self.live.pair
        if target is None or pair is None or pair.image_name not in self.viewer.layers:
            return
        layer = self.viewer.layers[pair.image_name]
        point = (target.y, target.x) if target.z is None else (target.z, target.y, target.x)
        world = layer.data_to_world(point)
        if target.z is not None:
            self.viewer.dims.set_point(self.viewer.dims.ndim - 3, float(world[0]))
        self.viewer.camera.center = tuple(float(v) for v in world[-2:])

    def _live_done(self, outcome: LiveOutcome) -> None:
        from napari.utils.notifications import show_info, show_warning

        warning = self.live.finished(outcome)
        try:
            if warning:
                self.live_status.setText(warning)
                show_warning(warning)
                return
            self.live_status.setText(
                f"Saved {outcome.path.name}: Dice on the painted pixels {outcome.scores['live']:.3f} "
                f"(start model {outcome.scores['start']:.3f}), {outcome.steps} steps. "
                "The Segment dock now uses it.")
            show_info(f"Live model saved: {outcome.path}")
            self.refresh_versions()
            self.refresh_start()
        except RuntimeError:  # the dock was closed meanwhile; the session has the new model
            pass

    def _live_error(self, exc: BaseException) -> None:
        self.live.reset()
        message = str(exc) if isinstance(exc, BadInputError) else f"Live mode failed: {type(exc).__name__}: {exc}"
        try:
            self.live_status.setText(message)
        except RuntimeError:
            pass
        from napari.utils.notifications import show_error

        show_error(message)

    def _live_finished(self) -> None:
        self.live_worker = None
        layer, self._live_layer = self._live_layer, None
        if layer is not None:
            layer.events.paint.disconnect(self._live_painted)
            layer.events.data.disconnect(self._live_data_replaced)
            if self._erase_capture in layer.mouse_drag_callbacks:
                layer.mouse_drag_callbacks.remove(self._erase_capture)
        if self.live.active:  # ended without an outcome
            self.live.reset()
        try:
            self.live_button.setEnabled(True)
            self.live_button.setChecked(False)
            self.live_button.setText("Start live")
            self.next_button.setEnabled(False)
            self.annotated_combo.setEnabled(True)
            self.guide_combo.setEnabled(True)
            self.train_button.setEnabled(True)
        except RuntimeError:
            pass
