"""Bundled preset definitions. Weights live in ``napari_jointattn/presets/``."""

PRESETS: dict[str, dict] = {
    "nuclei": {
        "description": "Fluorescence nuclei (2-D): background / nucleus, touching nuclei split.",
        "classes": ["background", "nucleus"],
        "config": {"in_channels": 1, "num_classes": 2},
        "normalization": {"percentiles": [1.0, 99.8], "per": "image"},
        "postprocess": {"instances": True, "min_size": 15, "min_distance": 3},
    },
    "brain-mri": {
        "description": "T1-weighted brain MRI: background / grey matter / white matter.",
        "classes": ["background", "grey matter", "white matter"],
        # three full-resolution head layers: the network classifies at 1/2 scale,
        # too coarse alone for a cortical ribbon two voxels thick
        "config": {"in_channels": 1, "num_classes": 3, "head_channels": 32, "head_layers": 3},
        "normalization": {"percentiles": [1.0, 99.5], "per": "volume"},
        "postprocess": {"instances": False},
    },
}
