"""Model metadata: the pydantic schema, typed settings, files of older versions, the torch-free reader."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from _helpers import rewrite_metadata

from napari_jointattn import BadInputError
from napari_jointattn.engine.io.normalize import Normalization
from napari_jointattn.engine.models.metadata import (
    META_KEY,
    Postprocess,
    describe_file,
    read_header,
    read_metadata,
    validate_metadata,
    write_metadata,
)
from napari_jointattn.engine.models.model import load_model, new_model, save_model
from napari_jointattn.model import DenseUNetConfig

TINY = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                       head_channels=4, attention_dim=8, attention_levels=(1,))


@pytest.fixture
def tiny_file(tmp_path):
    model = new_model(config=TINY, classes=["background", "object"], name="tiny", seed=0)
    return save_model(model, tmp_path / "tiny.safetensors")


def _edit(update):
    def edit(m):
        meta = json.loads(m[META_KEY])
        update(meta)
        m[META_KEY] = json.dumps(meta)
    return edit


def test_settings_are_typed_and_validated():
    model = new_model(config=TINY, classes=["background", "object"], seed=0)
    assert model.normalization == Normalization(percentiles=(1.0, 99.8), per="image")
    assert model.postprocess == Postprocess(instances=False)
    model.postprocess = {"instances": True, "min_size": 0}  # a mapping becomes the typed object
    assert isinstance(model.postprocess, Postprocess) and model.postprocess.min_size == 0
    assert model.instances is True
    model.postprocess = {"instances": np.bool_(True), "min_size": np.int64(4)}  # NumPy scalars: their values
    assert model.postprocess.min_size == 4 and type(model.postprocess.min_size) is int
    with pytest.raises(BadInputError, match="min_distance is out of range"):
        model.postprocess = {"instances": True, "min_distance": 0}
    with pytest.raises(BadInputError, match="not a known key"):
        model.postprocess = {"instance": True}
    with pytest.raises(BadInputError, match="0 <= low < high <= 100"):
        model.normalization = {"percentiles": [60, 50], "per": "image"}
    with pytest.raises(BadInputError, match="'image' or 'volume'"):
        model.normalization = {"percentiles": [1, 99], "per": "slab"}
    with pytest.raises(BadInputError, match="must be a number"):
        model.normalization = {"percentiles": ["1", 99], "per": "image"}
    # settings are frozen: a change is a new, validated object
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        model.postprocess.min_size = 3
    bigger = model.postprocess.replace(min_size=40)
    assert bigger.min_size == 40 and model.postprocess.min_size == 4


def test_settings_read_like_the_dicts_they_replace():
    post = Postprocess(instances=True, min_size=15)
    assert post["instances"] is True and post.get("min_distance", 3) == 3 and post.get("threshold") is None
    assert "min_size" in post and "threshold" not in post
    assert {**post, "threshold": 0.4} == {"instances": True, "min_size": 15, "threshold": 0.4}
    assert dict(post) == {"instances": True, "min_size": 15} == post.to_dict()
    with pytest.raises(KeyError):
        post["threshold"]
    norm = Normalization(percentiles=(1, 99.5), per="volume")
    assert tuple(norm.get("percentiles")) == (1.0, 99.5) and norm["per"] == "volume"
    assert norm.to_dict() == {"percentiles": [1.0, 99.5], "per": "volume", "upsample": 1}


def test_normalization_owns_the_percentile_rule():
    rng = np.random.default_rng(0)
    stack = rng.random((4, 20, 20)) * np.arange(1, 5)[:, None, None]
    per_volume = Normalization(percentiles=(0, 100), per="volume")
    lo, hi = per_volume.volume_range(stack)
    assert (lo, hi) == (stack.min(), stack.max())
    assert per_volume.volume_range(stack, is_stack=False) is None
    assert Normalization(per="image").volume_range(stack) is None
    out, bad = per_volume.apply(stack[0], (lo, hi))
    assert bad is None and out.max() == pytest.approx((stack[0].max() - lo) / (hi - lo), rel=1e-6)
    alone, _ = Normalization(percentiles=(0, 100)).apply(stack[0])
    assert alone.min() == 0 and alone.max() == pytest.approx(1.0)


def test_a_file_of_an_older_version_still_loads(tiny_file, tmp_path):
    """Written before typed settings: integer percentiles, aux_channels in the config,
    distance_channel false, extra top-level keys, no training statistics."""
    old = tmp_path / "old.safetensors"

    def older(meta):
        meta["normalization"] = {"percentiles": [1, 99], "per": "image"}
        meta["postprocess"] = {"instances": True, "min_size": 15, "min_distance": 3, "distance_channel": False}
        meta["config"]["aux_channels"] = 0
        meta["provenance"] = {"code_version": "0.1.0"}
        meta["x_note"] = "kept"

    rewrite_metadata(tiny_file, old, _edit(older))
    model = load_model(old)
    assert model.normalization.percentiles == (1.0, 99.0) and model.postprocess.min_distance == 3
    assert model.instances and model.trained_on is None
    assert read_metadata(old)["x_note"] == "kept"


@pytest.mark.parametrize("preset,dims,modality", [("nuclei", 2, "fluorescence"), ("brain-mri", 3, "MRI")])
def test_bundled_presets_load_and_say_what_they_were_trained_on(preset, dims, modality):
    model = load_model(preset)
    stats = model.trained_on
    assert stats.dims == dims and stats.channels == 1 and modality in stats.modality
    assert stats.intensity.p1 < stats.intensity.p50 < stats.intensity.p99
    assert "train_presets.py" in stats.computed_by
    assert model.normalization.per == ("image" if preset == "nuclei" else "volume")


@pytest.mark.parametrize("update,says", [
    (lambda m: m.update(format="other"), "not a napari-jointattn-model file"),
    (lambda m: m.update(format_version=2), "unsupported format_version 2"),
    (lambda m: m["config"].update(stem_channels=True), "config.stem_channels must be an integer"),
    (lambda m: m["config"].update(growth=10_000), "config.growth is out of range: must be <= 512"),
    (lambda m: m.update(classes=["background", "background"]), "duplicate class names"),
    (lambda m: m.update(classes=["a", "b", "c"]), "3 class names for a 2-class network"),
    (lambda m: m["postprocess"].update(threshold=1.5), "postprocess.threshold is out of range"),
    (lambda m: m["postprocess"].update(distance_channel=True), "distance_channel is no longer supported"),
    (lambda m: m["provenance"].update(data_statistics={"dims": 4, "channels": 1, "dtype": "uint8"}),
     "provenance.data_statistics.dims must be 2 or 3"),
    (lambda m: m.update(scores=[]), "scores must be an object"),
], ids=["format", "version", "config-bool", "config-range", "classes-duplicate", "classes-count",
        "threshold", "distance-channel", "statistics", "scores"])
def test_schema_refuses_with_one_line(tiny_file, update, says):
    meta = read_metadata(tiny_file)
    update(meta)
    with pytest.raises(BadInputError, match="invalid model metadata") as info:
        validate_metadata(meta, "m.safetensors")
    assert says in str(info.value) and "\n" not in str(info.value)


def test_lower_bounds_are_the_config_classes_own(tiny_file, tmp_path):
    """The schema bounds sizes from above; DenseUNetConfig.validate says what a network needs."""
    bad = tmp_path / "zero.safetensors"
    rewrite_metadata(tiny_file, bad, _edit(lambda m: m["config"].update(growth=0)))
    assert read_metadata(bad)["config"]["growth"] == 0  # the torch-free reader has no opinion
    with pytest.raises(BadInputError, match="growth must be a positive integer"):
        load_model(bad)


def test_header_is_read_without_torch_and_checked(tiny_file, tmp_path):
    tensors, strings = read_header(tiny_file)
    assert META_KEY in strings and all(set(t) == {"dtype", "shape", "data_offsets"} for t in tensors.values())
    assert describe_file(tiny_file)["parameters"] == sum(p.numel() for p in load_model(tiny_file).net.state_dict().values())
    raw = tiny_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) - 100])  # the last tensor's bytes are missing
    with pytest.raises(BadInputError, match="not a valid safetensors model file .*do not fit the file"):
        read_header(cut)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    with pytest.raises(BadInputError, match="header in a"):
        read_header(huge)


def test_write_metadata_keeps_the_weights_byte_for_byte(tiny_file, tmp_path):
    meta = read_metadata(tiny_file)
    meta["description"] = "described later"
    out = write_metadata(tiny_file, meta, tmp_path / "re.safetensors")
    n_old = struct.unpack("<Q", tiny_file.read_bytes()[:8])[0]
    n_new = struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert out.read_bytes()[8 + n_new:] == tiny_file.read_bytes()[8 + n_old:] and n_new % 8 == 0
    assert load_model(out).description == "described later"
    meta["classes"] = ["only one"]
    with pytest.raises(BadInputError, match="2 to 255"):
        write_metadata(tiny_file, meta, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_metadata_module_does_not_import_torch(tiny_file):
    code = ("import sys; from napari_jointattn.engine.models.metadata import list_models, read_metadata; "
            f"read_metadata({str(tiny_file)!r}); rows = list_models(); "
            "assert [r['name'] for r in rows][:2] == ['nuclei', 'brain-mri'], rows; "
            "assert all(r['error'] is None for r in rows), rows; "
            "heavy = [m for m in ('torch', 'monai', 'napari', 'safetensors') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
