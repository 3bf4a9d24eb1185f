import os

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

try:  # the same examples on every run, so a test run is reproducible; explore with --hypothesis-profile=explore
    from hypothesis import settings

    settings.register_profile("default", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def _onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(autouse=True)
def _isolated_onnx_cache(_onnx_cache, monkeypatch):
    """The CPU runtime's exported graphs go to one folder for the run, never the user's cache."""
    from napari_jointattn.engine.inference import runtime

    monkeypatch.setattr(runtime, "cache_folder", lambda: _onnx_cache)


@pytest.fixture(autouse=True)
def _isolated_model_dir(tmp_path_factory, monkeypatch):
    """Never touch the real per-user model folder."""
    folder = tmp_path_factory.mktemp("models")
    monkeypatch.setenv("NAPARI_JOINTATTN_MODEL_DIR", str(folder))
    return folder


@pytest.fixture
def model_dir():
    return __import__("pathlib").Path(os.environ["NAPARI_JOINTATTN_MODEL_DIR"])


@pytest.fixture
def blobs():
    """A 2-D image of bright disks on a dark background, and its instance labels."""
    rng = np.random.default_rng(0)
    h, w = 96, 120
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros((h, w), np.int32)
    centres = [(20, 20), (20, 60), (30, 100), (70, 30), (75, 80), (60, 58)]
    for i, (cy, cx) in enumerate(centres, 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < 81] = i
    image = (labels > 0) * 200.0 + rng.normal(20, 5, (h, w))
    return image.astype(np.float32), labels


@pytest.fixture
def saved_model(tmp_path):
    """A randomly initialised nuclei-architecture model saved to a file."""
    from napari_jointattn.engine.models.model import new_model, save_model

    model = new_model("nuclei", seed=0)
    return save_model(model, tmp_path / "random.safetensors")
