"""The command line: outputs, geometry, and one-line errors with status 2."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_jointattn.cli import main
from napari_jointattn.engine.models.model import load_model, save_model


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


def _train_args(tmp_path, blobs, saved_model, *extra):
    image, labels = blobs
    tifffile.imwrite(tmp_path / "i.tif", image)
    tifffile.imwrite(tmp_path / "l.tif", labels)
    return ["train", "--image", str(tmp_path / "i.tif"), "--labels", str(tmp_path / "l.tif"),
            "--from", str(saved_model), "--epochs", "1", "--device", "cpu", *map(str, extra)]


def test_train_never_replaces_or_deletes_a_model_it_was_not_told_to(tmp_path, blobs, saved_model,
                                                                    capsys, monkeypatch):
    from napari_jointattn.engine import training

    def no_work(*a, **k):
        raise AssertionError("training started although the output files were refused")

    out = tmp_path / "m.safetensors"
    out.write_bytes(b"a model that took an hour")
    monkeypatch.setattr(training, "train", no_work)
    assert main(_train_args(tmp_path, blobs, saved_model, "--out", out)) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"a model that took an hour"
    # the same file as checkpoint and output: the checkpoint is removed at the end, and the model with it
    (tmp_path / "link.safetensors").symlink_to(out)
    for checkpoint in (out, tmp_path / "link.safetensors", tmp_path / "." / "m.safetensors"):
        assert main(_train_args(tmp_path, blobs, saved_model, "--out", out, "--overwrite",
                                "--checkpoint", checkpoint)) == 2
        err = capsys.readouterr().err
        assert "same file" in err and len(err.strip().splitlines()) == 1, err
    fifo = tmp_path / "ckpt.fifo"
    os.mkfifo(fifo)  # opening it would block the run forever
    assert main(_train_args(tmp_path, blobs, saved_model, "--out", tmp_path / "new.safetensors",
                            "--checkpoint", fifo)) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert out.read_bytes() == b"a model that took an hour"


def test_train_overwrite_replaces_and_records_its_own_save_time(tmp_path, blobs, saved_model, capsys):
    import datetime as dt

    from napari_jointattn.engine.models.metadata import read_metadata

    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    parent = read_metadata(saved_model)["provenance"]
    code = main(_train_args(tmp_path, blobs, saved_model, "--out", out, "--overwrite"))
    assert code == 0, capsys.readouterr().err
    saved = read_metadata(out)["provenance"]["saved"]
    age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(saved)
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=5), (saved, parent.get("saved"))


def test_a_saved_copy_never_keeps_its_parents_save_time(tmp_path, saved_model):
    from napari_jointattn.engine.models.metadata import read_metadata

    model = load_model(saved_model)
    model.provenance = {**model.provenance, "saved": "2000-01-01T00:00:00+00:00", "code_version": "0.0.1"}
    save_model(model, tmp_path / "copy.safetensors")
    prov = read_metadata(tmp_path / "copy.safetensors")["provenance"]
    assert not prov["saved"].startswith("2000") and prov["code_version"] != "0.0.1"


def test_every_option_has_help(capsys):
    import argparse

    from napari_jointattn.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in commands.choices.items() for action in sub._actions
               if action.help is None]
    assert missing == []


def test_export_creates_the_folder_of_its_output(tmp_path, saved_model, capsys):
    out = tmp_path / "new" / "deeper" / "m.pt"
    code = main(["export", str(saved_model), "--format", "torchscript", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and out.with_name("m.pt.json").is_file()


def test_models_columns_hold_long_names(model_dir, saved_model, capsys):
    import shutil

    shutil.copy(saved_model, model_dir / ("a-very-long-model-name-" * 3 + ".safetensors"))
    shutil.copy(saved_model, model_dir / "short.safetensors")
    assert main(["models"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "classes:" in line]
    assert len({line.index("classes:") for line in rows}) == 1, rows


def test_what_a_run_found_is_counted_and_spelt_right():
    from napari_jointattn.engine.scale.batch import describe_found

    one = np.zeros((4, 4), np.int32)
    one[0, 0] = 7
    assert describe_found(one, instances=True) == "1 object"
    assert describe_found(np.arange(16).reshape(4, 4), instances=True) == "15 objects"
    assert describe_found(np.ones((4, 4), np.uint8), instances=False) == "1 foreground class"
    assert describe_found(np.array([[0, 1], [2, 2]]), instances=False) == "2 foreground classes"
    assert describe_found(np.zeros((4, 4), np.uint8), instances=False) == "0 foreground classes"
