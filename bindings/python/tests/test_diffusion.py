"""phenocore.DiffusionUNet against MONAI's DiffusionModelUNet: the committed fixture
(tests/fixtures/unet, made by tests/fixtures/make_unet_fixture.py and make_unet_c_fixture.py; MONAI is
not needed), MONAI itself when torch and monai are importable, confounders / null embeddings and bad
input."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import phenocore
from phenocore import PhenoError, Status

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "unet"
_DTYPES = {"F32": "<f4", "F64": "<f8", "I64": "<i8"}


def read_fixture(path):
    """name -> array, keeping each tensor's dtype (the fixture holds f32, f64 and i64)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[key] = np.frombuffer(data[begin:end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


@pytest.fixture(scope="module")
def cond():
    return read_fixture(FIXTURE / "cond.safetensors")


@pytest.fixture(scope="module")
def config():
    return json.loads((FIXTURE / "cond.json").read_text())


@pytest.fixture(scope="module")
def unet(config):
    return phenocore.DiffusionUNet.load(FIXTURE / "cond_weights.safetensors", config=config)


def rel_err(got, want):
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


SMALL = {
    "in_channels": 2,
    "out_channels": 2,
    "channels": [4, 8],
    "attention_levels": [False, True],
    "num_res_blocks": 1,
    "num_head_channels": 4,
    "norm_num_groups": 2,
    "with_conditioning": True,
    "cross_attention_dim": 3,
    "confounders": {"source": 3, "batch": 2},
    "null_embeddings": True,
}


def small_unet(config, seed, tmp_path):
    """new() zero-initialises MONAI's output layers (the output is 0): perturb every weight."""
    from safetensors_np import read, write

    path = tmp_path / f"small_{seed}.safetensors"
    phenocore.DiffusionUNet.new(config, seed=seed).save(path)
    weights = read(path)
    rng = np.random.default_rng(seed)
    write(path, {k: v + 0.2 * rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()})
    return phenocore.DiffusionUNet.load(path, config=config)


def small_inputs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2, 4, 4)).astype(np.float32)
    ctx = rng.standard_normal((n, 2, 3)).astype(np.float32)
    t = np.array([3.0, 250.5, 999.0][:n])
    return x, t, ctx


def test_forward_matches_monai_fixture(unet, cond):
    out = unet.forward(cond["x"], cond["timesteps"], context=cond["context"], class_labels=cond["class_labels"])
    assert out.dtype == np.float32 and out.shape == (2, 3, 8, 8)
    assert rel_err(out, cond["out"]) <= 1e-4
    # MONAI's call convention works too; one timestep broadcasts.
    same = unet(cond["x"], cond["timesteps"], cond["context"], cond["class_labels"])
    assert np.array_equal(out, same)
    one = unet(cond["x"], 17, cond["context"], cond["class_labels"])
    assert np.array_equal(one[0], out[0]) and not np.array_equal(one[1], out[1])


def test_parameters_and_config(unet, cond, config):
    monai_count = sum(v.size for k, v in cond.items() if k.startswith("w."))
    assert unet.num_parameters == monai_count
    c = unet.config
    assert c["channels"] == [4, 8, 12] and c["num_res_blocks"] == [1, 1, 1]
    assert c["num_head_channels"] == [0, 4, 6] and c["cross_attention_dim"] == 6
    assert c["confounders"] == {} and c["null_embeddings"] is False
    # Defaults are MONAI's.
    d = phenocore.DiffusionUNet.new({"in_channels": 1, "out_channels": 1}, seed=0).config
    assert d["channels"] == [32, 64, 64, 64] and d["attention_levels"] == [False, False, True, True]
    assert d["num_head_channels"] == [8] * 4 and d["norm_num_groups"] == 32 and d["norm_eps"] == 1e-6
    # The reported config builds the same model.
    again = phenocore.DiffusionUNet.new(c, seed=1)
    assert again.num_parameters == unet.num_parameters


def test_save_load_round_trip(unet, cond, config, tmp_path):
    path = tmp_path / "unet.safetensors"
    unet.save(path)
    back = phenocore.DiffusionUNet.load(path, config=config)
    args = (cond["x"], cond["timesteps"], cond["context"], cond["class_labels"])
    assert np.array_equal(back(*args), unet(*args))
    # new() is deterministic in its seed (compared on the weights: its output layers start at 0).
    files = []
    for i, seed in enumerate([4, 4, 5]):
        files.append(tmp_path / f"new{i}.safetensors")
        phenocore.DiffusionUNet.new(config, seed=seed).save(files[-1])
    a, b, c = [read_fixture(f) for f in files]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert not np.any(a["out.2.conv.weight"]) and np.std(a["conv_in.conv.weight"]) > 0.05


def test_confounders_dict_array_and_null(tmp_path):
    u = small_unet(SMALL, 2, tmp_path)
    assert u.confounder_names == ["source", "batch"]
    x, t, ctx = small_inputs()
    by_dict = u.forward(x, t, context=ctx, confounders={"source": [0, 2, None], "batch": [1, 1, 0]})
    by_array = u.forward(x, t, context=ctx, confounders=np.array([[0, 1], [2, 1], [-1, 0]]))
    assert np.array_equal(by_dict, by_array)
    all_null = u.forward(x, t, context=ctx, confounders={"source": None, "batch": None})
    assert np.array_equal(all_null, u.forward(x, t, context=ctx, confounders=np.full((3, 2), -1)))
    assert not np.array_equal(all_null, by_dict)
    # Each sample depends only on its own confounders.
    other = u.forward(x, t, context=ctx, confounders={"source": [0, 2, 1], "batch": [1, 1, 0]})
    assert np.array_equal(other[:2], by_dict[:2]) and not np.array_equal(other[2], by_dict[2])
    # Guidance: a null context ignores the context's values.
    g1 = u.forward(x, t, context=ctx, context_null=True, confounders=np.zeros((3, 2), int))
    g2 = u.forward(x, t, context=ctx * 7, context_null=[True] * 3, confounders=np.zeros((3, 2), int))
    g3 = u.forward(x, t, context_null=True, confounders=np.zeros((3, 2), int))
    assert np.array_equal(g1, g2) and np.array_equal(g1, g3)
    mixed = u.forward(x, t, context=ctx, context_null=[False, True, False], confounders=np.zeros((3, 2), int))
    plain = u.forward(x, t, context=ctx, confounders=np.zeros((3, 2), int))
    assert np.array_equal(mixed[1], g1[1]) and np.array_equal(mixed[0], plain[0])


def raises(fn, status, *needles):
    with pytest.raises(PhenoError) as e:
        fn()
    assert e.value.status == status, e.value
    for needle in needles:
        assert needle in str(e.value), e.value
    return e.value


def test_bad_input(unet, cond, config, tmp_path):
    x, ts, ctx, labels = cond["x"], cond["timesteps"], cond["context"], cond["class_labels"]
    # Wrong latent shape for the config.
    raises(lambda: unet(np.zeros((2, 4, 8, 8), np.float32), ts, ctx, labels), Status.SHAPE, "in_channels = 3")
    raises(lambda: unet(np.zeros((2, 3, 6, 8), np.float32), ts, ctx, labels), Status.SHAPE, "multiples of 4")
    raises(lambda: unet(x[0], ts, ctx, labels), Status.SHAPE, "4-D")
    raises(lambda: unet(x, [1.0, 2.0, 3.0], ctx, labels), Status.SHAPE, "timesteps")
    raises(lambda: unet(x, ts, ctx[:, :, :5], labels), Status.SHAPE, "cross_attention_dim")
    # NaN latents.
    bad = x.copy()
    bad[1, 0, 2, 3] = np.nan
    raises(lambda: unet(bad, ts, ctx, labels), Status.NON_FINITE, "sample 1")
    # Class labels out of range / missing.
    raises(lambda: unet(x, ts, ctx, [0, 5]), Status.INVALID_ARGUMENT, "class label 5 of sample 1")
    raises(lambda: unet(x, ts, ctx, [-1, 0]), Status.INVALID_ARGUMENT, "class_labels[0]")
    raises(lambda: unet(x, ts, ctx), Status.INVALID_ARGUMENT, "class_labels must be given")
    # Guidance / confounders on a model without null embeddings or confounders.
    raises(lambda: unet(x, ts, ctx, labels, context_null=[False, True]), Status.INVALID_ARGUMENT, "null embeddings")
    raises(lambda: unet(x, ts, ctx, labels, confounders={"source": [0, 0]}), Status.INVALID_ARGUMENT, "unknown confounder")
    # Weights for another config: the first mismatching key is named.
    other = dict(config, num_class_embeds=6)
    raises(
        lambda: phenocore.DiffusionUNet.load(FIXTURE / "cond_weights.safetensors", config=other),
        Status.SHAPE,
        "class_embedding.weight",
    )
    other = dict(config, channels=[4, 8, 16], num_head_channels=[0, 4, 8])
    raises(lambda: phenocore.DiffusionUNet.load(FIXTURE / "cond_weights.safetensors", config=other), Status.SHAPE, "weights")
    # Config errors name the key.
    raises(lambda: phenocore.DiffusionUNet.new(dict(config, chanels=[4])), Status.INVALID_ARGUMENT, "chanels")
    raises(lambda: phenocore.DiffusionUNet.new(dict(config, spatial_dims=3)), Status.UNSUPPORTED, "spatial_dims")
    raises(lambda: phenocore.DiffusionUNet.new([1, 2]), Status.INVALID_ARGUMENT, "config")
    raises(lambda: phenocore.DiffusionUNet.load(tmp_path / "missing.safetensors", config), Status.IO, "missing")

    u = phenocore.DiffusionUNet.new(SMALL, seed=0)
    sx, st, sctx = small_inputs()
    raises(
        lambda: u(sx, st, sctx, confounders={"source": [0, 3, 1], "batch": [0, 0, 0]}),
        Status.INVALID_ARGUMENT,
        '"source" index 3 of sample 1 is out of range',
    )
    raises(lambda: u(sx, st, sctx, confounders={"source": [0, 1, 1]}), Status.INVALID_ARGUMENT, "['batch'] not given")
    raises(lambda: u(sx, st, sctx, confounders=np.zeros((3, 3), int)), Status.SHAPE, "(3, 2)")
    raises(lambda: u(sx, st, sctx, confounders=np.array([[0, 0], [0, -2], [0, 0]])), Status.INVALID_ARGUMENT, "confounders[3]")
    raises(lambda: u(sx, st, sctx), Status.INVALID_ARGUMENT, "source, batch")
    no_null = small_unet(dict(SMALL, null_embeddings=False), 0, tmp_path)
    raises(
        lambda: no_null(sx, st, sctx, confounders={"source": [0, None, 1], "batch": [0, 0, 0]}),
        Status.INVALID_ARGUMENT,
        "null embeddings",
    )
    raises(
        lambda: no_null(sx, st, sctx, context_null=True, confounders=np.zeros((3, 2), int)),
        Status.INVALID_ARGUMENT,
        "null embeddings",
    )
    closed = phenocore.DiffusionUNet.new(SMALL, seed=0)
    closed.close()
    raises(lambda: closed(sx, st, sctx), Status.INVALID_ARGUMENT, "closed")


def test_against_monai_live(config, tmp_path):
    torch = pytest.importorskip("torch")
    nets = pytest.importorskip("monai.networks.nets")
    from safetensors_np import write

    torch.manual_seed(0)
    model = nets.DiffusionModelUNet(**config).eval()
    with torch.no_grad():  # MONAI zero-initialises its output layers: randomise every parameter
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    write(tmp_path / "m.safetensors", {k: v.detach().numpy() for k, v in model.state_dict().items()})
    ours = phenocore.DiffusionUNet.load(tmp_path / "m.safetensors", config=config)
    assert ours.num_parameters == sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 4, 6)).astype(np.float32)
    t = np.array([5, 700])
    labels = np.array([2, 0])
    with torch.no_grad():
        want = model(
            torch.from_numpy(x), torch.from_numpy(t), context=torch.from_numpy(ctx), class_labels=torch.from_numpy(labels)
        ).numpy()
    assert rel_err(ours.forward(x, t, context=ctx, class_labels=labels), want) <= 1e-4
    # phenocore's file back into MONAI with strict key matching.
    ours.save(tmp_path / "ours.safetensors")
    back = nets.DiffusionModelUNet(**config).eval()
    weights = read_fixture(tmp_path / "ours.safetensors")
    back.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        again = back(
            torch.from_numpy(x), torch.from_numpy(t), context=torch.from_numpy(ctx), class_labels=torch.from_numpy(labels)
        ).numpy()
    assert np.array_equal(again, want)


TRAIN = {
    "in_channels": 2,
    "out_channels": 2,
    "channels": [8, 8],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "confounders": {"source": 2},
    "null_embeddings": True,
}


def train_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    src = np.arange(n) % 2
    lat = (2.0 * src[:, None, None, None] - 1.0) + 0.1 * rng.standard_normal((n, 2, 4, 4))
    return lat.astype(np.float32), src


def test_trainer_learns_resumes_and_samples(tmp_path):
    unet = phenocore.DiffusionUNet.new(TRAIN, seed=0)
    lat, src = train_batch()
    t = phenocore.DiffusionTrainer(unet, lr=3e-3, ema_decay=0.9, cond_dropout=0.1, seed=1)
    losses = [t.step(lat, confounders={"source": src}) for _ in range(60)]
    assert t.steps == 60 and all(np.isfinite(losses))
    assert np.mean(losses[-15:]) < 0.7 * np.mean(losses[:15]), (np.mean(losses[:15]), np.mean(losses[-15:]))
    # Resume bit for bit.
    t.save_checkpoint(tmp_path / "ckpt.safetensors")
    after = [t.step(lat, confounders=np.stack([src], axis=1)) for _ in range(3)]
    t2 = phenocore.DiffusionTrainer(unet, lr=3e-3, ema_decay=0.9, cond_dropout=0.1, seed=1)
    t2.load_checkpoint(tmp_path / "ckpt.safetensors")
    assert t2.steps == 60
    assert [t2.step(lat, confounders={"source": src}) for _ in range(3)] == after
    # The trained U-Net is a DiffusionUNet; the input U-Net is unchanged.
    trained = t.unet()
    assert trained.num_parameters == unet.num_parameters and trained.config == unet.config
    x, ts = lat[:2], np.array([10.0, 500.0])
    assert not np.array_equal(trained(x, ts, confounders={"source": [0, 1]}), unet(x, ts, confounders={"source": [0, 1]}))
    ema = t.unet(ema=True)
    # Sampling: seeded, the source separates the samples' means (the training data's are -1 / +1).
    a = trained.sample(6, 4, 4, confounders={"source": [0, 1, 0, 1, 0, 1]}, steps=20, guidance_scale=1.5, seed=3)
    b = trained.sample(6, 4, 4, confounders={"source": [0, 1, 0, 1, 0, 1]}, steps=20, guidance_scale=1.5, seed=3)
    assert a.shape == (6, 2, 4, 4) and np.array_equal(a, b) and np.all(np.isfinite(a))
    assert a[1::2].mean() > a[0::2].mean()
    assert np.all(np.isfinite(ema.sample(2, 4, 4, confounders={"source": [None, 1]}, steps=5, kind="ddpm", seed=0)))


def test_trainer_bad_input(tmp_path):
    unet = phenocore.DiffusionUNet.new(TRAIN, seed=0)
    lat, src = train_batch()
    t = phenocore.DiffusionTrainer(unet, seed=0, ema_decay=None)
    raises(lambda: t.step(lat, confounders={"source": src + 1}), Status.INVALID_ARGUMENT, '"source" index 2')
    raises(lambda: t.step(lat[:, :1], confounders={"source": src}), Status.SHAPE, "in_channels = 2")
    bad = lat.copy()
    bad[2, 1, 0, 0] = np.inf
    raises(lambda: t.step(bad, confounders={"source": src}), Status.NON_FINITE, "sample 2")
    assert t.steps == 0
    raises(lambda: t.unet(ema=True), Status.INVALID_ARGUMENT, "EMA")
    raises(lambda: t.load_checkpoint(tmp_path / "none.safetensors"), Status.IO, "none.safetensors")
    raises(lambda: phenocore.DiffusionTrainer(unet, cond_dropout=2.0), Status.INVALID_ARGUMENT, "cond_dropout")
    raises(lambda: phenocore.DiffusionTrainer(unet, schedule="square"), Status.INVALID_ARGUMENT, "schedule")
    no_null = phenocore.DiffusionUNet.new(dict(TRAIN, null_embeddings=False), seed=0)
    raises(
        lambda: no_null.sample(2, 4, 4, confounders={"source": [0, 1]}, steps=2, guidance_scale=2.0),
        Status.INVALID_ARGUMENT,
        "null embeddings",
    )
