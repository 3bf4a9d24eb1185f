"""Does an image fit a model? Training-data statistics, warnings, and the preset that fits.

Every model records what it was trained on in ``provenance.data_statistics``
(:func:`data_statistics`: modality when known, 2-D images or 3-D volumes,
channels, dtype, raw-intensity percentiles p1/p50/p99). :func:`check_fit`
compares an image with that record and returns human-readable warnings
(empty when the image looks like the training data, or when the model records
nothing); :func:`suggest_model` names the bundled preset that fits an image.
Warnings never stop anything: a model may still do well on unusual data.

Reading an image's statistics samples at most ``SAMPLE`` pixels with a fixed
stride (deterministic, cheap on huge inputs).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io.normalize import SAMPLE
from .metadata import STATISTICS_KEY, DataStatistics, training_statistics

#: intensity spans (p99 - p1) further apart than this factor are "wildly different"
SPAN_FACTOR = 1000.0
#: the median's relative position in [p1, p99] may differ by at most this much
MEDIAN_SHIFT = 0.35
#: background at zero: p1 at most this fraction of p99; an offset background: at least OFFSET
ZERO_BACKGROUND, OFFSET = 0.01, 0.03
#: file suffixes that say "a medical volume" (MRI, CT), and the modality word they match
VOLUME_SUFFIXES = (".nii", ".nii.gz")
VOLUME_MODALITY = "MRI"


def layout(image: Any, channel_axis: int | None = None) -> tuple[np.ndarray, int, int]:
    """(array, spatial dimensions, channels) of an image as ``segment`` would see it.

    A file's header-declared axes win (``ImageFile``: time points are not
    dimensions); for plain arrays the rule of ``prepare_channels``: a 3-D array
    whose last axis has 3 or 4 entries (and larger other axes) is colour.
    """
    from ..io.images import ImageFile, read_image

    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, ImageFile):
        ch = image.channel_axis if channel_axis is None else channel_axis
        channels = 1 if ch is None else image.data.shape[ch]
        dims = len(image.spatial_shape) if channel_axis is None else image.data.ndim - 1
        return image.data, dims, channels
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if channel_axis is not None:
        return arr, arr.ndim - 1, arr.shape[channel_axis]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4:
        return arr, 2, arr.shape[-1]
    return arr, arr.ndim, 1


def _sample(arr: np.ndarray, budget: int) -> np.ndarray:
    """At most ``budget`` finite values of ``arr``, taken with a fixed stride."""
    flat = arr.reshape(-1)
    step = max(1, -(-flat.size // max(1, budget)))  # ceil: at most budget values
    sample = flat[::step]
    if sample.dtype == bool:
        sample = sample.astype(np.uint8)
    sample = sample.astype(np.float64, copy=False)
    return sample[np.isfinite(sample)]


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def data_statistics(
    images: Sequence[Any] | Any,
    *,
    channel_axis: int | None = None,
    modality: str | None = None,
    dims: int | None = None,
) -> dict:
    """What a set of images is: a JSON-ready dict for ``provenance.data_statistics``.

    ``{"modality"?, "dims": 2 | 3, "channels", "dtype", "intensity": {"p1", "p50",
    "p99"}, "images", "sampled_pixels"}``. ``dims`` and ``channels`` are the most
    common among the images; the percentiles are of the raw values of all of
    them (at most ``SAMPLE`` pixels in all, an equal share per image).
    ``dims`` overrides the dimensionality (e.g. 2 for a z-stack used as 2-D
    images); ``modality`` is free text such as "fluorescence microscopy".
    """
    if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
        images = [images]
    if not images:
        raise ValueError("data_statistics needs at least one image")
    budget = SAMPLE // len(images)
    samples, found_dims, found_channels, dtypes = [], Counter(), Counter(), Counter()
    for image in images:
        arr, d, c = layout(image, channel_axis)
        found_dims[min(max(d, 2), 3)] += 1
        found_channels[c] += 1
        dtypes[str(arr.dtype)] += 1
        samples.append(_sample(arr, budget))
    values = np.concatenate(samples)
    stats: dict = {}
    if modality:
        stats["modality"] = modality
    stats.update(dims=dims or found_dims.most_common(1)[0][0], channels=found_channels.most_common(1)[0][0],
                 dtype=dtypes.most_common(1)[0][0])
    if values.size:
        p1, p50, p99 = np.percentile(values, [1, 50, 99])
        stats["intensity"] = {"p1": _round(p1), "p50": _round(p50), "p99": _round(p99)}
    stats.update(images=len(images), sampled_pixels=int(values.size))
    return stats


def _describe(stats: DataStatistics) -> str:
    kind = "2-D images" if stats.dims == 2 else "3-D volumes"
    return f"{kind} ({stats.modality})" if stats.modality else kind


def problems(trained: DataStatistics, image: dict, model_name: str = "the model") -> list[tuple[str, str]]:
    """``(kind, message)`` for each way an image (its :func:`data_statistics`) differs from the training data.

    Kinds: ``dims``, ``channels``, ``span`` (intensity spans more than
    ``SPAN_FACTOR`` apart), ``median`` (the median elsewhere in the 1st-99th
    percentile range: e.g. dark objects on a bright background), ``background``
    (zero background against an offset one, as MRI against fluorescence),
    ``negative`` (negative values the training data never had), ``constant``.
    """
    who = f"model {model_name!r}"
    out: list[tuple[str, str]] = []
    if image["dims"] != trained.dims:
        got = ("a 3-D volume (it is segmented slice by slice)" if trained.dims == 2
               else "a single 2-D image")
        out.append(("dims", f"{who} was trained on {_describe(trained)}; this image is {got}"))
    if image["channels"] != trained.channels:
        mean = " (their mean is used)" if trained.channels == 1 else ""
        out.append(("channels", f"{who} was trained on {trained.channels}-channel images; "
                                f"this image has {image['channels']} channels{mean}"))
    got, ref = image.get("intensity"), trained.intensity
    if got is None or ref is None:
        return out
    span, ref_span = got["p99"] - got["p1"], ref.p99 - ref.p1
    if span <= 0:
        return [*out, ("constant", "this image is (nearly) constant: there is nothing to segment")]
    if ref_span <= 0:
        return out
    shown = (f"1st-99th percentile {got['p1']:.4g} to {got['p99']:.4g}; "
             f"training data {ref.p1:.4g} to {ref.p99:.4g}")
    theirs = f"the training data of {who}"
    factor = span / ref_span
    if not 1 / SPAN_FACTOR <= factor <= SPAN_FACTOR:
        out.append(("span", f"this image's intensity range is {factor:.3g}x that of {theirs} ({shown})"))
    where, ref_where = (got["p50"] - got["p1"]) / span, (ref.p50 - ref.p1) / ref_span
    if abs(where - ref_where) > MEDIAN_SHIFT:
        out.append(("median", f"this image's median intensity lies at {where:.0%} of its range, "
                              f"at {ref_where:.0%} in {theirs}: it looks like another kind of image"))
    if got["p1"] < 0 <= ref.p1 and -got["p1"] > 0.05 * span:
        out.append(("negative", f"this image has negative intensities ({shown}); the training data had none"))
    elif min(got["p1"], ref.p1) >= 0 and got["p99"] > 0 and ref.p99 > 0:
        offset, ref_offset = got["p1"] / got["p99"], ref.p1 / ref.p99
        if min(offset, ref_offset) <= ZERO_BACKGROUND and max(offset, ref_offset) >= OFFSET:
            out.append(("background", f"this image's background level is {offset:.0%} of its bright level, "
                                      f"{ref_offset:.0%} in {theirs} ({shown}): another kind of image"))
    return out


def compare(trained: DataStatistics, image: dict, model_name: str = "the model") -> list[str]:
    """The messages of :func:`problems`."""
    return [message for _, message in problems(trained, image, model_name)]


def _statistics_of(model: Any) -> tuple[DataStatistics | None, str]:
    """(training statistics, name) of a Model, or of a model name or file (read without weights)."""
    if isinstance(model, (str, os.PathLike)):
        from .metadata import read_metadata, resolve_model

        meta = read_metadata(resolve_model(model))
        return training_statistics(meta), meta.get("name") or Path(os.fspath(model)).stem
    return getattr(model, "trained_on", None), getattr(model, "name", "the model")


def check_fit(model: Any, image: Any) -> list[str]:
    """Human-readable warnings when ``image`` is far from ``model``'s training data.

    ``model``: a ``Model`` (or a model name or file); ``image``: an array, an
    ``ImageFile`` or a path. Dimensionality, channels, and an intensity
    distribution of another kind (span more than ``SPAN_FACTOR`` apart, or the
    median elsewhere in the range) are reported; an empty list means no
    concern, or a model that records no training statistics.
    """
    trained, name = _statistics_of(model)
    if trained is None:
        return []
    return compare(trained, data_statistics([image]), name)


def _modality_hint(image: Any, path: str | os.PathLike | None) -> str | None:
    from ..io.images import ImageFile

    names = [os.fspath(path)] if path is not None else []
    if isinstance(image, ImageFile):
        if image.format == "nifti":
            return VOLUME_MODALITY
        names.append(str(image.path))
    elif isinstance(image, (str, os.PathLike)):
        names.append(os.fspath(image))
    if any(n.lower().endswith(VOLUME_SUFFIXES) for n in names):
        return VOLUME_MODALITY
    return None


def suggest_model(image: Any, path: str | os.PathLike | None = None) -> str | None:
    """The bundled preset that fits ``image`` best, or None when none fits.

    Each preset with weights is scored by :func:`check_fit`'s warnings (a
    dimensionality warning counts half: slice-by-slice use is common); a file
    that is a medical volume (NIfTI, by ``path`` or the image's own file)
    favours a preset whose modality says MRI and counts against the others.
    The lowest score under 1 wins (ties: preset order).
    """
    return _best_preset(data_statistics([image]), _modality_hint(image, path))


def fit_advice(model: Any, image: Any, path: str | os.PathLike | None = None) -> tuple[list[str], str | None]:
    """:func:`check_fit`'s warnings and, when there are any, :func:`suggest_model`'s preset.

    The image's statistics are computed once for both.
    """
    trained, name = _statistics_of(model)
    summary = data_statistics([image])
    warnings_ = compare(trained, summary, name) if trained is not None else []
    return warnings_, _best_preset(summary, _modality_hint(image, path)) if warnings_ else None


def fit_warnings(model: Any, image: Any, path: str | os.PathLike | None = None) -> list[str]:
    """:func:`fit_advice` as lines for a user: each warning, then the preset that fits, if another."""
    warnings_, better = fit_advice(model, image, path)
    if better is not None and better != getattr(model, "name", None):
        warnings_ = [*warnings_, f"preset {better!r} fits this image (--model {better})"]
    return warnings_


def _best_preset(summary: dict, hint: str | None) -> str | None:
    from .metadata import preset_names, preset_path, read_metadata

    best: tuple[float, str] | None = None
    for name in preset_names():
        file = preset_path(name)
        if not file.is_file():
            continue
        trained = training_statistics(read_metadata(file))
        if trained is None:
            continue
        score = sum(0.5 if kind == "dims" else 1.0 for kind, _ in problems(trained, summary, name))
        if hint is not None:
            score += -1.0 if hint.lower() in (trained.modality or "").lower() else 1.0
        if score < 1 and (best is None or score < best[0]):
            best = (score, name)
    return None if best is None else best[1]


__all__ = ["STATISTICS_KEY", "check_fit", "compare", "data_statistics", "fit_advice", "layout", "problems",
           "suggest_model"]
