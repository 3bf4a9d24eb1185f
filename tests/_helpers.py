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
