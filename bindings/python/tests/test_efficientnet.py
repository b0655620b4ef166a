"""EfficientNet through the C ABI: shapes, consistency between entry points, save/load, errors, progress."""

import numpy as np
import pytest

import phenocore
from conftest import CROP, IN_CHANNELS, NUM_CLASSES
from safetensors_np import read as read_safetensors

S = phenocore.Status

# Keras block6a_activation = depthwise output of block 6a (672 channels); REFERENCE.md §1.
LAYER_DIMS = {"block6a_activation": 672, "stem_activation": 32, "block1a_project_bn": 16, "top_activation": 1280,
              "features.6.0.block.1": 672, "logits": NUM_CLASSES}


def test_info_and_layer_dims(model):
    assert model.in_channels == IN_CHANNELS and model.num_classes == NUM_CLASSES
    for name, dim in LAYER_DIMS.items():
        assert model.layer_dim(name) == dim, name
    assert "in_channels=3" in repr(model) and "num_classes=7" in repr(model)


def test_shapes_and_dtypes(model, crops):
    f = model.features(crops)
    assert f.shape == (5, 672) and f.dtype == np.float32 and f.flags.c_contiguous
    assert np.isfinite(f).all() and f.std() > 0
    lg = model.logits(crops)
    assert lg.shape == (5, NUM_CLASSES) and lg.dtype == np.float32
    d = model.features(crops, layers=["stem_activation", "top_activation", "logits"])
    assert list(d) == ["stem_activation", "top_activation", "logits"]
    assert [v.shape for v in d.values()] == [(5, 32), (5, 1280), (5, NUM_CLASSES)]
    empty = model.features(crops[:0], layers=["block6a_activation", "logits"])
    assert empty["block6a_activation"].shape == (0, 672) and empty["logits"].shape == (0, NUM_CLASSES)
    # 128 x 128, the Cell Painting crop size, gives the same dims (spatial dims are mean-pooled)
    assert model.features(np.zeros((1, IN_CHANNELS, 128, 128), np.float32)).shape == (1, 672)


def test_after_silu_features_are_bounded_below(model, crops):
    # SiLU(x) >= -0.2785 (its minimum at x = -1.2785), so a mean of SiLU outputs is too.
    for name in ("stem_activation", "block6a_activation", "top_activation"):
        assert model.features(crops, name).min() >= -0.27847


def test_layer_and_layers_agree(model, crops):
    names = ["block6a_activation", "block3b_add", "features.6.0.block.1", "logits"]
    together = model.features(crops, layers=names)
    for name in names:
        np.testing.assert_allclose(model.features(crops, name), together[name], rtol=1e-6, atol=1e-7)
    # Keras and torchvision names of one tensor
    np.testing.assert_array_equal(together["block6a_activation"], together["features.6.0.block.1"])
    np.testing.assert_allclose(model.logits(crops), together["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.logits(crops, batch_size=2), together["logits"], rtol=1e-5, atol=1e-6)


def test_batch_size_does_not_change_results(model, crops):
    whole = model.features(crops, batch_size=0)
    for batch in (1, 2, 64):
        np.testing.assert_allclose(model.features(crops, batch_size=batch), whole, rtol=1e-5, atol=1e-6)
    # each crop is computed on its own: a crop's features do not depend on its neighbours
    np.testing.assert_allclose(model.features(crops[3:4]), whole[3:4], rtol=1e-5, atol=1e-6)


def test_inputs_are_converted_once_and_equal(model, crops):
    from phenocore._arrays import as_f32

    assert as_f32(crops) is crops  # C-contiguous float32: the library reads numpy's buffer in place
    ref = model.features(crops)
    wide = np.zeros((5, IN_CHANNELS + 2, CROP, CROP), np.float32)
    wide[:, 1:-1] = crops
    view = wide[:, 1:-1]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(model.features(view), ref)
    np.testing.assert_array_equal(model.features(crops.astype(np.float64)), ref)
    np.testing.assert_array_equal(model.features(np.asfortranarray(crops)), ref)
    np.testing.assert_array_equal(model.features(crops.tolist()), ref)


def test_seed_determines_the_weights(crops, tmp_path):
    paths = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        paths.append(tmp_path / f"{name}.safetensors")
        phenocore.EfficientNet.new(IN_CHANNELS, num_classes=NUM_CLASSES, seed=seed).save(paths[-1])
    a, b, c = (read_safetensors(p) for p in paths)
    assert a.keys() == b.keys() == c.keys() and "features.0.0.weight" in a
    assert a["features.0.0.weight"].shape == (32, IN_CHANNELS, 3, 3)
    assert a["classifier.1.weight"].shape == (NUM_CLASSES, 1280)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["features.0.0.weight"], c["features.0.0.weight"])
    # torchvision's initialisation: BN gamma 1, beta 0, running mean 0, var 1
    assert (a["features.0.1.weight"] == 1).all() and (a["features.0.1.running_var"] == 1).all()
    assert (a["features.0.1.bias"] == 0).all() and (a["features.0.1.running_mean"] == 0).all()


def test_save_load_roundtrip(model, crops, tmp_path):
    path = tmp_path / "model.safetensors"
    model.save(path)
    assert path.stat().st_size > 4 * 3_500_000  # ~4.05M float32 parameters and BN statistics without the 1000-class head
    loaded = phenocore.EfficientNet.load(path)
    assert (loaded.in_channels, loaded.num_classes) == (IN_CHANNELS, NUM_CLASSES)
    names = ["block6a_activation", "logits"]
    want, got = model.features(crops, layers=names), loaded.features(crops, layers=names)
    for name in names:
        np.testing.assert_array_equal(got[name], want[name])
    from_bytes = phenocore.EfficientNet.from_bytes(path.read_bytes())
    np.testing.assert_array_equal(from_bytes.logits(crops), want["logits"])
    # str paths work too, and padding / eps change the computation
    tf = phenocore.EfficientNet.load(str(path), padding="tf_same", bn_eps=1e-3)
    assert tf.padding == "tf_same" and tf.bn_eps == pytest.approx(1e-3)
    assert np.abs(tf.features(crops) - want["block6a_activation"]).max() > 1e-4


def test_features_from_image_equals_crops_then_features(model):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 4096, size=(IN_CHANNELS, 150, 170), dtype=np.uint16)
    centers = np.array([[20.0, 30.0], [100.4, 75.5], [168.0, 2.0], [-5.0, 140.0], [85.0, 75.0]], np.float32)
    for normalize in ("deepprofiler_legacy", "minmax"):
        crops = phenocore.crop_cells(image, centers, box_size=CROP, normalize=normalize)
        want = model.features(crops, layers=["block6a_activation", "logits"], batch_size=2)
        got = model.features_from_image(image, centers, layers=["block6a_activation", "logits"], box_size=CROP,
                                        normalize=normalize, batch_size=2)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        single = model.features_from_image(image, centers, box_size=CROP, normalize=normalize)
        np.testing.assert_allclose(single, want["block6a_activation"], rtol=1e-5, atol=1e-6)
    # float64 image and non-contiguous centres give the same result
    table = np.zeros((len(centers), 4))
    table[:, 2:] = centers
    again = model.features_from_image(image.astype(np.float64), table[:, 2:], box_size=CROP, normalize="minmax")
    np.testing.assert_allclose(again, single, rtol=1e-5, atol=1e-6)
    assert model.features_from_image(image, np.zeros((0, 2)), box_size=CROP).shape == (0, 672)


def test_progress_is_reported_and_can_cancel(model, crops):
    calls = []
    model.features(crops, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]  # None (not False) continues

    calls.clear()
    image = np.ones((IN_CHANNELS, 80, 80), np.float32)
    model.features_from_image(image, np.full((3, 2), 40.0), box_size=CROP, batch_size=2,
                              progress=lambda d, t: calls.append((d, t)) or True)
    assert calls == [(2, 3), (3, 3)]

    seen = []

    def stop_after_first(done, total):
        seen.append(done)
        return False

    with pytest.raises(phenocore.PhenoError) as e:
        model.features(crops, batch_size=2, progress=stop_after_first)
    assert e.value.status == S.CANCELLED and e.value.status.name == "CANCELLED"
    assert seen == [2]
    with pytest.raises(phenocore.PhenoError) as e:
        model.features_from_image(image, np.full((3, 2), 40.0), box_size=CROP, batch_size=1, progress=lambda d, t: False)
    assert e.value.status == S.CANCELLED


def test_callback_exception_is_reraised_after_the_call(model, crops):
    class Boom(Exception):
        pass

    calls = []

    def explode(done, total):
        calls.append(done)
        raise Boom(f"at {done}/{total}")

    with pytest.raises(Boom, match="at 1/5"):
        model.features(crops, batch_size=1, progress=explode)
    assert calls == [1]  # the raise cancelled the call
    np.testing.assert_allclose(model.features(crops[:1]), model.features(crops)[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(phenocore.PhenoError, match="callable"):
        model.features(crops, progress=3)


def test_errors_name_the_problem(model, crops, tmp_path):
    def fails(status, fragments, fn, *args, **kwargs):
        with pytest.raises(phenocore.PhenoError) as e:
            fn(*args, **kwargs)
        assert e.value.status == status, e.value
        for fragment in fragments:
            assert fragment in str(e.value), e.value
        return e.value

    E = phenocore.EfficientNet
    fails(S.SHAPE, ["4-D", "(5, 64, 64)"], model.features, crops[0:5, 0])
    fails(S.SHAPE, ["4-D"], model.logits, crops[0])
    fails(S.SHAPE, ["channel"], model.features, np.zeros((2, IN_CHANNELS + 2, CROP, CROP), np.float32))
    fails(S.SHAPE, ["channel"], model.logits, np.zeros((2, 1, CROP, CROP), np.float32))
    nan = crops.copy()
    nan[1, 2, 3, 4] = np.nan
    fails(S.NON_FINITE, ["cell 1, channel 2, row 3, col 4", "NaN"], model.features, nan)
    image = np.ones((IN_CHANNELS, 70, 70), np.float32)
    image[0, 5, 6] = np.inf
    fails(S.NON_FINITE, ["channel 0"], model.features_from_image, image, [[30.0, 30.0]], box_size=CROP)
    fails(S.SHAPE, ["channel"], model.features_from_image, np.ones((1, 70, 70), np.float32), [[30.0, 30.0]], box_size=CROP)
    fails(S.UNKNOWN_LAYER, ["block9z_activation"], model.features, crops, "block9z_activation")
    fails(S.UNKNOWN_LAYER, ["nope"], model.features, crops, layers=["logits", "nope"])
    fails(S.INVALID_ARGUMENT, ["empty"], model.features, crops, layers=[])
    fails(S.INVALID_ARGUMENT, ["not both"], model.features, crops, "logits", layers=["stem_activation"])
    fails(S.INVALID_ARGUMENT, ["'same'", "tf_same"], E.load, tmp_path / "x.safetensors", padding="same")
    fails(S.INVALID_ARGUMENT, ["'same'"], E.new, 5, num_classes=3, padding="same")
    fails(S.INVALID_ARGUMENT, ["bn_eps"], E.new, 5, num_classes=3, bn_eps=-1.0)
    fails(S.INVALID_ARGUMENT, ["device", "'tpu'"], E.new, 5, num_classes=3, device="tpu")
    fails(S.INVALID_ARGUMENT, ["num_classes"], E.new, 5, num_classes=0)
    fails(S.INVALID_ARGUMENT, ["batch_size"], model.features, crops, batch_size=-1)
    missing = tmp_path / "missing.safetensors"
    fails(S.IO, ["missing.safetensors"], E.load, missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    fails(S.FORMAT, ["safetensors"], E.load, garbage)
    fails(S.FORMAT, ["safetensors"], E.from_bytes, b"\x00" * 3)
    fails(S.IO, ["no_such_dir"], model.save, tmp_path / "no_such_dir" / "m.safetensors")


def test_concurrent_calls_on_one_model(model, crops):
    # The model is immutable and the library runs without the GIL: threads sharing it get the results
    # of sequential calls, each with its own progress callback.
    from concurrent.futures import ThreadPoolExecutor

    inputs = [np.roll(crops, k, axis=0) for k in range(4)]
    sequential = [model.features(x, layers=["block6a_activation", "logits"]) for x in inputs]
    progress = [[] for _ in inputs]

    def run(k):
        return model.features(inputs[k], layers=["block6a_activation", "logits"], batch_size=2,
                              progress=lambda d, t: progress[k].append(d))

    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, range(4)))
    for want, got, calls in zip(sequential, parallel, progress):
        assert calls == [2, 4, 5]
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_closed_model_raises(crops):
    m = phenocore.EfficientNet.new(IN_CHANNELS, num_classes=2)
    with m:
        assert m.logits(crops[:1]).shape == (1, 2)
    with pytest.raises(phenocore.PhenoError, match="closed"):
        m.logits(crops[:1])
    m.close()  # closing twice is harmless
