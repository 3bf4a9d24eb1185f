"""Model-file metadata without PyTorch: the schema, the file header, where models live.

A model file is a safetensors file: 8 bytes of header length, a JSON header
(the tensor table, and string metadata whose key ``napari_jointattn`` holds
this package's metadata JSON), then raw tensor bytes. This module reads the
header with the standard library and validates the metadata with pydantic
models, so ``napari-jointattn models`` and a dock's model list never import
torch. Weights are read, and checked against the network the config
describes, by :mod:`.models`.

Checks that need no weights, in order: a regular file; a header length inside
the file; a tensor table whose dtypes, shapes and byte ranges fit the file; the
metadata JSON at most ``MAX_METADATA_BYTES`` and ``MAX_METADATA_DEPTH`` deep;
then the schema (:class:`Metadata`): types, upper bounds on config values (so no
config can describe a network that takes minutes to build; lower bounds and
structure are ``DenseUNetConfig.validate``'s), class names, normalisation,
post-processing and the training-data statistics.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import BadInputError, one_line
from ..io.files import check_regular_file
from ..io.normalize import Normalization, Number, Record, describe_error

META_KEY = "napari_jointattn"
FORMAT = "napari-jointattn-model"
FORMAT_VERSION = 1
ARCHITECTURE_NAMES = ("DenseUNet",)
MODEL_SUFFIX = ".safetensors"
PRESET_DIR = Path(__file__).resolve().parents[2] / "presets"
MODEL_DIR_ENV = "NAPARI_JOINTATTN_MODEL_DIR"
#: the metadata JSON may be at most this long and this deeply nested
MAX_METADATA_BYTES = 1 << 20
MAX_METADATA_DEPTH = 32
#: safetensors' own bound on the header (tensor table plus metadata)
MAX_HEADER_BYTES = 100_000_000
#: where a model's training-data statistics live in its metadata
STATISTICS_KEY = "data_statistics"
#: bytes per element of each safetensors dtype
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


# --------------------------------------------------------------------- schema
def _count(lo: int, hi: int):
    return Annotated[int, Field(ge=lo, le=hi)]


def _at_most(hi: int):
    return Annotated[int, Field(le=hi)]


class Postprocess(Record):
    """What turns class probabilities into labels: instances (watershed), sizes, threshold."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    instances: bool = False
    min_size: _count(0, 10**6) | None = None
    min_distance: _count(1, 1000) | None = None
    distance_channel: bool | None = None
    threshold: Annotated[Number, Field(gt=0, lt=1)] | None = None


class ConfigSchema(BaseModel):
    """Types and upper bounds of ``DenseUNetConfig`` values in a file.

    Upper bounds are generous (``DenseUNetConfig.large()`` is well inside) but
    bounded; everything else (positive sizes, one decoder width per block plus
    one, known attention and norm names, ranges of compression and dropout) is
    ``DenseUNetConfig.validate``'s, run when the network is built.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    in_channels: _at_most(64) = 1
    num_classes: _at_most(255) = 2
    aux_channels: _at_most(16) = 0
    stem_channels: _at_most(1024) = 24
    growth: _at_most(512) = 16
    block_layers: Annotated[list[_at_most(64)], Field(max_length=6)] = [4, 6, 8, 6]
    bottleneck: _at_most(16) = 4
    compression: Number = 0.5
    decoder_channels: Annotated[list[_at_most(2048)], Field(max_length=7)] = [128, 96, 64, 32, 24]
    head_channels: _at_most(1024) = 8
    head_layers: _at_most(16) = 1
    attention: Annotated[str, Field(max_length=32)] = "joint"
    joint_form: Annotated[str, Field(max_length=32)] = "mix"
    attention_levels: Annotated[list[_at_most(5)], Field(max_length=6)] = [1, 2, 3]
    attention_dim: _at_most(1024) = 32
    dropout: Number = 0.1
    norm: Annotated[str, Field(max_length=32)] = "group"
    extra: dict = {}


class Intensity(BaseModel):
    """Raw-intensity percentiles of the finite pixels (before normalisation)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    p1: Number
    p50: Number
    p99: Number


class DataStatistics(BaseModel):
    """What a model was trained on (``provenance.data_statistics``); see ``engine/models/fit.py``."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    modality: Annotated[str, Field(max_length=200)] | None = None
    dims: Literal[2, 3]
    channels: _count(1, 64)
    dtype: Annotated[str, Field(max_length=32)]
    intensity: Intensity | None = None
    images: _count(1, 10**9) = 1
    sampled_pixels: _count(0, 10**12) = 0


class Metadata(BaseModel):
    """The metadata JSON of a model file (format version 1; unknown top-level keys are kept)."""

    model_config = ConfigDict(strict=True, extra="allow")

    format: str
    format_version: int
    architecture: str
    name: str
    description: str
    config: ConfigSchema
    classes: list[Annotated[str, Field(max_length=200)]]
    normalization: Normalization
    postprocess: Postprocess
    provenance: dict
    scores: dict

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format={value!r})")
        return value

    @field_validator("format_version")
    @classmethod
    def _version(cls, value: int) -> int:
        if not 1 <= value <= FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {value!r}")
        return value

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, value: str) -> str:
        if value not in ARCHITECTURE_NAMES:
            raise ValueError(f"unknown architecture {value!r} (known: {list(ARCHITECTURE_NAMES)})")
        return value

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        from ..checks import check_classes

        try:
            check_classes(value, "'classes'")
        except BadInputError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Metadata:
        if self.config.num_classes != len(self.classes):
            raise ValueError(f"{len(self.classes)} class names for a {self.config.num_classes}-class network")
        if self.postprocess.distance_channel and self.config.aux_channels < 1:
            raise ValueError("postprocess.distance_channel is no longer supported (no model is trained with it)")
        if self.provenance.get(STATISTICS_KEY) is not None:
            try:
                DataStatistics.model_validate(self.provenance[STATISTICS_KEY])
            except ValidationError as exc:
                raise ValueError(f"provenance.{STATISTICS_KEY}.{describe_error(exc)}") from None
        return self


def _fail(where: str, msg: str) -> BadInputError:
    return BadInputError(f"invalid model metadata in {where}: {msg}")


def validate_metadata(meta: object, where: str = "model file") -> dict:
    """Check the metadata against :class:`Metadata`; return it unchanged or raise ``BadInputError``."""
    if not isinstance(meta, dict):
        raise _fail(where, "metadata is not a JSON object")
    try:
        Metadata.model_validate(meta)
    except ValidationError as exc:
        raise _fail(where, describe_error(exc)) from None
    return meta


def training_statistics(meta_or_provenance: dict) -> DataStatistics | None:
    """The training-data statistics a model's metadata (or provenance) records, if any."""
    prov = meta_or_provenance.get("provenance", meta_or_provenance)
    stats = prov.get(STATISTICS_KEY) if isinstance(prov, dict) else None
    if stats is None:
        return None
    try:
        return DataStatistics.model_validate(stats)
    except ValidationError:
        return None


# --------------------------------------------------------------- JSON bounds
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


# --------------------------------------------------------------- the header
def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor table, string metadata) of a safetensors file, read without torch.

    The tensor table maps names to ``{"dtype", "shape", "data_offsets"}``;
    every entry is checked to describe bytes inside the file.
    """
    path = Path(path)
    check_regular_file(path, "model file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"declares a {n:,}-byte header in a {size:,}-byte file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        strings = header.pop("__metadata__", None) or {}
        if not isinstance(strings, dict) or not all(isinstance(v, str) for v in strings.values()):
            raise ValueError("__metadata__ is not a table of strings")
        data_bytes = size - 8 - n
        for name, entry in header.items():
            _check_entry(name, entry, data_bytes)
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path.name} is not a valid safetensors model file ({_short(exc)})") from None
    return header, strings


def _check_entry(name: str, entry: object, data_bytes: int) -> None:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
        raise ValueError(f"tensor {name}: unknown dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    ints = (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                  for x in v))
    if not ints(shape) or not ints(offsets) or len(offsets) != 2:
        raise ValueError(f"tensor {name}: malformed shape or offsets")
    begin, end = offsets
    if not begin <= end <= data_bytes or end - begin != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
        raise ValueError(f"tensor {name}: bytes {begin}..{end} do not fit the file")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return one_line(text[0][:160]) if text else type(exc).__name__


def read_metadata(path: str | os.PathLike) -> dict:
    """The validated metadata of a model file, without loading weights (and without torch)."""
    return _read(path)[0]


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, dict]]:
    path = Path(path)
    tensors, strings = read_header(path)
    raw = strings.get(META_KEY)
    if raw is None:
        raise BadInputError(f"{path.name}: no napari-jointattn metadata in the file")
    return validate_metadata(parse_metadata_json(raw, path.name), path.name), tensors


def describe_file(path: str | os.PathLike) -> dict:
    """Metadata plus ``parameters`` (elements in the file's tensor table): what ``models`` lists."""
    meta, tensors = _read(path)
    return {**meta, "parameters": sum(math.prod(t["shape"]) for t in tensors.values())}


def write_metadata(path: str | os.PathLike, meta: dict, out: str | os.PathLike | None = None) -> Path:
    """Replace a model file's metadata (validated first), keeping its tensors byte for byte.

    Writes ``out`` (default: ``path`` itself) atomically; no weights are
    decoded, so a bundled preset can gain metadata without being retrained.
    """
    from ..io.files import write_bytes_atomic

    path = Path(path)
    out = Path(out) if out is not None else path
    tensors, strings = read_header(path)
    text = json.dumps(finite_json(meta), allow_nan=False)
    validate_metadata(parse_metadata_json(text, out.name), out.name)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps({"__metadata__": {**strings, META_KEY: text}, **tensors},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensor data stays 8-byte aligned
    write_bytes_atomic(out, struct.pack("<Q", len(header)) + header + raw[8 + n:])
    return out


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


def preset_path(name: str) -> Path:
    return PRESET_DIR / f"{name}{MODEL_SUFFIX}"


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
        path = preset_path(text)
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


def list_models(folder: Path | None = None) -> list[dict]:
    """Presets and saved models: ``{"kind", "name", "path", "metadata", "error", "description"}`` each.

    Never blocks and never fails as a whole: FIFOs, devices and directories
    named like model files, and files that fail a check of
    :func:`describe_file`, are listed with ``metadata`` None and ``error`` set.
    Reads headers only (no torch); the weights are checked when a model loads.
    """
    from .presets import PRESETS

    rows = []
    for name, spec in PRESETS.items():
        path = preset_path(name)
        row = {"kind": "preset", "name": name, "path": None, "metadata": None,
               "error": None, "description": spec["description"]}
        if path.is_file():
            try:
                row.update(path=path, metadata=describe_file(path))
            except BadInputError as exc:
                row["error"] = str(exc)
        rows.append(row)
    for path in saved_models(folder, regular_only=False):
        row = {"kind": "saved", "name": path.stem, "path": path, "metadata": None, "error": None,
               "description": ""}
        try:
            meta = describe_file(path)
            row.update(metadata=meta, description=meta.get("description", ""))
        except BadInputError as exc:
            row["error"] = str(exc)
        except (OSError, RecursionError, MemoryError) as exc:  # pragma: no cover - defensive
            row["error"] = f"{path.name}: unreadable ({_short(exc)})"
        rows.append(row)
    return rows

