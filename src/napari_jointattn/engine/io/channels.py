"""The channel rule: which axis of an image holds channels, and matching the model's count.

One rule for segmentation, training and attention queries.
"""

from __future__ import annotations

import numpy as np

from ..checks import to_array
from ..errors import BadInputError


def prepare_channels(
    image: np.ndarray, in_channels: int, channel_axis: int | None = None
) -> np.ndarray:
    """Return the image as (spatial..., in_channels) with a documented rule.

    * ``channel_axis`` given: that axis holds channels.
    * otherwise a 3-D array whose last axis has 3 or 4 entries (and whose
      other axes are larger) is RGB(A);
    * otherwise, for a multi-channel model, a first or last axis of exactly
      ``in_channels`` entries is the channel axis;
    * otherwise there is no channel axis.

    A 1-channel model given several channels uses their mean (alpha
    dropped). Spatial dimensionality must be 2 or 3.
    """
    arr = to_array(image)
    if arr.ndim < 2:
        raise BadInputError(f"an image needs at least 2 dimensions, got shape {arr.shape}")
    if channel_axis is not None:
        if not -arr.ndim <= channel_axis < arr.ndim:
            raise BadInputError(f"channel axis {channel_axis} does not exist in shape {arr.shape}")
        arr = np.moveaxis(arr, channel_axis, -1)
    elif (arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4) or (
        in_channels > 1 and arr.ndim >= 3 and arr.shape[-1] == in_channels
    ):
        pass  # RGB(A), or the model's channels last
    elif in_channels > 1 and arr.ndim >= 3 and arr.shape[0] == in_channels:
        arr = np.moveaxis(arr, 0, -1)
    else:
        arr = arr[..., None]
    spatial = arr.ndim - 1
    if spatial not in (2, 3):
        raise BadInputError(
            f"image of shape {np.shape(image)} has {spatial} spatial dimensions; "
            "supported are 2-D images and 3-D stacks (plus an optional channel axis)"
        )
    c = arr.shape[-1]
    if c == in_channels:
        return arr
    if in_channels == 1:
        if c == 4:
            arr = arr[..., :3]
        # accumulate in float64: three float32 values near the type's maximum overflow their sum
        out_dtype = np.float64 if arr.dtype == np.float64 else np.float32
        return arr.mean(axis=-1, keepdims=True, dtype=np.float64).astype(out_dtype)
    raise BadInputError(f"the model needs {in_channels} channels, the image has {c}")
