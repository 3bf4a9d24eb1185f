"""Helpers shared by tests."""

import json
import struct


def rewrite_metadata(src, dst, edit):
    """Copy a safetensors file, passing its header's ``__metadata__`` dict through ``edit``."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header["__metadata__"])
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def simulate_cuda_oom(monkeypatch, tiles=None):
    """Pretend a CUDA device is present whose every forward runs out of memory.

    The engine then halves the tile and finally falls back to the CPU, where
    the real ``predict_slice`` runs. ``tiles`` (a list) records each attempt
    as ``(device type, tile)``. Moving a network to the fake device is a no-op.
    """
    import torch

    from napari_jointattn.engine import inference

    real = inference.predict_slice

    def fake_predict(model, x, device, tile, *a, **k):
        if tiles is not None:
            tiles.append((device.type, tile))
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(model, x, device, tile, *a, **k)

    monkeypatch.setattr(inference, "predict_slice", fake_predict)
    monkeypatch.setattr(inference, "resolve_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(inference, "describe_device", lambda d: d.type)
    monkeypatch.setattr(inference, "free_cache", lambda d: None)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
