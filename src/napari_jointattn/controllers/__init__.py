"""The docks' workflows without Qt: what the napari docks do, testable on a ``ViewerModel``.

``session`` (per-viewer shared state: current model, tile, loaded models),
``segment`` and ``finetune`` (one controller per dock), ``layers`` (layer
plumbing). The Qt docks in ``widgets/`` only read their widgets and call these.
"""
