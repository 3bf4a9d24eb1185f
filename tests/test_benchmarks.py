"""Smoke runs of the benchmark scripts on tiny inputs, so they cannot rot."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_model_speed_table(capsys):
    rows = load("model_speed").main(["--sizes", "64", "96", "--repeats", "1", "--threads", "1"])
    assert [r[0] for r in rows] == ["none", "pointwise", "self", "joint (mix)", "joint (gated)"]
    assert all(len(r[2]) == 2 and all(t > 0 for t in r[2]) for r in rows)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| variant | parameters | 64² (ms) | 96² (ms) |")
    assert len(out) == 2 + 5


def test_segment_speed_table(capsys):
    times, mem = load("segment_speed").main(
        ["--size", "64", "--repeats", "1", "--threads", "1", "--memory-size", "128"]
    )
    assert len(times) == 3 and all(v > 0 for v in times.values())
    assert mem["peak_mib"] > 0 and mem["objects"] >= 0
    out = capsys.readouterr().out
    assert "MONAI AttentionUnet" in out and "ratio to ours" in out and "peak resident memory" in out
