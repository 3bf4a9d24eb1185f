"""napari-jointattn: joint-attention DenseUNet segmentation for napari.

The Python API mirrors the command line::

    from napari_jointattn import load_model, segment, evaluate
    model = load_model("nuclei")
    result = segment("cells.tif", model)      # result.labels, result.attention
    segment_files(["folder/"], "out/", model, workers=2)    # many files, on a dask cluster
    segment_zarr("big.ome.zarr", "big_labels.zarr", model)  # bigger than memory, block by block

Training is ``napari_jointattn.engine.train`` (``napari_jointattn.train`` is the
module that ``torchrun -m napari_jointattn.train`` runs).
"""

from ._lazy import lazy_names
from ._version import __version__

# The API is imported on first use (PEP 562), so ``napari-jointattn --help``
# and other light entry points do not pay for importing torch.
_API = {
    "BadInputError": "engine.errors",
    "Cancelled": "engine.errors",
    "Model": "engine.models.model",
    "Segmentation": "engine.inference.segment",
    "evaluate": "engine.evaluation.evaluate",
    "load_model": "engine.models.model",
    "new_model": "engine.models.model",
    "save_model": "engine.models.model",
    "segment": "engine.inference.segment",
    "segment_files": "engine.scale.cluster",
    "segment_zarr": "engine.scale.zarrseg",
    "export_model": "engine.models.export",
}

__getattr__, __dir__ = lazy_names(__name__, _API, globals())


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
    "segment_files",
    "segment_zarr",
    "export_model",
]
