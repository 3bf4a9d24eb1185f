"""Model files: the ``Model`` object, loading and saving (safetensors + JSON metadata), the
metadata schema and header reader (``metadata``, no torch), presets, fit to an image, fine-tuned
versions and exports to other software."""
