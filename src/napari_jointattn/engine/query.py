"""Where does one pixel's self-attention look? (the dock's query mode)

The row of the global attention of one module for one query pixel, computed
on the tile that contains the pixel. The tile's features are computed once
(one forward pass) and cached, so further clicks in the same tile cost
O(N d): well under the 0.2 s an interactive click needs on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BadInputError
from .inference import prepare_channels
from .models import Model, load_model
from .normalize import normalize, percentile_range


@dataclass
class QueryResult:
    """``heatmap`` (tile_h, tile_w) sums to ~1, placed at ``origin`` (row, col) of the 2-D image."""

    heatmap: np.ndarray
    origin: tuple[int, int]
    module: str
    slice_index: int | None
    pointwise: np.ndarray | None = None
    mix: np.ndarray | None = None


class AttentionQuery:
    """Interactive attention rows for one image (2-D, or a stack sliced along axis 0).

    ``module`` names an attention module with a global part (e.g. ``"joint 1/32"``);
    the default is the deepest one.
    """

    def __init__(
        self,
        model: Model | str,
        image: np.ndarray,
        *,
        tile: int = 512,
        channel_axis: int | None = None,
        module: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = load_model(model)
        self.data = prepare_channels(image, self.model.in_channels, channel_axis)
        self.is_stack = self.data.ndim == 4
        self.tile = int(tile)
        self.device = torch.device(device)
        candidates = [(n, m) for n, m in self.model.net.attention_modules() if m.kind != "pointwise"]
        if not candidates:
            raise BadInputError("this model has no self- or joint-attention module to query")
        names = [n for n, _ in candidates]
        self.module_name = module or names[-1]
        if self.module_name not in names:
            raise BadInputError(f"no module {self.module_name!r} with global attention (have {names})")
        self.module = dict(candidates)[self.module_name]
        self.stride = int(self.module_name.rsplit("/", 1)[1])
        pct = tuple(self.model.normalization.get("percentiles", (1.0, 99.8)))
        self._pct = pct
        self._range = (
            percentile_range(self.data, *pct)
            if self.is_stack and self.model.normalization.get("per") == "volume"
            else None
        )
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def plane_shape(self) -> tuple[int, int]:
        return tuple(self.data.shape[-3:-1])

    def _tile_origin(self, point: tuple[int, int]) -> tuple[int, int, int, int]:
        h, w = self.plane_shape
        th, tw = min(self.tile, h), min(self.tile, w)
        y0 = min(int(point[0]) // self.tile * self.tile, h - th)
        x0 = min(int(point[1]) // self.tile * self.tile, w - tw)
        return y0, x0, th, tw

    def _features(self, z: int | None, y0: int, x0: int, th: int, tw: int) -> torch.Tensor:
        key = (z, y0, x0, th, tw)
        if key not in self._cache:
            plane = self.data[z] if self.is_stack else self.data
            crop = np.moveaxis(plane[y0 : y0 + th, x0 : x0 + tw], -1, 0)
            if crop.dtype.kind == "f" and not np.isfinite(crop).any():
                raise BadInputError("this tile has no finite pixel")
            x, _ = normalize(crop, self._range, self._pct)
            captured = {}
            net = self.model.net.eval().to(self.device)
            handle = self.module.register_forward_pre_hook(
                lambda _m, args: captured.__setitem__("f", args[0])
            )
            try:
                with torch.inference_mode():
                    net(torch.from_numpy(x)[None].to(self.device))
            finally:
                handle.remove()
            self._cache.clear()  # one tile at a time: bounded memory
            self._cache[key] = captured["f"]
        return self._cache[key]

    def query(self, point: tuple[int, int], slice_index: int | None = None) -> QueryResult:
        """Attention row for the pixel ``point`` = (row, col) of the (current) 2-D plane."""
        h, w = self.plane_shape
        r, c = int(point[0]), int(point[1])
        if not (0 <= r < h and 0 <= c < w):
            raise BadInputError(f"pixel {(r, c)} is outside the image ({h} x {w})")
        if self.is_stack:
            if slice_index is None or not 0 <= slice_index < self.data.shape[0]:
                raise BadInputError("give the slice index of the clicked pixel")
        else:
            slice_index = None
        y0, x0, th, tw = self._tile_origin((r, c))
        feats = self._features(slice_index, y0, x0, th, tw)
        s = self.stride
        fy, fx = (r - y0) // s, (c - x0) // s
        with torch.inference_mode():
            row = self.module.attention_row(feats, fy * feats.shape[-1] + fx)[0]
            maps = self.module.maps(feats)
        fh, fw = math.ceil(th / s), math.ceil(tw / s)

        def up(t: torch.Tensor) -> np.ndarray:
            t = t[:fh, :fw].float()[None, None]
            full = F.interpolate(t, size=(fh * s, fw * s), mode="nearest")[0, 0, :th, :tw]
            return full.cpu().numpy()

        heat = up(row) / float(s * s)  # spread each cell's weight over its pixels
        return QueryResult(
            heatmap=heat.astype(np.float32),
            origin=(y0, x0),
            module=self.module_name,
            slice_index=slice_index,
            pointwise=up(maps["pointwise"][0]) if "pointwise" in maps else None,
            mix=up(maps["mix"][0]) if "mix" in maps else None,
        )
