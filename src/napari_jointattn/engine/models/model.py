"""Model files: safetensors weights plus validated JSON metadata, one file.

The metadata JSON lives in the safetensors header (key ``napari_jointattn``).
Loading parses that header and the raw tensors only: nothing is unpickled,
nothing is evaluated, and the metadata is checked against a schema (types,
ranges, known architectures) before any network is built.

Order of checks, so that a small file cannot make the loader allocate much:
everything :mod:`.metadata` checks without torch (a regular file, a header
and tensor table that fit the file, metadata at most ``MAX_METADATA_BYTES``
and ``MAX_METADATA_DEPTH`` levels deep, the pydantic schema with upper bounds
on every config value); then ``DenseUNetConfig.validate``; then the network
the config describes is built on PyTorch's ``meta`` device (shapes only, no
memory), and its parameter count (at most ``MAX_PARAMETERS``), tensor names,
shapes and dtypes must equal the tensors the file's header lists. Only then
is the real network allocated (no larger than the file's own tensors), the
weights read, and checked to be finite.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..._version import __version__
from ...model import DenseUNet, DenseUNetConfig
from ..errors import BadInputError
from ..io.files import write_bytes_atomic
from ..io.normalize import Normalization
from .metadata import (
    FORMAT,
    FORMAT_VERSION,
    META_KEY,
    MODEL_SUFFIX,
    DataStatistics,
    Postprocess,
    _fail,
    _read,
    _short,
    finite_json,
    resolve_model,
    training_statistics,
    validate_metadata,
)

ARCHITECTURES = {"DenseUNet": (DenseUNet, DenseUNetConfig)}
#: a network may have at most this many parameters (about 2 GB of float32 weights)
MAX_PARAMETERS = 500_000_000
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_one_line = _short


@dataclass
class Model:
    """A network with what is needed to use it: classes, normalisation, post-processing."""

    net: DenseUNet
    name: str
    classes: list[str]
    normalization: Normalization = field(default_factory=Normalization)
    postprocess: Postprocess = field(default_factory=Postprocess)
    description: str = ""
    provenance: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    path: Path | None = None

    def __setattr__(self, key: str, value) -> None:
        # a mapping given for a setting (older code, a file) becomes the typed, validated object
        if key == "normalization":
            value = Normalization.coerce(value)
        elif key == "postprocess":
            value = Postprocess.coerce(value)
        object.__setattr__(self, key, value)

    @property
    def config(self) -> DenseUNetConfig:
        return self.net.config

    @property
    def in_channels(self) -> int:
        return self.net.config.in_channels

    @property
    def num_classes(self) -> int:
        return self.net.config.num_classes

    @property
    def instances(self) -> bool:
        return self.postprocess.instances

    @property
    def trained_on(self) -> DataStatistics | None:
        """Statistics of the data this model was trained on (``provenance.data_statistics``), if known."""
        return training_statistics(self.provenance)

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "architecture": "DenseUNet",
            "config": self.net.config.to_dict(),
            "classes": list(self.classes),
            "normalization": self.normalization.to_dict(),
            "postprocess": self.postprocess.to_dict(),
            "provenance": dict(self.provenance),
            "scores": dict(self.scores),
        }


# ------------------------------------------------------------ load / save
def inspect_model(path: str | os.PathLike) -> dict:
    """Every check of a model file that reads no weights: metadata, config, tensor table.

    The config is checked by ``DenseUNetConfig.validate``, and the network it
    describes is built on the ``meta`` device (no memory); its tensor names,
    shapes and dtypes must equal those in the file's header. Returns the
    validated metadata.
    """
    path = Path(path)
    meta, tensors = _read(path)
    net_cls, cfg_cls = ARCHITECTURES[meta["architecture"]]
    try:
        config = cfg_cls.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise _fail(path.name, f"config: {_one_line(exc)}") from None
    try:
        with torch.device("meta"):
            skeleton = net_cls(config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _fail(path.name, f"config cannot build a network ({_one_line(exc)})") from exc
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    n_params = sum(math.prod(shape) for shape, _ in expected.values())
    if n_params > MAX_PARAMETERS:
        raise _fail(path.name, f"the config describes {n_params:,} parameters; at most {MAX_PARAMETERS:,} allowed")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BadInputError(
            f"{path.name}: weights do not match the architecture in its metadata "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    for key, (shape, dtype) in expected.items():
        got_shape, got_dtype = tuple(tensors[key]["shape"]), tensors[key]["dtype"]
        if got_shape != shape or got_dtype != _SAFETENSORS_DTYPES.get(dtype):
            raise BadInputError(
                f"{path.name}: tensor {key} has shape {got_shape} {got_dtype}, "
                f"the architecture needs {shape} {_SAFETENSORS_DTYPES.get(dtype, dtype)}"
            )
    meta["parameters"] = n_params
    return meta


def load_model(name: str | os.PathLike | Model) -> Model:
    """Load a preset or model file (weights on CPU). Never unpickles anything.

    Everything that can be checked without reading weights is checked first
    (:func:`inspect_model`); weights that are NaN or infinite are refused.
    """
    if isinstance(name, Model):
        return name
    from safetensors import safe_open

    path = resolve_model(name)
    meta = inspect_model(path)
    meta.pop("parameters", None)
    net_cls, cfg_cls = ARCHITECTURES[meta["architecture"]]
    net = net_cls(cfg_cls.from_dict(meta["config"]))
    expected = net.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            state = {}
            for key in expected:
                t = fh.get_tensor(key)
                if t.shape != expected[key].shape or t.dtype != expected[key].dtype:
                    raise BadInputError(
                        f"{path.name}: tensor {key} has shape {tuple(t.shape)} {t.dtype}, "
                        f"the architecture needs {tuple(expected[key].shape)} {expected[key].dtype}"
                    )
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise BadInputError(
                        f"{path.name}: tensor {key} holds NaN or infinite weights; the file is damaged "
                        "or came from a diverged training run"
                    )
                state[key] = t
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"{path.name}: cannot read weights ({_one_line(exc)})") from exc
    net.load_state_dict(state)
    net.eval()
    return Model(
        net=net,
        name=meta["name"] or path.stem,
        classes=list(meta["classes"]),
        normalization=meta["normalization"],
        postprocess=meta["postprocess"],
        description=meta["description"],
        provenance=meta["provenance"],
        scores=meta["scores"],
        path=path,
    )


def save_model(model: Model, path: str | os.PathLike) -> Path:
    """Write ``model`` atomically as one safetensors file with its metadata.

    ``provenance.saved`` and ``provenance.code_version`` are always this save's.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != MODEL_SUFFIX:
        raise BadInputError(f"model files end in {MODEL_SUFFIX}: {path.name}")
    meta = model.metadata()
    # this file's own save time and code version: a fine-tuned model's provenance starts as a copy
    # of its parent's, whose values must not stand for this file
    meta["provenance"] = {
        **meta["provenance"],
        "code_version": __version__,
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta = finite_json(meta)
    text = json.dumps(meta, allow_nan=False)
    validate_metadata(json.loads(text), path.name)
    if path.is_dir():
        raise BadInputError(f"cannot write {path}: it is a folder")
    if not path.parent.exists():
        raise BadInputError(f"cannot write {path}: folder {path.parent} does not exist")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.net.state_dict().items()}
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadInputError(f"not saving {path.name}: weight {key} is NaN or infinite "
                                "(training diverged; try a lower learning rate)")
    data = save(tensors, metadata={META_KEY: text})
    write_bytes_atomic(path, data)
    model.path = path
    model.provenance = meta["provenance"]
    return path


def new_model(
    preset: str | None = None,
    *,
    config: DenseUNetConfig | None = None,
    classes: list[str] | None = None,
    seed: int | None = None,
    **kwargs,
) -> Model:
    """A freshly initialised model: a preset's architecture, or a given config."""
    from .presets import PRESETS

    if seed is not None:
        torch.manual_seed(seed)
    if preset is not None:
        if preset not in PRESETS:
            raise BadInputError(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
        spec = PRESETS[preset]
        cfg = config or DenseUNetConfig(**spec["config"])
        fields_ = {
            "name": preset,
            "classes": list(spec["classes"]),
            "normalization": dict(spec["normalization"]),
            "postprocess": dict(spec["postprocess"]),
            "description": spec["description"],
        }
        fields_.update(kwargs)
        return Model(net=DenseUNet(cfg).eval(), **fields_)
    if config is None or classes is None:
        raise BadInputError("new_model needs a preset name, or a config and class names")
    return Model(net=DenseUNet(config).eval(), classes=list(classes), name=kwargs.pop("name", "model"), **kwargs)
