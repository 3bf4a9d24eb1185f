"""File > Open Sample: small real images shipped inside the package (see docs/data.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parent / "samples"


def nuclei_image() -> np.ndarray:
    """DSB2018 fluorescence nuclei, 512 x 512 uint16 (via the stardist package)."""
    import tifffile

    return tifffile.imread(SAMPLES / "nuclei_dsb2018.tif")


def brain_volume() -> tuple[np.ndarray, tuple[float, float, float]]:
    """FSL MNI152 whole-head T1 at 2 mm as (axial, y, x), anterior up, and its voxel size."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(SAMPLES / "mni152_t1_2mm.nii.gz")))
    data = np.asarray(img.dataobj, dtype=np.float32)  # (x: L->R, y: P->A, z: I->S)
    zooms = img.header.get_zooms()[:3]
    volume = np.ascontiguousarray(data.transpose(2, 1, 0)[::-1, ::-1, :])
    return volume, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def nuclei_sample():
    return [(nuclei_image(), {"name": "nuclei", "colormap": "gray"}, "image")]


def brain_sample():
    volume, scale = brain_volume()
    return [(volume, {"name": "brain T1", "scale": scale, "colormap": "gray"}, "image")]
