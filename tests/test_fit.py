"""Models say what they were trained on; images that do not fit get warnings; the preset that fits."""

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_jointattn.cli import main
from napari_jointattn.engine.io.images import read_image
from napari_jointattn.engine.models.fit import check_fit, data_statistics, layout, suggest_model
from napari_jointattn.engine.models.model import load_model, new_model, save_model
from napari_jointattn.model import DenseUNetConfig

SAMPLES = Path(__file__).resolve().parent.parent / "src" / "napari_jointattn" / "samples"
MNI = SAMPLES / "mni152_t1_2mm.nii.gz"
DSB = SAMPLES / "nuclei_dsb2018.tif"
TINY = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                       head_channels=4, attention_dim=8, attention_levels=(1,))


@pytest.fixture(scope="module")
def presets():
    return {name: load_model(name) for name in ("nuclei", "brain-mri")}


def test_data_statistics_of_known_images():
    ramp = np.arange(10_000, dtype=np.uint16).reshape(100, 100)
    stats = data_statistics([ramp], modality="test pattern")
    assert stats == {"modality": "test pattern", "dims": 2, "channels": 1, "dtype": "uint16",
                     "intensity": {"p1": 99.99, "p50": 4999.5, "p99": 9899.01},
                     "images": 1, "sampled_pixels": 10_000}
    rgb = np.zeros((40, 50, 3), np.uint8)
    volume = np.zeros((6, 40, 50), np.float32)
    both = data_statistics([rgb, volume, volume])
    assert (both["dims"], both["channels"], both["dtype"], both["images"]) == (3, 1, "float32", 3)
    assert data_statistics([volume], dims=2)["dims"] == 2  # a z-stack used as 2-D images
    nan = np.full((8, 8), np.nan, np.float32)
    assert "intensity" not in data_statistics([nan])
    # deterministic, and a bounded sample of a large image
    big = np.random.default_rng(0).random((3000, 3000)).astype(np.float32)
    first, again = data_statistics([big]), data_statistics([big])
    assert first == again and first["sampled_pixels"] <= 1 << 22


def test_layout_follows_the_channel_rule_and_file_headers():
    assert layout(np.zeros((40, 50, 3)))[1:] == (2, 3)
    assert layout(np.zeros((40, 50, 5)))[1:] == (3, 1)
    assert layout(np.zeros((2, 40, 50)), channel_axis=0)[1:] == (2, 2)
    assert layout(read_image(MNI))[1:] == (3, 1)
    assert layout(MNI)[1:] == (3, 1)


def test_mri_volume_given_to_the_nuclei_model_warns(presets):
    warnings = check_fit(presets["nuclei"], read_image(MNI))
    assert len(warnings) == 2, warnings
    assert "trained on 2-D images (fluorescence microscopy); this image is a 3-D volume" in warnings[0]
    assert "background level is 0% of its bright level, 15%" in warnings[1]
    # a model name or file works as well as a loaded model
    assert check_fit("nuclei", MNI) == warnings


def test_images_like_the_training_data_do_not_warn(presets):
    assert check_fit(presets["nuclei"], read_image(DSB)) == []
    assert check_fit(presets["brain-mri"], read_image(MNI)) == []


def test_the_2d_image_given_to_the_brain_model_warns(presets):
    warnings = check_fit(presets["brain-mri"], read_image(DSB))
    assert warnings[0].split(";")[0] == "model 'brain-mri' was trained on 3-D volumes (MRI (T1-weighted))"
    assert "this image is a single 2-D image" in warnings[0] and len(warnings) == 2


@pytest.mark.parametrize("image,says", [
    (np.dstack([tifffile.imread(DSB)] * 3), "trained on 1-channel images; this image has 3 channels (their mean is used)"),
    (tifffile.imread(DSB).max() - tifffile.imread(DSB).astype(np.float32), "median intensity lies at 85% of its range"),
    (tifffile.imread(DSB) / 65535.0 / 1000, "intensity range is 9.02e-11x that of the training data"),
    (tifffile.imread(DSB).astype(np.float32) - 100, "has negative intensities"),
    (np.full((64, 64), 3.0), "nearly) constant"),
], ids=["rgb", "inverted", "range", "negative", "constant"])
def test_intensity_and_channel_warnings(presets, image, says):
    warnings = check_fit(presets["nuclei"], image)
    assert any(says in w for w in warnings), warnings


def test_a_model_without_statistics_has_no_opinion():
    model = new_model(config=TINY, classes=["background", "object"], seed=0)
    assert model.trained_on is None and check_fit(model, np.zeros((4, 5, 6))) == []


def test_suggest_model():
    assert suggest_model(read_image(MNI)) == "brain-mri"
    assert suggest_model(np.asarray(nib.load(MNI).dataobj)) == "brain-mri"  # a 3-D T1 array alone
    assert suggest_model(tifffile.imread(DSB), path="cells.tif") == "nuclei"
    assert suggest_model(DSB) == "nuclei"
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    assert suggest_model(rgb) is None


def test_training_records_its_data_statistics(tmp_path):
    from napari_jointattn.engine.training import train

    rng = np.random.default_rng(0)
    image = (rng.random((48, 48)) * 1000).astype(np.uint16)
    labels = (image > 500).astype(np.uint8)
    model = new_model(config=TINY, classes=["background", "object"], seed=0)
    result = train(model, [image], [labels], epochs=1, steps_per_epoch=2, batch_size=2, crop=32,
                   out=tmp_path / "m.safetensors")
    expected = data_statistics([image])
    assert result.model.provenance["data_statistics"] == expected
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.trained_on.dtype == "uint16" and loaded.trained_on.intensity.p50 == expected["intensity"]["p50"]


@pytest.fixture
def nuclei_like(tmp_path, presets):
    """A tiny, fast model that records the nuclei preset's training statistics."""
    model = new_model(config=TINY, classes=["background", "nucleus"], name="tiny-nuclei", seed=0)
    model.provenance = {"data_statistics": copy.deepcopy(presets["nuclei"].provenance["data_statistics"])}
    return save_model(model, tmp_path / "tiny-nuclei.safetensors")


def test_cli_segment_and_evaluate_print_fit_warnings(tmp_path, nuclei_like, capsys):
    vol = np.zeros((24, 24, 6), np.float32)
    vol[6:18, 6:18] = np.linspace(100, 900, 6)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image((vol > 0).astype(np.uint8), np.eye(4)), tmp_path / "truth.nii.gz")
    code = main(["segment", str(tmp_path / "scan.nii.gz"), "--model", str(nuclei_like), "--out",
                 str(tmp_path / "o"), "--tile", "64"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("napari-jointattn: warning: scan.nii.gz: ") for line in lines), err
    assert "this image is a 3-D volume" in lines[0]
    assert (tmp_path / "o" / "scan_labels.nii.gz").exists()  # warnings never stop the work
    code = main(["evaluate", "--model", str(nuclei_like), "--image", str(tmp_path / "scan.nii.gz"),
                 "--labels", str(tmp_path / "truth.nii.gz"), "--tile", "64"])
    out, err = capsys.readouterr()
    assert code == 0 and "this image is a 3-D volume" in err and out.startswith("{")
    # an image like the training data: no warning at all
    tifffile.imwrite(tmp_path / "cells.tif", tifffile.imread(DSB)[:96, :96])
    code = main(["segment", str(tmp_path / "cells.tif"), "--model", str(nuclei_like), "--out", str(tmp_path / "o")])
    assert code == 0 and capsys.readouterr().err == ""


def test_cli_names_the_preset_that_fits(tmp_path, capsys):
    """A brain volume given to the default nuclei model: the warnings end with the preset to use."""
    vol = np.asarray(nib.load(MNI).dataobj, np.float32)[:, :, 40:44]  # four whole axial slices
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "t1.nii.gz")
    code = main(["segment", str(tmp_path / "t1.nii.gz"), "--out", str(tmp_path / "o"), "--tile", "64"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.strip().splitlines()[-1] == (
        "napari-jointattn: warning: t1.nii.gz: preset 'brain-mri' fits this image (--model brain-mri)")
    code = main(["segment", str(tmp_path / "t1.nii.gz"), "--model", "brain-mri", "--out", str(tmp_path / "p"),
                 "--tile", "64"])
    assert code == 0 and "fits this image" not in capsys.readouterr().err
