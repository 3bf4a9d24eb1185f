"""Model files: safetensors weights plus validated JSON metadata, one file.

The metadata JSON lives in the safetensors header (key ``napari_jointattn``).
Loading parses that header and the raw tensors only: nothing is unpickled,
nothing is evaluated, and the metadata is checked against a schema (types,
ranges, known architectures) before any network is built.

Order of checks, so that a small file cannot make the loader allocate much:
the file is a regular file; the metadata is at most ``MAX_METADATA_BYTES``
and ``MAX_METADATA_DEPTH`` levels deep; every config value is in its range
(a pydantic schema); the network the config describes is built on PyTorch's
``meta`` device (shapes only, no memory), and its parameter count (at most
``MAX_PARAMETERS``), tensor names, shapes and dtypes must equal the tensors
the file's header lists. Only then is the real network allocated (no larger
than the file's own tensors), the weights read, and checked to be finite.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from .._version import __version__
from ..model import DenseUNet, DenseUNetConfig
from .checks import check_classes
from .errors import BadInputError
from .files import check_regular_file, write_bytes_atomic

META_KEY = "napari_jointattn"
FORMAT = "napari-jointattn-model"
FORMAT_VERSION = 1
ARCHITECTURES = {"DenseUNet": (DenseUNet, DenseUNetConfig)}
MODEL_SUFFIX = ".safetensors"
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
MODEL_DIR_ENV = "NAPARI_JOINTATTN_MODEL_DIR"
POSTPROCESS_KEYS = {"instances", "min_size", "min_distance", "distance_channel", "threshold"}
#: the metadata JSON may be at most this long and this deeply nested
MAX_METADATA_BYTES = 1 << 20
MAX_METADATA_DEPTH = 32
#: a network may have at most this many parameters (about 2 GB of float32 weights)
MAX_PARAMETERS = 500_000_000
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class Model:
    """A network with what is needed to use it: classes, normalisation, post-processing."""

    net: DenseUNet
    name: str
    classes: list[str]
    normalization: dict = field(default_factory=lambda: {"percentiles": [1.0, 99.8], "per": "image"})
    postprocess: dict = field(default_factory=lambda: {"instances": False})
    description: str = ""
    provenance: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    path: Path | None = None

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
        return bool(self.postprocess.get("instances", False))

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "architecture": "DenseUNet",
            "config": self.net.config.to_dict(),
            "classes": list(self.classes),
            "normalization": dict(self.normalization),
            "postprocess": dict(self.postprocess),
            "provenance": dict(self.provenance),
            "scores": dict(self.scores),
        }


# --------------------------------------------------------------------- schema
def _fail(where: str, msg: str) -> BadInputError:
    return BadInputError(f"invalid model metadata in {where}: {msg}")


def validate_metadata(meta: object, where: str = "model file") -> dict:
    """Check types and ranges of model metadata; return it or raise BadInputError."""
    if not isinstance(meta, dict):
        raise _fail(where, "metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise _fail(where, f"not a {FORMAT} file (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise _fail(where, f"unsupported format_version {version!r}")
    arch = meta.get("architecture")
    if arch not in ARCHITECTURES:
        raise _fail(where, f"unknown architecture {arch!r} (known: {sorted(ARCHITECTURES)})")
    for key, typ in (("name", str), ("description", str), ("config", dict), ("classes", list),
                     ("normalization", dict), ("postprocess", dict), ("provenance", dict),
                     ("scores", dict)):
        if not isinstance(meta.get(key), typ):
            raise _fail(where, f"'{key}' must be a {typ.__name__}")
    classes = meta["classes"]
    if not 2 <= len(classes) <= 255 or not all(isinstance(c, str) and c for c in classes):
        raise _fail(where, "'classes' must list 2 to 255 non-empty names")
    try:
        check_classes(classes)
    except BadInputError as exc:
        raise _fail(where, str(exc)) from None
    config = _check_config(meta["config"], where)
    if config.num_classes != len(classes):
        raise _fail(where, f"{len(classes)} class names for a {config.num_classes}-class network")
    norm = meta["normalization"]
    pct = norm.get("percentiles")
    if (
        not isinstance(pct, list)
        or len(pct) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pct)
        or not 0 <= pct[0] < pct[1] <= 100
    ):
        raise _fail(where, "normalization.percentiles must be [low, high] with 0 <= low < high <= 100")
    if norm.get("per") not in ("image", "volume"):
        raise _fail(where, "normalization.per must be 'image' or 'volume'")
    post = meta["postprocess"]
    unknown = set(post) - POSTPROCESS_KEYS
    if unknown:
        raise _fail(where, f"unknown postprocess keys {sorted(unknown)}")
    if not isinstance(post.get("instances", False), bool):
        raise _fail(where, "postprocess.instances must be true or false")
    for key, lo, hi in (("min_size", 0, 10**6), ("min_distance", 1, 1000)):
        if key in post:
            v = post[key]
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise _fail(where, f"postprocess.{key} must be an integer in [{lo}, {hi}]")
    if "threshold" in post:
        v = post["threshold"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
            raise _fail(where, "postprocess.threshold must be a number in (0, 1)")
    if "distance_channel" in post:
        v = post["distance_channel"]
        if not isinstance(v, bool):
            raise _fail(where, "postprocess.distance_channel must be true or false")
        if v and config.aux_channels < 1:
            raise _fail(where, "postprocess.distance_channel needs a network with aux_channels >= 1")
    return meta


def _config_schema():
    """The pydantic model of ``DenseUNetConfig`` values in a file: types and ranges.

    Ranges are generous (DenseUNetConfig.large() is well inside) but bounded,
    so that no config can describe a network that takes minutes to build.
    """
    global _CONFIG_SCHEMA
    if _CONFIG_SCHEMA is not None:
        return _CONFIG_SCHEMA
    from pydantic import BaseModel, ConfigDict, Field

    def count(lo: int, hi: int):
        return Annotated[int, Field(ge=lo, le=hi)]

    class ConfigSchema(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        in_channels: count(1, 64) = 1
        num_classes: count(2, 255) = 2
        aux_channels: count(0, 16) = 0
        stem_channels: count(1, 1024) = 24
        growth: count(1, 512) = 16
        block_layers: Annotated[list[count(1, 64)], Field(min_length=1, max_length=6)] = [4, 6, 8, 6]
        bottleneck: count(1, 16) = 4
        compression: Annotated[float, Field(gt=0, le=1)] = 0.5
        decoder_channels: Annotated[list[count(1, 2048)], Field(min_length=2, max_length=7)] = [128, 96, 64, 32, 24]
        head_channels: count(1, 1024) = 8
        head_layers: count(1, 16) = 1
        attention: Annotated[str, Field(max_length=32)] = "joint"
        joint_form: Annotated[str, Field(max_length=32)] = "mix"
        attention_levels: Annotated[list[count(0, 5)], Field(max_length=6)] = [1, 2, 3]
        attention_dim: count(1, 1024) = 32
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
        norm: Annotated[str, Field(max_length=32)] = "group"
        extra: dict = {}

    _CONFIG_SCHEMA = ConfigSchema
    return ConfigSchema


_CONFIG_SCHEMA = None


def _describe(err: dict) -> str:
    """A pydantic error as 'must be ...'."""
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    simple = {"int_type": "must be an integer", "int_parsing": "must be an integer",
              "int_from_float": "must be an integer", "float_type": "must be a number",
              "string_type": "must be a string", "list_type": "must be a list",
              "dict_type": "must be an object", "extra_forbidden": "is not a known config key",
              "missing": "is missing"}
    if kind in simple:
        return simple[kind]
    bounds = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}
    for name, sign in bounds.items():
        if kind == name:
            return f"is out of range: must be {sign} {next(iter(ctx.values()), '?')}"
    if kind in ("too_long", "too_short"):
        return f"must have {ctx.get('min_length', 0)} to {ctx.get('max_length', '?')} entries"
    return f"is invalid ({err.get('msg', kind)})"


def _check_config(cfg: dict, where: str) -> DenseUNetConfig:
    from pydantic import ValidationError

    try:
        _config_schema().model_validate(cfg)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        value = err.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        raise _fail(where, f"config.{loc} {_describe(err)} (got {shown[:60]})") from None
    try:
        return DenseUNetConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise _fail(where, str(exc)) from exc


# ----------------------------------------------------------------- locations
def model_dir() -> Path:
    """The user's model folder (``$NAPARI_JOINTATTN_MODEL_DIR`` or a per-user data dir)."""
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-jointattn", appauthor=False)) / "models"


def preset_names() -> list[str]:
    from .presets import PRESETS

    return list(PRESETS)


def saved_models(folder: Path | None = None, regular_only: bool = True) -> list[Path]:
    """Model files in the model folder (hidden files skipped).

    ``regular_only``: skip FIFOs, devices, directories and broken links, which
    cannot be model files (and a FIFO would block whoever opens it).
    """
    folder = folder or model_dir()
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.glob(f"*{MODEL_SUFFIX}") if not p.name.startswith("."))
    return [p for p in found if p.is_file()] if regular_only else found


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_model(name: str | os.PathLike) -> Path:
    """A preset name, a saved model's name, or a path to a model file -> file path."""
    text = os.fspath(name)
    from .presets import PRESETS

    if text in PRESETS:
        path = PRESET_DIR / f"{text}{MODEL_SUFFIX}"
        if not path.is_file():
            raise BadInputError(
                f"preset {text!r} has no bundled weights in this installation "
                "(train it with scripts/train_presets.py)"
            )
        return path
    path = Path(text)
    looks_like_path = "/" in text or os.sep in text or text.endswith(MODEL_SUFFIX) or text.startswith(".")
    if path.is_file():
        return path
    if looks_like_path:
        if not os.path.lexists(path):
            raise BadInputError(f"model file {text} not found")
        check_regular_file(path, "model file")  # names a directory, FIFO or device as such
    if _SAFE_NAME.match(text):
        saved = model_dir() / f"{text}{MODEL_SUFFIX}"
        if saved.is_file():
            return saved
        if os.path.lexists(saved):
            check_regular_file(saved, "model file")
    if os.path.lexists(path):
        check_regular_file(path, "model file")
    names = ", ".join(preset_names() + [p.stem for p in saved_models()])
    raise BadInputError(f"unknown model {text!r} (available: {names})")


# ---------------------------------------------------------------- load / save
def read_metadata(path: str | os.PathLike) -> dict:
    """The validated metadata of a model file, without loading weights."""
    from safetensors import safe_open

    path = Path(path)
    check_regular_file(path, "model file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except Exception as exc:
        raise BadInputError(f"{path.name} is not a valid safetensors model file ({_one_line(exc)})") from exc
    if raw is None:
        raise BadInputError(f"{path.name}: no napari-jointattn metadata in the file")
    return validate_metadata(parse_metadata_json(raw, path.name), path.name)


def parse_metadata_json(raw: str, where: str = "model file") -> object:
    """Parse metadata JSON with bounds: size, nesting depth; NaN/Infinity become null."""
    if len(raw) > MAX_METADATA_BYTES:
        raise BadInputError(f"{where}: model metadata is {len(raw):,} bytes; at most {MAX_METADATA_BYTES:,} allowed")
    try:
        meta = json.loads(raw, parse_constant=lambda _name: None)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{where}: model metadata is not valid JSON ({exc.msg})") from exc
    except RecursionError:
        meta = None
        depth = MAX_METADATA_DEPTH + 1
    else:
        depth = _depth(meta)
    if depth > MAX_METADATA_DEPTH:
        raise BadInputError(f"{where}: model metadata is nested more than {MAX_METADATA_DEPTH} levels deep")
    return meta


def _depth(obj: object) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_METADATA_DEPTH:
                return d
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, d + 1) for c in children)
    return deepest


def finite_json(obj: object) -> object:
    """A copy with NaN and infinite floats replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def inspect_model(path: str | os.PathLike) -> dict:
    """Every check of a model file that reads no weights: metadata, config, tensor list.

    The network the config describes is built on the ``meta`` device (no
    memory); its tensor names, shapes and dtypes must equal those in the
    file's header. Returns the validated metadata.
    """
    from safetensors import safe_open

    path = Path(path)
    meta = read_metadata(path)
    net_cls, cfg_cls = ARCHITECTURES[meta["architecture"]]
    try:
        with torch.device("meta"):
            skeleton = net_cls(cfg_cls.from_dict(meta["config"]))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _fail(path.name, f"config cannot build a network ({_one_line(exc)})") from exc
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    n_params = sum(math.prod(shape) for shape, _ in expected.values())
    if n_params > MAX_PARAMETERS:
        raise _fail(path.name, f"the config describes {n_params:,} parameters; at most {MAX_PARAMETERS:,} allowed")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            keys = set(fh.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            if missing or unexpected:
                raise BadInputError(
                    f"{path.name}: weights do not match the architecture in its metadata "
                    f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
                )
            for key, (shape, dtype) in expected.items():
                sl = fh.get_slice(key)
                got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
                if got_shape != shape or got_dtype != _SAFETENSORS_DTYPES.get(dtype):
                    raise BadInputError(
                        f"{path.name}: tensor {key} has shape {got_shape} {got_dtype}, "
                        f"the architecture needs {shape} {_SAFETENSORS_DTYPES.get(dtype, dtype)}"
                    )
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"{path.name}: cannot read weights ({_one_line(exc)})") from exc
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


def list_models(folder: Path | None = None) -> list[dict]:
    """Presets and saved models: ``{"kind", "name", "path", "metadata", "error"}`` each.

    Never blocks and never fails as a whole: FIFOs, devices and directories
    named like model files, and files that fail any check of
    :func:`inspect_model`, are listed with ``metadata`` None and ``error`` set.
    """
    from .presets import PRESETS

    rows = []
    for name, spec in PRESETS.items():
        path = PRESET_DIR / f"{name}{MODEL_SUFFIX}"
        row = {"kind": "preset", "name": name, "path": None, "metadata": None,
               "error": None, "description": spec["description"]}
        if path.is_file():
            try:
                row.update(path=path, metadata=inspect_model(path))
            except BadInputError as exc:
                row["error"] = str(exc)
        rows.append(row)
    for path in saved_models(folder, regular_only=False):
        row = {"kind": "saved", "name": path.stem, "path": path, "metadata": None, "error": None,
               "description": ""}
        try:
            meta = inspect_model(path)
            row.update(metadata=meta, description=meta.get("description", ""))
        except BadInputError as exc:
            row["error"] = str(exc)
        except (OSError, RecursionError, MemoryError) as exc:  # pragma: no cover - defensive
            row["error"] = f"{path.name}: unreadable ({_one_line(exc)})"
        rows.append(row)
    return rows


def save_model(model: Model, path: str | os.PathLike) -> Path:
    """Write ``model`` atomically as one safetensors file with its metadata."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != MODEL_SUFFIX:
        raise BadInputError(f"model files end in {MODEL_SUFFIX}: {path.name}")
    meta = model.metadata()
    meta["provenance"] = {
        "code_version": __version__,
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta["provenance"],
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
