"""Everything a headless user needs: no Qt, no napari.

Reading/writing images, normalisation, tiled segmentation, model files,
metrics and evaluation.
"""

from .errors import BadInputError, Cancelled
from .evaluation import evaluate
from .imageio import ImageFile, read_image, read_labels, write_labels
from .models import Model, load_model, model_dir, new_model, save_model
from .inference import Segmentation, segment

__all__ = [
    "BadInputError",
    "Cancelled",
    "ImageFile",
    "Model",
    "Segmentation",
    "evaluate",
    "load_model",
    "model_dir",
    "new_model",
    "read_image",
    "read_labels",
    "save_model",
    "segment",
    "write_labels",
]
