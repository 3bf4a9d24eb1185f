"""A model's network on a device, for inference, without moving a shared instance.

Segmentation and attention queries may run at the same time in different
threads (a GUI worker and the main thread), on different devices. Moving one
network between devices while another thread runs it breaks the other run, so
neither ever moves (or switches the mode of) ``model.net``: each asks for the
network on its device and gets ``model.net`` itself when it already lives
there in eval mode, otherwise a copy on that device. Copies are cached per
network and device and rebuilt when the weights' values change, however they
were changed (see :func:`_fingerprint`).
"""

from __future__ import annotations

import copy
import threading
import weakref
import zlib

import torch
from torch import nn

_LOCK = threading.Lock()
#: network -> {device: (weights fingerprint, copy on that device)}
_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple, nn.Module]]] = (
    weakref.WeakKeyDictionary()
)


def _device_key(device: torch.device) -> str:
    """``cuda`` and ``cuda:0`` (the current device) are the same place."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    if device.type in ("cpu", "meta"):
        return device.type
    return str(device)


def _tensors(net: nn.Module) -> list[torch.Tensor]:
    return [*net.parameters(), *net.buffers()]


def _fingerprint(net: nn.Module) -> tuple:
    """The knock-out switches, and each weight's shape, dtype and CRC-32 of its bytes.

    Weights are the parameters and buffers. The fingerprint changes with any change of their
    values, however made: an optimiser step, an edit through ``.data``, ``load_state_dict``,
    one element set by hand (barring a CRC-32 collision: odds of 2**-32 per changed tensor).
    A weight replaced or moved with its values unchanged leaves it as it was: the copy is still
    right. It reads every weight once: about 2 ms for the presets' 3 MB on a CPU (weights on a
    GPU are read through a copy to the host).
    """
    knocked = tuple(m.enabled for m in net.modules() if hasattr(m, "enabled"))
    return (knocked, *((t.shape, t.dtype, _checksum(t)) for t in _tensors(net)))


def _checksum(t: torch.Tensor) -> int:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(raw.numpy())


def _lives_on(net: nn.Module, device: torch.device) -> bool:
    key = _device_key(device)
    return all(_device_key(t.device) == key for t in _tensors(net))


def inference_network(net: nn.Module, device: str | torch.device) -> nn.Module:
    """``net`` on ``device`` in eval mode: ``net`` itself when it is there already, else a copy.

    ``net`` is never moved and its mode never changed, so other threads using
    it (on any device) are not disturbed.
    """
    device = torch.device(device)
    if _lives_on(net, device) and not net.training:
        return net
    with _LOCK:
        fingerprint = _fingerprint(net)
        cached = _COPIES.get(net, {}).get(_device_key(device))
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        twin = copy.deepcopy(net).to(device).eval()
        _COPIES.setdefault(net, {})[_device_key(device)] = (fingerprint, twin)
        return twin


def release(net: nn.Module, device: str | torch.device) -> None:
    """Drop the cached copy of ``net`` on ``device`` (e.g. after running out of memory there)."""
    with _LOCK:
        _COPIES.get(net, {}).pop(_device_key(torch.device(device)), None)
