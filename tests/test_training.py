"""Training: annotated regions only, leak-free splits, determinism, stopping, head re-use."""

import numpy as np
import pytest
import tifffile
import torch

from napari_jointattn import BadInputError, load_model
from napari_jointattn.engine.models.model import new_model, save_model
from napari_jointattn.engine.training import (
    GAP_PIXELS,
    GAP_SLICES,
    build_samples,
    start_model,
    train,
)

FAST = dict(epochs=2, steps_per_epoch=3, batch_size=2, crop=64, device="cpu")


def test_unannotated_slices_are_ignored(blobs):
    image, labels = blobs
    model = new_model("nuclei")
    stack = np.stack([image, image, image])
    lab = np.stack([labels, np.zeros_like(labels), labels])
    samples, summary = build_samples(model, [stack], [lab])
    assert sorted(s.index for s in samples) == [0, 2]
    # taken as background, slice 1 would add its disks' pixels to the background count
    fg = int((labels > 0).sum())
    assert summary["pixels_per_class"] == {"background": 2 * (labels.size - fg), "nucleus": 2 * fg}


def test_explicit_mask_limits_the_teaching_pixels(blobs):
    image, labels = blobs
    mask = np.zeros(labels.shape, bool)
    mask[:48] = True
    _, summary = build_samples(new_model("nuclei"), [image], [labels], masks=[mask])
    assert summary["annotated_pixels"] == mask.sum()


def test_split_by_image_slices_and_columns(blobs):
    image, labels = blobs
    model = new_model("nuclei")
    samples, summary = build_samples(model, [image, image, image], [labels] * 3, val_fraction=0.34)
    assert summary["split"].startswith("by image")
    for s in samples:
        assert not (s.train_mask.any() and s.val_mask.any())  # never both in one image

    stack = np.stack([image] * 12)
    samples, summary = build_samples(model, [stack], [np.stack([labels] * 12)], val_fraction=0.25)
    train_z = [s.index for s in samples if s.train_mask.any()]
    val_z = [s.index for s in samples if s.val_mask.any()]
    assert min(val_z) - max(train_z) > GAP_SLICES  # no neighbouring slices across the split

    samples, summary = build_samples(model, [image], [labels], val_fraction=0.25)
    s = samples[0]
    cols_train = np.nonzero(s.train_mask.any(0))[0]
    cols_val = np.nonzero(s.val_mask.any(0))[0]
    assert cols_val.min() - cols_train.max() > GAP_PIXELS


@pytest.mark.parametrize(
    "labels_fn,match",
    [
        (lambda l: np.zeros_like(l), "no annotated pixels"),
        (lambda l: l[:50], "have shape"),
    ],
)
def test_bad_training_data(blobs, labels_fn, match):
    image, labels = blobs
    with pytest.raises(BadInputError, match=match):
        build_samples(new_model("nuclei"), [image], [labels_fn(labels)])


def test_single_class_only_is_rejected(blobs):
    image, labels = blobs
    mask = np.ones(labels.shape, bool)
    with pytest.raises(BadInputError, match="no foreground"):
        build_samples(new_model("nuclei"), [image], [np.zeros_like(labels)], masks=[mask])


def test_deterministic_on_cpu(blobs):
    image, labels = blobs
    a = train(new_model("nuclei", seed=0), [image], [labels], seed=5, **FAST).model
    b = train(new_model("nuclei", seed=0), [image], [labels], seed=5, **FAST).model
    for (k, x), y in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(x, y), k


def test_loss_decreases_and_model_learns(blobs):
    image, labels = blobs
    result = train(new_model("nuclei", seed=0), [image], [labels], seed=0, epochs=6,
                   steps_per_epoch=8, batch_size=4, crop=64, lr=3e-3, device="cpu", patience=10)
    losses = [h["loss"] for h in result.history[1:]]
    assert losses[-1] < losses[0]
    assert result.best_dice > result.history[0]["val_dice"]
    # what each attention module changes on the validation pixels is recorded with the model
    knock = result.model.provenance["training"]["knockout"]
    assert set(knock["modules"]) == {"joint 1/8", "joint 1/16", "joint 1/32", "all"}
    th = result.model.provenance["training"]["threshold"]  # scored as segment() decides: at the threshold
    expected = th["val_dice_at_threshold"] if th else result.best_dice
    assert knock["dice"] == pytest.approx(expected, abs=1e-3)
    for row in knock["modules"].values():
        assert row["dice_change"] == pytest.approx(row["dice"] - knock["dice"], abs=1e-5)


def test_stop_keeps_best_and_writes_a_complete_file(blobs, tmp_path):
    image, labels = blobs
    seen = []

    def stop_after_first_epoch(info):
        seen.append(info)
        return not info.get("epoch_end")

    out = tmp_path / "m.safetensors"
    result = train("nuclei", [image], [labels], out=out, callback=stop_after_first_epoch,
                   epochs=5, steps_per_epoch=3, batch_size=2, crop=64, device="cpu")
    assert result.stopped == "stopped"
    assert [h["epoch"] for h in result.history if h.get("epoch_end")] == [1]
    assert max(h["epoch"] for h in result.history) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    back = load_model(out)
    assert back.provenance["training"]["stopped"] == "stopped"
    assert back.provenance["data"]["annotated_pixels"] == labels.size


def test_crash_leaves_no_file(blobs, tmp_path):
    image, labels = blobs

    def boom(info):
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train("nuclei", [image], [labels], out=tmp_path / "m.safetensors", callback=boom, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_time_budget(blobs):
    image, labels = blobs
    result = train("nuclei", [image], [labels], epochs=1000, steps_per_epoch=5, batch_size=2,
                   crop=64, max_seconds=3, patience=1, device="cpu")
    # the whole budget is used: patience does not cut a time-budgeted run short
    assert result.stopped == "time budget" and result.seconds >= 3
    # it stops soon after: within a step and a validation pass, generous for a busy machine
    assert result.seconds < 3 + 60


def test_other_classes_keep_encoder_and_reinit_head(tmp_path):
    base = new_model("brain-mri", seed=0)
    path = save_model(base, tmp_path / "brain.safetensors")
    model = start_model(path, classes=["background", "tumour"])
    assert model.num_classes == 2 and model.classes == ["background", "tumour"]
    old, new = base.net.state_dict(), model.net.state_dict()
    assert torch.equal(old["blocks.0.0.body.2.weight"], new["blocks.0.0.body.2.weight"])
    assert new["classifier.weight"].shape[0] == 2 != old["classifier.weight"].shape[0]


def test_weight_map_changes_training(blobs):
    image, labels = blobs
    w = np.ones(labels.shape, np.float32)
    w[labels > 0] = 10.0
    a = train(new_model("nuclei", seed=0), [image], [labels], seed=1, **FAST).model
    b = train(new_model("nuclei", seed=0), [image], [labels], weights=[w], seed=1, **FAST).model
    assert not torch.equal(a.net.classifier.weight, b.net.classifier.weight)


def test_cli_train(tmp_path, blobs, capsys):
    from napari_jointattn.cli import main

    image, labels = blobs
    tifffile.imwrite(tmp_path / "i.tif", image)
    tifffile.imwrite(tmp_path / "l.tif", labels)
    code = main(["train", "--image", str(tmp_path / "i.tif"), "--labels", str(tmp_path / "l.tif"),
                 "--from", "nuclei", "--out", str(tmp_path / "new.safetensors"), "--epochs", "1",
                 "--device", "cpu", "--seed", "3", "--batch-size", "4",
                 "--checkpoint", str(tmp_path / "run.ckpt")])
    out, err = capsys.readouterr()
    assert code == 0, err
    model = load_model(tmp_path / "new.safetensors")
    assert model.provenance["parent"] == "nuclei" and model.provenance["settings"]["seed"] == 3
    assert model.provenance["settings"]["batch_size"] == 4
    assert not (tmp_path / "run.ckpt").exists()  # removed once training finished
    code = main(["train", "--image", str(tmp_path / "i.tif"), "--labels", str(tmp_path / "l.tif"),
                 "--out", str(tmp_path / "y.safetensors"), "--checkpoint", str(tmp_path / "no" / "c")])
    assert code == 2 and "--checkpoint" in capsys.readouterr().err
    code = main(["train", "--image", str(tmp_path / "i.tif"), "--labels", str(tmp_path / "l.tif"),
                 "--out", str(tmp_path / "x.pt")])
    assert code == 2 and "safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("ema", [0.0, 0.9], ids=["raw weights", "weight average"])
def test_checkpoint_resume_equals_uninterrupted_run(blobs, tmp_path, ema):
    image, labels = blobs
    settings = dict(epochs=4, steps_per_epoch=2, batch_size=2, crop=64, device="cpu", seed=2, patience=10, ema=ema)
    straight_run = train(new_model("nuclei", seed=0), [image], [labels], **settings)
    straight = straight_run.model
    straight_history = [{k: v for k, v in h.items() if k != "seconds"} for h in straight_run.history]
    ck = tmp_path / "run.ckpt.safetensors"

    def crash_after_epoch_2(info):
        if info.get("epoch_end") and info["epoch"] == 2:
            raise KeyboardInterrupt  # the process dies here

    with pytest.raises(KeyboardInterrupt):
        train(new_model("nuclei", seed=0), [image], [labels], checkpoint=ck,
              callback=crash_after_epoch_2, **settings)
    assert ck.exists()
    epochs_seen = []
    resumed = train(new_model("nuclei", seed=0), [image], [labels], checkpoint=ck,
                    callback=lambda i: epochs_seen.append(i["epoch"]), **settings)
    assert min(epochs_seen) == 3  # epochs 1-2 were not repeated
    assert [h["epoch"] for h in resumed.history if h.get("epoch_end")] == [1, 2, 3, 4] and not ck.exists()
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == straight_history
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.model.net.state_dict().values()):
        assert torch.equal(a, b), k
    # a checkpoint of another run is refused, not silently mixed in
    with pytest.raises(KeyboardInterrupt):
        train(new_model("nuclei", seed=0), [image], [labels], checkpoint=ck,
              callback=crash_after_epoch_2, **settings)
    with pytest.raises(BadInputError, match="other data or settings"):
        train(new_model("nuclei", seed=0), [image], [labels], checkpoint=ck, **{**settings, "lr": 1e-4})


def test_the_weight_average_is_what_validation_scores_and_training_keeps(blobs):
    from napari_jointattn.engine.training.ema import WeightAverage

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.GroupNorm(1, 2))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    avg = WeightAverage(net, 0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    avg.update(step=100)  # past the warm-up: decay 0.9
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with avg.applied():
        for k, v in net.state_dict().items():
            assert torch.allclose(v, start[k] + 0.1), k  # 0.9 * start + 0.1 * (start + 1)
    for k, v in net.state_dict().items():
        assert torch.equal(v, raw[k]), k  # the raw weights are back
    avg.update(step=0)  # the warm-up follows the first steps closely: decay 1/10
    with avg.applied():
        w = net[0].weight.clone()
    assert torch.allclose(w, 0.1 * (start["0.weight"] + 0.1) + 0.9 * (start["0.weight"] + 1))
    off = WeightAverage(net, 0.0)
    off.update(step=5)
    with off.applied():
        assert torch.equal(net[0].weight, raw["0.weight"])  # off: the raw weights are scored
    assert off.tensors() == {}

    image, labels = blobs
    settings = dict(epochs=2, steps_per_epoch=3, batch_size=2, crop=64, device="cpu", seed=1, patience=10)
    plain = train(new_model("nuclei", seed=0), [image], [labels], **settings)
    averaged = train(new_model("nuclei", seed=0), [image], [labels], ema=0.5, **settings)
    assert averaged.improved and averaged.best_step > 0
    # the same steps (the average does not touch the optimiser), other weights scored and kept
    assert [h["step"] for h in averaged.history] == [h["step"] for h in plain.history]
    assert averaged.history[1]["val_dice"] != plain.history[1]["val_dice"]
    assert averaged.model.provenance["settings"]["ema"] == 0.5
    with pytest.raises(BadInputError, match="ema"):
        train(new_model("nuclei", seed=0), [image], [labels], ema=1.0, **settings)
