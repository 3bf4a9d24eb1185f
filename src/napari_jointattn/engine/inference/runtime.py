"""The network on the CPU through ONNX Runtime, for ``segment()`` without attention maps (opt-in).

``NAPARI_JOINTATTN_CPU_RUNTIME=onnxruntime`` runs the network of
``segment()`` on the CPU through ONNX Runtime (needs the ``export`` extra);
the default (``torch``, also ``auto``) is PyTorch. The choice was measured
(``benchmarks/cpu_runtime.py``, docs/performance.md "CPU runtimes"): ONNX
Runtime gives the same labels but only 1.1-1.2x the speed of PyTorch on two
cores, short of the 1.3x that would make it worth a default with an export
step; torch.compile is faster at 512² but pays a long first call, and OpenVINO
changes a few pixels. Everything around the network is the same code either
way (normalisation, MONAI's sliding window, post-processing).

The ONNX graph is :func:`.export.export_net`'s (softmax probabilities), with the
model's enlargement left to the caller as for the PyTorch network. It is
exported once per model weights into the user cache folder
(``onnx/<sha256 of weights and config>.onnx``, written atomically; the 8
newest are kept) and loaded once per process and thread count. Attention maps,
query mode, training and the live loop always use PyTorch. Any failure to
export or load the graph falls back to PyTorch, with a note.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError

RUNTIME_ENV = "NAPARI_JOINTATTN_CPU_RUNTIME"
KEEP = 8
_SESSIONS: dict[tuple[str, int], "OrtNetwork"] = {}
_LOCK = threading.Lock()


def cpu_runtime() -> str:
    """``"onnxruntime"`` or ``"torch"``: what ``segment()`` uses on the CPU."""
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower()
    if value in ("torch", "pytorch", "auto"):
        return "torch"
    if value not in ("onnxruntime", "ort"):
        raise BadInputError(f"{RUNTIME_ENV} must be auto, onnxruntime or torch, got {value!r}")
    if not all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx")):
        raise BadInputError(f"{RUNTIME_ENV}={value} but onnxruntime is not installed: "
                            "pip install 'napari-jointattn[export]'")
    return "onnxruntime"


class OrtNetwork:
    """An ONNX Runtime session as the window predictor's network: normalised windows -> log-probabilities.

    The predictor takes a softmax of what the network returns; the softmax of
    the log-probabilities gives the probabilities back.
    """

    def __init__(self, session, fingerprint: str) -> None:
        self.session = session
        self.fingerprint = fingerprint

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        probs = self.session.run(["output"], {"input": np.ascontiguousarray(batch.float().numpy())})[0]
        return torch.log(torch.from_numpy(probs).clamp_min_(1e-30))

    def map_keys(self) -> list:
        return []


def fingerprint(model) -> str:
    """sha256 of the network's configuration and weights (what the graph depends on)."""
    h = hashlib.sha256()
    import dataclasses

    h.update(json.dumps(dataclasses.asdict(model.net.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cache_folder() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-jointattn")) / "onnx"


def _export(model, path: Path) -> None:
    from ..io.files import atomic_path
    from ..models.export import _write_onnx, export_net

    net = export_net(model)
    net.upsample = 1  # the caller enlarges, as for the PyTorch network
    x = np.zeros((1, model.in_channels, 2 * net.multiple, 2 * net.multiple), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        _write_onnx(net, x, tmp, {"fingerprint": path.stem, "use": "napari-jointattn CPU runtime"})
    old = sorted(path.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:]
    for p in old:
        p.unlink(missing_ok=True)


def ort_network(model) -> OrtNetwork:
    """The model's network as an :class:`OrtNetwork` (exported and loaded once; may raise)."""
    from ..models.export import onnx_session

    key = fingerprint(model)
    threads = max(1, torch.get_num_threads())
    with _LOCK:
        net = _SESSIONS.get((key, threads))
        if net is None:
            path = cache_folder() / f"{key}.onnx"
            if not path.is_file():
                _export(model, path)
            net = _SESSIONS[(key, threads)] = OrtNetwork(onnx_session(path), key)
            if len(_SESSIONS) > KEEP:
                _SESSIONS.pop(next(iter(_SESSIONS)))
    return net


def cpu_network(model, notes: list[str]):
    """The network ``segment()`` runs on the CPU: an :class:`OrtNetwork`, or None for PyTorch.

    A graph that cannot be exported or loaded is a note, and PyTorch runs.
    """
    if cpu_runtime() != "onnxruntime":
        return None
    try:
        return ort_network(model)
    except Exception as exc:  # noqa: BLE001 - any failure: PyTorch does the work, as without the extra
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        notes.append(f"ONNX Runtime unavailable for this model ({first}); PyTorch ran instead")
        return None
