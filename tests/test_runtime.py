"""segment() on the CPU through ONNX Runtime (opt-in): the same labels as PyTorch, a clean fallback."""

from pathlib import Path

import numpy as np
import pytest

import napari_jointattn
from napari_jointattn.engine.errors import BadInputError
from napari_jointattn.engine.inference import runtime
from napari_jointattn.engine.inference.segment import segment

pytest.importorskip("onnxruntime")


@pytest.fixture
def image():
    import tifffile

    img = tifffile.imread(Path(napari_jointattn.__file__).with_name("samples") / "nuclei_dsb2018.tif")
    return img[:300, :280]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cache_folder", lambda: tmp_path / "onnx")
    monkeypatch.setattr(runtime, "_SESSIONS", {})
    return tmp_path / "onnx"


def test_onnxruntime_gives_the_labels_pytorch_gives(image, cache, monkeypatch):
    monkeypatch.setenv(runtime.RUNTIME_ENV, "onnxruntime")
    fast = segment(image, "nuclei")
    assert fast.runtime == "onnxruntime" and fast.device == "cpu" and not fast.notes
    assert [p.suffix for p in cache.iterdir()] == [".onnx"]  # exported once, into the cache
    monkeypatch.setenv(runtime.RUNTIME_ENV, "torch")
    slow = segment(image, "nuclei")
    assert slow.runtime == "torch"
    np.testing.assert_array_equal(fast.labels, slow.labels)
    assert fast.labels.max() > 20
    # attention maps need the PyTorch network
    monkeypatch.setenv(runtime.RUNTIME_ENV, "onnxruntime")
    assert segment(image, "nuclei", attention=True).runtime == "torch"


def test_new_weights_get_their_own_graph(cache, monkeypatch):
    import torch

    from napari_jointattn.engine.models.model import new_model

    monkeypatch.setenv(runtime.RUNTIME_ENV, "onnxruntime")
    model = new_model("nuclei", seed=0)
    first = runtime.fingerprint(model)
    with torch.no_grad():
        next(model.net.parameters()).add_(1.0)
    assert runtime.fingerprint(model) != first


def test_a_graph_that_cannot_be_made_is_a_note_and_pytorch_runs(image, cache, monkeypatch):
    def broken(model, path):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(runtime, "_export", broken)
    monkeypatch.setenv(runtime.RUNTIME_ENV, "onnxruntime")
    result = segment(image[:128, :128], "nuclei")
    assert result.runtime == "torch"
    assert any("exporter exploded" in n and "PyTorch ran instead" in n for n in result.notes)


def test_the_runtime_setting_is_checked(monkeypatch):
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tensorflow")
    with pytest.raises(BadInputError, match="auto, onnxruntime or torch"):
        runtime.cpu_runtime()
    for value in ("torch", "auto"):  # PyTorch is the default (docs/performance.md, CPU runtimes)
        monkeypatch.setenv(runtime.RUNTIME_ENV, value)
        assert runtime.cpu_runtime() == "torch"
    monkeypatch.delenv(runtime.RUNTIME_ENV)
    assert runtime.cpu_runtime() == "torch"
