"""The live loop's engine: LiveTrainer and the uncertainty ranking."""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np
import pytest
import torch
from _helpers import disks

from napari_jointattn.engine.errors import BadInputError
from napari_jointattn.engine.models.model import new_model
from napari_jointattn.engine.training.live import LiveTrainer
from napari_jointattn.engine.training.uncertainty import entropy, rank_regions
from napari_jointattn.model.denseunet import DenseUNetConfig

TINY = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                       head_channels=4, attention_dim=8, attention_levels=(1,), dropout=0.0)


def _tiny(seed=0):
    return new_model(config=TINY, classes=["background", "object"], name="tiny", seed=seed)


def _disks(h=64, w=64, seed=0):
    return disks(h, w, seed)


def test_live_trainer_learns_from_strokes_and_leaves_the_start_model_alone():
    image, truth = _disks()
    start = _tiny()
    before = {k: v.clone() for k, v in start.net.state_dict().items()}
    live = LiveTrainer(start, batch_size=2, crop=32, lr=1e-2, seed=1)
    # nothing to learn from yet: the burst says why and takes no step
    idle = live.train(steps=3)
    assert idle["steps"] == 0 and idle["waiting"]
    mask = np.zeros(truth.shape, bool)
    mask[::3, ::3] = True  # sparse strokes: a third of the rows and columns
    live.submit([image], [truth], masks=[mask])
    out = live.train(steps=40)
    assert out["steps"] == 40 and out["total_steps"] == 40 and np.isfinite(out["loss"])
    s = live.scores()
    assert s["live"] > s["start"] and s["improved"]
    assert s["live"] > 0.6
    # the start model given was copied, never trained in place
    for k, v in start.net.state_dict().items():
        assert torch.equal(v, before[k])
    result = live.result(name="mine")
    assert result.name == "mine" and result.provenance["training"]["mode"] == "live"
    assert result.provenance["training"]["steps"] == 40
    seg = live.predict(image)
    probs = live.probabilities(image)
    assert probs.shape == (2, 64, 64)
    # segmenting and the probabilities use the live weights alike (the tiny model makes no instances)
    assert np.mean((seg.labels > 0) == (probs.argmax(0) == 1)) > 0.99
    assert np.mean((seg.labels > 0) == (truth > 0)) > 0.8


def test_only_background_painted_waits_instead_of_failing():
    image, truth = _disks()
    live = LiveTrainer(_tiny(), batch_size=2, crop=32)
    live.submit([image], [np.zeros_like(truth)], masks=[np.ones(truth.shape, bool)])
    out = live.train(steps=2)
    assert out["steps"] == 0 and "foreground" in out["waiting"]


def test_a_new_snapshot_is_used_from_the_next_burst_and_submit_is_thread_safe():
    image, truth = _disks()
    live = LiveTrainer(_tiny(), batch_size=2, crop=32)
    mask = np.zeros(truth.shape, bool)
    mask[:32] = True
    live.submit([image], [truth], masks=[mask])
    live.train(steps=1)
    assert live.snapshots == 1 and live.summary["annotated_pixels"] == mask.sum()
    threads = [threading.Thread(target=live.submit, args=([image], [truth]), kwargs={"masks": [np.ones_like(mask)]})
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live.train(steps=1)
    assert live.snapshots == 2 and live.summary["annotated_pixels"] == truth.size


def test_live_settings_are_checked():
    with pytest.raises(TypeError, match="unknown training setting"):
        LiveTrainer(_tiny(), batchsize=3)
    with pytest.raises(BadInputError):
        LiveTrainer(_tiny(), lr=-1)
    with pytest.raises(BadInputError, match="burst"):
        LiveTrainer(_tiny()).train()


def test_entropy_is_zero_when_sure_and_one_when_undecided():
    p = np.zeros((3, 2, 2), np.float32)
    p[0, 0, 0] = 1
    p[:, 0, 1] = 1 / 3
    p[:2, 1, :] = 0.5
    u = entropy(p)
    assert u[0, 0] == pytest.approx(0, abs=1e-4)
    assert u[0, 1] == pytest.approx(1, abs=1e-4)
    assert 0.5 < u[1, 0] < 0.7  # two of three classes equal: log 2 / log 3
    with pytest.raises(BadInputError):
        entropy(np.ones((1, 4, 4)))


def test_rank_regions_finds_the_unsure_patch_skips_annotated_ones_and_does_not_overlap():
    u = np.zeros((2, 100, 120), np.float32)
    u[1, 10:30, 70:90] = 1.0  # the most uncertain patch
    u[0, 60:80, 20:40] = 0.8  # the second
    ann = np.zeros(u.shape, bool)
    first = rank_regions(u, ann, window=20, count=3)
    assert (first[0].z, first[0].y0, first[0].x0) == (1, 10, 70) and first[0].score == pytest.approx(1.0)
    assert (first[1].z, first[1].y0, first[1].x0) == (0, 60, 20)
    for a in first:
        for b in first:
            if a is not b and a.z == b.z:
                assert a.y1 <= b.y0 or b.y1 <= a.y0 or a.x1 <= b.x0 or b.x1 <= a.x0
    ann[1, 10:30, 70:90] = True  # annotated now: the next best comes first
    again = rank_regions(u, ann, window=20, count=1)
    assert (again[0].z, again[0].y0, again[0].x0) == (0, 60, 20)
    assert again[0].centre == (0, 70, 30)
    small = rank_regions(np.ones((8, 8)), window=64, count=2)
    assert len(small) == 1 and (small[0].y1, small[0].x1) == (8, 8)
    with pytest.raises(BadInputError):
        rank_regions(u, ann[0], window=20)


def test_branch_disagreement_is_zero_where_branches_agree_and_needs_a_joint_model():
    from napari_jointattn.engine.training.uncertainty import disagreement

    a = np.array([[[1.0, 0.5]], [[0.0, 0.5]]])
    b = np.array([[[0.0, 0.5]], [[1.0, 0.5]]])
    assert np.allclose(disagreement(a, b), [[1.0, 0.0]])
    assert np.allclose(disagreement(a, a), 0)
    with pytest.raises(BadInputError, match="shape"):
        disagreement(a, b[:, :, :1])

    image, _ = _disks()
    live = LiveTrainer(_tiny(), seed=0)
    with torch.no_grad():
        for _, module in live.net.attention_keys():
            module.gamma.fill_(3.0)  # modules that change the prediction
    d = live.disagreement(image)
    assert d.shape == image.shape and d.min() >= 0 and d.max() <= 1 and d.max() > 1e-3
    # each branch alone is a real, different prediction; both together is a third
    pw, sa = live.probabilities(image, branch="pointwise"), live.probabilities(image, branch="self")
    assert np.allclose(d, 0.5 * np.abs(pw - sa).sum(0), atol=1e-6)
    assert np.allclose(pw.sum(0), 1, atol=1e-5) and not np.allclose(pw, live.probabilities(image))
    plain = new_model(config=DenseUNetConfig(**{**TINY.to_dict(), "attention": "pointwise"}),
                      classes=["background", "object"], seed=0)
    with pytest.raises(BadInputError, match="no joint"):
        LiveTrainer(plain, seed=0).disagreement(image)


# ---- the live controller's GUI-thread side, on a ViewerModel (no window) --------------------------
class Watched(np.ndarray):
    """A painted mask that notes the size of every array a reduction or copy reads from it."""

    reads: ClassVar[list[int]] = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        Watched.reads += [a.size for a in inputs if isinstance(a, Watched)]
        inputs = tuple(np.asarray(a) for a in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(o) for o in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        Watched.reads += [a.size for a in args if isinstance(a, Watched)]
        return super().__array_function__(func, types, args, kwargs)

    def copy(self, *args, **kwargs):
        Watched.reads.append(self.size)
        return super().copy(*args, **kwargs)


def _controller(shape, **start):
    from napari.components import ViewerModel

    from napari_jointattn.controllers.live import LiveController

    viewer = ViewerModel()
    viewer.add_image(np.zeros(shape, np.float32), name="img")
    layer = viewer.add_labels(np.zeros(shape, np.int32), name="img labels")
    ctl = LiveController(viewer)
    ctl.start("img", "img labels", **start)
    layer.events.paint.connect(lambda e: ctl.record_paint(e.value))
    return viewer, layer, ctl


def _drag(layer, points, mode="erase", displayed=(0, 1)):
    """A mouse drag over ``points`` through napari's mouse-callback machinery."""
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import (
        mouse_move_callbacks,
        mouse_press_callbacks,
        mouse_release_callbacks,
    )

    layer.mode = mode
    kinds = ["mouse_press"] + ["mouse_move"] * (len(points) - 2) + ["mouse_release"]
    calls = {"mouse_press": mouse_press_callbacks, "mouse_move": mouse_move_callbacks,
             "mouse_release": mouse_release_callbacks}
    for kind, p in zip(kinds, points):
        event = read_only_mouse_event(type=kind, is_dragging=kind == "mouse_move", position=p,
                                      dims_displayed=list(displayed), view_direction=None)
        calls[kind](layer, event)
    layer.mode = "pan_zoom"


def test_erase_drags_are_recorded_by_the_controllers_callback():
    _, layer, ctl = _controller((32, 48))
    recorded = []
    layer.mouse_drag_callbacks.append(ctl.erase_capture(lambda: recorded.append(1)))
    layer.brush_size = 3
    _drag(layer, [(5, 2), (5, 20), (5, 40), (5, 40)])
    # erasing over pixels that were 0 changes nothing napari reports, yet it marks background
    assert recorded == [1] and ctl.painted[4:7, 1:42].all() and not ctl.painted[8:].any()
    layer.selected_label = 2
    _drag(layer, [(20, 2), (20, 20), (20, 20)], mode="paint")  # painting an object: napari reports it
    assert recorded == [1] and ctl.painted[20, 2:21].all() and layer.data[20, 10] == 2
    painted = ctl.painted.copy()
    layer.selected_label = 0  # painting label 0 erases
    _drag(layer, [(28, 5), (28, 9), (28, 9)], mode="paint")
    assert recorded == [1, 1] and ctl.painted[28, 5:10].all()
    ctl.painted[...] = painted
    _drag(layer, [(12, 5), (12, 9), (12, 9)], displayed=(1, 0))  # a transposed view: not a 2-D drag
    assert recorded == [1, 1] and not ctl.painted[12].any()
    _drag(layer, [(5, 2), (5, 20), (5, 20)])  # nothing new under the brush: no hand-over
    assert recorded == [1, 1]


def test_erase_footprint_is_a_disk_of_the_brush_along_the_path():
    from skimage.draw import disk
    from skimage.measure import label

    _, _, ctl = _controller((40, 40))
    assert ctl.record_erase([(20, 20)], brush_size=5) == 21  # a disk 5 pixels across
    want = np.zeros((40, 40), bool)
    want[disk((20, 20), 2.5)] = True
    assert np.array_equal(ctl.painted, want)
    assert ctl.record_erase([(20, 20)], brush_size=5) == 0  # nothing new
    ctl.painted[...] = False
    # a diagonal stroke leaves no gap, runs off the image without error and stops at its edge
    added = ctl.record_erase([(2, 2), (30, 37), (60, 37)], brush_size=1)
    assert added == ctl.painted.sum() == 36 + 9 and ctl.painted[2, 2] and ctl.painted[39, 37]
    assert label(ctl.painted, connectivity=2).max() == 1
    _, _, stack = _controller((3, 40, 40))
    stack.record_erase([(1, 10, 0), (1, 10, 39)], brush_size=3)
    assert stack.painted[1, 9:12].all() and not stack.painted[[0, 2]].any()
    assert stack.record_erase([(7, 10, 10)], brush_size=3) == 0  # no such slice


def test_painting_on_a_stack_reads_only_the_touched_region():
    """Per paint event and per hand-over, the work follows the strokes, not the volume."""
    from napari_jointattn.controllers.live import WHOLE_SLICES

    shape = (64, 256, 256)
    _, layer, ctl = _controller(shape, annotated=WHOLE_SLICES)
    ctl.painted = ctl.painted.view(Watched)
    Watched.reads = []
    layer.brush_size = 7
    layer.paint((3, 100, 100), 1)
    layer.data_setitem((np.full(20, 10), np.full(20, 50), np.arange(20, 40)), 2)
    ctl.record_erase([(10, 60, 20), (10, 60, 60)], brush_size=5)
    assert ctl.painted[3, 100, 100] and ctl.painted[10, 50, 20:40].all() and ctl.painted[10, 60, 20:61].all()
    plane = shape[1] * shape[2]
    assert Watched.reads and max(Watched.reads) <= 8 * 64  # the strokes' bounding boxes
    snap = ctl.snapshot()
    assert max(Watched.reads) <= 2 * plane  # the two slices painted on, never the volume
    assert snap.planes == (3, 10) and snap.labels.shape == (2, 256, 256)
    assert snap.painted_pixels == ctl.painted.view(np.ndarray).sum()
    labels, mask, weights = snap.full()
    assert labels.shape == shape and labels[10, 50, 25] == 2 and labels[3, 100, 100] == 1
    assert mask[[3, 10]].all() and not mask[4].any() and weights[10, 60, 30] == 5.0


def test_live_layers_are_added_one_per_turn_then_written_in_place():
    from napari_jointattn.controllers.live import LivePrediction

    viewer, _, ctl = _controller((4, 16, 16))
    classes, u = np.ones((16, 16), np.uint8), np.full((16, 16), 0.5, np.float32)
    # the uncertainty first (below), then the prediction: each already shows the plane predicted
    assert ctl.show_prediction(LivePrediction(1, classes, u, 0)) is True
    assert [x.name for x in viewer.layers][2:] == ["img uncertainty"]
    assert viewer.layers["img uncertainty"].data[1].min() == 0.5 and not viewer.layers["img uncertainty"].data[0].any()
    assert ctl.show_prediction(ctl.latest) is True
    pred = viewer.layers["img live prediction"]
    assert pred.data.shape == (4, 16, 16) and pred.data[1].all() and not pred.data[2].any()
    # both exist: a prediction of another slice is written into that plane, nothing added
    assert ctl.show_prediction(LivePrediction(2, 2 * classes, 0 * u, 5)) is False
    assert len(viewer.layers) == 4 and (pred.data[2] == 2).all() and pred.data[1].all()
    assert not viewer.layers["img uncertainty"].data[2].any()
    pred.data = np.zeros((8, 8), np.uint8)  # the user put other data in it: left alone
    assert ctl.show_prediction(LivePrediction(0, classes, u, 6)) is False
    assert viewer.layers["img uncertainty"].data[0].min() == 0.5
    ctl.reset()
    assert ctl.show_prediction(LivePrediction(0, classes, u, 7)) is False


def test_the_view_follows_next_and_the_loop_follows_the_view():
    from napari_jointattn.controllers.live import Target

    viewer, layer, ctl = _controller((5, 32, 32))
    ctl.go_to(Target(3, 10, 20, 0.9, (0, 0, 20, 20)))
    assert viewer.dims.current_step[0] == 3 and tuple(viewer.camera.center)[-2:] == (10.0, 20.0)
    ctl.follow_view()
    assert ctl.view_slice == 3
    viewer.dims.set_current_step(0, 1)
    ctl.follow_view()
    assert ctl.view_slice == 1
    assert ctl.data_replaced() is None  # same shape: hand the labels over again
    layer.data = np.zeros((5, 8, 8), np.int32)
    assert "another shape" in ctl.data_replaced()
