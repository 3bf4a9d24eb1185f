"""The Fine-tune dock: train on corrected labels without leaving napari.

Three thin panels on two Qt-free controllers, sharing the viewer's session:

* :class:`~.finetune_train.TrainPanel` (``dock.train_panel``): pairs, the
  annotation summary, settings, Train/Stop with a live loss / validation-Dice
  plot, Compare before/after, on
  :class:`~napari_jointattn.controllers.finetune.FinetuneController`
  (``dock.controller``);
* :class:`~.finetune_live.LivePanel` (``dock.live_panel``): *Learn while I
  paint*, on :class:`~napari_jointattn.controllers.live.LiveController`
  (``dock.live``);
* :class:`~.finetune_versions.VersionsPanel` (``dock.versions_panel``): the
  model versions, rollback and export.

One training at a time: Train is off while live mode runs, and live mode
refuses to start during a training run.
"""

from __future__ import annotations

from qtpy.QtWidgets import QVBoxLayout, QWidget
from superqt import QCollapsible

from ..controllers import gc_hold
from ..controllers.finetune import FinetuneController
from ..controllers.live import LiveController
from . import _workers
from .finetune_live import LivePanel
from .finetune_train import TrainPanel
from .finetune_versions import VersionsPanel

__all__ = ["FinetuneDock"]


def _import_training_engine() -> None:
    import importlib

    for name in ("napari_jointattn.engine.training.live", "napari_jointattn.engine.training",
                 "napari_jointattn.engine.training.uncertainty",
                 "napari_jointattn.engine.inference.postprocess"):
        importlib.import_module(name)
    from ..controllers.session import _warm_layers

    _warm_layers()  # napari's first Labels layer imports its features table (pandas): not at Start


class FinetuneDock(QWidget):
    """napari dock widget titled "Fine-tune": the training, live and versions panels."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.controller = FinetuneController(napari_viewer)
        self.live = LiveController(napari_viewer, session=self.controller.session)
        self.train_panel = TrainPanel(napari_viewer, self.controller, self.live)
        self.live_panel = LivePanel(napari_viewer, self.controller, self.live, self.train_panel)
        self.versions_panel = VersionsPanel(self.controller)
        # training first; live mode and the versions folded below it, so that the dock fits
        # beside the canvas on a 1000-pixel-high screen (the versions unfold when one is saved)
        self.live_section = QCollapsible("Learn while I paint")
        self.live_section.addWidget(self.live_panel)
        self.versions_section = QCollapsible("Model versions")
        self.versions_section.addWidget(self.versions_panel)
        layout = QVBoxLayout(self)
        layout.addWidget(self.train_panel)
        for section in (self.live_section, self.versions_section):
            section.collapse(animate=False)
            layout.addWidget(section)
        layout.addStretch(1)

        self.live_panel.running_changed.connect(self.train_panel.set_live)
        self.live_panel.model_saved.connect(self.versions_panel.refresh_versions)
        self.live_panel.model_saved.connect(lambda _: self.train_panel.refresh_start())
        self.train_panel.model_saved.connect(self.versions_panel.refresh_versions)
        for panel in (self.train_panel, self.live_panel):
            panel.model_saved.connect(lambda *_: self.versions_section.expand(animate=False))
        # a removed layer's data may sit in frozen cycles
        self.viewer.layers.events.removed.connect(lambda *_: gc_hold.thaw())
        # closing the dock or the viewer ends the live loop and a training run (their worker
        # threads stop by themselves; a run keeps its best weights so far, as Stop does)
        stops = (self.live.stop_event.set, self.controller.stop_event.set)
        self.destroyed.connect(lambda *_: [stop() for stop in stops])
        self.preload()

    def preload(self) -> None:
        """Import the training and live-loop engine in a worker thread while the dock is read,
        so that Train and Start live do not pay for the imports (a pause of the window at
        the start of the live loop otherwise: docs/performance.md)."""
        if _workers.synchronous():
            return
        self.preload_worker = _workers.start(_import_training_engine, lambda _: None,
                                             lambda _: None, lambda: None, owner=self)
