"""Live mode ("Learn while I paint"): the controller on a ViewerModel, and the dock in a real viewer."""

import time

import numpy as np
import pytest

from napari_jointattn.engine.errors import BadInputError
from napari_jointattn.engine.models import load_model, new_model, save_model
from napari_jointattn.model.denseunet import DenseUNetConfig

napari = pytest.importorskip("napari")

TINY = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                       head_channels=4, attention_dim=8, attention_levels=(1,), dropout=0.0)
FAST = {"batch_size": 2, "crop": 32, "lr": 1e-2, "seed": 1}


def _disks(h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    truth = np.zeros((h, w), np.int32)
    for _ in range(5):
        cy, cx = rng.integers(8, h - 8), rng.integers(8, w - 8)
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 1
    image = (truth * 0.8 + rng.normal(0, 0.1, (h, w))).astype(np.float32)
    return image, truth


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
    from napari_jointattn.engine.versions import list_versions

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
    # slice 3 was painted on: it counts as a whole; slice 1 was not touched since the start
    assert snap.mask[3].all() and not snap.mask[[0, 1, 2, 4]].any()
    assert snap.weights[3, 20, 20] == 5.0 and snap.weights[3, 0, 0] == 1.0
    assert snap.labels[3, 20, 20] == 1
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
    ctl.trainer = None
    ctl.prepare()
    ctl._hand_over()
    ctl.trainer.scores = lambda: {"start": 0.9, "live": 0.8, "improved": False}  # as if nothing was learnt
    outcome = ctl.finish()
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
