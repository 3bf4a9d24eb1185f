"""Live mode ("Learn while I paint"): the controller on a ViewerModel, and the dock in a real viewer."""

import time

import numpy as np
import pytest
from _helpers import disks

from napari_jointattn.engine.errors import BadInputError
from napari_jointattn.engine.models.model import load_model, new_model, save_model
from napari_jointattn.model.denseunet import DenseUNetConfig

napari = pytest.importorskip("napari")

TINY = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                       head_channels=4, attention_dim=8, attention_levels=(1,), dropout=0.0)
FAST = {"batch_size": 2, "crop": 32, "lr": 1e-2, "seed": 1}


def _disks(h=64, w=64, seed=0):
    return disks(h, w, seed)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread: the live loop's worker shares the 2 cores with the GUI thread (and, on a
    busy machine, with other processes, where 2 threads each slow every step down many times)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_file(model_dir):
    model = new_model(config=TINY, classes=["background", "object"], name="tiny", seed=0)
    return str(save_model(model, model_dir / "tiny.safetensors"))


@pytest.fixture
def viewer():
    from napari.components import ViewerModel

    return ViewerModel()


def _live(viewer, tiny_file, **kw):
    from napari_jointattn.controllers.live import LiveController

    ctl = LiveController(viewer, refresh=kw.pop("refresh", 0.0), burst=kw.pop("burst", 0.2))
    ctl.session.set_model(tiny_file)
    return ctl


def _paint_truth(layer, truth, rows):
    """Paint the true labels on some rows, as strokes of the layer's own API (data_setitem)."""
    for r in rows:
        cols = np.arange(truth.shape[-1])
        idx = (np.full(cols.shape, r), cols) if truth.ndim == 2 else None
        layer.data_setitem(idx, truth[r])


def test_live_controller_learns_from_painted_pixels_and_saves_a_version(viewer, tiny_file, model_dir):
    from napari_jointattn.controllers.live import PAINTED, LivePrediction

    image, truth = _disks()
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(np.zeros(truth.shape, np.int32), name="cells labels")
    ctl = _live(viewer, tiny_file)
    ctl.start("cells", "cells labels", annotated=PAINTED, **FAST)
    layer.events.paint.connect(lambda e: ctl.record_paint(e.value))
    assert ctl.snapshot() is None  # nothing painted since the start
    _paint_truth(layer, truth, range(0, 33, 3))  # the top half
    # foreground rows paint objects; background pixels painted 0 over 0 emit nothing in napari:
    painted_by_events = ctl.painted.copy()
    assert painted_by_events.sum() == (truth[0:33:3] > 0).sum()
    # ... so an erase stroke records its own footprint: a row across the image marks background
    added = ctl.record_erase([(1, 0), (1, 63)], brush_size=3)
    assert added > 0 and ctl.painted[0:3, :].all() and not ctl.painted[4].any()
    for r in range(0, 33, 3):
        ctl.record_erase([(r, 0), (r, 63)], brush_size=1)
    assert ctl.painted[0:33:3].all() and not ctl.painted[4].any() and not ctl.painted[34:].any()
    snap = ctl.submit()
    assert snap.weights is None and snap.mask.sum() == ctl.painted.sum()
    layer.data[:] = 0  # the snapshot is a copy: later edits do not reach the trainer
    assert snap.labels[0:33:3].sum() == truth[0:33:3].sum()
    reports = []
    loop = ctl.run()
    first = next(loop)
    assert isinstance(first["prediction"], LivePrediction)  # the start model's view comes first
    assert first["prediction"].classes.shape == truth.shape
    assert 0 <= first["prediction"].uncertainty.min() and first["prediction"].uncertainty.max() <= 1
    for report in loop:
        reports.append(report)
        if report["total_steps"] >= 40:
            ctl.request_next()
        if "next" in report:
            break
    target = reports[-1]["next"]
    # the most uncertain window that is not annotated: in the unpainted bottom half
    assert target.z is None and 33 <= target.y < 64 and 0 <= target.x < 64
    assert reports[-1]["snapshots"] == 1 and reports[-1]["waiting"] is None
    ctl.stop()
    with pytest.raises(StopIteration) as end:
        next(loop)
    outcome = end.value.value
    assert outcome.scores["improved"] and outcome.path is not None, outcome
    assert outcome.path.parent == model_dir and outcome.path.name.startswith("tiny-ft-")
    assert ctl.finished(outcome) is None
    assert ctl.session.current_model() == str(outcome.path)
    saved = load_model(outcome.path)
    assert saved.provenance["parent"] == "tiny" and saved.provenance["training"]["mode"] == "live"
    assert saved.provenance["layers"] == [{"image": "cells", "labels": "cells labels"}]
    from napari_jointattn.engine.models.versions import list_versions

    assert [p for p, _ in list_versions()] == [outcome.path]


def test_whole_slices_mode_counts_painted_slices_and_weights_the_strokes(viewer, tiny_file):
    from napari_jointattn.controllers.live import WHOLE_SLICES

    image, truth = _disks()
    stack = np.stack([image] * 5)
    viewer.add_image(stack, name="stack")
    labels = np.zeros(stack.shape, np.int32)
    labels[1] = truth  # labels that were there before live mode started
    layer = viewer.add_labels(labels, name="stack labels")
    ctl = _live(viewer, tiny_file)
    ctl.start("stack", "stack labels", annotated=WHOLE_SLICES, **FAST)
    layer.events.paint.connect(lambda e: ctl.record_paint(e.value))
    layer.brush_size = 5
    layer.paint((3, 20, 20), 1)
    snap = ctl.snapshot()
    assert snap.planes == (3,) and snap.labels.shape == (1, 64, 64)  # only the slice painted on
    labels_, mask, weights = snap.full()
    # slice 3 was painted on: it counts as a whole; slice 1 was not touched since the start
    assert mask[3].all() and not mask[[0, 1, 2, 4]].any()
    assert weights[3, 20, 20] == 5.0 and weights[3, 0, 0] == 1.0
    assert labels_[3, 20, 20] == 1 and not labels_[1].any()
    assert labels is layer.data and layer.data[3, 20, 20] == 1  # the user's layer, untouched by us
    ctl.submit()
    ctl.view_slice = 3
    loop = ctl.run()
    report = next(loop)
    assert report["prediction"].z == 3
    ctl.request_next()
    report = next(loop)
    target = report["next"]
    # Next goes to an unannotated window: slice 3 in view is annotated as a whole, so a sampled other one
    assert target.z in (0, 1, 2, 4)
    again = ctl.next_target()
    assert (again.z, again.y, again.x) != (target.z, target.y, target.x)  # Next does not repeat itself
    ctl.stop()
    for _ in loop:
        pass


def test_no_improvement_saves_nothing_and_warns(viewer, tiny_file, model_dir):
    image, truth = _disks()
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(np.zeros(truth.shape, np.int32), name="cells labels")
    ctl = _live(viewer, tiny_file)
    ctl.start("cells", "cells labels", **FAST)
    layer.events.paint.connect(lambda e: ctl.record_paint(e.value))
    layer.brush_size = 3
    layer.paint((10, 10), 1)
    ctl.record_erase([(40, 40)], brush_size=3)
    ctl.submit()
    loop = ctl.run()
    assert next(loop)["snapshots"] == 1  # the strokes were handed over and trained on
    ctl.trainer.scores = lambda: {"start": 0.9, "live": 0.8, "improved": False}  # as if nothing was learnt
    ctl.stop()
    with pytest.raises(StopIteration) as end:
        next(loop)
    outcome = end.value.value
    assert outcome.path is None and "no improvement over the start model" in ctl.finished(outcome)
    assert sorted(p.name for p in model_dir.iterdir()) == ["tiny.safetensors"]
    assert ctl.session.current_model() == tiny_file


def test_bad_states_are_clear_errors(viewer, tiny_file):
    from napari_jointattn.controllers.live import LiveController

    image, truth = _disks()
    viewer.add_image(image, name="cells")
    viewer.add_labels(np.zeros((10, 10), np.int32), name="small")
    ctl = _live(viewer, tiny_file)
    with pytest.raises(BadInputError, match="Add pair"):
        ctl.start(None, None)
    with pytest.raises(BadInputError, match="must match"):
        ctl.start("cells", "small")
    with pytest.raises(BadInputError, match="no longer exists"):
        ctl.start("cells", "gone")
    with pytest.raises(BadInputError, match="annotated"):
        ctl.start("cells", "small", annotated="everything")
    # a three-class model and labels with a value it does not have: the trainer waits and says why
    three = save_model(new_model(config=__import__("dataclasses").replace(TINY, num_classes=3), classes=["bg", "a", "b"], name="three", seed=0),
                       __import__("pathlib").Path(tiny_file).with_name("three.safetensors"))
    layer = viewer.add_labels(np.zeros(truth.shape, np.int32), name="cells labels")
    ctl = LiveController(viewer, refresh=0.0, burst=0.1)
    ctl.start("cells", "cells labels", start=str(three), **FAST)
    layer.events.paint.connect(lambda e: ctl.record_paint(e.value))
    layer.paint((10, 10), 7)
    ctl.submit()
    report = next(ctl.run())
    assert report["steps"] == 0 and "not a class" in report["waiting"]
    ctl.stop()


# ---- the dock in a real viewer ------------------------------------------------------------------
class GapMeter:
    """The worst gap between the ticks of a 10 ms Qt timer: how long the event loop was blocked."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.ticks = [time.perf_counter()]
        self.timer = QTimer()
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))
        self.timer.start(10)

    def worst(self) -> float:
        self.timer.stop()
        return float(np.diff(self.ticks).max())


def _erase_drag(layer, points):
    """An erase stroke with the mouse, through napari's own mouse-callback machinery."""
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import (
        mouse_move_callbacks,
        mouse_press_callbacks,
        mouse_release_callbacks,
    )

    layer.mode = "erase"
    kinds = ["mouse_press"] + ["mouse_move"] * (len(points) - 2) + ["mouse_release"]
    calls = {"mouse_press": mouse_press_callbacks, "mouse_move": mouse_move_callbacks,
             "mouse_release": mouse_release_callbacks}
    for kind, p in zip(kinds, points):
        event = read_only_mouse_event(type=kind, is_dragging=kind == "mouse_move", position=p,
                                      dims_displayed=[0, 1], view_direction=None)
        calls[kind](layer, event)
    layer.mode = "paint"


@pytest.fixture
def live_dock(make_napari_viewer, tiny_file):
    from _gui_helpers import wait_workers

    viewer = make_napari_viewer()
    _, ft = viewer.window.add_plugin_dock_widget("napari-jointattn", "Fine-tune")
    ft.controller.session.set_model(tiny_file)
    ft.live_panel.settings = dict(FAST)
    ft.live.refresh, ft.live.burst = 0.3, 0.3
    yield viewer, ft
    ft.live.stop()
    wait_workers()


def test_learn_while_i_paint_in_the_dock(qtbot, live_dock, model_dir):
    viewer, ft = live_dock
    image, truth = _disks(96, 96)
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(np.zeros(truth.shape, np.int32), name="cells labels")
    user_labels = layer.data
    meter = GapMeter()
    ft.live_panel.live_button.click()
    assert ft.live_panel.live_button.text() == "Stop live" and ft.live_panel.next_button.isEnabled()
    assert not ft.train_panel.train_button.isEnabled()  # one training at a time
    # the pair being learnt from cannot be swapped under the loop
    assert not ft.train_panel.image_combo.isEnabled() and not ft.train_panel.labels_combo.isEnabled()
    # the start model's view comes first, in its own layers (never the user's labels)
    qtbot.waitUntil(lambda: "cells live prediction" in viewer.layers and "cells uncertainty" in viewer.layers,
                    timeout=20_000)
    pred = viewer.layers["cells live prediction"]
    assert viewer.layers["cells uncertainty"].colormap.name == "magma"
    # strokes: the objects of the top half with the layer's API, background by erasing with the mouse
    for r in range(2, 48, 3):  # erase first (erasing removes labels), then paint the objects
        _erase_drag(layer, [(r, 0), (r, 95), (r, 95)])
    assert ft.live.painted[2:48:3].all() and not layer.data.any()  # erasing over 0 counted all the same
    for r in range(2, 48, 3):
        layer.data_setitem((np.full(96, r), np.arange(96)), truth[r])
    assert ft.live.painted[2:48:3].all()
    qtbot.waitUntil(lambda: ft.live.trainer is not None and ft.live.trainer.snapshots >= 1, timeout=20_000)
    before = pred.data.copy()
    qtbot.waitUntil(lambda: not np.array_equal(pred.data, before), timeout=20_000)  # it learns and shows it
    assert "steps" in ft.live_panel.status.text() and "snapshot" in ft.live_panel.status.text()
    # a correction stroke: the live prediction comes to agree with it
    stroke = np.zeros(truth.shape, bool)
    stroke[72:81, 50:67] = truth[72:81, 50:67] > 0  # an object in the unpainted bottom half
    layer.data_setitem(np.nonzero(stroke), 1)
    qtbot.waitUntil(lambda: np.mean(pred.data[stroke] > 0) >= 0.8, timeout=30_000)
    # Next moves the view to an unannotated region
    centre = tuple(viewer.camera.center)
    ft.live_panel.next_button.click()
    qtbot.waitUntil(lambda: tuple(viewer.camera.center) != centre, timeout=20_000)
    assert viewer.camera.center[-2] > 48  # below the painted rows: not annotated yet
    assert "Next:" in ft.live_panel.status.text()
    qtbot.waitUntil(lambda: ft.live.trainer.steps >= 60, timeout=30_000)
    ft.live_panel.live_button.click()  # Stop
    qtbot.waitUntil(lambda: ft.live_panel.worker is None, timeout=30_000)
    worst = meter.worst()
    assert worst < 1.0, f"the event loop was blocked for {worst:.2f} s"
    assert layer.data is user_labels and (layer.data[stroke] == 1).all()
    assert not layer.data[~stroke][48 * 96:].any()  # nothing written into the user's labels
    assert ft.live_panel.live_button.text() == "Start live" and ft.train_panel.train_button.isEnabled()
    assert ft.train_panel.image_combo.isEnabled()
    versions = [p for p in model_dir.iterdir() if "-ft-" in p.name]
    if versions:  # improved: a version, the session's current model
        assert ft.controller.session.current_model() == str(versions[0])
        assert "Saved" in ft.live_panel.status.text() and ft.versions_panel.versions_list.count() == 1
    else:
        assert "no improvement over the start model" in ft.live_panel.status.text()
    assert versions, ft.live_panel.status.text()  # these strokes teach the tiny model: it improves


def test_live_mode_stops_when_its_layers_go_and_refuses_bad_pairs(qtbot, live_dock):
    viewer, ft = live_dock
    ft.live_panel.live_button.click()
    assert "Add pair" in ft.live_panel.status.text() and not ft.live.active  # no pair
    image, truth = _disks(64, 64)
    viewer.add_image(image, name="cells")
    other = viewer.add_labels(np.zeros(truth.shape, np.int32), name="other")
    ft.train_panel.image_combo.setCurrentText("cells")
    ft.train_panel.labels_combo.setCurrentText("other")
    ft.train_panel.add_pair_button.click()
    assert ft.train_panel.pairs() == [("cells", "other")]
    other.data = np.zeros((32, 32), np.int32)  # the paired labels are replaced by another size
    ft.live_panel.live_button.click()
    assert "must match" in ft.live_panel.status.text() and not ft.live.active
    ft.train_panel.pairs_list.clear()
    viewer.add_labels(np.zeros(truth.shape, np.int32), name="cells labels")
    ft.live_panel.live_button.click()
    assert ft.live.active
    qtbot.waitUntil(lambda: "cells live prediction" in viewer.layers, timeout=20_000)
    viewer.layers.remove("cells labels")
    qtbot.waitUntil(lambda: ft.live_panel.worker is None, timeout=20_000)
    assert not ft.live.active and ft.live_panel.live_button.text() == "Start live"
    assert "nothing was saved" in ft.live_panel.status.text()  # nothing was painted


def test_live_mode_leaves_the_shared_worker_threads_free(qtbot, live_dock):
    """The live loop runs on a thread of its own: with a single thread in napari's global pool
    (the core count of a small laptop, minus the GUI thread), other work still runs meanwhile."""
    from qtpy.QtCore import QThreadPool

    from napari_jointattn.widgets import _workers

    viewer, ft = live_dock
    image, truth = _disks(64, 64)
    viewer.add_image(image, name="cells")
    viewer.add_labels(np.zeros(truth.shape, np.int32), name="cells labels")
    shared = QThreadPool.globalInstance()
    before = shared.maxThreadCount()
    shared.setMaxThreadCount(1)
    try:
        ft.live_panel.live_button.click()
        qtbot.waitUntil(lambda: "cells live prediction" in viewer.layers, timeout=20_000)
        assert ft.live.active and ft.live_panel.worker is not None
        answers = []
        _workers.start(lambda: 42, answers.append, answers.append, lambda: None, owner=ft)
        qtbot.waitUntil(lambda: answers == [42], timeout=5_000)
        assert ft.live.active  # the loop was running all along
    finally:
        ft.live_panel.live_button.click()
        qtbot.waitUntil(lambda: ft.live_panel.worker is None, timeout=30_000)
        shared.setMaxThreadCount(before)


def test_closing_the_viewer_ends_the_live_loop(qtbot, make_napari_viewer, tiny_file):
    from napari_jointattn.widgets import _workers

    viewer = make_napari_viewer()
    _, ft = viewer.window.add_plugin_dock_widget("napari-jointattn", "Fine-tune")
    ft.controller.session.set_model(tiny_file)
    ft.live_panel.settings = dict(FAST)
    image, truth = _disks(64, 64)
    viewer.add_image(image, name="cells")
    viewer.add_labels(np.zeros(truth.shape, np.int32), name="cells labels")
    ft.live_panel.live_button.click()
    qtbot.waitUntil(lambda: "cells live prediction" in viewer.layers, timeout=20_000)
    stop_event = ft.live.stop_event
    assert _workers.running() == 1
    viewer.close()
    qtbot.waitUntil(lambda: _workers.running() == 0, timeout=20_000)
    assert stop_event.is_set()


@pytest.mark.benchmark
def test_live_latency_benchmark_runs(tmp_path):
    """Smoke run of benchmarks/live_latency.py (real viewer, real 512² image), so it cannot rot."""
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("stardist") is None:
        pytest.skip("the stardist package (its sample image) is not installed")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "live_latency.py"
    out = tmp_path / "live.json"
    subprocess.run([sys.executable, str(script), "--threads", "1", "--timeout", "60", "--json", str(out)],
                   check=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["stroke_pixels"] > 0 and r["ring_pixels"] > 0
    assert r["stroke_to_reflected_s"] is not None and r["worst_gap_s"] < 5


def test_next_moves_to_another_slice_of_a_stack(qtbot, live_dock):
    viewer, ft = live_dock
    image, truth = _disks(64, 64)
    stack = np.stack([image] * 4)
    viewer.add_image(stack, name="stack")
    layer = viewer.add_labels(np.zeros(stack.shape, np.int32), name="stack labels")
    viewer.dims.set_point(0, 1)
    ft.live_panel.annotated_combo.setCurrentText("whole slices I painted on")
    ft.live_panel.live_button.click()
    assert ft.live.active and ft.live.view_slice == 1
    qtbot.waitUntil(lambda: "stack live prediction" in viewer.layers, timeout=20_000)
    assert viewer.layers["stack live prediction"].data.shape == stack.shape
    layer.brush_size = 7
    layer.paint((1, 20, 20), 1)  # slice 1 (in view) is now annotated as a whole
    qtbot.waitUntil(lambda: ft.live.submitted >= 1, timeout=5_000)
    ft.live_panel.next_button.click()
    qtbot.waitUntil(lambda: viewer.dims.current_step[0] != 1, timeout=20_000)
    assert ft.live.view_slice == viewer.dims.current_step[0]  # the loop follows the view
    qtbot.waitUntil(lambda: viewer.layers["stack live prediction"].data[viewer.dims.current_step[0]].any()
                    or viewer.layers["stack uncertainty"].data[viewer.dims.current_step[0]].any(), timeout=20_000)
    ft.live_panel.live_button.click()
    qtbot.waitUntil(lambda: ft.live_panel.worker is None, timeout=30_000)


def test_next_ranks_by_branch_disagreement_or_entropy(viewer, tiny_file, model_dir):
    import torch

    from napari_jointattn.controllers.live import DISAGREEMENT, ENTROPY
    from napari_jointattn.engine.training.uncertainty import entropy, rank_regions

    image, _ = _disks(96, 96)
    viewer.add_image(image, name="cells")
    viewer.add_labels(np.zeros(image.shape, np.int32), name="cells labels")
    ctl = _live(viewer, tiny_file)
    with pytest.raises(BadInputError, match="Next ranks"):
        ctl.start("cells", "cells labels", guide="coin toss", **FAST)
    for guide in (DISAGREEMENT, ENTROPY):
        ctl.start("cells", "cells labels", guide=guide, **FAST)
        ctl.prepare()
        with torch.no_grad():
            for _, module in ctl.trainer.net.attention_keys():
                module.gamma.fill_(3.0)  # branches that make a difference
        target = ctl.next_target()
        assert target.guide == guide
        want = ctl.trainer.disagreement(image) if guide == DISAGREEMENT else entropy(ctl.trainer.probabilities(image))
        best = rank_regions(want, window=ctl.window(), count=1)[0]
        assert (target.y, target.x) == best.centre[1:] and target.score == pytest.approx(best.score, rel=1e-5)
        ctl.stop()
        ctl.reset()
    # a model without joint modules has no two branches: Next falls back to the entropy
    plain = new_model(config=DenseUNetConfig(**{**TINY.to_dict(), "attention": "pointwise"}),
                      classes=["background", "object"], name="plain", seed=0)
    ctl = _live(viewer, str(save_model(plain, model_dir / "plain.safetensors")))
    ctl.start("cells", "cells labels", guide=DISAGREEMENT, **FAST)
    ctl.prepare()
    assert ctl.next_target().guide == ENTROPY
