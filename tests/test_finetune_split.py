"""Fine-tuning never fails silently: splits that always measure something, no silent start model.

The degenerate cases a user hits with a few annotated slices: one object, an
object only on one side of the default split, two slices, one image, a
class on a handful of pixels.
"""

import json

import numpy as np
import pytest

from napari_jointattn.cli import main
from napari_jointattn.engine.models.model import load_model, new_model
from napari_jointattn.engine.training import CropCentres, build_samples, train, validation_dice
from napari_jointattn.engine.training.split import GAP_PIXELS, GAP_SLICES, MIN_GAP_PIXELS

FAST = dict(epochs=2, steps_per_epoch=3, batch_size=2, crop=64, device="cpu")


def disk_image(centres, radius=6, shape=(96, 120), value=1):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for cy, cx in centres:
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = value
    image = (labels > 0) * 200.0 + np.random.default_rng(0).normal(20, 5, shape)
    return image.astype(np.float32), labels


def sides(samples, k=2):
    """Foreground classes on the training and on the validation side."""
    def found(attr):
        return {int(c) for s in samples for c in np.unique(s.target[getattr(s, attr)]) if 0 < c < k}
    return found("train_mask"), found("val_mask")


def no_overlap(samples):
    return all(not (s.train_mask & s.val_mask).any() for s in samples)


def column_gap(s) -> int:
    """Smallest distance in columns between a training and a validation pixel in one plane."""
    tc, vc = np.nonzero(s.train_mask.any(0))[0], np.nonzero(s.val_mask.any(0))[0]
    return int(np.abs(tc[:, None] - vc[None, :]).min())


def test_single_object_is_split_through_itself():
    image, labels = disk_image([(48, 40)], radius=12)  # one object, left of the default cut
    samples, summary = build_samples(new_model("nuclei"), [image], [labels])
    assert sides(samples) == ({1}, {1})
    assert no_overlap(samples) and summary["split_kind"] == "strip"
    assert "through the annotated objects" in summary["split"]
    assert summary["warnings"] == []
    # the two sides never touch: at least the minimum margin between them
    s = samples[0]
    ys_t, xs_t = np.nonzero(s.train_mask & (s.target == 1))
    ys_v, xs_v = np.nonzero(s.val_mask & (s.target == 1))
    d = np.abs(xs_t[:, None] - xs_v[None, :]).min() if "columns" in summary["split"] else \
        np.abs(ys_t[:, None] - ys_v[None, :]).min()
    assert d > MIN_GAP_PIXELS


def test_objects_only_on_one_side_of_the_default_split():
    # every object in the left half: the right-hand 20 % holds none
    image, labels = disk_image([(20, 20), (50, 30), (75, 50), (30, 60)])
    samples, summary = build_samples(new_model("nuclei"), [image], [labels])
    assert sides(samples) == ({1}, {1})
    assert no_overlap(samples) and not summary["split"].startswith("by columns: the right")


def test_default_column_split_is_kept_when_it_measures(blobs):
    image, labels = blobs
    samples, summary = build_samples(new_model("nuclei"), [image], [labels], val_fraction=0.25)
    assert summary["split"].startswith("by columns: the right 25%")
    assert column_gap(samples[0]) > 16


def test_two_annotated_slices_far_apart_split_by_slice():
    image, labels = disk_image([(30, 30), (60, 80)])
    stack, lab = np.stack([image] * 9), np.zeros((9,) + labels.shape, np.int32)
    lab[1], lab[7] = labels, labels
    samples, summary = build_samples(new_model("nuclei"), [stack], [lab])
    assert summary["split_kind"] == "slices"
    train_z = [s.index for s in samples if s.train_mask.any()]
    val_z = [s.index for s in samples if s.val_mask.any()]
    assert train_z == [1] and val_z == [7] and val_z[0] - train_z[0] > GAP_SLICES


def test_three_annotated_slices_validate_on_the_middle_one():
    # the first and the last annotated slices train, so that the slices beyond them are
    # predicted from an annotated neighbour, not extrapolated from the slices in the middle
    image, labels = disk_image([(30, 30), (60, 80)])
    stack, lab = np.stack([image] * 20), np.zeros((20,) + labels.shape, np.int32)
    for z in (3, 9, 16):
        lab[z] = labels
    samples, summary = build_samples(new_model("nuclei"), [stack], [lab])
    assert summary["split_kind"] == "slices" and "slice 9" in summary["split"]
    assert [s.index for s in samples if s.train_mask.any()] == [3, 16]
    # too close to a neighbour for the gap: the middle one cannot be held out, an end slice is
    lab[:] = 0
    for z in (3, 5, 16):
        lab[z] = labels
    samples, summary = build_samples(new_model("nuclei"), [stack], [lab])
    assert [s.index for s in samples if s.val_mask.any()] == [16]


def test_two_neighbouring_slices_fall_back_to_a_strip():
    # slices 3 and 4 are neighbours: no slice split leaves a gap, so each plane is split in space
    image, labels = disk_image([(48, 90)], radius=10)
    stack, lab = np.stack([image] * 8), np.zeros((8,) + labels.shape, np.int32)
    lab[3], lab[4] = labels, labels
    samples, summary = build_samples(new_model("nuclei"), [stack], [lab])
    assert summary["split_kind"] == "strip" and sides(samples) == ({1}, {1})
    assert no_overlap(samples)


def three_slices_two_objects():
    """A stack with two objects on each of three annotated slices (like the two lateral ventricles);
    on the last slice the left one is bigger than 20 % of all the annotated foreground."""
    image, labels = disk_image([(48, 35), (48, 85)], radius=8)
    last = disk_image([(48, 35)], radius=10)[1] | disk_image([(48, 85)], radius=6)[1]
    stack, lab = np.stack([image] * 12), np.zeros((12,) + labels.shape, np.int32)
    lab[2], lab[6], lab[10] = labels, labels, last
    return stack, lab


def test_objects_split_holds_out_whole_objects_and_keeps_every_slice_training():
    from scipy import ndimage as ndi

    stack, lab = three_slices_two_objects()
    samples, summary = build_samples(new_model("nuclei"), [stack], [lab], split="objects")
    assert summary["split_kind"] == "objects" and no_overlap(samples)
    # every annotated slice still trains on foreground: none is lost to validation
    assert sorted(s.index for s in samples if (s.train_mask & (s.target == 1)).any()) == [2, 6, 10]
    val = [s for s in samples if s.val_mask.any()]
    assert [s.index for s in val] == [10]  # the largest object of the last slice covers 20 % of the class
    s = val[0]
    held = s.val_mask & (s.target == 1)
    comp, n = ndi.label(s.target == 1)
    assert n == 2 and np.array_equal(held, comp == comp[48, 35])  # a whole object, not a part of one
    assert (s.val_mask & (s.target == 0)).sum() > 10 * held.sum()  # its surroundings, to count false positives
    # a band along the border between the two cells is used by neither side
    free_val = s.val_mask & (s.target == 0)
    free_train = s.train_mask & (s.target == 0)
    d = ndi.distance_transform_edt(~free_train)
    assert d[free_val].min() > GAP_PIXELS - 1


def test_objects_split_needs_a_second_object_on_a_slice():
    image, labels = disk_image([(48, 60)], radius=10)  # one object per slice: nothing whole to hold out
    stack, lab = np.stack([image] * 8), np.zeros((8,) + labels.shape, np.int32)
    lab[1], lab[6] = labels, labels
    samples, summary = build_samples(new_model("nuclei"), [stack], [lab], split="objects")
    assert summary["split_kind"] == "training" and "optimistic" in summary["warnings"][0]
    with pytest.raises(Exception, match="split must be one of"):
        train("nuclei", [stack], [lab], split="halves", **FAST)


def test_images_split_keeps_every_class_on_both_sides():
    model = new_model("brain-mri")  # 3 classes
    a_img, a = disk_image([(30, 30), (60, 80)], value=1)
    b_img, b = disk_image([(30, 30), (60, 80)], value=2)
    c_img, c = disk_image([(30, 60)], value=1)
    # the last image (the default validation image) lacks class 2; another choice of images has both
    samples, summary = build_samples(model, [a_img, b_img, c_img, b_img], [a, b, c, b], val_fraction=0.5)
    tr, va = sides(samples, 3)
    assert tr == va == {1, 2} and summary["split_kind"] == "images"


def test_a_class_on_a_few_pixels_falls_back_with_a_named_warning():
    image, labels = disk_image([])
    labels[40, 40] = 1  # a single pixel: nothing can be held out of it
    samples, summary = build_samples(new_model("nuclei"), [image], [labels])
    assert summary["split_kind"] == "training"
    assert summary["warnings"] and "optimistic" in summary["warnings"][0]
    assert sides(samples) == ({1}, {1})


def test_validation_without_foreground_is_not_scored_as_zero(blobs):
    image, labels = blobs
    model = new_model("nuclei", seed=0)
    samples, _ = build_samples(model, [image], [labels])
    for s in samples:
        s.val_mask &= s.target == 0  # only background left to validate on
    assert np.isnan(validation_dice(model, samples, __import__("torch").device("cpu")))


def test_validation_runs_within_epochs(blobs):
    image, labels = blobs
    seen = []
    train("nuclei", [image], [labels], callback=seen.append, epochs=1, steps_per_epoch=8, batch_size=2,
          crop=64, device="cpu")
    checks = [(i["step"], bool(i.get("epoch_end"))) for i in seen if i["val_dice"] is not None]
    assert checks == [(0, False), (2, False), (4, False), (6, False), (8, True)]  # 0: the start model
    assert seen[0]["epoch"] == 0 and seen[0]["loss"] is None


def test_first_step_is_warmed_up(blobs):
    image, labels = blobs
    seen = []
    train("nuclei", [image], [labels], callback=seen.append, lr=1e-3, **{**FAST, "epochs": 10})
    lrs = [i["lr"] for i in seen if i["val_dice"] is None]
    assert lrs[0] == pytest.approx(1e-3 / 20, rel=0.01)  # step 1 of a 20-step warm-up
    assert lrs[1] > lrs[0]


def test_training_does_not_change_the_callers_settings(blobs):
    from napari_jointattn.engine.training import TrainSettings

    image, labels = blobs
    settings = TrainSettings(epochs=1, steps_per_epoch=2, batch_size=2, crop=64, device="cpu")
    train("nuclei", [image], [labels], settings=settings, lr=1e-4)
    assert settings.lr == TrainSettings().lr


def test_class_balanced_crops_find_a_small_structure():
    image, labels = disk_image([(48, 60)], radius=4, shape=(256, 256))  # 0.08 % of the image
    samples, _ = build_samples(new_model("nuclei"), [image], [labels], val_fraction=0.2)
    rng = np.random.default_rng(0)
    hits = {}
    for mode in ("classes", "annotated"):
        centres = CropCentres(samples, mode)
        draws = [centres.draw(rng) for _ in range(2000)]
        hits[mode] = np.mean([s.target[y, x] == 1 for s, y, x in draws])
        assert all(s.train_mask[y, x] for s, y, x in draws)  # centres are training pixels only
    assert 0.45 < hits["classes"] < 0.55
    assert hits["annotated"] < 0.01


def test_head_is_reset_when_the_start_model_does_not_find_the_structure(blobs):
    image, labels = blobs
    kept = train("nuclei", [image], [labels], **FAST).model.provenance["training"]["head"]
    inverted = train("nuclei", [image.max() - image], [labels], **FAST).model.provenance["training"]["head"]
    assert kept.startswith("kept")  # bright nuclei: the preset already finds them
    assert inverted.startswith("re-initialised")  # dark holes: the preset's 'nucleus' is the wrong thing
    forced = train("nuclei", [image], [labels], head="keep", **FAST).model.provenance["training"]["head"]
    assert forced.startswith("kept")


def test_start_model_is_never_returned_as_trained_without_a_warning(blobs, tmp_path):
    image, labels = blobs
    out = tmp_path / "m.safetensors"
    # a learning rate too small to change a single weight: nothing can beat the start model
    result = train("nuclei", [image], [labels], out=out, lr=1e-30, **FAST)
    assert not result.improved and result.best_step == 0
    assert any(w.startswith("no improvement over the start model") for w in result.warnings)
    meta = load_model(out).provenance["training"]
    assert meta["improved"] is False and any("no improvement" in w for w in meta["warnings"])
    # the dock's way: nothing saved at all
    out2 = tmp_path / "m2.safetensors"
    result = train("nuclei", [image], [labels], out=out2, lr=1e-30, save_unchanged=False, **FAST)
    assert result.path is None and not out2.exists()
    # a run that learns is marked improved, with no such warning
    random_start = new_model("nuclei", seed=0)
    result = train(random_start, [image], [labels], epochs=3, steps_per_epoch=6, batch_size=4, crop=64,
                   device="cpu")
    assert result.improved and not any("no improvement" in w for w in result.warnings)


def test_cli_prints_a_warning_when_nothing_improved(blobs, tmp_path, capsys):
    import tifffile

    image, labels = blobs
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels.astype(np.uint16))
    out = tmp_path / "m.safetensors"
    code = main(["train", "--image", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"),
                 "--out", str(out), "--epochs", "1", "--max-seconds", "2", "--lr", "1e-30", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("napari-jointattn: warning:")]
    assert len(warnings) == 1 and "no improvement over the start model" in warnings[0]
    assert json.loads(json.dumps(load_model(out).provenance["training"]))["improved"] is False


def test_threshold_is_calibrated_on_the_validation_pixels(monkeypatch):
    import torch

    from napari_jointattn.engine.inference import segment as inference
    from napari_jointattn.engine.training import calibrate_threshold

    image, labels = disk_image([(48, 100)], radius=10)
    model = new_model("nuclei", seed=0)
    samples, _ = build_samples(model, [image], [labels])
    truth = labels > 0
    from scipy import ndimage as ndi

    rim = ndi.binary_dilation(truth, iterations=2) & ~truth
    p1 = np.where(truth, 0.99, np.where(rim, 0.7, 0.01)).astype(np.float32)  # a confident one-pixel-wide rim

    def fake_predict(model_, x, device, tile=512, **kw):
        # the validation crop: find where it sits by matching the sample's image
        s = samples[0]
        ys, xs = np.nonzero(s.val_mask)
        crop = p1[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
        return torch.from_numpy(np.stack([1 - crop, crop]))

    monkeypatch.setattr(inference, "predict_slice", fake_predict)
    th, at_half, at_th = calibrate_threshold(model, samples, torch.device("cpu"))
    assert th == 0.7 and at_th == 1.0 and at_half < 0.9  # the rim is cut off


def test_training_records_the_threshold_it_chose(blobs):
    image, labels = blobs
    result = train(new_model("nuclei", seed=0), [image], [labels], epochs=2, steps_per_epoch=6,
                   batch_size=4, crop=64, device="cpu")
    note = result.model.provenance["training"]["threshold"]
    assert result.improved and note is not None
    assert result.model.postprocess["threshold"] == note["threshold"]
    assert note["val_dice_at_threshold"] >= note["val_dice_at_0.5"]
    off = train(new_model("nuclei", seed=0), [image], [labels], epochs=2, steps_per_epoch=6, batch_size=4,
                crop=64, device="cpu", calibrate_threshold=False)
    assert "threshold" not in off.model.postprocess and off.model.provenance["training"]["threshold"] is None


def test_cli_split_option_reaches_the_split(tmp_path, capsys):
    import tifffile

    stack, lab = three_slices_two_objects()
    tifffile.imwrite(tmp_path / "img.tif", stack)
    tifffile.imwrite(tmp_path / "lab.tif", lab.astype(np.uint16))
    out = tmp_path / "m.safetensors"
    base = ["train", "--image", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"), "--axis", "0",
            "--epochs", "1", "--max-seconds", "1", "--device", "cpu", "--batch-size", "2"]
    assert main([*base, "--out", str(out), "--split", "objects"]) == 0
    assert load_model(out).provenance["data"]["split"].startswith("by objects: 1 whole objects on slice 10")
    assert main([*base, "--out", str(tmp_path / "auto.safetensors")]) == 0  # auto: the middle slice
    assert load_model(tmp_path / "auto.safetensors").provenance["data"]["split"].startswith(
        "by slices: 1 of 3 annotated slices (slice 6)")
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "x.safetensors"), "--split", "halves"]) == 2
    assert "invalid choice" in capsys.readouterr().err
