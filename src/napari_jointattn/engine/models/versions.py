"""Fine-tuned model versions: how a new one is named, which files are versions, exporting one."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from ..errors import BadInputError
from ..io.files import write_atomic
from .metadata import model_dir, read_metadata, saved_models
from .model import MODEL_SUFFIX

VERSION_MARK = "-ft-"


def version_path(start: str, folder: Path | None = None, when: dt.datetime | None = None) -> Path:
    """Where a model fine-tuned from ``start`` (a preset name or a model file) is saved:
    ``<root>-ft-<date>-<time>.safetensors`` in the model folder, ``<root>`` being
    the start model's name without earlier ``-ft-`` suffixes. The folder is created."""
    folder = model_dir() if folder is None else Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the model folder {folder}: {exc.strerror or exc}") from exc
    parent = Path(start).stem if Path(start).suffix == MODEL_SUFFIX else Path(start).name
    stamp = (when or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    path = folder / f"{parent.split(VERSION_MARK)[0]}{VERSION_MARK}{stamp}{MODEL_SUFFIX}"
    i = 1
    while path.exists():  # two runs in the same second
        path = folder / f"{parent.split(VERSION_MARK)[0]}{VERSION_MARK}{stamp}-{i}{MODEL_SUFFIX}"
        i += 1
    return path


def list_versions(folder: Path | None = None) -> list[tuple[Path, dict]]:
    """Fine-tuned models in the model folder, newest first, as (path, metadata).

    A file whose run did not beat its start model (saved unchanged) is no
    version; unreadable files are skipped.
    """
    out = []
    for path in saved_models(folder):
        try:
            meta = read_metadata(path)
        except BadInputError:
            continue
        training = meta["provenance"].get("training")
        unchanged = isinstance(training, dict) and training.get("improved") is False
        if "parent" in meta["provenance"] and not unchanged:
            out.append((path, meta))
    return sorted(out, key=lambda pm: pm[1]["provenance"].get("saved", ""), reverse=True)


def describe_version(path: Path, meta: dict) -> str:
    """One line for a version list: name, parent, validation Dice, when saved."""
    score = meta["scores"].get("val_dice")
    saved = meta["provenance"].get("saved", "")[:19].replace("T", " ")
    shown = f"{score:.3f}" if isinstance(score, (int, float)) else "n/a"
    return f"{path.stem}  (from {meta['provenance']['parent']}, val Dice {shown}, {saved})"


#: what an exported file's suffix says it is: our model file, or a format of engine.models.export
EXPORT_SUFFIXES = {MODEL_SUFFIX: "safetensors", ".zip": "bioimageio", ".onnx": "onnx", ".pt": "torchscript"}


def export_format(target: str | Path, fmt: str | None = None) -> tuple[str, str]:
    """(format, target): ``fmt`` if given (its suffix appended when missing), else the target's
    suffix; a target without a known suffix is a model file (``.safetensors`` appended)."""
    target = str(target)
    if fmt is None:
        fmt = next((f for suffix, f in EXPORT_SUFFIXES.items() if target.lower().endswith(suffix)),
                   "safetensors")
    suffix = {f: s for s, f in EXPORT_SUFFIXES.items()}.get(fmt)
    if suffix is None:
        raise BadInputError(f"unknown export format {fmt!r} (safetensors, bioimageio, onnx, torchscript)")
    if not target.lower().endswith(suffix):
        target += suffix
    return fmt, target


def export_version(path: Path, target: str | Path, fmt: str | None = None) -> Path:
    """Export a model file to ``target``, atomically; a broken file is refused.

    ``fmt`` (default: from ``target``'s suffix, see :func:`export_format`):
    ``safetensors`` copies the file; ``bioimageio``, ``onnx`` and
    ``torchscript`` go through :func:`.export.export_model` (each checked
    before it is written).
    """
    fmt, target = export_format(target, fmt)
    read_metadata(path)
    if fmt == "safetensors":
        return write_atomic(target, lambda tmp: shutil.copyfile(path, tmp))
    from .export import export_model

    return export_model(path, fmt, target).path
