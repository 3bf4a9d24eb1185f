"""Limits that keep a small file from eating the machine.

An image file declares its size in its header; a few kilobytes of compressed
data can declare gigapixels. Every reader checks the declared size against
the pixel limit *before* decoding anything:

* at most ``max_pixels`` pixels (voxels; every time point counts), and
* at most ``4 * max_pixels`` decoded values (pixels times channels).

The default, ``DEFAULT_MAX_PIXELS`` = 2**26 = 67,108,864 pixels, admits an
8192 x 8192 plane or a 512 x 512 x 256 volume. Raise it with the
environment variable ``NAPARI_JOINTATTN_MAX_PIXELS`` (CLI and API) or per
call with ``read_image(path, max_pixels=N)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from ..errors import BadInputError

MAX_PIXELS_ENV = "NAPARI_JOINTATTN_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 2**26
#: decoded values (pixels x channels) may reach this many times the pixel limit (RGBA)
VALUES_PER_PIXEL = 4


def max_pixels(override: int | None = None) -> int:
    """The pixel limit in force: ``override``, else ``$NAPARI_JOINTATTN_MAX_PIXELS``, else the default."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 1:
            raise BadInputError(f"max_pixels must be a positive integer, got {override!r}")
        return override
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = -1
        value = int(value) if math.isfinite(value) and value == int(value) else -1
    if value < 1:
        raise BadInputError(f"{MAX_PIXELS_ENV} must be a positive integer of pixels, got {text!r}")
    return value


def check_decoded_size(name: str, spatial: Sequence[int], channels: int = 1,
                       limit: int | None = None) -> None:
    """Raise ``BadInputError`` when a header declares more than the limit allows.

    ``spatial``: the pixel axes (time points included); ``channels``: values per pixel.
    """
    limit = max_pixels(limit)
    pixels = math.prod(int(n) for n in spatial)
    values = pixels * max(1, int(channels))
    dims = " x ".join(str(int(n)) for n in spatial)
    how = (f"raise the limit with the environment variable {MAX_PIXELS_ENV}=N "
           "or read_image(..., max_pixels=N)")
    if pixels > limit:
        raise BadInputError(
            f"{name}: {dims} is {pixels:,} pixels, over the limit of {limit:,} pixels; {how}"
        )
    if values > VALUES_PER_PIXEL * limit:
        raise BadInputError(
            f"{name}: {dims} with {channels} channels is {values:,} values, over the limit of "
            f"{VALUES_PER_PIXEL * limit:,} ({VALUES_PER_PIXEL} x the pixel limit); {how}"
        )
