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


def autocast_dtype(dev: torch.device) -> torch.dtype | None:
    """The dtype :func:`autocast` computes in on ``dev``: bf16 on CUDA GPUs that support it, else
    fp16 (also on MPS); None on the CPU, which runs in full precision."""
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "mps":
        return torch.float16
    return None


def autocast(dev: torch.device):
    """Mixed precision in :func:`autocast_dtype` on GPUs; nothing on CPU."""
    dtype = autocast_dtype(dev)
    return contextlib.nullcontext() if dtype is None else torch.autocast(dev.type, dtype=dtype)


def grad_scaler(dev: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for training steps under :func:`autocast` on ``dev``.

    Active when autocast computes in fp16, whose small gradients would underflow to zero (the
    loss is scaled up for the backward pass and the gradients scaled back before the step, which
    is skipped when they overflowed); a pass-through otherwise (bf16 and fp32 have fp32's range).
    """
    return torch.amp.GradScaler(dev.type, enabled=autocast_dtype(dev) == torch.float16)


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def free_cache(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
