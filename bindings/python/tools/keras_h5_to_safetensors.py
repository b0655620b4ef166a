#!/usr/bin/env python3
"""Convert the Keras Cell Painting CNN (EfficientNet-B0) to torchvision-named safetensors.

    python keras_h5_to_safetensors.py Cell_Painting_CNN_v1.hdf5 cpcnn.safetensors [--classifier ClassProb]

Input: a Keras 2 / tf.keras HDF5 file of an EfficientNet-B0 built by qubvel `efficientnet` 1.1.1, as
DeepProfiler saves it (its published `Cell_Painting_CNN_v1.hdf5`): layers `stem_conv`, `stem_bn`,
`block{S}{a,b,c,d}_{expand_conv,expand_bn,dwconv,bn,se_reduce,se_expand,project_conv,project_bn}`,
`top_conv`, `top_bn` and the classifier dense (`ClassProb` by default). Both a full model file
(`model_weights/<layer>/<layer>/<var>:0`) and a `save_weights` file (the same groups at the top
level) work; weights of a nested sub-model are found too. Optimizer state is ignored.

Output: float32 safetensors with torchvision `efficientnet_b0` state-dict keys (REFERENCE.md §1):
conv kernels HWIO → OIHW, depthwise (kh, kw, C, 1) → (C, 1, kh, kw), dense (in, out) → (out, in),
BN gamma/beta/moving_mean/moving_variance → weight/bias/running_mean/running_var, SE
se_reduce/se_expand → fc1/fc2. Load it with TF "same" padding and BN eps 1e-3, e.g.
`phenocore.EfficientNet.load(path, padding="tf_same", bn_eps=1e-3)`.

Needs numpy and h5py only: the safetensors file is written directly (JSON header + raw little-endian
bytes, as the format specifies), so the `safetensors` package is not required. The output is written
to a temporary file and renamed, so a failed run never leaves a half-written file.

Exit status 0 on success, 1 with a message naming the culprit (missing layer or variable, wrong
shape, unreadable file) otherwise.
"""

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

# EfficientNet-B0 MBConv blocks (REFERENCE.md §1): (stage, index in stage, expand, kernel, in, out).
BLOCKS: List[Tuple[int, int, int, int, int, int]] = [
    (1, 0, 1, 3, 32, 16),
    (2, 0, 6, 3, 16, 24),
    (2, 1, 6, 3, 24, 24),
    (3, 0, 6, 5, 24, 40),
    (3, 1, 6, 5, 40, 40),
    (4, 0, 6, 3, 40, 80),
    (4, 1, 6, 3, 80, 80),
    (4, 2, 6, 3, 80, 80),
    (5, 0, 6, 5, 80, 112),
    (5, 1, 6, 5, 112, 112),
    (5, 2, 6, 5, 112, 112),
    (6, 0, 6, 5, 112, 192),
    (6, 1, 6, 5, 192, 192),
    (6, 2, 6, 5, 192, 192),
    (6, 3, 6, 5, 192, 192),
    (7, 0, 6, 3, 192, 320),
]
STEM_CH = 32
TOP_CH = 1280
BN_VARS = [("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var")]


class ConversionError(Exception):
    pass


def read_keras_h5(path: str) -> Dict[str, Dict[str, np.ndarray]]:
    """All weights in a Keras HDF5 file as {layer name: {variable name: array}}.

    The layer of a dataset is the group it sits in below the layer's own group, i.e. the second-to-last
    path component's owner: `model_weights/stem_conv/stem_conv/kernel:0` → (`stem_conv`, `kernel`);
    `stem_conv/stem_conv/kernel:0` (save_weights) and `model_weights/efficientnet-b0/stem_conv/kernel:0`
    (nested model) map the same. `optimizer_weights` is skipped.
    """
    import h5py

    layers: Dict[str, Dict[str, np.ndarray]] = {}
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConversionError(f"cannot open {path} as HDF5: {e}") from e
    with f:
        root = f["model_weights"] if "model_weights" in f else f

        def visit(name: str, obj) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            parts = name.split("/")
            if parts[0] == "optimizer_weights" or len(parts) < 2:
                return
            var = re.sub(r":\d+$", "", parts[-1])
            layer = parts[-2]
            layers.setdefault(layer, {})
            if var in layers[layer]:
                raise ConversionError(f"{path}: layer {layer!r} has variable {var!r} twice (second at {name})")
            layers[layer][var] = np.asarray(obj[()])

        root.visititems(visit)
    if not layers:
        raise ConversionError(f"{path}: no weights found (expected Keras groups such as model_weights/stem_conv)")
    return layers


def _get(layers: Dict[str, Dict[str, np.ndarray]], layer: str, var: str, shape: Tuple[int, ...]) -> np.ndarray:
    if layer not in layers:
        raise ConversionError(f"missing layer {layer!r} in the Keras file")
    if var not in layers[layer]:
        have = ", ".join(sorted(layers[layer])) or "none"
        raise ConversionError(f"layer {layer!r} has no variable {var!r} (it has: {have})")
    a = layers[layer][var]
    if tuple(a.shape) != tuple(shape):
        raise ConversionError(f"{layer}/{var} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


def keras_to_torchvision(layers: Dict[str, Dict[str, np.ndarray]], classifier: str = "ClassProb") -> Dict[str, np.ndarray]:
    """Maps qubvel-Keras layer weights to a torchvision `efficientnet_b0` state dict (float32, C-contiguous)."""
    if "stem_conv" not in layers or "kernel" not in layers["stem_conv"]:
        raise ConversionError("missing layer 'stem_conv' in the Keras file")
    stem = layers["stem_conv"]["kernel"]
    if stem.ndim != 4 or stem.shape[0:2] != (3, 3) or stem.shape[3] != STEM_CH:
        raise ConversionError(f"stem_conv/kernel has shape {tuple(stem.shape)}, expected (3, 3, C, {STEM_CH})")
    in_ch = stem.shape[2]
    if classifier not in layers:
        dense = sorted(n for n, v in layers.items() if v.get("kernel") is not None and v["kernel"].ndim == 2)
        hint = f"; 2-D kernels found in: {', '.join(dense)} (pass --classifier NAME)" if dense else ""
        raise ConversionError(f"missing layer {classifier!r} (classifier dense) in the Keras file{hint}")
    cls_kernel = layers[classifier].get("kernel")
    if cls_kernel is None or cls_kernel.ndim != 2:
        raise ConversionError(f"classifier layer {classifier!r} has no 2-D 'kernel'")
    n_classes = cls_kernel.shape[1]

    out: Dict[str, np.ndarray] = {}

    def conv(layer: str, key: str, k: int, cin: int, cout: int) -> None:
        w = _get(layers, layer, "kernel", (k, k, cin, cout))
        out[key] = w.transpose(3, 2, 0, 1)  # HWIO → OIHW

    def bn(layer: str, prefix: str, c: int) -> None:
        for kvar, tname in BN_VARS:
            out[f"{prefix}.{tname}"] = _get(layers, layer, kvar, (c,))

    conv("stem_conv", "features.0.0.weight", 3, in_ch, STEM_CH)
    bn("stem_bn", "features.0.1", STEM_CH)
    for stage, index, expand, k, cin, cout in BLOCKS:
        kp = f"block{stage}{chr(ord('a') + index)}"
        tp = f"features.{stage}.{index}.block"
        hidden = cin * expand
        se = max(1, cin // 4)  # SE width from the block's input channels (REFERENCE.md §1)
        sub = 0
        if expand != 1:
            conv(f"{kp}_expand_conv", f"{tp}.0.0.weight", 1, cin, hidden)
            bn(f"{kp}_expand_bn", f"{tp}.0.1", hidden)
            sub = 1
        dw = _get(layers, f"{kp}_dwconv", "depthwise_kernel", (k, k, hidden, 1))
        out[f"{tp}.{sub}.0.weight"] = dw.transpose(2, 3, 0, 1)  # (kh, kw, C, 1) → (C, 1, kh, kw)
        bn(f"{kp}_bn", f"{tp}.{sub}.1", hidden)
        conv(f"{kp}_se_reduce", f"{tp}.{sub + 1}.fc1.weight", 1, hidden, se)
        out[f"{tp}.{sub + 1}.fc1.bias"] = _get(layers, f"{kp}_se_reduce", "bias", (se,))
        conv(f"{kp}_se_expand", f"{tp}.{sub + 1}.fc2.weight", 1, se, hidden)
        out[f"{tp}.{sub + 1}.fc2.bias"] = _get(layers, f"{kp}_se_expand", "bias", (hidden,))
        conv(f"{kp}_project_conv", f"{tp}.{sub + 2}.0.weight", 1, hidden, cout)
        bn(f"{kp}_project_bn", f"{tp}.{sub + 2}.1", cout)
    conv("top_conv", "features.8.0.weight", 1, BLOCKS[-1][5], TOP_CH)
    bn("top_bn", "features.8.1", TOP_CH)
    out["classifier.1.weight"] = _get(layers, classifier, "kernel", (TOP_CH, n_classes)).T
    out["classifier.1.bias"] = _get(layers, classifier, "bias", (n_classes,))

    for key, a in out.items():
        if not np.issubdtype(a.dtype, np.floating):
            raise ConversionError(f"{key}: source dtype {a.dtype} is not floating point")
        a = np.ascontiguousarray(a, dtype="<f4")
        if not np.all(np.isfinite(a)):
            raise ConversionError(f"{key}: contains NaN or infinity")
        out[key] = a
    return out


def unused_layers(layers: Dict[str, Dict[str, np.ndarray]], classifier: str) -> List[str]:
    """Layers with weights that the conversion did not use (reported, not an error)."""
    used = {"stem_conv", "stem_bn", "top_conv", "top_bn", classifier}
    for stage, index, expand, *_ in BLOCKS:
        kp = f"block{stage}{chr(ord('a') + index)}"
        names = ["dwconv", "bn", "se_reduce", "se_expand", "project_conv", "project_bn"]
        names += ["expand_conv", "expand_bn"] if expand != 1 else []
        used.update(f"{kp}_{n}" for n in names)
    return sorted(n for n in layers if n not in used)


def safetensors_bytes(tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serialises float32 arrays: u64 LE header length, JSON header (space-padded to 8 bytes), data."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        raw = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + b"".join(chunks)


def write_atomic(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ConversionError(f"cannot write {path}: {e}") from e


def convert(in_path: str, out_path: str, classifier: str = "ClassProb") -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Converts `in_path` to `out_path`; returns the torchvision state dict and the Keras layers left unused."""
    layers = read_keras_h5(in_path)
    state = keras_to_torchvision(layers, classifier)
    meta = {"format": "pt", "source": os.path.basename(in_path), "converter": "phenocore keras_h5_to_safetensors"}
    write_atomic(out_path, safetensors_bytes(state, meta))
    return state, unused_layers(layers, classifier)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="Keras .h5/.hdf5 file (e.g. Cell_Painting_CNN_v1.hdf5)")
    p.add_argument("output", help="output .safetensors path (torchvision key names, float32)")
    p.add_argument("--classifier", default="ClassProb", help="name of the classifier Dense layer (default: ClassProb)")
    args = p.parse_args(argv)
    try:
        state, extra = convert(args.input, args.output, args.classifier)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if extra:
        print(f"note: ignored layers with weights: {', '.join(extra)}", file=sys.stderr)
    stem = state["features.0.0.weight"].shape
    n_classes = state["classifier.1.weight"].shape[0]
    print(f"wrote {len(state)} tensors to {args.output}: {stem[1]} input channels, {n_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
