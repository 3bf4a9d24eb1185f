"""The command line: outputs, geometry, and one-line errors with status 2."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_jointattn.cli import main


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-jointattn: error:"), err
    assert "Traceback" not in err


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "napari_jointattn.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("segment", "evaluate", "models"):
        assert cmd in out


def test_segment_tiff_folder_with_attention(tmp_path, saved_model, blobs, capsys):
    image, _ = blobs
    inp = tmp_path / "in"
    inp.mkdir()
    tifffile.imwrite(inp / "a.tif", image)
    tifffile.imwrite(inp / "b.tiff", np.stack([image, image]))
    out = tmp_path / "out"
    code, stdout, err = run(["segment", inp, "--model", saved_model, "--out", out, "--attention"], capsys)
    assert code == 0, err
    a = tifffile.imread(out / "a_labels.tif")
    assert a.shape == image.shape
    assert tifffile.imread(out / "b_labels.tif").shape == (2, *image.shape)
    maps = tifffile.imread(out / "a_attention_joint-1-8.tif")
    assert maps.shape == (2, *image.shape)  # pointwise + mix
    with tifffile.TiffFile(out / "a_attention_joint-1-8.tif") as t:
        assert json.loads(t.pages[0].description)["maps"] == ["pointwise", "mix"]
    assert "a.tif" in stdout and "b.tiff" in stdout
    assert not [p for p in out.iterdir() if ".part" in p.name]


def test_segment_nifti_keeps_geometry(tmp_path, capsys):
    from napari_jointattn.engine.models import new_model, save_model

    model = save_model(new_model("brain-mri", seed=0), tmp_path / "brain.safetensors")
    vol = np.random.rand(20, 24, 6).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "scan.nii.gz")
    code, _, err = run(["segment", tmp_path / "scan.nii.gz", "--model", model, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    out = nib.load(tmp_path / "o" / "scan_labels.nii.gz")
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, affine)
    assert np.asarray(out.dataobj).max() <= 2


def test_evaluate_prints_json(tmp_path, saved_model, blobs, capsys):
    image, labels = blobs
    tifffile.imwrite(tmp_path / "i.tif", image)
    tifffile.imwrite(tmp_path / "l.tif", labels)
    code, out, err = run(
        ["evaluate", "--model", saved_model, "--image", tmp_path / "i.tif", "--labels", tmp_path / "l.tif"],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    assert "instance_f1" in result and "nucleus" in result["per_class"]


def test_models_lists_presets_and_saved(model_dir, saved_model, capsys):
    import shutil

    shutil.copy(saved_model, model_dir / "mine.safetensors")
    code, out, _ = run(["models"], capsys)
    assert code == 0
    assert "nuclei" in out and "brain-mri" in out and "mine" in out
    code, out, _ = run(["models", "--json"], capsys)
    names = [r["name"] for r in json.loads(out)]
    assert "mine" in names


@pytest.mark.parametrize(
    "make,args",
    [
        (lambda p: None, ["segment", "{p}/missing.tif", "--model", "{m}", "--out", "{p}/o"]),
        (lambda p: (p / "empty").mkdir(), ["segment", "{p}/empty", "--model", "{m}", "--out", "{p}/o"]),
        (lambda p: (p / "z.tif").write_bytes(b""), ["segment", "{p}/z.tif", "--model", "{m}", "--out", "{p}/o"]),
        (lambda p: (p / "t.tif").write_text("hello"), ["segment", "{p}/t.tif", "--model", "{m}", "--out", "{p}/o"]),
        (lambda p: tifffile.imwrite(p / "n.tif", np.full((8, 8), np.nan, np.float32)),
         ["segment", "{p}/n.tif", "--model", "{m}", "--out", "{p}/o"]),
        (lambda p: tifffile.imwrite(p / "ok.tif", np.zeros((8, 8), np.float32)),
         ["segment", "{p}/ok.tif", "--model", "nope", "--out", "{p}/o"]),
        (lambda p: tifffile.imwrite(p / "ok.tif", np.zeros((8, 8), np.float32)),
         ["segment", "{p}/ok.tif", "--model", "../x", "--out", "{p}/o"]),
        (lambda p: tifffile.imwrite(p / "ok.tif", np.zeros((8, 8), np.float32)),
         ["segment", "{p}/ok.tif", "--model", "{m}", "--out", "{p}/o", "--device", "tpu"]),
        (lambda p: None, ["segment", "--out", "{p}/o"]),
        (lambda p: None, ["evaluate", "--image", "{p}/a.tif"]),
    ],
    ids=["missing", "empty-dir", "zero-byte", "text-as-tif", "all-nan", "unknown-model",
         "model-path-separators", "bad-device", "no-input", "missing-labels-arg"],
)
def test_bad_input_exits_2_with_one_line(tmp_path, saved_model, capsys, make, args):
    make(tmp_path)
    args = [a.format(p=tmp_path, m=saved_model) for a in args]
    code, _, err = run(args, capsys) if args[0] else (None, None, None)
    assert_bad(code, err)
    out = tmp_path / "o"
    assert not out.exists() or not [p for p in out.iterdir() if p.is_file()]


def test_labels_of_another_shape(tmp_path, saved_model, blobs, capsys):
    image, labels = blobs
    tifffile.imwrite(tmp_path / "i.tif", image)
    tifffile.imwrite(tmp_path / "l.tif", labels[:50])
    code, _, err = run(["evaluate", "--model", saved_model, "--image", tmp_path / "i.tif",
                        "--labels", tmp_path / "l.tif"], capsys)
    assert_bad(code, err)
    assert "shape" in err


def test_cuda_requested_without_cuda(tmp_path, saved_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((8, 8), np.float32))
    code, _, err = run(["segment", tmp_path / "ok.tif", "--model", saved_model, "--out", tmp_path / "o",
                        "--device", "cuda"], capsys)
    assert_bad(code, err)
    assert "CUDA" in err


def test_help_and_version_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from napari_jointattn.cli import main; "
            "assert main(['--help']) == 0 and main(['--version']) == 0; "
            "heavy = [m for m in ('torch', 'monai', 'napari') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "segment" in done.stdout


def test_api_names_resolve_lazily():
    import napari_jointattn

    assert napari_jointattn.segment.__module__ == "napari_jointattn.engine.inference"
    assert set(napari_jointattn.__all__) <= set(dir(napari_jointattn))
    import pytest as _pytest

    with _pytest.raises(AttributeError):
        napari_jointattn.no_such_name  # noqa: B018
