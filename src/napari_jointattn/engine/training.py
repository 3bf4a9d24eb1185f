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
import dataclasses
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

from .checks import check_axis, check_classes, check_output_file, check_seed, finite_number, to_array
from .devices import autocast, describe_device, resolve_device
from .errors import BadInputError
from .imageio import ImageFile, read_image, read_labels
from .inference import prepare_channels
from .labels import to_classes
from .models import Model, load_model, new_model, save_model
from .normalize import normalize, percentile_range
from .split import GAP_PIXELS, GAP_SLICES, split_samples  # noqa: F401  (re-exported)



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
    #: crop centres: "classes" (class-balanced) or "annotated" (see CropCentres)
    crop_sampling: str = "classes"
    #: validate every this many steps (and at every epoch end); 0: a quarter epoch
    val_every: int = 0
    #: two-class models: choose the foreground probability threshold on the validation pixels
    calibrate_threshold: bool = True
    #: weight of the soft Dice term of the loss (cross-entropy has weight 1)
    dice_weight: float = 1.0
    #: the classifier head: "auto" (re-initialised when the start model does not
    #: find the annotated structures), "keep" or "reset"
    head: str = "auto"

    def validate(self) -> None:
        """Every setting's type and range, before any data is read (``BadInputError``)."""

        def integer(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
                span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise BadInputError(f"{name} must be an integer {span}, got {v!r}")

        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, np.integer)) or self.epochs < 1:
            raise BadInputError(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.max_seconds is not None:
            finite_number(self.max_seconds, "max_seconds", 0, lo_open=True)
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise BadInputError(f"validation fraction must be in (0, 1), got {self.val_fraction!r}")
        integer("crop", 32, 8192)
        integer("batch_size", 1, 4096)
        integer("steps_per_epoch", 1)
        integer("patience", 0)
        finite_number(self.lr, "learning rate", 0, 10, lo_open=True)
        finite_number(self.weight_decay, "weight_decay", 0, 10)
        finite_number(self.bias_field, "bias_field", 0, 1)
        check_seed(self.seed)
        sr = self.scale_range
        if not isinstance(sr, (tuple, list)) or len(sr) != 2:
            raise BadInputError(f"scale_range must be (low, high), got {sr!r}")
        lo = finite_number(sr[0], "scale_range low", 0, lo_open=True)
        hi = finite_number(sr[1], "scale_range high", 0, 10)
        if not lo <= 1 <= hi or hi / lo > 100:
            raise BadInputError(f"scale_range must satisfy 0 < low <= 1 <= high <= 10, got {tuple(sr)!r}")
        if not isinstance(self.augment, (bool, np.bool_)):
            raise BadInputError(f"augment must be true or false, got {self.augment!r}")
        if self.crop_sampling not in ("classes", "annotated"):
            raise BadInputError(f"crop_sampling must be 'classes' or 'annotated', got {self.crop_sampling!r}")
        if not isinstance(self.val_every, int) or self.val_every < 0:
            raise BadInputError(f"val_every must be a non-negative integer, got {self.val_every!r}")
        if self.head not in ("auto", "keep", "reset"):
            raise BadInputError(f"head must be 'auto', 'keep' or 'reset', got {self.head!r}")


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
    best_step: int = 0
    best_dice: float = float("nan")
    start_dice: float = float("nan")
    improved: bool = False
    warnings: list[str] = field(default_factory=list)
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
        if image.time_axis is not None:
            raise BadInputError(f"{image.path.name} is a time series of {image.time_points} volumes; "
                                "training takes 2-D images and 3-D volumes")
        (arr, ch), ax = image.channels_last(), image.default_axis
    else:
        arr, ch, ax = to_array(image), None, 0
    lab = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else to_array(labels, "labels")
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
    axis = check_axis(axis)
    check_classes(model.classes)
    if masks is not None:
        masks = [None if m is None else to_array(m, f"mask {i + 1}") for i, m in enumerate(masks)]
    if weights is not None:
        checked = []
        for i, w in enumerate(weights):
            if w is not None:
                w = to_array(w, f"weight map {i + 1}")
                if w.dtype.kind == "f" and not np.isfinite(w).all():
                    raise BadInputError(f"weight map {i + 1} holds NaN or infinite values")
                if w.size and w.min() < 0:
                    raise BadInputError(f"weight map {i + 1} holds negative weights")
            checked.append(w)
        weights = checked
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
    split = split_samples(samples, val_fraction, k)
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
        "split": split.description,
        "split_kind": split.kind,
        "warnings": [split.warning] if split.warning else [],
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
class CropCentres:
    """Where crops are centred: class-balanced, or uniform over annotated pixels.

    ``"classes"`` (the default): each crop first draws a class uniformly among
    the classes annotated in the training part (background included), then a
    training pixel of that class, so a structure covering 1 % of the image is
    in about half the crops of a two-class task (as MONAI's
    ``RandCropByLabelClassesd`` with equal ratios). ``"annotated"``: a
    training plane, then any of its annotated pixels (the preset recipes).
    """

    def __init__(self, samples: list[Sample], mode: str) -> None:
        if mode not in ("classes", "annotated"):
            raise BadInputError(f"crop_sampling must be 'classes' or 'annotated', got {mode!r}")
        self.samples = samples
        self.per_plane = mode == "annotated"
        self.pools: list[tuple[np.ndarray, list[np.ndarray]]] = []  # per class: (cumulative counts, indices)
        groups: dict[int, list[tuple[int, np.ndarray]]] = {}
        for i, s in enumerate(samples):
            if not s.train_mask.any():
                continue
            if mode == "annotated":
                groups.setdefault(0, []).append((i, np.flatnonzero(s.train_mask).astype(np.int64)))
                continue
            flat_t = s.target.ravel()
            idx = np.flatnonzero(s.train_mask)
            cls = flat_t[idx]
            for c in np.unique(cls):
                groups.setdefault(int(c), []).append((i, idx[cls == c]))
        self.index: list[list[int]] = []
        for c in sorted(groups):
            members = groups[c]
            self.index.append([i for i, _ in members])
            self.pools.append((np.cumsum([len(ix) for _, ix in members]), [ix for _, ix in members]))

    def draw(self, rng: np.random.Generator) -> tuple[Sample, int, int]:
        g = int(rng.integers(len(self.pools)))
        cum, members = self.pools[g]
        if self.per_plane:
            m = int(rng.integers(len(members)))
            offset = int(rng.integers(len(members[m])))
        else:
            j = int(rng.integers(cum[-1]))
            m = int(np.searchsorted(cum, j, side="right"))
            offset = j - (int(cum[m - 1]) if m else 0)
        s = self.samples[self.index[g][m]]
        y, x = divmod(int(members[m][offset]), s.target.shape[1])
        return s, y, x


def _crop_batch(samples: list[Sample], settings: TrainSettings, rng: np.random.Generator,
                centres: CropCentres | None = None):
    """Random crops centred near annotated pixels (see ``CropCentres``) -> tensors."""
    centres = centres or CropCentres(samples, settings.crop_sampling)
    c = settings.crop
    xs, ts, ms, ws = [], [], [], []
    for _ in range(settings.batch_size):
        s, py, px = centres.draw(rng)
        scale = math.exp(rng.uniform(*np.log(settings.scale_range))) if settings.augment else 1.0
        size = max(16, int(round(c / scale)))
        cy = py + int(rng.integers(-size // 4, size // 4 + 1))
        cx = px + int(rng.integers(-size // 4, size // 4 + 1))
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
def masked_loss(logits, target, mask, weight, num_classes: int, dice_weight: float = 1.0) -> torch.Tensor:
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
    return ce + dice_weight * dice_loss


# ------------------------------------------------------------- validation
MAX_VAL_PLANES = 24


def _held_out_predictions(model: Model, samples: list[Sample], device, side: str = "val"):
    """(class probabilities, reference classes) at the pixels of ``side``, plane by plane.

    At most ``MAX_VAL_PLANES`` planes, evenly spaced, so a validation stack of
    hundreds of slices does not eat the training time. Each plane is cropped
    to the bounding box of its ``side`` pixels before prediction.
    """
    from .inference import predict_slice

    k = model.num_classes
    planes = [s for s in samples if getattr(s, f"{side}_mask").any()]
    if len(planes) > MAX_VAL_PLANES:
        planes = [planes[i] for i in np.linspace(0, len(planes) - 1, MAX_VAL_PLANES).round().astype(int)]
    was_training = model.net.training
    model.net.eval()
    try:
        for s in planes:
            mask = getattr(s, f"{side}_mask")
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            with torch.no_grad():
                out = predict_slice(model, np.ascontiguousarray(s.image[:, y0:y1, x0:x1]), device, tile=512)
            m = mask[y0:y1, x0:x1]
            yield out[:k][:, torch.from_numpy(m)], s.target[y0:y1, x0:x1][m]
    finally:
        model.net.train(was_training)


def validation_dice(model: Model, samples: list[Sample], device: torch.device, side: str = "val") -> float:
    """Mean Dice over the foreground classes present in the reference pixels of ``side``.

    ``side`` is "val" (the validation pixels) or "train". Classes absent from
    the reference are not averaged (a prediction cannot score on them), so an
    empty reference gives NaN, never a Dice of 0.
    """
    from .metrics import confusion, overlap_scores

    k = model.num_classes
    conf = np.zeros((k, k), np.int64)
    for probs, truth in _held_out_predictions(model, samples, device, side):
        conf += confusion(classes_from_probs(model, probs), truth, k)
    dice = overlap_scores(conf)["dice"]
    present = [c for c in range(1, k) if conf[c].sum() > 0]  # rows: reference classes
    return float(np.mean([dice[c] for c in present])) if present else float("nan")


def classes_from_probs(model: Model, probs: torch.Tensor) -> np.ndarray:
    """Class per pixel (probs: classes first) as segment() decides it: argmax, or a threshold."""
    thr = model.postprocess.get("threshold")
    if model.num_classes == 2 and thr is not None:
        return (probs[1] > thr).numpy().astype(np.int64)
    return probs.argmax(0).numpy()


THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(2, 20))  # 0.10 ... 0.95


def calibrate_threshold(model: Model, samples: list[Sample], device) -> tuple[float, float, float] | None:
    """The foreground probability threshold of a two-class model that maximises validation Dice.

    Returns (threshold, Dice at 0.5, Dice at the threshold), or None when the
    model has more than two classes or the validation pixels hold no
    foreground. Ties go to the threshold nearest 0.5.
    """
    if model.num_classes != 2:
        return None
    pairs = list(_held_out_predictions(model, samples, device))
    if not pairs:
        return None
    p = np.concatenate([probs[1].numpy() for probs, _ in pairs])
    t = np.concatenate([truth == 1 for _, truth in pairs])
    if not t.any():
        return None

    def dice(th: float) -> float:
        pred = p > th
        return float(2 * (pred & t).sum() / max(1, pred.sum() + t.sum()))

    scores = {th: dice(th) for th in THRESHOLDS}
    best = max(scores, key=lambda th: (round(scores[th], 6), -abs(th - 0.5)))
    return best, dice(0.5), scores[best]


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
    return _start_model(start, classes)[0]


def _start_model(start, classes) -> tuple[Model, bool]:
    """start_model(), and whether the head was re-initialised for a new number of classes."""
    head_reset = False
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
            head_reset = True
        model.classes = classes
    return model, head_reset


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
    save_unchanged: bool = True,
    **overrides,
) -> TrainResult:
    """Fine-tune ``start`` on annotated images; return the best model (and save it to ``out``).

    ``callback`` gets ``{"stage": "train", "epoch", "epochs", "step", "steps",
    "loss", "val_dice", "best_dice", "seconds"}`` after every step (``val_dice``
    None) and after every validation (``val_dice`` set; the first, with
    ``epoch`` 0, is the start model's score; ``epoch_end`` True at the end of
    an epoch); returning ``False`` stops training, keeping the best
    weights so far. Validation runs every ``val_every`` steps and at each
    epoch end, so a short time budget can still pick trained weights.

    The start model is scored on the validation pixels first; if no later
    validation beats it, ``result.improved`` is False, ``result.warnings``
    says so, and so does the saved file's metadata. ``save_unchanged=False``
    then writes no file at all (``result.path`` stays None).
    ``out`` is written once, atomically, at the end (also after a stop).
    ``checkpoint``: a file written atomically after every epoch; if it exists
    when training starts (same data and settings), training resumes from it.
    It is removed once training has finished.
    """
    settings = dataclasses.replace(settings) if settings is not None else TrainSettings()
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise TypeError(f"unknown training setting {key!r}")
        setattr(settings, key, value)
    settings.validate()
    if out is not None:
        out = check_output_file(out)
    classes = check_classes(classes)
    axis = check_axis(axis)
    device = resolve_device(settings.device)
    model, head_reset = _start_model(start, classes)
    parent_name = _parent_name(start, model)
    samples, summary = build_samples(
        model, images, labels, masks, weights, axis, channel_axis, settings.val_fraction
    )
    warnings_: list[str] = list(summary.get("warnings", []))

    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    net = model.net.to(device)
    # the bar to beat, and what is handed back if nothing beats it: the start model as given
    # (before any head reset; with a new number of classes its head is new anyway)
    best_state = copy.deepcopy(net.state_dict())
    start_dice = validation_dice(model, samples, device)
    best = start_dice
    head = _decide_head(model, samples, settings.head, device, reset_already=head_reset,
                        seed=settings.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    total_steps = settings.epochs * settings.steps_per_epoch
    val_every = settings.val_every or max(1, settings.steps_per_epoch // 4)
    centres = CropCentres(samples, settings.crop_sampling)
    result = TrainResult(model=model, best_dice=best, start_dice=start_dice,
                         device=describe_device(device), summary=summary)
    result.history.append({"epoch": 0, "step": 0, "loss": None, "val_dice": best, "seconds": 0.0})
    t0 = time.perf_counter()
    stop = None
    first_epoch = 1
    step_no = 0  # optimisation steps so far
    improved_epoch = 0  # the last epoch whose validation beat the best so far
    fingerprint = json.dumps({"data": summary, "settings": _jsonable(vars(settings))}, sort_keys=True)
    if checkpoint is not None and os.path.exists(checkpoint):
        state = _load_checkpoint(checkpoint, net, opt, best_state, rng, fingerprint)
        best, result.best_epoch, result.best_step = state["best"], state["best_epoch"], state["best_step"]
        improved_epoch, step_no = state["improved_epoch"], state["step_no"]
        result.history = state["history"]
        first_epoch = state["epoch"] + 1
        t0 -= state["elapsed"]

    def tell(info: dict) -> None:
        nonlocal stop
        if callback is not None and callback({"stage": "train", "epochs": settings.epochs,
                                              "steps": settings.steps_per_epoch, **info}) is False:
            stop = "stopped"

    def validate(epoch: int, step: int, losses: list[float], report: bool = True) -> dict:
        nonlocal best, best_state, improved_epoch
        val = validation_dice(model, samples, device)
        record = {"epoch": epoch, "step": step_no, "loss": float(np.mean(losses)) if losses else None,
                  "val_dice": val, "seconds": time.perf_counter() - t0}
        result.history.append(record)
        if _better(val, best):
            best = val
            best_state = copy.deepcopy(net.state_dict())
            result.best_epoch, result.best_step, improved_epoch = epoch, step_no, epoch
        if report:
            tell({"epoch": epoch, "step": step, "loss": record["loss"], "val_dice": val, "best_dice": best,
                  "seconds": record["seconds"]})
        return record

    if first_epoch == 1:  # the bar to beat, first in every progress report
        tell({"epoch": 0, "step": 0, "loss": None, "val_dice": start_dice, "best_dice": start_dice,
              "seconds": 0.0})
    for epoch in range(first_epoch, settings.epochs + 1):
        net.train()
        losses: list[float] = []
        since_val: list[float] = []
        for step in range(settings.steps_per_epoch):
            # the schedule sets this step's rate before the step (the first step warms up too)
            _set_lr(opt, settings, (step_no + 1) / total_steps, time.perf_counter() - t0)
            x, t, m, w = _crop_batch(samples, settings, rng, centres)
            x, t, m, w = x.to(device), t.to(device), m.to(device), w.to(device)
            with autocast(device):
                logits = net(x)
            loss = masked_loss(logits, t, m, w, model.num_classes, settings.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_no += 1
            losses.append(float(loss.detach()))
            since_val.append(losses[-1])
            elapsed = time.perf_counter() - t0
            tell({"epoch": epoch, "step": step + 1, "loss": losses[-1], "val_dice": None,
                  "best_dice": best, "seconds": elapsed, "lr": opt.param_groups[0]["lr"]})
            if stop or (settings.max_seconds and elapsed > settings.max_seconds):
                stop = stop or "time budget"
                break
            if (step + 1) % val_every == 0 and step + 1 < settings.steps_per_epoch:
                validate(epoch, step + 1, since_val)
                since_val = []
                net.train()
                if stop:
                    break
        record = validate(epoch, settings.steps_per_epoch, losses, report=False)  # told after the checkpoint
        record["epoch_end"] = True
        if checkpoint is not None:
            _save_checkpoint(checkpoint, net, opt, best_state, rng, fingerprint, {
                "epoch": epoch, "best": best, "best_epoch": result.best_epoch, "best_step": result.best_step,
                "improved_epoch": improved_epoch, "step_no": step_no, "history": result.history,
                "elapsed": time.perf_counter() - t0})
        tell({"epoch": epoch, "step": settings.steps_per_epoch, "loss": record["loss"],
              "val_dice": record["val_dice"], "best_dice": best, "seconds": record["seconds"],
              "epoch_end": True})
        if stop:
            break
        # a time budget is the user's to spend: patience ends epoch-budgeted runs only
        if not settings.max_seconds and epoch - improved_epoch >= settings.patience:
            stop = "early stopping"
            break
    net.load_state_dict(best_state)
    threshold_note = None
    # only trained weights get a threshold: a start model handed back keeps its own
    if settings.calibrate_threshold and result.best_step > 0 and summary.get("split_kind") != "training":
        found = calibrate_threshold(model, samples, device)
        if found is not None:
            th, at_half, at_th = found
            model.postprocess = {**model.postprocess, "threshold": th}
            threshold_note = {"threshold": th, "val_dice_at_0.5": round(at_half, 4),
                              "val_dice_at_threshold": round(at_th, 4)}
    net.eval().to("cpu")
    result.stopped = stop or "epochs"
    result.best_dice = best
    result.improved = result.best_step > 0
    result.seconds = time.perf_counter() - t0
    if not result.improved:
        warnings_.append(
            f"no improvement over the start model: its validation Dice {_fmt(start_dice)} was never beaten, "
            "so the result is the start model unchanged (train longer, annotate more, or check the labels)")
    result.warnings = warnings_
    model.name = name or model.name
    model.scores = {"val_dice": round(best, 6) if math.isfinite(best) else None,
                    "start_val_dice": round(start_dice, 6) if math.isfinite(start_dice) else None}
    model.provenance = {
        "parent": parent_name,
        "data": summary,
        "settings": _jsonable(vars(settings)),
        "training": {"best_epoch": result.best_epoch, "best_step": result.best_step,
                     "epochs_run": max((h["epoch"] for h in result.history), default=0),
                     "steps_run": step_no, "stopped": result.stopped, "seconds": round(result.seconds, 1),
                     "device": result.device, "head": head, "improved": result.improved,
                     "threshold": threshold_note,
                     "warnings": warnings_},
        **(provenance or {}),
    }
    if out is not None and (result.improved or save_unchanged):
        result.path = save_model(model, out)
    if checkpoint is not None and os.path.exists(checkpoint):
        os.remove(checkpoint)
    return result


def _better(value: float, best: float) -> bool:
    return math.isfinite(value) and (not math.isfinite(best) or value > best)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


HEAD_RESET_DICE = 0.2


def _decide_head(model: Model, samples: list[Sample], mode: str, device, reset_already: bool = False,
                 seed: int = 0) -> str:
    """Keep or re-initialise the classifier head; returns what was done and why (for provenance).

    ``auto``: the head is re-initialised when the start model's Dice on the
    training annotations is below ``HEAD_RESET_DICE``: its classes then mean
    something else (nuclei -> a brain lesion), and a head that confidently
    predicts the old structure must first be unlearned. The encoder and
    decoder are kept either way.
    """
    if reset_already:
        return "re-initialised (the number of classes changed)"
    if mode == "keep" or not hasattr(model.net, "head_modules"):
        return "kept"
        return "kept (head='keep')"
    if mode == "reset":
        _reset_head(model, seed)
        return "re-initialised (head='reset')"
    dice = validation_dice(model, samples, device, side="train")
    if math.isfinite(dice) and dice >= HEAD_RESET_DICE:
        return f"kept: the start model's Dice on the training annotations is {dice:.3f}"
    _reset_head(model, seed)
    return (f"re-initialised: the start model's Dice on the training annotations is {_fmt(dice)}, "
            f"below {HEAD_RESET_DICE}")


def _reset_head(model: Model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for module in model.net.head_modules():
        for p in module.parameters(recurse=False):
            fresh = torch.zeros(p.shape)  # on the CPU, where the generator is
            if p.ndim > 1:
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
            with torch.no_grad():
                p.copy_(fresh)


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
