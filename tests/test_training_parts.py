"""The training package's parts on their own: random state, loss, schedule, augmentation sync,
mixed-precision loss scaling, and the live loop's guard against non-finite steps."""

import random

import numpy as np
import pytest
import torch
from _helpers import disks

from napari_jointattn.engine import devices
from napari_jointattn.engine.errors import BadInputError
from napari_jointattn.engine.models.model import new_model
from napari_jointattn.engine.training import TrainSettings, live, loop, masked_loss, train
from napari_jointattn.engine.training.augment import CropBatches, CropCentres
from napari_jointattn.engine.training.data import Sample
from napari_jointattn.engine.training.live import LiveTrainer
from napari_jointattn.engine.training.schedule import learning_rate
from napari_jointattn.model.denseunet import DenseUNetConfig

FAST = dict(epochs=2, steps_per_epoch=3, batch_size=2, crop=64, device="cpu")
TINY = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                       head_channels=4, attention_dim=8, attention_levels=(1,), dropout=0.0)
#: a loss this small has gradients below fp16's smallest number: without loss scaling they are 0
TINY_LOSS = 1e-6


def _tiny():
    return new_model(config=TINY, classes=["background", "object"], name="tiny", seed=0)


def _weights(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _live_on_disks(**settings) -> LiveTrainer:
    image, truth = disks(64, 64, 0)
    trainer = LiveTrainer(_tiny(), batch_size=2, crop=32, seed=1, **settings)
    trainer.submit([image], [truth], masks=[np.ones(truth.shape, bool)])
    return trainer


def test_training_leaves_the_global_random_state_alone(blobs):
    """Training runs in a worker thread inside napari: it must not reseed the process's RNGs."""
    image, labels = blobs
    start = new_model("nuclei", seed=0)
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    train(start, [image], [labels], seed=5, **FAST)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]


def test_same_seed_same_weights_whatever_the_global_state(blobs):
    """Dropout and augmentation draw from the run's own generators, not the global one."""
    image, labels = blobs
    runs = []
    for global_seed in (1, 2):
        start = new_model("nuclei", seed=0)
        torch.manual_seed(global_seed)
        runs.append(train(start, [image], [labels], seed=5, **FAST).model)
    assert any(m.p > 0 for m in runs[0].net.modules() if type(m).__name__ == "Dropout2d")
    for (k, x), y in zip(runs[0].net.state_dict().items(), runs[1].net.state_dict().values()):
        assert torch.equal(x, y), k


def test_new_classes_give_a_seeded_head(blobs):
    image, labels = blobs
    heads = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        result = train("nuclei", [image], [labels > 0], classes=["bg", "a", "b"], seed=3,
                       epochs=1, steps_per_epoch=1, batch_size=1, crop=64, device="cpu")
        heads.append([p.detach().clone() for m in result.model.net.head_modules() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*heads))


def test_masked_loss_gives_no_gradient_to_unannotated_pixels():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 8, 8, requires_grad=True)
    target = torch.randint(0, 2, (1, 8, 8))
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, :4] = True  # the top half is annotated
    weight = torch.ones(1, 8, 8)
    masked_loss(logits, target, mask, weight, 2).backward()
    grad = logits.grad.abs().sum(1)[0]
    assert (grad[4:] == 0).all()  # unannotated: no gradient at all
    assert (grad[:4] > 0).all()
    # what an unannotated pixel holds does not change the loss
    other = target.clone()
    other[:, 4:] = 1 - other[:, 4:]
    assert torch.isclose(masked_loss(logits, target, mask, weight, 2), masked_loss(logits, other, mask, weight, 2))


def test_masked_loss_weights_pixels():
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 1, :, :2] = 3.0  # confident class 1 on the left
    target = torch.zeros(1, 4, 4, dtype=torch.long)  # but the reference is class 0 everywhere
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    left = torch.ones(1, 4, 4)
    left[..., 2:] = 0.01
    right = torch.ones(1, 4, 4)
    right[..., :2] = 0.01
    # weighting the wrong pixels up raises the cross-entropy term
    assert masked_loss(logits, target, mask, left, 2, dice_weight=0) > masked_loss(
        logits, target, mask, right, 2, dice_weight=0)


def test_schedule_warms_up_then_decays_to_five_percent():
    settings = TrainSettings(epochs=10, steps_per_epoch=10, lr=1e-2)
    total = settings.epochs * settings.steps_per_epoch
    lrs = [learning_rate(settings, step / total, elapsed=0.0) for step in range(1, total + 1)]
    assert lrs[0] == pytest.approx(1e-2 / 20 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * 0.01))))
    assert np.argmax(lrs) == 19  # warm-up over the first 20 steps
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))  # then only down
    assert lrs[-1] == pytest.approx(0.05 * 1e-2)
    # a time budget drives the decay when it runs out first
    timed = TrainSettings(epochs=10, steps_per_epoch=10, lr=1e-2, max_seconds=10.0)
    assert learning_rate(timed, 0.3, elapsed=10.0) == pytest.approx(0.05 * 1e-2)


def test_training_steps_at_the_rates_of_the_schedule(blobs):
    """Each step of ``train()`` runs at the schedule's rate for its place in the run."""
    image, labels = blobs
    told = []
    settings = {"epochs": 2, "steps_per_epoch": 3, "batch_size": 2, "crop": 32, "lr": 1e-2,
                "device": "cpu", "calibrate_threshold": False, "patience": 10}
    train(_tiny(), [image], [labels > 0], callback=told.append, **settings)
    stepped = [info["lr"] for info in told if info["val_dice"] is None]
    total = 2 * 3
    schedule = TrainSettings(**settings)
    expected = [learning_rate(schedule, step / total, 0.0) for step in range(1, total + 1)]
    assert len(stepped) == total and stepped == pytest.approx(expected, rel=1e-12)


def test_augmentation_keeps_image_labels_mask_and_weights_in_sync():
    """Each of image, target, mask and weight is cut and turned alike: their pixels stay paired."""
    h, w = 40, 56
    yy, xx = np.mgrid[:h, :w]
    code = (yy * w + xx).astype(np.float32)  # every pixel's own value
    sample = Sample(image=code[None].copy(), target=(code % 3).astype(np.int64), train_mask=(code % 5) > 0,
                    val_mask=np.zeros((h, w), bool), weight=(code % 7).astype(np.float32), source=0, index=0)
    # with the intensity part off, the exact codes give the check
    plain = TrainSettings(batch_size=8, crop=32, scale_range=(1.0, 1.0), augment=True)
    crops = CropBatches([sample], plain, CropCentres([sample], "annotated"), intensity=False)
    batches = [crops(np.random.default_rng(seed)) for seed in range(8)]
    turned = []
    for x, t, m, wt in batches:
        for i in range(x.shape[0]):
            c = torch.round(x[i, 0]).long()
            inside = wt[i] != 0  # padding of the weight map is 0 (some inner pixels too: code % 7 == 0)
            assert inside.sum() > 50
            assert torch.equal(t[i][inside], (c[inside] % 3))
            assert torch.equal(m[i][inside], (c[inside] % 5) > 0)
            assert torch.equal(wt[i][inside], (c[inside] % 7).float())
            # neighbours along a row differ by 1 in the code (unturned) or by a row (turned 90 degrees)
            pair = inside[:, 1:] & inside[:, :-1]
            steps = (c[:, 1:] - c[:, :-1]).abs()[pair]
            assert len(torch.unique(steps)) == 1 and int(steps[0]) in (1, w)
            turned.append(int(steps[0]) == w)
    assert any(turned) and not all(turned)  # both turned and unturned crops were drawn


def test_elastic_deformation_bends_image_labels_and_mask_alike():
    """A smooth deformation moves image, labels and mask together (the image bilinear, the rest nearest)."""
    h, w = 64, 64
    yy, xx = np.mgrid[:h, :w]
    target = (((yy // 8) + (xx // 8)) % 2).astype(np.int64)  # a checkerboard of 8-px squares
    mask = np.ones((h, w), bool)
    sample = Sample(image=(10.0 * target)[None].astype(np.float32), target=target, train_mask=mask,
                    val_mask=np.zeros((h, w), bool), weight=None, source=0, index=0)
    flat = TrainSettings(batch_size=6, crop=48, scale_range=(1.0, 1.0))
    bent = TrainSettings(batch_size=6, crop=48, scale_range=(1.0, 1.0), elastic=1.0)
    a = CropBatches([sample], flat, intensity=False)(np.random.default_rng(4))
    b = CropBatches([sample], bent, intensity=False)(np.random.default_rng(4))
    assert not torch.equal(a[1], b[1])  # the squares were bent
    x, t, m, _ = b
    inside = m  # zero-padded outside the plane: no loss there
    agree = (torch.round(x[:, 0] / 10).long() == t)[inside].float().mean()
    assert agree > 0.9  # image and labels moved together (they differ only along blurred edges)
    assert set(torch.unique(t).tolist()) <= {0, 1}  # labels stay labels
    with pytest.raises(BadInputError, match="elastic"):
        TrainSettings(elastic=1.5).validate()


def test_intensity_augmentation_changes_the_image_alone_and_the_seed_repeats_a_batch():
    rng = np.random.default_rng(3)
    h, w = 48, 48
    target = (rng.random((h, w)) > 0.7).astype(np.int64)
    sample = Sample(image=rng.random((2, h, w)).astype(np.float32), target=target,
                    train_mask=np.ones((h, w), bool), val_mask=np.zeros((h, w), bool),
                    weight=rng.random((h, w)).astype(np.float32) + 0.5, source=0, index=0)
    settings = TrainSettings(batch_size=6, crop=32, bias_field=0.7)
    full = CropBatches([sample], settings)
    geometric = CropBatches([sample], settings, intensity=False)
    a, b, g = full(np.random.default_rng(7)), full(np.random.default_rng(7)), geometric(np.random.default_rng(7))
    for u, v in zip(a, b):  # the same seed, the same batch
        assert torch.equal(u, v)
    for u, v in zip(a[1:], g[1:]):  # labels, mask and weights do not see the intensity changes
        assert torch.equal(u, v)
    assert a[0].shape == g[0].shape == (6, 2, 32, 32)
    assert not torch.allclose(a[0], g[0], atol=1e-3)  # the image does
    c = full(np.random.default_rng(8))
    assert not torch.equal(a[0], c[0])


def test_attention_scale_and_mixing_weights_are_not_decayed():
    from napari_jointattn.engine.models.model import new_model
    from napari_jointattn.engine.training.schedule import optimizer

    net = new_model("nuclei").net
    opt = optimizer(net, TrainSettings(weight_decay=0.01))
    names = {id(p): n for n, p in net.named_parameters()}
    decayed, free = opt.param_groups
    assert decayed["weight_decay"] == 0.01 and free["weight_decay"] == 0.0
    free_names = sorted(names[id(p)] for p in free["params"])
    assert free_names and all(n.endswith("gamma") or ".mix." in n for n in free_names)
    assert sum(n.endswith("gamma") for n in free_names) == 3  # one per module
    assert len(decayed["params"]) + len(free["params"]) == len(names)


@pytest.fixture
def fp16(monkeypatch):
    """Autocast in float16 on any device, as on a GPU without bf16."""
    monkeypatch.setattr(devices, "autocast_dtype", lambda dev: torch.float16)


def test_fp16_training_scales_the_loss_and_steps_with_the_true_gradients(blobs, fp16, monkeypatch):
    real_loss, real_optimizer = loop.masked_loss, loop.optimizer
    monkeypatch.setattr(loop, "masked_loss", lambda *a, **k: real_loss(*a, **k) * TINY_LOSS)
    stepped_with = []  # per step: the largest gradient the optimiser stepped with

    def recording_optimizer(net, settings):
        opt = real_optimizer(net, settings)
        step = opt.step

        def recorded(*args, **kwargs):
            stepped_with.append(max(float(p.grad.abs().max()) for group in opt.param_groups
                                    for p in group["params"] if p.grad is not None))
            return step(*args, **kwargs)

        opt.step = recorded
        return opt

    monkeypatch.setattr(loop, "optimizer", recording_optimizer)
    image, labels = blobs
    train(_tiny(), [image], [labels > 0], epochs=1, steps_per_epoch=2, batch_size=2, crop=32,
          weight_decay=0.0, calibrate_threshold=False, device="cpu")
    assert len(stepped_with) == 2
    # not underflowed to 0, and scaled back: the scaled ones are 2**16 times larger
    assert all(0 < g < 1e-4 for g in stepped_with), stepped_with


def test_fp16_live_steps_scale_the_loss_so_small_gradients_still_train(fp16, monkeypatch):
    real = live.masked_loss
    monkeypatch.setattr(live, "masked_loss", lambda *a, **k: real(*a, **k) * TINY_LOSS)
    trainer = _live_on_disks(weight_decay=0.0)  # without decay, a zero gradient moves nothing
    assert trainer.scaler.is_enabled()
    before = _weights(trainer.net)
    out = trainer.train(steps=1)
    assert out["steps"] == 1 and out["skipped"] == 0
    moved = [n for n, p in trainer.net.named_parameters() if not torch.equal(p, before[n])]
    # all but the attention module's own weights: with gamma 0 at the start they get no gradient
    assert "classifier.weight" in moved and "stem.0.weight" in moved
    assert len(moved) > len(before) // 2


def _nan_loss(loss, logits):
    return loss * float("nan")


def _nan_gradients(loss, logits):
    # sqrt at 0: the value 0, the slope infinite; times the zero slope of 0 * logits: NaN
    return loss + torch.sqrt((logits.float() * 0).sum())


@pytest.mark.parametrize("poison", [_nan_loss, _nan_gradients], ids=["NaN loss", "NaN gradients"])
def test_live_batch_with_a_non_finite_loss_leaves_the_weights_unchanged(monkeypatch, poison):
    real = live.masked_loss
    monkeypatch.setattr(live, "masked_loss",
                        lambda logits, *a, **k: poison(real(logits, *a, **k), logits))
    trainer = _live_on_disks()
    before = _weights(trainer.net)
    out = trainer.train(steps=2)
    assert out["steps"] == 0 and out["skipped"] == 2 and out["loss"] is None and trainer.steps == 0
    for k, v in trainer.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not trainer.opt.state  # nor did the optimiser's moments take anything in
    monkeypatch.setattr(live, "masked_loss", real)
    out = trainer.train(steps=1)  # the next good batch trains as usual
    assert out["steps"] == 1 and out["skipped"] == 0 and np.isfinite(out["loss"])
    assert not torch.equal(trainer.net.classifier.weight, before["classifier.weight"])
