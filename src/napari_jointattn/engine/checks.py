"""Checks of API and command-line arguments, shared by segment, evaluate and train.

Each raises :class:`BadInputError` with one line, before any work is done.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import numpy as np

from .errors import BadInputError

MAX_CLASSES = 255
MAX_SEED = 2**32 - 1


def to_array(obj, what: str = "image") -> np.ndarray:
    """An array from an array-like: numpy arrays, nested lists, torch tensors (detached).

    Ragged lists, objects and strings are bad input, not a numpy error.
    """
    if isinstance(obj, np.ndarray):
        arr = obj
    else:
        try:
            import torch

            if isinstance(obj, torch.Tensor):
                obj = obj.detach().to("cpu")
                if obj.dtype == torch.bfloat16:
                    obj = obj.float()
                obj = obj.numpy()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        if isinstance(obj, (str, bytes)):
            raise BadInputError(f"the {what} must be an array, got a string")
        try:
            arr = np.asarray(obj)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise BadInputError(f"the {what} is not a regular array (ragged or mixed nesting): "
                                f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}") from exc
    if arr.dtype.kind not in "biuf":
        raise BadInputError(f"the {what} has unsupported element type {arr.dtype}")
    return arr


def check_axis(axis) -> int | None:
    """A slicing axis for 3-D stacks: None or an integer in [-3, 2] (the rule of ``segment``)."""
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -3 <= int(axis) < 3:
        raise BadInputError(f"axis {axis!r} does not exist for a 3-D stack (use 0, 1 or 2)")
    return int(axis)


def check_classes(names: Sequence[str] | None, where: str = "classes") -> list[str] | None:
    """2 to 255 distinct, non-empty, single-line class names (background first)."""
    if names is None:
        return None
    if isinstance(names, str):
        raise BadInputError(f"{where} must be a list of names, got one string")
    names = list(names)
    if not 2 <= len(names) <= MAX_CLASSES:
        raise BadInputError(f"{where}: {len(names)} names given; a model has 2 to {MAX_CLASSES} classes "
                            "(background first)")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise BadInputError(f"{where}: class {i} has an empty name")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            raise BadInputError(f"{where}: class {i} ({name!r}) contains control characters")
        if len(name) > 200:
            raise BadInputError(f"{where}: class {i} has a name longer than 200 characters")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise BadInputError(f"{where}: duplicate class names {dup}")
    return names


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise BadInputError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return int(seed)


def finite_number(value, name: str, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False) -> float:
    """A finite real number (not a bool) within [lo, hi] (``lo_open``: (lo, hi])."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BadInputError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise BadInputError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise BadInputError(f"{name} must be <= {hi}, got {value!r}")
    return float(value)


def check_output_file(out: str | os.PathLike, suffix: str = ".safetensors", what: str = "--out") -> str:
    """A file to be written: the right suffix, not a folder or a special file, in an existing folder."""
    out = os.fspath(out)
    if not out.endswith(suffix):
        raise BadInputError(f"{what} must end in {suffix}: {out}")
    if os.path.isdir(out):
        raise BadInputError(f"{what} {out} is a folder; give a file name ending in {suffix}")
    if os.path.lexists(out) and os.path.exists(out) and not os.path.isfile(out):
        raise BadInputError(f"{what} {out} exists and is not a regular file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise BadInputError(f"cannot write {out}: folder {parent} does not exist")
    if len(os.fsencode(os.path.basename(out))) > 255:
        raise BadInputError(f"{what}: the file name is longer than 255 bytes")
    return out


def check_run_files(out: str | os.PathLike | None, checkpoint: str | os.PathLike | None = None, *,
                    overwrite: bool = True) -> None:
    """The files a training run writes: ``out`` (the model) and ``checkpoint``.

    Resolved (links followed) before they are compared: never the same file (the checkpoint
    is removed at the end, and with it the model). The checkpoint is a regular file or
    absent, in an existing folder (a FIFO would block the run forever). With
    ``overwrite=False`` an existing ``out`` is refused rather than replaced.
    """
    if out is not None and not overwrite and os.path.lexists(out):
        raise BadInputError(f"{out} exists: give --overwrite to replace it, or another --out")
    if checkpoint is None:
        return
    checkpoint = os.fspath(checkpoint)
    if os.path.exists(checkpoint) and not os.path.isfile(checkpoint):
        raise BadInputError(f"--checkpoint {checkpoint} exists and is not a regular file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(checkpoint))):
        raise BadInputError(f"--checkpoint {checkpoint}: its folder does not exist")
    if out is not None and os.path.realpath(out) == os.path.realpath(checkpoint):
        raise BadInputError(f"--checkpoint and --out are the same file ({checkpoint}): the checkpoint "
                            "is removed when training ends; give it another name")
