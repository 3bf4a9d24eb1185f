"""The bad-input battery: property-based API checks and the CLI's bad inputs, by class of fault.

Every bad input must end in ``BadInputError`` (API) or exit status 2 with one
line on stderr (CLI): no traceback, no partial output file, nothing written
outside the output folder. Classes beyond plain bad input: overwrite
protection, header-declared axes, decoded-size limits, model config validated
before allocation, non-regular files, argument checks before work, signals,
strict JSON and one-line output. Cases that could eat memory or hang if the
code regressed run in a subprocess under ``resource.setrlimit(RLIMIT_AS)``
(``_limited.py``).
"""

import errno
import json
import os
import pickle
import signal

import nibabel as nib
import numpy as np
import pytest
import tifffile
from _helpers import nifti_bomb, png_bomb, rewrite_metadata, rewrite_tensors, run_limited, tiff_bomb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_jointattn import BadInputError, segment
from napari_jointattn.cli import main
from napari_jointattn.engine.models.model import META_KEY, new_model, save_model
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
    """One value everywhere is no object anywhere, also with one odd pixel (the percentiles
    clip it: the network would see one value)."""
    img = np.full((33, 47), value, np.float64)
    for odd in (False, True):
        if odd:
            img[3, 4] = value * 2 - 1
        flat = segment(img, tiny_model, device="cpu")
        assert flat.labels.shape == img.shape and not flat.labels.any()
        assert any("one value" in note for note in flat.notes)
    img[:, ::2] = value * 2 - 1  # contrast: segmented as any image
    assert not any("one value" in n for n in segment(img, tiny_model, device="cpu").notes)


def test_constant_slices_of_a_stack_are_background(tiny_model):
    from napari_jointattn import load_model

    stack = np.random.default_rng(0).random((3, 40, 48)).astype(np.float32)
    stack[1] = 0.25  # a padding slice
    model = load_model("nuclei")
    result = segment(stack, model, device="cpu", axis=0)
    assert not result.labels[1].any() and any("1 slice(s)" in n for n in result.notes)
    alone = segment(stack[[0]], model, device="cpu", axis=0)
    assert np.array_equal(alone.labels[0] > 0, result.labels[0] > 0)


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
          "--out", str(d / "m.safetensors"), "--epochs", "1"]

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
    if case == "evaluate-without-labels":
        return ["evaluate", "--model", str(model), "--image", str(img)]
    if case == "evaluate-count-mismatch":
        tifffile.imwrite(d / "lab.tif", np.zeros((40, 48), np.uint8))
        return ev + ["--image", str(img)]
    if case == "train-no-annotation":
        tifffile.imwrite(d / "lab.tif", np.zeros((40, 48), np.uint8))
        return tr
    if case == "train-out-not-safetensors":
        tifffile.imwrite(d / "lab.tif", np.ones((40, 48), np.uint8))
        return tr[:-4] + ["--out", str(d / "model.pt"), "--epochs", "1"]
    if case == "unknown-subcommand-option":
        return ["segment", str(img), "--model", str(model), "--out", str(d / "out"), "--frobnicate"]
    # finite weights (a diverged model segments everything as background)
    if case in ("model-nan-weights", "model-inf-weights"):
        bad = float("nan") if case == "model-nan-weights" else float("inf")
        rewrite_tensors(model, d / "bad.safetensors", lambda t: t[sorted(t)[0]].view(-1).__setitem__(0, bad))
        return ["segment", str(img), "--model", str(d / "bad.safetensors"), "--out", str(d / "out")]
    # model metadata: bounded depth and size
    if case == "metadata-deeply-nested":
        return model_case("deep.safetensors", edit=lambda m: m.update(
            {META_KEY: m[META_KEY][:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"}))
    if case == "metadata-too-large":
        return model_case("large.safetensors", edit=lambda m: m.update(
            {META_KEY: m[META_KEY][:-1] + ', "x": "' + "a" * (2 << 20) + '"}'}))
    # non-regular files named as inputs
    if case == "model-is-directory":
        (d / "dir.safetensors").mkdir()
        return ["segment", str(img), "--model", str(d / "dir.safetensors"), "--out", str(d / "out")]
    if case == "model-is-fifo":
        os.mkfifo(d / "pipe.safetensors")
        return ["segment", str(img), "--model", str(d / "pipe.safetensors"), "--out", str(d / "out")]
    if case == "model-links-to-dev-zero":
        os.symlink("/dev/zero", d / "zero.safetensors")
        return ["segment", str(img), "--model", str(d / "zero.safetensors"), "--out", str(d / "out")]
    if case == "image-is-fifo":
        os.mkfifo(d / "pipe.tif")
        return seg_with(d / "pipe.tif")
    if case == "labels-is-fifo":
        os.mkfifo(d / "lab.tif")
        return ev
    if case == "newline-in-file-name":
        return seg_with(d / "two\nlines.tif")
    # arguments checked before any work, with the rules of segment
    if case == "train-empty-class-name":
        tifffile.imwrite(d / "lab.tif", np.ones((40, 48), np.uint8))
        return tr + ["--classes", "background,,cell"]
    if case == "train-too-many-classes":
        tifffile.imwrite(d / "lab.tif", np.ones((40, 48), np.uint8))
        return tr + ["--classes", ",".join(f"c{i}" for i in range(300))]
    if case == "train-out-is-a-folder":
        tifffile.imwrite(d / "lab.tif", np.ones((40, 48), np.uint8))
        (d / "m.safetensors").mkdir()
        return tr
    if case == "train-negative-seed":
        tifffile.imwrite(d / "lab.tif", np.ones((40, 48), np.uint8))
        return tr + ["--seed", "-1"]
    if case == "train-axis-100":
        tifffile.imwrite(d / "lab.tif", np.ones((40, 48), np.uint8))
        return tr + ["--axis", "100"]
    if case == "train-infinite-learning-rate":
        tifffile.imwrite(d / "lab.tif", np.ones((40, 48), np.uint8))
        return tr + ["--lr", "inf"]
    if case == "evaluate-axis-100":
        tifffile.imwrite(d / "lab.tif", np.zeros((40, 48), np.uint8))
        return ev + ["--axis", "100"]
    # header-declared axes: a time series is no evaluation input
    if case == "evaluate-time-series":
        nib.save(nib.Nifti1Image(np.random.rand(20, 20, 4, 3).astype(np.float32), np.eye(4)), d / "ts.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((20, 20, 4, 3), np.uint8), np.eye(4)), d / "tl.nii.gz")
        return ["evaluate", "--model", str(model), "--image", str(d / "ts.nii.gz"), "--labels", str(d / "tl.nii.gz")]
    raise AssertionError(case)


CASES = [
    "missing-file", "dir-without-images", "zero-byte", "text-as-tif", "truncated-tiff",
    "truncated-nifti", "no-finite-pixel", "unsupported-extension", "five-d-tiff", "directory-named-tif",
    "labels-other-shape", "class-beyond-model", "negative-class", "unknown-model", "model-path-traversal",
    "truncated-safetensors", "other-architecture", "metadata-missing", "metadata-malformed",
    "metadata-unknown-architecture", "metadata-bad-ranges", "pickle-renamed", "device-cuda-without-cuda",
    "device-unknown", "tile-too-small", "axis-out-of-range", "out-is-a-file", "same-output-stem",
    "no-input-argument", "evaluate-without-labels", "evaluate-count-mismatch", "train-no-annotation", "train-out-not-safetensors",
    "unknown-subcommand-option",
    "model-nan-weights", "model-inf-weights", "metadata-deeply-nested", "metadata-too-large",
    "model-is-directory", "model-is-fifo", "model-links-to-dev-zero", "image-is-fifo", "labels-is-fifo",
    "newline-in-file-name", "train-empty-class-name", "train-too-many-classes", "train-out-is-a-folder",
    "train-negative-seed", "train-axis-100", "train-infinite-learning-rate", "evaluate-axis-100",
    "evaluate-time-series",
]
#: what the one line must say, for cases where the reason matters
EXPECT = {
    "model-nan-weights": "NaN or infinite", "model-inf-weights": "NaN or infinite",
    "metadata-deeply-nested": "nested more than", "metadata-too-large": "bytes; at most",
    "model-is-directory": "is a directory", "model-is-fifo": "FIFO", "model-links-to-dev-zero": "device",
    "image-is-fifo": "FIFO", "labels-is-fifo": "FIFO", "newline-in-file-name": "two\\nlines.tif",
    "train-empty-class-name": "empty name", "train-too-many-classes": "2 to 255",
    "train-out-is-a-folder": "is a folder", "train-negative-seed": "seed", "train-axis-100": "axis 100",
    "train-infinite-learning-rate": "learning rate", "evaluate-axis-100": "axis 100",
    "evaluate-time-series": "time series",
    "labels-other-shape": "shape", "device-cuda-without-cuda": "CUDA", "unknown-model": "no-such-model",
    "evaluate-without-labels": "--labels",
}


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
    assert EXPECT.get(case, "") in lines[0], lines[0]
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
    from napari_jointattn.engine.inference.segment import prepare_channels

    grey = prepare_channels(arr, 1)
    assert grey.dtype == np.float32 and np.isfinite(grey).all()
    assert prepare_channels(arr.astype(np.float64) * 1e10, 1).dtype == np.float64


# ------------------------------------------------------ overwrite protection
@pytest.fixture
def instance_model_file(tmp_path, tiny_model):
    import copy

    m = copy.deepcopy(tiny_model)
    m.postprocess = {"instances": True, "min_size": 0}
    return save_model(m, tmp_path / "tiny.safetensors")


def _seg(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_folder_run_keeps_ground_truth_and_never_reads_its_outputs(tmp_path, instance_model_file, capsys):
    """`segment d --out d` with d/img.tif and the user's d/img_labels.tif."""
    d = tmp_path / "d"
    d.mkdir()
    tifffile.imwrite(d / "img.tif", np.random.default_rng(0).random((48, 40)).astype(np.float32))
    tifffile.imwrite(d / "img_labels.tif", np.full((48, 40), 7, np.uint8))
    truth = (d / "img_labels.tif").read_bytes()
    code, out, err = _seg(["segment", d, "--model", instance_model_file, "--out", d], capsys)
    assert code == 0, err
    assert (d / "img_labels.tif").read_bytes() == truth
    assert sorted(p.name for p in d.iterdir()) == ["img.tif", "img_labels.tif"]
    assert "skipped" in err and "img_labels.tif exists" in err and "--overwrite" in err
    assert "skipped" in err and "img_labels.tif: " in err  # listed as an output, not an input
    # --overwrite replaces the labels, and still does not segment them
    code, out, err = _seg(["segment", d, "--model", instance_model_file, "--out", d, "--overwrite"], capsys)
    assert code == 0, err
    assert (d / "img_labels.tif").read_bytes() != truth
    assert sorted(p.name for p in d.iterdir()) == ["img.tif", "img_labels.tif"]
    assert "img.tif:" in out and "img_labels.tif:" not in out


def test_existing_outputs_elsewhere_are_skipped_by_name(tmp_path, instance_model_file, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for name in ("a", "b", "c"):
        tifffile.imwrite(src / f"{name}.tif", np.random.default_rng(1).random((40, 40)).astype(np.float32))
    (out / "a_labels.tif").write_bytes(b"mine")
    (out / "b_attention_joint-1-8-mix.tif").write_bytes(b"mine too")
    code, stdout, err = _seg(["segment", src, "--model", instance_model_file, "--out", out, "--attention"],
                             capsys)
    assert code == 0, err
    assert (out / "a_labels.tif").read_bytes() == b"mine"
    assert (out / "b_attention_joint-1-8-mix.tif").read_bytes() == b"mine too"
    assert not (out / "b_labels.tif").exists()  # an input is done whole or not at all
    assert (out / "c_labels.tif").exists() and (out / "c_attention_joint-1-8-mix.tif").exists()
    skipped = [line for line in err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2 and "a.tif" in skipped[0] and "b.tif" in skipped[1]


def test_named_output_is_not_an_input(tmp_path, instance_model_file, capsys):
    d = tmp_path
    tifffile.imwrite(d / "img.tif", np.random.default_rng(0).random((40, 40)).astype(np.float32))
    tifffile.imwrite(d / "img_labels.tif", np.ones((40, 40), np.uint8))
    code, out, err = _seg(["segment", d / "img.tif", d / "img_labels.tif", "--model", instance_model_file,
                           "--out", d, "--overwrite"], capsys)
    assert code == 0, err
    assert "it is an output of this run" in err
    assert not (d / "img_labels_labels.tif").exists()


def test_plan_sees_one_folder_under_two_spellings(tmp_path, monkeypatch):
    from napari_jointattn.engine.scale.batch import plan_segment

    d = tmp_path / "d"
    d.mkdir()
    tifffile.imwrite(d / "x.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(d / "x_labels.tif", np.zeros((8, 8), np.uint8))
    monkeypatch.chdir(tmp_path)
    plan = plan_segment(["d"], "./d/.", overwrite=True)
    assert [j.input.name for j in plan.jobs] == ["x.tif"]
    assert [p.name for p, _ in plan.skipped] == ["x_labels.tif"]


def test_write_without_overwrite_never_replaces(tmp_path):
    from napari_jointattn.engine.io.images import write_labels

    target = tmp_path / "l.tif"
    target.write_bytes(b"user data")
    with pytest.raises(BadInputError, match="exists"):
        write_labels(target, np.ones((4, 4), np.uint8), overwrite=False)
    assert target.read_bytes() == b"user data" and [p.name for p in tmp_path.iterdir()] == ["l.tif"]


# --------------------------------------------------- header-declared axes
@pytest.mark.parametrize("slices", [3, 4])
def test_nifti_with_few_slices_is_a_volume_not_colour(tmp_path, instance_model_file, capsys, slices):
    vol = np.random.default_rng(0).random((64, 64, slices)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image((vol > 0.5).astype(np.uint8), np.eye(4)), tmp_path / "t.nii.gz")
    assert segment(tmp_path / "v.nii.gz", instance_model_file, device="cpu", tile=64).labels.shape == vol.shape
    code, _, err = _seg(["segment", tmp_path / "v.nii.gz", "--model", instance_model_file, "--out",
                         tmp_path / "o", "--tile", "64"], capsys)
    assert code == 0, err
    assert nib.load(tmp_path / "o" / "v_labels.nii.gz").shape == vol.shape
    code, out, err = _seg(["evaluate", "--model", instance_model_file, "--image", tmp_path / "v.nii.gz",
                           "--labels", tmp_path / "t.nii.gz", "--tile", "64"], capsys)
    assert code == 0, err
    assert json.loads(out)["images"] == 1


def test_tiff_declared_axes_beat_the_colour_rule(tmp_path, tiny_model):
    from napari_jointattn.engine.io.images import read_image

    stack = np.random.default_rng(0).random((40, 50, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "zyx.tif", stack, metadata={"axes": "ZYX"})
    img = read_image(tmp_path / "zyx.tif")
    assert img.axes_known and img.channel_axis is None
    assert segment(img, tiny_model, device="cpu", tile=64).labels.shape == (40, 50, 3)
    # without declared axes the documented colour rule still applies to arrays
    assert segment(stack, tiny_model, device="cpu", tile=64).labels.shape == (40, 50)


def test_nifti_time_series_segments_each_time_point(tmp_path, instance_model_file, capsys):
    from napari_jointattn.engine.io.images import read_image

    series = np.random.default_rng(0).random((32, 32, 4, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(series, np.eye(4)), tmp_path / "ts.nii.gz")
    img = read_image(tmp_path / "ts.nii.gz")
    assert img.time_axis == 3 and img.spatial_shape == (32, 32, 4)
    steps = []
    result = segment(img, instance_model_file, device="cpu", tile=64, callback=steps.append)
    assert result.labels.shape == series.shape
    for t in range(3):
        alone = segment(img.time_point(t), instance_model_file, device="cpu", tile=64).labels
        np.testing.assert_array_equal(result.labels[..., t], alone)
    done = [s["done"] for s in steps]
    assert done == sorted(done) and len({s["total"] for s in steps}) == 1  # one progress over all points
    assert "time point 3/3" in steps[-1]["message"]
    code, _, err = _seg(["segment", tmp_path / "ts.nii.gz", "--model", instance_model_file, "--out",
                         tmp_path / "o", "--tile", "64"], capsys)
    assert code == 0, err
    assert nib.load(tmp_path / "o" / "ts_labels.nii.gz").shape == series.shape


def test_ome_tiff_with_a_thumbnail_first_reads_the_full_image(tmp_path):
    from napari_jointattn.engine.io.images import read_image

    full = np.random.default_rng(0).random((96, 80)).astype(np.float32)
    with tifffile.TiffWriter(tmp_path / "slide.ome.tif", ome=True) as tw:
        tw.write(full[::8, ::8].copy())  # the thumbnail
        tw.write(full)
    with tifffile.TiffFile(tmp_path / "slide.ome.tif") as tif:
        assert tif.series[0].shape == (12, 10)
    img = read_image(tmp_path / "slide.ome.tif")
    assert img.data.shape == (96, 80) and img.extra["series"] == 1
    np.testing.assert_array_equal(img.data, full)


# ----------------------------------------------- decoded-size limits (API)
def test_pixel_limit_is_documented_configurable_and_checked(tmp_path, monkeypatch):
    from napari_jointattn.engine.io.images import read_image
    from napari_jointattn.engine.io.limits import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == 8192 * 8192
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64), np.uint8))
    monkeypatch.setenv("NAPARI_JOINTATTN_MAX_PIXELS", "4000")
    with pytest.raises(BadInputError, match=r"4,096 pixels, over the limit of 4,000 .*NAPARI_JOINTATTN_MAX_PIXELS"):
        read_image(tmp_path / "a.tif")
    assert read_image(tmp_path / "a.tif", max_pixels=4096).data.shape == (64, 64)
    monkeypatch.setenv("NAPARI_JOINTATTN_MAX_PIXELS", "4096")
    assert read_image(tmp_path / "a.tif").data.shape == (64, 64)
    monkeypatch.setenv("NAPARI_JOINTATTN_MAX_PIXELS", "lots")
    with pytest.raises(BadInputError, match="must be a positive integer"):
        read_image(tmp_path / "a.tif")
    # channels count too, beyond four values a pixel
    monkeypatch.setenv("NAPARI_JOINTATTN_MAX_PIXELS", "500")
    tifffile.imwrite(tmp_path / "mc.tif", np.zeros((8, 20, 20), np.float32), metadata={"axes": "CYX"})
    with pytest.raises(BadInputError, match="8 channels"):
        read_image(tmp_path / "mc.tif")


# ----------------------------- limited subprocess: memory, time, blocking
@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """Every case that could eat memory or block if the code regressed, in one limited subprocess."""
    import copy

    d = tmp_path_factory.mktemp("limited")
    base = new_model(config=TINY, classes=["background", "object"], name="tiny", seed=0)
    inst = copy.deepcopy(base)
    inst.postprocess = {"instances": True, "min_size": 0}
    model = save_model(inst, d / "tiny.safetensors")
    rng = np.random.default_rng(0)
    tifffile.imwrite(d / "img.tif", rng.random((40, 48)).astype(np.float32))
    tiff_bomb(d / "bomb.tif")
    png_bomb(d / "bomb.png")
    nifti_bomb(d / "bomb.nii.gz")
    big = {"growth": 256, "block_layers": [12, 12, 12, 12], "stem_channels": 512,
           "decoder_channels": [1024] * 5}  # 369 M parameters, 1.5 GB, in a file of kilobytes
    rewrite_metadata(model, d / "declares-1.5GB.safetensors",
                     _meta({"config": {**new_model("nuclei").config.to_dict(), **big}}))
    rewrite_metadata(model, d / "channels-4096.safetensors",
                     _meta({"config": {**TINY.to_dict(), "stem_channels": 4096, "decoder_channels": [4096] * 3}}))
    tifffile.imwrite(d / "big.tif", rng.random((1000, 1000)).astype(np.float32))
    tifffile.imwrite(d / "million.tif", np.arange(1, 10**6 + 1, dtype=np.uint32).reshape(1000, 1000))
    odd = nib.Nifti1Image(rng.random((24, 24, 5)).astype(np.float32), np.eye(4))
    odd.header["pixdim"][0] = 0  # nibabel logs about qfac
    nib.save(odd, d / "odd.nii")
    tifffile.imwrite(d / "lab.tif", (rng.random((40, 48)) > 0.5).astype(np.uint8))
    # a model folder holding a FIFO, broken files, a NaN score and a newline in a description
    models = d / "models"
    models.mkdir()
    save_model(base, models / "good.safetensors")
    rewrite_metadata(model, models / "nan-score.safetensors",
                     lambda m: m.update({META_KEY: m[META_KEY][:-1] + ', "x": 1}'.replace(
                         '"x": 1', '"scores": {"dice": NaN, "hd95": Infinity}').replace(
                         '"scores": {}, ', "")}))
    rewrite_metadata(model, models / "two-lines.safetensors", _meta({"description": "line one\nline two"}))
    rewrite_metadata(model, models / "deep.safetensors", lambda m: m.update(
        {META_KEY: m[META_KEY][:-1] + ', "x": ' + "[" * 50_000 + "]" * 50_000 + "}"}))
    (models / "folder.safetensors").mkdir()
    os.mkfifo(models / "stuck.safetensors")
    seg = ["segment", "--model", str(model), "--out", str(d / "out")]
    cases = [
        {"name": "tiff-bomb", "cli": seg + [str(d / "bomb.tif")]},
        {"name": "png-bomb", "cli": seg + [str(d / "bomb.png")]},
        {"name": "nifti-bomb", "cli": seg + [str(d / "bomb.nii.gz")]},
        {"name": "model-declares-1.5GB", "cli": ["segment", str(d / "img.tif"), "--model",
                                                 str(d / "declares-1.5GB.safetensors"), "--out", str(d / "o")]},
        {"name": "model-channels-4096", "cli": ["segment", str(d / "img.tif"), "--model",
                                                str(d / "channels-4096.safetensors"), "--out", str(d / "o")]},
        {"name": "evaluate-million-ids", "cli": ["evaluate", "--model", str(model), "--image", str(d / "big.tif"),
                                                 "--labels", str(d / "million.tif")]},
        {"name": "match-million-ids", "code": (
            "from napari_jointattn.engine.evaluation.metrics import match_instances\n"
            "t = np.arange(1, 10**6 + 1).reshape(1000, 1000)\n"
            "out = match_instances(np.roll(t, 1, axis=1), t)\n")},
        {"name": "overlap-0.999", "code": (
            "from napari_jointattn import BadInputError\n"
            f"try:\n    segment(np.zeros((512, 512), np.float32), {str(model)!r}, device='cpu', tile=64, overlap=0.999)\n"
            "    out = 'ran'\nexcept BadInputError as exc:\n    out = str(exc)\n")},
        {"name": "evaluate-quiet", "cli": ["evaluate", "--model", str(model), "--image", str(d / "img.tif"),
                                           "--labels", str(d / "lab.tif")]},
        {"name": "segment-quiet", "cli": ["segment", str(d / "odd.nii"), "--model", str(model), "--out",
                                          str(d / "q")]},
        # last: a regression here blocks on the FIFO
        {"name": "models", "cli": ["models"]},
        {"name": "models-json", "cli": ["models", "--json"]},
    ]
    return run_limited(cases, budget_mb=1024, timeout=240, env={"NAPARI_JOINTATTN_MODEL_DIR": str(models)})


def _record(limited, name):
    rec = limited.get(name)
    assert rec is not None, f"case {name} did not finish: {limited['__stderr__'][-1500:]}"
    assert rec["error"] is None, rec.get("traceback")
    return rec


def _one_error_line(rec):
    lines = rec["stderr"].strip().splitlines()
    assert rec["rc"] == 2 and len(lines) == 1 and lines[0].startswith("napari-jointattn: error:"), rec
    return lines[0]


@pytest.mark.parametrize("case,dims", [("tiff-bomb", "40000 x 40000"), ("png-bomb", "10000 x 10000"),
                                       ("nifti-bomb", "1000 x 1000 x 1000")])
def test_image_bombs_are_refused_before_decoding(limited, case, dims):
    rec = _record(limited, case)
    line = _one_error_line(rec)
    assert dims in line and "67,108,864" in line and "NAPARI_JOINTATTN_MAX_PIXELS" in line, line
    assert "--tile" not in line
    assert rec["seconds"] < 20


@pytest.mark.parametrize("case,says", [("model-declares-1.5GB", "do not match"),
                                       ("model-channels-4096", "config.stem_channels is out of range")])
def test_model_config_is_validated_before_allocation(limited, case, says):
    rec = _record(limited, case)
    line = _one_error_line(rec)
    assert says in line, line
    assert rec["seconds"] < 20


def test_evaluate_with_a_million_instance_ids_is_bounded(limited):
    rec = _record(limited, "evaluate-million-ids")
    assert rec["rc"] == 0, rec["stderr"]
    result = json.loads(rec["stdout"])
    assert result["instances"]["fn"] + result["instances"]["tp"] == 10**6
    tp, fp, fn = _record(limited, "match-million-ids")["out"]
    assert (tp, fp, fn) == (10**6, 0, 0)  # one-pixel objects under other ids: all matched


def test_overlap_is_bounded_with_a_message(limited):
    rec = _record(limited, "overlap-0.999")
    assert "overlap must be a number in [0, 0.9]" in rec["out"] and rec["seconds"] < 20


@pytest.mark.parametrize("case", ["evaluate-quiet", "segment-quiet"])
def test_no_library_noise_on_stderr(limited, case):
    rec = _record(limited, case)
    assert rec["rc"] == 0 and rec["stderr"] == "", rec["stderr"]


def test_models_lists_broken_and_special_files_without_blocking(limited):
    rec = _record(limited, "models")
    assert rec["rc"] == 0, rec["stderr"]
    out = rec["stdout"]
    for name, why in [("stuck", "FIFO"), ("folder", "directory"), ("deep", "nested more than")]:
        line = next(line for line in out.splitlines() if line.startswith(f"saved  {name} "))
        assert "[broken]" in line, line
        assert why in out.split(line, 1)[1].splitlines()[1], out
    assert "line one\\nline two" in out and "\nline two" not in out
    good = next(line for line in out.splitlines() if line.startswith("saved  good "))
    assert "[broken]" not in good


def test_models_json_is_strict(limited):
    rec = _record(limited, "models-json")
    assert rec["rc"] == 0, rec["stderr"]

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    rows = {r["name"]: r for r in json.loads(rec["stdout"], parse_constant=no_constants)}
    assert rows["nan-score"]["metadata"]["scores"] == {"dice": None, "hd95": None}
    assert rows["stuck"]["metadata"] is None and "FIFO" in rows["stuck"]["error"]
    assert rows["good"]["error"] is None


# ------------------------------------------------ argument checks before work
@pytest.mark.parametrize("extra,says", [
    (["--classes", "background,"], "empty name"),
    (["--classes", ",".join(f"c{i}" for i in range(256))], "2 to 255"),
    (["--seed", "-1"], "seed"),
    (["--axis", "100"], "axis 100"),
    (["--epochs", "0"], "epochs"),
    (["--val-fraction", "nan"], "validation fraction"),
    (["--max-seconds", "-5"], "max_seconds"),
], ids=["empty-class", "256-classes", "seed", "axis", "epochs", "val-fraction", "max-seconds"])
def test_train_arguments_are_checked_before_any_work(tmp_path, saved_model, capsys, monkeypatch, extra, says):
    from napari_jointattn.engine import training
    from napari_jointattn.engine.io import images as imageio

    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(imageio, "read_image", no_work)
    monkeypatch.setattr(training, "train", no_work)
    tifffile.imwrite(tmp_path / "i.tif", np.zeros((8, 8), np.float32))
    code = main(["train", "--image", str(tmp_path / "i.tif"), "--labels", str(tmp_path / "i.tif"),
                 "--from", str(saved_model), "--out", str(tmp_path / "m.safetensors"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


def test_train_api_checks_settings_and_inputs(tmp_path, tiny_model, blobs):
    from napari_jointattn.engine.training import TrainSettings, build_samples, train

    image, labels = blobs
    (tmp_path / "m.safetensors").mkdir()
    for kwargs, says in [
        ({"seed": -1}, "seed"),
        ({"crop": 64.5}, "crop"),
        ({"scale_range": (0, 1)}, "scale_range"),
        ({"lr": float("inf")}, "learning rate"),
        ({"classes": ["background", ""]}, "empty name"),
        ({"axis": 100}, "axis 100"),
        ({"out": tmp_path / "m.safetensors"}, "is a folder"),
    ]:
        with pytest.raises(BadInputError, match=says):
            train(tiny_model, [image], [labels], epochs=1, **kwargs)
    with pytest.raises(BadInputError, match="NaN or infinite"):
        build_samples(tiny_model, [image], [labels], weights=[np.full(image.shape, np.nan, np.float32)])
    with pytest.raises(BadInputError, match="not a regular array"):
        build_samples(tiny_model, [image], [labels], masks=[[[1, 0], [1]]])
    TrainSettings().validate()


def test_api_misuse_is_bad_input(tiny_model):
    import torch

    t = torch.rand(40, 48, requires_grad=True)
    assert segment(t, tiny_model, device="cpu", tile=64).labels.shape == (40, 48)
    with pytest.raises(BadInputError, match="not a regular array"):
        segment([[1.0, 2.0], [3.0]], tiny_model, device="cpu")
    with pytest.raises(BadInputError, match="overlap"):
        segment(np.zeros((40, 48)), tiny_model, device="cpu", overlap=1.0)
    with pytest.raises(BadInputError, match="overlap"):
        segment(np.zeros((40, 48)), tiny_model, device="cpu", overlap=float("nan"))


# ------------------------------------------------------------------ signals
def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path, saved_model, capsys, monkeypatch):
    """A batch scheduler's time limit (SIGTERM) mid-write: exit 143, no hidden .part file."""
    import time

    import tifffile as tf

    tf.imwrite(tmp_path / "img.tif", np.random.rand(40, 48).astype(np.float32))
    real = tf.imwrite

    def slow(path, *a, **k):
        if ".part" in str(path):
            real(path, *a, **k)  # the temporary file exists now
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("SIGTERM did not interrupt the write")
        return real(path, *a, **k)

    monkeypatch.setattr(tf, "imwrite", slow)

    class Unhandled(Exception):
        pass

    def fallback(signum, frame):  # only reached if the CLI installed no handler of its own
        raise Unhandled("SIGTERM was not handled by the command line")

    before = signal.signal(signal.SIGTERM, fallback)
    try:
        code = main(["segment", str(tmp_path / "img.tif"), "--model", str(saved_model), "--out",
                     str(tmp_path / "o")])
        assert signal.getsignal(signal.SIGTERM) is fallback  # the previous handler is back
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert code == 143 and err.strip() == "napari-jointattn: terminated (SIGTERM)", err
    assert list((tmp_path / "o").iterdir()) == []


# ------------------------------------------------- one line, valid output
def test_names_with_newlines_stay_on_one_line(tmp_path, instance_model_file, capsys):
    odd = tmp_path / "a\nb.tif"
    tifffile.imwrite(odd, np.random.rand(40, 48).astype(np.float32))
    code, out, err = _seg(["segment", odd, "--model", instance_model_file, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 and "a\\nb.tif" in out
    assert (tmp_path / "o" / "a\nb_labels.tif").exists()
    with pytest.raises(BadInputError) as info:
        segment(tmp_path / "no\nsuch.tif", instance_model_file)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x9b", "\x1b", "\udcff"])
def test_one_line_escapes_every_line_break_and_control(char):
    from napari_jointattn.engine.errors import one_line

    text = one_line(f"cell{char}[31m.tif")
    assert len(text.splitlines()) == 1 and char not in text and text.startswith("cell\\")
    text.encode("utf-8")  # printable: no lone surrogate from a name that was not UTF-8


def test_file_name_that_is_not_utf8_is_one_printable_line(tmp_path, instance_model_file, capsys):
    odd = os.path.join(os.fsencode(tmp_path), b"cell\xff.tif")
    tifffile.imwrite(tmp_path / "plain.tif", np.random.rand(40, 48).astype(np.float32))
    os.rename(tmp_path / "plain.tif", odd)
    code, out, err = _seg(["segment", os.fsdecode(odd), "--model", instance_model_file,
                           "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 and "cell\\xff" in out
    assert os.path.exists(os.path.join(os.fsencode(tmp_path), b"o", b"cell\xff_labels.tif"))


def test_longest_legal_output_name_is_written(tmp_path, instance_model_file, capsys):
    stem = "n" * (251 - len("_labels.tif"))
    tifffile.imwrite(tmp_path / f"{stem}.tif", np.random.rand(40, 48).astype(np.float32))
    code, _, err = _seg(["segment", tmp_path / f"{stem}.tif", "--model", instance_model_file, "--out",
                         tmp_path / "o"], capsys)
    assert code == 0, err
    assert [p.name for p in (tmp_path / "o").iterdir()] == [f"{stem}_labels.tif"]
    from napari_jointattn.engine.io.images import write_labels

    name = "v" * (255 - len(".nii.gz")) + ".nii.gz"  # 255 bytes: the most a file name may have
    write_labels(tmp_path / name, np.ones((4, 4, 2), np.uint8))
    assert nib.load(tmp_path / name).shape == (4, 4, 2)
    assert sorted(p.name for p in tmp_path.iterdir() if ".part" in p.name) == []


def test_scores_that_are_not_numbers_are_saved_as_null(tmp_path, tiny_model):
    import copy

    from napari_jointattn.engine.models.metadata import read_metadata

    m = copy.deepcopy(tiny_model)
    m.scores = {"dice": float("nan"), "loss": float("inf"), "ok": 0.5}
    path = save_model(m, tmp_path / "s.safetensors")
    assert read_metadata(path)["scores"] == {"dice": None, "loss": None, "ok": 0.5}
