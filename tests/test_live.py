"""The live loop's engine: LiveTrainer and the uncertainty ranking."""

from __future__ import annotations

import threading

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
