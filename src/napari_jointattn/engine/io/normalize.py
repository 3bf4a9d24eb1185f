"""Robust, percentile-based intensity normalisation (the one routine used everywhere).

:class:`Normalization` is a model's setting (which percentiles map to 0 and 1,
per 2-D image or per volume); its methods are the only place that reads it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from ..errors import BadInputError

#: Percentiles mapped to 0 and 1.
DEFAULT_PERCENTILES = (1.0, 99.8)
#: At most this many pixels are sampled to estimate the percentiles.
SAMPLE = 1 << 22


class Record(BaseModel):
    """A frozen, validated settings object that also reads like the dict it replaces.

    ``record["key"]``, ``record.get("key", default)``, ``"key" in record``,
    ``dict(record)`` and ``{**record}`` see the fields that are set (not None),
    so code written for the old metadata dicts keeps working.
    """

    model_config = ConfigDict(strict=True, frozen=True)

    def to_dict(self) -> dict:
        """Plain JSON values (the form stored in model files)."""
        return self.model_dump(mode="json", exclude_none=True)

    def keys(self):
        return self.model_dump(exclude_none=True).keys()

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key) if key in type(self).model_fields else None
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # a mapping's keys
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` (None removes an optional field)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @classmethod
    def coerce(cls, value: Any):
        """``value`` as this type: the object itself, or a mapping validated (``BadInputError``)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise BadInputError(f"{cls.__name__.lower()} must be a mapping, got {type(value).__name__}")
        from pydantic import ValidationError

        try:  # NumPy scalars (a computed size or threshold) count as the Python numbers they hold
            return cls.model_validate({k: _plain(v) for k, v in dict(value).items()})
        except ValidationError as exc:
            raise BadInputError(f"invalid {cls.__name__.lower()} settings: {describe_error(exc)}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def describe_error(exc) -> str:
    """The first error of a pydantic ``ValidationError`` as ``"where what"`` in one line."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    simple = {"int_type": "must be an integer", "int_from_float": "must be an integer",
              "float_type": "must be a number", "bool_type": "must be true or false",
              "string_type": "must be a string", "list_type": "must be a list",
              "tuple_type": "must be a list", "dict_type": "must be an object",
              "model_type": "must be an object", "extra_forbidden": "is not a known key",
              "missing": "is missing"}
    bounds = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}
    if kind in simple:
        what = simple[kind]
    elif kind in bounds:
        what = f"is out of range: must be {bounds[kind]} {next(iter(ctx.values()), '?')}"
    elif kind in ("too_long", "too_short"):
        what = f"must have {ctx.get('min_length', 0)} to {ctx.get('max_length', '?')} entries"
    elif kind == "literal_error":
        what = f"must be {ctx.get('expected', 'one of the known values')}"
    elif kind == "value_error":  # the validators' own messages say where
        return str(ctx.get("error", err.get("msg", "")))
    else:
        what = f"is invalid ({err.get('msg', kind)})"
    value = err.get("input")
    shown = type(value).__name__ if isinstance(value, (dict, list)) else repr(value)
    return f"{loc} {what} (got {shown[:60]})".strip()


Number = Annotated[float, Strict()]


class Normalization(Record):
    """Which intensity percentiles map to 0 and 1, estimated per 2-D image or per volume."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    percentiles: Annotated[tuple[Number, Number], Strict(False)] = (1.0, 99.8)
    per: Literal["image", "volume"] = "image"
    #: planes are enlarged by this factor (in-plane) before the network and its
    #: outputs averaged back to the image's grid: fine-tuning sets 2 for
    #: structures a few pixels thin, so their borders are placed at sub-pixel precision
    upsample: Annotated[int, Field(ge=1, le=4)] = 1

    @model_validator(mode="after")
    def _ordered(self) -> Normalization:
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError("normalization.percentiles must be [low, high] with 0 <= low < high <= 100")
        return self

    def enlarge(self, x: np.ndarray, factor: int | None = None) -> np.ndarray:
        """A normalised (C, H, W) plane enlarged ``factor`` (default ``upsample``) times, bilinearly."""
        factor = self.upsample if factor is None else factor
        if factor == 1:
            return x
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
        return F.interpolate(t, scale_factor=factor, mode="bilinear", align_corners=False)[0].numpy()

    def volume_range(self, data: np.ndarray, is_stack: bool = True) -> tuple[float, float] | None:
        """(lo, hi) of a whole stack when this model normalises per volume, else None (per plane)."""
        return percentile_range(data, *self.percentiles) if self.per == "volume" and is_stack else None

    def apply(self, image: np.ndarray, value_range: tuple[float, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """:func:`normalize` with these percentiles (``value_range`` from :meth:`volume_range`)."""
        return normalize(image, value_range, self.percentiles)


def percentile_range(
    image: np.ndarray, low: float = DEFAULT_PERCENTILES[0], high: float = DEFAULT_PERCENTILES[1]
) -> tuple[float, float]:
    """(lo, hi) intensity percentiles of the finite pixels, estimated on a strided sample."""
    flat = np.asarray(image).reshape(-1)
    step = max(1, flat.size // SAMPLE)
    sample = flat[::step].astype(np.float64, copy=False)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        finite_any = np.isfinite(flat).any() if step > 1 else False
        if not finite_any:
            raise BadInputError("the image has no finite pixel (all NaN or infinite)")
        sample = flat[np.isfinite(flat)].astype(np.float64)
    lo, hi = np.percentile(sample, [low, high])
    return float(lo), float(hi)


def normalize(
    image: np.ndarray,
    value_range: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Map intensities so the given percentiles go to 0 and 1 (float32).

    Returns ``(normalised, nonfinite)`` where ``nonfinite`` is a boolean mask
    of NaN/inf pixels (set to 0 in the output and to be labelled background),
    or None when every pixel is finite. ``value_range`` reuses a (lo, hi)
    computed elsewhere, e.g. once for a whole volume.
    """
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    lo, hi = value_range if value_range is not None else percentile_range(image, *percentiles)
    # float64 input is scaled in float64: values beyond float32's range are
    # finite data, not NaN/inf
    work = np.float64 if image.dtype == np.float64 else np.float32
    out = image.astype(work)
    nonfinite = None
    if image.dtype.kind == "f":
        bad = ~np.isfinite(out)
        if bad.any():
            if bad.all():
                raise BadInputError("the image has no finite pixel (all NaN or infinite)")
            warnings.warn(
                f"{int(bad.sum())} NaN/infinite pixels are treated as background",
                stacklevel=2,
            )
            nonfinite = bad
            out[bad] = lo
    out -= work(lo)
    scale = hi - lo
    if scale > 0 and np.isfinite(scale):
        out *= work(1.0 / scale)
    else:
        out[...] = 0.0
    # keep extreme outliers from dominating float32 arithmetic downstream
    np.clip(out, -10.0, 10.0, out=out)
    return out.astype(np.float32, copy=False), nonfinite
