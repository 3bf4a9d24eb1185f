"""Closing napari at any moment: the process goes on and ends normally, with no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("napari")

HERE = Path(__file__).parent


# about 10 s each (a napari start): three of the seven are in the slow set
SLOW = pytest.mark.slow


@pytest.mark.parametrize("case", ["segment-open", pytest.param("segment-running", marks=SLOW),
                                  pytest.param("finetune-open", marks=SLOW), "finetune-exit",
                                  pytest.param("segment-exit", marks=SLOW), "train", "live"])
def test_closing_the_window_during_work_exits_cleanly(case, tmp_path):
    env = {**os.environ, "QT_API": os.environ.get("QT_API", "pyqt6")}
    env.pop("NAPARI_JOINTATTN_SYNC", None)  # real worker threads, as in use
    done = subprocess.run([sys.executable, str(HERE / "_close_app.py"), case, str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["started", "closed"], done.stdout
    assert "Traceback" not in done.stderr and "RuntimeError" not in done.stderr, done.stderr[-3000:]
