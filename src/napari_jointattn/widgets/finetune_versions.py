"""The Fine-tune dock's versions panel: the fine-tuned models, rollback and export.

A thin Qt view on the version methods of
:class:`~napari_jointattn.controllers.finetune.FinetuneController`; exports
run in a worker thread (a checked export runs the model).
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..controllers.finetune import FinetuneController
from ..engine.errors import BadInputError
from ..engine.models.versions import describe_version
from . import _workers

#: the export formats offered, by file-dialog filter
EXPORT_FILTERS = {"Model file (*.safetensors)": "safetensors",
                  "bioimage.io model package (*.zip)": "bioimageio",
                  "ONNX (*.onnx)": "onnx",
                  "TorchScript (*.pt)": "torchscript"}


class VersionsPanel(QWidget):
    """The model versions, newest first: *Use selected* rolls back (or forward), *Export…*
    writes the selected one in another format."""

    def __init__(self, controller: FinetuneController) -> None:
        super().__init__()
        self.controller = controller
        self.last_export: Path | None = None
        self.versions_list = QListWidget()
        self.use_button = QPushButton("Use selected")
        self.export_button = QPushButton("Export…")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("Model versions"))
        layout.addWidget(self.versions_list)
        row = QHBoxLayout()
        row.addWidget(self.use_button)
        row.addWidget(self.export_button)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self.use_button.clicked.connect(self.use_selected)
        self.export_button.clicked.connect(self.export)
        self.refresh_versions()

    def refresh_versions(self, *_) -> None:
        self.versions_list.clear()
        for path, meta in self.controller.versions():
            item = QListWidgetItem(describe_version(path, meta))
            item.setData(256, str(path))
            self.versions_list.addItem(item)

    def _selected(self) -> Path | None:
        items = self.versions_list.selectedItems()
        return Path(items[0].data(256)) if items else None

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        show_error(message)

    def use_selected(self) -> None:
        """Roll back (or forward) to the selected version: the next Segment uses it."""
        source = self._selected()
        if source is None:
            return
        try:
            path = self.controller.use_version(source)
        except BadInputError as exc:
            self._notify_error(str(exc))
            self.refresh_versions()
            return
        self.status.setText(f"Current model: {Path(path).stem} (the next Segment uses it)")

    def export(self) -> None:
        """Ask where and in which format, then export the selected version in a worker thread."""
        source = self._selected()
        if source is None:
            return
        target, chosen = QFileDialog.getSaveFileName(self, "Export model",
                                                     str(source.with_suffix("")),
                                                     ";;".join(EXPORT_FILTERS))
        if not target:
            return
        fmt = EXPORT_FILTERS.get(chosen)
        self.export_button.setEnabled(False)
        self.status.setText(f"Exporting {source.stem} ({fmt or 'safetensors'})…")

        def done(path) -> None:
            self.status.setText(f"Exported {source.stem} to {path}")
            self.last_export = Path(path)

        def failed(exc: BaseException) -> None:
            self.status.setText("Export failed: nothing was written.")
            self._notify_error(str(exc) if isinstance(exc, BadInputError)
                               else f"{type(exc).__name__}: {exc}")

        # checked exports run the model (and bioimage.io's own test run): never on the GUI thread
        _workers.start(lambda: self.controller.export(source, target, fmt), done, failed,
                       lambda: self.export_button.setEnabled(True), owner=self)
