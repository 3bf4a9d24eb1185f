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


def rewrite_tensors(src, dst, edit):
    """Copy a safetensors file (metadata kept), passing its tensors dict through ``edit``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)


def simulate_cuda_oom(monkeypatch, tiles=None):
    """Pretend a CUDA device is present whose every forward runs out of memory.

    The engine then halves the tile and finally falls back to the CPU, where
    the real ``predict_slice`` runs. ``tiles`` (a list) records each attempt
    as ``(device type, tile)``. Moving a network to the fake device is a no-op.
    """
    import torch

    from napari_jointattn.engine.inference import segment as inference

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


# ------------------------------------------------ limited subprocess, bombs
def run_limited(cases, budget_mb=1024, timeout=240, env=None):
    """Run ``cases`` (see ``_limited.py``) in a subprocess whose address space is limited.

    Returns ``{name: record}``; a case missing from the result did not finish
    (the subprocess hung or was killed after ``timeout`` seconds).
    """
    from pathlib import Path

    proc = _run_with_timeout(Path(__file__).with_name("_limited.py"), budget_mb, cases, timeout, env)
    records = {}
    for line in proc.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        records[rec["name"]] = rec
    records["__stderr__"] = proc.stderr
    return records


def _run_with_timeout(script, budget_mb, cases, timeout, env):
    import os
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, str(script), str(budget_mb), json.dumps(cases)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[killed after {timeout} s]"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tiff_bomb(path, side=40000):
    """A tiny zlib TIFF whose header declares a side x side 8-bit image (one strip)."""
    import zlib

    strip = zlib.compress(bytes(1 << 16), 9)
    tags = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, side), (279, 4, len(strip))]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, typ, value in tags:
        value = data_offset if tag == 273 else value
        ifd += struct.pack("<HHIH2x", tag, typ, 1, value) if typ == 3 else struct.pack("<HHII", tag, typ, 1, value)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip)
    return path


def png_bomb(path, side=10000):
    """A valid grey PNG of side x side zeros, a few kilobytes (deflate of zero rows)."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the pixels
    rows_per_chunk = max(1, (1 << 22) // len(row))
    body = b""
    for start in range(0, side, rows_per_chunk):
        body += comp.compress(row * min(rows_per_chunk, side - start))
    body += comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def nifti_bomb(path, shape=(1000, 1000, 1000)):
    """A tiny .nii.gz whose header declares ``shape`` of uint8 (the data is cut short)."""
    import gzip

    import nibabel as nib
    import numpy as np

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\x00" * 4 + bytes(4096)))
    return path


def disks(h=64, w=64, seed=0):
    """A noisy image of five bright disks and its 0/1 truth (int32)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    truth = np.zeros((h, w), np.int32)
    for _ in range(5):
        cy, cx = rng.integers(8, h - 8), rng.integers(8, w - 8)
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 1
    image = (truth * 0.8 + rng.normal(0, 0.1, (h, w))).astype(np.float32)
    return image, truth
