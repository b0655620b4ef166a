#!/usr/bin/env python3
"""Writes small safetensors seeds for the weights_loader fuzz target (stdlib only).

    python3 fuzz/seeds/make_seeds.py fuzz/corpus/weights_loader
"""
import json
import os
import struct
import sys


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, blobs, offset = {}, [], 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def f16(values):
    return struct.pack(f"<{len(values)}e", *values)


def ramp(n, scale=0.01):
    return [((i * 37) % 101 - 50) * scale for i in range(n)]


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    bn = lambda p, c: [  # noqa: E731 - a BatchNorm's five tensors
        (f"{p}.weight", "F32", [c], f32([1.0] * c)),
        (f"{p}.bias", "F32", [c], f32([0.0] * c)),
        (f"{p}.running_mean", "F32", [c], f32([0.0] * c)),
        (f"{p}.running_var", "F32", [c], f32([1.0] * c)),
        (f"{p}.num_batches_tracked", "I64", [], struct.pack("<q", 0)),
    ]
    seeds = {
        "stem_f32": safetensors([("features.0.0.weight", "F32", [32, 3, 3, 3], f32(ramp(864)))] + bn("features.0.1", 32)),
        "stem_f16": safetensors([("features.0.0.weight", "F16", [32, 5, 3, 3], f16(ramp(1440)))], {"format": "pt"}),
        "classifier": safetensors([
            ("classifier.1.weight", "F16", [4, 1280], f16(ramp(5120))),
            ("classifier.1.bias", "F32", [4], f32([0.1, 0.2, 0.3, 0.4])),
        ]),
        "int_tensor": safetensors([("features.0.0.weight", "I32", [2, 2], struct.pack("<4i", 1, 2, 3, 4))]),
        "empty": safetensors([]),
    }
    for name, data in seeds.items():
        with open(os.path.join(out_dir, name + ".safetensors"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus/weights_loader")
