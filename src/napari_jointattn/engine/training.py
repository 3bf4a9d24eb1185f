"""Training and fine-tuning from (partial) annotations.

Rules (documented in docs/training.md):

* Only annotated regions teach. A 2-D image or stack slice whose labels are
  all 0 is *unannotated* and ignored, unless an explicit ``masks`` entry marks
  annotated pixels; then only those pixels count.
* The validation split cannot leak: by image when there are several, by a
  block of slices (with a gap of ``GAP_SLICES`` unused slices) for one stack,
  otherwise by a strip of columns (with a ``GAP_PIXELS`` unused margin).
* Loss: cross-entropy (optionally weighted per pixel) + soft Dice, over
  annotated pixels only. AdamW. Best validation weights are kept; training
  stops at ``epochs``, ``max_seconds``, on early stopping, or when the
  callback returns ``False``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .devices import autocast, describe_device, resolve_device
from .errors import BadInputError
from .imageio import ImageFile, read_image, read_labels
from .inference import prepare_channels
from .labels import to_classes
from .models import Model, load_model, new_model, save_model
from .normalize import normalize, percentile_range

GAP_SLICES = 2
GAP_PIXELS = 16


@dataclass
class TrainSettings:
    epochs: int = 30
    max_seconds: float | None = None
    steps_per_epoch: int = 40
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    patience: int = 8
    augment: bool = True
    scale_range: tuple[float, float] = (0.75, 1.33)
    bias_field: float = 0.0
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise BadInputError(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise BadInputError(f"max_seconds must be positive, got {self.max_seconds!r}")
        if not 0 < self.val_fraction < 1:
            raise BadInputError(f"validation fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.crop < 32 or self.batch_size < 1 or self.steps_per_epoch < 1:
            raise BadInputError("crop must be >= 32, batch size and steps per epoch >= 1")
        if not self.lr > 0:
            raise BadInputError(f"learning rate must be positive, got {self.lr!r}")


@dataclass
class Sample:
    """One 2-D training plane: normalised image (C, H, W), classes, masks, weights."""

    image: np.ndarray
    target: np.ndarray
    train_mask: np.ndarray
    val_mask: np.ndarray
    weight: np.ndarray | None
    source: int
    index: int


@dataclass
class TrainResult:
    model: Model
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_dice: float = float("nan")
    stopped: str = "epochs"
    seconds: float = 0.0
    device: str = "cpu"
    summary: dict = field(default_factory=dict)
    path: os.PathLike | None = None


# ------------------------------------------------------------------- data
def _load(image, labels) -> tuple[np.ndarray, int | None, int, np.ndarray]:
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, ImageFile):
        arr, ch, ax = image.data, image.channel_axis, image.default_axis
    else:
        arr, ch, ax = np.asarray(image), None, 0
    lab = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else np.asarray(labels)
    return arr, ch, ax, lab


def build_samples(
    model: Model,
    images: Sequence,
    labels: Sequence,
    masks: Sequence | None = None,
    weights: Sequence | None = None,
    axis: int | None = None,
    channel_axis: int | None = None,
    val_fraction: float = 0.2,
) -> tuple[list[Sample], dict]:
    """Annotated 2-D planes with leak-free train/validation masks, and a summary."""
    if len(images) != len(labels):
        raise BadInputError(f"{len(images)} images but {len(labels)} label images")
    if not images:
        raise BadInputError("no training data: give at least one image with labels")
    for name, extra in (("masks", masks), ("weights", weights)):
        if extra is not None and len(extra) != len(images):
            raise BadInputError(f"{len(extra)} {name} for {len(images)} images")
    k = model.num_classes
    pct = tuple(model.normalization.get("percentiles", (1.0, 99.8)))
    planes: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
    for i, (image, label) in enumerate(zip(images, labels)):
        arr, ch, default_ax, lab = _load(image, label)
        data = prepare_channels(arr, model.in_channels, channel_axis if channel_axis is not None else ch)
        spatial = data.shape[:-1]
        if lab.shape != spatial:
            raise BadInputError(f"labels of image {i + 1} have shape {lab.shape}, the image {spatial}")
        cls = to_classes(lab, k)
        mask = None if masks is None or masks[i] is None else np.asarray(masks[i], bool)
        wmap = None if weights is None or weights[i] is None else np.asarray(weights[i], np.float32)
        for name, extra in (("mask", mask), ("weight map", wmap)):
            if extra is not None and extra.shape != spatial:
                raise BadInputError(f"{name} of image {i + 1} has shape {extra.shape}, the image {spatial}")
        if len(spatial) == 3:
            ax = (default_ax if axis is None else axis) % 3
            data, cls = np.moveaxis(data, ax, 0), np.moveaxis(cls, ax, 0)
            lab = np.moveaxis(lab, ax, 0)
            mask = None if mask is None else np.moveaxis(mask, ax, 0)
            wmap = None if wmap is None else np.moveaxis(wmap, ax, 0)
            rng_ = percentile_range(data, *pct) if model.normalization.get("per") == "volume" else None
        else:
            data, cls, lab = data[None], cls[None], lab[None]
            mask = None if mask is None else mask[None]
            wmap = None if wmap is None else wmap[None]
            rng_ = None
        for z in range(data.shape[0]):
            annotated = mask[z] if mask is not None else np.full(lab[z].shape, bool(lab[z].any()))
            if not annotated.any():
                continue
            plane = np.moveaxis(data[z], -1, 0)
            if plane.dtype.kind == "f" and not np.isfinite(plane).any():
                continue
            x, bad = normalize(plane, rng_, pct)
            if bad is not None:
                annotated = annotated & ~bad.any(0)
            planes.append((i, z, x, cls[z], annotated, None if wmap is None else wmap[z]))
    if not planes:
        raise BadInputError("no annotated pixels: paint some labels (0 everywhere counts as unannotated)")
    counts = np.zeros(k, dtype=np.int64)
    for *_, t, m, _w in planes:
        counts += np.bincount(t[m], minlength=k)[:k]
    if (counts[1:] == 0).all():
        raise BadInputError("the annotations contain no foreground class: label some objects first")

    samples = [Sample(x, t, m.copy(), np.zeros_like(m), w, i, z) for i, z, x, t, m, w in planes]
    sources = sorted({s.source for s in samples})
    if len(sources) >= 2:
        n_val = max(1, round(val_fraction * len(sources)))
        val_sources = set(sources[-n_val:])
        for s in samples:
            if s.source in val_sources:
                s.val_mask, s.train_mask = s.train_mask, np.zeros_like(s.train_mask)
        split = f"by image: {n_val} of {len(sources)} images for validation"
    elif len(samples) >= 3 + GAP_SLICES:
        zs = sorted(s.index for s in samples)
        n_val = max(1, round(val_fraction * len(zs)))
        val_z = set(zs[-n_val:])
        lo = min(val_z)
        for s in samples:
            if s.index in val_z:
                s.val_mask, s.train_mask = s.train_mask, np.zeros_like(s.train_mask)
            elif s.index > lo - 1 - GAP_SLICES:
                s.train_mask = np.zeros_like(s.train_mask)  # too close to the validation block
        split = f"by slices: {n_val} of {len(zs)} annotated slices (block from {lo}), gap {GAP_SLICES}"
    else:
        for s in samples:
            w = s.target.shape[1]
            cut = int(round(w * (1 - val_fraction)))
            s.val_mask[:, cut:] = s.train_mask[:, cut:]
            s.train_mask[:, max(0, cut - GAP_PIXELS):] = False
        split = f"by columns: the right {val_fraction:.0%} of each image, gap {GAP_PIXELS} px"
    samples = [s for s in samples if s.train_mask.any() or s.val_mask.any()]
    n_train = int(sum(s.train_mask.sum() for s in samples))
    n_val = int(sum(s.val_mask.sum() for s in samples))
    if n_train == 0 or n_val == 0:
        raise BadInputError("too little annotation to split into training and validation parts")
    summary = {
        "images": len({s.source for s in samples}),
        "planes": len(samples),
        "annotated_pixels": int(counts.sum()),
        "pixels_per_class": {model.classes[c]: int(counts[c]) for c in range(k)},
        "train_pixels": n_train,
        "val_pixels": n_val,
        "split": split,
    }
    return samples, summary


def annotation_summary(labels: Sequence[np.ndarray], num_classes: int, classes: Sequence[str],
                       spatial_dims: Sequence[int] | None = None) -> dict:
    """What the annotations contain, cheaply (no image data needed): for the docks.

    Returns annotated images and planes (2-D images, or slices along axis 0 of
    stacks), pixels per class, and a list of warnings (empty when training
    can go ahead).
    """
    counts = np.zeros(num_classes, np.int64)
    planes = images = 0
    warnings_: list[str] = []
    for i, lab in enumerate(labels):
        lab = np.asarray(lab)
        cls = to_classes(lab, num_classes)
        stack = lab.ndim == 3 if spatial_dims is None else spatial_dims[i] == 3
        per_plane = lab.reshape(lab.shape[0], -1).any(1) if stack else np.array([lab.any()])
        n = int(per_plane.sum())
        if n:
            images += 1
            planes += n
            sel = cls[per_plane] if stack else cls
            counts += np.bincount(sel.ravel(), minlength=num_classes)[:num_classes]
    if planes == 0:
        warnings_.append("no annotated pixels: paint some labels first")
    elif (counts[1:] == 0).all():
        warnings_.append("only background is annotated: label some objects")
    elif counts[1:].sum() < 200:
        warnings_.append(f"very little foreground ({int(counts[1:].sum())} pixels): results will be poor")
    elif planes < 2 and counts.sum() < 4096:
        warnings_.append("a single small annotated region: add more for a reliable validation split")
    return {
        "images": images,
        "planes": planes,
        "pixels_per_class": {classes[c]: int(counts[c]) for c in range(num_classes)},
        "warnings": warnings_,
    }


# ------------------------------------------------------------ augmentation
def _crop_batch(samples: list[Sample], settings: TrainSettings, rng: np.random.Generator):
    """Random crops (biased towards annotated pixels) -> tensors."""
    train = [s for s in samples if s.train_mask.any()]
    c = settings.crop
    xs, ts, ms, ws = [], [], [], []
    for _ in range(settings.batch_size):
        s = train[rng.integers(len(train))]
        scale = math.exp(rng.uniform(*np.log(settings.scale_range))) if settings.augment else 1.0
        size = max(16, int(round(c / scale)))
        h, w = s.target.shape
        ys, xs_ = np.nonzero(s.train_mask)
        j = rng.integers(len(ys))
        cy = int(ys[j]) + int(rng.integers(-size // 4, size // 4 + 1))
        cx = int(xs_[j]) + int(rng.integers(-size // 4, size // 4 + 1))
        y0, x0 = cy - size // 2, cx - size // 2
        img = _window(s.image, y0, x0, size, "edge")
        tgt = _window(s.target[None], y0, x0, size, 0)[0]
        msk = _window(s.train_mask[None], y0, x0, size, 0)[0]
        wgt = _window(s.weight[None], y0, x0, size, 0)[0] if s.weight is not None else np.ones((size, size), np.float32)
        xs.append(torch.from_numpy(img))
        ts.append(torch.from_numpy(tgt.astype(np.int64)))
        ms.append(torch.from_numpy(msk))
        ws.append(torch.from_numpy(wgt.astype(np.float32)))
    x = torch.stack([F.interpolate(t[None], size=(c, c), mode="bilinear", align_corners=False)[0] for t in xs])
    t = torch.stack([F.interpolate(t[None, None].float(), size=(c, c), mode="nearest")[0, 0].long() for t in ts])
    m = torch.stack([F.interpolate(t[None, None].float(), size=(c, c), mode="nearest")[0, 0] > 0.5 for t in ms])
    w = torch.stack([F.interpolate(t[None, None], size=(c, c), mode="nearest")[0, 0] for t in ws])
    if settings.augment:
        x, t, m, w = _geometric(x, t, m, w, rng)
        x = _intensity(x, rng, settings.bias_field)
    return x, t, m, w


def _window(a: np.ndarray, y0: int, x0: int, size: int, fill) -> np.ndarray:
    """a[:, y0:y0+size, x0:x0+size] with padding outside (edge or constant)."""
    _, h, w = a.shape
    pad = ((0, 0), (max(0, -y0), max(0, y0 + size - h)), (max(0, -x0), max(0, x0 + size - w)))
    sub = a[:, max(0, y0) : y0 + size, max(0, x0) : x0 + size]
    if any(p for pair in pad for p in pair):
        sub = np.pad(sub, pad, mode="edge") if fill == "edge" else np.pad(sub, pad, constant_values=fill)
    return np.ascontiguousarray(sub)


def _geometric(x, t, m, w, rng):
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))

    def apply(a, dims):
        a = torch.rot90(a, k, dims)
        return torch.flip(a, (dims[1],)) if flip else a

    return apply(x, (2, 3)), apply(t, (1, 2)), apply(m, (1, 2)), apply(w, (1, 2))


def _intensity(x: torch.Tensor, rng: np.random.Generator, bias_field: float) -> torch.Tensor:
    """Contrast, brightness, gamma, a smooth multiplicative field, noise.

    ``bias_field`` is the log-amplitude of a smooth random field over a 3x3
    to 8x8 grid: it makes some objects much dimmer than others in the same crop, as
    in real images where a few bright cells set the top percentile (and as an
    MRI bias field does).
    """
    b = x.shape[0]

    def loguniform(lo: float, hi: float) -> torch.Tensor:
        return torch.from_numpy(np.exp(rng.uniform(np.log(lo), np.log(hi), (b, 1, 1, 1))).astype(np.float32))

    x = x * loguniform(0.3, 1.5)
    x = x + torch.from_numpy(rng.uniform(-0.1, 0.1, (b, 1, 1, 1)).astype(np.float32))
    x = torch.sign(x) * x.abs().pow(loguniform(0.6, 1.6))
    if bias_field > 0:
        grid = int(rng.integers(3, 9))
        coarse = torch.from_numpy(rng.normal(0, bias_field, (b, 1, grid, grid)).astype(np.float32))
        field_ = F.interpolate(coarse, size=x.shape[-2:], mode="bicubic", align_corners=True)
        x = x * torch.exp(field_)
    sigma = torch.from_numpy(rng.uniform(0, 0.06, (b, 1, 1, 1)).astype(np.float32))
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    return x + sigma * torch.randn(x.shape, generator=gen)


# ------------------------------------------------------------------- loss
def masked_loss(logits, target, mask, weight, num_classes: int) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice over annotated pixels."""
    logits = logits[:, :num_classes].float()
    ce = F.cross_entropy(logits, target.clamp_max(num_classes - 1), reduction="none")
    mw = mask.float() * weight
    denom = mw.sum().clamp_min(1.0)
    ce = (ce * mw).sum() / denom
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(target.clamp_max(num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    m = mask.float()[:, None]
    inter = (prob * onehot * m).sum((0, 2, 3))
    total = ((prob + onehot) * m).sum((0, 2, 3))
    present = onehot.mul(m).sum((0, 2, 3)) > 0
    dice = (2 * inter + 1) / (total + 1)
    fg = present.clone()
    fg[0] = False
    dice_loss = (1 - dice[fg]).mean() if fg.any() else logits.new_zeros(())
    return ce + dice_loss


# ------------------------------------------------------------- validation
MAX_VAL_PLANES = 24


@torch.no_grad()
def validation_dice(model: Model, samples: list[Sample], device: torch.device) -> float:
    """Mean foreground Dice over validation pixels (classes present in truth or prediction).

    At most ``MAX_VAL_PLANES`` planes, evenly spaced, so a validation stack of
    hundreds of slices does not eat the training time.
    """
    from .inference import predict_slice
    from .metrics import confusion, overlap_scores

    k = model.num_classes
    conf = np.zeros((k, k), np.int64)
    model.net.eval()
    val = [s for s in samples if s.val_mask.any()]
    if len(val) > MAX_VAL_PLANES:
        val = [val[i] for i in np.linspace(0, len(val) - 1, MAX_VAL_PLANES).round().astype(int)]
    for s in val:
        ys, xs = np.nonzero(s.val_mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        out = predict_slice(model, np.ascontiguousarray(s.image[:, y0:y1, x0:x1]), device, tile=512)
        pred = out[:k].argmax(0).numpy()
        m = s.val_mask[y0:y1, x0:x1]
        conf += confusion(pred[m], s.target[y0:y1, x0:x1][m], k)
    dice = overlap_scores(conf)["dice"][1:]
    vals = [d for d in dice if not math.isnan(d)]
    return float(np.mean(vals)) if vals else 0.0


# ------------------------------------------------------------------- train
def _set_lr(opt, settings: TrainSettings, step_fraction: float, elapsed: float) -> None:
    """Short warm-up, then cosine decay over whichever budget runs out first."""
    progress = step_fraction
    if settings.max_seconds:
        progress = max(progress, elapsed / settings.max_seconds)
    progress = min(progress, 1.0)
    warm = min(1.0, step_fraction * settings.epochs * settings.steps_per_epoch / 20)
    lr = settings.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr


def start_model(start: Model | str | os.PathLike | None, classes: Sequence[str] | None = None) -> Model:
    """The model to fine-tune: a copy of ``start`` (preset, file or Model).

    When ``classes`` differ in number from the start model's, every weight
    whose shape still fits is kept (the encoder and decoder) and the
    classifier head is re-initialised.
    """
    if start is None:
        start = "nuclei"
    if isinstance(start, str) and not isinstance(start, os.PathLike):
        from .presets import PRESETS

        try:
            base = load_model(start)
        except BadInputError:
            if start not in PRESETS:
                raise
            base = new_model(start)  # a preset without bundled weights: train from scratch
    else:
        base = load_model(start)
    model = copy.deepcopy(base)
    model.path = None
    if classes is not None and list(classes) != model.classes:
        classes = list(classes)
        if len(classes) != model.num_classes:
            cfg = model.config.to_dict()
            cfg["num_classes"] = len(classes)
            fresh = new_model(config=type(model.config).from_dict(cfg), classes=classes, name=model.name,
                              normalization=model.normalization,
                              postprocess={"instances": False} if len(classes) > 2 else model.postprocess)
            old = model.net.state_dict()
            new_state = fresh.net.state_dict()
            for key, value in new_state.items():
                if key in old and old[key].shape == value.shape:
                    new_state[key] = old[key]
            fresh.net.load_state_dict(new_state)
            model = fresh
        model.classes = classes
    return model


def train(
    start: Model | str | os.PathLike | None,
    images: Sequence,
    labels: Sequence,
    *,
    masks: Sequence | None = None,
    weights: Sequence | None = None,
    axis: int | None = None,
    channel_axis: int | None = None,
    classes: Sequence[str] | None = None,
    settings: TrainSettings | None = None,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    provenance: dict | None = None,
    callback: Callable[[dict], "bool | None"] | None = None,
    checkpoint: str | os.PathLike | None = None,
    **overrides,
) -> TrainResult:
    """Fine-tune ``start`` on annotated images; return the best model (and save it to ``out``).

    ``callback`` gets ``{"stage": "train", "epoch", "epochs", "step", "steps",
    "loss", "val_dice", "best_dice", "seconds"}`` after every step and epoch;
    returning ``False`` stops training, keeping the best weights so far.
    ``out`` is written once, atomically, at the end (also after a stop).
    ``checkpoint``: a file written atomically after every epoch; if it exists
    when training starts (same data and settings), training resumes from it.
    It is removed once training has finished.
    """
    settings = settings or TrainSettings()
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise TypeError(f"unknown training setting {key!r}")
        setattr(settings, key, value)
    settings.validate()
    if out is not None:
        out = os.fspath(out)
        if not out.endswith(".safetensors"):
            raise BadInputError(f"--out must end in .safetensors: {out}")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise BadInputError(f"cannot write {out}: folder {parent} does not exist")
    device = resolve_device(settings.device)
    model = start_model(start, classes)
    parent_name = _parent_name(start, model)
    samples, summary = build_samples(
        model, images, labels, masks, weights, axis, channel_axis, settings.val_fraction
    )

    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    net = model.net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    total_steps = settings.epochs * settings.steps_per_epoch
    best_state = copy.deepcopy(net.state_dict())
    best = validation_dice(model, samples, device)
    result = TrainResult(model=model, best_dice=best, device=describe_device(device), summary=summary)
    result.history.append({"epoch": 0, "loss": None, "val_dice": best, "seconds": 0.0})
    t0 = time.perf_counter()
    stale = 0
    stop = None
    first_epoch = 1
    fingerprint = json.dumps({"data": summary, "settings": _jsonable(vars(settings))}, sort_keys=True)
    if checkpoint is not None and os.path.exists(checkpoint):
        state = _load_checkpoint(checkpoint, net, opt, best_state, rng, fingerprint)
        best, stale, result.best_epoch = state["best"], state["stale"], state["best_epoch"]
        result.history = state["history"]
        first_epoch = state["epoch"] + 1
        t0 -= state["elapsed"]

    def tell(info: dict) -> None:
        nonlocal stop
        if callback is not None and callback({"stage": "train", **info}) is False:
            stop = "stopped"

    for epoch in range(first_epoch, settings.epochs + 1):
        net.train()
        losses = []
        for step in range(settings.steps_per_epoch):
            x, t, m, w = _crop_batch(samples, settings, rng)
            x, t, m, w = x.to(device), t.to(device), m.to(device), w.to(device)
            with autocast(device):
                logits = net(x)
            loss = masked_loss(logits, t, m, w, model.num_classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            elapsed = time.perf_counter() - t0
            _set_lr(opt, settings, ((epoch - 1) * settings.steps_per_epoch + step + 1) / total_steps, elapsed)
            tell({"epoch": epoch, "epochs": settings.epochs, "step": step + 1,
                  "steps": settings.steps_per_epoch, "loss": losses[-1], "val_dice": None,
                  "best_dice": best, "seconds": elapsed})
            if stop or (settings.max_seconds and elapsed > settings.max_seconds):
                stop = stop or "time budget"
                break
        val = validation_dice(model, samples, device)
        record = {"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": val,
                  "seconds": time.perf_counter() - t0}
        result.history.append(record)
        if val > best:
            best, stale = val, 0
            best_state = copy.deepcopy(net.state_dict())
            result.best_epoch = epoch
        else:
            stale += 1
        if checkpoint is not None:
            _save_checkpoint(checkpoint, net, opt, best_state, rng, fingerprint, {
                "epoch": epoch, "best": best, "stale": stale, "best_epoch": result.best_epoch,
                "history": result.history, "elapsed": time.perf_counter() - t0})
        tell({"epoch": epoch, "epochs": settings.epochs, "step": settings.steps_per_epoch,
              "steps": settings.steps_per_epoch, "loss": record["loss"], "val_dice": val,
              "best_dice": best, "seconds": record["seconds"], "epoch_end": True})
        if stop:
            break
        if stale >= settings.patience:
            stop = "early stopping"
            break
    net.load_state_dict(best_state)
    net.eval().to("cpu")
    result.stopped = stop or "epochs"
    result.best_dice = best
    result.seconds = time.perf_counter() - t0
    model.name = name or model.name
    model.scores = {"val_dice": round(best, 6)}
    model.provenance = {
        "parent": parent_name,
        "data": summary,
        "settings": _jsonable(vars(settings)),
        "training": {"best_epoch": result.best_epoch, "epochs_run": len(result.history) - 1,
                     "stopped": result.stopped, "seconds": round(result.seconds, 1),
                     "device": result.device},
        **(provenance or {}),
    }
    if out is not None:
        result.path = save_model(model, out)
    if checkpoint is not None and os.path.exists(checkpoint):
        os.remove(checkpoint)
    return result


def _parent_name(start, model: Model) -> str:
    """How provenance names the start model: a file's stem, or a preset's name."""
    from .presets import PRESETS

    if isinstance(start, str) and start in PRESETS:
        from .models import PRESET_DIR

        if not (PRESET_DIR / f"{start}.safetensors").is_file():
            return f"none (freshly initialised {start} architecture)"
    if isinstance(start, Model):
        return start.path.stem if start.path is not None else start.name
    if start is not None and (str(start).endswith(".safetensors") or os.path.isfile(start)):
        return os.path.basename(os.fspath(start)).removesuffix(".safetensors")
    return str(start) if start is not None else model.name


# ------------------------------------------------------------- checkpoints
def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _save_checkpoint(path, net, opt, best_state, rng, fingerprint: str, state: dict) -> None:
    """Weights, best weights, optimiser and RNG states, counters: one safetensors file."""
    from safetensors.torch import save

    from .files import write_bytes_atomic

    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    for idx, slots in opt.state_dict()["state"].items():
        for name, value in slots.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"fingerprint": fingerprint, "numpy_rng": rng.bit_generator.state, **state}
    write_bytes_atomic(path, save(tensors, metadata={"checkpoint": json.dumps(meta)}))


def _load_checkpoint(path, net, opt, best_state, rng, fingerprint: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = json.loads((fh.metadata() or {})["checkpoint"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise BadInputError(f"cannot resume from {path}: not a training checkpoint ({exc})") from exc
    if meta.get("fingerprint") != fingerprint:
        raise BadInputError(f"checkpoint {path} is from a run with other data or settings")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    best_state.update({k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
    opt_state = opt.state_dict()
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            slots.setdefault(int(idx), {})[name] = value
    opt_state["state"] = slots
    opt.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.torch"])
    rng.bit_generator.state = meta["numpy_rng"]
    return meta
