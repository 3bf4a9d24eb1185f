"""napari-jointattn: joint-attention DenseUNet segmentation for napari.

The Python API mirrors the command line::

    from napari_jointattn import load_model, segment, evaluate
    model = load_model("nuclei")
    result = segment("cells.tif", model)      # result.labels, result.attention
"""

__version__ = "0.1.0"

from .engine import (  # noqa: E402
    BadInputError,
    Cancelled,
    Model,
    Segmentation,
    evaluate,
    load_model,
    new_model,
    save_model,
    segment,
)

__all__ = [
    "BadInputError",
    "Cancelled",
    "Model",
    "Segmentation",
    "__version__",
    "evaluate",
    "load_model",
    "new_model",
    "save_model",
    "segment",
]
