"""Running a model on an image: ``segment()`` with tiling, devices and fallbacks
(``segment``), post-processing, device placement, the opt-in ONNX Runtime network and the
attention query of one pixel."""
