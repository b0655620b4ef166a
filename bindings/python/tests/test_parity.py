"""EfficientNet parity with torchvision through the Python API, on the fixture of
tests/fixtures/make_effnet_fixture.py (float64 torchvision reference, f16-rounded weights and input)."""

from pathlib import Path

import numpy as np
import pytest

import phenocore
from safetensors_np import read as read_safetensors

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "effnet"
WEIGHTS, EXPECTED = FIXTURE / "weights_f16.safetensors", FIXTURE / "expected.safetensors"
REL_TOL = 1e-4  # max|ours - ref| / max|ref|: f32 forward with folded BN against a float64 reference
MODES = {"symmetric": 1e-5, "tf_same": 1e-3}

pytestmark = pytest.mark.skipif(
    not (WEIGHTS.is_file() and EXPECTED.is_file()), reason=f"parity fixture not present in {FIXTURE}"
)


def assert_close(what, ours, ref):
    assert ours.shape == ref.shape, what
    scale = np.abs(ref).max()
    assert scale > 1e-3, f"{what}: degenerate reference"
    rel = np.abs(ours.astype(np.float64) - ref).max() / scale
    assert rel <= REL_TOL, f"{what}: max|ours - ref| / max|ref| = {rel:.3e}"


@pytest.fixture(scope="module")
def expected():
    return read_safetensors(EXPECTED)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_matches_torchvision(expected, mode):
    model = phenocore.EfficientNet.load(WEIGHTS, padding=mode, bn_eps=MODES[mode])
    assert (model.in_channels, model.num_classes) == (5, 10)
    x = expected["input"]
    assert x.shape == (2, 5, 128, 128)
    assert_close(f"{mode}/logits", model.logits(x), expected[f"{mode}/logits"])
    layers = sorted(k.split("/", 1)[1] for k in expected if k.startswith(mode + "/") and k != f"{mode}/logits")
    assert "features.6.0.block.1" in layers
    got = model.features(x, layers=layers + ["logits"], batch_size=1)
    for name in layers:
        assert_close(f"{mode}/{name}", got[name], expected[f"{mode}/{name}"])
    assert_close(f"{mode}/logits batched", got["logits"], expected[f"{mode}/logits"])
    assert_close(f"{mode}/block6a_activation", model.features(x), expected[f"{mode}/features.6.0.block.1"])


def test_wrong_convention_is_detected(expected):
    # loading with the other mode's padding must miss the reference by far more than the tolerance
    ref = expected["tf_same/logits"]
    model = phenocore.EfficientNet.load(WEIGHTS, padding="symmetric", bn_eps=1e-3)
    rel = np.abs(model.logits(expected["input"]) - ref).max() / np.abs(ref).max()
    assert rel > 10 * REL_TOL
