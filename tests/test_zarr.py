"""Zarr / OME-Zarr images segmented block by block: agreement with the whole image, cancel and resume."""

import numpy as np
import pytest

from napari_jointattn.engine.errors import BadInputError
from napari_jointattn.engine.scale.zarrseg import MARKERS, segment_zarr, store_state

zarr = pytest.importorskip("zarr")


def _nuclei_mosaic(h=300, w=260):
    from pathlib import Path

    import tifffile

    import napari_jointattn

    img = tifffile.imread(Path(napari_jointattn.__file__).with_name("samples") / "nuclei_dsb2018.tif")
    return np.ascontiguousarray(img[100:100 + h, 50:50 + w])


@pytest.fixture
def zimage(tmp_path):
    img = _nuclei_mosaic()
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=img.shape, chunks=(100, 100), dtype=img.dtype)[:] = img
    group.create_array("1", shape=(150, 130), chunks=(100, 100), dtype=img.dtype)[:] = img[::2, ::2]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y", "type": "space"},
                                                              {"name": "x", "type": "space"}],
                                   "datasets": [{"path": "0"}, {"path": "1"}]}]
    return tmp_path / "img.zarr", img


def test_blocks_agree_with_the_whole_image_and_objects_are_joined(zimage, tmp_path):
    from napari_jointattn.engine.inference.segment import segment

    src, img = zimage
    report = segment_zarr(src, tmp_path / "out.zarr", "nuclei", block=128)
    assert report.complete and report.blocks == 9 and report.joined > 0
    labels = zarr.open_array(str(tmp_path / "out.zarr" / "0"), mode="r")
    assert labels.chunks == (128, 128) and labels.dtype == np.uint32
    got = labels[:]
    whole = segment(img, "nuclei", value_range=report_range(tmp_path / "out.zarr")).labels
    assert ((got > 0) == (whole > 0)).mean() > 0.99
    # every object of the whole-image result that crosses a block edge is one object in the blocks
    n_whole, n_blocks = len(np.unique(whole)) - 1, len(np.unique(got)) - 1
    assert abs(n_blocks - n_whole) <= max(2, n_whole // 20), (n_blocks, n_whole)
    state = store_state(tmp_path / "out.zarr")
    assert state["complete"] is True and state["classes"] == ["background", "nucleus"]
    assert not (tmp_path / "out.zarr" / MARKERS).exists()
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert group.attrs["multiscales"][0]["datasets"][0]["path"] == "0"


def report_range(dst):
    return tuple(store_state(dst)["value_range"])


def test_cancel_leaves_an_incomplete_store_and_a_rerun_resumes_it(zimage, tmp_path):
    src, _ = zimage
    segment_zarr(src, tmp_path / "full.zarr", "nuclei", block=128)
    stop_after = []

    def on_block(done, total):
        stop_after.append(done)
        return done < 4

    cut = segment_zarr(src, tmp_path / "cut.zarr", "nuclei", block=128, on_block=on_block)
    assert not cut.complete and cut.done == 4
    assert store_state(tmp_path / "cut.zarr")["complete"] is False
    assert len(list((tmp_path / "cut.zarr" / MARKERS).iterdir())) == 4
    with pytest.raises(BadInputError, match="another run"):
        segment_zarr(src, tmp_path / "cut.zarr", "nuclei", block=256)
    resumed = segment_zarr(src, tmp_path / "cut.zarr", "nuclei", block=128)
    assert resumed.complete and resumed.done_before == 4 and resumed.done == 5
    a = zarr.open_array(str(tmp_path / "full.zarr" / "0"), mode="r")[:]
    b = zarr.open_array(str(tmp_path / "cut.zarr" / "0"), mode="r")[:]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(BadInputError, match="is complete"):
        segment_zarr(src, tmp_path / "cut.zarr", "nuclei", block=128)


def test_bad_zarr_inputs_are_one_line_errors(tmp_path):
    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(BadInputError, match="multiscales"):
        segment_zarr(tmp_path / "plain.zarr", tmp_path / "o.zarr", "nuclei")
    rgb = zarr.open_group(str(tmp_path / "rgb.zarr"), mode="w", zarr_format=2)
    rgb.create_array("0", shape=(3, 64, 64), chunks=(1, 64, 64), dtype=np.uint8)
    rgb.attrs["multiscales"] = [{"axes": [{"name": "c", "type": "channel"}, {"name": "y"}, {"name": "x"}],
                                 "datasets": [{"path": "0"}]}]
    with pytest.raises(BadInputError, match="channels"):
        segment_zarr(tmp_path / "rgb.zarr", tmp_path / "o.zarr", "nuclei")
    (tmp_path / "mine.zarr").mkdir()
    (tmp_path / "mine.zarr" / "keep.txt").write_text("x")
    src = zarr.open_array(str(tmp_path / "s.zarr"), mode="w", shape=(64, 64), dtype=np.uint8)
    src[:] = 1
    with pytest.raises(BadInputError, match="not written by"):
        segment_zarr(tmp_path / "s.zarr", tmp_path / "mine.zarr", "nuclei")
    assert (tmp_path / "mine.zarr" / "keep.txt").read_text() == "x"
    del group


def test_cli_segments_a_zarr_folder_entry(zimage, tmp_path, capsys):
    from napari_jointattn.cli import main

    src, _ = zimage
    assert main(["segment", str(src), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "img.zarr" in out and "store complete" in out
    assert store_state(tmp_path / "o" / "img_labels.zarr")["complete"] is True
    assert main(["segment", str(src), "--out", str(tmp_path / "o")]) == 0
    assert "is complete" in capsys.readouterr().err


def test_ome_zarr_output_names(tmp_path):
    from pathlib import Path

    from napari_jointattn.engine.scale.batch import output_paths

    assert output_paths(Path("/d/plate.ome.zarr"), tmp_path) == [tmp_path / "plate_labels.zarr"]
    assert output_paths(Path("/d/scan.zarr/"), tmp_path) == [tmp_path / "scan_labels.zarr"]
