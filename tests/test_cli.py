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


def test_segment_tiff_folder_with_attention(tmp_path, saved_model, blobs, capsys):
    """A folder of a 2-D image and a stack; the attention files themselves: test_attention_files.py."""
    image, _ = blobs
    inp = tmp_path / "in"
    inp.mkdir()
    tifffile.imwrite(inp / "a.tif", image)
    tifffile.imwrite(inp / "b.tiff", np.stack([image, image]))
    out = tmp_path / "out"
    code, stdout, err = run(["segment", inp, "--model", saved_model, "--out", out, "--attention"], capsys)
    assert code == 0, err
    assert tifffile.imread(out / "a_labels.tif").shape == image.shape
    assert tifffile.imread(out / "b_labels.tif").shape == (2, *image.shape)
    maps = [f"joint-1-{s}-{m}" for s in (8, 16, 32) for m in ("pointwise", "mix", "effect")]  # the nuclei network's
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{stem}_labels.tif" for stem in "ab"] + [f"{stem}_attention_{m}.tif" for stem in "ab" for m in maps])
    assert tifffile.imread(out / "b_attention_joint-1-8-mix.tif").shape == (2, *image.shape)
    assert stdout.count("a.tif:") == 1 and stdout.count("b.tiff:") == 1


def test_segment_nifti_keeps_geometry(tmp_path, capsys):
    from napari_jointattn.engine.models.model import new_model, save_model

    model = save_model(new_model("brain-mri", seed=0), tmp_path / "brain.safetensors")
    vol = np.random.rand(20, 24, 6).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "scan.nii.gz")
    code, _, err = run(["segment", tmp_path / "scan.nii.gz", "--model", model, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    out = nib.load(tmp_path / "o" / "scan_labels.nii.gz")
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, affine)
    from napari_jointattn import segment

    expected = segment(tmp_path / "scan.nii.gz", model, device="cpu").labels
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)  # what the API returns


def test_evaluate_prints_json(tmp_path, blobs, capsys):
    """Scored against its own segmentation a model is perfect."""
    from napari_jointattn import segment

    image, truth = blobs
    tifffile.imwrite(tmp_path / "i.tif", image)
    own = segment(tmp_path / "i.tif", "nuclei", device="cpu").labels
    assert own.max() == truth.max()  # the preset finds the six disks
    tifffile.imwrite(tmp_path / "l.tif", own)
    code, out, err = run(
        ["evaluate", "--model", "nuclei", "--image", tmp_path / "i.tif", "--labels", tmp_path / "l.tif"],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["per_class"]["nucleus"]["dice"] == 1.0 and result["mean_dice"] == 1.0
    assert result["instance_f1"] == 1.0 and result["instances"]["fp"] == result["instances"]["fn"] == 0


def _without_torch(calls: str) -> subprocess.CompletedProcess:
    """Run CLI calls in a fresh interpreter that must not import torch, MONAI or napari."""
    code = ("import sys; from napari_jointattn.cli import main; " + calls + "; "
            "heavy = [m for m in ('torch', 'monai', 'napari') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def test_help_and_version_do_not_import_torch():
    out = _without_torch("assert main(['--help']) == 0 and main(['--version']) == 0").stdout
    for cmd in ("segment", "evaluate", "train", "models"):
        assert cmd in out


def test_models_does_not_import_torch(model_dir, saved_model):
    import shutil

    shutil.copy(saved_model, model_dir / "mine.safetensors")
    (model_dir / "broken.safetensors").write_bytes(b"not a model")
    out = _without_torch("assert main(['models']) == 0 and main(['models', '--json']) == 0").stdout
    listing, _, as_json = out.partition("\n[")
    assert "preset nuclei" in listing and "saved  mine" in listing
    assert "saved  broken" in listing and "[broken]" in listing
    rows = {r["name"]: r for r in json.loads("[" + as_json)}
    assert rows["mine"]["metadata"]["parameters"] == rows["nuclei"]["metadata"]["parameters"] == 758_630
    assert rows["nuclei"]["metadata"]["provenance"]["data_statistics"]["dims"] == 2
    assert "not a valid safetensors model file" in rows["broken"]["error"]


def test_labels_are_int32_in_files_and_from_the_api(tmp_path, blobs, capsys):
    """One dtype everywhere, so napari users can paint ids above 255 into any result."""
    from napari_jointattn import segment

    image, _ = blobs
    semantic = save_model_file(tmp_path, "brain-mri")
    instances = save_model_file(tmp_path, "nuclei")
    tifffile.imwrite(tmp_path / "i.tif", image)
    nib.save(nib.Nifti1Image(np.stack([image] * 3, -1), np.eye(4)), tmp_path / "v.nii.gz")
    for model in (semantic, instances):
        assert segment(image, model, device="cpu").labels.dtype == np.int32
        out = tmp_path / model.stem
        code, _, err = run(["segment", tmp_path / "i.tif", tmp_path / "v.nii.gz", "--model", model, "--out", out],
                           capsys)
        assert code == 0, err
        assert tifffile.imread(out / "i_labels.tif").dtype == np.int32
        assert nib.load(out / "v_labels.nii.gz").get_data_dtype() == np.int32


def save_model_file(folder, preset):
    from napari_jointattn.engine.models.model import new_model, save_model

    return save_model(new_model(preset, seed=0), folder / f"{preset}.safetensors")


def test_api_names_resolve_lazily():
    import napari_jointattn

    assert napari_jointattn.segment.__module__ == "napari_jointattn.engine.inference.segment"
    assert set(napari_jointattn.__all__) <= set(dir(napari_jointattn))
    with pytest.raises(AttributeError):
        napari_jointattn.no_such_name  # noqa: B018
