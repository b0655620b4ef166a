"""tools/keras_h5_to_safetensors.py: a random torchvision-layout EfficientNet-B0 written as a Keras
(qubvel `efficientnet` 1.1.1) HDF5 file must convert back to exactly the same tensors and names.

Needs numpy, h5py and pytest; torch, safetensors and a built libphenocore only for the optional checks.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "keras_h5_to_safetensors.py"
IN_CH = 5
CLASSES = 7

# EfficientNet-B0 stages, written independently of the converter's table (REFERENCE.md §1):
# (expand, kernel, stride, out channels, repeats).
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def layer_table(classes=CLASSES):
    """[(keras layer, keras var, torchvision key, torchvision shape, kind)], kind says how Keras stores it."""
    rows = []

    def conv_bn(kconv, kbn, tprefix, shape, kind="conv"):
        rows.append((kconv, "depthwise_kernel" if kind == "dw" else "kernel", f"{tprefix}.0.weight", shape, kind))
        for kv, tv in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var")):
            rows.append((kbn, kv, f"{tprefix}.1.{tv}", (shape[0],), "vec"))

    conv_bn("stem_conv", "stem_bn", "features.0", (32, IN_CH, 3, 3))
    cin = 32
    for s, (e, k, _stride, cout, reps) in enumerate(STAGES, start=1):
        for j in range(reps):
            kp, tp = f"block{s}{'abcd'[j]}", f"features.{s}.{j}.block"
            h, sq = cin * e, max(1, cin // 4)
            i = 0
            if e != 1:
                conv_bn(f"{kp}_expand_conv", f"{kp}_expand_bn", f"{tp}.0", (h, cin, 1, 1))
                i = 1
            conv_bn(f"{kp}_dwconv", f"{kp}_bn", f"{tp}.{i}", (h, 1, k, k), kind="dw")
            rows.append((f"{kp}_se_reduce", "kernel", f"{tp}.{i + 1}.fc1.weight", (sq, h, 1, 1), "conv"))
            rows.append((f"{kp}_se_reduce", "bias", f"{tp}.{i + 1}.fc1.bias", (sq,), "vec"))
            rows.append((f"{kp}_se_expand", "kernel", f"{tp}.{i + 1}.fc2.weight", (h, sq, 1, 1), "conv"))
            rows.append((f"{kp}_se_expand", "bias", f"{tp}.{i + 1}.fc2.bias", (h,), "vec"))
            conv_bn(f"{kp}_project_conv", f"{kp}_project_bn", f"{tp}.{i + 2}", (cout, h, 1, 1))
            cin = cout
    conv_bn("top_conv", "top_bn", "features.8", (1280, cin, 1, 1))
    rows.append(("ClassProb", "kernel", "classifier.1.weight", (classes, 1280), "dense"))
    rows.append(("ClassProb", "bias", "classifier.1.bias", (classes,), "vec"))
    return rows


def to_keras(a, kind):
    if kind == "conv":
        return a.transpose(2, 3, 1, 0)  # OIHW → HWIO
    if kind == "dw":
        return a.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) → (kh, kw, C, 1)
    if kind == "dense":
        return a.T  # (out, in) → (in, out)
    return a


@pytest.fixture(scope="module")
def torch_state():
    rng = np.random.default_rng(7)
    return {key: rng.standard_normal(shape).astype(np.float32) for _l, _v, key, shape, _k in layer_table()}


def write_keras_h5(path, state, top_level=False, drop_layer=None, bad_shape_layer=None):
    """Writes `state` the way Keras 2 `model.save` (or `save_weights` with top_level) lays out an HDF5 file."""
    layers = {}
    for layer, var, key, _shape, kind in layer_table(classes=state["classifier.1.bias"].shape[0]):
        layers.setdefault(layer, []).append((var, np.ascontiguousarray(to_keras(state[key], kind))))
    with h5py.File(path, "w") as f:
        root = f if top_level else f.create_group("model_weights")
        names = ["input_1"] + list(layers) + ["pool5"]
        root.attrs["layer_names"] = [n.encode() for n in names if n != drop_layer]
        root.create_group("input_1").attrs["weight_names"] = []
        root.create_group("pool5").attrs["weight_names"] = []
        for layer, variables in layers.items():
            if layer == drop_layer:
                continue
            g = root.create_group(layer)
            g.attrs["weight_names"] = [f"{layer}/{v}:0".encode() for v, _ in variables]
            inner = g.create_group(layer)
            for v, a in variables:
                if layer == bad_shape_layer and v == "kernel":
                    a = a[..., :-1]
                inner.create_dataset(f"{v}:0", data=a)
        if not top_level:
            # Optimizer slots mirror layer names; the converter must not mistake them for weights.
            opt = f.create_group("optimizer_weights/training/SGD/stem_conv/kernel")
            opt.create_dataset("momentum:0", data=np.ones((3, 3, IN_CH, 32), np.float32))
            f.attrs["model_config"] = json.dumps({"class_name": "Model"})


def read_safetensors(path):
    """Independent minimal reader (format spec): u64 LE header size, JSON header, raw data."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": "<f4", "F16": "<f2"}
    out = {}
    for name, info in header.items():
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(data[lo:hi], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    assert max(i["data_offsets"][1] for i in header.values()) == len(data)
    return out, meta


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


def assert_round_trip(out, state):
    got, meta = read_safetensors(out)
    assert sorted(got) == sorted(state)
    assert all(v.dtype == np.float32 for v in got.values())
    for key, ref in state.items():
        assert got[key].shape == ref.shape, key
        assert np.array_equal(got[key], ref), key
    assert meta["format"] == "pt"
    return got


@pytest.mark.parametrize("top_level", [False, True], ids=["model_weights", "save_weights"])
def test_round_trip_exact(tmp_path, torch_state, top_level):
    src, out = tmp_path / "cpcnn.hdf5", tmp_path / "cpcnn.safetensors"
    write_keras_h5(src, torch_state, top_level=top_level)
    r = run_tool(src, out)
    assert r.returncode == 0, r.stderr
    assert f"{len(torch_state)} tensors" in r.stdout and "5 input channels, 7 classes" in r.stdout
    assert_round_trip(out, torch_state)


def test_table_has_every_torchvision_tensor(torch_state):
    # 49 BN layers × 4 + 16 blocks × 4 SE tensors + 49 convs + 2 classifier = 311 (no num_batches_tracked)
    assert len(torch_state) == 49 * 4 + 16 * 4 + 49 + 2
    assert torch_state["features.6.0.block.1.0.weight"].shape == (672, 1, 5, 5)
    assert torch_state["features.1.0.block.1.fc1.weight"].shape == (8, 32, 1, 1)


def test_keys_and_shapes_match_torchvision(torch_state):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=CLASSES)
    model.features[0][0] = torch.nn.Conv2d(IN_CH, 32, 3, stride=2, padding=1, bias=False)
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ref == {k: v.shape for k, v in torch_state.items()}


def test_output_readable_by_safetensors(tmp_path, torch_state):
    st = pytest.importorskip("safetensors.numpy")
    src, out = tmp_path / "m.h5", tmp_path / "m.safetensors"
    write_keras_h5(src, torch_state)
    assert run_tool(src, out).returncode == 0
    got = st.load_file(str(out))
    assert sorted(got) == sorted(torch_state)
    assert all(np.array_equal(got[k], v) for k, v in torch_state.items())


@pytest.mark.parametrize("layer", ["block6a_se_reduce", "stem_bn", "block1a_dwconv", "top_conv", "ClassProb"])
def test_missing_layer_is_named(tmp_path, torch_state, layer):
    src, out = tmp_path / "m.h5", tmp_path / "m.safetensors"
    write_keras_h5(src, torch_state, drop_layer=layer)
    r = run_tool(src, out)
    assert r.returncode == 1
    assert f"missing layer '{layer}'" in r.stderr, r.stderr
    assert not out.exists()


def test_wrong_shape_is_named(tmp_path, torch_state):
    src, out = tmp_path / "m.h5", tmp_path / "m.safetensors"
    write_keras_h5(src, torch_state, bad_shape_layer="block3b_project_conv")
    r = run_tool(src, out)
    assert r.returncode == 1
    assert "block3b_project_conv/kernel has shape (1, 1, 240, 39), expected (1, 1, 240, 40)" in r.stderr, r.stderr
    assert not out.exists()


def test_not_hdf5_is_an_error(tmp_path):
    src = tmp_path / "junk.hdf5"
    src.write_bytes(b"not an hdf5 file")
    r = run_tool(src, tmp_path / "o.safetensors")
    assert r.returncode == 1 and "cannot open" in r.stderr and "junk.hdf5" in r.stderr


def load_in_phenocore(path):
    phenocore = pytest.importorskip("phenocore")
    try:
        return phenocore.EfficientNet.load(str(path), padding="tf_same", bn_eps=1e-3)
    except phenocore.LibraryNotFoundError as e:
        pytest.skip(f"libphenocore not built: {e}")


def test_converted_file_loads_in_phenocore(tmp_path, torch_state):
    src, out = tmp_path / "m.h5", tmp_path / "m.safetensors"
    write_keras_h5(src, torch_state)
    assert run_tool(src, out).returncode == 0
    model = load_in_phenocore(out)
    assert (model.in_channels, model.num_classes) == (IN_CH, CLASSES)
    assert model.layer_dim("block6a_activation") == 672


def test_converted_fixture_reproduces_torch_reference(tmp_path):
    """Keras-layout copy of the parity fixture's weights → converter → phenocore (tf_same, eps 1e-3)
    reproduces the float64 reference of tests/fixtures/make_effnet_fixture.py."""
    fixture = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "effnet"
    if not (fixture / "weights_f16.safetensors").exists():
        pytest.skip(f"no parity fixture at {fixture}")
    weights, _ = read_safetensors(fixture / "weights_f16.safetensors")
    expected, _ = read_safetensors(fixture / "expected.safetensors")
    state = {k: v.astype(np.float32) for k, v in weights.items()}
    src, out = tmp_path / "fixture.h5", tmp_path / "fixture.safetensors"
    write_keras_h5(src, state)
    assert run_tool(src, out).returncode == 0
    model = load_in_phenocore(out)
    crops = np.ascontiguousarray(expected["input"])
    for name, got in [("logits", model.logits(crops)), ("features.6.0.block.1", model.features(crops))]:
        ref = expected[f"tf_same/{name}"]
        assert got.shape == ref.shape, name
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, f"{name}: max|ours − ref| / max|ref| = {rel:.3e}"
