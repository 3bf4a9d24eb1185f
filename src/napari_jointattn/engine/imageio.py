"""Reading images and writing label images, keeping geometry.

Supported: TIFF (2-D, Z-stacks, RGB, multichannel), PNG/JPEG (alpha dropped)
and NIfTI (``.nii``, ``.nii.gz``). Arrays come back with any channel axis
last; NIfTI volumes keep their affine and header so labels written for them
overlay the scan exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .files import write_atomic

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED = TIFF_SUFFIXES + PNG_SUFFIXES + NIFTI_SUFFIXES


@dataclass
class ImageFile:
    """An image as read from disk.

    ``data`` has the spatial axes first and, when ``channel_axis`` is not
    None, the channels last (``channel_axis == data.ndim - 1``).
    ``default_axis`` is the axis 3-D volumes are sliced along by default.
    """

    path: Path
    data: np.ndarray
    format: str
    channel_axis: int | None = None
    default_axis: int = 0
    affine: np.ndarray | None = None
    header: object | None = None
    extra: dict = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.data.shape if self.channel_axis is None else self.data.shape[:-1]

    @property
    def stem(self) -> str:
        return output_stem(self.path)


def file_format(path: str | os.PathLike) -> str | None:
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(PNG_SUFFIXES):
        return "png"
    return None


def output_stem(path: str | os.PathLike) -> str:
    """``scan.nii.gz`` -> ``scan``; ``cells.tif`` -> ``cells``."""
    name = Path(path).name
    lower = name.lower()
    for suffix in sorted(SUPPORTED, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def list_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand folders into the supported images they contain (not recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and file_format(q))
            if not found:
                raise BadInputError(
                    f"{p} contains no supported images ({', '.join(SUPPORTED)})"
                )
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise BadInputError(f"{p}: no such file or directory")
    return out


def read_image(path: str | os.PathLike) -> ImageFile:
    """Read one image file; any failure becomes a one-line ``BadInputError``."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path} is a directory, not an image file")
    fmt = file_format(path)
    if fmt is None:
        raise BadInputError(
            f"{path.name}: unsupported file type (supported: {', '.join(SUPPORTED)})"
        )
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: empty file")
    try:
        if fmt == "tiff":
            img = _read_tiff(path)
        elif fmt == "png":
            img = _read_png(path)
        else:
            img = _read_nifti(path)
    except BadInputError:
        raise
    except MemoryError as exc:
        raise BadInputError(f"{path}: too large to load into memory") from exc
    except Exception as exc:  # every reader failure is a bad file for the user
        raise BadInputError(f"cannot read {path.name} as {fmt.upper()}: {_short(exc)}") from exc
    _check_spatial(img)
    return img


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _read_tiff(path: Path) -> ImageFile:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        data = series.asarray()
    # squeeze singleton axes, keeping their letters in step
    keep = [i for i, n in enumerate(data.shape) if n > 1]
    if len(keep) < 2:
        keep = list(range(data.ndim))[-2:]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    channel_axis = None
    for letter in ("S", "C"):
        if letter in axes:
            idx = axes.index(letter)
            if idx != data.ndim - 1:
                data = np.moveaxis(data, idx, -1)
                axes = axes[:idx] + axes[idx + 1 :] + letter
            channel_axis = data.ndim - 1
            break
    return ImageFile(path, data, "tiff", channel_axis, extra={"axes": axes})


def _read_png(path: Path) -> ImageFile:
    import imageio.v3 as iio

    data = np.asarray(iio.imread(path))
    channel_axis = None
    if data.ndim == 3:
        if data.shape[-1] == 4:
            data = data[..., :3]
        if data.shape[-1] == 2:  # grey + alpha
            data = data[..., :1]
        if data.shape[-1] == 1:
            data = data[..., 0]
        else:
            channel_axis = 2
    return ImageFile(path, data, "png", channel_axis)


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the superior-inferior direction."""
    import nibabel as nib

    codes = nib.aff2axcodes(affine)
    for i, code in enumerate(codes):
        if code in ("S", "I"):
            return i
    return 2


def _read_nifti(path: Path) -> ImageFile:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    channel_axis = 3 if data.ndim == 4 else None
    return ImageFile(
        path,
        data,
        "nifti",
        channel_axis,
        default_axis=axial_axis(img.affine),
        affine=np.asarray(img.affine),
        header=img.header,
    )


def _check_spatial(img: ImageFile) -> None:
    shape = img.spatial_shape
    if len(shape) not in (2, 3):
        raise BadInputError(
            f"{img.path.name}: {len(shape)} spatial dimensions {shape}; supported are "
            "2-D images and 3-D stacks (with an optional channel axis)"
        )
    if min(shape) < 1:
        raise BadInputError(f"{img.path.name}: empty image of shape {img.data.shape}")
    if img.data.dtype.kind not in "biuf":
        raise BadInputError(f"{img.path.name}: unsupported pixel type {img.data.dtype}")


def label_dtype(labels: np.ndarray) -> np.dtype:
    top = int(labels.max()) if labels.size else 0
    return np.dtype(np.uint16 if top < 2**16 else np.uint32)


def write_labels(path: str | os.PathLike, labels: np.ndarray, like: ImageFile | None = None) -> Path:
    """Write integer labels atomically; NIfTI keeps ``like``'s affine and header."""
    path = Path(path)
    labels = np.asarray(labels)
    dtype = label_dtype(labels)
    if file_format(path) == "nifti":
        import nibabel as nib

        affine = like.affine if like is not None and like.affine is not None else np.eye(4)
        header = like.header.copy() if like is not None and like.header is not None else None
        out = nib.Nifti1Image(labels.astype(dtype), affine, header)
        out.set_data_dtype(dtype)
        out.header.set_slope_inter(1, 0)
        suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"

        def writer(tmp: Path) -> None:
            real = tmp.with_name(tmp.name + suffix)
            nib.save(out, str(real))
            os.replace(real, tmp)

        return write_atomic(path, writer)
    return write_tiff(path, labels.astype(dtype))


def write_tiff(path: str | os.PathLike, data: np.ndarray, description: str | None = None) -> Path:
    import tifffile

    def writer(tmp: Path) -> None:
        tifffile.imwrite(tmp, data, compression="zlib", description=description, metadata=None)

    return write_atomic(path, writer)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a label image (integer ids; channel axes are not allowed)."""
    img = read_image(path)
    if img.channel_axis is not None:
        raise BadInputError(f"{img.path.name}: a label image must have no channel axis")
    data = img.data
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise BadInputError(f"{img.path.name}: label values must be whole numbers")
    return data
