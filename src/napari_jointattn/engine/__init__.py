"""Everything a headless user needs: no Qt, no napari.

Reading/writing images, normalisation, tiled segmentation, model files,
metrics and evaluation. Names are imported on first use (PEP 562), so that
light modules (``engine.metadata``, ``engine.errors``) load without torch.
"""

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
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


__all__ = sorted(_API)
