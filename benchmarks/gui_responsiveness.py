"""The first Segment click in a fresh napari: time to labels, and the worst event-loop gap.

    python benchmarks/gui_responsiveness.py [--size 512 4096] [--attention on|off|both]
        [--model nuclei] [--threads 2] [--settle 2] [--write-docs]

Each case runs in a fresh Python process (under ``xvfb-run`` when there is no
display), as a user meets it: napari opens with the image (the DSB2018 nuclei
sample at 512², nucleus-like blobs at other sizes), the Segment dock is
opened, ``--settle`` seconds pass (the user ticks *Show attention* and
reaches for the button), then **Segment** is clicked once. From the click
until every new layer is shown and drawn, a 20 ms Qt timer ticks; a gap
between ticks is time the event loop could not run: what a user feels as a
frozen window. Reported per case: click to labels layer shown, click to the
last layer shown, worst gap, 99th-percentile gap, and how long after the dock
opened its background warm-up (model loaded, first forward pass) was done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

TICK_MS = 20
ATTENTION_LAYERS = 9  # three joint modules: a point-wise, a mixing and an effect map each


def image_for(size: int) -> np.ndarray:
    if size == 512:
        from napari_jointattn.sample_data import nuclei_image

        return nuclei_image()
    from _images import blobs

    return blobs(size)


def measure(size: int, model: str, threads: int, attention: bool, settle: float = 2.0,
            timeout: float = 1800) -> dict:
    """One first click in this (fresh) process."""
    import napari
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    torch.set_num_threads(threads)
    viewer = napari.Viewer(show=True)
    try:
        viewer.add_image(image_for(size), name="image", colormap="gray")
        app = QApplication.instance()
        opened = time.perf_counter()
        _, dock = viewer.window.add_plugin_dock_widget("napari-jointattn", "Segment")
        dock.set_model(model)
        session = getattr(dock, "session", None)  # docks that warm the model up expose it

        def warm() -> bool:
            return session is not None and session.is_warm(model, dock.tile_spin.value())

        ready = None
        while time.perf_counter() - opened < settle:
            app.processEvents()
            if ready is None and warm():
                ready = time.perf_counter() - opened
            time.sleep(0.005)
        warm_at_click = warm()
        ticks: list[float] = []
        timer = QTimer()
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start(TICK_MS)
        before = {layer.name for layer in viewer.layers}
        expected = 1 + (ATTENTION_LAYERS if attention else 0)
        dock.attention_check.setChecked(attention)
        t0 = time.perf_counter()
        dock.segment_button.click()
        labels_shown = all_shown = None
        while time.perf_counter() - t0 < timeout:
            app.processEvents()
            new = {layer.name for layer in viewer.layers} - before
            now = time.perf_counter() - t0
            if labels_shown is None and "image labels" in new:
                labels_shown = now
            if all_shown is None and len(new) >= expected:
                all_shown = now
            if ready is None and warm():
                ready = time.perf_counter() - opened
            if all_shown is not None and not dock.controller.running:
                break
            time.sleep(0.002)
        end = time.perf_counter() + 1.0  # let the canvas draw the new layers (first texture upload)
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.002)
        timer.stop()
        gaps = np.diff([t0, *ticks])
        new_layers = [layer for layer in viewer.layers if layer.name not in before]
        labels = viewer.layers["image labels"] if "image labels" in viewer.layers else None
        return {"size": size, "model": model, "threads": threads, "attention": attention,
                "settle_s": settle, "ticks": len(ticks), "model_ready_s": ready, "warm_at_click": warm_at_click,
                "worst_gap_s": float(gaps.max()) if len(gaps) else float("nan"),
                "p99_gap_s": float(np.percentile(gaps, 99)) if len(gaps) else float("nan"),
                "median_gap_s": float(np.median(gaps)) if len(gaps) else float("nan"),
                "labels_shown_s": labels_shown, "all_shown_s": all_shown,
                "layers": len(new_layers),
                "objects": int(np.asarray(labels.data).max()) if labels is not None else 0,
                "labels_dtype": str(np.asarray(labels.data).dtype) if labels is not None else None,
                "status": dock.status.text()}
    finally:
        viewer.close()


def run_fresh(size: int, model: str, threads: int, attention: bool, settle: float) -> dict:
    """:func:`measure` in a fresh Python process."""
    cmd = [sys.executable, __file__, "--one", "--size", str(size), "--model", model,
           "--threads", str(threads), "--attention", "on" if attention else "off",
           "--settle", str(settle)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"benchmark process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def table(results: list[dict]) -> str:
    rows = ["| first click, fresh viewer | click to labels shown | click to last layer shown "
            "| worst event-loop gap | 99th-percentile gap | objects | dock open to model ready |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        what = f"{r['size']}², attention {'on' if r['attention'] else 'off'}"
        shown = "–" if r["labels_shown_s"] is None else f"{r['labels_shown_s']:.2f} s"
        last = "–" if r["all_shown_s"] is None else f"{r['all_shown_s']:.2f} s"
        rows.append(f"| {what} | {shown} | {last} | {r['worst_gap_s']:.3f} s | {r['p99_gap_s']:.3f} s "
                    f"| {r['objects']} | {_ready(r)} |")
    return "\n".join(rows)


def _ready(r: dict) -> str:
    if r.get("model_ready_s") is None:
        return "– (no warm-up)" if not r.get("warm_at_click") else "–"
    return f"{r['model_ready_s']:.1f} s"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--attention", choices=("on", "off", "both"), default="both")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds between opening the dock and the click (default 2)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one case, this process
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux") and shutil.which("xvfb-run"):
        os.execvp("xvfb-run", ["xvfb-run", "-a", sys.executable, __file__, *argv])
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.attention]
    if args.one:
        r = measure(args.size[0], args.model, args.threads, modes[0], args.settle)
        print(json.dumps(r))
        return r
    results = [run_fresh(size, args.model, args.threads, att, args.settle)
               for size in args.size for att in modes]
    text = table(results)
    print(text)
    if args.write_docs:
        import datetime

        import napari
        import torch
        from _report import update_section

        update_section(ROOT / "docs" / "performance.md", "gui first click",
                       text + f"\n\n{datetime.date.today().isoformat()}, napari {napari.__version__}, "
                       f"torch {torch.__version__}, {args.threads} threads, {TICK_MS} ms timer, "
                       f"click {args.settle:g} s after the dock opened; "
                       f"`python benchmarks/gui_responsiveness.py {' '.join(argv)}`")
    return {**results[0], "cases": results}


if __name__ == "__main__":
    main()
