"""Engine helpers behind the Fine-tune dock: correction weights, the before/after map, versions."""

import datetime as dt

import numpy as np
import pytest

from napari_jointattn.engine.models.model import new_model, save_model
from napari_jointattn.engine.models.versions import (
    describe_version,
    export_version,
    list_versions,
    version_path,
)
from napari_jointattn.engine.training.corrections import (
    ONLY_AFTER,
    ONLY_BEFORE,
    correction_weights,
    label_changes,
)


def test_correction_weights_mark_where_the_user_changed_foreground():
    labels = np.array([[0, 3, 3], [0, 0, 1]])
    prediction = np.array([[0, 5, 0], [2, 0, 1]])  # ids may differ; only foreground counts
    w = correction_weights(labels, prediction, 4.0)
    np.testing.assert_array_equal(w, [[1, 1, 5], [5, 1, 1]])
    assert w.dtype == np.float32
    assert correction_weights(labels, prediction, 0.0) is None
    assert correction_weights(labels, None, 4.0) is None
    assert correction_weights(labels, prediction[:, :2], 4.0) is None


def test_label_changes_before_after():
    before = np.array([[0, 1, 1, 0], [4, 0, 2, 0]])
    after = np.array([[0, 0, 9, 3], [4, 0, 0, 1]])
    np.testing.assert_array_equal(label_changes(before, after),
                                  [[0, ONLY_BEFORE, 0, ONLY_AFTER], [0, 0, ONLY_BEFORE, ONLY_AFTER]])
    assert label_changes(before, after).dtype == np.uint8
    with pytest.raises(ValueError):
        label_changes(before, after[:, :3])


def test_version_names(tmp_path):
    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    assert version_path("nuclei", tmp_path, when).name == "nuclei-ft-20260102-030405.safetensors"
    first = version_path(str(tmp_path / "nuclei-ft-20250101-000000.safetensors"), tmp_path, when)
    assert first.name == "nuclei-ft-20260102-030405.safetensors"  # one -ft- suffix, not a chain
    first.write_bytes(b"taken")
    assert version_path("nuclei", tmp_path, when).name == "nuclei-ft-20260102-030405-1.safetensors"
    assert version_path("x", tmp_path / "new" / "folder").parent.is_dir()


def test_versions_listed_newest_first_without_plain_or_unimproved_models(tmp_path):
    save_model(new_model("nuclei", seed=0), tmp_path / "plain.safetensors")  # no parent: not a version
    import time

    # the order is the files' own save times (a parent's time in the provenance never counts)
    old = save_model(new_model("nuclei", seed=0, provenance={"parent": "nuclei", "saved": "2030-01-01T00:00:00"}),
                     tmp_path / "nuclei-ft-b.safetensors")
    time.sleep(1.1)  # save times have one-second resolution
    new = save_model(new_model("nuclei", seed=0, provenance={"parent": "nuclei", "saved": "2026-01-01T00:00:00"}),
                     tmp_path / "nuclei-ft-a.safetensors")
    save_model(new_model("nuclei", seed=0, provenance={"parent": "nuclei", "training": {"improved": False}}),
               tmp_path / "nuclei-ft-c.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a model")
    versions = list_versions(tmp_path)
    assert [p for p, _ in versions] == [new, old]
    saved = versions[0][1]["provenance"]["saved"][:19].replace("T", " ")
    assert describe_version(*versions[0]).startswith(f"nuclei-ft-a  (from nuclei, val Dice n/a, {saved}")
    (tmp_path / "shared").mkdir()
    out = export_version(new, tmp_path / "shared" / "copy")
    assert out.name == "copy.safetensors" and out.read_bytes() == new.read_bytes()


def test_export_format_follows_the_suffix_or_the_choice():
    from napari_jointattn.engine.errors import BadInputError
    from napari_jointattn.engine.models.versions import export_format

    assert export_format("a/m.onnx") == ("onnx", "a/m.onnx")
    assert export_format("a/m.ZIP") == ("bioimageio", "a/m.ZIP")
    assert export_format("a/m") == ("safetensors", "a/m.safetensors")
    assert export_format("a/m", "torchscript") == ("torchscript", "a/m.pt")
    assert export_format("a/m.pt", "torchscript") == ("torchscript", "a/m.pt")
    with pytest.raises(BadInputError, match="unknown export format"):
        export_format("a/m", "tflite")
