"""Everything a headless user needs: no Qt, no napari.

Reading/writing images, normalisation, tiled segmentation, model files,
metrics and evaluation. Names are imported on first use (PEP 562), so that
light modules (``engine.metadata``, ``engine.errors``) load without torch.
"""

from .._lazy import lazy_names

_API = {
    "BadInputError": "errors",
    "Cancelled": "errors",
    "evaluate": "evaluation",
    "ImageFile": "imageio",
    "read_image": "imageio",
    "read_labels": "imageio",
    "write_labels": "imageio",
    "Model": "models",
    "load_model": "models",
    "model_dir": "metadata",
    "new_model": "models",
    "save_model": "models",
    "Segmentation": "inference",
    "segment": "inference",
    "segment_files": "cluster",
    "segment_zarr": "zarrseg",
    "export_model": "export",
    "train": "training",
    "TrainSettings": "training",
}

__getattr__, __dir__ = lazy_names(__name__, _API, globals())


__all__ = list(_API)
