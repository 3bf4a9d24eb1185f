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


@pytest.fixture
def labelling(monkeypatch):
    """Blocks segmented by thresholding and 4-connected labelling instead of the network:
    objects of known shape, so that what the joining across block edges makes is known."""
    from types import SimpleNamespace

    from skimage.measure import label

    from napari_jointattn.engine.inference import segment as inference

    def segment(region, model, **kwargs):
        return SimpleNamespace(labels=label(np.asarray(region) > 0.5, connectivity=1))

    monkeypatch.setattr(inference, "segment", segment)
    return lambda image: label(image > 0.5, connectivity=1)


def _chain_image() -> np.ndarray:
    """128 x 320 (2 x 5 blocks of 64): a snake through all ten blocks, a dot inside one block,
    two bars that cross the same edge side by side without touching."""
    img = np.zeros((128, 320), np.float32)
    img[10:20, 10:300] = 1  # along the top row of blocks
    img[10:110, 290:300] = 1  # down across the middle edge
    img[100:110, 30:300] = 1  # back along the bottom row
    img[40:50, 140:150] = 1
    img[30:95, 70:74] = 1
    img[30:95, 80:84] = 1
    return img


def _same_objects(got: np.ndarray, whole: np.ndarray) -> bool:
    """The same pixels, split into the same objects (ids may differ)."""
    if not np.array_equal(got > 0, whole > 0):
        return False
    fg = got > 0
    pairs = np.unique(np.stack([got[fg], whole[fg]]), axis=1).shape[1]
    return pairs == len(np.unique(got[fg])) == len(np.unique(whole[fg]))


def test_objects_chained_across_many_blocks_become_one_object_each(labelling, tmp_path):
    img = _chain_image()
    report = segment_zarr(img, tmp_path / "out.zarr", "nuclei", block=64, halo=16)
    assert report.complete and report.blocks == 10 and report.joined >= 10
    got = zarr.open_array(str(tmp_path / "out.zarr" / "0"), mode="r")[:]
    whole = labelling(img)
    assert whole.max() == 4
    assert _same_objects(got, whole)
    snake = np.unique(got[10:20, 10:300])
    assert len(snake) == 1 and snake[0] == got[105, 40] == got[60, 295]


def test_store_attributes_read_back_with_ome_zarr(labelling, tmp_path):
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    from napari_jointattn.engine.models.model import new_model
    from napari_jointattn.model import DenseUNetConfig

    img = _chain_image()[None]  # one plane of a z stack
    segment_zarr(img, tmp_path / "nuclei.zarr", "nuclei", block=64)
    tiny = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1),
                           decoder_channels=(8, 8, 8), head_channels=4, attention_dim=8,
                           attention_levels=(1,))
    semantic = new_model(config=tiny, classes=["background", "cell", "membrane"])
    segment_zarr(img, tmp_path / "classes.zarr", semantic, block=64)
    for name in ("nuclei", "classes"):
        node = next(iter(Reader(parse_url(str(tmp_path / f"{name}.zarr")))()))
        assert node.first(Multiscales) is not None and node.first(Label) is not None
        assert [d.shape for d in node.data] == [img.shape]
        assert [ax["name"] for ax in node.metadata["axes"]] == ["z", "y", "x"]
        scale = [{"type": "scale", "scale": [1.0] * 3}]
        assert node.metadata["coordinateTransformations"] == [scale]
    attrs = zarr.open_group(str(tmp_path / "classes.zarr"), mode="r").attrs
    assert attrs["image-label"] == {"version": "0.4", "properties": [
        {"label-value": 1, "class": "cell"}, {"label-value": 2, "class": "membrane"}]}
    instances = zarr.open_group(str(tmp_path / "nuclei.zarr"), mode="r").attrs["image-label"]
    assert instances == {"version": "0.4"}


def test_axes_without_types_are_kept_and_impossible_axes_are_one_line_errors(labelling, tmp_path):
    img = _chain_image()
    group = zarr.open_group(str(tmp_path / "untyped.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=img.shape, chunks=(64, 64), dtype=img.dtype)[:] = img
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y"}, {"name": "x"}],
                                   "datasets": [{"path": "0"}]}]
    report = segment_zarr(tmp_path / "untyped.zarr", tmp_path / "out.zarr", "nuclei", block=64)
    assert report.complete
    axes = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["multiscales"][0]["axes"]
    assert axes == [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    with pytest.raises(BadInputError, match="2 to 5 axes"):
        segment_zarr(np.zeros((1,) * 4 + (64, 64), np.float32), tmp_path / "6d.zarr", "nuclei")
    assert not (tmp_path / "6d.zarr").exists()


def test_two_runs_on_one_scheduler_write_their_own_stores(labelling, tmp_path):
    """Stores of the same name in two folders, segmented at the same time on one scheduler."""
    import threading

    distributed = pytest.importorskip("distributed")
    images = {"a": _chain_image()[:, :256], "b": _chain_image()[::-1, 64:]}
    for run, img in images.items():
        (tmp_path / run).mkdir()
        zarr.open_array(str(tmp_path / run / "img.zarr"), mode="w", shape=img.shape,
                        chunks=(64, 64), dtype=img.dtype, zarr_format=2)[:] = img
    # each run waits at its first block for the other's: both runs' blocks are on the scheduler
    # at once
    met = threading.Barrier(2, timeout=120)
    reports, errors = {}, []

    def run(name, client):
        first = []

        def on_block(done, total):
            if not first:
                first.append(done)
                met.wait()

        try:
            reports[name] = segment_zarr(tmp_path / name / "img.zarr", tmp_path / name / "out.zarr",
                                         "nuclei", block=64, client=client, on_block=on_block)
        except Exception as exc:  # noqa: BLE001 - reported below, with the other run's outcome
            errors.append(exc)

    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        threads = [threading.Thread(target=run, args=(name, client)) for name in images]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for name, img in images.items():
        report = reports[name]
        assert report.complete and report.done == report.blocks == 8 and not report.failed
        got = zarr.open_array(str(tmp_path / name / "out.zarr" / "0"), mode="r")[:]
        assert _same_objects(got, labelling(img)), name
