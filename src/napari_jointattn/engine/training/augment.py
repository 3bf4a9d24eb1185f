"""Training crops: where they are centred, and their augmentation."""

from __future__ import annotations

import contextlib
import math
import threading

import monai.transforms as mt
import numpy as np
import torch

from ..errors import BadInputError
from .data import Sample
from .settings import TrainSettings


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


class CropBatches:
    """Training batches: crops centred by ``CropCentres``, augmented by MONAI.

    Each crop is a dictionary of ``image`` (C, h, w), ``label``, ``mask`` and
    ``weight`` (1, h, w) that goes through MONAI dictionary transforms, so the
    four stay paired by construction: a window of ``crop / (scale * upsample)``
    pixels around the drawn centre (edge-padded image, zero-padded rest: no
    loss outside the plane), resized to ``crop`` (the network sees the image
    enlarged ``upsample`` times, as
    :func:`~napari_jointattn.engine.inference.segment.predict_slice` shows it), turned
    by a multiple of 90 degrees and flipped; then the image alone: contrast,
    brightness, gamma, a smooth multiplicative bias field and noise.

    The random draws all come from ``rng`` (MONAI's transforms are re-seeded
    from it for every batch), so a run is reproduced by its seed and resumed
    from a checkpoint of ``rng``.
    """

    KEYS = ("image", "label", "mask", "weight")

    def __init__(self, samples: list[Sample], settings: TrainSettings, centres: CropCentres | None = None,
                 upsample: int = 1, intensity: bool = True) -> None:
        self.samples = samples
        self.settings = settings
        self.centres = centres or CropCentres(samples, settings.crop_sampling)
        self.upsample = upsample
        c = settings.crop
        steps: list = [mt.Resized(self.KEYS, (c, c), mode=("bilinear", "nearest", "nearest", "nearest"))]
        if settings.augment:
            steps += [mt.RandRotate90d(self.KEYS, prob=0.75, max_k=3),  # k = 0, 1, 2, 3 alike
                      mt.RandFlipd(self.KEYS, prob=0.5, spatial_axis=1)]
            if settings.elastic > 0:  # shapes that vary as a structure does from slice to slice
                steps.append(mt.Rand2DElasticd(
                    self.KEYS, spacing=(32, 32), magnitude_range=(2, 4), prob=settings.elastic,
                    mode=("bilinear", "nearest", "nearest", "nearest"),
                    padding_mode=("border", "zeros", "zeros", "zeros")))
            if intensity:
                steps += _intensity(settings.bias_field)
        self.transform = mt.Compose(steps)

    def crop(self, rng: np.random.Generator) -> dict:
        """One window around a drawn centre, before resizing (numpy, padded outside the plane)."""
        s, py, px = self.centres.draw(rng)
        settings = self.settings
        scale = math.exp(rng.uniform(*np.log(settings.scale_range))) if settings.augment else 1.0
        size = max(16, int(round(settings.crop / (scale * self.upsample))))
        cy = py + int(rng.integers(-size // 4, size // 4 + 1))
        cx = px + int(rng.integers(-size // 4, size // 4 + 1))
        h, w = s.target.shape
        y0, x0 = cy - size // 2, cx - size // 2
        weight = s.weight if s.weight is not None else np.ones((h, w), np.float32)
        plane = {"image": s.image, "label": s.target[None].astype(np.float32),
                 "mask": s.train_mask[None].astype(np.float32), "weight": weight[None].astype(np.float32)}
        inside = mt.SpatialCropd(self.KEYS, roi_start=(max(0, y0), max(0, x0)),
                                 roi_end=(min(h, y0 + size), min(w, x0 + size)))
        pad = mt.BorderPadd(self.KEYS, spatial_border=(max(0, -y0), max(0, y0 + size - h),
                                                       max(0, -x0), max(0, x0 + size - w)),
                            mode=("edge", "constant", "constant", "constant"))
        return pad(inside(plane))

    def __call__(self, rng: np.random.Generator):
        """A batch: image (B, C, crop, crop) float, target (B, crop, crop) long, mask bool, weight float."""
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        with _plain_tensors():
            crops = [self.transform(self.crop(rng)) for _ in range(self.settings.batch_size)]

        def stack(key):
            return torch.stack([torch.as_tensor(np.asarray(d[key]), dtype=torch.float32) for d in crops])

        return stack("image"), stack("label")[:, 0].round().long(), stack("mask")[:, 0] > 0.5, stack("weight")[:, 0]


@contextlib.contextmanager
def _plain_tensors():
    """MONAI without its metadata tracking (2.5x faster crops; nothing here reads the metadata).

    The switch is process-wide in MONAI, so it is restored at once.
    """
    from monai.data import get_track_meta, set_track_meta

    with _META_LOCK:
        before = get_track_meta()
        set_track_meta(False)
        try:
            yield
        finally:
            set_track_meta(before)


_META_LOCK = threading.Lock()


def _intensity(bias_field: float) -> list:
    """The image's intensity changes: contrast x0.3-1.5, brightness +-0.1, gamma 0.6-1.6, bias field, noise.

    ``bias_field`` is the amplitude of a smooth random multiplicative field
    (``exp`` of a cubic polynomial, MONAI's ``RandBiasField``): it makes some
    objects much dimmer than others in the same crop, as in real images where
    a few bright cells set the top percentile (and as an MRI bias field does).
    The polynomial's coefficients are drawn in +-1.3 ``bias_field``: the
    field's log then has a standard deviation over a crop of about
    0.75 ``bias_field`` (measured over 200 draws).
    """
    steps = [mt.RandScaleIntensityd("image", factors=(-0.7, 0.5), prob=1.0),
             mt.RandShiftIntensityd("image", offsets=0.1, prob=1.0),
             mt.RandAdjustContrastd("image", gamma=(0.6, 1.6), prob=1.0)]
    if bias_field > 0:
        steps.append(mt.RandBiasFieldd("image", degree=3, coeff_range=(-1.3 * bias_field, 1.3 * bias_field), prob=1.0))
    steps.append(mt.RandGaussianNoised("image", std=0.06, sample_std=True, prob=1.0))
    return steps
