"""napari-jointattn: joint-attention DenseUNet segmentation for napari."""

__version__ = "0.1.0"
