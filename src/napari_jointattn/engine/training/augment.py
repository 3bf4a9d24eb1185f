"""Training crops: where they are centred, and their augmentation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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


def _crop_batch(samples: list[Sample], settings: TrainSettings, rng: np.random.Generator,
                centres: CropCentres | None = None, upsample: int = 1):
    """Random crops centred near annotated pixels (see ``CropCentres``) -> tensors.

    Each crop is a window of ``crop / (scale * upsample)`` pixels resized to
    ``crop``: the network sees the image enlarged ``upsample`` times, as
    :func:`~napari_jointattn.engine.inference.predict_slice` shows it.
    """
    centres = centres or CropCentres(samples, settings.crop_sampling)
    c = settings.crop
    xs, ts, ms, ws = [], [], [], []
    for _ in range(settings.batch_size):
        s, py, px = centres.draw(rng)
        scale = math.exp(rng.uniform(*np.log(settings.scale_range))) if settings.augment else 1.0
        size = max(16, int(round(c / (scale * upsample))))
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
