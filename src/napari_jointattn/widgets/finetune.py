"""The Fine-tune dock: train on corrected labels without leaving napari.

:class:`FinetuneController` (no Qt) pairs layers, summarises annotations,
snapshots the data, runs the engine's ``train`` and lists model versions;
:class:`FinetuneDock` is the Qt front with a live loss / validation-Dice plot.
Training runs in a napari thread worker on a copy of the layers' data, so
the user can keep painting while it runs.
"""

from __future__ import annotations

import datetime as dt
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
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

from ..engine.errors import BadInputError
from ..engine.files import write_atomic
from ..engine.models import MODEL_SUFFIX, PRESET_DIR, load_model, model_dir, read_metadata, saved_models
from ..engine.presets import PRESETS
from . import _workers
from .layers import layer_input
from .segment import DEVICES, SegmentDock

PREDICTION_KEY = "jointattn_prediction"
CURRENT = "current Segment model"


def _underlying(viewer):
    return getattr(viewer, "__wrapped__", viewer)


def segment_dock_for(viewer) -> SegmentDock | None:
    """The Segment dock open in the same viewer, if any."""
    target = _underlying(viewer)
    for dock in list(SegmentDock.instances):
        if _underlying(dock.viewer) is target:
            return dock
    return None


@dataclass
class TrainRequest:
    pairs: list[tuple[str, str]]
    images: list[np.ndarray]
    labels: list[np.ndarray]
    weights: list[np.ndarray | None] | None
    channel_axes: list[int | None]
    start: str
    settings: dict
    out: Path
    layer_ids: list = field(default_factory=list)


class FinetuneController:
    """State and logic of the Fine-tune dock; usable without Qt widgets."""

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self.running = False
        self.stop_event = threading.Event()
        self.history: list[dict] = []
        self.last_result = None
        self.last_request: TrainRequest | None = None

    # layers -------------------------------------------------------------
    def candidate_pairs(self) -> list[tuple[str, str]]:
        """(image, labels) pairs: every Labels layer named ``<image> labels`` with its image."""
        from napari.layers import Image, Labels

        layers = self.viewer.layers
        out = []
        for layer in layers:
            if isinstance(layer, Labels):
                base = layer.name.removesuffix(" labels")
                if base != layer.name and base in layers and isinstance(layers[base], Image):
                    out.append((base, layer.name))
        return out

    def image_names(self) -> list[str]:
        from napari.layers import Image

        return [l.name for l in self.viewer.layers if isinstance(l, Image) and not l.name.startswith("attention")]

    def labels_names(self) -> list[str]:
        from napari.layers import Labels

        return [l.name for l in self.viewer.layers if isinstance(l, Labels)]

    def start_choices(self) -> list[tuple[str, str]]:
        out = [(CURRENT, CURRENT)]
        for name in PRESETS:
            if (PRESET_DIR / f"{name}{MODEL_SUFFIX}").is_file():
                out.append((f"{name} (preset)", name))
        for path in saved_models():
            out.append((path.stem, str(path)))
        return out

    def resolve_start(self, key: str) -> str:
        """A start-model key: "current Segment model" is the Segment dock's model when one is
        open, else the first preset with bundled weights."""
        if key == CURRENT:
            dock = segment_dock_for(self.viewer)
            current = dock.model_combo.currentData() if dock is not None else None
            if current:
                return current
            presets = [k for label, k in self.start_choices() if label.endswith("(preset)")]
            if not presets:
                raise BadInputError("no Segment dock is open and no preset is installed: choose a start model")
            return presets[0]
        return key

    # data -----------------------------------------------------------------
    def _pair_data(self, image_name: str, labels_name_: str, channel_axis: int | None):
        layers = self.viewer.layers
        for name in (image_name, labels_name_):
            if name not in layers:
                raise BadInputError(f"layer {name!r} no longer exists")
        inp = layer_input(layers[image_name], channel_axis)
        lab = np.asarray(layers[labels_name_].data)
        if lab.shape != inp.spatial_shape:
            raise BadInputError(
                f"labels {labels_name_!r} have shape {lab.shape}, image {image_name!r} {inp.spatial_shape}"
            )
        return inp, lab

    def summary(self, pairs: list[tuple[str, str]], start: str) -> dict:
        from ..engine.training import annotation_summary

        model = load_model(self.resolve_start(start))
        labels, dims = [], []
        for image_name, lab_name in pairs:
            inp, lab = self._pair_data(image_name, lab_name, None)
            labels.append(lab)
            dims.append(len(inp.spatial_shape))
        if not labels:
            return {"images": 0, "planes": 0, "pixels_per_class": {}, "warnings": [
                "no image/labels pair: choose an image and a Labels layer and click Add pair "
                "(a Labels layer named '<image> labels' pairs by itself)"]}
        return annotation_summary(labels, model.num_classes, model.classes, dims)

    def make_request(self, pairs, start: str, settings: dict, weight_corrections: float = 0.0,
                     channel_axes=None) -> TrainRequest:
        if not pairs:
            raise BadInputError("no image/labels pair to train on: choose an image and a Labels layer "
                                "and click Add pair")
        start_key = self.resolve_start(start)
        images, labels, weights, axes, ids = [], [], [], [], []
        for i, (image_name, lab_name) in enumerate(pairs):
            ch = channel_axes[i] if channel_axes else None
            inp, lab = self._pair_data(image_name, lab_name, ch)
            images.append(inp.data)  # image data are not edited while training
            labels.append(lab.copy())  # labels are: train on a snapshot
            axes.append(inp.channel_axis)
            ids.append(self.viewer.layers[image_name].unique_id)
            pred = self.viewer.layers[lab_name].metadata.get(PREDICTION_KEY)
            if weight_corrections > 0 and pred is not None and np.shape(pred) == lab.shape:
                w = np.ones(lab.shape, np.float32)
                w[(np.asarray(pred) > 0) != (lab > 0)] = 1.0 + weight_corrections
                weights.append(w)
            else:
                weights.append(None)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        parent = Path(start_key).stem if Path(start_key).suffix else start_key
        folder = model_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot create the model folder {folder}: {exc.strerror or exc}") from exc
        out = folder / f"{parent.split('-ft-')[0]}-ft-{stamp}{MODEL_SUFFIX}"
        return TrainRequest(list(pairs), images, labels, weights if any(w is not None for w in weights) else None,
                            axes, start_key, dict(settings), out, ids)

    def run(self, request: TrainRequest, progress=None):
        """Engine call (worker thread): the TrainResult, best weights saved to ``request.out``."""
        from ..engine.training import train

        self.stop_event.clear()
        self.history = []

        def callback(info):
            if progress is not None:
                progress(info)
            return not self.stop_event.is_set()

        ch = request.channel_axes[0] if len(set(request.channel_axes)) == 1 else None
        return train(
            request.start, request.images, request.labels, weights=request.weights, channel_axis=ch,
            out=request.out, name=request.out.stem, callback=callback, save_unchanged=False,
            provenance={"layers": [{"image": i, "labels": l} for i, l in request.pairs],
                        "correction_weighting": request.weights is not None},
            **request.settings,
        )

    # versions --------------------------------------------------------------
    def versions(self) -> list[tuple[Path, dict]]:
        """Fine-tuned models in the model folder, newest first."""
        out = []
        for path in saved_models():
            try:
                meta = read_metadata(path)
            except BadInputError:
                continue
            training = meta["provenance"].get("training")
            unchanged = isinstance(training, dict) and training.get("improved") is False
            if "parent" in meta["provenance"] and not unchanged:  # the start model again is no version
                out.append((path, meta))
        return sorted(out, key=lambda pm: pm[1]["provenance"].get("saved", ""), reverse=True)

    def export(self, path: Path, target: str) -> Path:
        if not target.endswith(MODEL_SUFFIX):
            target += MODEL_SUFFIX
        read_metadata(path)  # refuse to export a broken file
        return write_atomic(target, lambda tmp: shutil.copyfile(path, tmp))

    def compare(self, image_name: str, before_key: str, after_key: str):
        """Segment with both models; (before, after, difference) label arrays.

        difference: 0 unchanged, 1 foreground only after fine-tuning, 2 only before.
        """
        from ..engine.inference import segment

        dock = segment_dock_for(self.viewer)
        inp = layer_input(self.viewer.layers[image_name])
        slices = None
        if len(inp.spatial_shape) == 3:
            from .layers import current_index

            slices = [current_index(self.viewer, self.viewer.layers[image_name])]
        tile = dock.tile_spin.value() if dock is not None else 512
        before = segment(inp.data, load_model(before_key), tile=tile, slices=slices,
                         channel_axis=inp.channel_axis).labels
        after = segment(inp.data, load_model(after_key), tile=tile, slices=slices,
                        channel_axis=inp.channel_axis).labels
        diff = np.zeros(before.shape, np.uint8)
        diff[(after > 0) & (before == 0)] = 1
        diff[(after == 0) & (before > 0)] = 2
        return before, after, diff, inp


class FinetuneDock(_workers.WorkerDockMixin, QWidget):
    """napari dock widget titled "Fine-tune"."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.controller = FinetuneController(napari_viewer)
        #: further engine settings (steps_per_epoch, crop, batch_size, ...) for scripts and tests
        self.advanced: dict = {}
        self.worker = None
        self._progress = None
        self._bridge = _workers.ProgressBridge()
        self._bridge.progress.connect(self._on_progress)

        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.pairs_list = QListWidget()
        self.pairs_list.setMaximumHeight(70)
        self.add_pair_button = QPushButton("Add pair")
        self.remove_pair_button = QPushButton("Remove")
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

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        pair_row = QHBoxLayout()
        pair_row.addWidget(self.add_pair_button)
        pair_row.addWidget(self.remove_pair_button)
        form.addRow("", pair_row)
        form.addRow("Pairs", self.pairs_list)
        form.addRow("Start model", self.start_combo)
        form.addRow("Time budget", self.seconds_spin)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Validation fraction", self.val_spin)
        form.addRow("Device", self.device_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.summary_label)
        layout.addWidget(self.augment_check)
        layout.addWidget(self.weight_check)
        layout.addWidget(self.train_button)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas)
        layout.addWidget(self.compare_button)
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
        self.start_combo.currentIndexChanged.connect(self.refresh_summary)
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed):
            ev.connect(self.refresh_layers)
        self.refresh_layers()
        self.refresh_versions()

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
        for combo, names in ((self.image_combo, self.controller.image_names()),
                             (self.labels_combo, self.controller.labels_names())):
            current = combo.currentText()
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
        existing = set(self.pairs())
        for pair in self.controller.candidate_pairs():
            if pair not in existing:
                self._append_pair(pair)
        layers = self.viewer.layers
        for i in reversed(range(self.pairs_list.count())):
            image, lab = self.pairs_list.item(i).data(256)
            if image not in layers or lab not in layers:
                self.pairs_list.takeItem(i)
        self.refresh_start()
        self.refresh_summary()

    def refresh_start(self) -> None:
        current = self.start_combo.currentData()
        self.start_combo.blockSignals(True)
        self.start_combo.clear()
        for label, key in self.controller.start_choices():
            self.start_combo.addItem(label, key)
        i = self.start_combo.findData(current)
        self.start_combo.setCurrentIndex(max(i, 0))
        self.start_combo.blockSignals(False)

    def pairs(self) -> list[tuple[str, str]]:
        return [tuple(self.pairs_list.item(i).data(256)) for i in range(self.pairs_list.count())]

    def _append_pair(self, pair) -> None:
        item = QListWidgetItem(f"{pair[0]}  ←  {pair[1]}")
        item.setData(256, list(pair))
        self.pairs_list.addItem(item)

    def _add_pair(self) -> None:
        pair = (self.image_combo.currentText(), self.labels_combo.currentText())
        if all(pair) and pair not in self.pairs():
            self._append_pair(pair)
            self.refresh_summary()

    def _remove_pair(self) -> None:
        for item in self.pairs_list.selectedItems():
            self.pairs_list.takeItem(self.pairs_list.row(item))
        self.refresh_summary()

    def refresh_summary(self, *_) -> dict | None:
        try:
            s = self.controller.summary(self.pairs(), self.start_combo.currentData() or CURRENT)
        except BadInputError as exc:
            self.summary_label.setText(f"⚠ {exc}")
            return None
        per_class = ", ".join(f"{k}: {v:,}" for k, v in s["pixels_per_class"].items())
        text = f"Annotated: {s['images']} image(s), {s['planes']} image(s)/slice(s); pixels: {per_class}"
        if s["warnings"]:
            text += "\n⚠ " + "\n⚠ ".join(s["warnings"])
        self.summary_label.setText(text)
        return s

    def refresh_versions(self) -> None:
        self.versions_list.clear()
        for path, meta in self.controller.versions():
            score = meta["scores"].get("val_dice")
            saved = meta["provenance"].get("saved", "")[:19].replace("T", " ")
            shown = f"{score:.3f}" if isinstance(score, (int, float)) else "n/a"
            text = f"{path.stem}  (from {meta['provenance']['parent']}, val Dice {shown}, {saved})"
            item = QListWidgetItem(text)
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
        summary = self.refresh_summary()
        try:
            if summary is not None and summary["warnings"] and summary["planes"] == 0:
                raise BadInputError(summary["warnings"][0])
            request = self.controller.make_request(
                self.pairs(), self.start_combo.currentData() or CURRENT, self.settings(),
                weight_corrections=4.0 if self.weight_check.isChecked() else 0.0,
            )
        except BadInputError as exc:
            self._notify_error(str(exc))
            return
        self.controller.running = True
        self.train_button.setText("Stop")
        self.compare_button.setEnabled(False)
        self.status.setText(f"Training from {Path(request.start).stem}…")
        from napari.utils import progress

        self._progress = progress(total=0, desc="Fine-tune")
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
            self._redraw()
        elif info["step"] % 5 == 0:
            self._redraw()

    def _done(self, request: TrainRequest, result) -> None:
        from napari.utils.notifications import show_info, show_warning

        self.controller.last_result = result
        self.controller.last_request = request
        for (image_name, _), uid in zip(request.pairs, request.layer_ids):
            if image_name not in self.viewer.layers or self.viewer.layers[image_name].unique_id != uid:
                show_warning(f"layer {image_name!r} was removed during training; "
                             "the model was trained on the data as it was when Train was clicked")
        for warning in result.warnings:
            if not warning.startswith("no improvement"):
                show_warning(warning)
        if not result.improved:
            # nothing was saved: the start model stays current, no new version is listed
            self.status.setText(
                f"No improvement over the start model (validation Dice {result.start_dice:.3f} was never "
                f"beaten in {result.seconds:.0f} s): nothing saved. Train longer or annotate more."
            )
            show_warning("Fine-tune: no improvement over the start model; nothing was saved")
            self._redraw()
            return
        dock = segment_dock_for(self.viewer)
        if dock is not None:
            dock.set_model(str(result.path))
        self.status.setText(
            f"Saved {result.path.name}: best validation Dice {result.best_dice:.3f} (start model "
            f"{result.start_dice:.3f}; epoch {result.best_epoch}), stopped by {result.stopped}, "
            f"{result.seconds:.0f} s on {result.device}."
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
        request, result = self.controller.last_request, self.controller.last_result
        if request is None or result is None:
            return
        image_name = request.pairs[0][0]
        if image_name not in self.viewer.layers:
            self._notify_error(f"layer {image_name!r} no longer exists")
            return
        try:
            _, _, diff, inp = self.controller.compare(image_name, request.start, str(result.path))
        except BadInputError as exc:
            self._notify_error(str(exc))
            return
        name = f"{image_name} changes"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        layer = self.viewer.add_labels(diff, name=name, scale=inp.scale, translate=inp.translate)
        changed = int((diff > 0).sum())
        self.status.setText(f"Before/after: {changed:,} pixels changed "
                            "(label 1: found only after fine-tuning, 2: only before).")
        return layer

    def use_selected(self) -> None:
        """Roll back (or forward) to the selected version: it becomes the Segment dock's model."""
        items = self.versions_list.selectedItems()
        if not items:
            return
        path = items[0].data(256)
        if not Path(path).is_file():
            self._notify_error(f"{path} no longer exists")
            self.refresh_versions()
            return
        dock = segment_dock_for(self.viewer)
        if dock is not None:
            dock.set_model(path)
        self.status.setText(f"Current model: {Path(path).stem}")

    def _export(self) -> None:
        items = self.versions_list.selectedItems()
        if not items:
            return
        target, _ = QFileDialog.getSaveFileName(self, "Export model", items[0].data(256),
                                                "Model files (*.safetensors)")
        if target:
            try:
                self.controller.export(Path(items[0].data(256)), target)
            except BadInputError as exc:
                self._notify_error(str(exc))
