"""The Fine-tune dock under a real viewer: train on painted labels, stop, versions, bad input."""

import time

import numpy as np
import pytest

from napari_jointattn.engine.models.model import load_model, new_model, save_model

pytest.importorskip("napari")

from _gui_helpers import wait_workers

FAST = {"steps_per_epoch": 4, "crop": 64, "batch_size": 4}


@pytest.fixture
def docks(make_napari_viewer, model_dir):
    start = save_model(new_model("nuclei", seed=0), model_dir / "start.safetensors")
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-jointattn", "Segment")
    seg.set_model(str(start))
    _, ft = viewer.window.add_plugin_dock_widget("napari-jointattn", "Fine-tune")
    ft.train_panel.advanced = dict(FAST)
    yield viewer, seg, ft, start
    wait_workers()


@pytest.fixture
def lone_ft(make_napari_viewer):
    """A fresh viewer with only the Fine-tune dock open."""
    viewer = make_napari_viewer()
    _, ft = viewer.window.add_plugin_dock_widget("napari-jointattn", "Fine-tune")
    ft.train_panel.advanced = dict(FAST)
    yield viewer, ft
    wait_workers()


def wait_idle(qtbot, dock, timeout=120_000):
    qtbot.waitUntil(lambda: not dock.controller.running, timeout=timeout)


def wait_summary(qtbot, ft, timeout=30_000):
    """The debounced summary, computed in a worker thread, is shown; returns it."""
    qtbot.waitUntil(lambda: not ft.train_panel._summary_timer.isActive() and ft.train_panel.summary_worker is None
                    and ft.train_panel.summary_label.text() != "", timeout=timeout)
    return ft.train_panel.last_summary


def test_train_on_painted_labels(qtbot, docks, blobs, model_dir):
    viewer, seg, ft, _start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth.astype(np.uint8), name="cells labels")  # the user's painting
    assert ft.train_panel.pairs() == [("cells", "cells labels")]
    wait_summary(qtbot, ft)
    assert "nucleus" in ft.train_panel.summary_label.text()
    ft.train_panel.seconds_spin.setValue(60)
    ft.train_panel.epochs_spin.setValue(6)
    ft.train_panel.train_button.click()
    assert ft.train_panel.train_button.text() == "Stop"
    wait_idle(qtbot, ft)
    result = ft.controller.last_result
    assert result is not None, ft.train_panel.status.text()
    # the status names the validation split it chose (here the right-hand strip of the image)
    assert f"Split {result.summary['split']}." in ft.train_panel.status.text()
    assert result.summary["split"].startswith("by columns")
    losses = [h["loss"] for h in result.history[1:]]
    assert losses[-1] < losses[0]
    assert result.path.parent == model_dir and result.path.name.startswith("start-ft-")
    model = load_model(result.path)
    assert model.provenance["parent"] == "start"
    assert model.provenance["layers"] == [{"image": "cells", "labels": "cells labels"}]
    assert model.provenance["data"]["annotated_pixels"] == truth.size
    assert seg.model_combo.currentData() == str(result.path)  # the Segment dock switched
    assert ft.versions_panel.versions_list.count() == 1
    assert not [p for p in model_dir.iterdir() if ".part" in p.name]
    # the line plot has a loss and a validation curve
    assert len(ft.train_panel.plot.axes.lines) == 2
    ft.train_panel.compare()  # both models run in a worker thread
    qtbot.waitUntil(lambda: "cells changes" in viewer.layers and ft.train_panel.compare_worker is None, timeout=60_000)
    layer = viewer.layers["cells changes"]
    assert layer.data.shape == image.shape and set(np.unique(layer.data)) <= {0, 1, 2}
    assert "pixels changed" in ft.train_panel.status.text()


def test_stop_keeps_best_so_far(qtbot, docks, blobs, model_dir):
    viewer, _seg, ft, _start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth.astype(np.uint8), name="cells labels")
    ft.train_panel.epochs_spin.setValue(1000)
    ft.train_panel.seconds_spin.setValue(600)
    ft.train_panel.train_button.click()
    qtbot.waitUntil(lambda: any(h.get("epoch_end") for h in ft.controller.history), timeout=60_000)
    ft.train_panel.train_button.click()  # Stop
    wait_idle(qtbot, ft)
    result = ft.controller.last_result
    assert result.stopped == "stopped"
    files = sorted(p.name for p in model_dir.iterdir())
    assert files == sorted(["start.safetensors", result.path.name])
    assert load_model(result.path).scores["val_dice"] == pytest.approx(result.best_dice, abs=1e-6)


def test_unannotated_slices_are_not_counted_in_the_summary(blobs):
    from napari.components import ViewerModel

    from napari_jointattn.controllers.finetune import FinetuneController

    image, truth = blobs
    viewer = ViewerModel()
    viewer.add_image(np.stack([image] * 4), name="stack")
    lab = np.zeros((4, *truth.shape), np.uint8)
    lab[1] = truth > 0
    viewer.add_labels(lab, name="stack labels")
    ft = FinetuneController(viewer)
    summary = ft.summary(ft.candidate_pairs(), "nuclei")
    fg = int((truth > 0).sum())
    # slices 0, 2, 3 are unannotated: counting them as background would add 3 x 11520 pixels
    assert summary["planes"] == 1
    assert summary["pixels_per_class"] == {"background": truth.size - fg, "nucleus": fg}


def test_summary_follows_edits_off_the_gui_thread(qtbot, docks, blobs, monkeypatch):
    """Painting refreshes the summary (debounced); the counting runs in a worker thread."""
    import threading

    from napari_jointattn.controllers.finetune import FinetuneController

    viewer, _seg, ft, _start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(np.zeros(truth.shape, np.int32), name="cells labels")
    assert wait_summary(qtbot, ft)["planes"] == 0
    threads = []
    real = FinetuneController.compute_summary
    monkeypatch.setattr(FinetuneController, "compute_summary",
                        staticmethod(lambda snap: threads.append(threading.current_thread()) or real(snap)))
    # a burst of brush strokes: one summary computation, after the burst
    for i in range(5):
        layer.paint((20 + i, 20), 1)
    assert ft.train_panel._summary_timer.isActive()
    summary = wait_summary(qtbot, ft)
    assert summary["planes"] == 1 and summary["pixels_per_class"]["nucleus"] > 0
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    # a whole-data change (undo, a script) refreshes too
    layer.data = np.zeros(truth.shape, np.int32)
    qtbot.waitUntil(lambda: ft.train_panel.last_summary is not None and ft.train_panel.last_summary["planes"] == 0, timeout=30_000)


def test_gui_responsive_and_painting_while_training(qtbot, docks, blobs):
    from qtpy.QtCore import QTimer

    viewer, _seg, ft, _start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    labels = viewer.add_labels(truth.astype(np.int32), name="cells labels")
    ft.train_panel.epochs_spin.setValue(3)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    ft.train_panel.train_button.click()
    # paint once training is really under way, with napari's brush
    qtbot.waitUntil(lambda: any(h.get("loss") is not None for h in ft.controller.history), timeout=60_000)
    assert ft.controller.running
    t = time.perf_counter()
    labels.paint((5, 5), 3)
    painted_in = time.perf_counter() - t
    wait_idle(qtbot, ft)
    timer.stop()
    assert painted_in < 0.5
    assert labels.data[5, 5] == 3  # the edit survives the end of training
    assert ft.controller.last_request.labels[0][5, 5] == truth[5, 5] == 0  # trained on the snapshot
    assert np.diff(ticks).max() < 1.0
    assert ft.controller.last_result is not None


def test_progress_reports_steps_before_the_first_epoch_ends(qtbot, docks, blobs):
    viewer, _seg, ft, _start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth.astype(np.int32), name="cells labels")
    ft.train_panel.advanced = {**FAST, "steps_per_epoch": 60, "val_every": 1000}
    ft.train_panel.epochs_spin.setValue(1)
    ft.train_panel.seconds_spin.setValue(30)
    shown = []  # (time, text) of each status change
    ft.train_panel.status.setText("")
    from qtpy.QtCore import QTimer

    timer = QTimer()
    timer.timeout.connect(lambda: (not shown or shown[-1][1] != ft.train_panel.status.text())
                          and shown.append((time.perf_counter(), ft.train_panel.status.text())))
    timer.start(50)
    ft.train_panel.train_button.click()
    wait_idle(qtbot, ft)
    timer.stop()
    step_lines = [text for _, text in shown if "step" in text and "loss" in text]
    assert step_lines, [text for _, text in shown]
    assert any("Epoch 1/1, step" in text for text in step_lines)
    times = [t for t, text in shown if "step" in text or "Dice" in text]
    assert max(np.diff(times)) < 10.0  # a report at least every few seconds (1 s by design)


@pytest.mark.parametrize("case", ["no-labels", "other-shape", "single-class"])
def test_bad_input_notifies_and_keeps_layers(qtbot, docks, blobs, case):
    viewer, _seg, ft, _start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    lab = {"no-labels": np.zeros(truth.shape, np.int32),  # nothing annotated
           "other-shape": np.ones((10, 10), np.int32),
           "single-class": np.ones(truth.shape, np.int32)}[case]  # everything one object: no background
    viewer.add_labels(lab, name="cells labels")
    if case == "other-shape":
        wait_summary(qtbot, ft)
        assert "shape" in ft.train_panel.summary_label.text()
        assert "cells labels" not in ft.controller.labels_names("cells")  # not offered for pairing
    before = [(l.name, np.asarray(l.data).copy()) for l in viewer.layers]
    ft.train_panel.train_button.click()
    wait_idle(qtbot, ft)
    assert ft.controller.last_result is None
    expected = {"no-labels": "no annotated pixels", "other-shape": "shape",
                "single-class": "only one class is annotated"}[case]
    assert expected in ft.train_panel.status.text()
    for name, data in before:
        np.testing.assert_array_equal(viewer.layers[name].data, data)


def test_image_removed_during_training(qtbot, docks, blobs):
    viewer, _seg, ft, _start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth.astype(np.uint8), name="cells labels")
    ft.train_panel.epochs_spin.setValue(2)
    ft.train_panel.train_button.click()
    viewer.layers.remove("cells")
    wait_idle(qtbot, ft)
    assert ft.controller.last_result is not None  # trained on the snapshot
    assert "cells labels" in viewer.layers


def _image(viewer, blobs):
    if "cells" not in viewer.layers:
        viewer.add_image(blobs[0], name="cells")
    return ("cells",)


def test_rollback_without_a_segment_dock(qtbot, lone_ft, blobs, model_dir):
    """Use selected changes what the next Segment uses, even with no Segment dock open."""
    viewer, ft = lone_ft
    older = save_model(new_model("nuclei", seed=1, provenance={"parent": "nuclei"}),
                       model_dir / "nuclei-ft-older.safetensors")
    ft.versions_panel.refresh_versions()
    ft.versions_panel.versions_list.setCurrentRow(0)
    ft.versions_panel.use_button.click()
    assert "nuclei-ft-older" in ft.versions_panel.status.text()
    # a Segment dock opened afterwards starts on it, and so does its next run
    _, seg = viewer.window.add_plugin_dock_widget("napari-jointattn", "Segment")
    assert seg.model_combo.currentData() == str(older)
    assert seg.controller.make_request(*_image(viewer, blobs)).model_key == str(older)
    # and the Fine-tune dock's default start model follows it
    assert ft.controller.resolve_start(ft.train_panel.start_key()) == str(older)


def test_no_improvement_is_shown_and_not_listed_as_a_version(qtbot, docks, blobs, model_dir, monkeypatch):
    from napari.utils import notifications

    viewer, seg, ft, start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth.astype(np.uint8), name="cells labels")
    ft.train_panel.advanced = {**FAST, "lr": 1e-30, "head": "keep"}  # no weight can change: never beaten
    ft.train_panel.epochs_spin.setValue(1)
    warned = []
    monkeypatch.setattr(notifications, "show_warning", warned.append)
    ft.train_panel.train_button.click()
    wait_idle(qtbot, ft)
    result = ft.controller.last_result
    assert result is not None and not result.improved and result.path is None
    assert "No improvement over the start model" in ft.train_panel.status.text()
    assert any("no improvement" in w for w in warned)
    assert sorted(p.name for p in model_dir.iterdir()) == ["start.safetensors"]  # nothing saved
    assert ft.versions_panel.versions_list.count() == 0
    assert seg.model_combo.currentData() == str(start)  # the Segment dock keeps its model
    assert not ft.train_panel.compare_button.isEnabled()


def test_fine_tune_dock_alone_trains_with_its_defaults(qtbot, lone_ft, blobs, model_dir):
    """A fresh viewer, only the Fine-tune dock: add an image and a Labels layer of any name,
    click Train with every default, get a model file (started from the first preset)."""
    viewer, ft = lone_ft
    ft.train_panel.epochs_spin.setValue(1)
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(np.zeros((10, 10), np.int32), name="other size")
    wait_summary(qtbot, ft)
    assert "Add pair" in ft.train_panel.summary_label.text()  # says how to pair
    viewer.add_labels(np.zeros(truth.shape, np.int32), name="my painting")  # a new, empty layer
    assert ft.train_panel.image_combo.currentText() == "cells"
    assert [ft.train_panel.labels_combo.itemText(i) for i in range(ft.train_panel.labels_combo.count())] == ["my painting"]
    viewer.layers["my painting"].data = truth.astype(np.int32)  # the user paints
    assert ft.train_panel.start_combo.currentData() == "current Segment model"
    ft.train_panel.train_button.click()  # no Add pair: the pair shown is used
    assert ft.train_panel.pairs() == [("cells", "my painting")]
    wait_idle(qtbot, ft)
    result = ft.controller.last_result
    assert result is not None, ft.train_panel.status.text()
    assert ft.controller.last_request.start == "nuclei"  # the first preset
    assert result.path is not None and result.path.is_file() and result.path.parent == model_dir
    assert result.path.name.startswith("nuclei-ft-")


def test_export_a_version_as_onnx_from_the_dock(qtbot, docks, model_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from qtpy.QtWidgets import QFileDialog

    viewer, seg, ft, _start = docks
    save_model(new_model("nuclei", seed=1, provenance={"parent": "start"}), model_dir / "start-ft-older.safetensors")
    ft.versions_panel.refresh_versions()
    ft.versions_panel.versions_list.setCurrentRow(0)
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(tmp_path / "shared"), "ONNX (*.onnx)")))
    assert ft.versions_panel.versions_list.selectedItems()
    ft.versions_panel.export_button.click()
    qtbot.waitUntil(lambda: ft.versions_panel.export_button.isEnabled(), timeout=120_000)
    assert ft.versions_panel.last_export == tmp_path / "shared.onnx", ft.versions_panel.status.text()
    assert (tmp_path / "shared.onnx").is_file() and (tmp_path / "shared.onnx.json").is_file()
    assert "Exported" in ft.versions_panel.status.text()
    import onnxruntime

    onnxruntime.InferenceSession(str(tmp_path / "shared.onnx"), providers=["CPUExecutionProvider"])


def test_the_dock_fits_a_laptop_screen_beside_the_canvas(qtbot, lone_ft):
    """1600 x 1000: common settings shown, the rest folded; the window does not grow past it."""
    viewer, ft = lone_ft
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    qtbot.wait(50)
    assert ft.minimumSizeHint().height() <= 800 and ft.minimumSizeHint().width() <= 420
    assert ft.train_panel.train_button.isVisibleTo(ft) and ft.train_panel.seconds_spin.isVisibleTo(ft)
    folded = [ft.train_panel.advanced_section, ft.live_section, ft.versions_section]
    assert not any(section.isExpanded() for section in folded)  # learning rate etc. under Advanced
    content = ft.train_panel.advanced_section.content()
    assert content.maximumHeight() == 0 and ft.train_panel.lr_spin.parent() is not None
    ft.train_panel.advanced_section.expand(animate=False)
    assert content.maximumHeight() >= ft.train_panel.lr_spin.sizeHint().height() * 4  # four rows unfold
