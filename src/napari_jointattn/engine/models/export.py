"""Exporting a model for other software: ONNX, TorchScript and a bioimage.io model package.

:func:`export_model` is the one entry point (the CLI's ``export`` and the Python API call it).
Every format holds the same graph, :class:`ExportNet`:

* input ``(B, C, H, W)`` float32: **normalised** intensities (the model's percentile
  normalisation, done by the consumer; the bioimage.io package declares it as
  ``scale_range`` + ``clip`` preprocessing), any H and W of at least :func:`min_size` pixels;
* output ``(B, K, H, W)`` float32: **softmax class probabilities** (not logits), the same
  numbers as ``predict_slice`` for an image no larger than one tile (512 px).

Padding to the network's multiple (edge replication) and cropping back are inside the graph,
and so is the model's ``upsample`` step (enlarge, run, average back). Everything a consumer
needs besides the graph (classes, normalisation, post-processing, how to get ``segment()``'s
labels) is written next to it: a ``<file>.json`` sidecar for ONNX and TorchScript (also embedded
in the file: ONNX ``metadata_props``, TorchScript extra file ``napari_jointattn.json``), and
``rdf.yaml`` + ``README.md`` in the bioimage.io package. Each export is checked before it is
moved into place (ONNX against PyTorch under ONNX Runtime at two sizes, TorchScript reloaded
and compared, the bioimage.io package validated and test-run by ``bioimageio.core``); a failed
check or any error leaves no file behind.

An export leaves the process's global state alone, so Segment, queries and live training may
run in other threads meanwhile: the graph is a private copy of the network, nothing draws from
or seeds the global random generators, and ``bioimageio.core``'s test run (which seeds them and
sets PyTorch's deterministic-algorithms switch) runs in a child process.

No Qt, no napari; ``onnx``, ``onnxruntime`` and ``bioimageio.core`` are optional
(``pip install "napari-jointattn[export]"``) and imported only when used.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..._version import __version__
from ..errors import BadInputError
from ..io.files import atomic_path
from ..io.normalize import normalize
from .metadata import finite_json
from .model import Model, load_model

FORMATS = ("onnx", "torchscript", "bioimageio")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "bioimageio": ".zip"}
#: ONNX / TorchScript outputs must match PyTorch within this (max absolute difference)
TOLERANCE = 1e-4
ONNX_OPSET = 17
EXPORT_FORMAT = "napari-jointattn-export"
EXPORT_FORMAT_VERSION = 1
#: the method the model implements (bioimage.io ``cite``, sidecar ``citation``)
CITATION = {
    "text": "Zhang, Dong, Li. Joint Attention for Medical Image Segmentation. ISBI 2022.",
    "doi": "10.1109/ISBI52829.2022.9761624",
}
LICENSE = "BSD-3-Clause"
AUTHOR = "napari-jointattn developers"
_INSTALL = {
    "onnx": 'pip install onnx onnxruntime  (or: pip install "napari-jointattn[export]")',
    "bioimageio": 'pip install bioimageio.core onnx onnxruntime  (or: pip install "napari-jointattn[export]")',
}


# ------------------------------------------------------------------ the graph
class ExportNet(nn.Module):
    """Normalised (B, C, H, W) -> (B, K, H, W) softmax probabilities, any H and W >= :func:`min_size`.

    Enlarges ``upsample`` times (bilinear), pads to the network's multiple with edge
    replication, runs the network, takes the softmax, crops, and averages each
    ``upsample`` x ``upsample`` block back: what ``predict_slice`` does for one tile.
    Written with shape arithmetic the ONNX and TorchScript tracers record, so the
    exported graph takes any size.
    """

    def __init__(self, net: nn.Module, upsample: int = 1) -> None:
        super().__init__()
        self.net = net
        self.upsample = int(upsample)
        self.multiple = int(net.config.multiple)
        self.num_classes = int(net.config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.upsample
        if f > 1:
            x = F.interpolate(x, scale_factor=float(f), mode="bilinear", align_corners=False)
        h, w = x.shape[2], x.shape[3]
        m = self.multiple
        ph = (m - h % m) % m
        pw = (m - w % m) % m
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        probs = torch.softmax(self.net(x)[:, : self.num_classes], dim=1)[:, :, :h, :w]
        if f > 1:
            probs = F.avg_pool2d(probs, f)
        return probs


def min_size(model: Model) -> int:
    """Smallest height and width the exported graph takes: two cells of the deepest scale."""
    return math.ceil(2 * model.config.multiple / model.normalization.upsample)


def export_net(model: Model) -> ExportNet:
    """The exported graph in PyTorch (a copy of the network on the CPU, in eval mode)."""
    import copy

    net = copy.deepcopy(model.net).to("cpu").float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return ExportNet(net, model.normalization.upsample).eval()


# ------------------------------------------------------------- what to carry
def usage(model: Model) -> dict:
    """Everything a consumer needs besides the graph (the sidecar JSON; bioimage.io ``config``)."""
    norm, post = model.normalization, model.postprocess
    low, high = norm.percentiles
    k = model.num_classes
    if k == 2 and post.get("threshold") is not None:
        classify = (f"class 1 ('{model.classes[1]}') where probability[1] > {post['threshold']}, "
                    "else class 0")
    else:
        classify = "argmax over the class axis"
    steps = [
        (f"1. normalise: per {'2-D image' if norm.per == 'image' else 'volume (all slices together)'}, "
        f"lo, hi = percentiles {low:g} and {high:g} of the finite pixels (all channels), "
        "x = clip((raw - lo) / (hi - lo), -10, 10) as float32 (0 where hi == lo); NaN/inf pixels "
        "are set to lo and labelled background at the end"),
        "2. lay out as (batch, channel, y, x); slices of a volume are separate batch entries",
        ("3. run the graph: output (batch, class, y, x) softmax probabilities "
        "(images larger than 512 px: segment() blends 512-px tiles with 25 % overlap and "
        "Gaussian weights; one pass over the whole image differs slightly near tile seams)"),
        f"4. class ids: {classify}",
    ]
    if post.instances:
        steps.append(
            f"5. instances: foreground (class > 0), distance transform, Gaussian sigma 1, "
            f"watershed from local maxima at least {post.get('min_distance', 3)} px apart; "
            f"objects under {post.get('min_size', 15)} px removed; ids 1..n "
            "(napari_jointattn.engine.inference.postprocess.split_instances)")
    return finite_json({
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "model": model.name,
        "description": model.description,
        "exported_by": f"napari-jointattn {__version__}",
        "classes": list(model.classes),
        "input": {
            "name": "input", "layout": "BCYX", "dtype": "float32", "channels": model.in_channels,
            "min_size": min_size(model),
            "values": "normalised intensities (see normalization), not raw",
        },
        "output": {
            "name": "output", "layout": "BCYX", "dtype": "float32", "channels": k,
            "values": "softmax class probabilities (sum to 1 over the class axis), not logits",
        },
        "normalization": {
            **norm.to_dict(),
            "formula": "clip((raw - p_low) / (p_high - p_low), -10, 10)",
            "upsample_in_graph": norm.upsample > 1,
            "note": "upsample: the graph enlarges its input this many times and averages the "
                    "probabilities back to the input grid; feed the image at its own size",
        },
        "postprocess": post.to_dict(),
        "labels_from_output": steps,
        "citation": CITATION,
        "license": LICENSE,
        "provenance": dict(model.provenance),
        "scores": dict(model.scores),
    })


# -------------------------------------------------------------- sample data
def default_sample(model: Model) -> np.ndarray:
    """A raw 2-D image (H, W) for test tensors and the cover: a bundled sample that fits the model."""
    from ..io.images import read_image

    here = Path(__file__).resolve().parents[2] / "samples"
    stats = model.trained_on
    if stats is not None and "mri" in (stats.modality or "").lower():
        image = read_image(here / "mni152_t1_2mm.nii.gz")
        vol = np.moveaxis(np.asarray(image.data), image.default_axis, 0)
        return np.asarray(vol[vol.shape[0] // 2], dtype=np.float32)
    data = np.asarray(read_image(here / "nuclei_dsb2018.tif").data, dtype=np.float32)
    return data[128:384, 128:384]


def _sample_planes(model: Model, sample) -> np.ndarray:
    """``sample`` (or the default) as raw (1, C, H, W) float32, checked."""
    raw = default_sample(model) if sample is None else sample
    if isinstance(raw, (str, os.PathLike)):
        from ..io.images import read_image

        raw = read_image(raw).data
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[-1] == model.in_channels and raw.shape[0] != model.in_channels:
        raw = np.moveaxis(raw, -1, 0)
    if raw.ndim == 2:
        raw = np.repeat(raw[None], model.in_channels, axis=0)
    if raw.ndim != 3 or raw.shape[0] != model.in_channels:
        raise BadInputError(f"sample must be a 2-D image (H, W) or (H, W, {model.in_channels}) / "
                            f"({model.in_channels}, H, W), got shape {raw.shape}")
    if raw.dtype.kind not in "biuf":
        raise BadInputError(f"sample must hold numbers, got {raw.dtype}")
    raw = raw.astype(np.float32)
    if not np.isfinite(raw).all():
        raise BadInputError("sample has NaN or infinite pixels")
    if min(raw.shape[1:]) < min_size(model):
        raise BadInputError(f"sample is {raw.shape[1]} x {raw.shape[2]} px; the exported graph needs "
                            f"at least {min_size(model)} x {min_size(model)}")
    if max(raw.shape[1:]) > 2048:
        raise BadInputError(f"sample is {raw.shape[1]} x {raw.shape[2]} px; use one of at most 2048 px a side")
    return raw[None]


def normalized(model: Model, raw: np.ndarray) -> np.ndarray:
    """Raw (B, C, H, W) -> what the graph takes, as ``segment()`` normalises it."""
    norm = model.normalization
    if norm.per == "volume":
        rng = norm.volume_range(raw, is_stack=True)
        return np.stack([normalize(p, rng, norm.percentiles)[0] for p in raw])
    return np.stack([normalize(p, None, norm.percentiles)[0] for p in raw])


def _second_size(x: np.ndarray, m: int) -> np.ndarray:
    """``x`` reflected out to another, odd size (not a multiple of the network's)."""
    return np.pad(x, ((0, 0), (0, 0), (0, m + 5), (0, 3)), mode="reflect")


def _run_torch(net: ExportNet, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(np.ascontiguousarray(x))).numpy()


# ------------------------------------------------------------------- result
@dataclass
class ExportResult:
    """What :func:`export_model` wrote and what it checked."""

    path: Path
    format: str
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    checks: dict = field(default_factory=dict)


def _check_out(fmt: str, out) -> Path:
    if fmt not in FORMATS:
        raise BadInputError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    try:
        path = Path(os.fspath(out))
    except TypeError:
        raise BadInputError(f"out must be a file path, got {type(out).__name__}") from None
    if str(path) in ("", "."):
        raise BadInputError("out must name a file")
    suffix = SUFFIXES[fmt]
    if path.suffix.lower() != suffix:
        raise BadInputError(f"{fmt} exports are written to a {suffix} file: {path.name}")
    if path.is_dir():
        raise BadInputError(f"cannot write {path}: it is a folder")
    if not path.parent.is_dir():
        raise BadInputError(f"cannot write {path}: folder {path.parent} does not exist")
    return path


def _need(module: str, fmt: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInputError(f"{fmt} export needs the package {module!r}: "
                            f"{_INSTALL['bioimageio' if fmt == 'bioimageio' else 'onnx']}") from None


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON written next to an ONNX or TorchScript export: ``<file>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


# ------------------------------------------------------------------ export
def export_model(model: Model | str | os.PathLike, fmt: str, out: str | os.PathLike, *,
                 sample=None) -> ExportResult:
    """Export ``model`` (a :class:`Model`, preset name or model file) to ``out``.

    ``fmt``: ``"onnx"`` (``.onnx``), ``"torchscript"`` (``.pt``) or ``"bioimageio"``
    (``.zip``). ``sample``: a raw 2-D image (default: a bundled sample) for the
    checks, the bioimage.io test tensors and its cover. ONNX and TorchScript also
    write ``<out>.json`` (:func:`usage`). The export is checked before it is moved
    into place; bad arguments, a missing optional package or a failed check raise
    :class:`BadInputError` and leave no file.
    """
    start = time.perf_counter()
    if not isinstance(fmt, str):
        raise BadInputError(f"export format must be a string, got {type(fmt).__name__}")
    fmt = fmt.lower()
    path = _check_out(fmt, out)
    if fmt == "onnx":
        _need("onnx", fmt), _need("onnxruntime", fmt)
    elif fmt == "bioimageio":
        _need("bioimageio.spec", fmt), _need("bioimageio.core", fmt)
        _need("onnx", fmt), _need("onnxruntime", fmt)
    model = load_model(model)
    raw = _sample_planes(model, sample)
    net = export_net(model)
    result = ExportResult(path=path, format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: recorded on purpose
        if fmt == "onnx":
            _export_file(model, net, raw, path, result, _write_onnx, _check_onnx)
        elif fmt == "torchscript":
            _export_file(model, net, raw, path, result, _write_torchscript, _check_torchscript)
        else:
            _export_bioimageio(model, net, raw, path, result)
    result.seconds = time.perf_counter() - start
    return result


def _export_file(model, net, raw, path, result, write, check) -> None:
    meta = usage(model)
    x = normalized(model, raw)
    inputs = [x, _second_size(x, net.multiple)]
    side = sidecar_path(path)
    written_side = False
    try:
        with atomic_path(path) as tmp:
            write(net, x, tmp, meta)
            diffs = check(net, tmp, inputs)
            meta["verification"] = {
                "reference": "PyTorch (the same graph, eager)",
                "sizes": [list(i.shape[2:]) for i in inputs],
                "max_abs_difference": [float(d) for d in diffs],
                "tolerance": TOLERANCE,
            }
            with atomic_path(side) as tmp_side:
                tmp_side.write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            written_side = True
    except BaseException:
        if written_side:
            with contextlib.suppress(OSError):
                side.unlink()
        raise
    result.files = [path, side]
    result.checks = meta["verification"]


def _compare(what: str, ref: np.ndarray, got: np.ndarray) -> float:
    if got.shape != ref.shape:
        raise BadInputError(f"{what}: output shape {got.shape}, PyTorch gives {ref.shape}; not exported")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    if not diff <= TOLERANCE:
        raise BadInputError(f"{what}: output differs from PyTorch by {diff:.3g} (tolerance {TOLERANCE}); "
                            "not exported")
    return diff


# ---------------------------------------------------------------------- ONNX
def _write_onnx(net: ExportNet, x: np.ndarray, tmp: Path, meta: dict) -> None:
    import onnx

    buf = io.BytesIO()
    dyn = {0: "batch", 2: "height", 3: "width"}
    example = torch.from_numpy(_trace_example(net, x))
    try:
        torch.onnx.export(net, (example,), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": dyn, "output": dyn})
    except Exception as exc:
        raise BadInputError(f"ONNX export failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = "napari-jointattn: normalised (B, C, H, W) -> softmax probabilities (B, K, H, W)"
    entry = proto.metadata_props.add()
    entry.key, entry.value = "napari_jointattn", json.dumps(meta, allow_nan=False)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise BadInputError(f"ONNX checker refused the graph: {str(exc).splitlines()[0]}") from exc
    with open(tmp, "wb") as fh:
        fh.write(proto.SerializeToString())
        fh.flush()
        os.fsync(fh.fileno())


def _trace_example(net: ExportNet, x: np.ndarray) -> np.ndarray:
    """A tracing input whose padded size is at least two cells of the deepest scale (so the
    network's own padding is traced as none and the graph's padding does the work)."""
    need = math.ceil(2 * net.multiple / net.upsample)
    h, w = x.shape[2:]
    if h >= need and w >= need:
        return x[:1]
    return np.pad(x[:1], ((0, 0), (0, 0), (0, max(0, need - h)), (0, max(0, need - w))), mode="edge")


def onnx_session(path: str | os.PathLike):
    """An ONNX Runtime session on the CPU for an exported file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check_onnx(net: ExportNet, tmp: Path, inputs: list[np.ndarray]) -> list[float]:
    try:
        session = onnx_session(tmp)
    except Exception as exc:
        raise BadInputError(f"ONNX Runtime cannot load the exported graph: {str(exc).splitlines()[0]}") from exc
    diffs = []
    for x in inputs:
        got = session.run(["output"], {"input": x})[0]
        diffs.append(_compare(f"ONNX at {x.shape[2]} x {x.shape[3]}", _run_torch(net, x), got))
    return diffs


# --------------------------------------------------------------- TorchScript
def _write_torchscript(net: ExportNet, x: np.ndarray, tmp: Path, meta: dict) -> None:
    example = torch.from_numpy(_trace_example(net, x))
    try:
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(net, example, check_trace=False)
        traced = torch.jit.freeze(traced.eval())
    except Exception as exc:
        raise BadInputError(f"TorchScript export failed: {str(exc).splitlines()[0]}") from exc
    torch.jit.save(traced, str(tmp), _extra_files={"napari_jointattn.json": json.dumps(meta, allow_nan=False)})


def _check_torchscript(net: ExportNet, tmp: Path, inputs: list[np.ndarray]) -> list[float]:
    loaded = torch.jit.load(str(tmp), map_location="cpu")
    diffs = []
    for x in inputs:
        # the plain interpreter: the profiling executor's passes would cost seconds for a single call
        with torch.no_grad(), torch.jit.optimized_execution(False):
            got = loaded(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        diffs.append(_compare(f"TorchScript at {x.shape[2]} x {x.shape[3]}", _run_torch(net, x), got))
    return diffs


# ---------------------------------------------------------------- bioimage.io
def _cover(model: Model, raw: np.ndarray, probs: np.ndarray, target: Path) -> None:
    """A 2:1 PNG: the normalised input (grey) beside its class map (colours)."""
    from PIL import Image

    x = normalized(model, raw)[0].mean(axis=0)
    grey = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    labels = probs[0].argmax(axis=0)
    palette = np.array([[0, 0, 0], [255, 160, 0], [0, 170, 255], [230, 60, 120], [90, 200, 90],
                        [200, 200, 40], [160, 90, 220], [240, 240, 240]], dtype=np.uint8)
    colour = palette[1:][(labels - 1) % (len(palette) - 1)]
    colour[labels == 0] = 0
    blend = (0.45 * np.repeat(grey[..., None], 3, axis=2) + 0.55 * colour).astype(np.uint8)
    blend[labels == 0] = np.repeat(grey[..., None], 3, axis=2)[labels == 0] // 2
    h, w = grey.shape
    scale = 256 / max(h, w)  # keep the aspect ratio: each panel fits a 256 x 256 square
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    at = ((256 - size[0]) // 2, (256 - size[1]) // 2)
    sheet = Image.new("RGB", (512, 256))
    sheet.paste(Image.fromarray(grey).convert("RGB").resize(size, Image.NEAREST), at)
    sheet.paste(Image.fromarray(blend).resize(size, Image.NEAREST), (256 + at[0], at[1]))
    sheet.save(target, format="PNG")


def _readme(model: Model, meta: dict) -> str:
    lines = [
        f"# {model.name} (napari-jointattn)", "",
        model.description or "A joint-attention DenseUNet exported by napari-jointattn.", "",
        ("Input `input`: (batch, channel, y, x) float32 intensities; the package's preprocessing "
        "(`scale_range` then `clip`) normalises raw images as napari-jointattn does. "
        f"At least {meta['input']['min_size']} px a side; any size (padding is inside the graph)."), "",
        "Output `output`: (batch, class, y, x) softmax class probabilities for the classes "
        + ", ".join(f"{i} = {c}" for i, c in enumerate(model.classes)) + ".", "",
        "## From the output to napari-jointattn's labels", "",
        *[f"{s}" for s in meta["labels_from_output"]], "",
        "## Settings", "",
        "```json", json.dumps({k: meta[k] for k in ("normalization", "postprocess")}, indent=2), "```", "",
        "# Validation", "",
        "The export compared both weight formats with the PyTorch model (maximum absolute difference "
        "of the probabilities): " + json.dumps(meta.get("verification", {}).get("max_abs_difference", {}))
        + f"; tolerance {TOLERANCE}. bioimageio.core then validated this package and test-ran it "
        "(test output reproduced, batch sizes 1 and 2 at several sizes).", "",
        f"Method: {CITATION['text']} doi:{CITATION['doi']}", "",
        "Provenance (training record, scores): `config.napari_jointattn` in rdf.yaml.", "",
    ]
    return "\n".join(lines)


def _safe_name(model: Model) -> str:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+- ()")
    name = "".join(c if c in allowed else " " for c in f"napari-jointattn {model.name}").strip()
    return " ".join(name.split())[:64]


def _rdf(model: Model, meta: dict, files: dict[str, str], test_shape: tuple[int, ...]) -> dict:
    norm = model.normalization
    low, high = norm.percentiles
    axes = ["channel", "y", "x"] if norm.per == "image" else ["batch", "channel", "y", "x"]
    size = {"min": meta["input"]["min_size"], "step": 1}
    channel_names = [f"class{i}" for i in range(model.num_classes)]
    description = (f"{model.description or 'Joint-attention DenseUNet'} Exported by napari-jointattn "
                   f"{__version__}. Output: softmax probabilities of "
                   + ", ".join(model.classes) + "; labels: see README.md.")
    return {
        "type": "model",
        "format_version": "0.5.4",
        "name": _safe_name(model),
        "description": description[:500],
        "authors": [{"name": AUTHOR}],
        "cite": [{"text": CITATION["text"], "doi": CITATION["doi"]}],
        "license": LICENSE,
        "documentation": files["readme"],
        "covers": [files["cover"]],
        "tags": ["segmentation", "2d", "pytorch", "attention", "napari-jointattn"],
        "version": "0.1.0",
        "inputs": [{
            "id": "input",
            "description": "raw intensities (normalised by the preprocessing)",
            "axes": [
                {"type": "batch"},
                {"type": "channel", "channel_names": [f"channel{i}" for i in range(model.in_channels)]},
                {"type": "space", "id": "y", "size": size},
                {"type": "space", "id": "x", "size": size},
            ],
            "test_tensor": {"source": files["test_input"]},
            "data": {"type": "float32"},
            "preprocessing": [
                {"id": "scale_range", "kwargs": {"axes": axes, "min_percentile": float(low),
                                                  "max_percentile": float(high)}},
                {"id": "clip", "kwargs": {"min": -10.0, "max": 10.0}},
                {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
            ],
        }],
        "outputs": [{
            "id": "output",
            "description": "softmax class probabilities, classes in the order "
                           + ", ".join(f"{i}={c}" for i, c in enumerate(model.classes)),
            "axes": [
                {"type": "batch"},
                {"type": "channel", "channel_names": channel_names},
                {"type": "space", "id": "y", "size": {"tensor_id": "input", "axis_id": "y"}},
                {"type": "space", "id": "x", "size": {"tensor_id": "input", "axis_id": "x"}},
            ],
            "test_tensor": {"source": files["test_output"]},
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "weights": {
            "torchscript": {"source": files["torchscript"], "pytorch_version": torch.__version__.split("+")[0]},
            "onnx": {"source": files["onnx"], "opset_version": ONNX_OPSET, "parent": "torchscript"},
        },
        "config": {"napari_jointattn": meta},
    }


def validate_package(path: str | os.PathLike, *, run: bool = True, weight_format: str | None = None,
                     stop_early: bool = False) -> dict:
    """Validate a bioimage.io package with ``bioimageio.core`` and (``run``) test-run it.

    The test run loads each weight format (or only ``weight_format``), runs the
    package's preprocessing, the weights and the postprocessing on the test input,
    compares with the test output, and runs batch sizes 1 and 2 at three sizes.
    Returns ``{"status", "format", "errors", "summary"}``: ``status`` is ``"passed"``
    only when all of that passed. It all runs in a child process (with this process's
    number of PyTorch threads): the test run seeds NumPy's and PyTorch's global
    generators and sets PyTorch's deterministic-algorithms switch, which in this
    process would reach every other thread; here nothing global changes.
    """
    _need("bioimageio.core", "bioimageio")
    from bioimageio.spec.summary import ValidationSummary

    package_root = str(Path(__file__).resolve().parents[3])  # this copy of napari_jointattn
    paths = [package_root, os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with tempfile.TemporaryDirectory(prefix="jointattn-validate-") as work:
        out = Path(work) / "summary.json"
        job = {"path": str(Path(path).resolve()), "run": run, "weight_format": weight_format,
               "stop_early": stop_early, "threads": torch.get_num_threads(), "out": str(out)}
        code = ("import sys; from napari_jointattn.engine.models.export import _validate_here; "
                "_validate_here(sys.argv[1])")
        done = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True,
                              text=True, check=False, env=env, cwd=work)
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise BadInputError(f"bioimage.io validation did not run: {last}")
        found = json.loads(out.read_text(encoding="utf-8"))
    summary = ValidationSummary.model_validate(found["summary"])
    failed = any(d.status == "failed" for d in summary.details)
    # bioimageio.core can report "valid-format" for a package whose test run failed: any failed
    # step means failed here
    status = "failed" if failed or summary.status == "failed" else summary.status
    return {"status": status, "format": found["format"], "errors": _errors(summary),
            "summary": summary}


def _validate_here(job: str) -> None:
    """The child process of :func:`validate_package`: validate, test-run, write the summary."""
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    job = json.loads(job)
    torch.set_num_threads(job["threads"])
    with _quiet_bioimageio():
        descr = load_description(Path(job["path"]), perform_io_checks=True)
        fmt = descr.validation_summary.status
        if job["run"] and fmt in ("passed", "valid-format"):
            with torch.jit.optimized_execution(False):  # as in _check_torchscript
                summary = test_model(job["path"], weight_format=job["weight_format"],
                                     stop_early=job["stop_early"])
        else:
            summary = descr.validation_summary
    found = {"format": fmt, "summary": summary.model_dump(mode="json")}
    Path(job["out"]).write_text(json.dumps(found), encoding="utf-8")


def _errors(summary) -> list[str]:
    out = []
    for d in summary.details:
        for e in d.errors:
            loc = ".".join(map(str, e.loc))
            out.append(f"{d.name}: {loc + ': ' if loc else ''}{e.msg}".replace("\n", " "))
    return out


@contextlib.contextmanager
def _quiet_bioimageio():
    try:
        from loguru import logger
    except ImportError:  # pragma: no cover
        yield
        return
    logger.disable("bioimageio")
    try:
        yield
    finally:
        logger.enable("bioimageio")


def _export_bioimageio(model: Model, net: ExportNet, raw: np.ndarray, path: Path, result: ExportResult) -> None:
    meta = usage(model)
    x = normalized(model, raw)
    inputs = [x, _second_size(x, net.multiple)]
    names = {"torchscript": "weights_torchscript.pt", "onnx": "weights.onnx", "test_input": "test_input.npy",
             "test_output": "test_output.npy", "cover": "cover.png", "readme": "README.md"}
    try:
        workspace = tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent)
    except OSError as exc:
        raise BadInputError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc
    with workspace as work:
        folder = Path(work)
        _write_torchscript(net, x, folder / names["torchscript"], meta)
        ts_diffs = _check_torchscript(net, folder / names["torchscript"], inputs)
        _write_onnx(net, x, folder / names["onnx"], meta)
        onnx_diffs = _check_onnx(net, folder / names["onnx"], inputs)
        probs = _run_torch(net, x)
        np.save(folder / names["test_input"], raw.astype(np.float32))
        np.save(folder / names["test_output"], probs.astype(np.float32))
        _cover(model, raw, probs, folder / names["cover"])
        meta["verification"] = {
            "reference": "PyTorch (the same graph, eager)",
            "sizes": [list(i.shape[2:]) for i in inputs],
            "max_abs_difference": {"torchscript": ts_diffs, "onnx": onnx_diffs},
            "tolerance": TOLERANCE,
        }
        (folder / names["readme"]).write_text(_readme(model, meta), encoding="utf-8")
        rdf = _rdf(model, meta, names, raw.shape)
        from bioimageio.spec import ValidationContext, build_description, save_bioimageio_package

        with _quiet_bioimageio(), ValidationContext(root=folder, perform_io_checks=True):
            descr = build_description(rdf)
        if descr.validation_summary.status not in ("passed", "valid-format"):
            raise BadInputError("bioimage.io description is invalid: "
                                + next(iter(_errors(descr.validation_summary)), descr.validation_summary.status))
        with atomic_path(path) as tmp:
            staged = tmp.with_name(tmp.name + ".zip")
            try:
                with _quiet_bioimageio():
                    save_bioimageio_package(descr, output_path=staged)
                check = validate_package(staged)
                if check["status"] != "passed":
                    raise BadInputError("bioimage.io test run failed: "
                                        + (check["errors"][0] if check["errors"] else check["status"]))
                os.replace(staged, tmp)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()
    with zipfile.ZipFile(path) as zf:
        result.files = [path]
        result.checks = {**meta["verification"], "bioimageio": check["status"], "package": sorted(zf.namelist())}
