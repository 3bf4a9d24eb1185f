"""Choosing a compute device and its mixed-precision setting."""

from __future__ import annotations

import contextlib

import torch

from .errors import BadInputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an unavailable choice is bad input."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise BadInputError(f"unknown device {name!r} (choose from {', '.join(DEVICE_CHOICES)})")
    if base == "cuda" and not torch.cuda.is_available():
        raise BadInputError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    if base == "mps" and not mps_available():
        raise BadInputError("device 'mps' requested but Apple MPS is not available (use --device cpu or auto)")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise BadInputError(f"invalid device {name!r}: {exc}") from exc
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInputError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return dev.type


def autocast(dev: torch.device):
    """Mixed precision on GPUs (bf16 where supported, else fp16); nothing on CPU."""
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if dev.type == "mps":
        return torch.autocast("mps", dtype=torch.float16)
    return contextlib.nullcontext()


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def free_cache(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
