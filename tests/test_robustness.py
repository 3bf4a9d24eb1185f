"""The bad-input battery: property-based API checks and the CLI's 30+ bad inputs.

Every bad input must end in ``BadInputError`` (API) or exit status 2 with one
line on stderr (CLI): no traceback, no partial output file, nothing written
outside the output folder.
"""

import errno
import json
import pickle

import nibabel as nib
import numpy as np
import pytest
from _helpers import rewrite_metadata
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_jointattn import BadInputError, segment
from napari_jointattn.cli import main
from napari_jointattn.engine.models import META_KEY, new_model, save_model
from napari_jointattn.model import DenseUNetConfig

TINY = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                       head_channels=4, attention_dim=8, attention_levels=(1,))


@pytest.fixture(scope="module")
def tiny_model():
    return new_model(config=TINY, classes=["background", "object"], name="tiny", seed=0)


def expected_shape(shape):
    """The documented channel rule for a one-channel model."""
    if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
        return shape[:2]
    return shape


DTYPES = st.sampled_from([np.bool_, np.uint8, np.uint16, np.int64, np.float16, np.float32, np.float64])
SHAPES = st.one_of(
    hnp.array_shapes(min_dims=1, max_dims=5, min_side=1, max_side=9),
    st.sampled_from([(1, 1), (1, 700), (700, 1), (3, 900), (2, 2, 2), (40, 50, 3), (40, 50, 4)]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=SHAPES, dtype=DTYPES, data=st.data())
def test_segment_returns_right_shape_or_bad_input(tiny_model, shape, dtype, data):
    elements = None
    if np.dtype(dtype).kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=np.dtype(dtype).itemsize * 8)
    arr = data.draw(hnp.arrays(dtype, shape, elements=elements))
    try:
        result = segment(arr, tiny_model, device="cpu", tile=64)
    except BadInputError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg
        spatial = len(expected_shape(shape))
        all_nan = arr.dtype.kind == "f" and not np.isfinite(arr).any()
        assert spatial not in (2, 3) or all_nan, f"{shape} {dtype}: {msg}"
        return
    assert result.labels.shape == expected_shape(shape)
    assert result.labels.dtype.kind in "iu"


@pytest.mark.parametrize("value", [0.0, -5.0, 1e30, -1e-30])
def test_constant_and_extreme_images(tiny_model, value):
    img = np.full((33, 47), value, np.float64)
    img[3, 4] = value * 2 - 1
    assert segment(img, tiny_model, device="cpu").labels.shape == img.shape


# ----------------------------------------------------------------- the CLI
def _meta(update):
    def edit(m):
        meta = json.loads(m[META_KEY])
        meta.update(update)
        m[META_KEY] = json.dumps(meta)
    return edit


def setup_case(case, d, model):
    """Create the files of one bad-input case in ``d``; return the CLI arguments."""
    img = d / "img.tif"
    tifffile.imwrite(img, np.random.default_rng(0).random((40, 48)).astype(np.float32))
    seg = ["segment", str(img), "--model", str(model), "--out", str(d / "out")]
    ev = ["evaluate", "--model", str(model), "--image", str(img), "--labels", str(d / "lab.tif")]
    tr = ["train", "--image", str(img), "--labels", str(d / "lab.tif"), "--from", str(model),
          "--out", str(d / "out" / "m.safetensors"), "--epochs", "1"]

    def seg_with(path):
        return ["segment", str(path), "--model", str(model), "--out", str(d / "out")]

    def model_case(name, content=None, edit=None):
        p = d / name
        if edit is not None:
            rewrite_metadata(model, p, edit)
        else:
            p.write_bytes(content)
        return ["segment", str(img), "--model", str(p), "--out", str(d / "out")]

    if case == "missing-file":
        return seg_with(d / "nope.tif")
    if case == "dir-without-images":
        (d / "empty").mkdir()
        return seg_with(d / "empty")
    if case == "zero-byte":
        (d / "z.tif").write_bytes(b"")
        return seg_with(d / "z.tif")
    if case == "text-as-tif":
        (d / "t.tif").write_text("just some text")
        return seg_with(d / "t.tif")
    if case == "truncated-tiff":
        tifffile.imwrite(d / "full.tif", np.random.rand(200, 200).astype(np.float32))
        (d / "cut.tif").write_bytes((d / "full.tif").read_bytes()[:3000])
        return seg_with(d / "cut.tif")
    if case == "truncated-nifti":
        nib.save(nib.Nifti1Image(np.random.rand(30, 30, 30).astype(np.float32), np.eye(4)), d / "v.nii.gz")
        (d / "cut.nii.gz").write_bytes((d / "v.nii.gz").read_bytes()[:4000])
        return seg_with(d / "cut.nii.gz")
    if case == "no-finite-pixel":
        tifffile.imwrite(d / "nan.tif", np.full((20, 20), np.nan, np.float32))
        return seg_with(d / "nan.tif")
    if case == "unsupported-extension":
        (d / "img.bmp").write_bytes(b"BM....")
        return seg_with(d / "img.bmp")
    if case == "five-d-tiff":
        tifffile.imwrite(d / "5d.tif", np.zeros((2, 3, 4, 20, 20), np.float32), metadata={"axes": "TZQYX"})
        return seg_with(d / "5d.tif")
    if case == "directory-named-tif":
        (d / "folder.tif").mkdir()
        (d / "folder.tif" / "x.txt").write_text("x")
        return seg_with(d / "folder.tif")
    if case == "labels-other-shape":
        tifffile.imwrite(d / "lab.tif", np.zeros((10, 10), np.uint8))
        return ev
    if case == "class-beyond-model":
        brain = save_model(new_model("brain-mri", seed=0), d / "brain.safetensors")
        tifffile.imwrite(d / "lab.tif", np.full((40, 48), 7, np.uint8))
        return ["evaluate", "--model", str(brain), "--image", str(img), "--labels", str(d / "lab.tif")]
    if case == "negative-class":
        brain = save_model(new_model("brain-mri", seed=0), d / "brain.safetensors")
        tifffile.imwrite(d / "lab.tif", np.full((40, 48), -1, np.int16))
        return ["evaluate", "--model", str(brain), "--image", str(img), "--labels", str(d / "lab.tif")]
    if case == "unknown-model":
        return ["segment", str(img), "--model", "no-such-model", "--out", str(d / "out")]
    if case == "model-path-traversal":
        return ["segment", str(img), "--model", "../../etc/model", "--out", str(d / "out")]
    if case == "truncated-safetensors":
        return model_case("cut.safetensors", model.read_bytes()[:2000])
    if case == "other-architecture":
        # a tiny network's weights under metadata that describes the default network
        other = save_model(new_model(config=TINY, classes=["a", "b"], name="t"), d / "tiny.safetensors")
        rewrite_metadata(other, d / "mismatch.safetensors",
                               _meta({"config": new_model("nuclei").config.to_dict()}))
        return ["segment", str(img), "--model", str(d / "mismatch.safetensors"), "--out", str(d / "out")]
    if case == "metadata-missing":
        return model_case("nometa.safetensors", edit=lambda m: m.pop(META_KEY))
    if case == "metadata-malformed":
        return model_case("badjson.safetensors", edit=lambda m: m.update({META_KEY: "{oops"}))
    if case == "metadata-unknown-architecture":
        return model_case("arch.safetensors", edit=_meta({"architecture": "UNETR"}))
    if case == "metadata-bad-ranges":
        return model_case("ranges.safetensors", edit=_meta({"normalization": {"percentiles": [50, 5], "per": "image"}}))
    if case == "pickle-renamed":
        class Payload:
            def __reduce__(self):
                return (open, (str(d / "PWNED"), "w"))

        return model_case("evil.safetensors", pickle.dumps(Payload()))
    if case == "device-cuda-without-cuda":
        return seg + ["--device", "cuda"]
    if case == "device-unknown":
        return seg + ["--device", "tpu"]
    if case == "tile-too-small":
        return seg + ["--tile", "8"]
    if case == "axis-out-of-range":
        tifffile.imwrite(d / "stack.tif", np.random.rand(3, 40, 48).astype(np.float32))
        return seg_with(d / "stack.tif") + ["--axis", "5"]
    if case == "out-is-a-file":
        (d / "out").write_text("I am a file")
        return seg
    if case == "same-output-stem":
        tifffile.imwrite(d / "img.tiff", np.zeros((20, 20), np.float32))
        return ["segment", str(img), str(d / "img.tiff"), "--model", str(model), "--out", str(d / "out")]
    if case == "no-input-argument":
        return ["segment", "--out", str(d / "out")]
    if case == "evaluate-count-mismatch":
        tifffile.imwrite(d / "lab.tif", np.zeros((40, 48), np.uint8))
        return ev + ["--image", str(img)]
    if case == "train-no-annotation":
        tifffile.imwrite(d / "lab.tif", np.zeros((40, 48), np.uint8))
        return tr
    if case == "train-out-not-safetensors":
        tifffile.imwrite(d / "lab.tif", np.ones((40, 48), np.uint8))
        return tr[:-4] + ["--out", str(d / "out" / "model.pt"), "--epochs", "1"]
    if case == "unknown-subcommand-option":
        return ["segment", str(img), "--model", str(model), "--out", str(d / "out"), "--frobnicate"]
    raise AssertionError(case)


CASES = [
    "missing-file", "dir-without-images", "zero-byte", "text-as-tif", "truncated-tiff",
    "truncated-nifti", "no-finite-pixel", "unsupported-extension", "five-d-tiff", "directory-named-tif",
    "labels-other-shape", "class-beyond-model", "negative-class", "unknown-model", "model-path-traversal",
    "truncated-safetensors", "other-architecture", "metadata-missing", "metadata-malformed",
    "metadata-unknown-architecture", "metadata-bad-ranges", "pickle-renamed", "device-cuda-without-cuda",
    "device-unknown", "tile-too-small", "axis-out-of-range", "out-is-a-file", "same-output-stem",
    "no-input-argument", "evaluate-count-mismatch", "train-no-annotation", "train-out-not-safetensors",
    "unknown-subcommand-option",
]


def snapshot(d):
    return {p.relative_to(d): p.stat().st_size for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_cli_bad_input(tmp_path, saved_model, capsys, case):
    import torch

    if case == "device-cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = tmp_path / "work"
    d.mkdir()
    args = setup_case(case, d, saved_model)
    before = snapshot(tmp_path)
    code = main(args)
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-jointattn: error:"), err
    assert "Traceback" not in err
    # nothing new anywhere, except possibly an empty output folder
    after = snapshot(tmp_path)
    assert after == before, set(after) ^ set(before)
    assert not (d / "PWNED").exists()


@pytest.mark.parametrize("code,name", [(errno.EACCES, "Permission denied"), (errno.ENOSPC, "No space left")])
def test_cli_unwritable_or_full_output(tmp_path, saved_model, capsys, monkeypatch, code, name):
    """Simulated with a failing write (tests run as root, where permissions block nothing)."""
    import os

    import tifffile as tf

    img = tmp_path / "img.tif"
    tf.imwrite(img, np.random.rand(40, 48).astype(np.float32))
    real = tf.imwrite

    def failing(path, *a, **k):
        if ".part" in str(path):
            with open(path, "wb") as fh:
                fh.write(b"half a file")  # the failure happens mid-write
            raise OSError(code, os.strerror(code))
        return real(path, *a, **k)

    monkeypatch.setattr(tf, "imwrite", failing)
    rc = main(["segment", str(img), "--model", str(saved_model), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and name in err and len(err.strip().splitlines()) == 1
    assert list((tmp_path / "out").iterdir()) == []  # the half-written temporary file is gone


def test_rgb_near_float32_max_is_not_lost(tiny_model):
    """The channel mean of huge float32 values must not overflow to infinity."""
    arr = np.full((40, 50, 3), 1.1342746e38, np.float32)
    arr[10:20, 10:20] = 1e37
    result = segment(arr, tiny_model, device="cpu", tile=64)
    assert result.labels.shape == (40, 50)
    from napari_jointattn.engine.inference import prepare_channels

    grey = prepare_channels(arr, 1)
    assert grey.dtype == np.float32 and np.isfinite(grey).all()
    assert prepare_channels(arr.astype(np.float64) * 1e10, 1).dtype == np.float64
