"""Open napari with a dock, start one kind of work, close the window while it runs.

Usage: ``python _close_app.py CASE MODEL_DIR``. Run in a subprocess by ``test_close.py``, so that
a crash (a segmentation fault, an abort) fails the test instead of killing the test run. Prints
``started`` once the work is under way and ``closed`` after the window has gone and the process
has gone on for a while (as a host such as IPython would), then exits normally.
"""

import os
import sys
import time

import numpy as np

case, model_dir = sys.argv[1], sys.argv[2]
os.environ["NAPARI_JOINTATTN_MODEL_DIR"] = model_dir

import napari  # noqa: E402
from qtpy.QtCore import QTimer  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_jointattn.engine.models.model import new_model, save_model  # noqa: E402
from napari_jointattn.model.denseunet import DenseUNetConfig  # noqa: E402

tiny = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                       head_channels=4, attention_dim=8, attention_levels=(1,), dropout=0.0)
model = str(save_model(new_model(config=tiny, classes=["background", "object"], seed=0),
                       os.path.join(model_dir, "tiny.safetensors")))
rng = np.random.default_rng(0)
viewer = napari.Viewer(show=True)
plugin = "Fine-tune" if case in ("train", "live", "finetune-open", "finetune-exit") else "Segment"
_, dock = viewer.window.add_plugin_dock_widget("napari-jointattn", plugin)
if case in ("finetune-exit", "segment-exit"):  # a script that closes the viewer and ends at once
    print("started", flush=True)
    viewer.close()
    print("closed", flush=True)
    raise SystemExit(0)


def begin():
    if case == "segment-open":  # two images: closing removes layers, each starts a fit check
        viewer.add_image(rng.random((256, 256), np.float32), name="a")
        viewer.add_image(rng.random((256, 256), np.float32), name="b")
        return 0.2
    if case == "segment-running":
        dock.set_model(model)
        viewer.add_image(rng.random((64, 384, 384), np.float32), name="stack")
        dock.segment_button.click()
        return 2.0
    if case == "finetune-open":
        return 0.2
    image = rng.random((96, 96), np.float32)
    labels = np.zeros((96, 96), np.int32)
    labels[20:40, 20:40] = 1
    labels[60:90, 10:30] = 1
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(labels, name="cells labels")
    dock.controller.session.set_model(model)
    if case == "train":
        dock.train_panel.advanced = {"batch_size": 2, "crop": 32}
        dock.train_panel.train_button.click()
        return 3.0
    if case == "live":
        dock.live_panel.settings = {"batch_size": 2, "crop": 32}
        dock.live_panel.live_button.click()
        layer.paint((30, 30), 1)
        return 3.0
    raise SystemExit(f"unknown case {case}")


def go():
    wait = begin()
    print("started", flush=True)
    QTimer.singleShot(int(wait * 1000), viewer.close)


QTimer.singleShot(100, go)
napari.run()
app = QApplication.instance()
end = time.monotonic() + 2.0  # late worker results arrive now, at deleted widgets
while time.monotonic() < end:
    app.processEvents()
    time.sleep(0.02)
print("closed", flush=True)
