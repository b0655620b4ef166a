"""A small pure-numpy safetensors reader/writer for the tests (keeps the `safetensors` package out of
the test dependencies). Format: 8-byte little-endian header length, JSON header, raw little-endian data."""

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def read(path):
    """name -> float32 array."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[key] = np.frombuffer(data[begin:end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"]).astype(np.float32)
    return out


def write(path, tensors):
    """Writes float32 tensors."""
    header, blobs, offset = {}, [], 0
    for key, value in tensors.items():
        blob = np.ascontiguousarray(value, dtype="<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(np.shape(value)), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
