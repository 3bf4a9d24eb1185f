"""Everything a headless user needs: no Qt, no napari.

Reading/writing images, normalisation, tiled segmentation, model files,
metrics and evaluation. Names are imported on first use (PEP 562), so that
light modules (``engine.models.metadata``, ``engine.errors``) load without torch.
"""

from .._lazy import lazy_names

_API = {
    "BadInputError": "errors",
    "Cancelled": "errors",
    "evaluate": "evaluation.evaluate",
    "ImageFile": "io.images",
    "read_image": "io.images",
    "read_labels": "io.images",
    "write_labels": "io.images",
    "Model": "models.model",
    "load_model": "models.model",
    "model_dir": "models.metadata",
    "new_model": "models.model",
    "save_model": "models.model",
    "Segmentation": "inference.segment",
    "segment": "inference.segment",
    "segment_files": "scale.cluster",
    "segment_zarr": "scale.zarrseg",
    "export_model": "models.export",
    "train": "training",
    "TrainSettings": "training",
}

__getattr__, __dir__ = lazy_names(__name__, _API, globals())


__all__ = list(_API)
