"""Thin structures: the network works on enlarged planes, and segmenting does the same."""

import numpy as np
import pytest
import torch

from napari_jointattn import segment
from napari_jointattn.engine.inference.query import AttentionQuery
from napari_jointattn.engine.inference.segment import count_windows, predict_slice
from napari_jointattn.engine.models.model import load_model, new_model, save_model
from napari_jointattn.engine.training import build_samples, train
from napari_jointattn.engine.training.start import THIN_PIXELS, structure_width

FAST = dict(epochs=2, steps_per_epoch=3, batch_size=2, crop=64, device="cpu")


def thin_lines(width=2, shape=(80, 96)):
    rng = np.random.default_rng(0)
    labels = np.zeros(shape, np.int32)
    for r in (15, 40, 65):
        labels[r : r + width, 10:-10] = 1
    image = labels * 150.0 + rng.normal(30, 5, shape)
    return image.astype(np.float32), labels


@pytest.mark.parametrize("width", [2, 3, 5, 9])
def test_structure_width_measures_bands(width):
    image, labels = thin_lines(width)
    samples, _ = build_samples(new_model("nuclei"), [image], [labels])
    assert structure_width(samples) == pytest.approx(width, abs=0.6)


def test_thin_structures_are_learnt_at_twice_the_size_and_segmented_so(tmp_path):
    image, labels = thin_lines(2)
    result = train("nuclei", [image], [labels], classes=["background", "line"], seed=0, **FAST)
    model = result.model
    note = model.provenance["training"]["upsample"]
    assert model.normalization.upsample == 2 and note.startswith("2:") and f"{THIN_PIXELS:g}" in note
    saved = load_model(save_model(model, tmp_path / "thin.safetensors"))
    assert saved.normalization.upsample == 2
    seg = segment(image, saved, device="cpu")
    assert seg.labels.shape == image.shape
    # the network ran on the enlarged plane: its output is the block average of that run
    x = np.random.default_rng(1).random((1, 40, 52)).astype(np.float32)
    once = predict_slice(saved, x, torch.device("cpu"))
    big = predict_slice(saved, saved.normalization.enlarge(x), torch.device("cpu"), upsample=1)
    assert once.shape == (2, 40, 52)
    assert torch.allclose(once, torch.nn.functional.avg_pool2d(big[None], 2)[0], atol=1e-6)
    assert not torch.allclose(once, predict_slice(saved, x, torch.device("cpu"), upsample=1), atol=1e-3)


def test_thick_structures_keep_the_start_scale(blobs):
    image, labels = blobs  # disks 17 px across
    model = train("nuclei", [image], [labels], seed=0, **FAST).model
    assert model.normalization.upsample == 1
    assert model.provenance["training"]["upsample"].startswith("1:")
    forced = train("nuclei", [image], [labels], seed=0, upsample=3, **FAST).model
    assert forced.normalization.upsample == 3 or not forced.provenance["training"]["improved"]


def test_a_start_model_handed_back_keeps_its_scale():
    image, labels = thin_lines(2)
    result = train("nuclei", [image], [labels], classes=["background", "line"], seed=0,
                   epochs=1, steps_per_epoch=1, batch_size=1, crop=64, lr=1e-9, device="cpu", head="keep")
    if not result.improved:  # the start model comes back as it was, at its own scale
        assert result.model.normalization.upsample == 1


def test_bad_upsample_setting_is_refused(blobs):
    from napari_jointattn import BadInputError

    image, labels = blobs
    with pytest.raises(BadInputError, match="upsample"):
        train("nuclei", [image], [labels], upsample=5, **FAST)


def test_progress_and_query_account_for_the_enlargement(blobs):
    image, _ = blobs
    model = new_model("nuclei", seed=0)
    model.normalization = model.normalization.replace(upsample=2)
    seen = []
    seg = segment(image, model, device="cpu", tile=64, callback=lambda i: seen.append((i["done"], i["total"])))
    assert seg.labels.shape == image.shape
    assert seen[-1][0] == seen[-1][1] == count_windows((image.shape[0] * 2, image.shape[1] * 2), 64, 0.25)
    square = image[:64, :64]  # enlarged to 128 x 128: a whole number of cells at every stride
    res = AttentionQuery(model, square, tile=512).query((40, 50))
    assert res.heatmap.shape == square.shape
    assert res.heatmap.sum() == pytest.approx(1.0, abs=1e-3)  # one attention row, spread over the pixels
