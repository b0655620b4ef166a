import numpy as np
import pytest

import phenocore
from safetensors_np import read as read_safetensors, write as write_safetensors

IN_CHANNELS = 3
NUM_CLASSES = 7
CROP = 64  # small crops keep the CPU forward passes quick; every layer still has spatial extent >= 2


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A model with activations of order 1 at every layer. A fresh `new()` model has torchvision's
    initialisation, whose eval-mode activations vanish with depth (~1e-11 at block 6a, as in
    torchvision itself), too small for tests that compare outputs; so, as in
    tests/fixtures/make_effnet_fixture.py, its parameters are redrawn with He scaling on the true fan-in
    and non-trivial BN statistics, and the model is loaded from the result."""
    path = tmp_path_factory.mktemp("model") / "random.safetensors"
    phenocore.EfficientNet.new(IN_CHANNELS, num_classes=NUM_CLASSES, seed=1).save(path)
    write_safetensors(path, randomised(read_safetensors(path), np.random.default_rng(1)))
    return phenocore.EfficientNet.load(path)


def randomised(state, rng):
    out = {}
    for key, value in state.items():
        shape = value.shape
        prefix, _, kind = key.rpartition(".")
        is_bn = prefix + ".running_var" in state
        if is_bn:
            out[key] = {
                "weight": lambda: rng.uniform(0.5, 1.5, shape),
                "bias": lambda: rng.uniform(-0.3, 0.3, shape),
                "running_mean": lambda: rng.normal(0, 0.2, shape),
                "running_var": lambda: rng.uniform(0.5, 2.0, shape),
            }[kind]()
        elif kind == "weight" and value.ndim == 4:  # conv (OIHW): He on the true fan-in, SE convs halved
            fan_in = shape[1] * shape[2] * shape[3]
            se = ".fc1" in key or ".fc2" in key
            out[key] = rng.normal(0, np.sqrt(2.0 / fan_in) * (0.5 if se else 1.0), shape)
        elif kind == "weight" and value.ndim == 2:  # classifier
            out[key] = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
        elif kind == "bias":
            out[key] = rng.uniform(-0.3, 0.3, shape)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="session")
def crops():
    rng = np.random.default_rng(0)
    return rng.random((5, IN_CHANNELS, CROP, CROP), dtype=np.float32)


def reference_crops(image, centers, box_size, normalize):
    """numpy transcription of the convention in src/profiling/crops.rs: centre c = floor(x + 0.5),
    box from c - B//2, zero outside the image, per crop and channel normalisation on the box."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[None]
    img = img.astype(np.float32)
    ch, h, w = img.shape
    ctr = np.asarray(centers, dtype=np.float32)
    out = np.zeros((len(ctr), ch, box_size, box_size), dtype=np.float32)
    for i, (cx, cy) in enumerate(ctr):
        x0 = int(np.floor(cx + np.float32(0.5))) - box_size // 2
        y0 = int(np.floor(cy + np.float32(0.5))) - box_size // 2
        for r in range(box_size):
            for q in range(box_size):
                y, x = y0 + r, x0 + q
                if 0 <= y < h and 0 <= x < w:
                    out[i, :, r, q] = img[:, y, x]
    if normalize == "none":
        return out
    lo = out.min(axis=(2, 3), keepdims=True).astype(np.float64)
    hi = out.max(axis=(2, 3), keepdims=True).astype(np.float64)
    if normalize == "deepprofiler_legacy":
        scale = np.divide(1.0, hi, out=np.zeros_like(hi), where=hi != 0)
    else:
        scale = 1.0 / (hi - lo + 1e-6)
    return ((out - lo) * scale).astype(np.float32)
