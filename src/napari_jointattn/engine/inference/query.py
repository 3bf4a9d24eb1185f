"""Where does one pixel's self-attention look? (the dock's query mode)

The row of the global attention of one module for one query pixel, computed
on the tile that contains the pixel. The tile's features are computed once
(one forward pass) and cached, so further clicks in the same tile cost
O(N d): well under the 0.2 s an interactive click needs on a CPU.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...model import AttentionKey
from ..errors import BadInputError
from ..io.channels import prepare_channels
from ..io.normalize import normalize
from ..models.model import Model, load_model
from .placement import inference_network


@dataclass
class QueryResult:
    """``heatmap`` (tile_h, tile_w) sums to ~1, placed at ``origin`` (row, col) of the 2-D image.

    ``module`` is the display name of the queried module (``key.name``).
    """

    heatmap: np.ndarray
    origin: tuple[int, int]
    module: str
    slice_index: int | None
    pointwise: np.ndarray | None = None
    mix: np.ndarray | None = None
    key: AttentionKey | None = None
    #: how strongly this row enters the module's output at the query pixel: gamma times the
    #: mixing weight lambda there (joint "mix" form), else gamma
    weight: float = 1.0

    @property
    def used(self) -> np.ndarray:
        """The row as the prediction uses it: ``heatmap * |weight|``."""
        return self.heatmap * abs(self.weight)


class AttentionQuery:
    """Interactive attention rows for one image (2-D, or a stack sliced along axis 0).

    ``module`` is an attention module with a global part: its :class:`AttentionKey`
    or display name (e.g. ``"joint 1/32"``); the default is the deepest one.
    The network runs on ``device`` without moving the model's shared network
    (see :mod:`.placement`), so queries may run while another thread segments.
    """

    def __init__(
        self,
        model: Model | str,
        image: np.ndarray,
        *,
        tile: int = 512,
        channel_axis: int | None = None,
        module: AttentionKey | str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = load_model(model)
        self.data = prepare_channels(image, self.model.in_channels, channel_axis)
        self.is_stack = self.data.ndim == 4
        self.tile = int(tile)
        self.device = torch.device(device)
        candidates = [key for key, m in self.model.net.attention_keys() if m.has_global_row]
        if not candidates:
            raise BadInputError("this model has no self- or joint-attention module to query")
        by_name = {key.name: key for key in candidates}
        wanted = module.name if isinstance(module, AttentionKey) else module
        if wanted is not None and wanted not in by_name:
            raise BadInputError(f"no module {wanted!r} with global attention (have {list(by_name)})")
        self.key = by_name[wanted] if wanted is not None else candidates[-1]
        self.module_name = self.key.name
        self.stride = self.key.stride
        self._pct = self.model.normalization.percentiles
        self._range = self.model.normalization.volume_range(self.data, self.is_stack)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.nn.Module]] = {}

    @property
    def plane_shape(self) -> tuple[int, int]:
        return tuple(self.data.shape[-3:-1])

    def _tile_origin(self, point: tuple[int, int]) -> tuple[int, int, int, int]:
        h, w = self.plane_shape
        th, tw = min(self.tile, h), min(self.tile, w)
        y0 = min(int(point[0]) // self.tile * self.tile, h - th)
        x0 = min(int(point[1]) // self.tile * self.tile, w - tw)
        return y0, x0, th, tw

    def _module_of(self, net: torch.nn.Module) -> torch.nn.Module:
        return dict(net.attention_keys())[self.key]

    def _features(self, z: int | None, y0: int, x0: int, th: int, tw: int
                  ) -> tuple[torch.Tensor, torch.nn.Module]:
        """The queried module's input features on a tile, and that module (on the device)."""
        key = (z, y0, x0, th, tw)
        if key not in self._cache:
            plane = self.data[z] if self.is_stack else self.data
            crop = np.moveaxis(plane[y0 : y0 + th, x0 : x0 + tw], -1, 0)
            if crop.dtype.kind == "f" and not np.isfinite(crop).any():
                raise BadInputError("this tile has no finite pixel")
            x, _ = normalize(crop, self._range, self._pct)
            x = self.model.normalization.enlarge(x)  # the scale the network works at
            captured = {}
            owner = threading.get_ident()
            net = inference_network(self.model.net, self.device)
            module = self._module_of(net)

            def hook(_m, args):  # the network may be running in other threads too
                if threading.get_ident() == owner:
                    captured["f"] = args[0]

            handle = module.register_forward_pre_hook(hook)
            try:
                with torch.inference_mode():
                    net(torch.from_numpy(x)[None].to(self.device))
            finally:
                handle.remove()
            self._cache.clear()  # one tile at a time: bounded memory
            self._cache[key] = (captured["f"], module)
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
        feats, module = self._features(slice_index, y0, x0, th, tw)
        s, z = self.stride, self.model.normalization.upsample  # z: the network sees the tile z times larger
        fy, fx = (r - y0) * z // s, (c - x0) * z // s
        with torch.inference_mode():
            row = module.attention_row(feats, fy * feats.shape[-1] + fx)[0]
            maps = module.maps(feats)
        fh, fw = math.ceil(th * z / s), math.ceil(tw * z / s)

        def up(t: torch.Tensor) -> np.ndarray:
            t = t[:fh, :fw].float()[None, None]
            full = F.interpolate(t, size=(fh * s, fw * s), mode="nearest")[..., : th * z, : tw * z]
            return (F.avg_pool2d(full, z) if z > 1 else full)[0, 0].cpu().numpy()

        heat = up(row) * float(z * z) / float(s * s)  # spread each cell's weight over its pixels
        weight = float(module.gamma.detach().float().reshape(-1)[0])
        if "mix" in maps:
            weight *= float(maps["mix"][0, min(fy, maps["mix"].shape[1] - 1), min(fx, maps["mix"].shape[2] - 1)])
        return QueryResult(
            heatmap=heat.astype(np.float32),
            origin=(y0, x0),
            module=self.module_name,
            slice_index=slice_index,
            pointwise=up(maps["pointwise"][0]) if "pointwise" in maps else None,
            mix=up(maps["mix"][0]) if "mix" in maps else None,
            key=self.key,
            weight=weight,
        )
