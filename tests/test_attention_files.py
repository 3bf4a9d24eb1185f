"""``segment --attention``: one file per attention map, with the input's shape and geometry."""

import json

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_jointattn.cli import main
from napari_jointattn.engine.models.model import new_model, save_model
from napari_jointattn.model import DenseUNetConfig

#: one joint module (1/16): three maps, pointwise, mix and the effect
SMALL = DenseUNetConfig(attention_levels=(2,))
MAPS = {"pointwise": "joint-1-16-pointwise", "mix": "joint-1-16-mix", "effect": "joint-1-16-effect"}


@pytest.fixture
def small_model(tmp_path):
    import torch

    model = new_model("nuclei", config=SMALL, seed=0)
    with torch.no_grad():
        for module in model.net.attention.values():
            module.gamma.fill_(0.3)  # a module that changes its input: its effect map is not 0
    return save_model(model, tmp_path / "small.safetensors")


def _segment(path, model, out, capsys) -> list[str]:
    """``segment --attention`` on one file; the names of the files written."""
    code = main(["segment", str(path), "--model", str(model), "--out", str(out), "--attention", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    return sorted(p.name for p in out.iterdir())


def _volume(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32) * 100


def test_tiff_stack_gives_one_tiff_per_map_with_the_stack_shape(tmp_path, small_model, capsys):
    stack = _volume((5, 40, 48))  # not 3: tifffile would store (3, h, w) as planar RGB
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    out = tmp_path / "out"
    names = _segment(tmp_path / "stack.tif", small_model, out, capsys)
    assert names == sorted(["stack_labels.tif"] + [f"stack_attention_{m}.tif" for m in MAPS.values()])
    for map_name, slug in MAPS.items():
        path = out / f"stack_attention_{slug}.tif"
        data = tifffile.imread(path)
        assert data.shape == stack.shape and data.dtype == np.float32
        if map_name == "effect":  # |change| / |input|: positive where the module acts
            assert (data > 0).all()
        else:
            assert ((data > 0) & (data < 1)).all()  # sigmoid maps
        with tifffile.TiffFile(path) as tif:
            assert json.loads(tif.pages[0].description)["attention"] == f"joint 1/16 {map_name}"
    # each slice's map is that slice's: slices differ
    pw = tifffile.imread(out / "stack_attention_joint-1-16-pointwise.tif")
    assert not np.allclose(pw[0], pw[1])


def test_nifti_gives_one_nifti_per_map_with_the_affine(tmp_path, small_model, capsys):
    vol = _volume((40, 36, 4))
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-12, 7, 30]
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    names = _segment(tmp_path / "scan.nii.gz", small_model, out, capsys)
    assert names == sorted(["scan_labels.nii.gz"] + [f"scan_attention_{m}.nii.gz" for m in MAPS.values()])
    labels = nib.load(out / "scan_labels.nii.gz")
    for slug in MAPS.values():
        img = nib.load(out / f"scan_attention_{slug}.nii.gz")
        data = np.asarray(img.dataobj)
        assert data.shape == vol.shape == labels.shape and data.dtype == np.float32
        np.testing.assert_allclose(img.affine, affine)
        # sliced along the axial axis (2): each axial slice has its own map
        assert not np.allclose(data[..., 0], data[..., 1])


def test_attention_maps_in_files_equal_the_api_maps(tmp_path, small_model, capsys):
    from napari_jointattn import load_model, segment

    stack = _volume((2, 40, 48), seed=1)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    out = tmp_path / "out"
    _segment(tmp_path / "s.tif", small_model, out, capsys)
    api = segment(stack, load_model(small_model), device="cpu", attention=True)
    for key in api.attention_keys.values():
        path = out / f"s_attention_{key.name.replace(' ', '-').replace('/', '-')}.tif"
        np.testing.assert_array_equal(tifffile.imread(path), api.attention[key.name])


def test_plan_names_nifti_attention_outputs_like_the_files_written(tmp_path):
    """A NIfTI input's attention maps are written as .nii.gz: the plan names them so, and a
    later run over the folder recognises them as outputs, not images."""
    from pathlib import Path

    from napari_jointattn.engine.scale.batch import is_output_name, output_paths

    paths = output_paths(Path("brain.nii.gz"), tmp_path, ["joint 1/8"])
    assert [p.name for p in paths] == ["brain_labels.nii.gz", "brain_attention_joint-1-8.nii.gz"]
    assert is_output_name("brain_attention_joint-1-8.nii.gz") and is_output_name("cells_attention_joint-1-8.tif")
    assert not is_output_name("brain.nii.gz")
