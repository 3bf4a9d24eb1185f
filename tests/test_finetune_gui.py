"""The Fine-tune dock under a real viewer: train on painted labels, stop, versions, bad input."""

import time

import numpy as np
import pytest

from napari_jointattn.engine.models import load_model, new_model, save_model

pytest.importorskip("napari")

FAST = {"steps_per_epoch": 4, "crop": 64, "batch_size": 4}


@pytest.fixture
def docks(make_napari_viewer, model_dir):
    start = save_model(new_model("nuclei", seed=0), model_dir / "start.safetensors")
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-jointattn", "Segment")
    seg.set_model(str(start))
    _, ft = viewer.window.add_plugin_dock_widget("napari-jointattn", "Fine-tune")
    ft.advanced = dict(FAST)
    return viewer, seg, ft, start


def wait_idle(qtbot, dock, timeout=120_000):
    qtbot.waitUntil(lambda: not dock.controller.running, timeout=timeout)


def test_train_on_painted_labels(qtbot, docks, blobs, model_dir):
    viewer, seg, ft, start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth.astype(np.uint8), name="cells labels")  # the user's painting
    assert ft.pairs() == [("cells", "cells labels")]
    assert "nucleus" in ft.summary_label.text()
    ft.seconds_spin.setValue(60)
    ft.epochs_spin.setValue(6)
    ft.train_button.click()
    assert ft.train_button.text() == "Stop"
    wait_idle(qtbot, ft)
    result = ft.controller.last_result
    assert result is not None, ft.status.text()
    losses = [h["loss"] for h in result.history[1:]]
    assert losses[-1] < losses[0]
    assert result.path.parent == model_dir and result.path.name.startswith("start-ft-")
    model = load_model(result.path)
    assert model.provenance["parent"] == "start"
    assert model.provenance["layers"] == [{"image": "cells", "labels": "cells labels"}]
    assert model.provenance["data"]["annotated_pixels"] == truth.size
    assert seg.model_combo.currentData() == str(result.path)  # the Segment dock switched
    assert ft.versions_list.count() == 1
    assert not [p for p in model_dir.iterdir() if ".part" in p.name]
    # the line plot has a loss and a validation curve
    assert len(ft.axes.lines) == 2
    layer = ft.compare()
    assert layer.name == "cells changes" and layer.data.shape == image.shape


def test_stop_keeps_best_so_far(qtbot, docks, blobs, model_dir):
    viewer, seg, ft, start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth.astype(np.uint8), name="cells labels")
    ft.epochs_spin.setValue(1000)
    ft.seconds_spin.setValue(600)
    ft.train_button.click()
    qtbot.waitUntil(lambda: any(h.get("epoch_end") for h in ft.controller.history), timeout=60_000)
    ft.train_button.click()  # Stop
    wait_idle(qtbot, ft)
    result = ft.controller.last_result
    assert result.stopped == "stopped"
    files = sorted(p.name for p in model_dir.iterdir())
    assert files == sorted(["start.safetensors", result.path.name])
    assert load_model(result.path).scores["val_dice"] == pytest.approx(result.best_dice, abs=1e-6)


def test_unannotated_slices_are_ignored(qtbot, docks, blobs):
    viewer, seg, ft, start = docks
    image, truth = blobs
    viewer.add_image(np.stack([image] * 4), name="stack")
    lab = np.zeros((4, *truth.shape), np.uint8)
    lab[1] = truth > 0
    viewer.add_labels(lab, name="stack labels")
    summary = ft.refresh_summary()
    fg = int((truth > 0).sum())
    # slices 0, 2, 3 are unannotated: counting them as background would add 3 x 11520 pixels
    assert summary["planes"] == 1
    assert summary["pixels_per_class"] == {"background": truth.size - fg, "nucleus": fg}


def test_gui_responsive_and_painting_while_training(qtbot, docks, blobs):
    from qtpy.QtCore import QTimer

    viewer, seg, ft, start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    labels = viewer.add_labels(truth.astype(np.uint8), name="cells labels")
    ft.epochs_spin.setValue(3)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    ft.train_button.click()
    labels.data_setitem((np.array([5]), np.array([5])), 3)  # the user keeps painting
    wait_idle(qtbot, ft)
    timer.stop()
    assert labels.data[5, 5] == 3
    assert np.diff(ticks).max() < 1.0
    assert ft.controller.last_result is not None


@pytest.mark.parametrize("case", ["no-labels", "other-shape", "single-class"])
def test_bad_input_notifies_and_keeps_layers(qtbot, docks, blobs, case):
    viewer, seg, ft, start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    lab = {"no-labels": np.zeros(truth.shape, np.uint8),
           "other-shape": np.ones((10, 10), np.uint8),
           "single-class": np.zeros(truth.shape, np.uint8)}[case]
    if case == "single-class":
        lab[:] = 0
    viewer.add_labels(lab, name="cells labels")
    if case == "other-shape":
        assert "shape" in ft.summary_label.text()
    before = [(l.name, np.asarray(l.data).copy()) for l in viewer.layers]
    ft.train_button.click()
    wait_idle(qtbot, ft)
    assert ft.controller.last_result is None
    assert ft.status.text()  # a clear message
    for name, data in before:
        np.testing.assert_array_equal(viewer.layers[name].data, data)


def test_image_removed_during_training(qtbot, docks, blobs):
    viewer, seg, ft, start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth.astype(np.uint8), name="cells labels")
    ft.epochs_spin.setValue(2)
    ft.train_button.click()
    viewer.layers.remove("cells")
    wait_idle(qtbot, ft)
    assert ft.controller.last_result is not None  # trained on the snapshot
    assert "cells labels" in viewer.layers


def test_rollback_to_an_earlier_version(qtbot, docks, blobs, model_dir):
    viewer, seg, ft, start = docks
    older = save_model(new_model("nuclei", seed=1, provenance={"parent": "start"}),
                       model_dir / "start-ft-older.safetensors")
    ft.refresh_versions()
    ft.versions_list.setCurrentRow(0)
    ft.use_selected()
    assert seg.model_combo.currentData() == str(older)
    out = ft.controller.export(older, str(model_dir.parent / "exported"))
    assert load_model(out).provenance["parent"] == "start"


def test_no_improvement_is_shown_and_not_listed_as_a_version(qtbot, docks, blobs, model_dir):
    from napari_jointattn.widgets import finetune

    viewer, seg, ft, start = docks
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth.astype(np.uint8), name="cells labels")
    ft.advanced = {**FAST, "lr": 1e-30, "head": "keep"}  # no weight can change: never beaten
    ft.epochs_spin.setValue(1)
    warned = []
    original = finetune.FinetuneDock._done

    def spy(self, request, result):
        import napari.utils.notifications as notes

        shown = notes.show_warning
        notes.show_warning = warned.append
        try:
            original(self, request, result)
        finally:
            notes.show_warning = shown

    finetune.FinetuneDock._done = spy
    try:
        ft.train_button.click()
        wait_idle(qtbot, ft)
    finally:
        finetune.FinetuneDock._done = original
    result = ft.controller.last_result
    assert result is not None and not result.improved and result.path is None
    assert "No improvement over the start model" in ft.status.text()
    assert any("no improvement" in w for w in warned)
    assert sorted(p.name for p in model_dir.iterdir()) == ["start.safetensors"]  # nothing saved
    assert ft.versions_list.count() == 0
    assert seg.model_combo.currentData() == str(start)  # the Segment dock keeps its model
    assert not ft.compare_button.isEnabled()


def test_fine_tune_dock_alone_trains_with_its_defaults(make_napari_viewer, qtbot, blobs, model_dir):
    """No Segment dock: the start model falls back to the first preset; pairing by Add pair."""
    viewer = make_napari_viewer()
    _, ft = viewer.window.add_plugin_dock_widget("napari-jointattn", "Fine-tune")
    ft.advanced = dict(FAST)
    ft.epochs_spin.setValue(1)
    image, truth = blobs
    viewer.add_image(image, name="cells")
    viewer.add_labels(np.zeros(truth.shape, np.int32), name="my painting")  # not named "<image> labels"
    assert ft.pairs() == []
    ft.train_button.click()
    assert "Add pair" in ft.status.text() or "Add pair" in ft.summary_label.text()
    viewer.layers["my painting"].data = truth.astype(np.int32)
    ft.image_combo.setCurrentText("cells")
    ft.labels_combo.setCurrentText("my painting")
    ft.add_pair_button.click()
    assert ft.pairs() == [("cells", "my painting")]
    ft.train_button.click()
    wait_idle(qtbot, ft)
    result = ft.controller.last_result
    assert result is not None, ft.status.text()
    assert ft.controller.last_request.start == "nuclei"  # the first preset
    assert result.improved and result.path.is_file() and result.path.parent == model_dir
    assert result.path.name.startswith("nuclei-ft-")
