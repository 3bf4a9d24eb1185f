"""Worst event-loop gap while the Segment dock processes a large image.

    python benchmarks/gui_responsiveness.py [--size 4096] [--model nuclei] [--threads 2] [--write-docs]

Opens napari (under ``xvfb-run`` when there is no display), adds a size² image
of nucleus-like blobs, clicks **Segment** in the dock and, until the labels
layer is shown, records the time between ticks of a 10 ms Qt timer. A gap is
the time the event loop could not run: what a user feels as a frozen window.
Prints the worst gap, the 99th percentile, and the time until the labels
layer appeared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]


def measure(size: int, model: str, threads: int, timeout: float = 1800) -> dict:
    import napari
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    torch.set_num_threads(threads)
    viewer = napari.Viewer(show=True)
    try:
        _, dock = viewer.window.add_plugin_dock_widget("napari-jointattn", "Segment")
        from _images import blobs

        viewer.add_image(blobs(size), name="large")
        dock.refresh_layers()
        dock.set_model(model)
        app = QApplication.instance()
        for _ in range(20):
            app.processEvents()
        ticks: list[float] = []
        timer = QTimer()
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start(10)
        before = {layer.name for layer in viewer.layers}
        t0 = time.perf_counter()
        dock.segment_button.click()
        shown = None
        while time.perf_counter() - t0 < timeout:
            app.processEvents()
            if shown is None and {layer.name for layer in viewer.layers} - before:
                shown = time.perf_counter() - t0
            if not dock.controller.running and shown is not None:
                break
            time.sleep(0.002)
        for _ in range(50):  # let the canvas draw the new layer
            app.processEvents()
            time.sleep(0.002)
        timer.stop()
        gaps = np.diff([t0, *ticks])
        new = [layer for layer in viewer.layers if layer.name not in before]
        return {"size": size, "model": model, "threads": threads, "ticks": len(ticks),
                "worst_gap_s": float(gaps.max()) if len(gaps) else float("nan"),
                "p99_gap_s": float(np.percentile(gaps, 99)) if len(gaps) else float("nan"),
                "median_gap_s": float(statistics.median(gaps)) if len(gaps) else float("nan"),
                "labels_shown_s": shown, "objects": int(new[0].data.max()) if new else 0,
                "status": dock.status.text()}
    finally:
        viewer.close()


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--model", default="nuclei")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux") and shutil.which("xvfb-run"):
        os.execvp("xvfb-run", ["xvfb-run", "-a", sys.executable, __file__, *argv])
    r = measure(args.size, args.model, args.threads)
    text = (f"| {r['size']}² image, model `{r['model']}`, {r['threads']} threads | value |\n| --- | --- |\n"
            f"| worst event-loop gap | {r['worst_gap_s']:.3f} s |\n"
            f"| 99th-percentile gap | {r['p99_gap_s']:.3f} s |\n"
            f"| median gap (timer period 10 ms) | {r['median_gap_s']:.3f} s |\n"
            f"| click to labels layer shown | {r['labels_shown_s']:.1f} s |\n"
            f"| objects found | {r['objects']} |")
    print(text)
    if args.write_docs:
        import datetime

        import napari
        import torch
        from _report import update_section

        update_section(ROOT / "docs" / "performance.md", "cpu gui",
                       text + f"\n\n{datetime.date.today().isoformat()}, napari {napari.__version__}, "
                       f"torch {torch.__version__}; `python benchmarks/gui_responsiveness.py {' '.join(argv)}`")
    return r


if __name__ == "__main__":
    main()
