"""crop_cells against the numpy reference of the convention in src/profiling/crops.rs."""

import numpy as np
import pytest

import phenocore
from conftest import reference_crops

# Whole-pixel, half-pixel (rounds up: floor(x + 0.5)), negative half-pixel, edge and fully-outside centres.
CENTERS = np.array(
    [[10.0, 9.0], [10.4, 9.6], [2.5, 3.5], [-0.5, 0.49], [-1.5, 24.5], [30.0, 1.0], [200.0, -50.0], [0.0, 0.0]],
    dtype=np.float32,
)


@pytest.fixture(scope="module")
def image_u16():
    rng = np.random.default_rng(3)
    return rng.integers(1, 65535, size=(3, 25, 31), dtype=np.uint16)


@pytest.mark.parametrize("normalize", ["none", "deepprofiler_legacy", "minmax"])
@pytest.mark.parametrize("box", [8, 7, 1])
def test_matches_reference(image_u16, normalize, box):
    got = phenocore.crop_cells(image_u16, CENTERS, box_size=box, normalize=normalize)
    want = reference_crops(image_u16, CENTERS, box, normalize)
    assert got.shape == (len(CENTERS), 3, box, box) and got.dtype == np.float32
    if normalize == "none":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_known_values():
    # 1-channel 4x4 ramp; centre (1, 1) with a 4-box covers rows/cols -1..2: first row and column are 0.
    image = np.arange(1, 17, dtype=np.uint8).reshape(4, 4)
    raw = phenocore.crop_cells(image, [[1.2, 0.8]], box_size=4, normalize="none")
    expected = np.zeros((4, 4), np.float32)
    expected[1:, 1:] = image[:3, :3]
    np.testing.assert_array_equal(raw[0, 0], expected)
    legacy = phenocore.crop_cells(image, [[1.2, 0.8]], box_size=4)  # default: deepprofiler_legacy
    np.testing.assert_allclose(legacy[0, 0], expected / 11.0, rtol=1e-6)  # (x - 0) / max, max = 11
    minmax = phenocore.crop_cells(image, [[1.2, 0.8]], box_size=4, normalize="minmax")
    np.testing.assert_allclose(minmax[0, 0], expected / (11.0 + 1e-6), rtol=1e-6)


def test_default_box_is_128(image_u16):
    out = phenocore.crop_cells(image_u16, CENTERS[:2])
    assert out.shape == (2, 3, 128, 128)
    np.testing.assert_allclose(out, reference_crops(image_u16, CENTERS[:2], 128, "deepprofiler_legacy"), rtol=1e-6, atol=1e-7)


def test_dtypes_and_layouts_agree(image_u16):
    small = (image_u16 // 257).astype(np.uint8)
    base = phenocore.crop_cells(small, CENTERS, box_size=6, normalize="none")
    for variant in (
        small.astype(np.uint16),
        small.astype(np.float32),
        small.astype(np.float64),
        small.astype(np.int32),
        small.astype(">u2"),
        np.asfortranarray(small),
        small[:, ::-1, :][:, ::-1, :],  # negative strides, same pixels
    ):
        np.testing.assert_array_equal(phenocore.crop_cells(variant, CENTERS, box_size=6, normalize="none"), base)
    # non-contiguous centres (a column slice of a wider table) and float64 centres
    table = np.zeros((len(CENTERS), 5), np.float64)
    table[:, 1:3] = CENTERS
    np.testing.assert_array_equal(phenocore.crop_cells(small, table[:, 1:3], box_size=6, normalize="none"), base)


def test_two_dimensional_image_is_one_channel(image_u16):
    plane = image_u16[1]
    out = phenocore.crop_cells(plane, CENTERS, box_size=5, normalize="none")
    assert out.shape == (len(CENTERS), 1, 5, 5)
    np.testing.assert_array_equal(out[:, 0], phenocore.crop_cells(image_u16, CENTERS, box_size=5, normalize="none")[:, 1])


def test_no_centres(image_u16):
    out = phenocore.crop_cells(image_u16, np.zeros((0, 2)), box_size=16)
    assert out.shape == (0, 3, 16, 16) and out.dtype == np.float32


def test_errors_name_the_problem(image_u16):
    def fails(status, fragment, *args, **kwargs):
        with pytest.raises(phenocore.PhenoError) as e:
            phenocore.crop_cells(*args, **kwargs)
        assert e.value.status == status, e.value
        assert fragment in str(e.value), e.value

    S = phenocore.Status
    bad = image_u16.astype(np.float32)
    bad[2, 7, 9] = np.nan
    fails(S.NON_FINITE, "channel 2", bad, CENTERS)
    fails(S.SHAPE, "4-D", image_u16[None], CENTERS)
    fails(S.SHAPE, "(N, 2)", image_u16, CENTERS[:, :1])
    fails(S.SHAPE, "(N, 2)", image_u16, CENTERS[0])
    fails(S.INVALID_ARGUMENT, "centers[1]", image_u16, [[1.0, 2.0], [np.inf, 3.0]])
    fails(S.INVALID_ARGUMENT, "'zscore'", image_u16, CENTERS, normalize="zscore")
    fails(S.INVALID_ARGUMENT, "box_size", image_u16, CENTERS, box_size=0)
    fails(S.DTYPE, "complex", image_u16.astype(np.complex64), CENTERS)
    fails(S.SHAPE, "zero", np.zeros((3, 0, 5), np.uint8), CENTERS)
