"""Regenerate the screenshots in docs/images (run under Xvfb: xvfb-run -a python scripts/screenshots.py).

Needs the bundled presets. Each picture is the real napari window after
driving the docks the way a user would.
"""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images"


def wait(dock, timeout=300):
    from qtpy.QtWidgets import QApplication

    deadline = time.time() + timeout
    while dock.controller.running and time.time() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    QApplication.processEvents()


def shot(viewer, name):
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()
    path = OUT / name
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(path)


def nuclei_segmented(height: int):
    """A napari window with the nuclei sample segmented by the Segment dock: (viewer, dock)."""
    import napari

    viewer = napari.Viewer(title="napari-jointattn")
    viewer.window._qt_window.resize(1500, height)
    viewer.open_sample("napari-jointattn", "nuclei")
    _, dock = viewer.window.add_plugin_dock_widget("napari-jointattn", "Segment")
    dock.set_model("nuclei")
    dock.segment()
    wait(dock)
    viewer.layers["nuclei labels"].contour = 2
    return viewer, dock


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    viewer, dock = nuclei_segmented(900)
    shot(viewer, "segment_nuclei.png")

    dock.attention_check.setChecked(True)
    viewer.layers.selection.active = viewer.layers["nuclei"]
    dock.segment()
    wait(dock)
    for layer in viewer.layers:
        if layer.name.startswith("attention"):
            layer.visible = layer.name == "attention joint 1/8"
    viewer.layers["nuclei labels"].visible = False
    shot(viewer, "attention_pointwise.png")

    viewer.layers["attention joint 1/8"].visible = False
    viewer.layers["attention joint 1/8 mix"].visible = True
    shot(viewer, "attention_mix.png")

    viewer.layers["attention joint 1/8 mix"].visible = False
    dock.query_check.setChecked(True)
    dock.query_at((250, 260))
    shot(viewer, "attention_query.png")

    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    dock.query_check.setChecked(False)
    dock.attention_check.setChecked(False)
    viewer.open_sample("napari-jointattn", "brain-mri")
    dock.set_model("brain-mri")
    viewer.dims.set_current_step(0, 45)
    dock.stack_combo.setCurrentText("whole stack")
    dock.segment()
    wait(dock)
    viewer.layers["brain T1 labels"].opacity = 0.45
    shot(viewer, "segment_brain.png")
    viewer.close()
    finetune_shot()
    return 0


def finetune_shot(seconds: int = 60) -> None:
    """The Fine-tune dock after a short run: the user's corrected labels, live plot, versions."""
    viewer, _ = nuclei_segmented(1000)
    labels = viewer.layers["nuclei labels"]
    # a correction, as a user would paint it: erase the objects of the top-left quarter
    h, w = labels.data.shape
    corrected = labels.data.copy()
    corrected[: h // 4, : w // 4] = 0
    labels.data = corrected
    # a tab beside the Segment dock: the whole height of the window, as on a laptop screen
    _, ft = viewer.window.add_plugin_dock_widget("napari-jointattn", "Fine-tune", tabify=True)
    train = ft.train_panel
    train.refresh_layers()
    train.seconds_spin.setValue(seconds)
    train.epochs_spin.setValue(8)
    train.train_button.click()
    wait(ft, timeout=seconds + 120)
    shot(viewer, "finetune_dock.png")
    viewer.close()


if __name__ == "__main__":
    raise SystemExit(main())
