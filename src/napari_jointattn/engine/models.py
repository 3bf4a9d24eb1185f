"""Model files: safetensors weights plus validated JSON metadata, one file.

The metadata JSON lives in the safetensors header (key ``napari_jointattn``).
Loading parses that header and the raw tensors only: nothing is unpickled,
nothing is evaluated, and the metadata is checked against a schema (types,
ranges, known architectures) before any network is built.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..model import DenseUNet, DenseUNetConfig
from .errors import BadInputError
from .files import write_bytes_atomic

META_KEY = "napari_jointattn"
FORMAT = "napari-jointattn-model"
FORMAT_VERSION = 1
ARCHITECTURES = {"DenseUNet": (DenseUNet, DenseUNetConfig)}
MODEL_SUFFIX = ".safetensors"
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
MODEL_DIR_ENV = "NAPARI_JOINTATTN_MODEL_DIR"
POSTPROCESS_KEYS = {"instances", "min_size", "min_distance", "distance_channel", "threshold"}


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


def _check_config(cfg: dict, where: str) -> DenseUNetConfig:
    ints = ("in_channels", "num_classes", "aux_channels", "stem_channels", "growth", "bottleneck",
            "head_channels", "head_layers", "attention_dim")
    for key in ints:
        if key in cfg and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool)):
            raise _fail(where, f"config.{key} must be an integer")
        if key in cfg and not 0 <= cfg[key] <= 4096:
            raise _fail(where, f"config.{key}={cfg[key]} is out of range")
    for key in ("block_layers", "decoder_channels", "attention_levels"):
        if key in cfg:
            v = cfg[key]
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                  and 0 <= i <= 4096 for i in v):
                raise _fail(where, f"config.{key} must be a list of small integers")
            if len(v) > 8:
                raise _fail(where, f"config.{key} is too long")
    if "extra" in cfg and not isinstance(cfg["extra"], dict):
        raise _fail(where, "config.extra must be an object")
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


def saved_models(folder: Path | None = None) -> list[Path]:
    folder = folder or model_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*{MODEL_SUFFIX}") if not p.name.startswith("."))


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
        raise BadInputError(f"model file {text} not found")
    if _SAFE_NAME.match(text):
        saved = model_dir() / f"{text}{MODEL_SUFFIX}"
        if saved.is_file():
            return saved
    names = ", ".join(preset_names() + [p.stem for p in saved_models()])
    raise BadInputError(f"unknown model {text!r} (available: {names})")


# ---------------------------------------------------------------- load / save
def read_metadata(path: str | os.PathLike) -> dict:
    """The validated metadata of a model file, without loading weights."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except Exception as exc:
        raise BadInputError(f"{path.name} is not a valid safetensors model file ({_one_line(exc)})") from exc
    if raw is None:
        raise BadInputError(f"{path.name}: no napari-jointattn metadata in the file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path.name}: model metadata is not valid JSON ({exc.msg})") from exc
    return validate_metadata(meta, path.name)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def load_model(name: str | os.PathLike | Model) -> Model:
    """Load a preset or model file (weights on CPU). Never unpickles anything."""
    if isinstance(name, Model):
        return name
    from safetensors import safe_open

    path = resolve_model(name)
    meta = read_metadata(path)
    net_cls, cfg_cls = ARCHITECTURES[meta["architecture"]]
    net = net_cls(cfg_cls.from_dict(meta["config"]))
    expected = net.state_dict()
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
            state = {}
            for key in expected:
                t = fh.get_tensor(key)
                if t.shape != expected[key].shape or t.dtype != expected[key].dtype:
                    raise BadInputError(
                        f"{path.name}: tensor {key} has shape {tuple(t.shape)} {t.dtype}, "
                        f"the architecture needs {tuple(expected[key].shape)} {expected[key].dtype}"
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
    validate_metadata(json.loads(json.dumps(meta)), path.name)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.net.state_dict().items()}
    data = save(tensors, metadata={META_KEY: json.dumps(meta)})
    if not path.parent.exists():
        raise BadInputError(f"cannot write {path}: folder {path.parent} does not exist")
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
