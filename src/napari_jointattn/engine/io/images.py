"""Reading images and writing label images, keeping geometry.

Supported: TIFF (2-D, Z-stacks, RGB, multichannel), PNG/JPEG (alpha dropped)
and NIfTI (``.nii``, ``.nii.gz``). Arrays come back with any channel axis
last; NIfTI volumes keep their affine and header so labels written for them
overlay the scan exactly.

Axes come from the file's header where it declares them (NIfTI always; PNG
and JPEG; TIFF unless tifffile reports an unknown axis): such an
``ImageFile`` has ``axes_known`` set, and no colour guessing is applied to it.
Every reader checks the size the header declares against the pixel limit
(:mod:`.limits`) before decoding.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from .files import check_regular_file, write_atomic
from .limits import check_decoded_size
from .limits import max_pixels as _max_pixels

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
    ``axes_known``: the file's header says which axes are channels, so
    ``channel_axis is None`` means "no channel axis" (a 64 x 64 x 3 NIfTI
    volume is three slices, not an RGB image). ``time_axis``: for a time
    series (4-D NIfTI), the axis of the time points, after the spatial axes.
    """

    path: Path
    data: np.ndarray
    format: str
    channel_axis: int | None = None
    default_axis: int = 0
    affine: np.ndarray | None = None
    header: object | None = None
    extra: dict = field(default_factory=dict)
    axes_known: bool = False
    time_axis: int | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        skip = {self.channel_axis, self.time_axis}
        return tuple(n for i, n in enumerate(self.data.shape) if i not in skip)

    @property
    def time_points(self) -> int:
        return 1 if self.time_axis is None else self.data.shape[self.time_axis]

    def channels_last(self) -> tuple[np.ndarray, int | None]:
        """(data, channel axis) as ``prepare_channels`` should see them.

        With header-declared axes and no channel axis, a trailing axis of one
        channel is added so that no colour rule can apply.
        """
        if self.channel_axis is None and self.axes_known:
            return self.data[..., None], self.data.ndim
        return self.data, self.channel_axis

    def time_point(self, t: int) -> ImageFile:
        """One volume of a time series (a view), with the same geometry."""
        if self.time_axis is None:
            return self
        index = [slice(None)] * self.data.ndim
        index[self.time_axis] = t
        ch = self.channel_axis
        if ch is not None and ch > self.time_axis:
            ch -= 1
        return ImageFile(self.path, self.data[tuple(index)], self.format, ch, self.default_axis,
                         self.affine, self.header, dict(self.extra), self.axes_known, None)

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
    """``scan.nii.gz`` -> ``scan``; ``cells.tif`` -> ``cells``; ``plate.ome.zarr`` -> ``plate``."""
    name = Path(str(path).rstrip("/\\")).name
    lower = name.lower()
    for suffix in sorted((*SUPPORTED, ".ome.zarr", ".zarr"), key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def list_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand folders into the supported images they contain (not recursive).

    In folders, only regular files are taken (no FIFOs, devices or sockets).
    """
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


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> ImageFile:
    """Read one image file; any failure becomes a one-line ``BadInputError``.

    The size the file's header declares is checked against the pixel limit
    (``max_pixels``, else ``$NAPARI_JOINTATTN_MAX_PIXELS``, else
    :data:`.limits.DEFAULT_MAX_PIXELS`) before anything is decoded.
    """
    path = Path(path)
    check_regular_file(path, "image file")
    fmt = file_format(path)
    if fmt is None:
        raise BadInputError(
            f"{path.name}: unsupported file type (supported: {', '.join(SUPPORTED)})"
        )
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: empty file")
    limit = _max_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reader chatter; problems become BadInputError
            if fmt == "tiff":
                img = _read_tiff(path, limit)
            elif fmt == "png":
                img = _read_png(path, limit)
            else:
                img = _read_nifti(path, limit)
    except BadInputError:
        raise
    except MemoryError as exc:
        raise BadInputError(f"{path.name}: not enough memory to load it") from exc
    except Exception as exc:  # every reader failure is a bad file for the user
        raise BadInputError(f"cannot read {path.name} as {fmt.upper()}: {_short(exc)}") from exc
    _check_spatial(img)
    return img



def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _read_tiff(path: Path, limit: int) -> ImageFile:
    """The largest series (an OME-TIFF may store a thumbnail first), full resolution."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        all_series = list(tif.series)
        if not all_series:
            raise BadInputError(f"{path.name}: the TIFF holds no image")
        index = max(range(len(all_series)), key=lambda i: (math.prod(all_series[i].shape), -i))
        series = all_series[index]
        axes = series.axes
        shape = tuple(series.shape)
        channels = math.prod(n for n, a in zip(shape, axes) if a in "SC")
        check_decoded_size(path.name, [n for n, a in zip(shape, axes) if a not in "SC"], channels, limit)
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
    extra = {"axes": axes, "series": index, "series_count": len(all_series)}
    # "Q": tifffile could not tell what the axis is; then the colour rules may guess
    return ImageFile(path, data, "tiff", channel_axis, extra=extra, axes_known="Q" not in axes)


_PIL_LOCK = threading.Lock()


def _pil_open(path: Path):
    """Open lazily (header only). Pillow's own bomb check is replaced by the pixel limit."""
    from PIL import Image

    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _read_png(path: Path, limit: int) -> ImageFile:
    with _pil_open(path) as im:
        w, h = im.size
        check_decoded_size(path.name, (h, w), len(im.getbands()), limit)
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
        elif im.mode == "1":
            im = im.convert("L")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        data = np.asarray(im)
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
    return ImageFile(path, data, "png", channel_axis, axes_known=True)


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the superior-inferior direction."""
    import nibabel as nib

    codes = nib.aff2axcodes(affine)
    for i, code in enumerate(codes):
        if code in ("S", "I"):
            return i
    return 2


def _read_nifti(path: Path, limit: int) -> ImageFile:
    """NIfTI axes: x, y, z, then time (4th), then vector components (5th).

    A 3-D volume never has a channel axis, whatever its size; a 4-D file is a
    time series (each time point is segmented on its own); a 5th axis holds
    channels.
    """
    import nibabel as nib

    img = nib.load(str(path))
    shape = tuple(int(n) for n in img.shape)
    if len(shape) > 5:
        raise BadInputError(f"{path.name}: {len(shape)}-D NIfTI {shape}; supported are 2-D to 5-D")
    # drop singleton time (and component) axes, from the end
    keep = list(shape)
    while len(keep) > 3 and keep[-1] == 1:
        keep.pop()
    if len(keep) == 5 and keep[3] == 1:  # x, y, z, 1, components
        keep = keep[:3] + keep[4:]
        channel_axis, time_axis = 3, None
    elif len(keep) == 5:
        channel_axis, time_axis = 4, 3
    elif len(keep) == 4:
        channel_axis, time_axis = None, 3
    else:
        channel_axis, time_axis = None, None
    channels = keep[channel_axis] if channel_axis is not None else 1
    pixel_dims = [n for i, n in enumerate(keep) if i != channel_axis]
    check_decoded_size(path.name, pixel_dims, channels, limit)
    data = np.asarray(img.dataobj).reshape(keep)
    return ImageFile(
        path,
        data,
        "nifti",
        channel_axis,
        default_axis=axial_axis(img.affine),
        affine=np.asarray(img.affine),
        header=img.header,
        axes_known=True,
        time_axis=time_axis,
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
    """int32 everywhere (files, the API, napari layers), so users can paint any new id."""
    return np.dtype(np.int32)


def _write_nifti(path: Path, data: np.ndarray, like: ImageFile | None, overwrite: bool) -> Path:
    """``data`` as NIfTI with ``like``'s affine and header (else the identity), atomically."""
    import nibabel as nib

    affine = like.affine if like is not None and like.affine is not None else np.eye(4)
    header = like.header.copy() if like is not None and like.header is not None else None
    out = nib.Nifti1Image(data, affine, header)
    out.set_data_dtype(data.dtype)
    out.header.set_slope_inter(1, 0)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"

    def writer(tmp: Path) -> None:
        real = tmp.with_name(tmp.name + suffix)
        try:
            nib.save(out, str(real))
            os.replace(real, tmp)
        finally:
            if real.exists():
                real.unlink()

    return write_atomic(path, writer, overwrite=overwrite)


def write_labels(path: str | os.PathLike, labels: np.ndarray, like: ImageFile | None = None,
                 overwrite: bool = True) -> Path:
    """Write integer labels atomically; NIfTI keeps ``like``'s affine and header.

    ``overwrite=False``: an existing file is never replaced (``BadInputError``).
    """
    path = Path(path)
    labels = np.asarray(labels)
    data = labels.astype(label_dtype(labels))
    if file_format(path) == "nifti":
        return _write_nifti(path, data, like, overwrite)
    return write_tiff(path, data, overwrite=overwrite)


def write_tiff(path: str | os.PathLike, data: np.ndarray, description: str | None = None,
               overwrite: bool = True, metadata: dict | None = None) -> Path:
    """``metadata``: stored with the array's shape in tifffile's JSON description
    (a 3-D array then reads back as one 3-D series); otherwise ``description``, if any."""
    import tifffile

    def writer(tmp: Path) -> None:
        if metadata is not None:
            tifffile.imwrite(tmp, data, compression="zlib", metadata=metadata)
        else:
            tifffile.imwrite(tmp, data, compression="zlib", description=description, metadata=None)

    return write_atomic(path, writer, overwrite=overwrite)


def write_map(path: str | os.PathLike, data: np.ndarray, like: ImageFile | None = None,
              metadata: dict | None = None, overwrite: bool = True) -> Path:
    """Write one float32 map (e.g. an attention map) with the image's shape, atomically.

    A NIfTI ``path`` keeps ``like``'s affine and header, so the map overlays
    the scan; a TIFF stores ``metadata`` (e.g. the map's name) and its shape
    in its JSON description.
    """
    path = Path(path)
    data = np.asarray(data, dtype=np.float32)
    if file_format(path) == "nifti":
        return _write_nifti(path, data, like, overwrite)
    return write_tiff(path, data, overwrite=overwrite, metadata=dict(metadata or {}))


def attention_output(path: str | os.PathLike, like: ImageFile | None) -> Path:
    """Where one attention map of ``like`` goes: NIfTI for NIfTI input, else the TIFF ``path``."""
    path = Path(path)
    if like is not None and like.format == "nifti" and path.name.lower().endswith(TIFF_SUFFIXES):
        return path.with_name(output_stem(path) + ".nii.gz")
    return path


def write_attention(maps: dict[str, np.ndarray], paths, like: ImageFile | None = None,
                    overwrite: bool = True) -> list[Path]:
    """One file per map (``maps``: display name -> array with the image's spatial shape).

    ``paths[i]`` receives the i-th map: a float32 TIFF whose JSON description
    holds ``"attention": name`` (and the shape), or NIfTI with ``like``'s affine and header when
    ``like`` was read from NIfTI (see :func:`attention_output`).
    """
    written = []
    for (name, data), path in zip(maps.items(), paths):
        target = attention_output(path, like)
        written.append(write_map(target, data, like, metadata={"attention": name}, overwrite=overwrite))
    return written


def read_labels(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Read a label image (integer ids; channel axes are not allowed)."""
    img = read_image(path, max_pixels=max_pixels)
    if img.channel_axis is not None:
        raise BadInputError(f"{img.path.name}: a label image must have no channel axis")
    data = img.data
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise BadInputError(f"{img.path.name}: label values must be whole numbers")
    return data
