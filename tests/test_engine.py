"""Engine: reading/writing, normalisation, segmentation, model files, metrics."""

import json

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from _helpers import rewrite_metadata, simulate_cuda_oom

from napari_jointattn import BadInputError, Cancelled, evaluate, load_model, segment
from napari_jointattn.engine.evaluation.metrics import confusion, match_instances, overlap_scores
from napari_jointattn.engine.inference.postprocess import split_instances
from napari_jointattn.engine.inference.segment import count_windows, prepare_channels
from napari_jointattn.engine.io import images as imageio
from napari_jointattn.engine.io.normalize import normalize
from napari_jointattn.engine.labels import to_classes
from napari_jointattn.engine.models.metadata import read_metadata
from napari_jointattn.engine.models.model import META_KEY, new_model, resolve_model, save_model
from napari_jointattn.model import AttentionKey


# ------------------------------------------------------------------ reading
def test_tiff_stack_rgb_and_multichannel(tmp_path):
    stack = np.random.rand(5, 40, 50).astype(np.float32)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    img = imageio.read_image(tmp_path / "stack.tif")
    assert img.data.shape == (5, 40, 50) and img.channel_axis is None

    rgb = (np.random.rand(40, 50, 3) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    img = imageio.read_image(tmp_path / "rgb.tif")
    assert img.spatial_shape == (40, 50) and img.channel_axis == 2

    mc = np.random.rand(3, 40, 50).astype(np.float32)
    tifffile.imwrite(tmp_path / "mc.tif", mc, metadata={"axes": "CYX"})
    img = imageio.read_image(tmp_path / "mc.tif")
    assert img.spatial_shape == (40, 50) and img.data.shape[-1] == 3


def test_png_drops_alpha(tmp_path):
    import imageio.v3 as iio

    rgba = (np.random.rand(30, 20, 4) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "a.png", rgba)
    img = imageio.read_image(tmp_path / "a.png")
    assert img.data.shape == (30, 20, 3) and img.channel_axis == 2


def test_nifti_keeps_affine_header_and_stem(tmp_path):
    vol = np.random.rand(12, 14, 10).astype(np.float32)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10, 5, 7]
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "scan.nii.gz")
    img = imageio.read_image(tmp_path / "scan.nii.gz")
    assert img.stem == "scan" and img.default_axis == 2
    labels = (vol > 0.5).astype(np.uint8)
    out = imageio.write_labels(tmp_path / "scan_labels.nii.gz", labels, like=img)
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    np.testing.assert_allclose(back.affine, affine)
    assert list(tmp_path.iterdir()) and not [p for p in tmp_path.iterdir() if ".part" in p.name]


def test_nifti_axial_axis_follows_orientation(tmp_path):
    # axes permuted: voxel axis 0 runs superior-inferior
    affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine), tmp_path / "s.nii")
    assert imageio.read_image(tmp_path / "s.nii").default_axis == 0


@pytest.mark.parametrize(
    "content,match",
    [(b"", "empty file"), (b"this is text, not a TIFF", "cannot read"), (b"II*\x00\x08\x00", "cannot read")],
)
def test_bad_tiff_files(tmp_path, content, match):
    p = tmp_path / "bad.tif"
    p.write_bytes(content)
    with pytest.raises(BadInputError, match=match):
        imageio.read_image(p)


def test_truncated_nifti(tmp_path):
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    data = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="cannot read t.nii.gz"):
        imageio.read_image(tmp_path / "t.nii.gz")


def test_wrong_dimensionality(tmp_path):
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((3, 4, 20, 20), np.float32), metadata={"axes": "TZYX"})
    with pytest.raises(BadInputError, match="4 spatial dimensions"):
        imageio.read_image(tmp_path / "4d.tif")


def test_list_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="contains no supported images"):
        imageio.list_inputs([tmp_path / "empty"])
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((4, 4), np.uint8))
    (tmp_path / "notes.txt").write_text("x")
    assert imageio.list_inputs([tmp_path]) == [tmp_path / "b.tif"]
    with pytest.raises(BadInputError, match="no such file"):
        imageio.list_inputs([tmp_path / "missing.tif"])


# ----------------------------------------------------------- normalisation
def test_normalize_percentiles_and_nan():
    x = np.arange(1000, dtype=np.float32)
    out, bad = normalize(x, percentiles=(0, 100))
    assert bad is None and out.min() == 0 and out.max() == pytest.approx(1)
    # a shifted and scaled copy normalises to the same values
    out2, _ = normalize(x * 7 + 300, percentiles=(0, 100))
    np.testing.assert_allclose(out, out2, atol=1e-5)
    y = x.copy()
    y[:10] = np.nan
    with pytest.warns(UserWarning, match="10 NaN/infinite pixels"):
        out, bad = normalize(y)
    assert bad.sum() == 10 and np.isfinite(out).all()
    with pytest.raises(BadInputError, match="no finite pixel"):
        normalize(np.full(10, np.nan))
    const, _ = normalize(np.full((5, 5), 3.0))
    assert (const == 0).all()


# --------------------------------------------------------------- channels
def test_prepare_channels_rules():
    assert prepare_channels(np.zeros((10, 12)), 1).shape == (10, 12, 1)
    assert prepare_channels(np.zeros((10, 12, 3)), 1).shape == (10, 12, 1)  # RGB -> mean
    assert prepare_channels(np.zeros((5, 10, 12)), 1).shape == (5, 10, 12, 1)  # stack
    assert prepare_channels(np.zeros((2, 10, 12)), 2).shape == (10, 12, 2)  # channel first
    assert prepare_channels(np.zeros((10, 3, 12)), 1, channel_axis=1).shape == (10, 12, 1)
    rgba = np.zeros((10, 12, 4))
    rgba[..., 3] = 255  # alpha ignored
    assert prepare_channels(rgba, 1).max() == 0
    with pytest.raises(BadInputError, match="needs 3 channels, the image has 2"):
        prepare_channels(np.zeros((10, 12, 2)), 3, channel_axis=2)
    with pytest.raises(BadInputError, match="4 spatial dimensions"):
        prepare_channels(np.zeros((2, 3, 10, 12)), 1)


# ------------------------------------------------------------ segmentation
def test_segment_shapes_dtypes_and_tiling_consistency(blobs):
    from napari_jointattn.model import DenseUNetConfig

    image, _ = blobs
    # a purely local network (no attention, BatchNorm in eval mode is a fixed
    # affine map): tiles may differ from the whole image only at their borders,
    # which the Gaussian blending down-weights
    cfg = DenseUNetConfig(attention="none", norm="batch")
    model = new_model("nuclei", config=cfg, seed=1)
    model.postprocess = {"instances": False}
    big = segment(image, model, device="cpu", tile=512)
    tiled = segment(image, model, device="cpu", tile=64, overlap=0.5)
    assert big.labels.shape == image.shape == tiled.labels.shape
    assert big.labels.dtype == np.int32 and big.device == "cpu"
    assert count_windows(image.shape, 64, 0.5) > 1
    agree = (big.labels == tiled.labels).mean()
    assert agree > 0.95


def test_segment_stack_axis_and_slices():
    model = new_model("brain-mri", seed=0)
    vol = np.random.rand(6, 40, 48).astype(np.float32)
    full = segment(vol, model, axis=2)
    assert full.labels.shape == vol.shape and full.slices == list(range(48))
    part = segment(vol, model, axis=0, slices=[2])
    assert part.slices == [2]
    assert (np.delete(part.labels, 2, axis=0) == 0).all()
    with pytest.raises(BadInputError, match="slice indices"):
        segment(vol, model, slices=[6])


def test_segment_nan_pixels_are_background_and_all_nan_is_bad(blobs):
    image, _ = blobs
    model = new_model("nuclei", seed=0)
    with torch.no_grad():  # make the model call everything foreground
        model.net.classifier.bias.copy_(torch.tensor([-50.0, 50.0]))
    img = image.copy()
    img[:10, :10] = np.nan
    res = segment(img, model)
    assert (res.labels[:10, :10] == 0).all() and (res.labels[20:, 20:] > 0).all()
    assert any("NaN" in n for n in res.notes)
    with pytest.raises(BadInputError, match="no finite pixel"):
        segment(np.full((20, 20), np.nan), model)


def test_segment_attention_maps(blobs):
    image, _ = blobs
    res = segment(image, new_model("nuclei", seed=0), attention=True)
    assert set(res.attention) == {
        f"joint 1/{s} {m}" for s in (8, 16, 32) for m in ("pointwise", "mix", "effect")
    }
    for m in res.attention.values():
        assert m.shape == image.shape and m.dtype == np.float32
    # one tile covers the image: each map is the network's map at feature
    # resolution, upsampled bilinearly to the padded extent and cropped
    model = new_model("nuclei", seed=0)
    net = model.net.eval()
    x, _ = normalize(image[None], None, tuple(model.normalization["percentiles"]))
    _, found = net.inspect(torch.from_numpy(x)[None])
    h, w = image.shape
    for key in net.map_keys():
        m = found[key.module.name][key.map].float()[:, None]
        s = key.stride
        assert m.shape[-2:] == (-(-h // s), -(-w // s))
        up = torch.nn.functional.interpolate(m, size=(m.shape[-2] * s, m.shape[-1] * s), mode="bilinear",
                                             align_corners=False)[0, 0, :h, :w].numpy()
        np.testing.assert_allclose(res.attention[key.name], up, rtol=1e-4, atol=1e-5)


def test_segment_cancel(blobs):
    image, _ = blobs
    calls = []

    def cb(info):
        calls.append(info)
        return info["done"] < 1

    with pytest.raises(Cancelled):
        segment(image, new_model("nuclei"), tile=64, callback=cb)
    assert calls[0]["total"] > 1


def test_cuda_oom_halves_tile_then_falls_back_to_cpu(blobs, monkeypatch):
    """Simulated: a fake CUDA device whose forward raises out-of-memory."""
    from napari_jointattn.engine.inference import segment as seg

    image, _ = blobs
    tiles = []
    simulate_cuda_oom(monkeypatch, tiles)
    model = new_model("nuclei")
    res = seg.segment(image, model, device="cuda", tile=256)
    assert tiles == [("cuda", 256), ("cuda", 128), ("cuda", 64), ("cpu", 64)]
    assert res.device == "cpu" and len(res.notes) == 3 and "CPU" in res.notes[-1]


def test_cuda_oom_fallback_compares_without_attention_where_and_as_the_labels_were_made(
        blobs, monkeypatch):
    """segment(attention=True) after the fall back to the CPU: the pass with every attention
    module off runs the CPU network, with the tile the labels were made with."""
    from napari_jointattn.engine.inference import segment as seg

    image, _ = blobs
    simulate_cuda_oom(monkeypatch)

    def tagged_to(self, device, *args, **kwargs):  # tensors stay on the CPU: remember the device
        self.placed_on = torch.device(device).type
        return self

    monkeypatch.setattr(torch.nn.Module, "to", tagged_to)
    passes = []  # (device, tile, where the network was placed, attention off)
    oom_predict = seg.predict_slice

    def recording(model, x, device, tile, *args, net, **kwargs):
        off = not all(m.enabled for _, m in net.attention_keys())
        passes.append((device.type, tile, getattr(net, "placed_on", "cpu"), off))
        return oom_predict(model, x, device, tile, *args, net=net, **kwargs)

    monkeypatch.setattr(seg, "predict_slice", recording)
    res = seg.segment(image, new_model("nuclei"), device="cuda", tile=256, attention=True)
    assert passes == [("cuda", 256, "cuda", False), ("cuda", 128, "cuda", False),
                      ("cuda", 64, "cuda", False), ("cpu", 64, "cpu", False),
                      ("cpu", 64, "cpu", True)]
    # gamma 0 at initialisation: the same network and tiles without attention give the same labels
    assert res.device == "cpu" and res.attention_changed == 0.0


def test_split_instances_separates_touching_disks():
    yy, xx = np.mgrid[:60, :100]
    mask = ((yy - 30) ** 2 + (xx - 35) ** 2 < 400) | ((yy - 30) ** 2 + (xx - 68) ** 2 < 400)
    from scipy import ndimage as ndi

    assert ndi.label(mask)[1] == 1
    inst = split_instances(mask, min_distance=5)
    assert inst.max() == 2
    assert inst[30, 30] != inst[30, 72]


def test_small_objects_and_sequential_ids():
    from napari_jointattn.engine.inference.postprocess import (
        classify,
        relabel_sequential,
        remove_small,
    )

    labels = np.zeros((6, 20), np.int32)
    labels[0, :4] = 3  # 4 pixels
    labels[2, :5] = 9  # 5 pixels
    labels[4, :15] = 12  # 15 pixels
    kept = remove_small(labels, 5)
    assert sorted(np.unique(kept).tolist()) == [0, 9, 12]  # fewer than 5 pixels dropped, 5 kept
    np.testing.assert_array_equal(kept[labels != 3], labels[labels != 3])
    assert remove_small(labels[4:], 16).max() == 0  # a lone object is dropped too
    assert remove_small(labels, 1) is labels
    ids = relabel_sequential(kept)
    assert ids.dtype == np.int32 and sorted(np.unique(ids).tolist()) == [0, 1, 2]
    assert (ids[2, :5] == 1).all() and (ids[4, :15] == 2).all()  # old id order kept
    probs = np.stack([np.full((2, 2), 0.7), np.full((2, 2), 0.3)])
    assert classify(probs, {}).max() == 0 and classify(probs, {"threshold": 0.25}).min() == 1


def test_devices():
    from napari_jointattn.engine.devices import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(BadInputError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="no CUDA GPU"):
            resolve_device("cuda")


# ------------------------------------------------------------- model files
def test_model_roundtrip(tmp_path, blobs):
    image, _ = blobs
    model = new_model("nuclei", seed=3)
    path = save_model(model, tmp_path / "m.safetensors")
    back = load_model(path)
    assert back.classes == ["background", "nucleus"] and back.instances
    assert back.provenance["code_version"]
    for (k, a), b in zip(model.net.state_dict().items(), back.net.state_dict().values()):
        assert torch.equal(a, b), k
    np.testing.assert_array_equal(segment(image, model).labels, segment(image, back).labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_is_atomic(tmp_path, monkeypatch):
    from napari_jointattn.engine.io import files

    path = tmp_path / "m.safetensors"
    save_model(new_model("nuclei", seed=0), path)
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(BadInputError, match="No space left"):
        save_model(new_model("nuclei", seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.pop(META_KEY), "no napari-jointattn metadata"),
        (lambda m: m.update({META_KEY: "{not json"}), "not valid JSON"),
        (lambda m: m.update({META_KEY: json.dumps({**json.loads(m[META_KEY]), "architecture": "ResNet"})}),
         "unknown architecture"),
        (lambda m: m.update({META_KEY: json.dumps({**json.loads(m[META_KEY]), "classes": ["a"]})}),
         "2 to 255"),
        (lambda m: m.update({META_KEY: json.dumps({**json.loads(m[META_KEY]),
                                                   "normalization": {"percentiles": [90, 10], "per": "image"}})}),
         "percentiles"),
        (lambda m: m.update({META_KEY: json.dumps({**json.loads(m[META_KEY]),
                                                   "config": {"in_channels": "__import__('os')"}})}),
         "must be an integer"),
        (lambda m: m.update({META_KEY: json.dumps({**json.loads(m[META_KEY]), "config": {
            **json.loads(m[META_KEY])["config"], "aux_channels": 1}})}),
         "extra output channels are not supported"),
    ],
    ids=["missing", "malformed", "architecture", "classes", "percentiles", "config-type", "aux-channels"],
)
def test_bad_metadata_is_rejected(saved_model, tmp_path, edit, match):
    bad = tmp_path / "bad.safetensors"
    rewrite_metadata(saved_model, bad, edit)
    with pytest.raises(BadInputError, match=match):
        load_model(bad)


def test_other_architecture_weights_rejected(tmp_path):
    model = new_model("nuclei")
    other = new_model("nuclei", config=__import__("napari_jointattn").model.DenseUNetConfig(growth=8))
    save_model(other, tmp_path / "other.safetensors")
    src = tmp_path / "other.safetensors"
    # metadata says the default architecture, weights are of a narrower one
    rewrite_metadata(src, tmp_path / "mismatch.safetensors",
                      lambda m: m.update({META_KEY: json.dumps({**json.loads(m[META_KEY]),
                                                                "config": model.config.to_dict()})}))
    with pytest.raises(BadInputError, match="has shape"):
        load_model(tmp_path / "mismatch.safetensors")


def test_truncated_and_pickle_files_never_execute(saved_model, tmp_path):
    import pickle

    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(saved_model.read_bytes()[:5000])
    with pytest.raises(BadInputError, match="not a valid safetensors"):
        load_model(trunc)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(BadInputError):
        load_model(evil)
    assert not marker.exists()


def test_model_names(tmp_path, model_dir, monkeypatch):
    with pytest.raises(BadInputError, match="not found"):
        resolve_model("../../etc/passwd.safetensors")
    with pytest.raises(BadInputError, match="not found"):
        resolve_model("sub/dir/model")
    with pytest.raises(BadInputError, match="unknown model 'nope'"):
        resolve_model("nope")
    save_model(new_model("nuclei"), model_dir / "mine.safetensors")
    assert resolve_model("mine") == model_dir / "mine.safetensors"
    assert load_model("mine").classes == ["background", "nucleus"]
    assert read_metadata(model_dir / "mine.safetensors")["name"] == "nuclei"


# ----------------------------------------------------------------- labels
def test_label_rule():
    inst = np.array([[0, 3], [7, 0]])
    np.testing.assert_array_equal(to_classes(inst, 2), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(to_classes(np.array([0, 1, 2]), 3), [0, 1, 2])
    with pytest.raises(BadInputError, match="label value 3 is not a class"):
        to_classes(np.array([0, 3]), 3)
    with pytest.raises(BadInputError, match="negative"):
        to_classes(np.array([0, -1]), 3)


# ---------------------------------------------------------------- metrics
def test_overlap_metrics_against_hand_counts():
    truth = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 1, 0]])
    s = overlap_scores(confusion(pred, truth, 2))
    assert s["dice"][1] == pytest.approx(0.5)
    assert s["iou"][1] == pytest.approx(1 / 3)
    assert s["precision"][1] == pytest.approx(0.5) and s["recall"][1] == pytest.approx(0.5)


def test_instance_matching():
    truth = np.zeros((10, 30), int)
    truth[2:8, 2:8] = 1
    truth[2:8, 12:18] = 2
    truth[2:8, 22:28] = 3
    pred = np.zeros_like(truth)
    pred[2:8, 2:8] = 5  # exact
    pred[2:8, 12:14] = 6  # IoU 1/3: a miss
    pred[0:2, 0:2] = 9  # spurious
    assert match_instances(pred, truth) == (1, 2, 2)


def test_instance_matching_is_one_to_one_at_iou_exactly_one_half():
    """One prediction over two truth objects, IoU exactly 0.5 with each: one match, not two."""
    assert match_instances(np.array([[5, 5]]), np.array([[1, 2]])) == (1, 0, 1)
    # and the other way round: two predictions halving one truth object
    assert match_instances(np.array([[1, 2]]), np.array([[5, 5]])) == (1, 1, 0)
    # two ties side by side and a plain match: each object is used once
    truth = np.array([[1, 2, 0, 3, 3, 0, 4, 4, 4]])
    pred = np.array([[7, 7, 0, 8, 9, 0, 6, 6, 0]])  # IoU(4, 6) = 2/3
    assert match_instances(pred, truth) == (3, 1, 1)
    # ids need not be small or dense, and background need not be present
    assert match_instances(np.full((3, 3), 2**40), np.full((3, 3), 7)) == (1, 0, 0)


def test_evaluate_perfect_model(blobs, tmp_path, monkeypatch):
    image, labels = blobs
    model = new_model("nuclei")
    from napari_jointattn.engine.evaluation import evaluate as ev
    from napari_jointattn.engine.inference.segment import Segmentation

    # a model that returns the truth exactly: scores must be perfect
    monkeypatch.setattr(ev, "segment", lambda *a, **k: Segmentation(labels=labels, instances=True))
    out = ev.evaluate(model, [image], [labels])
    assert out["mean_dice"] == 1.0 and out["instance_f1"] == 1.0
    assert out["per_class"]["nucleus"]["hd95"] == 0.0
    with pytest.raises(BadInputError, match="have shape"):
        ev.evaluate(model, [image], [labels[:-1]])


def test_evaluate_real_model_scores_agree(blobs):
    """The nuclei preset on six bright disks: every disk found, and the scores consistent."""
    image, labels = blobs
    out = json.loads(json.dumps(evaluate(load_model("nuclei"), [image], [labels], device="cpu")))
    assert out["instances"] == {"tp": 6, "fp": 0, "fn": 0, "iou_threshold": 0.5}
    assert out["instance_f1"] == 1.0
    d, iou, p, r = out["mean_dice"], out["mean_iou"], out["precision"], out["recall"]
    assert d > 0.95 and out["hd95"] <= 2.0
    # one foreground class: Dice = 2 IoU / (1 + IoU) = 2 P R / (P + R)
    assert d == pytest.approx(2 * iou / (1 + iou), abs=1e-5)
    assert d == pytest.approx(2 * p * r / (p + r), abs=1e-5)
    # a model that finds nothing: recall and Dice 0, precision undefined, every disk missed
    none = evaluate(new_model("nuclei", seed=0), [image], [labels], device="cpu")
    assert none["mean_dice"] == 0.0 and none["recall"] == 0.0 and none["precision"] is None
    assert none["instances"]["fn"] == 6 and none["instance_f1"] == 0.0


def test_evaluate_prints_no_deprecation_warning(blobs):
    """HD95 uses MONAI's edge and distance functions without deprecated arguments."""
    import warnings

    from monai.metrics import compute_hausdorff_distance

    from napari_jointattn.engine.evaluation.metrics import hd95

    image, labels = blobs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(load_model("nuclei"), [image], [labels], device="cpu")
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    # the same value as MONAI's compute_hausdorff_distance(percentile=95)
    rng = np.random.default_rng(3)
    from scipy import ndimage as ndi

    for shape in [(40, 50), (10, 30, 20)]:
        p = ndi.gaussian_filter(rng.random(shape), 2) > 0.5
        t = ndi.gaussian_filter(rng.random(shape), 2) > 0.5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None],
                                             percentile=95).item()
        assert hd95(p, t) == pytest.approx(ref, abs=1e-5) and ref > 0
    assert np.isnan(hd95(np.zeros((5, 5)), np.ones((5, 5))))


@pytest.mark.parametrize("h,w,band", [(1000, 300, 20_000), (4096, 4096, 2**20), (77, 5000, 10_000), (50, 50, 10**6)])
def test_plane_bands_cover_every_row_once(h, w, band):
    from napari_jointattn.engine.inference.segment import plane_bands

    bands = plane_bands(h, w, band, 16)
    covered = np.zeros(h, int)
    for r0, r1, e0, e1 in bands:
        covered[r0:r1] += 1
        assert 0 <= e0 <= r0 < r1 <= e1 <= h
        assert r0 - e0 == min(16, r0) if len(bands) > 1 else (e0, e1) == (0, h)
    assert (covered == 1).all()
    if h * w > 1.5 * band:
        assert len(bands) > 1 and all(r1 - r0 <= max(32, band // w) for r0, r1, _, _ in bands)


def test_banded_segmentation_matches_whole_plane(monkeypatch):
    """A huge plane is processed in row bands; the result matches one pass over the whole plane."""
    from napari_jointattn.engine.inference import segment as inference

    model = load_model("nuclei")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:384, :256]
    image = (((np.sin(yy / 9.0) * np.cos(xx / 11.0)) > 0.6) * 200.0 + rng.normal(20, 5, yy.shape)).astype(np.float32)
    whole = segment(image, model, device="cpu").labels
    monkeypatch.setattr(inference, "BAND_PIXELS", 96 * 256)
    monkeypatch.setattr(inference, "BAND_MARGIN", 32)
    seen = []
    banded = segment(image, model, device="cpu", callback=lambda info: seen.append(info["total"])).labels
    assert len(inference.plane_bands(384, 256)) == 4
    assert ((whole > 0) == (banded > 0)).mean() > 0.999
    assert abs(int(banded.max()) - int(whole.max())) <= max(1, whole.max() // 50)
    # ids are 1..n with no gaps, and no object is split along a band edge
    assert np.array_equal(np.unique(banded[banded > 0]), np.arange(1, banded.max() + 1))
    _, fp, fn = match_instances(banded, whole)
    assert fp + fn <= max(2, whole.max() // 25)
    assert seen[-1] > 1


# ------------------------------------------------------ steps of segment()
def test_segment_steps_compose_to_segment(blobs):
    """prepare_input -> predict_band -> band_classes/band_instances -> Assembly is segment()."""
    from napari_jointattn.engine.inference import segment as inf

    image, _ = blobs
    model = load_model("nuclei")
    planes = inf.prepare_input(image, model)
    assert planes.data.shape == (1, *image.shape, 1) and planes.todo == [0] and not planes.is_stack
    x, bad = planes.normalized(0)
    place = inf.Placement.on(model, torch.device("cpu"))
    notes = []
    pred = inf.predict_band(model, x, place, 512, 0.25, 1, True, None, notes)
    keys = inf.attention_map_keys(model)
    assert pred.shape == (2 + len(keys), *image.shape) and notes == []
    out = inf.Assembly(planes, True, keys)
    band = (0, image.shape[0], 0, image.shape[0])
    out.put_instances(0, band, inf.band_instances(model, inf.band_classes(model, pred[:2].numpy(), bad)),
                      whole=True)
    out.put_maps(0, band, pred[2:])
    mine = out.result(place.device, notes, 0.0)
    ref = segment(image, model, device="cpu", attention=True)
    np.testing.assert_array_equal(mine.labels, ref.labels)
    assert list(mine.attention) == list(ref.attention) == [k.name for k in keys]
    for name in ref.attention:
        np.testing.assert_array_equal(mine.attention[name], ref.attention[name])
    with pytest.raises(BadInputError, match="batch_size"):
        inf.check_settings(512, 0.25, 0)


def test_segment_batch_size_gives_the_same_labels(blobs):
    image, _ = blobs
    model = load_model("nuclei")
    one = segment(image, model, device="cpu", tile=64, overlap=0.5)
    four = segment(image, model, device="cpu", tile=64, overlap=0.5, batch_size=4)
    assert count_windows(image.shape, 64, 0.5) >= 4
    assert ((one.labels > 0) == (four.labels > 0)).mean() > 0.999


def test_attention_keys_of_a_segmentation(blobs):
    image, _ = blobs
    res = segment(image, load_model("nuclei"), attention=True)
    assert res.attention_keys == {k.name: k for k in
                                  (AttentionKey("joint", s, m) for s in (8, 16, 32) for m in ("pointwise", "mix", "effect"))}
    # the deepest module mixes in more global context than the shallowest (the preset's measured behaviour)
    assert res.attention["joint 1/32 mix"].mean() > res.attention["joint 1/8 mix"].mean() + 0.2


def test_self_attention_model_has_no_per_pixel_maps():
    """Self-attention has no point-wise or mixing map: only each module's effect is returned."""
    model = new_model("nuclei", config=__import__("napari_jointattn").model.DenseUNetConfig(attention="self"))
    res = segment(np.random.default_rng(0).random((40, 48)).astype(np.float32), model, attention=True)
    assert list(res.attention) == ["self 1/8 effect", "self 1/16 effect", "self 1/32 effect"]
    assert res.labels.shape == (40, 48)
    model = new_model("nuclei", config=__import__("napari_jointattn").model.DenseUNetConfig(joint_form="gated"))
    res = segment(np.random.default_rng(0).random((40, 48)).astype(np.float32), model, attention=True)
    assert list(res.attention) == [f"joint 1/{s} {m}" for s in (8, 16, 32) for m in ("pointwise", "effect")]


def test_instance_ids_are_unique_across_slices():
    """A stack of the same disks in every slice: each slice's objects get ids of their own."""
    yy, xx = np.mgrid[:64, :80]
    plane = np.zeros((64, 80), np.float32)
    for cy, cx in [(16, 16), (16, 56), (46, 36)]:
        plane[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 200
    plane += np.random.default_rng(0).normal(20, 5, plane.shape).astype(np.float32)
    stack = np.stack([plane, plane[:, ::-1], plane])
    res = segment(stack, load_model("nuclei"), device="cpu")
    ids = [set(np.unique(s[s > 0]).tolist()) for s in res.labels]
    assert [len(i) for i in ids] == [3, 3, 3]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    assert set().union(*ids) == set(range(1, 10))
    # along another axis: the same rule
    res = segment(stack, load_model("nuclei"), device="cpu", axis=2, slices=[16, 56])
    a, b = res.labels[:, :, 16], res.labels[:, :, 56]
    assert a.max() > 0 and b.max() > 0 and not set(np.unique(a[a > 0])) & set(np.unique(b[b > 0]))


# ------------------------------------------------------------------ query
def _disk_stack():
    yy, xx = np.mgrid[:96, :96]
    planes = []
    for shift in (0, 20):
        p = np.zeros((96, 96), np.float32)
        for cy, cx in [(24, 24 + shift), (70, 60)]:
            p[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 200
        planes.append(p + np.random.default_rng(shift).normal(20, 5, p.shape).astype(np.float32))
    return np.stack(planes)


def test_query_on_a_stack_uses_the_clicked_slice():
    from napari_jointattn.engine.inference.query import AttentionQuery

    stack = _disk_stack()
    q = AttentionQuery("nuclei", stack, tile=64)
    assert q.is_stack and q.plane_shape == (96, 96) and q.key == AttentionKey("joint", 32)
    first = q.query((24, 24), slice_index=0)
    second = q.query((24, 24), slice_index=1)
    assert first.slice_index == 0 and second.slice_index == 1 and first.module == "joint 1/32"
    assert first.origin == second.origin == (0, 0) and first.heatmap.shape == (64, 64)
    assert first.heatmap.sum() == pytest.approx(1, abs=1e-3)
    assert not np.allclose(first.heatmap, second.heatmap)
    # the same as querying that slice as a 2-D image
    alone = AttentionQuery("nuclei", stack[1], tile=64).query((24, 24))
    np.testing.assert_allclose(second.heatmap, alone.heatmap, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(second.mix, alone.mix, rtol=1e-5, atol=1e-7)
    # a tile at the lower right edge is shifted inside the image
    assert q.query((90, 90), slice_index=1).origin == (32, 32)
    by_key = AttentionQuery("nuclei", stack, tile=64, module=AttentionKey("joint", 16))
    assert by_key.query((24, 24), 0).module == "joint 1/16" and by_key.stride == 16
    with pytest.raises(BadInputError, match="slice index"):
        q.query((24, 24))
    with pytest.raises(BadInputError, match="slice index"):
        q.query((24, 24), slice_index=2)
    with pytest.raises(BadInputError, match="no module 'joint 1/4'"):
        AttentionQuery("nuclei", stack, module="joint 1/4")


def test_query_during_a_segment_run_does_not_move_its_network(blobs):
    """A query on another device, run while segment() is between tiles, must not move the
    network segment() is using (the shared model's network is never moved)."""
    import threading

    from napari_jointattn.engine.inference.query import AttentionQuery

    image, _ = blobs
    model = load_model("nuclei")
    reference = segment(image, model, device="cpu", tile=64).labels
    ref_query = AttentionQuery(model, image, tile=64).query((20, 20))
    results = {}

    def query_elsewhere():
        # the meta device stands in for a second device: a forward there yields no numbers
        try:
            AttentionQuery(model, image, tile=64, device="meta").query((20, 20))
        except Exception as exc:  # noqa: BLE001 - only its side effects matter here
            results["meta"] = type(exc).__name__
        results["cpu"] = AttentionQuery(model, image, tile=64, device="cpu").query((20, 20))

    def on_progress(info):
        if info["done"] == 1:  # between the first and second tile
            t = threading.Thread(target=query_elsewhere)
            t.start()
            t.join()

    during = segment(image, model, device="cpu", tile=64, callback=on_progress)
    assert "meta" in results and results["cpu"] is not None
    np.testing.assert_array_equal(during.labels, reference)
    np.testing.assert_allclose(results["cpu"].heatmap, ref_query.heatmap, rtol=1e-6)
    assert all(p.device.type == "cpu" for p in model.net.parameters())


def test_concurrent_segment_and_queries_in_threads(blobs):
    """Segment runs and queries in several threads at once give the results they give alone."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_jointattn.engine.inference.query import AttentionQuery

    image, _ = blobs
    model = load_model("nuclei")
    alone_labels = segment(image, model, device="cpu", tile=64).labels
    alone_heat = AttentionQuery(model, image, tile=64).query((50, 50)).heatmap
    with ThreadPoolExecutor(4) as pool:
        segs = [pool.submit(segment, image, model, device="cpu", tile=64) for _ in range(2)]
        queries = [pool.submit(lambda: AttentionQuery(model, image, tile=64).query((50, 50)).heatmap)
                   for _ in range(4)]
        for f in segs:
            np.testing.assert_array_equal(f.result().labels, alone_labels)
        for f in queries:
            np.testing.assert_allclose(f.result(), alone_heat, rtol=1e-6)


# ------------------------------------------------------------------ files
def test_atomic_writes_never_change_the_process_umask(tmp_path, monkeypatch):
    """The umask is process-wide: setting it, even briefly, races with other threads' file creation."""
    import os
    import stat

    from napari_jointattn.engine.io import files

    def forbidden(*_):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(os, "umask", forbidden)
    path = files.write_bytes_atomic(tmp_path / "a.bin", b"x")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~files.current_umask()
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")  # what a plain open() gives
    assert mode == stat.S_IMODE(plain.stat().st_mode)


def test_inference_network_never_moves_or_switches_the_shared_network():
    from napari_jointattn.engine.inference.placement import inference_network, release

    model = new_model("nuclei", seed=0)
    net = model.net.train()  # e.g. being fine-tuned
    run = inference_network(net, "cpu")
    assert run is not net and not run.training and net.training  # a copy in eval mode
    assert inference_network(net, "cpu") is run  # cached while the weights are unchanged
    with torch.no_grad():
        net.classifier.bias.add_(1.0)  # training in place
    fresh = inference_network(net, "cpu")
    assert fresh is not run and torch.equal(fresh.classifier.bias, net.classifier.bias)
    meta = inference_network(net, "meta")
    assert next(meta.parameters()).device.type == "meta"
    assert all(p.device.type == "cpu" for p in net.parameters())
    release(net, "meta")
    assert inference_network(net, "meta") is not meta
    net.eval()
    assert inference_network(net, "cpu") is net  # already there, in eval mode: used as it is


def test_inference_network_notices_every_in_place_weight_edit():
    """The copy is rebuilt after any change of the weights' values: an optimiser step, an edit
    of one element through ``.data`` (which bypasses torch's version counters), a state dict
    loaded into the same tensors; it is kept while nothing changes."""
    from napari_jointattn.engine.inference.placement import inference_network

    model = new_model("nuclei", seed=0)
    net = model.net.train()
    run = inference_network(net, "cpu")

    def rebuilt() -> torch.nn.Module:
        fresh = inference_network(net, "cpu")
        assert fresh is not run
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, net.state_dict()[k]), k
        return fresh

    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.rand(1, model.in_channels, 64, 64)).square().mean().backward()
    opt.step()
    run = rebuilt()
    net.classifier.weight.data[0, 0] += 1.0
    run = rebuilt()
    net.load_state_dict({k: v + 0.5 if v.is_floating_point() else v
                         for k, v in net.state_dict().items()})
    run = rebuilt()
    assert inference_network(net, "cpu") is run


@pytest.mark.parametrize("batch_size", [1, 3])
def test_progress_reaches_its_total_whatever_the_batch_size(batch_size):
    """Windows run in batches: the reports count windows, not batches."""
    model = new_model("nuclei", seed=0)
    image = np.random.default_rng(0).random((150, 170)).astype(np.float32)
    seen = []
    segment(image, model, device="cpu", tile=64, overlap=0.25, batch_size=batch_size,
            callback=lambda info: seen.append((info["done"], info["total"])))
    total = seen[-1][1]
    assert total == count_windows(image.shape, 64, 0.25) > 3
    assert seen[-1][0] == total
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(set(done[1:])) == len(done) - 1


def test_knockout_reports_what_each_attention_module_changes(blobs):
    """evaluate(knockout=True): a module with gamma 0 changes nothing; one that acts changes pixels,
    and knocking every module out equals setting every gamma to 0."""
    import copy

    import torch

    from napari_jointattn.engine.evaluation.evaluate import evaluate
    from napari_jointattn.engine.evaluation.knockout import ALL
    from napari_jointattn.engine.models.model import load_model

    image, labels = blobs
    model = copy.deepcopy(load_model("nuclei"))  # the preset, made to lean on one module
    with torch.no_grad():
        for name, module in model.net.attention.items():
            module.gamma.fill_(3.0 if name == "level2" else 0.0)  # only the 1/16 module acts
    out = evaluate(model, [image], [labels], knockout=True)["knockout"]
    rows = out["modules"]
    assert set(rows) == {"joint 1/8", "joint 1/16", "joint 1/32", ALL}
    assert rows["joint 1/8"]["changed_fraction"] == 0 and rows["joint 1/8"]["dice_change"] == 0
    assert rows["joint 1/16"]["changed_fraction"] > 0
    assert rows[ALL]["changed_fraction"] == rows["joint 1/16"]["changed_fraction"]
    with torch.no_grad():
        model.net.attention["level2"].gamma.zero_()
    plain = evaluate(model, [image], [labels])
    assert rows[ALL]["dice"] == pytest.approx(plain["mean_dice"], abs=1e-6)
    assert all(m.enabled for m in model.net.attention.values())


def test_query_weight_is_gamma_times_the_mixing_weight_at_the_pixel(blobs):
    """The used row: the softmax row times gamma x lambda(query pixel) of the joint "mix" form."""
    import copy

    import torch

    from napari_jointattn.engine.inference.query import AttentionQuery
    from napari_jointattn.engine.models.model import load_model

    image, _ = blobs
    model = copy.deepcopy(load_model("nuclei"))
    with torch.no_grad():
        model.net.attention["level3"].gamma.fill_(0.5)
    res = AttentionQuery(model, image, tile=64, module="joint 1/32").query((30, 40))
    lam = res.mix[30 - res.origin[0], 40 - res.origin[1]]  # the mixing map, upsampled like the row
    assert res.weight == pytest.approx(0.5 * lam, rel=1e-5)
    assert 0 < res.weight < 0.5
    assert np.allclose(res.used, res.heatmap * res.weight)


def test_segment_with_attention_says_how_many_labels_depend_on_it(blobs):
    from napari_jointattn.engine.evaluation.knockout import describe_share

    image, _ = blobs
    model = new_model("nuclei", seed=0)
    assert segment(image, model).attention_changed is None  # only measured with the maps
    inert = segment(image, model, attention=True)
    assert inert.attention_changed == 0.0  # gamma 0 at initialisation: attention changes nothing
    with torch.no_grad():
        for _, module in model.net.attention_keys():
            module.gamma.fill_(20.0)
    seen = []
    strong = segment(image, model, attention=True, callback=lambda info: seen.append(info["total"]))
    with model.net.knocked_out():
        without = segment(image, model).labels
    # the classes are compared before objects are split (tiny specks are dropped only from the instances)
    expected = np.mean((strong.labels > 0) != (without > 0))
    assert strong.attention_changed == pytest.approx(expected, abs=0.005) and strong.attention_changed > 0.01
    assert all(m.enabled for _, m in model.net.attention_keys())  # the model itself was never knocked out
    assert seen[-1] == 2  # one window with the modules, one without
    assert "barely" in describe_share(0.0006) and "depend" in describe_share(0.05)
    none = new_model("nuclei", config=__import__("napari_jointattn").model.DenseUNetConfig(attention="none"))
    assert segment(image, none, attention=True).attention_changed is None
