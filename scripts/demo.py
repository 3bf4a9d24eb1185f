"""Open napari with the Segment dock on the nuclei sample (and segment it when a preset exists).

    python scripts/demo.py [--screenshot out.png]

With --screenshot the window is captured after segmenting and napari exits
(used by the Quick start when there is no display).
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--screenshot", help="save a screenshot of the window and exit")
    args = p.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-jointattn demo")
    viewer.open_sample("napari-jointattn", "nuclei")
    _, dock = viewer.window.add_plugin_dock_widget("napari-jointattn", "Segment")
    if dock.model_combo.count():
        dock.attention_check.setChecked(True)
        dock.segment()
        deadline = time.time() + 120
        while dock.controller.running and time.time() < deadline:
            QApplication.processEvents()
            time.sleep(0.02)
        print(dock.status.text())
        for layer in viewer.layers:
            if layer.name.startswith("attention") and layer.name != "attention joint 1/8":
                layer.visible = False
    if args.screenshot:
        viewer.window._qt_window.resize(1400, 900)
        QApplication.processEvents()
        viewer.screenshot(args.screenshot, canvas_only=False, flash=False)
        print(f"screenshot saved to {args.screenshot}")
        viewer.close()
        return 0
    napari.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
