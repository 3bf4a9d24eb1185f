"""Helpers shared by the GUI tests."""

import time


def wait_workers(timeout=60.0):
    """Let the docks' background work (warm-up, summaries, fit checks, compare) end,
    so no worker outlives the viewer a test closes."""
    from qtpy.QtWidgets import QApplication

    from napari_jointattn.widgets import _workers

    end = time.perf_counter() + timeout
    while _workers.running() and time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)
